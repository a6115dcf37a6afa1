"""`mlops demo`: the README's main job: the stack up, then every part of the loop that exists, once.

Today that is:
1. MLflow, Airflow and the model server up and healthy;
2. two versions of an example model registered in MLflow (an MLP whose transformer takes named
   raw features), unless the registry already has them;
3. version 1 deployed from the registry to the model server as stable, answering predictions;
4. version 2 deployed as a canary with 20 % of traffic, the split measured, then promoted;
5. every one of those predictions found in the inference log, and labels sent later joined to
   their predictions;
6. one DAG run through Airflow reaching the runtime environment through the mlops operator
   (`check_runtime`: GPU, ONNX Runtime providers, the MLflow registry).
Each later part of the loop (the deploy, monitor and retrain DAGs) adds its step.
"""

from __future__ import annotations

import collections
import random
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
DEMO_MODEL = "demo-fraud"
CANARY_PERCENT = 20.0
SPLIT_REQUESTS = 500
STEPS = 6


@dataclass(frozen=True)
class DemoResult:
    wall_s: float
    mlflow_url: str
    airflow_url: str
    serving_url: str
    airflow_login: dict[str, str]
    registry: dict[str, Any]
    serving: dict[str, Any]
    inference_log: dict[str, Any]
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

    progress(f"[2/{STEPS}] registering example versions of '{DEMO_MODEL}' in MLflow at {settings.mlflow_url}")
    versions = register_examples(settings.mlflow_url, DEMO_MODEL)
    progress(f"    versions {versions[0]} and {versions[1]}: {settings.mlflow_url}/#/models/{DEMO_MODEL}")

    target = get_deployment_target(settings.deployment_target, settings)
    stable, canary = versions
    progress(f"[3/{STEPS}] deploying version {stable} from the registry as stable, at {settings.serving_url}")
    target.deploy(DEMO_MODEL, stable, f"models:/{DEMO_MODEL}/{stable}", role="stable")
    if target.status(DEMO_MODEL).canary is not None:  # a canary left by an earlier, interrupted run
        target.rollback(DEMO_MODEL)
    sample_answer = predict(settings.serving_url, DEMO_MODEL, example_rows(3))
    sample = sample_answer["predictions"]

    progress(
        f"[4/{STEPS}] version {canary} as canary with {CANARY_PERCENT:.0f} % of traffic; {SPLIT_REQUESTS} requests"
    )
    target.deploy(DEMO_MODEL, canary, f"models:/{DEMO_MODEL}/{canary}", role="canary")
    target.set_traffic(DEMO_MODEL, CANARY_PERCENT)
    split = measure_split(settings.serving_url, DEMO_MODEL, SPLIT_REQUESTS)
    progress(f"    answered by version: {split} ({100 * split.get(canary, 0) / SPLIT_REQUESTS:.1f} % canary)")
    promoted = target.promote(DEMO_MODEL)
    after = measure_split(settings.serving_url, DEMO_MODEL, 50)
    progress(f"    promoted: version {promoted.stable.version if promoted.stable else '?'} answers {after}")

    progress(
        f"[5/{STEPS}] the inference log at {settings.log_store_url}: every prediction, and labels joined later"
    )
    logged = inference_log(settings, began_ms, sample_answer["request_id"], len(sample) + SPLIT_REQUESTS + 50)
    progress(
        f"    {logged['events']} events by version {logged['by_version']}; labels joined: {logged['labelled']}"
    )

    progress(f"[6/{STEPS}] running DAG '{CHECK_DAG}' through Airflow at {settings.airflow_url}")
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
        registry={"model": DEMO_MODEL, "versions": list(versions)},
        serving={
            "sample_predictions": sample,
            "canary_percent": CANARY_PERCENT,
            "split_answers": split,
            "after_promote": after,
            "stable": promoted.stable.version if promoted.stable else None,
        },
        inference_log=logged,
        check_runtime={"run": run.url, "state": run.state, "tasks": tasks, "result": report},
        stack_started=status.started,
    )


def register_examples(tracking_uri: str, name: str) -> tuple[str, str]:
    """Two versions of an example model in the registry (registered once; later runs reuse them)."""
    import mlflow
    from mlflow import MlflowClient

    from serving.examples import fraud_transformer, log_mlp

    client = MlflowClient(tracking_uri)
    existing = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("mlops-demo")
    while len(existing) < 2:
        seed = len(existing) + 1
        with mlflow.start_run(run_name=f"example-{name}-{seed}"):
            existing.append(int(log_mlp(name, seed, fraud_transformer())))
    return str(existing[0]), str(existing[1])


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
    by_version = collections.Counter(e.version for e in store.query(DEMO_MODEL, began_ms, end))
    return {
        "store": settings.log_store_url,
        "events": found,
        "by_version": dict(sorted(by_version.items())),
        "labelled": labelled,
    }


def measure_split(url: str, model: str, requests: int) -> dict[str, int]:
    answered: collections.Counter[str] = collections.Counter()
    rows = example_rows(requests, seed=1)
    with httpx.Client(base_url=url, timeout=30) as client:
        for row in rows:
            response = client.post(f"/v1/models/{model}:predict", json={"instances": [row]})
            if response.status_code != 200:
                raise MLOpsError(f"model server answered {response.status_code}: {response.text[:300]}")
            answered[response.headers["x-model-version"]] += 1
    return dict(sorted(answered.items()))
