"""Orchestration tests run in .venv-airflow against a throw-away Airflow home (SQLite).

The environment is set here, before anything imports Airflow, which reads it at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_PYTHON = PROJECT_ROOT / ".venv" / "bin" / "python"
TEST_DAGS = Path(__file__).resolve().parent / "dags"
_HOME = Path(tempfile.mkdtemp(prefix="mlops-airflow-test-"))
# Two bundles: the project's DAGs, and DAGs that exist only for these tests (dag.test() runs a
# DAG only from a bundle it can sync to the metadata database).
_BUNDLES = [
    {
        "name": name,
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(path)},
    }
    for name, path in (("dags-folder", PROJECT_ROOT / "dags"), ("test-dags", TEST_DAGS))
]

os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(_BUNDLES),
    }
)
sys.path.insert(0, str(PROJECT_ROOT / "plugins"))  # Airflow does this for its plugins folder


def runtime_connection(**extra: object) -> str:
    """AIRFLOW_CONN_MLOPS_RUNTIME for the project's runtime environment, as `mlops stack up` sets it."""
    base = {
        "launcher": "subprocess",
        "python": str(RUNTIME_PYTHON),
        "env": {"MLOPS_STATE_DIR": str(_HOME / "mlops-state")},
    }
    base.update(extra)
    return json.dumps({"conn_type": "generic", "extra": base})


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata database, made once per test session."""
    airflow = Path(sys.executable).parent / "airflow"
    done = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return _HOME


@pytest.fixture
def runtime_conn(monkeypatch):
    assert RUNTIME_PYTHON.exists(), "the runtime environment (.venv) is missing: run `make setup`"
    monkeypatch.setenv("AIRFLOW_CONN_MLOPS_RUNTIME", runtime_connection())
