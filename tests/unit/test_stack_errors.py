"""Bad configuration of the stack: one clear line naming the problem, and nothing started."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.helpers import mlops_env, run_mlops


@pytest.fixture
def stack_env(tmp_path):
    def make(**extra: str) -> dict[str, str]:
        settings = {
            "MLOPS_STATE_DIR": str(tmp_path / "state"),
            "MLOPS_MLFLOW__PORT": str(free_port()),
            "MLOPS_AIRFLOW__PORT": str(free_port()),
        }
        settings.update(extra)
        return mlops_env(**settings)

    return make


def started_nothing(state_dir: Path) -> bool:
    run_dir = state_dir / "run"
    return not run_dir.exists() or not any(run_dir.iterdir())


def test_port_in_use_names_the_port_and_its_setting(stack_env, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_mlops("stack", "up", env=stack_env(MLOPS_MLFLOW__PORT=str(port)))
    assert run.code == 2
    assert len(run.error_lines) == 1
    assert f"port {port} for mlflow (MLOPS_MLFLOW__PORT) is already in use" in run.error_lines[0]
    assert started_nothing(tmp_path / "state")


def test_same_port_for_two_components_is_refused(stack_env, tmp_path):
    port = str(free_port())
    run = run_mlops("stack", "up", env=stack_env(MLOPS_MLFLOW__PORT=port, MLOPS_AIRFLOW__PORT=port))
    assert run.code == 2
    assert "MLOPS_MLFLOW__PORT" in run.error_lines[0] and "MLOPS_AIRFLOW__PORT" in run.error_lines[0]
    assert started_nothing(tmp_path / "state")


def test_missing_airflow_environment_names_the_setting_and_the_fix(stack_env, tmp_path):
    run = run_mlops("stack", "up", env=stack_env(MLOPS_AIRFLOW__VENV=str(tmp_path / "no-venv")))
    assert run.code == 2
    line = run.error_lines[0]
    assert "MLOPS_AIRFLOW__VENV" in line and "no-venv" in line and "make setup" in line
    assert started_nothing(tmp_path / "state")


def test_state_dir_that_is_a_file_is_refused(stack_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = run_mlops("stack", "up", env=stack_env(MLOPS_STATE_DIR=str(blocker)))
    assert run.code == 2
    assert f"state dir '{blocker}' (MLOPS_STATE_DIR) exists and is not a directory" in run.error_lines[0]


def test_state_dir_under_a_file_cannot_be_created(stack_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = run_mlops("stack", "up", env=stack_env(MLOPS_STATE_DIR=str(blocker / "state")))
    assert run.code == 2
    assert "(MLOPS_STATE_DIR) is not usable: Not a directory" in run.error_lines[0]


@contextlib.contextmanager
def unwritable(folder: Path):
    """A folder nobody may write to: chmod for a user, the immutable attribute for root."""
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        undo = ["chmod", "700", str(folder)]
    elif (
        shutil.which("chattr")
        and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    ):
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("cannot make a folder unwritable for root here (no chattr)")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_unwritable_state_dir_is_refused(stack_env, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with unwritable(locked):
        run = run_mlops("stack", "up", env=stack_env(MLOPS_STATE_DIR=str(locked)))
    assert run.code == 2
    assert len(run.error_lines) == 1
    assert f"state dir '{locked}' (MLOPS_STATE_DIR) is not usable: " in run.error_lines[0]


def _fake_venv(root: Path, tool: str, script: str, **others: str) -> Path:
    """An environment whose executables are shell scripts (``others``: more tools, name -> script)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in {tool: script, **others}.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return root


def test_failing_setup_step_reports_its_exit_code_and_log(stack_env, tmp_path):
    airflow = _fake_venv(tmp_path / "airflow-venv", "airflow", 'echo "migration exploded" >&2; exit 4')
    env = stack_env(MLOPS_AIRFLOW__VENV=str(airflow))
    try:
        run = run_mlops("stack", "up", env=env)
        assert run.code == 1
        log = tmp_path / "state" / "logs" / "airflow-db-migrate.log"
        assert f"airflow-db-migrate failed (exit 4); log: {log}" in run.error_lines[0]
        assert "migration exploded" in run.stderr  # the log's tail is shown
    finally:
        run_mlops("stack", "down", env=env)


def test_service_that_dies_while_starting_is_named_with_its_log(stack_env, tmp_path):
    runtime = _fake_venv(
        tmp_path / "runtime-venv", "mlflow", 'echo "no database driver" >&2; exit 3', python="exec sleep 60"
    )
    airflow = _fake_venv(
        tmp_path / "airflow-venv", "airflow", 'case "$1" in db) exit 0;; *) exec sleep 60;; esac'
    )
    env = stack_env(MLOPS_RUNTIME_VENV=str(runtime), MLOPS_AIRFLOW__VENV=str(airflow))
    try:
        run = run_mlops("stack", "up", env=env, timeout=300)
        assert run.code == 1
        log = tmp_path / "state" / "logs" / "mlflow.log"
        assert f"mlflow exited while starting; log: {log}" in run.error_lines[0]
        assert "no database driver" in run.stderr
    finally:
        down = run_mlops("stack", "down", env=env)
    assert down.code == 0, down.stderr
