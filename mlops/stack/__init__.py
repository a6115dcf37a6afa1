"""The embedded stack: MLflow, Airflow and the model server as local processes on loopback."""

from __future__ import annotations

import os
from typing import NoReturn

from common.errors import ConfigError
from common.settings import Settings
from mlops.stack.services import build_components, find_service, service_environment
from mlops.stack.supervisor import DownResult, StackStatus, Supervisor

__all__ = ["DownResult", "StackStatus", "Supervisor", "build_components", "probe", "run_service"]


def run_service(settings: Settings, name: str) -> NoReturn:
    """Replace this process with the service's own (what `up` and the compose file both run)."""
    service = find_service(build_components(settings), name)
    executable = service.argv[0]
    if not os.access(executable, os.X_OK):
        raise ConfigError(
            f"{name}: '{executable}' not found ({service.environment_setting}); run `make setup`"
        )
    if service.prepare is not None:
        service.prepare()
    os.execve(executable, list(service.argv), service_environment(service))


def probe(settings: Settings, name: str) -> dict[str, str]:
    """Ask a component, or the component of one service, how its services are doing.

    Returns service name -> state (HEALTHY or what is missing): all of the component's services
    for a component name, the one service for a service name (the compose file's health check).
    """
    import httpx

    for component in build_components(settings):
        names = {s.name for s in component.long_running}
        if component.probe is not None and (name == component.name or name in names):
            with httpx.Client(timeout=5.0) as client:
                states = component.probe(client)
            return states if name == component.name else {name: states.get(name, "unknown")}
    known = [c.name for c in build_components(settings) if c.probe is not None]
    raise ConfigError(
        f"nothing to probe named '{name}'; probe a component ({', '.join(known)}) or one of its services"
    )
