"""The deploy_model DAG, run with dag.test() against a live MLflow server and a live model server on
loopback, a load generator sending requests the whole time: a good version reaches 100 %, a bad
one is rolled back by the same DAG, a version whose bytes changed is refused at verification and
the registry says why."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

import httpx
import pytest
from airflow.utils.state import DagRunState, TaskInstanceState

from tests.load import Load
from tests.orchestration.conftest import (
    PROJECT_ROOT,
    RUNTIME_PYTHON,
    clean_env,
    free_port,
    pod_like,
    runtime_connection,
    start_detached,
    stop_detached,
)

MODEL = "dag-ramped"
TOKEN = "test-admin-token-000"
POLICY = f"""
models:
  {MODEL}:
    ramp: {{initial_percent: 20, steps: [50], min_requests: 20, min_step_s: 1, max_step_s: 60, poke_s: 1}}
"""
REGISTER = """
import json, sys
import mlflow, numpy as np
from serving.examples import log_mlp
mlflow.set_tracking_uri(sys.argv[1])
example = np.full((2, 16), 0.1, np.float32)
with mlflow.start_run():
    versions = {name: log_mlp(sys.argv[2], seed=1, fault=fault or None, input_example=example)
                for name, fault in (("stable", ""), ("good", ""), ("bad", "nan"), ("changed", ""))}
print(json.dumps(versions))  # last: MLflow prints its run's link when the run ends
"""


@pytest.fixture(scope="module")
def world(mlflow_registry, airflow_db, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy-dag")
    models_file = tmp / "models.yaml"
    models_file.write_text(POLICY)
    registered = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", REGISTER, mlflow_registry.url, MODEL],
        capture_output=True, text=True, env=clean_env(), cwd=PROJECT_ROOT, timeout=300,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr[-3000:]
    versions = json.loads(registered.stdout.strip().splitlines()[-1])
    port = free_port()
    settings = {
        "MLOPS_STATE_DIR": str(tmp / "state"),
        "MLOPS_MLFLOW__URL": mlflow_registry.url,
        "MLOPS_SERVING__URL": f"http://127.0.0.1:{port}",
        "MLOPS_SERVING__ADMIN_TOKEN": TOKEN,
        "MLOPS_LOGS__STORE": f"sqlite:///{tmp / 'inference.db'}",
        "MLOPS_DEPLOY__MODELS_FILE": str(models_file),
    }
    server = start_detached(
        [str(RUNTIME_PYTHON), "-m", "serving"],
        clean_env(**settings, MLOPS_SERVING__PORT=str(port)),
        tmp / "serving.log",
    )
    url = settings["MLOPS_SERVING__URL"]
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, (tmp / "serving.log").read_text()[
                -3000:
            ]
            time.sleep(0.3)
        admin = httpx.Client(base_url=f"{url}/admin/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        loaded = admin.post(
            f"/{MODEL}/versions",
            json={
                "version": versions["stable"],
                "uri": f"models:/{MODEL}/{versions['stable']}",
                "role": "stable",
            },
            timeout=120,
        )
        assert loaded.status_code == 200, loaded.text
        yield {
            "registry": mlflow_registry,
            "versions": versions,
            "url": url,
            "admin": admin,
            "settings": settings,
        }
    finally:
        stop_detached(server)


@pytest.fixture
def deploy_dag(world, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_RUNTIME", runtime_connection(env=pod_like(world["settings"])))
    monkeypatch.setenv("AIRFLOW_VAR_MLOPS_MODELS_FILE", world["settings"]["MLOPS_DEPLOY__MODELS_FILE"])
    monkeypatch.setenv("AIRFLOW_VAR_MLOPS_MLFLOW_URL", world["registry"].url)
    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["deploy_model"]


def aliases(world) -> dict[str, str]:
    found = world["registry"].call("GET", "registered-models/get", name=MODEL)["registered_model"]
    return {a["alias"]: a["version"] for a in found.get("aliases", [])}


def serving(world) -> dict:
    return world["admin"].get(f"/{MODEL}").json()


def test_an_approved_version_reaches_100_percent_through_the_dag(world, deploy_dag):
    good = world["versions"]["good"]
    world["registry"].set_alias(MODEL, "challenger", good)
    with Load(world["url"], MODEL, pause_s=0.005) as load:
        run = deploy_dag.test(run_conf={"model": MODEL})
    assert run.state == DagRunState.SUCCESS
    finished = run.get_task_instance("finish").xcom_pull(task_ids="finish")
    assert finished["outcome"] == "promoted" and finished["version"] == good
    assert [s["decision"] for s in finished["steps"]] == ["pass", "pass"]
    assert run.get_task_instance("abort").state == TaskInstanceState.SKIPPED
    assert run.get_task_instance("failed").state == TaskInstanceState.SKIPPED
    assert serving(world)["stable"]["version"] == good and serving(world)["canary"] is None
    assert aliases(world) == {"champion": good}
    assert world["registry"].tags(MODEL, good)["rollout"] == "promoted"
    assert finished["links"]["report"].startswith(world["registry"].url)
    assert load.sent > 50 and load.failures == []


def test_a_bad_version_is_rolled_back_by_the_same_dag_with_no_failed_request(world, deploy_dag):
    good, bad = world["versions"]["good"], world["versions"]["bad"]
    world["registry"].set_alias(MODEL, "challenger", bad)
    with Load(world["url"], MODEL, pause_s=0.005) as load:
        run = deploy_dag.test(run_conf={"model": MODEL, "version": bad})
    assert run.state == DagRunState.SUCCESS  # the DAG did its job: the version is rolled back
    finished = run.get_task_instance("finish").xcom_pull(task_ids="finish")
    assert finished["outcome"] == "rolled_back" and "error rate" in finished["reason"]
    assert serving(world)["stable"]["version"] == good and serving(world)["canary"] is None
    assert aliases(world) == {"champion": good}
    assert world["registry"].tags(MODEL, bad)["rollout"] == "rolled_back"
    assert load.failures == []


def test_a_version_whose_bytes_changed_is_refused_at_verification_and_rolled_back(world, deploy_dag):
    changed = world["versions"]["changed"]
    world["registry"].set_tag(
        MODEL, changed, "mlops.sha256", "0" * 64
    )  # recorded earlier, bytes since changed
    world["registry"].set_alias(MODEL, "challenger", changed)
    run = deploy_dag.test(run_conf={"model": MODEL, "version": changed})
    assert run.state == DagRunState.FAILED
    assert run.get_task_instance("verify").state == TaskInstanceState.FAILED
    assert run.get_task_instance("ramp").state == TaskInstanceState.UPSTREAM_FAILED
    assert run.get_task_instance("abort").state == TaskInstanceState.SUCCESS
    assert run.get_task_instance("failed").state == TaskInstanceState.FAILED  # undone, still a failure
    tags = world["registry"].tags(MODEL, changed)
    assert tags["rollout"] == "rolled_back" and "its bytes changed since" in tags["rollout.reason"]
    assert serving(world)["canary"] is None and "challenger" not in aliases(world)
