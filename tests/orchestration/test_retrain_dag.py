"""The retrain_model DAG, run with dag.test() against a live MLflow server and a live log store (the
embedded one, written through its own interface): a first version trained by `mlops train` on the
shipped digits, then traffic whose images moved one cell to the right, labelled. A drift trigger
registers a candidate with its lineage and profile, approved by policy because it wins on the
moved images; the same trigger again registers nothing; a weak candidate is left for a person; a
dataset that fails its suite, or an export that fails parity, ends the run with the reason and
registers nothing."""

from __future__ import annotations

import json

import pytest
from airflow.utils.state import DagRunState, TaskInstanceState

from tests.orchestration.conftest import RuntimeWorld, iso

MODEL = "dag-digits"
T0 = 1_793_577_600_000  # 2026-11-01T00:00Z: the traffic's time, fixed and in the past
POLICY = f"""
models:
  {MODEL}:
    retrain: {{window: 1h, min_traffic_rows: 100, epochs: 80}}
"""
# 400 predictions of images moved one cell right (rows the first version never saw), a second
# apart from T0, each with its label sent back.
WRITE = """
import sys
from monitoring.events import Feedback, InferenceEvent
from monitoring.logstore import get_log_store
from retraining.builtin import load, shift_right

store_url, model, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
frame = load("digits").iloc[1000:1400].reset_index(drop=True)
moved = shift_right(frame.drop(columns="label"))
events, labels = [], []
for i, row in enumerate(moved.to_dict(orient="records")):
    events.append(InferenceEvent(f"e{i}", t0 + i * 1000, model, "1", "stable", f"r{i}", 0, row,
                                 {"label": "0"}, 1.0))
    labels.append(Feedback(f"r{i}", 0, str(frame["label"][i]), ts_ms=t0 + i * 1000 + 500))
store = get_log_store(store_url)
store.write(events)
store.write_feedback(labels)
print("written")
"""


@pytest.fixture(scope="module")
def world(mlflow_registry, airflow_db, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain-dag")
    runtime = RuntimeWorld(tmp, mlflow_registry.url, POLICY)
    settings = runtime.settings
    first = json.loads(runtime.run("-m", "mlops", "train", MODEL, "--dataset", "digits", "--rows", "1000"))
    assert first["registered"] and first["metrics"]["held_out"]["accuracy"] > 0.85
    mlflow_registry.set_alias(MODEL, "champion", first["version"])
    runtime.run("-c", WRITE, settings["MLOPS_LOGS__STORE"], MODEL, str(T0))
    return {"registry": mlflow_registry, "first": first["version"], "settings": settings, "runtime": runtime}


@pytest.fixture
def retrain_dag(world, monkeypatch):
    return world["runtime"].load_dag(monkeypatch, "retrain_model")


def trigger(retrain_dag, key: str, **changes) -> tuple[object, dict]:
    """A run for trigger ``key`` as the drift event's fan-out (or a person) asks for it."""
    conf = {
        "model": MODEL,
        "trigger": key,
        "reason": "version 1: 'pixel_3_1' drifted from training",
        "monitor_run": "monitor_model/scheduled__2026-11-01T00:30:00+00:00",
        "report": "http://127.0.0.1:5000/get-artifact?path=monitor-report.html&run_uuid=abc",
        "end": iso(T0 + 30 * 60_000),
        **changes,
    }
    run = retrain_dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    return run, states


def result(run, task_id: str) -> dict:
    return run.get_task_instance(task_id).xcom_pull(task_ids=task_id)


def versions(registry) -> list[str]:
    found = registry.call("GET", "model-versions/search", filter=f"name='{MODEL}'")
    return sorted((v["version"] for v in found.get("model_versions", [])), key=int)


def alias(registry, name: str) -> str | None:
    response = registry.http.get("registered-models/alias", params={"name": MODEL, "alias": name})
    return response.json()["model_version"]["version"] if response.status_code == 200 else None


def test_a_drift_trigger_registers_a_candidate_with_lineage_and_approves_it_once(world, retrain_dag):
    registry = world["registry"]
    run, states = trigger(retrain_dag, "drift:dag-digits:1")
    assert run.state == DagRunState.SUCCESS, states
    assert states["fan_out"] == TaskInstanceState.SKIPPED  # one model in the request: no other run
    made = result(run, "dataset")
    assert made["action"] == "train" and made["parent"] == world["first"]
    assert made["dataset"]["rows_by_source"] == {"reference": 1000, "traffic": 400}
    assert made["links"]["report"].endswith("run_uuid=abc")  # the task's Report button: the monitoring report
    assert result(run, "validate")["passed"] is True
    assert result(run, "export")["parity"]["passed"] is True

    registered = result(run, "register")
    version = registered["version"]
    assert registered["registered"] and version != world["first"]
    tags = registry.tags(MODEL, version)
    assert tags["mlops.parent_version"] == world["first"]
    assert tags["mlops.trigger"] == "drift:dag-digits:1"
    assert tags["mlops.trigger_reason"] == "version 1: 'pixel_3_1' drifted from training"
    assert tags["mlops.monitor_run"].startswith("monitor_model/scheduled__")
    assert tags["mlops.monitor_report"].endswith("run_uuid=abc")
    assert tags["mlops.dataset_sha256"] == made["dataset"]["sha256"]
    assert tags["mlops.code_version"] and tags["mlops.dataset"].startswith("runs:/")
    assert tags["monitoring.profile"].endswith("/monitoring-profile")  # the next monitoring's reference

    evaluation = result(run, "evaluate")["metrics"]
    assert evaluation["candidate"]["recent"]["rows"] == 100  # the newest quarter of the traffic
    assert evaluation["candidate"]["recent"]["accuracy"] > evaluation["champion"]["recent"]["accuracy"] + 0.2
    approved = result(run, "approve")
    assert approved["decision"] == "approved" and approved["alias"] == "challenger"
    assert alias(registry, "challenger") == version and alias(registry, "champion") == world["first"]
    assert tags["mlops.approval"] == "approved"

    # The same trigger again (the event seen twice, or the run cleared): nothing new registered.
    before = versions(registry)
    again, states = trigger(retrain_dag, "drift:dag-digits:1")
    assert again.state == DagRunState.SUCCESS
    done = result(again, "dataset")
    assert done["action"] == "done" and done["version"] == version
    assert {states[step] for step in ("validate", "train", "register", "approve")} == {
        TaskInstanceState.SKIPPED
    }
    assert versions(registry) == before


def test_a_weak_candidate_is_registered_but_left_for_a_person(world, retrain_dag):
    registry = world["registry"]
    challenger = alias(registry, "challenger")
    run, states = trigger(retrain_dag, "drift:dag-digits:weak", hidden="2", epochs=2, patience=1)
    assert run.state == DagRunState.SUCCESS, states
    approved = result(run, "approve")
    assert approved["decision"] == "needs_review" and approved["alias"] is None
    assert "does not beat the champion" in approved["reason"] and "MLflow UI" in approved["summary"]
    tags = registry.tags(MODEL, approved["version"])
    assert tags["mlops.approval"] == "needs_review" and "does not beat" in tags["mlops.approval_reason"]
    assert alias(registry, "challenger") == challenger  # the alias did not move to it


@pytest.mark.parametrize(
    ("changes", "failed", "words"),
    [
        (
            {"min_rows": 100_000},
            "validate",
            "fails 1 expectation(s): at least 100000 rows failed: observed 1400",
        ),
        ({"parity_atol": 0}, "export", "the ONNX export disagrees with PyTorch"),
    ],
    ids=["data-quality", "parity"],
)
def test_a_failing_check_ends_the_run_with_its_reason_and_registers_nothing(
    world, retrain_dag, changes, failed, words
):
    registry = world["registry"]
    before = versions(registry)
    run, states = trigger(retrain_dag, f"drift:dag-digits:{failed}", **changes)
    assert run.state == DagRunState.FAILED
    assert states[failed] == TaskInstanceState.FAILED
    assert states["register"] == TaskInstanceState.UPSTREAM_FAILED
    assert states["approve"] == TaskInstanceState.UPSTREAM_FAILED
    assert versions(registry) == before
    error = run.get_task_instance(failed).xcom_pull(task_ids=failed, key="mlops_error")
    assert words in error["message"] and "nothing is registered" in error["message"], error
