"""The runtime operator's Kubernetes launcher through Airflow's own KubernetesPodOperator, against a
fake Kubernetes API (tests/orchestration/fake_kube.py: real HTTP, each pod run as a local process
with only the environment its spec gives it): the pod spec it builds, the result file reaching
XCom, and exit codes keeping their meaning (2 is not retried, 1 is)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from airflow.utils.state import DagRunState, TaskInstanceState

from tests.orchestration.conftest import (
    PROJECT_ROOT,
    RUNTIME_PYTHON,
    TEST_DAGS,
    clean_env,
    runtime_connection,
)
from tests.orchestration.fake_kube import FakeKubernetes

IMAGE = "registry.example/mlops-runtime:0.1.0"
WRITE = """
import sys, time
from monitoring.events import InferenceEvent
from monitoring.logstore import get_log_store
now = int(time.time() * 1000)
get_log_store(sys.argv[1]).write(
    [InferenceEvent(f"e{i}", now - i, "m", "1", "stable", f"r{i}", 0, {"x": i}, {"y": i}, 1.0) for i in range(3)]
)
"""


@pytest.fixture
def pods(airflow_db, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'inference.db'}"
    subprocess.run([str(RUNTIME_PYTHON), "-c", WRITE, store], check=True, env=clean_env(), cwd=PROJECT_ROOT)
    settings = {"mlops-settings": {"MLOPS_LOGS__STORE": store, "MLOPS_MLFLOW__URL": "http://127.0.0.1:9"}}
    secrets = {"mlops-secrets": {"MLOPS_LOGS__PASSWORD": "not-in-airflow"}}
    executables = {"mlops": str(RUNTIME_PYTHON.parent / "mlops")}
    with FakeKubernetes(tmp_path, executables, config_maps=settings, secrets=secrets) as fake:
        monkeypatch.setenv("AIRFLOW_CONN_FAKE_KUBE", fake.connection("ml"))
        extra = {
            "launcher": "kubernetes", "image": IMAGE, "namespace": "ml", "kubernetes_conn_id": "fake_kube",
            "service_account": "mlops-runtime", "config_maps": ["mlops-settings"], "secrets": ["mlops-secrets"],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}, "env": {"MLOPS_MONITOR__BACKEND": "scipy"},
        }  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_MLOPS_RUNTIME", runtime_connection(**extra))
        yield fake


def test_steps_run_in_pods_with_results_in_xcom_and_exit_codes_that_keep_their_meaning(pods):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(TEST_DAGS / "mlops_in_pods.py"))
    assert bag.import_errors == {}
    begun = time.monotonic()
    run = bag.dags["mlops_in_pods"].test()
    assert time.monotonic() - begun < 300
    assert run.state == DagRunState.FAILED  # two of its three tasks fail, on purpose
    tis = {ti.task_id: ti for ti in run.get_task_instances()}

    # JSON lines come back as one list, as the subprocess launcher reads them.
    query = tis["query"]
    assert query.state == TaskInstanceState.SUCCESS
    events = query.xcom_pull(task_ids="query")
    assert sorted(e["event_id"] for e in events) == ["e0", "e1", "e2"]
    assert all(e["model"] == "m" and e["inputs"] == {"x": int(e["event_id"][1:])} for e in events)

    # Exit 2 (bad usage): failed at once with the command's own message, no second try.
    refused = tis["refused"]
    assert refused.state == TaskInstanceState.FAILED and refused.try_number == 1
    error = refused.xcom_pull(task_ids="refused", key="mlops_error")["message"]
    assert "mlops logs query failed (exit 2): --since: expected a duration" in error
    # Exit 1 (a registry that does not answer): worth its retry.
    doctor = tis["doctor"]
    assert doctor.state == TaskInstanceState.FAILED and doctor.try_number == 2

    [query_pod] = [n for n, m in pods.pods.items() if m["metadata"]["labels"]["mlops/task"] == "query"]
    manifest = pods.pods[query_pod]
    assert manifest["metadata"]["namespace"] == "ml"
    spec = manifest["spec"]
    assert spec["serviceAccountName"] == "mlops-runtime"
    base = next(c for c in spec["containers"] if c["name"] == "base")
    assert base["image"] == IMAGE and base["command"] == ["mlops"]
    assert base["args"][:2] == ["--result-file", "/airflow/xcom/return.json"]
    assert base["args"][2:] == ["logs", "query", "--model", "m", "--since", "1h", "--jsonl"]
    assert base["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}}  # no GPU: not a training step
    # Settings: plain ones in the spec; the namespace's config map and secret only by name.
    assert {e["name"]: e["value"] for e in base["env"]} == {
        "MLOPS_MONITOR__BACKEND": "scipy", "MLOPS_LOCAL_STATE": "false",
    }  # fmt: skip
    assert base["envFrom"] == [
        {"configMapRef": {"name": "mlops-settings"}}, {"secretRef": {"name": "mlops-secrets"}},
    ]  # fmt: skip
    assert "not-in-airflow" not in json.dumps(manifest)
    # What the process had: the spec's environment, the secret resolved by the cluster; no state dir.
    env = pods.env_of(query_pod)
    assert env["MLOPS_LOGS__PASSWORD"] == "not-in-airflow" and "MLOPS_STATE_DIR" not in env
    codes = sorted((m["metadata"]["labels"]["mlops/task"], pods.exit_code(n)) for n, m in pods.pods.items())
    assert codes == [("doctor", 1), ("doctor", 1), ("query", 0), ("refused", 2)]
