"""mlops_in_pods: a test DAG of `mlops` commands run by the runtime operator, whatever launcher the
connection names (tests/orchestration/test_pods.py gives it the Kubernetes one, against a fake API).

- `query`: JSON lines (`logs query --jsonl`), the store named by the namespace's settings;
- `refused`: a window that is no time: exit 2, which is not retried;
- `doctor`: a registry that does not answer: exit 1, which is.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from mlops_airflow import MlopsOperator

with DAG(
    dag_id="mlops_in_pods",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mlops", "test"],
):
    retry = {"retries": 1, "retry_delay": timedelta(0)}
    MlopsOperator(task_id="query", arguments=["logs", "query", "--model", "m", "--since", "1h", "--jsonl"])
    MlopsOperator(
        task_id="refused", arguments=["logs", "query", "--model", "m", "--since", "nonesuch"], **retry
    )
    MlopsOperator(task_id="doctor", arguments=["doctor", "--mlflow-uri", "http://127.0.0.1:9"], **retry)
