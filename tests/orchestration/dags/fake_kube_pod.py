"""fake_kube_pod: a test DAG whose one task is a plain KubernetesPodOperator, for the fake API server.

The pod runs ``python3 -c <params.script> /airflow/xcom/return.json`` with one plain variable and
the secret ``fake-kube-secret`` as its environment, through the connection ``fake_kube`` (which
tests/orchestration/fake_kube.py gives).
"""

from __future__ import annotations

import pendulum
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG, Param
from kubernetes.client import models as k8s

with DAG(
    dag_id="fake_kube_pod",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mlops", "test"],
    doc_md="Runs a python script as a pod, its result file coming back as the task's XCom.",
    params={"script": Param("pass", type="string")},
):
    KubernetesPodOperator(
        task_id="pod",
        kubernetes_conn_id="fake_kube",
        image="python:3.11-slim",
        cmds=["python3", "-c", "{{ params.script }}"],
        arguments=["/airflow/xcom/return.json"],
        env_vars={"GREETING": "hello"},
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="fake-kube-secret"))],
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_pod",
    )
