"""Import boundaries that import-linter cannot see: they cross the two environments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

# Only in the runtime environment (.venv): Airflow's environment cannot hold them.
RUNTIME_ONLY = {
    "torch", "kserve", "alibi_detect", "great_expectations", "onnxruntime", "onnx", "mlflow",
    "sklearn", "skl2onnx", "onnxmltools", "skops", "xgboost", "lightgbm",
    "common", "mlops", "serving", "monitoring", "retraining",
}  # fmt: skip


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PROJECT_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("dags", "plugins"), ids=str)
def test_dags_and_plugins_never_import_the_runtime(path):
    assert imported_roots(path) & RUNTIME_ONLY == set()


@pytest.mark.parametrize("path", files("common", "mlops", "serving", "monitoring", "retraining"), ids=str)
def test_the_runtime_never_imports_airflow(path):
    assert "airflow" not in imported_roots(path)


def test_the_scan_sees_imports():
    # Guards the two tests above against a scanner that finds nothing.
    assert {"airflow", "mlops_airflow"} <= imported_roots(PROJECT_ROOT / "dags" / "check_runtime.py")
