"""run_failing_command: a test DAG whose one task runs an `mlops` command against a dead registry."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from mlops_airflow import MlopsOperator

with DAG(
    dag_id="run_failing_command",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mlops", "test"],
    params={"mlflow_uri": Param("http://127.0.0.1:9", type="string")},
):
    MlopsOperator(task_id="doctor", arguments=["doctor", "--mlflow-uri", "{{ params.mlflow_uri }}"])
