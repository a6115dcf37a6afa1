"""`mlops demo`: the README's main job: the stack up, then every part of the loop that exists, once.

Today that is:
1. MLflow, Airflow and the model server up and healthy;
2. an example model registered in MLflow (an MLP whose transformer takes named raw features): a
   first version, then each run two new candidates, one good and one deliberately bad (it answers
   NaN for a fifth of its inputs);
3. the first version deployed from the registry as stable (the `champion`), answering predictions;
4. with an application's requests flowing all the time: the good candidate approved in MLflow
   (the `challenger` alias, set through MLflow's REST API, and the approval tag too: seen twice,
   deployed once); the `deploy_model` DAG, started by the registry watcher, takes it through the
   canary ramp to 100 %;
5. the bad candidate approved the same way: the same DAG rolls it back at its first step, with
   no request of the application failed;
6. every one of those predictions found in the inference log, and labels sent later joined to
   their predictions;
7. monitoring: each version was profiled from its training data when it was registered; the
   application sends a clean stretch of traffic, then one with `age_days` shifted by half a
   standard deviation; the `monitor_model` DAG checks each stretch as a window: the clean one
   passes, the shifted one trips, names the feature, links its report from the MLflow version and
   raises the asset event `mlops://models/demo-fraud/drift` (seen in the Airflow UI's assets);
8. one DAG run through Airflow reaching the runtime environment through the mlops operator
   (`check_runtime`: GPU, ONNX Runtime providers, the MLflow registry).
The retrain DAG, when it lands, adds its step.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from common.errors import MLOpsError
from common.settings import Settings
from mlops.airflow_client import AirflowClient
from mlops.stack import Supervisor, build_components
from mlops.stack.services import airflow_password

CHECK_DAG = "check_runtime"
DEPLOY_DAG = "deploy_model"
MONITOR_DAG = "monitor_model"
DEMO_MODEL = "demo-fraud"
STEPS = 8
WINDOW_ROWS = 1000  # rows of traffic in each monitored stretch
SHIFT_DAYS = 220.0  # half the standard deviation of age_days (uniform on 0..1500: 433)
ROLLOUT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DemoResult:
    wall_s: float
    mlflow_url: str
    airflow_url: str
    serving_url: str
    airflow_login: dict[str, str]
    registry: dict[str, Any]
    serving: dict[str, Any]
    rollouts: dict[str, Any]
    inference_log: dict[str, Any]
    monitoring: dict[str, Any]
    check_runtime: dict[str, Any]
    stack_started: list[str]


def demo(settings: Settings, progress: Callable[[str], None], ttl_s: float | None = None) -> DemoResult:
    from serving.targets import get_deployment_target

    begun = time.monotonic()
    began_ms = time.time_ns() // 1_000_000
    progress(f"[1/{STEPS}] starting the stack (MLflow, Airflow, model server)")
    status = Supervisor(settings, build_components(settings), progress).up(ttl_s=ttl_s)
    login, password = status.airflow_login, airflow_password(settings)
    if login is None or password is None:
        raise MLOpsError("Airflow is up but its admin login was not written; see the api-server log")

    progress(f"[2/{STEPS}] registering versions of '{DEMO_MODEL}' in MLflow at {settings.mlflow_url}")
    first, good, bad = register_examples(settings.mlflow_url, DEMO_MODEL)
    progress(
        f"    first {first}, candidates {good} (good) and {bad} (bad): {settings.mlflow_url}/#/models/{DEMO_MODEL}"
    )

    target = get_deployment_target(settings.deployment_target, settings)
    serving_now = _serving_stable(target)  # a demo run before this one left its champion serving
    stable = serving_now or first
    progress(
        f"[3/{STEPS}] version {stable} from the registry as stable (champion), at {settings.serving_url}"
    )
    if serving_now is None:
        target.deploy(DEMO_MODEL, stable, f"models:/{DEMO_MODEL}/{stable}", role="stable")
        _mlflow(
            settings.mlflow_url,
            "POST",
            "registered-models/alias",
            name=DEMO_MODEL,
            alias="champion",
            version=stable,
        )
    sample_answer = predict(settings.serving_url, DEMO_MODEL, example_rows(3))
    sample = sample_answer["predictions"]

    rollouts: dict[str, Any] = {}
    with (
        AirflowClient(settings.airflow_url, login["user"], password.get_secret_value()) as airflow,
        Traffic(settings.serving_url, DEMO_MODEL) as traffic,
    ):
        airflow.wait_for_dag(DEPLOY_DAG)
        airflow.unpause(DEPLOY_DAG)  # the embedded stack creates DAGs unpaused; a stack of yours may not
        for number, (name, version) in enumerate((("good", good), ("bad", bad)), start=4):
            progress(
                f"[{number}/{STEPS}] approving version {version} ({name}) in MLflow: alias 'challenger' and tag approval=approved"
            )
            rollouts[name] = approve_and_follow(settings, airflow, version, progress)
            outcome = rollouts[name]
            progress(
                f"    version {version}: {outcome['outcome']} ({outcome['reason'] or 'every step passed'});"
                f" run started {outcome['started_after_s']} s after the approval, ended after {outcome['ended_after_s']} s"
            )
            progress(f"    canary report: {outcome['report']}")
        sent, failed = traffic.stop()
    progress(f"    the application's requests meanwhile: {sent} sent, {failed} failed")
    if failed:
        raise MLOpsError(f"{failed} of {sent} application requests failed during the rollouts")

    progress(
        f"[6/{STEPS}] the inference log at {settings.log_store_url}: every prediction, and labels joined later"
    )
    logged = inference_log(settings, began_ms, sample_answer["request_id"], len(sample) + sent)
    progress(
        f"    {logged['events']} events by version {logged['by_version']}; labels joined: {logged['labelled']}"
    )

    stable_now = _serving_stable(target) or stable
    progress(
        f"[7/{STEPS}] monitoring version {stable_now}: a clean stretch of traffic, then one with age_days"
        f" shifted by {SHIFT_DAYS:.0f} days; {MONITOR_DAG} checks each as a window"
    )
    with AirflowClient(settings.airflow_url, login["user"], password.get_secret_value()) as airflow:
        monitoring = monitor_demo(settings, airflow, stable_now, progress)

    progress(f"[8/{STEPS}] running DAG '{CHECK_DAG}' through Airflow at {settings.airflow_url}")
    with AirflowClient(settings.airflow_url, login["user"], password.get_secret_value()) as airflow:
        airflow.wait_for_dag(CHECK_DAG)
        airflow.unpause(CHECK_DAG)
        run = airflow.wait_for_run(airflow.trigger(CHECK_DAG, {"check_registry": True}), progress=progress)
        tasks = airflow.task_states(run)
        if run.state != "success":
            raise MLOpsError(f"DAG run {run.url} ended {run.state} (tasks: {tasks}); see its task logs")
        report = airflow.xcom(run, "doctor")

    return DemoResult(
        wall_s=round(time.monotonic() - begun, 1),
        mlflow_url=settings.mlflow_url,
        airflow_url=settings.airflow_url,
        serving_url=settings.serving_url,
        airflow_login=login,
        registry={"model": DEMO_MODEL, "first": first, "good": good, "bad": bad},
        serving={
            "sample_predictions": sample,
            "stable": _serving_stable(target),
            "application_requests": sent,
            "application_failures": failed,
        },
        rollouts=rollouts,
        inference_log=logged,
        monitoring=monitoring,
        check_runtime={"run": run.url, "state": run.state, "tasks": tasks, "result": report},
        stack_started=status.started,
    )


def approve_and_follow(
    settings: Settings, airflow: AirflowClient, version: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Approve ``version`` as a data scientist would (through MLflow's REST API, twice over), then
    follow the deploy run the registry watcher starts for it to its end."""
    known = {run.run_id for run in airflow.runs(DEPLOY_DAG)}
    approved = time.monotonic()
    _mlflow(
        settings.mlflow_url,
        "POST",
        "registered-models/alias",
        name=DEMO_MODEL,
        alias="challenger",
        version=version,
    )
    _mlflow(
        settings.mlflow_url,
        "POST",
        "model-versions/set-tag",
        name=DEMO_MODEL,
        version=version,
        key="approval",
        value="approved",
    )
    deadline = approved + ROLLOUT_TIMEOUT_S
    run = None
    while run is None:
        fresh = [r for r in airflow.runs(DEPLOY_DAG) if r.run_id not in known]
        if fresh:
            run = fresh[0]
        elif time.monotonic() > deadline:
            raise MLOpsError(
                f"no {DEPLOY_DAG} run started within {ROLLOUT_TIMEOUT_S:.0f} s of approving version {version}"
            )
        else:
            time.sleep(1.0)
    started_after = time.monotonic() - approved
    progress(f"    {DEPLOY_DAG} run {run.run_id} started {started_after:.1f} s after the approval: {run.url}")
    done = airflow.wait_for_run(run, timeout_s=ROLLOUT_TIMEOUT_S, progress=progress)
    ended_after = time.monotonic() - approved
    tasks = airflow.task_states(done)
    if done.state != "success":
        raise MLOpsError(f"DAG run {done.url} ended {done.state} (tasks: {tasks}); see its task logs")
    finished = airflow.xcom(done, "finish")
    again = [r for r in airflow.runs(DEPLOY_DAG) if r.run_id not in known and r.run_id != run.run_id]
    return {
        "version": version,
        "run": done.url,
        "outcome": finished["outcome"],
        "reason": finished["reason"],
        "steps": finished["steps"],
        "report": finished["report"]["url"],
        "started_after_s": round(started_after, 1),
        "ended_after_s": round(ended_after, 1),
        "extra_runs": len(again),  # an approval seen twice must start one run
    }


class Traffic:
    """An application's requests, one after another until stopped, with the failures counted."""

    def __init__(self, url: str, model: str) -> None:
        self.url = f"{url}/v1/models/{model}:predict"
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.sent, self.failed

    def _run(self) -> None:
        rows = example_rows(5000, seed=2)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                row = rows[self.sent % len(rows)]
                try:
                    ok = client.post(self.url, json={"instances": [row]}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.sent += 1
                self.failed += not ok
                time.sleep(0.01)


def _serving_stable(target: Any) -> str | None:
    from common.errors import ModelNotFound

    try:
        stable = target.status(DEMO_MODEL).stable
    except ModelNotFound:
        return None
    return stable.version if stable else None


def _mlflow(url: str, method: str, path: str, **body: Any) -> dict[str, Any]:
    """One call of MLflow's REST API, as any client (the MLflow UI included) makes it."""
    response = httpx.request(method, f"{url}/api/2.0/mlflow/{path}", json=body, timeout=30)
    if response.status_code != 200:
        raise MLOpsError(f"MLflow {path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def monitor_demo(
    settings: Settings, airflow: AirflowClient, version: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Two stretches of traffic, clean then shifted, each checked by a monitor_model run as its window."""
    from monitoring.monitor import drift_asset

    _profile(settings.mlflow_url, DEMO_MODEL, version)  # a champion from before profiles: made now
    airflow.wait_for_dag(MONITOR_DAG)
    airflow.unpause(MONITOR_DAG)
    stretches = {}
    for name, shift in (("clean", 0.0), ("shifted", SHIFT_DAYS)):
        start = time.time_ns() // 1_000_000
        rows = example_rows(WINDOW_ROWS, seed=11 if shift else 10)
        for row in rows:
            row["age_days"] += shift
        for first in range(0, len(rows), 50):
            predict(settings.serving_url, DEMO_MODEL, rows[first : first + 50])
        end = time.time_ns() // 1_000_000 + 1
        _wait_logged(settings, start, end, len(rows))
        stretches[name] = (start, end)
    results = {}
    for name, (start, end) in stretches.items():
        conf = {
            "model": DEMO_MODEL,
            "end": _iso(end),
            "window": f"{(end - start) / 1000:.3f}s",
            "cooldown": "0s",
        }
        run = airflow.wait_for_run(airflow.trigger(MONITOR_DAG, conf), progress=progress)
        if run.state != "success":
            raise MLOpsError(f"DAG run {run.url} ended {run.state} (tasks: {airflow.task_states(run)})")
        checked = airflow.xcom(run, "check", map_index=0)
        raised = airflow.xcom(run, "trigger")["raised"]
        results[name] = {
            "run": run.url,
            "decision": checked["decision"],
            "reason": checked["reason"],
            "tripped": checked["tripped"],
            "report": checked["links"]["report"],
            "raised": raised,
        }
        progress(f"    {name} window: {checked['decision']}: {checked['reason'][:300]}")
        progress(f"    report: {checked['links']['report']}")
    clean, shifted = results["clean"], results["shifted"]
    if clean["decision"] != "ok" or clean["raised"]:
        raise MLOpsError(f"the clean window was not passed: {clean['decision']}: {clean['reason']}")
    if "skew:age_days" not in shifted["tripped"] or not shifted["raised"]:
        raise MLOpsError(
            f"the shifted window did not trip on age_days: {shifted['decision']}: {shifted['reason']}"
        )
    deadline = time.monotonic() + 30  # the event is the trigger task's; the API may show it a moment later
    while True:
        page, events = airflow.asset_events(drift_asset(DEMO_MODEL))
        if [
            e for e in events if (e.get("extra") or {}).get("report") == shifted["report"]
        ] or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    events = [e for e in events if (e.get("extra") or {}).get("report") == shifted["report"]]
    if not events:
        raise MLOpsError(f"no event on {drift_asset(DEMO_MODEL)} after the shifted window tripped")
    extra = events[0].get("extra") or {}
    progress(
        f"    asset event on {drift_asset(DEMO_MODEL)}: {extra.get('tripped')}; in the Airflow UI: {page}"
    )
    tags = _mlflow(settings.mlflow_url, "GET", f"model-versions/get?name={DEMO_MODEL}&version={version}")
    linked = {t["key"]: t["value"] for t in tags["model_version"].get("tags", [])}.get("monitoring.report")
    return {
        "version": version,
        "windows": results,
        "asset": drift_asset(DEMO_MODEL),
        "asset_page": page,
        "asset_event": extra,
        "version_report": linked,
    }


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _wait_logged(settings: Settings, start: int, end: int, expected: int) -> None:
    from monitoring.logstore import get_log_store

    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    deadline = time.monotonic() + 60
    while True:
        store.refresh()
        found = store.count(DEMO_MODEL, start, end)
        if found >= expected:
            return
        if time.monotonic() > deadline:
            raise MLOpsError(
                f"the inference log holds {found} of the {expected} events of a window after 60 s"
            )
        time.sleep(0.5)


def _profile(tracking_uri: str, name: str, version: str) -> None:
    """The version's reference profile from the examples' training data (as `mlops profile` makes it)."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from common.settings import MonitorSettings
    from monitoring.profile import build_profile, store_profile

    data = pd.DataFrame(example_rows(5000, seed=1))
    profile = build_profile(name, version, data, source="the demo's training rows (example_rows, seed 1)")
    with tempfile.TemporaryDirectory() as folder:
        store_profile(profile, tracking_uri, MonitorSettings().experiment, Path(folder))


def register_examples(tracking_uri: str, name: str) -> tuple[str, str, str]:
    """The model's first version (registered once), and two new candidates: good and bad, each
    profiled from the training data as it is registered."""
    import mlflow
    from mlflow import MlflowClient

    from serving.examples import fraud_transformer, log_mlp

    client = MlflowClient(tracking_uri)
    existing = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("mlops-demo")
    with mlflow.start_run(run_name=f"example-{name}"):
        first = str(existing[0]) if existing else log_mlp(name, 1, fraud_transformer())
        good = log_mlp(name, 1, fraud_transformer())  # trained again: the same answers
        bad = log_mlp(name, 1, fraud_transformer(), fault="nan")
    for version in {first, good, bad}:
        _profile(tracking_uri, name, version)
    return first, good, bad


def example_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "amount": round(rng.lognormvariate(3.5, 1.0), 2),
            "age_days": rng.randint(0, 1500),
            "country": rng.choice(["DE", "FR", "US"]),
        }
        for _ in range(count)
    ]


def predict(url: str, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/models/{model}:predict", json={"instances": rows}, timeout=30)
    if response.status_code != 200:
        raise MLOpsError(f"model server answered {response.status_code}: {response.text[:300]}")
    return response.json()


def inference_log(settings: Settings, began_ms: int, request_id: str, expected: int) -> dict[str, Any]:
    """Wait until every prediction of this demo is in the log, label the first request's rows,
    and read the labels back joined to their predictions."""
    from monitoring.logstore import get_log_store
    from serving.auth import feedback_token

    labels = ["legit", "fraud", "legit"]
    token = feedback_token(settings)  # none on loopback; the stack's own beyond it
    response = httpx.post(
        f"{settings.serving_url}/v1/feedback",
        json={"request_id": request_id, "labels": labels},
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    if response.status_code != 202:
        raise MLOpsError(f"feedback refused ({response.status_code}): {response.text[:300]}")
    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    deadline = time.monotonic() + 60
    while True:
        store.refresh()
        end = time.time_ns() // 1_000_000 + 1
        found = store.count(DEMO_MODEL, began_ms, end)
        labelled = sum(1 for item in store.labelled(DEMO_MODEL, began_ms, end) if item.label is not None)
        if (found >= expected and labelled >= len(labels)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if found < expected or labelled < len(labels):
        raise MLOpsError(
            f"the inference log holds {found} of {expected} events and {labelled} labels after 60 s"
        )
    by_version: collections.Counter[str] = collections.Counter()
    failed = 0  # the canary's failures: each answered again by stable, so a request logged twice
    for event in store.query(DEMO_MODEL, began_ms, end):
        by_version[event.version] += 1
        failed += event.status != "ok"
    return {
        "store": settings.log_store_url,
        "events": found,
        "by_version": dict(sorted(by_version.items())),
        "failed_attempts": failed,
        "labelled": labelled,
    }
