"""The embedded stack from nothing: real MLflow and Airflow processes on free loopback ports."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mlops.airflow_client import AirflowClient
from tests.conftest import free_port
from tests.helpers import mlops_env, run_mlops

pytestmark = pytest.mark.integration

TTL_S = "1500"  # the stack stops by itself even if this test run dies


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack") / "state"
    env = mlops_env(
        MLOPS_STATE_DIR=str(state),
        MLOPS_MLFLOW__PORT=str(free_port()),
        MLOPS_AIRFLOW__PORT=str(free_port()),
        MLOPS_LOGS__RECEIVER_PORT=str(free_port()),
    )
    # The README's main job: the stack up from nothing, then a DAG run through Airflow.
    demo = run_mlops("demo", "--ttl-s", TTL_S, env=env, timeout=1200)
    try:
        assert demo.code == 0, demo.stderr[-3000:]
        status = run_mlops("stack", "status", "--json", env=env)
        assert status.code == 0, status.stderr[-3000:]
        yield {
            "env": env,
            "demo": demo.json,
            "demo_stdout": demo.stdout,
            "demo_stderr": demo.stderr,
            "up": status.json,
            "state": state,
        }
    finally:
        run_mlops("stack", "down", env=env, timeout=120)


def airflow_password(stack) -> str:
    """The admin password, read from the file the results point to (as the README says)."""
    login = stack["up"]["airflow_login"]
    return json.loads(Path(login["password_file"]).read_text())[login["user"]]


def tree_pids(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid, *(child.pid for child in proc.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def test_the_stack_comes_up_healthy_with_every_process_and_the_airflow_login(stack):
    up = stack["up"]
    assert up["healthy"] is True
    assert up["components"]["mlflow"]["healthy"] is True
    assert set(up["components"]["airflow"]["services"]) == {
        "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    }  # fmt: skip
    assert all(s["health"] == "healthy" for s in up["components"]["airflow"]["services"].values())
    login = up["airflow_login"]
    assert set(login) == {"url", "user", "password_file"} and login["user"] == "admin"
    assert stack["demo"]["airflow_login"] == login
    assert up["watchdog"]["pid"] > 0
    assert up["components"]["serving"]["healthy"] is True
    assert up["components"]["log-receiver"]["healthy"] is True


def test_the_airflow_password_is_never_printed_and_its_file_is_private(stack):
    password = airflow_password(stack)
    assert len(password) >= 8
    status = run_mlops("stack", "status", env=stack["env"])
    for output in (stack["demo_stdout"], stack["demo_stderr"], status.stdout, status.stderr):
        assert password not in output
    assert f"password in {stack['up']['airflow_login']['password_file']}" in status.stdout
    path = stack["state"] / "airflow" / "simple_auth_manager_passwords.json.generated"
    assert str(path) == stack["up"]["airflow_login"]["password_file"]
    assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)


def test_demo_approvals_in_mlflow_start_deploy_runs_that_promote_the_good_and_roll_back_the_bad(stack):
    """The real event path: an approval set through MLflow's REST API, the registry watcher in
    Airflow's triggerer, the asset event, the scheduler, the DAG's tasks in the runtime."""
    registry, rollouts = stack["demo"]["registry"], stack["demo"]["rollouts"]
    good, bad = rollouts["good"], rollouts["bad"]
    assert good["version"] == registry["good"] and good["outcome"] == "promoted"
    assert all(step["decision"] == "pass" for step in good["steps"])
    assert bad["version"] == registry["bad"] and bad["outcome"] == "rolled_back"
    assert [step["decision"] for step in bad["steps"]] == ["fail"] and "error rate" in bad["reason"]
    for rollout in (good, bad):
        assert rollout["started_after_s"] < 60  # within a minute of the approval
        assert rollout["extra_runs"] == 0  # alias and tag: seen twice, deployed once
        assert "/dags/deploy_model/runs/asset_triggered__" in rollout["run"]
    served = stack["demo"]["serving"]
    assert served["stable"] == registry["good"]
    assert served["application_requests"] > 300 and served["application_failures"] == 0
    assert len(served["sample_predictions"]) == 3
    assert all(p["label"] in ("legit", "fraud") for p in served["sample_predictions"])
    page = httpx.get(good["report"], timeout=10)
    assert page.status_code == 200 and "Canary report" in page.text and page.text.count("<img") >= 2


def test_demo_closes_the_loop_drift_at_the_endpoint_ends_with_a_new_champion_serving(stack):
    """The end-to-end loop through the real scheduler, MLflow server and model server: moved images
    at the serving endpoint trip monitor_model, whose drift event schedules retrain_model, whose
    approval starts deploy_model, which takes the retrained version to 100 %."""
    loop = stack["demo"]["loop"]
    clean, shifted = loop["windows"]["clean"], loop["windows"]["shifted"]
    assert clean["decision"] == "ok" and clean["raised"] == []
    assert shifted["decision"] == "tripped" and shifted["raised"] == ["mlops://models/digits/drift"]
    assert any(check.startswith("skew:pixel_") for check in shifted["tripped"])

    retrain = loop["retrain"]
    assert "/dags/retrain_model/runs/asset_triggered__" in retrain["run"]  # started by the event
    assert retrain["decision"] == "approved"
    lineage = retrain["lineage"]
    assert lineage["mlops.parent_version"] == loop["first"]["version"]
    assert lineage["mlops.trigger"].startswith("drift:digits:")
    assert (
        "pixel_" in lineage["mlops.trigger_reason"] and lineage["mlops.monitor_report"] == shifted["report"]
    )
    assert lineage["mlops.monitor_run"].startswith("monitor_model/")
    assert int(lineage["mlops.dataset_rows"].split('"traffic": ')[1].rstrip("}")) >= 600
    metrics = retrain["metrics"]
    assert metrics["candidate"]["recent"]["accuracy"] > metrics["champion"]["recent"]["accuracy"] + 0.2

    rollout = loop["rollout"]
    assert rollout["version"] == retrain["version"] and rollout["outcome"] == "promoted"
    assert "/dags/deploy_model/runs/asset_triggered__" in rollout["run"]
    registry = loop["registry"]
    assert registry["champion"] == retrain["version"]
    assert registry["replaced"] == {
        "version": loop["first"]["version"], "rollout": "replaced", "replaced_by": retrain["version"],
    }  # fmt: skip
    application = loop["application"]
    assert application["answered"] > 1000 and application["failed"] == 0
    right = application["accuracy"]  # what the application saw: the loop put its answers right again
    assert right["as scanned (version 1)"] > 0.9
    assert right["moved (the retrained version)"] > right["moved (version 1)"] + 0.2
    status = run_mlops("serve", "status", "digits", env=stack["env"])
    assert status.code == 0 and status.json["stable"]["version"] == retrain["version"]
    assert status.json["canary"] is None

    steps = [item["step"] for item in stack["demo"]["timeline"]]
    assert steps[0] == "the stack is up" and any("retrained" in step for step in steps)
    assert [item["at_s"] for item in stack["demo"]["timeline"]] == sorted(
        item["at_s"] for item in stack["demo"]["timeline"]
    )
    assert "the timeline (seconds since the start):" in stack["demo_stderr"]


def test_every_demo_prediction_is_in_the_inference_log_with_its_labels(stack):
    logged = stack["demo"]["inference_log"]
    served = stack["demo"]["serving"]
    # the sample, the application's requests, and the bad canary's failed attempts (answered again by stable)
    assert logged["events"] == 3 + served["application_requests"] + logged["failed_attempts"]
    assert 0 < logged["failed_attempts"] < 0.05 * served["application_requests"]
    assert logged["labelled"] == 3
    query = run_mlops(
        "logs", "query", "--model", "demo-fraud", "--since", "1h", "--limit", "1", env=stack["env"]
    )
    assert query.code == 0, query.stderr
    assert query.json["count"] >= logged["events"]
    registry = stack["demo"]["registry"]
    assert set(query.json["by_version"]) == {registry["first"], registry["good"], registry["bad"]}
    assert query.json["events"][0]["inputs"].keys() == {"amount", "age_days", "country"}


def test_kserve_logger_events_posted_to_the_stacks_receiver_read_back_like_the_servers_own(stack):
    """`mlops stack run log-receiver` as the stack runs it: CloudEvents as an InferenceService's
    agent posts them, the version named by the stack's model server, read back by `mlops logs query`."""
    from tests.integration.test_kserve_logger import post

    model, key = "demo-fraud", f"kserve-{time.time_ns()}"
    rows = [{"amount": 12.5, "age_days": 40, "country": "DE"}]
    url = stack["up"]["components"]["log-receiver"]["url"]
    with httpx.Client(base_url=url, timeout=30) as client:
        assert post(client, "request", key, {"instances": rows}, service=model).status_code == 202
        done = post(client, "response", key, {"predictions": [{"label": "legit"}]}, service=model)
        assert done.status_code == 200 and done.json() == {"paired": True, "logged": 1}
    query = run_mlops("logs", "query", "--model", model, "--since", "5m", "--jsonl", env=stack["env"])
    assert query.code == 0, query.stderr
    [event] = [e for e in map(json.loads, query.stdout.splitlines()) if e["request_id"] == key]
    stable = run_mlops("serve", "status", model, env=stack["env"]).json["stable"]["version"]
    assert (event["version"], event["role"], event["status"]) == (stable, "stable", "ok")
    assert event["inputs"] == rows[0] and event["outputs"] == {"label": "legit"}


def test_cli_drives_the_stacks_model_server(stack):
    model = "demo-fraud"
    status = run_mlops("serve", "status", model, env=stack["env"])
    assert status.code == 0, status.stderr
    stable = status.json["stable"]["version"]
    other = stack["demo"]["registry"]["first"]
    loaded = run_mlops(
        "serve", "load", model, "--version", other, "--uri", f"models:/{model}/{other}", env=stack["env"]
    )
    assert loaded.code == 0, loaded.stderr
    assert loaded.json["canary"]["version"] == other
    split = run_mlops("serve", "split", model, "--canary-percent", "30", env=stack["env"])
    assert (split.json["canary_percent"], split.json["mode"]) == (30.0, "split")
    rolled = run_mlops("serve", "rollback", model, env=stack["env"])
    assert rolled.json["canary"] is None and rolled.json["stable"]["version"] == stable
    again = run_mlops("serve", "rollback", model, env=stack["env"])
    assert again.code == 2 and "no canary to roll back" in again.json["error"]["message"]


def test_mlflow_answers_its_rest_api(stack):
    url = stack["up"]["components"]["mlflow"]["url"]
    name = f"stack-test-{time.time_ns()}"
    created = httpx.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": name}, timeout=10)
    assert created.status_code == 200, created.text
    found = httpx.get(
        f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}, timeout=10
    )
    assert found.json()["experiment"]["experiment_id"] == created.json()["experiment_id"]
    model = httpx.post(f"{url}/api/2.0/mlflow/registered-models/create", json={"name": name}, timeout=10)
    assert model.status_code == 200, model.text


def test_airflow_api_answers_with_the_printed_login(stack):
    login = stack["up"]["airflow_login"]
    health = httpx.get(f"{login['url']}/api/v2/monitor/health", timeout=10).json()
    assert health["metadatabase"]["status"] == "healthy"
    assert health["scheduler"]["status"] == "healthy"
    with AirflowClient(login["url"], login["user"], airflow_password(stack)) as airflow:
        dag = airflow.wait_for_dag("check_runtime", timeout_s=120)
    assert dag["dag_id"] == "check_runtime"


def test_wrong_airflow_password_is_refused(stack):
    login = stack["up"]["airflow_login"]
    response = httpx.post(
        f"{login['url']}/auth/token", json={"username": login["user"], "password": "wrong"}, timeout=10
    )
    assert response.status_code in (401, 403)


def test_demo_reaches_the_runtime_and_the_registry_through_an_airflow_dag_run(stack):
    check = stack["demo"]["check_runtime"]
    assert check["state"] == "success" and check["tasks"] == {"doctor": "success"}
    # The doctor report came back through XCom, from the runtime environment, via the operator.
    assert check["result"]["packages"]["kserve"].startswith("0.20.")
    assert check["result"]["registry"]["url"] == stack["up"]["components"]["mlflow"]["url"]
    assert check["result"]["registry"]["reachable"] is True
    login = stack["up"]["airflow_login"]
    with AirflowClient(login["url"], login["user"], airflow_password(stack)) as airflow:
        remembered = airflow.get_run("check_runtime", check["run"].rsplit("/", 1)[-1])
    assert remembered.state == "success"  # Airflow itself keeps the run, for the UI


def test_status_json_reports_the_running_stack(stack):
    status = run_mlops("stack", "status", "--json", env=stack["env"])
    assert status.code == 0, status.stderr
    body = status.json
    assert body["healthy"] is True
    assert (
        body["components"]["mlflow"]["services"]["mlflow"]["pid"]
        == (stack["up"]["components"]["mlflow"]["services"]["mlflow"]["pid"])
    )


def test_up_again_is_harmless_and_keeps_the_same_processes(stack):
    again = run_mlops("stack", "up", env=stack["env"], timeout=120)
    assert again.code == 0, again.stderr
    body = again.json
    assert body["started"] == []
    assert "mlflow" in body["already_running"] and "airflow-scheduler" in body["already_running"]
    pids = lambda status: {  # noqa: E731
        name: s["pid"] for c in status["components"].values() for name, s in c["services"].items()
    }
    assert pids(body) == pids(stack["up"])


def test_down_leaves_no_process_behind(stack):
    # Last in this module: it stops the stack the others used.
    status = run_mlops("stack", "status", "--json", env=stack["env"]).json
    roots = [s["pid"] for c in status["components"].values() for s in c["services"].values()]
    roots.append(status["watchdog"]["pid"])
    everyone = set().union(*(tree_pids(pid) for pid in roots))
    assert len(everyone) > len(roots)  # workers and children were there to stop

    down = run_mlops("stack", "down", env=stack["env"], timeout=120)
    assert down.code == 0, down.stderr
    assert {s["name"] for s in down.json["stopped"]} >= {"mlflow", "airflow-scheduler", "watchdog"}

    survivors = [
        pid
        for pid in everyone
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert survivors == []
    after = run_mlops("stack", "status", "--json", env=stack["env"])
    assert after.code == 3
    assert after.json["healthy"] is False
    assert after.json["components"]["mlflow"]["services"]["mlflow"]["state"] == "stopped"
