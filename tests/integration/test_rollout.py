"""Rollouts through the `mlops deploy` commands against a live MLflow server and a live model server,
with a load generator running the whole time: a good version reaches 100 % and the registry ends
as described; a version failing on a share of inputs and a slow one are rolled back at the first
step with stable untouched and no client request failed; an unapproved version is never
deployed; two runs never roll out one model at once; a run that stops mid-ramp loses its canary
by itself and the next run takes over."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.examples import log_mlp
from tests.helpers import mlops_env, run_mlops
from tests.load import Load
from tests.servers import Admin, mlflow_server, model_server

pytestmark = pytest.mark.integration
MODEL = "ramped"
TOKEN = "test-admin-token-000"
POLICY = """
models:
  ramped:
    ramp: {initial_percent: 20, steps: [50], min_requests: 25, min_step_s: 1.5, max_step_s: 40, poke_s: 0.5}
    thresholds: {p95_margin_ms: 2.5}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import mlflow
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("rollout")
    models_file = tmp / "models.yaml"
    models_file.write_text(POLICY)
    with (
        mlflow_server(tmp / "mlflow") as registry,
        model_server(tmp / "state", MLOPS_MLFLOW__URL=registry.url) as server,
    ):
        mlflow.set_tracking_uri(registry.url)
        versions = {}
        with mlflow.start_run():
            example = np.full((2, 16), 0.1, np.float32)
            for name, fault in (
                ("v1", None),
                ("good", None),
                ("nan", "nan"),
                ("slow", "slow"),
                ("later", None),
                ("other", None),
            ):
                versions[name] = log_mlp(MODEL, seed=1, fault=fault, input_example=example)
        env = mlops_env(
            MLOPS_STATE_DIR=str(tmp / "state"),
            MLOPS_MLFLOW__URL=registry.url,
            MLOPS_SERVING__URL=server.url,
            MLOPS_SERVING__ADMIN_TOKEN=TOKEN,
            MLOPS_DEPLOY__MODELS_FILE=str(models_file),
        )
        yield {
            "client": MlflowClient(registry.url),
            "env": env,
            "server": server,
            "admin": Admin(server.url, TOKEN),
            "versions": versions,
        }


def deploy(world, *args: str, **settings: str):
    return run_mlops("deploy", *args, env={**world["env"], **settings})


def roll_out(world, run_id: str, version: str | None = None, timeout_s: float = 90) -> dict:
    """What the DAG does: begin, verify, advance until decided, finish."""
    begun = deploy(world, "begin", MODEL, "--run-id", run_id, *(["--version", version] if version else []))
    assert begun.code == 0, begun.stdout + begun.stderr
    if begun.json["action"] == "skip":
        return begun.json
    verified = deploy(world, "verify", MODEL, "--version", begun.json["version"])
    assert verified.code == 0, verified.stdout
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        step = deploy(world, "advance", MODEL, "--run-id", run_id)
        assert step.code == 0, step.stdout + step.stderr
        if step.json["done"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the ramp of {run_id} did not decide in {timeout_s} s: {step.json['state']}")
    finished = deploy(world, "finish", MODEL, "--run-id", run_id)
    assert finished.code == 0, finished.stdout + finished.stderr
    return finished.json


def approve(world, version: str) -> None:
    world["client"].set_registered_model_alias(MODEL, "challenger", version)


def tags(world, version: str) -> dict:
    return world["client"].get_model_version(MODEL, version).tags


def aliases(world) -> dict:
    return {a: v for a, v in world["client"].get_registered_model(MODEL).aliases.items()}


def test_good_version_reaches_100_percent_and_the_registry_says_so(world):
    v = world["versions"]
    world["client"].set_model_version_tag(MODEL, v["v1"], "approval", "approved")
    first = roll_out(world, "run-first")
    assert first["outcome"] == "promoted" and first["version"] == v["v1"]
    assert "first version" in first["reason"]
    approve(world, v["good"])
    with Load(world["server"].url, MODEL) as load:
        done = roll_out(world, "run-good")
    assert done["outcome"] == "promoted", done
    assert [s["percent"] for s in done["steps"]] == [20, 50]
    assert all(s["decision"] == "pass" for s in done["steps"])
    status = world["admin"].status(MODEL)
    assert status["stable"]["version"] == v["good"] and status["canary"] is None
    assert aliases(world) == {"champion": v["good"]}  # challenger gone, champion moved
    promoted, replaced = tags(world, v["good"]), tags(world, v["v1"])
    assert promoted["rollout"] == "promoted" and promoted["rollout.run"] == "run-good"
    assert json.loads(promoted["rollout.canary"])["canary_requests"] >= 25
    assert replaced["rollout"] == "replaced" and replaced["rollout.replaced_by"] == v["good"]
    report = world["client"].list_artifacts(promoted["rollout.report_run"])
    assert {a.path for a in report} == {"canary-report.html", "rollout.json"}
    assert Path(done["report"]["path"]).read_text().count("<img") >= 2
    assert load.sent > 100 and load.failed == 0, load.failures[:3]


@pytest.mark.parametrize(
    ("name", "failed_check"), [("nan", "error rate"), ("slow", "p95 latency")], ids=["failing", "slow"]
)
def test_bad_version_is_rolled_back_at_the_first_step_with_stable_untouched(world, name, failed_check):
    v = world["versions"]
    approve(world, v[name])
    with Load(world["server"].url, MODEL) as load:
        done = roll_out(world, f"run-{name}")
    assert done["outcome"] == "rolled_back", done
    assert [s["decision"] for s in done["steps"]] == ["fail"]  # at the first step
    assert failed_check in done["reason"]
    status = world["admin"].status(MODEL)
    assert status["stable"]["version"] == v["good"] and status["canary"] is None
    assert aliases(world) == {"champion": v["good"]}
    marked = tags(world, v[name])
    assert marked["rollout"] == "rolled_back" and failed_check in marked["rollout.reason"]
    assert load.failed == 0, load.failures[:3]  # the canary's failures were answered by stable


def test_unapproved_version_is_never_deployed(world):
    v = world["versions"]
    refused = deploy(world, "begin", MODEL, "--run-id", "run-unapproved", "--version", v["later"])
    assert refused.code == 2 and "is not approved" in refused.json["error"]["message"]
    assert world["admin"].status(MODEL)["canary"] is None
    assert "rollout" not in tags(world, v["later"])


def test_two_runs_never_roll_out_one_model_at_once(world):
    v = world["versions"]
    approve(world, v["later"])
    first = deploy(world, "begin", MODEL, "--run-id", "run-a")
    assert first.code == 0 and first.json["action"] == "deploy"
    assert first.json["links"]["version"].endswith(f"/#/models/{MODEL}/versions/{v['later']}")
    twice = deploy(world, "begin", MODEL, "--run-id", "run-b")  # the same approval seen again
    assert twice.code == 0 and twice.json["action"] == "skip"
    assert "being rolled out by run run-a" in twice.json["reason"]
    world["client"].set_model_version_tag(MODEL, v["other"], "approval", "approved")
    second = deploy(world, "begin", MODEL, "--run-id", "run-b", "--version", v["other"])
    assert second.code == 1 and second.json["error"]["type"] == "LeaseHeld"  # it waits (retries)
    assert "being rolled out by 'run-a'" in second.json["error"]["message"]
    assert tags(world, v["other"])["rollout"] == "queued"  # seen, so the watcher does not fire it again
    meddling = deploy(world, "advance", MODEL, "--run-id", "run-b")
    assert meddling.code == 2 and "lost the rollout" in meddling.json["error"]["message"]
    by_hand = httpx.put(
        f"{world['server'].url}/admin/v1/models/{MODEL}/traffic",
        json={"canary_percent": 90},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert by_hand.status_code == 409
    again = deploy(world, "begin", MODEL, "--run-id", "run-a")  # the same run: it resumes
    assert again.code == 0 and again.json["action"] == "resume"
    aborted = deploy(world, "abort", MODEL, "--run-id", "run-a", "--reason", "test over")
    assert aborted.code == 0 and aborted.json["action"] == "rolled_back"
    assert tags(world, v["later"])["rollout"] == "rolled_back"


def test_a_run_that_stops_mid_ramp_loses_its_canary_and_the_next_run_takes_over(world):
    v = world["versions"]
    client = world["client"]
    for key in ("rollout", "rollout.run", "rollout.reason"):  # the data scientist tries it again
        client.delete_model_version_tag(MODEL, v["later"], key)
    approve(world, v["later"])
    with Load(world["server"].url, MODEL) as load:
        short = {"MLOPS_DEPLOY__LEASE_S": "3"}  # the run renews for 3 s at a time, then dies
        assert deploy(world, "begin", MODEL, "--run-id", "run-killed", **short).code == 0
        assert deploy(world, "advance", MODEL, "--run-id", "run-killed", **short).json["percent"] == 20
        assert world["admin"].status(MODEL)["canary"]["version"] == v["later"]
        time.sleep(5)  # the run is gone: no renewal for longer than the lease
        status = world["admin"].status(MODEL)
        assert status["canary"] is None and status["stable"]["version"] == v["good"]
        late = deploy(world, "advance", MODEL, "--run-id", "run-killed")
        assert late.code == 2 and "ran out unrenewed" in late.json["error"]["message"]
        done = roll_out(world, "run-next")
    assert done["outcome"] == "promoted" and done["run_id"] == "run-next"
    assert aliases(world) == {"champion": v["later"]}
    assert load.failed == 0, load.failures[:3]
