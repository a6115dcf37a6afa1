"""check_runtime: an operator's smoke check that Airflow reaches the mlops runtime and the registry.

Trigger it from the Airflow UI after a deploy of the platform: its one task runs `mlops doctor`
in the runtime environment (a subprocess here, a pod at scale) and returns the report (packages,
ONNX Runtime providers, CUDA device, MLflow reachability) as its XCom.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from mlops_airflow import MlopsOperator

with DAG(
    dag_id="check_runtime",
    description="Airflow -> mlops runtime -> MLflow registry, end to end",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mlops", "platform"],
    doc_md=__doc__,
    params={
        "require_gpu": Param(False, type="boolean", description="fail when no CUDA device is usable"),
        "check_registry": Param(True, type="boolean", description="check that MLflow answers"),
    },
):
    MlopsOperator(
        task_id="doctor",
        arguments=[
            "doctor",
            "{{ '--require-gpu' if params.require_gpu else '' }}",
            "{{ '' if params.check_registry else '--no-registry' }}",
        ],
    )
