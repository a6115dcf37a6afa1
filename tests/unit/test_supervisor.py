"""`down` stops exactly the process trees `up` recorded, and nothing else."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time

import psutil
import pytest

from common.settings import Settings
from mlops.stack import Supervisor, build_components
from mlops.stack.supervisor import ProcessRecord


@pytest.fixture
def supervisor(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", stop_timeout_s=5)
    sup = Supervisor(settings, build_components(settings), progress=lambda line: None)
    sup.run_dir.mkdir(parents=True)
    return sup


def spawn_tree() -> subprocess.Popen:
    # A parent shell with a child, in its own session, like a service started by `up`.
    return subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)


def record_for(proc: subprocess.Popen, name: str, create_time: float | None = None) -> ProcessRecord:
    return ProcessRecord(
        service=name, pid=proc.pid, pgid=proc.pid,
        create_time=create_time if create_time is not None else psutil.Process(proc.pid).create_time(),
        argv=["sh"], log="/dev/null", started_at=time.time(),
    )  # fmt: skip


def write(supervisor: Supervisor, record: ProcessRecord) -> None:
    (supervisor.run_dir / f"{record.service}.json").write_text(json.dumps(dataclasses.asdict(record)))


def wait_for_children(pid: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children(recursive=True)
        if children:
            return children
        time.sleep(0.05)
    raise AssertionError("child did not start")


def test_down_stops_the_recorded_process_and_its_children(supervisor):
    proc = spawn_tree()
    children = wait_for_children(proc.pid)
    write(supervisor, record_for(proc, "mlflow"))

    result = supervisor.down()

    proc.wait(timeout=5)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    assert [s.name for s in result.stopped] == ["mlflow"]
    assert result.stopped[0].processes == 2
    assert not list(supervisor.run_dir.glob("*.json"))


def test_down_leaves_alone_a_process_that_reused_a_recorded_pid(supervisor):
    stranger = spawn_tree()
    try:
        # Same pid, different start time: the recorded service exited and the pid was reused.
        write(supervisor, record_for(stranger, "mlflow", create_time=1.0))
        result = supervisor.down()
        assert stranger.poll() is None
        assert result.stopped == [] and result.already_stopped == ["mlflow"]
    finally:
        stranger.kill()
        stranger.wait()


def test_status_reports_recorded_but_exited_services(supervisor):
    proc = subprocess.Popen(["true"])
    proc.wait()
    write(supervisor, record_for_exited(proc))
    status = supervisor.status()
    mlflow = status.components["mlflow"].services["mlflow"]
    assert (mlflow.state, mlflow.health) == ("exited", "not running")
    assert status.healthy is False
    assert status.components["serving"].services["serving"].state == "stopped"


def record_for_exited(proc: subprocess.Popen) -> ProcessRecord:
    return ProcessRecord(
        service="mlflow", pid=proc.pid, pgid=proc.pid, create_time=0.0, argv=["true"], log="/dev/null",
        started_at=time.time(),
    )  # fmt: skip
