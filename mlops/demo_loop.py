"""The demo's closed loop: a model trained on the shipped digits, deployed, monitored, retrained when
the world it sees changes, and redeployed through the same canary, every hand-over Airflow's.

1. the first version trained (`mlops train digits --dataset digits`: seeded PyTorch, ONNX with a
   parity check, profiled, registered with its training data) and approved in MLflow as a data
   scientist would; `deploy_model`, started by the approval, makes it the stable version;
2. an application sends one image per request and sends each label back a moment later; first
   the images as scanned, then, as if a new scanner came in, every image one cell to the right;
3. `monitor_model` checks each stretch as a window: the first passes, the second trips and raises
   `mlops://models/digits/drift`;
4. that event schedules `retrain_model`: the first version's training rows plus the labelled
   traffic, trained, exported, evaluated against the champion on the newest moved images,
   registered with its lineage, and approved by policy (the `challenger` alias);
5. the approval starts `deploy_model` again: the new version through the canary, with the moved
   images flowing, to 100 %; the first version is the champion it replaced.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import httpx

from common.errors import MLOpsError
from common.settings import Settings
from mlops.airflow_client import AirflowClient, DagRun
from mlops.demo import (
    DEPLOY_DAG,
    MONITOR_DAG,
    ROLLOUT_TIMEOUT_S,
    Application,
    Timeline,
    approve_and_follow,
    iso,
    mlflow_call,
    new_run,
    serve_as_champion,
    wait_logged,
)
from monitoring.events import now_ms

LOOP_MODEL = "digits"  # config/models.yaml has its demo settings (ramp, monitor window, retrain window)
RETRAIN_DAG = "retrain_model"
DRIFT_ASSET = f"mlops://models/{LOOP_MODEL}/drift"
WINDOW_ROWS = 400  # images in each monitored stretch (the model's min_events is 300)
# The application's phases: what it sends, and who answers.
SCANNED = "as scanned (version 1)"
MOVED = "moved (version 1)"
MEANWHILE = "moved, while retraining and in the canary"
RETRAINED = "moved (the retrained version)"


class LabelledTraffic(Application):
    """An application: one image per request, one after another until stopped, and each image's
    label sent back (`POST /v1/feedback`) once answered. Its ``phase`` names the stretch: the
    images as scanned, then (any other phase) moved one cell to the right. Counts, per phase, the
    requests answered and the answers that were right; and the failures."""

    def __init__(self, url: str, model: str) -> None:
        from retraining.builtin import LABEL, load, shift_right

        super().__init__("demo-labelled-traffic")
        frame = load("digits").sample(frac=1.0, random_state=5).reset_index(drop=True)
        features = frame.drop(columns=LABEL)
        self.labels = frame[LABEL].tolist()
        self.rows = {
            False: features.to_dict(orient="records"),
            True: shift_right(features).to_dict(orient="records"),
        }
        self.predict_url, self.feedback_url = f"{url}/v1/models/{model}:predict", f"{url}/v1/feedback"
        self.phase = SCANNED
        self.answered: collections.Counter[str] = collections.Counter()
        self.right: collections.Counter[str] = collections.Counter()
        self.failed = 0

    def accuracy(self) -> dict[str, float]:
        return {phase: round(self.right[phase] / n, 4) for phase, n in self.answered.items() if n}

    def wait_for(self, rows: int, timeout_s: float = 300.0) -> None:
        """Until the current phase has ``rows`` requests answered."""
        deadline = time.monotonic() + timeout_s
        while self.answered[self.phase] < rows:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise MLOpsError(
                    f"the application had {self.answered[self.phase]} of {rows} requests answered in {timeout_s:.0f} s"
                )
            time.sleep(0.2)

    def _run(self) -> None:
        count = 0
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                phase, index = self.phase, count % len(self.labels)
                count += 1
                try:
                    image = self.rows[phase != SCANNED][index]
                    answer = client.post(self.predict_url, json={"instances": [image]})
                    ok = answer.status_code == 200
                    if ok:
                        body = answer.json()
                        label = self.labels[index]
                        self.right[phase] += body["predictions"][0]["label"] == label
                        client.post(
                            self.feedback_url, json={"request_id": body["request_id"], "labels": [label]}
                        )
                except httpx.HTTPError:
                    ok = False
                self.answered[phase] += ok
                self.failed += not ok
                time.sleep(0.005)


def closed_loop(
    settings: Settings, airflow: AirflowClient, timeline: Timeline, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Steps 7 to 9 of the demo (its docstring): the loop on the digits model, through Airflow."""
    from retraining.builtin import load
    from retraining.pipeline import train_first

    step = timeline.numbered
    progress(f"{step(7)} the loop: the first version of '{LOOP_MODEL}', trained on the shipped digits")
    first = train_first(
        settings, LOOP_MODEL, load("digits"), "label", "the built-in dataset 'digits'", None,
        lambda line: progress(f"    {line}") if line.startswith("[") else None,
    )  # fmt: skip
    version = first["version"]
    held_out = first.get("metrics", {}).get("held_out", {}).get("accuracy")
    progress(
        f"    version {version}"
        + (f": accuracy {held_out:.3f} on held-out digits" if held_out is not None else " (trained before)")
    )
    for dag_id in (DEPLOY_DAG, MONITOR_DAG, RETRAIN_DAG):
        airflow.wait_for_dag(dag_id)
        airflow.unpause(dag_id)
    first_rollout = _first_version_serving(settings, airflow, version, progress)
    timeline.add(f"version {version} serving as stable", run=first_rollout.get("run"),
                 version=_version_url(settings, version))  # fmt: skip

    with LabelledTraffic(settings.serving_url, LOOP_MODEL) as app:
        progress(
            f"{step(8)} the application's images, then the same images one cell to the right; {MONITOR_DAG} checks each stretch"
        )
        began = now_ms()
        app.wait_for(WINDOW_ROWS)
        switched = now_ms()
        app.phase = MOVED
        app.wait_for(WINDOW_ROWS)
        ended = now_ms() + 1
        app.phase = MEANWHILE
        for start, end in ((began, switched), (switched, ended)):
            wait_logged(settings, LOOP_MODEL, start, end, WINDOW_ROWS)
        known = {run.run_id for run in airflow.runs(RETRAIN_DAG)}
        deploys = {run.run_id for run in airflow.runs(DEPLOY_DAG)}  # before the retrained version's approval
        windows = {
            name: _monitor(airflow, start, end, progress)
            for name, (start, end) in (("clean", (began, switched)), ("shifted", (switched, ended)))
        }
        clean, shifted = windows["clean"], windows["shifted"]
        if clean["decision"] != "ok":
            raise MLOpsError(f"the first stretch was not passed: {clean['decision']}: {clean['reason']}")
        if shifted["decision"] != "tripped":
            raise MLOpsError(
                f"the moved images did not trip monitoring: {shifted['decision']}: {shifted['reason']}"
            )
        timeline.add("monitoring: first stretch ok", run=clean["run"], report=clean["report"])
        tripped = timeline.add(
            "monitoring: moved images tripped", run=shifted["run"], report=shifted["report"]
        )

        progress(f"{step(9)} the drift event schedules {RETRAIN_DAG}; its approval, {DEPLOY_DAG}")
        retrain = _follow_new_run(airflow, RETRAIN_DAG, known, "the drift event", progress)
        asset_page, _ = airflow.asset_events(DRIFT_ASSET)  # the event, in the Airflow UI's assets
        tripped["event"] = asset_page
        approved = airflow.xcom(retrain, "approve")
        registered = airflow.xcom(retrain, "register")
        progress(f"    version {approved['version']}: {approved['decision']}: {approved['reason'][:300]}")
        timeline.add(f"version {approved['version']} retrained and registered ({approved['decision']})",
                     run=retrain.url, version=_version_url(settings, approved["version"]))  # fmt: skip
        if approved["decision"] != "approved":
            raise MLOpsError(f"the retrained version was not approved: {approved['reason']}")
        rollout = approve_and_follow(
            settings, airflow, LOOP_MODEL, approved["version"], progress, approve=False, known=deploys
        )
        progress(
            f"    version {approved['version']}: {rollout['outcome']} ({rollout['reason'] or 'every step passed'})"
        )
        timeline.add(f"version {approved['version']} through the canary: {rollout['outcome']}",
                     run=rollout["run"], report=rollout["report"])  # fmt: skip
        if rollout["outcome"] == "promoted":
            app.phase = RETRAINED
            app.wait_for(WINDOW_ROWS // 2)
    accuracy = app.accuracy()
    progress(
        "    the application's answers right: "
        + "; ".join(f"{phase}: {share:.1%}" for phase, share in accuracy.items() if phase != MEANWHILE)
    )
    if app.failed:
        raise MLOpsError(f"{app.failed} application requests failed during the loop")
    if rollout["outcome"] != "promoted":
        raise MLOpsError(f"the retrained version was not promoted: {rollout['reason']}")
    return {
        "model": LOOP_MODEL,
        "first": {"version": version, "metrics": first.get("metrics"), "rollout": first_rollout},
        "windows": windows,
        "drift_event_page": asset_page,
        "retrain": {
            "run": retrain.url,
            "version": approved["version"],
            "decision": approved["decision"],
            "reason": approved["reason"],
            "lineage": registered.get("lineage") or {},
            "metrics": airflow.xcom(retrain, "evaluate")["metrics"],
        },
        "rollout": rollout,
        "registry": _registry_after(settings, version, approved["version"]),
        "application": {"answered": sum(app.answered.values()), "failed": app.failed, "accuracy": accuracy},
    }


def _first_version_serving(
    settings: Settings, airflow: AirflowClient, version: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The first version as the stable one: approved in MLflow and deployed by ``deploy_model`` (a
    first version has nothing to compare a canary with); after a demo run before this one, which
    left a retrained version serving, put back as it was so the loop starts over."""
    from serving.targets import get_deployment_target

    champion = _alias(settings, "champion")
    if champion is None:
        progress(f"    approving version {version} in MLflow; {DEPLOY_DAG} deploys it")
        rollout = approve_and_follow(settings, airflow, LOOP_MODEL, version, progress)
        if rollout["outcome"] != "promoted":
            raise MLOpsError(f"version {version} was not deployed: {rollout['reason']}")
        progress(f"    version {version}: {rollout['outcome']} ({rollout['reason'] or 'every step passed'})")
        return rollout
    for dag_id in (RETRAIN_DAG, DEPLOY_DAG):  # what a demo run that failed may have left going
        for run in airflow.runs(dag_id):
            if run.state in ("queued", "running"):
                progress(f"    waiting for {dag_id} run {run.run_id}, left by a demo run before this one")
                airflow.wait_for_run(run, timeout_s=ROLLOUT_TIMEOUT_S)
    serve_as_champion(
        settings, get_deployment_target(settings.deployment_target, settings), LOOP_MODEL, version
    )
    progress(
        f"    version {champion} was champion (a demo run before this one): version {version} serves again"
    )
    return {"outcome": "reset", "version": version}


def _monitor(airflow: AirflowClient, start: int, end: int, progress: Callable[[str], None]) -> dict[str, Any]:
    conf = {"model": LOOP_MODEL, "end": iso(end), "window": f"{(end - start) / 1000:.3f}s", "cooldown": "0s"}
    run = airflow.wait_for_run(airflow.trigger(MONITOR_DAG, conf), progress=progress)
    if run.state != "success":
        raise MLOpsError(f"DAG run {run.url} ended {run.state} (tasks: {airflow.task_states(run)})")
    checked = airflow.xcom(run, "check", map_index=0)
    tripped = checked["tripped"]
    named = f"{len(tripped)} checks tripped: {', '.join(tripped[:6])}{', ...' if len(tripped) > 6 else ''}"
    progress(f"    {checked['decision']}: {named if tripped else checked['reason'][:240]}")
    return {
        "run": run.url,
        "decision": checked["decision"],
        "reason": checked["reason"],
        "tripped": checked["tripped"],
        "report": checked["links"]["report"],
        "raised": airflow.xcom(run, "trigger")["raised"],
    }


def _follow_new_run(
    airflow: AirflowClient, dag_id: str, known: set[str], cause: str, progress: Callable[[str], None]
) -> DagRun:
    run = new_run(airflow, dag_id, known, cause)
    progress(f"    {dag_id} run {run.run_id}, started by {cause}: {run.url}")
    done = airflow.wait_for_run(run, timeout_s=ROLLOUT_TIMEOUT_S, progress=progress)
    if done.state != "success":
        raise MLOpsError(
            f"DAG run {done.url} ended {done.state} (tasks: {airflow.task_states(done)}); see its task logs"
        )
    return done


def _registry_after(settings: Settings, first: str, retrained: str) -> dict[str, Any]:
    """What the MLflow UI shows now: the champion, and the version it replaced."""
    tags = {}
    for version in (first, retrained):
        found = mlflow_call(
            settings.mlflow_url, "GET", f"model-versions/get?name={LOOP_MODEL}&version={version}"
        )
        tags[version] = {t["key"]: t["value"] for t in found["model_version"].get("tags", [])}
    return {
        "champion": _alias(settings, "champion"),
        "replaced": {"version": first, "rollout": tags[first].get("rollout"), "replaced_by": tags[first].get("rollout.replaced_by")},
        "retrained": {"version": retrained, "parent": tags[retrained].get("mlops.parent_version"),
                      "trigger_reason": tags[retrained].get("mlops.trigger_reason"), "rollout": tags[retrained].get("rollout")},
        "model_page": f"{settings.mlflow_url}/#/models/{LOOP_MODEL}",
    }  # fmt: skip


def _alias(settings: Settings, alias: str) -> str | None:
    response = httpx.get(
        f"{settings.mlflow_url}/api/2.0/mlflow/registered-models/alias",
        params={"name": LOOP_MODEL, "alias": alias},
        timeout=30,
    )
    return response.json()["model_version"]["version"] if response.status_code == 200 else None


def _version_url(settings: Settings, version: str) -> str:
    return f"{settings.mlflow_url}/#/models/{LOOP_MODEL}/versions/{version}"
