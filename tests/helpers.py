"""Helpers for the runtime-environment tests: run the real `mlops` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import PROJECT_ROOT  # one definition, re-exported for the runtime tests


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("mlops: error:")]


# mlflow.set_tracking_uri() in a test also exports MLFLOW_TRACKING_URI: a server started after it
# must not find its registry through that by accident.
_NOT_INHERITED = ("MLOPS_", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def mlops_env(**settings: str) -> dict[str, str]:
    """The caller's environment without MLOPS_* settings (nor MLflow's URIs), plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    env.update(settings)
    return env


def run_mlops(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "mlops", *args],
        capture_output=True, text=True, timeout=timeout, env=env if env is not None else mlops_env(),
        cwd=cwd or PROJECT_ROOT,
    )  # fmt: skip
    return Run(proc.returncode, proc.stdout, proc.stderr)
