"""MLOPS_SERVING__WORKERS=2: two model server processes on one port, as one server.

Every request goes on a new connection, so the kernel spreads them over both workers (each answer
says which worker gave it, ``x-mlops-worker``); after every admin change, requests to both workers
find only the new routing.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from monitoring.logstore import get_log_store
from serving.examples import save_mlp
from tests.helpers import mlops_env
from tests.servers import Admin, model_server

pytestmark = pytest.mark.integration

ROW = [0.1 * i for i in range(16)]
TOKEN = "test-admin-token-000"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    return {v: str(save_mlp(root / f"v{v}", seed=int(v))) for v in ("1", "2", "3")}


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="module")
def server(state):
    with model_server(state, MLOPS_SERVING__WORKERS="2", MLOPS_LOGS__FLUSH_MS="50") as running:
        yield running


@pytest.fixture(scope="module")
def admin(server):
    return Admin(server.url)


def answers(url: str, model: str, at_least: int = 4, **headers: str) -> collections.Counter:
    """(worker, version, role) of answers, each on a new connection, until each worker gave
    ``at_least`` (a worker that never answers fails the test)."""
    seen: collections.Counter = collections.Counter()
    by_worker: collections.Counter = collections.Counter()
    for _ in range(400):
        response = httpx.post(f"{url}/v1/models/{model}:predict", json={"instances": [ROW]}, headers=headers)
        assert response.status_code == 200, response.text
        worker = response.headers["x-mlops-worker"]
        seen[(worker, response.headers["x-model-version"], response.headers["x-model-role"])] += 1
        by_worker[worker] += 1
        if len(by_worker) == 2 and min(by_worker.values()) >= at_least:
            return seen
    raise AssertionError(f"not every worker answered: {dict(by_worker)}")


def only(seen: collections.Counter) -> set[tuple[str, str]]:
    """The (version, role) pairs answered, over both workers."""
    return {(version, role) for _, version, role in seen}


def test_every_change_reaches_every_worker_before_the_admin_call_returns(server, admin, models):
    loaded = admin.load("swap", "1", models["1"], role="stable")
    assert loaded["workers"] == {"count": 2, "updated": [0, 1], "starting": []}
    assert only(answers(server.url, "swap")) == {("1", "stable")}
    admin.load("swap", "2", models["2"])
    assert only(answers(server.url, "swap")) == {("1", "stable")}  # a canary at 0 % answers nothing
    admin.traffic("swap", 100)
    assert only(answers(server.url, "swap")) == {("2", "canary")}
    admin.promote("swap")
    assert only(answers(server.url, "swap")) == {("2", "stable")}
    admin.load("swap", "3", models["3"])
    admin.traffic("swap", 0, mode="shadow")
    assert only(answers(server.url, "swap")) == {("2", "stable")}
    admin.rollback("swap")
    assert only(answers(server.url, "swap")) == {("2", "stable")}
    status = admin.status("swap")
    assert status["canary"] is None and status["stable"]["version"] == "2"
    gone = httpx.delete(f"{server.url}/admin/v1/models/swap", headers={"Authorization": f"Bearer {TOKEN}"})
    assert gone.status_code == 200 and gone.json()["workers"]["updated"] == [0, 1]
    for _ in range(20):  # both workers forgot it
        missing = httpx.post(f"{server.url}/v1/models/swap:predict", json={"instances": [ROW]})
        assert missing.status_code == 404, missing.text


def test_a_sticky_key_lands_on_the_same_side_on_every_worker(server, admin, models):
    admin.load("sticky", "1", models["1"], role="stable")
    admin.load("sticky", "2", models["2"])
    admin.traffic("sticky", 50)
    sides = {}
    for key in (f"user-{i}" for i in range(8)):
        seen = answers(server.url, "sticky", at_least=2, **{"x-user-key": key})
        assert len(only(seen)) == 1, (key, seen)  # one side for the key, whichever worker answered
        sides[key] = only(seen).pop()
    assert len(set(sides.values())) == 2, sides  # and at 50 % both sides have keys


def test_admin_calls_on_any_worker_see_one_state_and_one_lease(server, admin, models):
    admin.load("leased", "1", models["1"], role="stable")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{server.url}/admin/v1/models/leased"
    taken = httpx.put(f"{url}/lease", json={"owner": "run-a", "ttl_s": 600}, headers=auth)
    assert taken.status_code == 200, taken.text
    for _ in range(12):  # new connections: both workers take admin calls, the leader answers them
        refused = httpx.put(f"{url}/traffic", json={"canary_percent": 0}, headers=auth)
        assert refused.status_code == 409 and "run-a" in refused.json()["error"]
        assert httpx.get(url, headers=auth).json()["lease"]["owner"] == "run-a"
        assert httpx.get(url).status_code == 401
    released = httpx.request("DELETE", f"{url}/lease", json={"owner": "run-a"}, headers=auth)
    assert released.status_code == 200, released.text


def test_a_lease_that_runs_out_rolls_the_canary_back_on_every_worker(server, admin, models):
    admin.load("expiring", "1", models["1"], role="stable")
    admin.load("expiring", "2", models["2"])
    admin.traffic("expiring", 100)
    auth = {"Authorization": f"Bearer {TOKEN}", "x-mlops-lease-owner": "run-b"}
    lease = httpx.put(
        f"{server.url}/admin/v1/models/expiring/lease", json={"owner": "run-b", "ttl_s": 1}, headers=auth
    )
    assert lease.status_code == 200, lease.text
    deadline = time.monotonic() + 15
    while admin.status("expiring")["canary"] is not None:
        assert time.monotonic() < deadline, "the lease did not run out"
        time.sleep(0.3)
    assert only(answers(server.url, "expiring")) == {("1", "stable")}


def test_metrics_and_the_inference_log_count_every_worker_once(server, admin, models, state):
    admin.load("counted", "1", models["1"], role="stable")
    seen = answers(server.url, "counted", at_least=10)
    sent = sum(seen.values())
    text = httpx.get(f"{server.url}/metrics").text
    line = 'mlops_requests_total{code="200",model="counted",protocol="v1",role="stable",version="1"}'
    assert f"{line} {float(sent)}" in text, [m for m in text.splitlines() if "counted" in m]
    assert 'mlops_model_loaded{model="counted",role="stable",version="1"} 1.0' in text
    store = get_log_store(f"sqlite:///{state / 'logs' / 'inference.db'}")
    deadline = time.monotonic() + 30
    while (count := store.count("counted", 0, 2**62)) < sent and time.monotonic() < deadline:
        time.sleep(0.3)
        store.refresh()
    events = list(store.query("counted", 0, 2**62))
    assert count == sent and len(events) == sent
    assert len({e.event_id for e in events}) == sent and len({e.request_id for e in events}) == sent


def test_a_worker_that_dies_is_replaced_and_takes_the_routing_it_missed(server, admin, models):
    admin.load("revived", "1", models["1"], role="stable")
    admin.load("revived", "2", models["2"])
    follower = worker_process(server, 1)
    follower.kill()
    follower.wait(10)  # its connections are reset and its socket closed: new ones go to the others
    auth = {"Authorization": f"Bearer {TOKEN}"}
    changed = httpx.put(  # a new connection (a kept-alive one to the dead worker is reset)
        f"{server.url}/admin/v1/models/revived/traffic", json={"canary_percent": 100}, headers=auth
    )
    assert changed.status_code == 200, changed.text  # while it is down, or already starting again
    assert changed.json()["workers"]["updated"][0] == 0 and changed.json()["canary_percent"] == 100
    deadline = time.monotonic() + 60
    while worker_pid(server, 1) in (None, follower.pid) or not ready(server):
        assert time.monotonic() < deadline, "worker 1 did not come back"
        time.sleep(0.3)
    assert only(answers(server.url, "revived")) == {("2", "canary")}


def test_a_taken_port_stops_the_server_with_the_port_named(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = mlops_env(
            MLOPS_STATE_DIR=str(tmp_path), MLOPS_SERVING__PORT=str(port), MLOPS_SERVING__WORKERS="2"
        )
        done = subprocess.run(
            [sys.executable, "-m", "serving"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr


def worker_process(server, index: int) -> psutil.Process:
    pid = worker_pid(server, index)
    assert pid is not None, f"no worker {index} running"
    return psutil.Process(pid)


def worker_pid(server, index: int) -> int | None:
    """The live worker process ``index`` of this server, if one runs."""
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            argv = child.cmdline()
            named = "serving.workers" in argv and argv[argv.index("serving.workers") + 1] == str(index)
            if named and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
    return None


def ready(server) -> bool:
    return httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_sigterm_stops_every_worker(tmp_path, models):
    with model_server(tmp_path / "state", MLOPS_SERVING__WORKERS="2") as running:
        workers = [worker_process(running, i) for i in range(2)]
        run_dir = Path(workers[0].cmdline()[-1])
        assert (run_dir / "worker-0.sock").exists()
        os.kill(running.process.pid, signal.SIGTERM)  # `timeout`, which hands it to the supervisor
        running.process.wait(30)
    assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)
    assert not run_dir.exists()  # sockets, ready marks, metric files: gone with the server
