"""`mlops demo`: the README's main job: the stack up, then the whole loop, once, through Airflow.

1. MLflow, Airflow and the model server up and healthy;
2. an example fraud model registered in MLflow (an MLP whose transformer takes named raw
   features): a first version, then each run two new candidates, one good and one deliberately
   bad (it answers NaN for a fifth of its inputs);
3. its first version deployed from the registry as stable (the `champion`), answering predictions;
4. with an application's requests flowing all the time: the good candidate approved in MLflow
   (the `challenger` alias, set through MLflow's REST API, and the approval tag too: seen twice,
   deployed once); the `deploy_model` DAG, started by the registry watcher, takes it through the
   canary ramp to 100 %;
5. the bad candidate approved the same way: the same DAG rolls it back at its first step, with
   no request of the application failed;
6. every one of those predictions found in the inference log, and labels sent later joined to
   their predictions;
7. to 9. the closed loop on a model trained on the shipped digits (mlops/demo_loop.py): trained,
   approved and deployed; its traffic moves; `monitor_model` trips; the drift event schedules
   `retrain_model`, which registers and approves a better version; `deploy_model` takes it
   through the canary to 100 %;
10. one DAG run through Airflow reaching the runtime environment through the mlops operator
   (`check_runtime`: GPU, ONNX Runtime providers, the MLflow registry).
It ends with a timeline: each step, the seconds since the start, its DAG run and its links.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from common.errors import MLOpsError
from common.settings import Settings
from mlops.airflow_client import AirflowClient, DagRun
from mlops.stack import Supervisor, build_components
from mlops.stack.services import airflow_password

CHECK_DAG = "check_runtime"
DEPLOY_DAG = "deploy_model"
MONITOR_DAG = "monitor_model"
DEMO_MODEL = "demo-fraud"
STEPS = 10
ROLLOUT_TIMEOUT_S = 600.0


@dataclass
class Timeline:
    """What happened when: each step's seconds since the demo began, and its links."""

    began: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, what: str, **links: str | None) -> dict[str, Any]:
        """The step, done now; its entry (a link known later is added to it)."""
        self.steps.append(
            {
                "step": what,
                "at_s": round(time.monotonic() - self.began, 1),
                **{k: v for k, v in links.items() if v},
            }
        )
        return self.steps[-1]

    @staticmethod
    def numbered(number: int) -> str:
        return f"[{number}/{STEPS}]"

    def lines(self) -> list[str]:
        out = []
        for item in self.steps:
            out.append(f"  {item['at_s']:7.1f} s  {item['step']}")
            out += [
                f"             {key}: {value}" for key, value in item.items() if key not in ("step", "at_s")
            ]
        return out


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
    loop: dict[str, Any]
    check_runtime: dict[str, Any]
    stack_started: list[str]
    timeline: list[dict[str, Any]]


def demo(settings: Settings, progress: Callable[[str], None], ttl_s: float | None = None) -> DemoResult:
    from mlops.demo_loop import closed_loop
    from serving.targets import get_deployment_target

    timeline = Timeline()
    step = timeline.numbered
    began_ms = time.time_ns() // 1_000_000
    progress(f"{step(1)} starting the stack (MLflow, Airflow, model server)")
    status = Supervisor(settings, build_components(settings), progress).up(ttl_s=ttl_s)
    login, password = status.airflow_login, airflow_password(settings)
    if login is None or password is None:
        raise MLOpsError("Airflow is up but its admin login was not written; see the api-server log")
    timeline.add("the stack is up", airflow=settings.airflow_url, mlflow=settings.mlflow_url)

    progress(f"{step(2)} registering versions of '{DEMO_MODEL}' in MLflow at {settings.mlflow_url}")
    first, good, bad = register_examples(settings.mlflow_url, DEMO_MODEL)
    progress(
        f"    first {first}, candidates {good} (good) and {bad} (bad): {settings.mlflow_url}/#/models/{DEMO_MODEL}"
    )

    target = get_deployment_target(settings.deployment_target, settings)
    serving_now = _serving_stable(target)  # a demo run before this one left its champion serving
    stable = serving_now or first
    progress(f"{step(3)} version {stable} from the registry as stable (champion), at {settings.serving_url}")
    if serving_now is None:
        serve_as_champion(settings, target, DEMO_MODEL, stable)
    sample_answer = predict(settings.serving_url, DEMO_MODEL, example_rows(3))
    sample = sample_answer["predictions"]
    timeline.add(
        f"{DEMO_MODEL} version {stable} serving", model=f"{settings.mlflow_url}/#/models/{DEMO_MODEL}"
    )

    rollouts: dict[str, Any] = {}
    with (
        AirflowClient(settings.airflow_url, login["user"], password.get_secret_value()) as airflow,
        Traffic(settings.serving_url, DEMO_MODEL) as traffic,
    ):
        airflow.wait_for_dag(DEPLOY_DAG)
        airflow.unpause(DEPLOY_DAG)  # the embedded stack creates DAGs unpaused; a stack of yours may not
        for number, (name, version) in enumerate((("good", good), ("bad", bad)), start=4):
            progress(
                f"{step(number)} approving version {version} ({name}) in MLflow: alias 'challenger' and tag approval=approved"
            )
            rollouts[name] = approve_and_follow(settings, airflow, DEMO_MODEL, version, progress)
            outcome = rollouts[name]
            progress(
                f"    version {version}: {outcome['outcome']} ({outcome['reason'] or 'every step passed'});"
                f" run started {outcome['started_after_s']} s after the approval, ended after {outcome['ended_after_s']} s"
            )
            progress(f"    canary report: {outcome['report']}")
            timeline.add(
                f"{DEMO_MODEL} version {version} ({name}): {outcome['outcome']}",
                run=outcome["run"],
                report=outcome["report"],
            )
        traffic.stop()
        sent, failed = traffic.sent, traffic.failed
    progress(f"    the application's requests meanwhile: {sent} sent, {failed} failed")
    if failed:
        raise MLOpsError(f"{failed} of {sent} application requests failed during the rollouts")

    progress(
        f"{step(6)} the inference log at {settings.log_store_url}: every prediction, and labels joined later"
    )
    logged = inference_log(settings, began_ms, sample_answer["request_id"], len(sample) + sent)
    progress(
        f"    {logged['events']} events by version {logged['by_version']}; labels joined: {logged['labelled']}"
    )
    timeline.add(f"{logged['events']} predictions found in the inference log", store=settings.log_store_url)

    with AirflowClient(settings.airflow_url, login["user"], password.get_secret_value()) as airflow:
        loop = closed_loop(settings, airflow, timeline, progress)

    progress(f"{step(10)} running DAG '{CHECK_DAG}' through Airflow at {settings.airflow_url}")
    with AirflowClient(settings.airflow_url, login["user"], password.get_secret_value()) as airflow:
        airflow.wait_for_dag(CHECK_DAG)
        airflow.unpause(CHECK_DAG)
        run = airflow.wait_for_run(airflow.trigger(CHECK_DAG, {"check_registry": True}), progress=progress)
        tasks = airflow.task_states(run)
        if run.state != "success":
            raise MLOpsError(f"DAG run {run.url} ended {run.state} (tasks: {tasks}); see its task logs")
        report = airflow.xcom(run, "doctor")
    timeline.add("check_runtime: the runtime reached from Airflow", run=run.url)

    progress("the timeline (seconds since the start):")
    for line in timeline.lines():
        progress(line)
    return DemoResult(
        wall_s=round(time.monotonic() - timeline.began, 1),
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
        loop=loop,
        check_runtime={"run": run.url, "state": run.state, "tasks": tasks, "result": report},
        stack_started=status.started,
        timeline=timeline.steps,
    )


def approve_and_follow(
    settings: Settings,
    airflow: AirflowClient,
    model: str,
    version: str,
    progress: Callable[[str], None],
    approve: bool = True,
    known: set[str] | None = None,
) -> dict[str, Any]:
    """Approve ``version`` as a data scientist would (through MLflow's REST API, twice over), then
    follow the deploy run the registry watcher starts for it to its end. ``approve=False``: the
    version was approved already (by the retraining's policy); ``known``: the deploy runs there
    were before that approval."""
    known = known if known is not None else {run.run_id for run in airflow.runs(DEPLOY_DAG)}
    approved = time.monotonic()
    if approve:
        mlflow_call(
            settings.mlflow_url,
            "POST",
            "registered-models/alias",
            name=model,
            alias="challenger",
            version=version,
        )
        mlflow_call(
            settings.mlflow_url, "POST", "model-versions/set-tag", name=model, version=version,
            key="approval", value="approved",
        )  # fmt: skip
    run = new_run(airflow, DEPLOY_DAG, known, f"approving version {version}")
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
        "report": (finished.get("report") or {}).get("url"),
        "started_after_s": round(started_after, 1),
        "ended_after_s": round(ended_after, 1),
        "extra_runs": len(again),  # an approval seen twice must start one run
    }


class Application:
    """An application's requests on a thread of their own, from ``with`` until stopped."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Application:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        raise NotImplementedError


class Traffic(Application):
    """Rows of the fraud example, one request after another, with the failures counted."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__("demo-traffic")
        self.url = f"{url}/v1/models/{model}:predict"
        self.sent = self.failed = 0

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


def new_run(airflow: AirflowClient, dag_id: str, known: set[str], cause: str) -> DagRun:
    """The oldest run of ``dag_id`` not in ``known``, once one has started (within the rollout
    timeout of ``cause``, which the error names)."""
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    while True:
        fresh = [run for run in airflow.runs(dag_id) if run.run_id not in known]  # newest first
        if fresh:
            return fresh[-1]
        if time.monotonic() > deadline:
            raise MLOpsError(f"no {dag_id} run started within {ROLLOUT_TIMEOUT_S:.0f} s of {cause}")
        time.sleep(1.0)


def serve_as_champion(settings: Settings, target: Any, model: str, version: str) -> None:
    """``version`` deployed from the registry as the stable one, and named the ``champion``."""
    target.deploy(model, version, f"models:/{model}/{version}", role="stable")
    mlflow_call(
        settings.mlflow_url, "POST", "registered-models/alias", name=model, alias="champion", version=version
    )


def _serving_stable(target: Any) -> str | None:
    from common.errors import ModelNotFound

    try:
        stable = target.status(DEMO_MODEL).stable
    except ModelNotFound:
        return None
    return stable.version if stable else None


def mlflow_call(url: str, method: str, path: str, **body: Any) -> dict[str, Any]:
    """One call of MLflow's REST API, as any client (the MLflow UI included) makes it."""
    response = httpx.request(method, f"{url}/api/2.0/mlflow/{path}", json=body, timeout=30)
    if response.status_code != 200:
        raise MLOpsError(f"MLflow {path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def wait_logged(settings: Settings, model: str, start: int, end: int, expected: int) -> None:
    from monitoring.logstore import get_log_store

    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    deadline = time.monotonic() + 60
    while True:
        store.refresh()
        found = store.count(model, start, end)
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
