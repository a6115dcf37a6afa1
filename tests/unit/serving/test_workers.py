"""The workers' replication of the routing, over real Unix sockets, with stand-in deployments."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest

from common.settings import Settings
from serving import workers as workers_module
from serving.workers import Cluster, ReplicationFailed, _call, compute_threads


class Routings:
    """What a Cluster needs of Deployments: the routing as data, and applying one."""

    def __init__(self, models: dict[str, Any] | None = None) -> None:
        self.models = models or {}
        self.applied: list[dict[str, Any]] = []
        self.fail: str | None = None
        self.replicate = None

    def snapshot(self) -> dict[str, Any]:
        return self.models

    async def apply(self, models: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError(self.fail)
        self.models = models
        self.applied.append(models)


def routing(version: str, percent: float = 0.0) -> dict[str, Any]:
    return {
        "m": {
            "stable": {"version": version, "uri": f"/v{version}"},
            "canary_percent": percent,
            "mode": "split",
        }
    }


@pytest.fixture
def run_dir():
    with tempfile.TemporaryDirectory(prefix="w-") as folder:  # short: a socket path has 108 bytes
        yield Path(folder)


def test_the_leader_reaches_every_running_worker_and_names_the_rest(run_dir):
    calls: list[tuple[Any, ...]] = []

    async def admin(method: str, path: str, headers: dict[bytes, bytes], body: bytes) -> tuple[int, Any]:
        calls.append((method, path, headers, body))
        return 409, {"error": "held"}

    async def scenario() -> None:
        leader, follower = Cluster(0, 3, run_dir), Cluster(1, 3, run_dir)  # worker 2 never starts
        led, followed = Routings(routing("1")), Routings()
        joining = asyncio.create_task(follower.follow(followed))
        await asyncio.sleep(0.5)  # the follower waits for the leader (restoring)
        assert not joining.done()
        await leader.lead(led, admin)
        await asyncio.wait_for(joining, 5)
        assert followed.models == routing("1")

        led.models = routing("2", 10.0)
        assert await led.replicate() == {"count": 3, "updated": [0, 1], "starting": [2]}
        assert followed.applied[-1] == routing("2", 10.0)

        headers = {b"authorization": b"Bearer t", b"x-mlops-lease-owner": b"run", b"cookie": b"c"}
        assert await follower.forward("PUT", "/admin/v1/models/m/traffic", headers, b"{}") == (
            409,
            {"error": "held"},
        )
        assert calls == [
            (
                "PUT",
                "/admin/v1/models/m/traffic",
                {b"authorization": b"Bearer t", b"x-mlops-lease-owner": b"run"},
                b"{}",
            )
        ]

        followed.fail = "out of memory"
        led.models = routing("3")
        with pytest.raises(
            ReplicationFailed, match=r"workers 0 and not .*worker 1: RuntimeError: out of memory"
        ):
            await led.replicate()

    asyncio.run(scenario())


def test_a_follower_keeps_the_newest_routing_of_the_newest_leader(run_dir):
    async def scenario() -> None:
        follower, followed = Cluster(1, 2, run_dir), Routings()
        leader = Cluster(0, 2, run_dir)
        await leader.lead(Routings(routing("1")), None)  # type: ignore[arg-type]
        await follower.follow(followed)
        path = follower.socket_path(1)

        async def send(epoch: str, generation: int, version: str) -> None:
            message = {"op": "apply", "epoch": epoch, "generation": generation, "models": routing(version)}
            assert await _call(path, message, 5) == {}

        await send(leader.epoch, 5, "5")
        await send(leader.epoch, 3, "3")  # late: older than what it has
        assert followed.models == routing("5")
        await send("restarted-leader", 1, "7")  # a new leader counts from 1 again
        assert followed.models == routing("7")
        assert await _call(path, {"op": "nonsense"}, 5) == {"error": "ValueError: unknown op 'nonsense'"}

    asyncio.run(scenario())


def test_the_usable_cpus_are_shared_out_unless_threads_are_set(monkeypatch, tmp_path):
    monkeypatch.setattr("serving.runtime.usable_cpus", lambda: 16)
    assert compute_threads(Settings(state_dir=tmp_path), 4) == 4
    assert compute_threads(Settings(state_dir=tmp_path), 1) is None  # one worker: the runtime's own choice
    assert compute_threads(Settings(state_dir=tmp_path, serving={"threads": 3}), 4) == 3
    monkeypatch.setattr("serving.runtime.usable_cpus", lambda: 2)
    assert compute_threads(Settings(state_dir=tmp_path), 4) == 1
    assert workers_module.Cluster(2, 4, tmp_path).not_ready() == "workers 0, 1, 2, 3 starting"
