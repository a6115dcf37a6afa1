"""`mlops demo`: the README's main job: the stack up, then every part of the loop that exists, once.

Today that is: MLflow and Airflow up and healthy, and one DAG run through Airflow that reaches the
runtime environment through the mlops operator (`check_runtime`: GPU, ONNX Runtime providers,
the MLflow registry). Each later part of the loop adds its step here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlops.airflow_client import AirflowClient
from mlops.errors import MLOpsError
from mlops.settings import Settings
from mlops.stack import Supervisor, build_components

CHECK_DAG = "check_runtime"


@dataclass(frozen=True)
class DemoResult:
    wall_s: float
    mlflow_url: str
    airflow_url: str
    airflow_login: dict[str, str]
    check_runtime: dict[str, Any]
    stack_started: list[str]


def demo(settings: Settings, progress: Callable[[str], None], ttl_s: float | None = None) -> DemoResult:
    begun = time.monotonic()
    progress("[1/3] starting the stack (MLflow, Airflow)")
    status = Supervisor(settings, build_components(settings), progress).up(ttl_s=ttl_s)
    login = status.airflow_login
    if login is None:
        raise MLOpsError("Airflow is up but its admin login was not written; see the api-server log")

    progress(f"[2/3] running DAG '{CHECK_DAG}' through Airflow at {settings.airflow_url}")
    with AirflowClient(settings.airflow_url, login["user"], login["password"]) as airflow:
        airflow.wait_for_dag(CHECK_DAG)
        airflow.unpause(CHECK_DAG)
        run = airflow.wait_for_run(airflow.trigger(CHECK_DAG, {"check_registry": True}), progress=progress)
        tasks = airflow.task_states(run)
        if run.state != "success":
            raise MLOpsError(f"DAG run {run.url} ended {run.state} (tasks: {tasks}); see its task logs")
        report = airflow.xcom(run, "doctor")

    progress("[3/3] done")
    return DemoResult(
        wall_s=round(time.monotonic() - begun, 1),
        mlflow_url=settings.mlflow_url,
        airflow_url=settings.airflow_url,
        airflow_login=login,
        check_runtime={"run": run.url, "state": run.state, "tasks": tasks, "result": report},
        stack_started=status.started,
    )
