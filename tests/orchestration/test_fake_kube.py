"""The fake Kubernetes API server runs Airflow's own KubernetesPodOperator end to end."""

from __future__ import annotations

import sys

import pytest
from airflow.utils.state import DagRunState, TaskInstanceState
from kubernetes import client, config

from tests.orchestration.conftest import TEST_DAGS
from tests.orchestration.fake_kube import FakeKubernetes

SECRET = {"fake-kube-secret": {"TOKEN": "s3cret"}}
# The DAG runs `python3 -c <script> /airflow/xcom/return.json`.
WRITE_ANSWER = (
    "import json, os, sys; print('hi', os.environ['GREETING']); "
    "json.dump({'answer': 42}, open(sys.argv[1], 'w'))"
)
WRITE_ERROR = "import json, sys; json.dump({'error': 'bad input'}, open(sys.argv[1], 'w')); sys.exit(2)"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    with FakeKubernetes(tmp_path, executables={"python3": sys.executable}, secrets=SECRET) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_FAKE_KUBE", fake.connection())
        yield fake


def run_pod_dag(script: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(TEST_DAGS / "fake_kube_pod.py"))
    assert bag.import_errors == {}
    run = bag.dags["fake_kube_pod"].test(run_conf={"script": script})
    return run, run.get_task_instance("pod")


def test_pod_result_comes_back_through_xcom(airflow_db, fake, capfd):
    run, ti = run_pod_dag(WRITE_ANSWER)
    assert run.state == DagRunState.SUCCESS
    assert "[base] hi hello" in capfd.readouterr().out  # the process's output, as the pod's log
    assert ti.xcom_pull(task_ids="pod") == {"answer": 42}
    [(name, manifest)] = fake.pods.items()
    [base, sidecar] = manifest["spec"]["containers"]
    assert base["image"] == "python:3.11-slim" and sidecar["name"] == "airflow-xcom-sidecar"
    assert base["env"] == [{"name": "GREETING", "value": "hello"}]
    assert base["envFrom"] == [{"secretRef": {"name": "fake-kube-secret"}}]  # the reference, not the value
    assert manifest["metadata"]["labels"]["dag_id"] == "fake_kube_pod"
    env = fake.env_of(name)
    assert env["TOKEN"] == "s3cret" and env["GREETING"] == "hello"
    assert set(env) == {"TOKEN", "GREETING", "PATH", "HOME"}
    assert fake.exit_code(name) == 0


def test_failing_pod_fails_the_task_and_still_pushes_its_xcom(airflow_db, fake, capfd):
    run, ti = run_pod_dag(WRITE_ERROR)
    assert run.state == DagRunState.FAILED
    assert ti.state == TaskInstanceState.FAILED
    [name] = fake.pods
    assert f"AirflowException: Pod {name} returned a failure" in capfd.readouterr().out
    assert fake.exit_code(name) == 2
    assert ti.xcom_pull(task_ids="pod") == {"error": "bad input"}


def test_pod_naming_a_missing_secret_stays_pending(tmp_path):
    base = {"name": "base", "image": "x", "command": ["true"], "envFrom": [{"secretRef": {"name": "absent"}}]}
    with FakeKubernetes(tmp_path) as fake:
        api = client.CoreV1Api(config.new_client_from_config(str(fake.kubeconfig)))
        api.create_namespaced_pod("default", {"metadata": {"name": "p"}, "spec": {"containers": [base]}})
        pod = api.read_namespaced_pod("p", "default")
        assert pod.status.phase == "Pending"
        [waiting] = [status.state.waiting for status in pod.status.container_statuses]
        assert waiting.reason == "CreateContainerConfigError"
        assert waiting.message == 'secret "absent" not found'
        with pytest.raises(client.ApiException) as refused:
            api.read_namespaced_pod_log("p", "default", container="base")
        assert refused.value.status == 400
        assert fake.exit_code("p") is None and fake.env_of("p") == {}  # never started
