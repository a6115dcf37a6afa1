"""The runtime operator: an `mlops` command's JSON comes back through XCom, its errors fail the task."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.utils.state import DagRunState, TaskInstanceState

from mlops_airflow import MlopsOperator, RuntimeConfig
from mlops_airflow.operators import XCOM_RESULT_FILE
from tests.orchestration.conftest import PROJECT_ROOT, TEST_DAGS, runtime_connection


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_dag(folder: Path, dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def test_check_runtime_dag_returns_the_doctor_report_through_xcom(airflow_db, runtime_conn):
    dag = load_dag(PROJECT_ROOT / "dags", "check_runtime")
    run = dag.test(run_conf={"check_registry": False})
    assert run.state == DagRunState.SUCCESS
    ti = run.get_task_instance("doctor")
    assert ti.state == TaskInstanceState.SUCCESS
    report = ti.xcom_pull(task_ids="doctor")
    assert report["packages"]["kserve"].startswith("0.20.")
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert report["registry"] is None  # check_registry=False rendered to --no-registry


def test_failing_command_fails_the_task(airflow_db, runtime_conn):
    dag = load_dag(TEST_DAGS, "run_failing_command")
    run = dag.test(run_conf={"mlflow_uri": f"http://127.0.0.1:{closed_port()}"})
    assert run.state == DagRunState.FAILED
    assert run.get_task_instance("doctor").state == TaskInstanceState.FAILED


def test_failing_command_raises_with_the_commands_own_message(runtime_conn):
    port = closed_port()
    op = MlopsOperator(task_id="step", arguments=["doctor", "--mlflow-uri", f"http://127.0.0.1:{port}"])
    with pytest.raises(
        AirflowException,
        match=rf"mlops doctor --mlflow-uri failed \(exit 1\): MLflow tracking server at http://127.0.0.1:{port} is unreachable",
    ) as caught:
        op.execute(context={})
    assert not isinstance(caught.value, AirflowFailException)  # exit 1 may be retried


def test_usage_error_fails_without_retry(runtime_conn):
    op = MlopsOperator(task_id="step", arguments=["doctor", "--no-such-flag"])
    with pytest.raises(AirflowFailException, match=r"failed \(exit 2\): .*--no-such-flag"):
        op.execute(context={})


def test_empty_rendered_arguments_are_dropped():
    op = MlopsOperator(task_id="step", arguments=["doctor", "", "--no-registry"])
    assert op.command == ["doctor", "--no-registry"]


def test_missing_connection_says_which_and_how_to_define_it(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MLOPS_RUNTIME", raising=False)
    op = MlopsOperator(task_id="step", arguments=["doctor"], mlops_conn_id="nowhere")
    with pytest.raises(
        AirflowFailException, match="connection 'nowhere' is not defined.*AIRFLOW_CONN_NOWHERE"
    ):
        op.execute(context={})


def test_unknown_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_RUNTIME", runtime_connection(launcher="ssh"))
    with pytest.raises(AirflowFailException, match="launcher 'ssh' is not one of subprocess, kubernetes"):
        MlopsOperator(task_id="step", arguments=["doctor"]).execute(context={})


def test_missing_runtime_interpreter_is_a_clear_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_RUNTIME", runtime_connection(python=str(tmp_path / "python")))
    with pytest.raises(AirflowFailException, match="cannot start the mlops runtime"):
        MlopsOperator(task_id="step", arguments=["doctor"]).execute(context={})


def test_kubernetes_launcher_runs_the_same_command_in_a_runtime_pod():
    runtime = RuntimeConfig(
        launcher="kubernetes", image="registry.example/mlops-runtime:0.1.0", namespace="ml",
        gpus=1, env={"MLOPS_MLFLOW__URL": "http://mlflow.ml:5000"}, secrets=["mlops-secrets"],
        config_maps=["mlops-settings"], resources={"requests": {"cpu": "1"}, "limits": {"memory": "4Gi"}},
    )  # fmt: skip
    op = MlopsOperator(task_id="verify_model", arguments=["doctor", "", "--require-gpu"], env={"EXTRA": "1"})
    pod = op.pod_operator(runtime).build_pod_request_obj(dry_run=True)
    container = pod.spec.containers[0]
    assert pod.metadata.namespace == "ml"
    assert container.image == "registry.example/mlops-runtime:0.1.0"
    assert container.command == ["mlops"]
    assert container.args == ["--result-file", XCOM_RESULT_FILE, "doctor", "--require-gpu"]
    assert {e.name: e.value for e in container.env} == {
        "MLOPS_MLFLOW__URL": "http://mlflow.ml:5000",
        "EXTRA": "1",
        "MLOPS_LOCAL_STATE": "false",  # a pod has no state dir: a missing setting is named at once
    }
    # Secrets by reference: their values never pass through Airflow.
    assert [(s.config_map_ref and s.config_map_ref.name, s.secret_ref and s.secret_ref.name) for s in container.env_from] == [
        ("mlops-settings", None), (None, "mlops-secrets"),
    ]  # fmt: skip
    assert (container.resources.requests, container.resources.limits) == ({"cpu": "1"}, {"memory": "4Gi"})
    # The xcom sidecar reads the result file the command writes.
    assert any(c.name == "airflow-xcom-sidecar" for c in pod.spec.containers)
    # GPUs only where a step asks for them (training).
    train = MlopsOperator(task_id="train", arguments=["retrain", "train"], gpu=True)
    limits = (
        train.pod_operator(runtime).build_pod_request_obj(dry_run=True).spec.containers[0].resources.limits
    )
    assert limits == {"memory": "4Gi", "nvidia.com/gpu": "1"}


def test_connection_extra_with_unknown_key_is_refused():
    with pytest.raises(AirflowFailException, match=r"unknown key\(s\) \['pyhton'\]"):
        RuntimeConfig.from_extra("mlops_runtime", json.loads('{"pyhton": "/usr/bin/python"}'))
