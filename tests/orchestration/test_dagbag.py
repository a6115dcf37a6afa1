"""Every DAG file parses in Airflow's own environment, with zero import errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.orchestration.conftest import PROJECT_ROOT

DAGS = PROJECT_ROOT / "dags"


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert dagbag.dags, "no DAG found: the test would prove nothing"


def test_each_dag_file_is_named_after_its_dag_id(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert Path(dag.fileloc).stem == dag_id


def test_every_dag_is_documented_and_tagged(dagbag):
    for dag in dagbag.dags.values():
        assert dag.doc_md, f"{dag.dag_id} has no doc_md for the UI"
        assert "mlops" in dag.tags


def test_check_runtime_offers_typed_params_in_the_ui(dagbag):
    params = dagbag.dags["check_runtime"].params
    assert params.get_param("require_gpu").schema["type"] == "boolean"
    assert params.get_param("check_registry").schema["type"] == "boolean"


def test_deploy_model_is_scheduled_on_the_registry_watchers_asset(dagbag):
    dag = dagbag.dags["deploy_model"]
    asset = dag.timetable.asset_condition
    assert asset.uri == "mlops://registry/approvals"
    [watcher] = asset.watchers
    assert watcher.trigger.serialize()[0] == "mlops_airflow.approvals.ApprovalTrigger"


def test_deploy_model_form_has_typed_params_with_the_policy_files_defaults_named(dagbag):
    params = dagbag.dags["deploy_model"].params
    assert params.get_param("model").schema["type"] == "string"
    assert params.get_param("steps").schema["type"] == ["null", "array"]
    assert params.get_param("insufficient").schema["enum"] == [None, "rollback", "fail"]
    help_text = params.get_param("min_requests").description
    assert "default 100" in help_text and "demo-fraud: 40" in help_text  # from config/models.yaml


def test_deploy_model_waits_without_holding_a_worker_and_undoes_any_failure(dagbag):
    dag = dagbag.dags["deploy_model"]
    ramp, abort = dag.get_task("ramp"), dag.get_task("abort")
    assert ramp.mode == "reschedule"
    assert abort.trigger_rule == "one_failed"
    assert {t.task_id for t in abort.upstream_list} == {"verify", "ramp", "finish"}
    assert [t.task_id for t in dag.get_task("verify").upstream_list] == ["go"]
    assert {link.name for link in dag.get_task("finish").operator_extra_links} >= {
        "Report",
        "MLflow model version",
    }


def test_monitor_model_is_scheduled_per_the_models_file_and_raises_drift_through_an_alias(dagbag):
    dag = dagbag.dags["monitor_model"]
    assert getattr(dag.timetable, "expression", None) in (
        "0 * * * *",
        "@hourly",
    )  # defaults.monitor.schedule: "@hourly"
    assert [t.task_id for t in dag.get_task("check").upstream_list] == ["plan"]
    assert [t.task_id for t in dag.get_task("trigger").upstream_list] == ["check"]
    [alias] = dag.get_task("trigger").outlets
    assert alias.name == "mlops-model-drift"
    assert {link.name for link in dag.get_task("check").operator_extra_links} >= {"Report"}
    help_text = dag.params.get_param("window").description
    assert "default 1h" in help_text and "demo-fraud: 10m" in help_text  # from config/models.yaml
    assert "demo-fraud" in dag.params.get_param("model").description


def test_retrain_model_is_scheduled_on_the_drift_of_each_model_the_file_retrains(dagbag):
    dag = dagbag.dags["retrain_model"]
    uris = {asset.uri for asset in dag.timetable.asset_condition.objects}
    assert uris == {"mlops://models/digits/drift"}  # demo-fraud: retrain.enabled false in config/models.yaml
    steps = ["dataset", "validate", "train", "export", "evaluate", "register", "approve"]
    assert [t.task_id for t in dag.get_task("validate").upstream_list if t.task_id != "request"] == ["go"]
    for before, after in zip(steps[1:], steps[2:], strict=False):
        assert before in {t.task_id for t in dag.get_task(after).upstream_list}
    assert {link.name for link in dag.get_task("approve").operator_extra_links} >= {"MLflow model version"}
    assert [step for step in steps if dag.get_task(step).gpu] == ["train"]  # a GPU in its pod
    params = dag.params
    assert params.get_param("margin").schema["type"] == ["null", "number"]
    assert "default 0.02" in params.get_param("margin").description
    assert "digits: 100" in params.get_param("min_traffic_rows").description


def test_retrain_model_takes_one_trigger_per_model_from_a_runs_events():
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("retrain_model_dag", DAGS / "retrain_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    triggers = module.triggers

    def event(model: str, end_ms: int, at: str) -> SimpleNamespace:
        extra = {"model": model, "window": {"end": f"end-{end_ms}", "end_ms": end_ms}, "reason": "drift"}
        return SimpleNamespace(extra=extra, timestamp=at, source_dag_id="monitor_model", source_run_id="r1")

    seen_twice = event("digits", 2000, "2026-12-01T10:00:02")
    found = triggers([event("digits", 1000, "2026-12-01T10:00:01"), seen_twice, seen_twice,
                      event("fraud", 3000, "2026-12-01T10:00:03")])  # fmt: skip
    assert [(t["model"], t["trigger"]) for t in found] == [
        ("digits", "drift:digits:2000"),
        ("fraud", "drift:fraud:3000"),
    ]
    assert found[0]["monitor_run"] == "monitor_model/r1"
    assert found[0]["end"] == "1970-01-01T00:00:02+00:00"  # from end_ms: to the millisecond
