"""Real servers for integration tests: started on free loopback ports, bounded in time, always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.helpers import mlops_env

LIFETIME_S = 900  # `timeout` stops a server the tests forgot, even if pytest itself dies


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start(
    argv: list[str], env: dict[str, str], log: Path, port: int, ready_path: str, timeout_s: float = 90
) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["timeout", str(LIFETIME_S), *argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, log, port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({process.returncode}); log:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{argv[0]} not ready in {timeout_s} s; log:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running(
    argv: list[str], env: dict[str, str], log: Path, port: int, ready_path: str, timeout_s: float = 90
) -> Iterator[Server]:
    """A server for the length of a ``with`` block."""
    server = start(argv, env, log, port, ready_path, timeout_s)
    try:
        yield server
    finally:
        server.stop()


def model_server(
    state_dir: Path, token: str = "test-admin-token-000", **settings: str
) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    env = mlops_env(
        MLOPS_STATE_DIR=str(state_dir),
        MLOPS_SERVING__PORT=str(port),
        MLOPS_SERVING__ADMIN_TOKEN=token,
        **settings,
    )
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    return running(
        [sys.executable, "-m", "serving"], env, state_dir / "serving.log", port, "/v2/health/ready"
    )


def moto_server(tmp: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return running(argv, mlops_env(), tmp / "moto.log", port, "/moto-api/")


def mlflow_server(tmp: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", str(tmp / "artifacts"),
    ]  # fmt: skip
    return running(argv, mlops_env(), tmp / "mlflow.log", port, "/health", timeout_s=180)


class Admin:
    """The admin API, as a test calls it."""

    def __init__(self, url: str, token: str = "test-admin-token-000") -> None:
        self.http = httpx.Client(
            base_url=url + "/admin/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def load(self, model: str, version: str, uri: str, role: str = "canary") -> dict:
        return self._ok(
            self.http.post(f"/{model}/versions", json={"version": version, "uri": uri, "role": role})
        )

    def traffic(self, model: str, percent: float, mode: str = "split") -> dict:
        return self._ok(self.http.put(f"/{model}/traffic", json={"canary_percent": percent, "mode": mode}))

    def promote(self, model: str) -> dict:
        return self._ok(self.http.post(f"/{model}/promote"))

    def rollback(self, model: str) -> dict:
        return self._ok(self.http.post(f"/{model}/rollback"))

    def status(self, model: str) -> dict:
        return self._ok(self.http.get(f"/{model}"))

    @staticmethod
    def _ok(response: httpx.Response) -> dict:
        assert response.status_code == 200, response.text
        return response.json()


def osmem_server(tmp: Path) -> contextlib.AbstractContextManager[Server]:
    """osmem-server (PyPI): an in-memory server speaking the OpenSearch REST API."""
    from osmem_server import resolve_binary

    port = free_port()
    argv = [resolve_binary(), "--addr", f"127.0.0.1:{port}", "--no-stdin-watch", "--no-ja"]
    return running(argv, mlops_env(), tmp / "osmem.log", port, "/")
