"""Orchestration tests run in .venv-airflow against a throw-away Airflow home (SQLite).

The environment is set here, before anything imports Airflow, which reads it at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_PYTHON = PROJECT_ROOT / ".venv" / "bin" / "python"
RUNTIME_MLFLOW = PROJECT_ROOT / ".venv" / "bin" / "mlflow"
SERVER_LIFETIME_S = 600  # `timeout` stops a server the tests forgot, even if pytest itself dies
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


def pod_like(settings: dict[str, str]) -> dict[str, str]:
    """The tasks' settings as a pod gets them from the Kubernetes launcher: no local state, so a
    step that would fall back to a file of the state dir fails naming the setting instead."""
    return {**settings, "MLOPS_LOCAL_STATE": "false"}


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowRegistry:
    """A live MLflow server's model registry, driven through its REST API (no mlflow package here)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=f"{url}/api/2.0/mlflow/", timeout=30)

    def call(self, method: str, path: str, **body: object) -> dict:
        response = self.http.get(path, params=body) if method == "GET" else self.http.post(path, json=body)
        assert response.status_code == 200, f"{method} {path}: {response.text}"
        return response.json()

    def create_version(self, model: str) -> str:
        """A new version of ``model`` (registered first if need be); its source is never read."""
        if self.http.get("registered-models/get", params={"name": model}).status_code == 404:
            self.call("POST", "registered-models/create", name=model)
        created = self.call("POST", "model-versions/create", name=model, source=f"s3://models/{model}")
        return created["model_version"]["version"]

    def set_alias(self, model: str, alias: str, version: str) -> None:
        self.call("POST", "registered-models/alias", name=model, alias=alias, version=version)

    def set_tag(self, model: str, version: str, key: str, value: str) -> None:
        self.call("POST", "model-versions/set-tag", name=model, version=version, key=key, value=value)

    def tags(self, model: str, version: str) -> dict[str, str]:
        found = self.call("GET", "model-versions/get", name=model, version=version)["model_version"]
        return {tag["key"]: tag["value"] for tag in found.get("tags", [])}


@pytest.fixture(scope="session")
def mlflow_registry(tmp_path_factory) -> Iterator[MlflowRegistry]:
    """A real MLflow server (the runtime environment's) on a free loopback port, SQLite-backed."""
    assert RUNTIME_MLFLOW.exists(), "the runtime environment (.venv) is missing: run `make setup`"
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    argv = [
        str(RUNTIME_MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
    ]  # fmt: skip
    log = tmp / "mlflow.log"
    process = start_detached(argv, clean_env(), log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not ready in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        registry = MlflowRegistry(url)
        yield registry
        registry.http.close()
    finally:
        stop_detached(process)


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without Airflow's, MLflow's or our settings (the test home's included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "MLOPS_"))}
    env.update(settings)
    return env


def start_detached(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``argv`` in its own session (so its whole tree can be stopped), bounded by ``timeout``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            ["timeout", str(SERVER_LIFETIME_S), *argv], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip


def stop_detached(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace_s``, then SIGKILL to what is left of it.

    The sweep is for children that outlive their parent in the group: MLflow's job consumers,
    Airflow's LocalExecutor workers.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


class RuntimeWorld:
    """A DAG test's own runtime settings (state dir, models file, an embedded log store, the live
    MLflow), and the runtime environment's python run with them."""

    def __init__(self, tmp: Path, mlflow_url: str, policy: str) -> None:
        models_file = tmp / "models.yaml"
        models_file.write_text(policy)
        self.settings = {
            "MLOPS_STATE_DIR": str(tmp / "state"),
            "MLOPS_MLFLOW__URL": mlflow_url,
            "MLOPS_LOGS__STORE": f"sqlite:///{tmp / 'inference.db'}",
            "MLOPS_DEPLOY__MODELS_FILE": str(models_file),
        }

    def run(self, *argv: str, timeout: int = 300) -> str:
        """``python *argv`` in the runtime; its last line of output (it must succeed)."""
        done = subprocess.run(
            [str(RUNTIME_PYTHON), *argv], capture_output=True, text=True, env=clean_env(**self.settings),
            cwd=PROJECT_ROOT, timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    def load_dag(self, monkeypatch: pytest.MonkeyPatch, dag_id: str):
        """The project's DAG as Airflow parses it, its tasks running in this runtime."""
        from airflow.dag_processing.dagbag import DagBag

        monkeypatch.setenv("AIRFLOW_CONN_MLOPS_RUNTIME", runtime_connection(env=pod_like(self.settings)))
        monkeypatch.setenv("AIRFLOW_VAR_MLOPS_MODELS_FILE", self.settings["MLOPS_DEPLOY__MODELS_FILE"])
        bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
        assert bag.import_errors == {}
        return bag.dags[dag_id]
