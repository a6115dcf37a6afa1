"""What the stack runs: every component's processes, their commands, environments and probes.

This table is the one place that knows how MLflow, Airflow and the model server start. The
embedded supervisor (`mlops stack up`) and the compose file (`docker/compose.yaml`, rendered by
`mlops stack compose`) both run a service as ``mlops stack run <service>``, which execs the command
built here, so the local stack and the containers cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from common.errors import ConfigError
from common.settings import Settings, env_name

HEALTHY = "healthy"

# A probe asks a component over HTTP how each of its services is doing: service name -> state,
# where HEALTHY means ready and anything else says what is still missing.
Probe = Callable[[httpx.Client], dict[str, str]]


@dataclass(frozen=True)
class Service:
    """One process of a component."""

    name: str
    component: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    oneshot: bool = False  # runs to completion before the component's long-running services
    port: int | None = None  # the port it binds, checked free before it starts
    port_setting: str | None = None  # the setting that moves that port, for error messages
    environment_setting: str | None = None  # the setting that points at argv[0]'s environment
    prepare: Callable[[], None] | None = None  # files and folders it needs before it starts
    gpu: bool = False  # uses a GPU when the host has one (the compose file reserves one)


@dataclass(frozen=True)
class Component:
    """A part of the stack as a user sees it: one URL, one health probe, one or more processes."""

    name: str
    url: str | None
    services: tuple[Service, ...]
    probe: Probe | None
    health_timeout_s: float

    @property
    def long_running(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if not s.oneshot)


def build_components(settings: Settings) -> tuple[Component, ...]:
    """The stack for these settings, in start order."""
    return (_mlflow(settings), _airflow(settings), _serving(settings), _log_receiver(settings))


def find_service(components: tuple[Component, ...], name: str) -> Service:
    for component in components:
        for service in component.services:
            if service.name == name:
                return service
    known = ", ".join(s.name for c in components for s in c.services)
    raise ConfigError(f"unknown service '{name}'; the stack's services are: {known}")


def service_environment(service: Service, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a service runs with: the caller's, with the service's settings on top."""
    env = dict(os.environ if base is None else base)
    env.update(service.env)
    return env


# --- MLflow -------------------------------------------------------------------------------------


def _mlflow(settings: Settings) -> Component:
    data = settings.state_dir / "mlflow"
    store = settings.mlflow.backend_store_uri or f"sqlite:///{data / 'mlflow.db'}"
    artifacts = settings.mlflow.artifacts_destination or str(data / "artifacts")
    argv = [
        str(settings.runtime_venv / "bin" / "mlflow"), "server",
        "--host", settings.host,
        "--port", str(settings.mlflow.port),
        "--workers", str(settings.mlflow.workers),
        "--backend-store-uri", store,
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    if settings.mlflow.allowed_hosts:
        argv += ["--allowed-hosts", settings.mlflow.allowed_hosts]

    def prepare() -> None:
        data.mkdir(parents=True, exist_ok=True)
        if "://" not in artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)

    service = Service(
        name="mlflow",
        component="mlflow",
        argv=tuple(argv),
        port=settings.mlflow.port,
        port_setting=env_name(("mlflow", "port")),
        environment_setting=env_name(("runtime_venv",)),
        prepare=prepare,
    )
    return Component(
        name="mlflow",
        url=settings.mlflow_url,
        services=(service,),
        # The REST API itself, not just the liveness route: the registry's database is up.
        probe=_http_probe(
            "mlflow", settings.mlflow_url, "/health", "/api/2.0/mlflow/experiments/search?max_results=1"
        ),
        health_timeout_s=settings.mlflow.health_timeout_s,
    )


def _http_probe(service: str, url: str, *paths: str) -> Probe:
    """Healthy when every path answers 200 (a liveness route, then a real API call, say)."""

    def probe(client: httpx.Client) -> dict[str, str]:
        for path in paths:
            try:
                response = client.get(f"{url}{path}")
            except httpx.HTTPError as exc:
                return {service: f"not answering ({type(exc).__name__})"}
            if response.status_code != 200:
                return {service: f"{path} answered {response.status_code}"}
        return {service: HEALTHY}

    return probe


# --- Airflow ------------------------------------------------------------------------------------

AIRFLOW_PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
# /api/v2/monitor/health reports each process under its own key.
_AIRFLOW_HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}
RUNTIME_CONNECTION_ID = "mlops_runtime"


def airflow_environment(settings: Settings) -> dict[str, str]:
    """Airflow's configuration for the embedded stack, as Airflow's own environment variables.

    A variable already set in the caller's environment wins (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
    pointing at PostgreSQL, say), except AIRFLOW_HOME and PATH, which follow the state dir and the
    orchestration environment.
    """
    home = settings.airflow_home
    defaults = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(settings.airflow.dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.airflow.plugins_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # An approval in MLflow must start deploy_model with no step by a person in Airflow (a
        # paused DAG's registry watcher does not run).
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # LocalExecutor forks this many workers up front; Airflow's 32 is too many for a small box.
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": settings.host,
        "AIRFLOW__API__PORT": str(settings.airflow.port),
        "AIRFLOW__API__WORKERS": str(settings.airflow.api_workers),
        "AIRFLOW__API__BASE_URL": settings.airflow_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.airflow_url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow.admin_user}:admin",
        # How tasks reach the runtime environment (plugins/mlops_airflow): a Connection, so that
        # at scale it is edited in the UI or a secrets backend, not in code.
        f"AIRFLOW_CONN_{RUNTIME_CONNECTION_ID.upper()}": json.dumps(
            {"conn_type": "generic", "extra": runtime_connection_extra(settings)}
        ),
        # Read by dags/deploy_model.py when parsed (Airflow Variables from the environment, so
        # parsing reads no database): the registry its approval watcher polls, the policies.
        "AIRFLOW_VAR_MLOPS_MLFLOW_URL": settings.mlflow_url,
        "AIRFLOW_VAR_MLOPS_MODELS_FILE": str(settings.deploy.models_file),
    }
    env = {key: os.environ.get(key, value) for key, value in defaults.items()}
    env["AIRFLOW_HOME"] = str(home)
    env["PATH"] = f"{settings.airflow.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def runtime_connection_extra(settings: Settings) -> dict[str, object]:
    """What the Airflow operator needs to run `mlops` commands with the same settings as here."""
    env = {
        "MLOPS_STATE_DIR": str(settings.state_dir),
        "MLOPS_MLFLOW__URL": settings.mlflow_url,
        "MLOPS_AIRFLOW__URL": settings.airflow_url,
        "MLOPS_SERVING__URL": settings.serving_url,
        "MLOPS_LOGS__STORE": settings.log_store_url,
        "MLOPS_DEPLOY__MODELS_FILE": str(settings.deploy.models_file),
    }
    if os.environ.get("MLOPS_CONFIG"):
        env["MLOPS_CONFIG"] = os.environ["MLOPS_CONFIG"]
    return {"launcher": "subprocess", "python": str(settings.runtime_python), "env": env}


def _airflow(settings: Settings) -> Component:
    airflow = str(settings.airflow.venv / "bin" / "airflow")
    env = airflow_environment(settings)
    home = settings.airflow_home

    def prepare() -> None:
        home.mkdir(parents=True, exist_ok=True)
        # Airflow writes the passwords it generates into this file, in place: made private first.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(admin_password_file(home), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        if settings.airflow.admin_password is not None:
            _write_admin_password(home, settings.airflow.admin_user, settings.airflow.admin_password)

    common = {
        "component": "airflow",
        "env": env,
        "environment_setting": env_name(("airflow", "venv")),
        "prepare": prepare,
    }
    services = [Service(name="airflow-db-migrate", argv=(airflow, "db", "migrate"), oneshot=True, **common)]
    for process in AIRFLOW_PROCESSES:
        is_api = process == "api-server"
        services.append(
            Service(
                name=f"airflow-{process}",
                argv=(airflow, process),
                port=settings.airflow.port if is_api else None,
                port_setting=env_name(("airflow", "port")) if is_api else None,
                **common,
            )
        )
    return Component(
        name="airflow",
        url=settings.airflow_url,
        services=tuple(services),
        probe=_airflow_probe(settings.airflow_url),
        health_timeout_s=settings.airflow.health_timeout_s,
    )


def _airflow_probe(url: str) -> Probe:
    names = [f"airflow-{p}" for p in AIRFLOW_PROCESSES]

    def probe(client: httpx.Client) -> dict[str, str]:
        try:
            response = client.get(f"{url}/api/v2/monitor/health")
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return dict.fromkeys(names, f"api-server not answering ({type(exc).__name__})")
        states = {"airflow-api-server": HEALTHY}
        for process, key in _AIRFLOW_HEALTH_KEYS.items():
            status = (body.get(key) or {}).get("status") or "no heartbeat yet"
            states[f"airflow-{process}"] = status if status != "healthy" else HEALTHY
        return states

    return probe


def admin_password_file(airflow_home: Path) -> Path:
    # Airflow's simple auth manager keeps (and generates) its users' passwords here.
    return airflow_home / "simple_auth_manager_passwords.json.generated"


def _write_admin_password(home: Path, user: str, password: SecretStr) -> None:
    """Set the admin's password in Airflow's password file, which is created private (0600) and
    replaced whole, so it is never readable by others, not even for a moment."""
    path = admin_password_file(home)
    passwords = json.loads(path.read_text() or "{}") if path.exists() else {}
    passwords[user] = password.get_secret_value()
    staged = path.with_name(path.name + ".tmp")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(passwords) + "\n")
    os.replace(staged, path)


def airflow_login(settings: Settings) -> dict[str, str] | None:
    """Where to log in to the Airflow UI, and the file that holds the password (never the password
    itself: results are printed and kept in logs); None until Airflow has written it."""
    if airflow_password(settings) is None:
        return None
    file = admin_password_file(settings.airflow_home)
    return {"url": settings.airflow_url, "user": settings.airflow.admin_user, "password_file": str(file)}


def airflow_password(settings: Settings) -> SecretStr | None:
    """The Airflow admin's password, once Airflow has written it (for our own REST calls)."""
    try:
        passwords = json.loads(admin_password_file(settings.airflow_home).read_text())
    except (OSError, ValueError):
        return None
    password = passwords.get(settings.airflow.admin_user) if isinstance(passwords, dict) else None
    return SecretStr(password) if isinstance(password, str) else None


# --- Serving ------------------------------------------------------------------------------------


def _serving(settings: Settings) -> Component:
    def prepare() -> None:
        from serving.auth import admin_token

        settings.serving_dir.mkdir(parents=True, exist_ok=True)
        admin_token(settings)  # made once here, so the CLI and the server read the same one

    service = Service(
        name="serving",
        component="serving",
        argv=(str(settings.runtime_python), "-m", "serving"),
        port=settings.serving.port,
        port_setting=env_name(("serving", "port")),
        environment_setting=env_name(("runtime_venv",)),
        prepare=prepare,
        gpu=True,
    )
    return Component(
        name="serving",
        url=settings.serving_url,
        services=(service,),
        probe=_http_probe("serving", settings.serving_url, "/v2/health/ready"),
        health_timeout_s=settings.serving.health_timeout_s,
    )


def _log_receiver(settings: Settings) -> Component:
    """KServe's logger sink (serving/logger/kserve.py): on one machine the model server logs by
    itself, so nothing posts here unless pointed at it; it runs so that what a cluster's
    InferenceServices would send is received by the same code here, and tested so."""
    service = Service(
        name="log-receiver",
        component="log-receiver",
        argv=(str(settings.runtime_python), "-m", "mlops", "logs", "receive"),
        port=settings.logs.receiver_port,
        port_setting=env_name(("logs", "receiver_port")),
        environment_setting=env_name(("runtime_venv",)),
        prepare=lambda: settings.serving_dir.mkdir(parents=True, exist_ok=True),
    )
    return Component(
        name="log-receiver",
        url=settings.log_receiver_url,
        services=(service,),
        probe=_http_probe("log-receiver", settings.log_receiver_url, "/healthz"),
        health_timeout_s=settings.serving.health_timeout_s,
    )
