"""deploy_on_approval: a test DAG scheduled, as deploy_model is, on the registry's approvals asset."""

from __future__ import annotations

import os

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, AssetWatcher

from mlops_airflow.approvals import ApprovalTrigger

# The test that runs Airflow's processes on this DAG names the registry, the models to watch and
# how soon an event counts as lost; any other parse (a DagBag in another test) gets a registry that
# is not there.
MLFLOW_URL = os.environ.get("MLOPS_TEST_APPROVALS_MLFLOW_URL", "http://127.0.0.1:9")
MODELS = [name for name in os.environ.get("MLOPS_TEST_APPROVALS_MODELS", "").split(",") if name] or None
REQUEUE_S = float(os.environ.get("MLOPS_TEST_APPROVALS_REQUEUE_S", "600"))

approvals = Asset(
    "mlops://registry/approvals",
    watchers=[
        AssetWatcher(
            name="mlflow-approvals",
            trigger=ApprovalTrigger(mlflow_url=MLFLOW_URL, poll_s=1.0, models=MODELS, requeue_s=REQUEUE_S),
        )
    ],
)

with DAG(
    dag_id="deploy_on_approval",
    schedule=[approvals],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mlops", "test"],
    doc_md="Runs once per approval event; the task does nothing (no api-server needed).",
):
    EmptyOperator(task_id="deploy")
