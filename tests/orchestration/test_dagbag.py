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
