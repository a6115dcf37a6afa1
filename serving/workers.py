"""Many model server processes on one port: ``MLOPS_SERVING__WORKERS=N``.

One process answers every request on one core's event loop. With N workers:

- ``python -m serving`` becomes a **supervisor** (no kserve in it): it starts N worker processes
  (``python -m serving.workers I RUN_DIR``), restarts one that dies after it was ready, stops the
  server if one dies before it ever was (a port taken, a bad setting: restarting would not help),
  and stops them all on SIGTERM. Each worker dies with it (``PR_SET_PDEATHSIG``).
- Every worker binds the port with ``SO_REUSEPORT``: the kernel spreads connections among the
  workers listening. A worker listens only once it holds the deployments, so a request never
  reaches a worker that does not know the model yet.
- **Worker 0 leads**: it restores and writes the state file, holds the leases and watches them.
  Every admin call goes to it (another worker forwards it through the leader's Unix socket). After
  each change the leader sends the whole routing (``Deployments.snapshot()``: each model's stable
  and canary version, where from, the split) to every other worker and waits for each to apply it
  (loading from the local cache what it lacks) before the call returns. A worker that failed to
  apply it is named in a 503; a worker that is not running (restarting) is named as ``starting``:
  it asks the leader for the routing before it listens again.
- ``/metrics`` reports the whole server: the Prometheus client's multiprocess mode, one folder of
  value files for all workers. Sticky routing holds across workers: a key's side is a hash of the
  key (``router.choose_role``) and every worker has the same split.
- The inference log: a writer process per worker (``serving/logger``), event ids prefixed per
  process, a spool per worker; worker 0's writer adopts the spools of workers that no longer exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from common.errors import BackendUnavailable
from common.settings import Settings

log = logging.getLogger("serving.workers")
MESSAGE_LIMIT = 64 << 20  # one message on a worker socket: a forwarded admin body, a routing
APPLY_TIMEOUT_S = 600.0  # a worker loading the versions it lacks
FORWARD_TIMEOUT_S = 900.0  # an admin call forwarded to the leader (a load, then its replication)
SYNC_RETRY_S = 0.2
_PR_SET_PDEATHSIG = 1


class ReplicationFailed(BackendUnavailable):
    """An admin change reached the leader, and not every worker."""


def compute_threads(settings: Settings, workers: int) -> int | None:
    """Compute threads per version in one worker: the setting, else the usable CPUs shared out."""
    if settings.serving.threads is not None or workers == 1:
        return settings.serving.threads
    from serving.runtime import usable_cpus

    return max(1, usable_cpus() // workers)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes of this user may bind to the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so (else Nagle's delay
    # meets the client's delayed ACK: 40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def ready_mark(run_dir: Path, index: int) -> Path:
    """The file a worker writes once it listens with the routing (the supervisor removes it when
    the worker is gone): the server is ready when every worker's is there."""
    return run_dir / f"ready-{index}"


# --- the worker side ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """This worker's place among the N: its index, the run folder they share (sockets, ready marks,
    metric files), and the replication of the routing."""

    index: int
    count: int
    run_dir: Path
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex)  # the leader's life: a new one resets
    generation: int = 0
    _applied: tuple[str, int] = ("", -1)
    _publishing: asyncio.Lock | None = None
    _server: asyncio.base_events.Server | None = None

    @property
    def leads(self) -> bool:
        return self.index == 0

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}.sock"

    def ready_mark(self, index: int) -> Path:
        return ready_mark(self.run_dir, index)

    # readiness and metrics, for the HTTP front

    def not_ready(self) -> str | None:
        """Why the server is not ready (a worker without its routing yet), or None."""
        waiting = [i for i in range(self.count) if not self.ready_mark(i).exists()]
        return f"workers {', '.join(map(str, waiting))} starting" if waiting else None

    def mark_ready(self) -> None:
        self.ready_mark(self.index).write_text(str(os.getpid()))

    def metrics(self) -> tuple[bytes, bytes]:
        """Every worker's metrics, summed (the Prometheus client's multiprocess mode)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST.encode()

    # the leader

    async def lead(self, deployments: Any, admin: Callable[..., Awaitable[tuple[int, Any]]]) -> None:
        """Answer the others (their sync, their forwarded admin calls), send them the routing now
        (a leader that restarted), and after every change from here on."""

        async def handle(message: dict[str, Any]) -> dict[str, Any]:
            if message["op"] == "sync":
                return self._routing_message(deployments)
            if message["op"] == "admin":
                headers = {k.encode("latin-1"): v.encode("latin-1") for k, v in message["headers"]}
                code, body = await admin(
                    message["method"], message["path"], headers, message["body"].encode("latin-1")
                )
                return {"status": code, "body": body}
            raise ValueError(f"unknown op {message['op']!r}")

        self._publishing = asyncio.Lock()
        await self._listen(handle)
        deployments.replicate = lambda: self.publish(deployments)
        with contextlib.suppress(ReplicationFailed):  # named in the log; each will ask again when it starts
            await self.publish(deployments)

    def _routing_message(self, deployments: Any) -> dict[str, Any]:
        return {
            "op": "apply",
            "epoch": self.epoch,
            "generation": self.generation,
            "models": deployments.snapshot(),
        }

    async def publish(self, deployments: Any) -> dict[str, Any]:
        """Send the routing to every other worker, wait for each: which have it, which are starting."""
        assert self._publishing is not None
        async with self._publishing:  # in the order of the changes
            self.generation += 1
            message = self._routing_message(deployments)
            others = range(1, self.count)
            answers = await asyncio.gather(*(self._push(i, message) for i in others))
        updated, starting, failed = [0], [], {}
        for index, answer in zip(others, answers, strict=True):
            if answer is None:
                updated.append(index)
            elif answer == "starting":
                starting.append(index)
            else:
                failed[index] = answer
        if failed:
            named = "; ".join(f"worker {i}: {why}" for i, why in failed.items())
            log.error("the routing did not reach every worker: %s", named)
            raise ReplicationFailed(
                f"the change is made on workers {', '.join(map(str, updated))} and not on the others ({named});"
                " those answer with the routing they had: roll the change back or retry it"
            )
        if starting:
            log.warning("workers %s are starting: they take the routing when they start", starting)
        return {"count": self.count, "updated": updated, "starting": starting}

    async def _push(self, index: int, message: dict[str, Any]) -> str | None:
        """None once the worker applied the routing; ``starting``: it is not running; else why not."""
        try:
            answer = await _call(self.socket_path(index), message, APPLY_TIMEOUT_S)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            return "starting"  # not running, or it died meanwhile: it asks for the routing when it starts
        except (OSError, TimeoutError, ValueError) as exc:
            return f"no answer ({type(exc).__name__}: {exc})"
        return answer.get("error")

    # a follower

    async def follow(self, deployments: Any) -> None:
        """Take routings from the leader, then ask it for the current one: returns once applied."""
        lock = asyncio.Lock()

        async def apply(message: dict[str, Any]) -> dict[str, Any]:
            async with lock:
                mark = (message["epoch"], message["generation"])
                if mark[0] == self._applied[0] and mark[1] <= self._applied[1]:
                    return {}  # an older routing than the one applied
                try:
                    await deployments.apply(message["models"])
                except Exception as exc:
                    log.exception("could not apply the leader's routing")
                    return {"error": f"{type(exc).__name__}: {exc}"}
                self._applied = mark
                return {}

        async def handle(message: dict[str, Any]) -> dict[str, Any]:
            if message["op"] == "apply":
                return await apply(message)
            raise ValueError(f"unknown op {message['op']!r}")

        await self._listen(handle)
        while True:
            try:
                routing = await _call(self.socket_path(0), {"op": "sync"}, APPLY_TIMEOUT_S)
                break
            except (OSError, TimeoutError, ValueError):
                await asyncio.sleep(SYNC_RETRY_S)  # the leader is starting (restoring)
        answer = await apply(routing)
        if "error" in answer:
            raise RuntimeError(f"worker {self.index}: the leader's routing: {answer['error']}")

    async def forward(
        self, method: str, path: str, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[int, Any]:
        """An admin call, carried out by the leader: (its HTTP status, its answer)."""
        wanted = (b"authorization", b"x-mlops-lease-owner")
        message = {
            "op": "admin",
            "method": method,
            "path": path,
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in headers.items() if k in wanted
            ],
            "body": body.decode("latin-1"),
        }
        try:
            answer = await _call(self.socket_path(0), message, FORWARD_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            return 503, {"error": f"the leading worker did not answer ({type(exc).__name__}); retry shortly"}
        return answer["status"], answer["body"]

    async def _listen(self, handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        path = self.socket_path(self.index)
        path.unlink(missing_ok=True)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await reader.readline()
                if line:
                    try:
                        answer = await handle(orjson.loads(line))
                    except Exception as exc:
                        log.exception("worker message failed")
                        answer = {"error": f"{type(exc).__name__}: {exc}"}
                    writer.write(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
                    await writer.drain()
            finally:
                writer.close()

        self._server = await asyncio.start_unix_server(serve, path=str(path), limit=MESSAGE_LIMIT)


async def _call(path: Path, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MESSAGE_LIMIT)
    try:
        writer.write(orjson.dumps(message) + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    finally:
        writer.close()
    if not line:
        raise ConnectionResetError("the worker closed the connection without an answer")
    return orjson.loads(line)


# --- the supervisor -----------------------------------------------------------------------------


def supervise(settings: Settings) -> int:
    """Run ``settings.serving.workers`` workers until SIGTERM/SIGINT; 1 if one could never start."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    count = settings.serving.workers
    host, port = settings.host, settings.serving.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # no SO_REUSEPORT here: a server already on the port must not get half our connections
            probe.bind((host, port))
        except OSError as exc:
            print(f"serving: error: cannot bind {host}:{port}: {exc}", file=sys.stderr)
            return 1
    run_dir = Path(tempfile.mkdtemp(prefix="mlops-workers-"))  # private (0700); short, for socket paths
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stopping.append(number))

    def start(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "serving.workers", str(index), str(run_dir)],
            env=env,
            start_new_session=True,  # signals come from here, once: a second SIGTERM would cut the drain
            preexec_fn=_die_with_parent,
        )

    log.info("model server on %s:%s: %d workers (run folder %s)", host, port, count, run_dir)
    workers = {i: start(i) for i in range(count)}
    was_ready = dict.fromkeys(workers, False)
    failed = False
    try:
        while not stopping and not failed:
            time.sleep(0.2)
            for index, process in list(workers.items()):
                was_ready[index] = was_ready[index] or ready_mark(run_dir, index).exists()
                if process.poll() is None:
                    continue
                _forget(run_dir, index, process.pid)
                if not was_ready[index]:
                    log.error(
                        "worker %d exited (%s) before it was ever ready; stopping", index, process.returncode
                    )
                    failed = True
                    break
                log.error(
                    "worker %d (pid %d) exited (%s); starting another", index, process.pid, process.returncode
                )
                workers[index] = start(index)
    finally:
        for process in workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for process in workers.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed else 0


def _forget(run_dir: Path, index: int, pid: int) -> None:
    """A worker gone: not ready any more, and its live gauges no longer counted."""
    ready_mark(run_dir, index).unlink(missing_ok=True)
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(run_dir / "metrics"))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    """``python -m serving.workers INDEX RUN_DIR``: one worker (the supervisor starts them)."""
    from common.errors import MLOpsError
    from common.settings import load_settings
    from serving.server import serve

    try:
        settings = load_settings()
    except MLOpsError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker-{argv[0]} %(name)s %(levelname)s %(message)s"
    )
    serve(settings, Cluster(int(argv[0]), settings.serving.workers, Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
