"""docker/compose.yaml runs the same services, with the same commands, as `mlops stack up`."""

from __future__ import annotations

import os

import yaml

from common.settings import load_settings
from mlops.stack import build_components
from mlops.stack.compose import CONTAINER_ENV, container_settings, render_compose
from tests.helpers import PROJECT_ROOT


def committed() -> str:
    return (PROJECT_ROOT / "docker" / "compose.yaml").read_text()


def test_committed_compose_file_is_the_rendering_of_the_service_table():
    assert committed() == render_compose(), "run: .venv/bin/mlops stack compose --output docker/compose.yaml"


def test_every_stack_service_is_a_compose_service_running_mlops_stack_run():
    services = yaml.safe_load(committed())["services"]
    expected = {s.name for c in build_components(container_settings()) for s in c.services}
    assert set(services) == expected
    for name, service in services.items():
        assert service["command"] == ["mlops", "stack", "run", name]


def test_container_environment_is_valid_settings_and_matches_the_rendering(monkeypatch):
    for key in list(os.environ):
        if key.startswith("MLOPS_"):
            monkeypatch.delenv(key)
    for key, value in CONTAINER_ENV.items():
        monkeypatch.setenv(key, value)
    from_env = load_settings()
    assert (
        build_components(from_env)[0].services[0].argv
        == build_components(container_settings())[0].services[0].argv
    )
    assert from_env.airflow.venv == container_settings().airflow.venv


def test_airflow_waits_for_its_migration_and_for_the_registry():
    services = yaml.safe_load(committed())["services"]
    scheduler = services["airflow-scheduler"]
    assert scheduler["depends_on"]["airflow-db-migrate"] == {"condition": "service_completed_successfully"}
    assert scheduler["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    assert services["mlflow"]["healthcheck"]["test"] == ["CMD", "mlops", "stack", "probe", "mlflow"]
    assert scheduler["healthcheck"]["test"] == ["CMD", "mlops", "stack", "probe", "airflow-scheduler"]
