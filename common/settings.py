"""Settings for every mlops command: one class, env prefix MLOPS_, nested sections with `__`.

Precedence, highest first: environment variables (``MLOPS_MLFLOW__PORT=5001``), then the config
file (``--config FILE``, else ``$MLOPS_CONFIG``, else ``./mlops.toml`` when present), then the
defaults, which run the embedded stack on loopback with its state under ``<project>/.state``.
Settings are read once, in the CLI's ``main``, and passed down; nothing reads them at import.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from common.errors import ConfigError


def _project_root() -> Path:
    """The checkout this package runs from (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


PROJECT_ROOT = _project_root()
ENV_PREFIX = "MLOPS_"
DEFAULT_CONFIG_FILE = "mlops.toml"
MIN_TOKEN_CHARS = 16


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MlflowSettings(_Section):
    """The MLflow tracking + registry server."""

    port: int = Field(5000, ge=1, le=65535)
    url: str | None = Field(None, description="how clients reach it; default http://<host>:<port>")
    backend_store_uri: str | None = Field(None, description="default sqlite:///<state_dir>/mlflow/mlflow.db")
    artifacts_destination: str | None = Field(None, description="default <state_dir>/mlflow/artifacts")
    workers: int = Field(1, ge=1)
    allowed_hosts: str | None = Field(
        None, description="Host headers MLflow accepts; default localhost + private IPs"
    )
    health_timeout_s: float = Field(120.0, gt=0)


class AirflowSettings(_Section):
    """Airflow 3 (api-server, scheduler, dag-processor, triggerer) from its own environment."""

    port: int = Field(8080, ge=1, le=65535)
    url: str | None = Field(None, description="how clients reach it; default http://<host>:<port>")
    venv: Path = Field(PROJECT_ROOT / ".venv-airflow", description="the orchestration environment")
    dags_folder: Path = PROJECT_ROOT / "dags"
    plugins_folder: Path = PROJECT_ROOT / "plugins"
    admin_user: str = "admin"
    admin_password: SecretStr | None = Field(
        None, description="set it to choose the admin password; default: Airflow generates one"
    )
    api_workers: int = Field(1, ge=1)
    health_timeout_s: float = Field(180.0, gt=0)


class ServingSettings(_Section):
    """The model server: KServe V1/V2 on ONNX Runtime, canary split, batching, admin API."""

    port: int = Field(8090, ge=1, le=65535)
    url: str | None = Field(None, description="how clients reach it; default http://<host>:<port>")
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token of the admin API; default: generated into <state_dir>/serving/admin-token",
    )
    feedback_token: SecretStr | None = Field(
        None,
        description="bearer token of POST /v1/feedback; default: none on loopback, else generated"
        " into <state_dir>/serving/feedback-token",
    )
    target_token: SecretStr | None = Field(
        None,
        description="the admin token of a deployment target that is not this stack's model server",
    )
    shadow_max_pending: int = Field(
        256, ge=1, description="mirrored requests a shadow version may have waiting; past it they are dropped"
    )
    canary_fallback: bool = Field(
        True,
        description="a request the canary fails on (past the request's own checks) is answered by stable;"
        " the canary's failure is still logged for the analysis",
    )

    @field_validator("admin_token", "feedback_token", "target_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"a token must be at least {MIN_TOKEN_CHARS} characters")
        return token

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413 unread")
    max_request_rows: int = Field(1024, ge=1, description="rows one request may carry")
    batch_max_rows: int = Field(256, ge=1, description="rows one compute batch may hold")
    batch_max_wait_ms: float = Field(0.0, ge=0, description="how long a batch waits for more rows (0: never)")
    threads: int | None = Field(
        None, ge=1, description="compute threads per version (ONNX Runtime intra-op, PyTorch on the CPU)"
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="model server processes on the one port (SO_REUSEPORT); each computes on usable CPUs / N"
        " threads unless threads is set",
    )
    health_timeout_s: float = Field(90.0, gt=0)
    target: str | None = Field(
        None, description="where `mlops serve` deploys; default: this model server's URL"
    )


class LogsSettings(_Section):
    """The inference log: where every prediction goes, and how the model server writes it."""

    store: str | None = Field(
        None, description="sqlite:///path, elasticsearch://host:9200 or opensearch://host:9200 (+https)"
    )
    enabled: bool = Field(True, description="log every prediction (off only for measurements)")
    index_prefix: str = Field("mlops-inference", description="search stores: index name prefix")
    retention_days: int = Field(30, ge=1, description="events older than this are dropped (ILM/ISM, prune)")
    username: str | None = Field(None, description="search stores: basic auth user")
    password: SecretStr | None = Field(None, description="search stores: basic auth password")
    api_key: SecretStr | None = Field(None, description="search stores: API key")
    verify_certs: bool = Field(True, description="search stores over https: check the certificate")
    queue_events: int = Field(
        100_000, ge=100, description="records the request path may queue for the writer"
    )
    batch_events: int = Field(500, ge=1, description="events per store write")
    flush_ms: float = Field(200.0, gt=0, description="longest an event waits in memory before a write")
    spool_max_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="the spool's cap on disk (and the dead letters'): past it, events are dropped and counted",
    )
    receiver_port: int = Field(
        8095, ge=1, le=65535, description="port of `mlops logs receive`, where KServe's logger posts"
    )
    feedback_lookback_s: float = Field(
        86_400.0,
        ge=0,
        description="how far back the embedded store looks for a label's request id (0: do not count unknown ones)",
    )


class DeploySettings(_Section):
    """Rollouts: the per-model policy file and how long a rollout holds its model."""

    models_file: Path = Field(
        PROJECT_ROOT / "config" / "models.yaml", description="per-model approval, ramp and thresholds (YAML)"
    )
    lease_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="a rollout's hold on its model, renewed at each step; when it runs out the canary is rolled back",
    )
    reports_experiment: str = Field("mlops-rollouts", description="MLflow experiment of the canary reports")


class MonitorSettings(_Section):
    """Monitoring: which detectors decide, and where the reports go (per-model thresholds: the models file)."""

    backend: Literal["scipy", "alibi"] = Field(
        "scipy",
        description="drift/outlier detectors: scipy (permissive licence) or alibi (alibi-detect, BSL 1.1)",
    )
    experiment: str = Field("mlops-monitoring", description="MLflow experiment of the monitoring reports")


class RetrainSettings(_Section):
    """Retraining: where its runs go (per-model training and approval settings: the models file)."""

    experiment: str = Field("mlops-retraining", description="MLflow experiment of the retraining runs")


class KServeSettings(_Section):
    """The Kubernetes target (kserve://<namespace>): how InferenceServices are built."""

    image: str = Field("mlops-runtime:latest", description="runtime image of predictor and transformer pods")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per predictor pod (0: CPU)")
    service_account: str | None = Field(None, description="service account with access to the model store")
    logger_url: str = Field(
        "http://mlops-log-receiver.{namespace}.svc.cluster.local/",
        description="where KServe's logger sends every request and response ({namespace}: the"
        " InferenceService's; default: the receiver of docker/k8s/log-receiver.yaml); empty: none",
    )


class Settings(BaseSettings):
    """Everything an mlops command may need; each section maps to one component."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        toml_file=None,
    )

    state_dir: Path = Field(PROJECT_ROOT / ".state", description="pids, logs, databases, artifacts")
    local_state: bool = Field(
        True,
        description="false where a step has no state dir (a pod: the operator's Kubernetes launcher sets it):"
        " what the state dir would hold must then come from settings, and a step that needs one says which",
    )
    host: str = Field("127.0.0.1", description="address the servers bind to")
    runtime_venv: Path = Field(
        Path(sys.prefix), description="the runtime environment Airflow tasks run `mlops` from"
    )
    stop_timeout_s: float = Field(20.0, gt=0, description="grace period before SIGKILL on stop")
    mlflow: MlflowSettings = MlflowSettings()
    airflow: AirflowSettings = AirflowSettings()
    serving: ServingSettings = ServingSettings()
    kserve: KServeSettings = KServeSettings()
    logs: LogsSettings = LogsSettings()
    deploy: DeploySettings = DeploySettings()
    monitor: MonitorSettings = MonitorSettings()
    retrain: RetrainSettings = RetrainSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    # Derived values: one place computes them so every command agrees.

    @property
    def mlflow_url(self) -> str:
        return self.mlflow.url or self._embedded_url(("mlflow", "url"), "MLflow", self.mlflow.port)

    @property
    def airflow_url(self) -> str:
        return self.airflow.url or f"http://{_client_host(self.host)}:{self.airflow.port}"

    @property
    def serving_url(self) -> str:
        return self.serving.url or self._embedded_url(
            ("serving", "url"), "the model server", self.serving.port
        )

    @property
    def log_receiver_url(self) -> str:
        """Where the stack's receiver of KServe's logger events listens (`mlops logs receive`)."""
        return f"http://{_client_host(self.host)}:{self.logs.receiver_port}"

    def _embedded_url(self, setting: tuple[str, ...], what: str, port: int) -> str:
        """The embedded stack's server on this machine; without local state (a pod) there is none."""
        if not self.local_state:
            raise self.no_local_state(f"{what}: set {env_name(setting)}", ", where no embedded server runs")
        return f"http://{_client_host(self.host)}:{port}"

    def no_local_state(self, need: str, why: str = "") -> ConfigError:
        """The error of a step that wants what only local state gives: ``need`` names the setting."""
        return ConfigError(
            f"{need}; this step runs without local state ({env_name(('local_state',))}=false, as in a pod){why}"
        )

    @property
    def deployment_target(self) -> str:
        return self.serving.target or self.serving_url

    @property
    def log_store_url(self) -> str:
        if self.logs.store:
            return self.logs.store
        path = self.state_file(
            self.state_dir / "logs" / "inference.db", ("logs", "store"), "the inference log"
        )
        return f"sqlite:///{path}"

    def log_store_options(self) -> dict[str, Any]:
        """What a search store needs besides its URL (secrets from the environment)."""
        logs = self.logs
        return {
            "index_prefix": logs.index_prefix,
            "retention_days": logs.retention_days,
            "username": logs.username,
            "password": logs.password.get_secret_value() if logs.password else None,
            "api_key": logs.api_key.get_secret_value() if logs.api_key else None,
            "verify_certs": logs.verify_certs,
        }

    def state_file(self, path: Path, setting: tuple[str, ...], what: str) -> Path:
        """``path`` (a file the embedded default keeps in the state dir), or, where this process has
        no local state, a ConfigError naming the setting that replaces it."""
        if not self.local_state:
            raise self.no_local_state(
                f"{what} needs {env_name(setting)}", f", and its default is a file of the state dir ({path})"
            )
        return path

    def scratch_dir(self, name: str) -> Path:
        """Where a step keeps copies and caches it can do without (reports before MLflow has them,
        downloaded versions): ``<state_dir>/<name>``, or a temporary folder without local state."""
        if self.local_state:
            return self.state_dir / name
        return Path(tempfile.gettempdir()) / f"mlops-{name}"

    @property
    def serving_dir(self) -> Path:
        return self.state_dir / "serving"

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def runtime_python(self) -> Path:
        return self.runtime_venv / "bin" / "python"


def read_models_file(path: Path) -> dict[str, Any]:
    """The per-model policy file (``MLOPS_DEPLOY__MODELS_FILE``): ``defaults`` and ``models``, each
    domain reading its own sections; {} when there is none."""
    import yaml

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"models file '{path}' cannot be read: {exc}") from exc
    if not isinstance(data, dict) or not set(data) <= {"defaults", "models"}:
        raise ConfigError(f"models file '{path}': expected the keys 'defaults' and 'models' only")
    return data


def models_file_section(
    path: Path, section: str, known: set[str], model: str | None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One section (``monitor``, ``retrain``) of the models file, merged: ``defaults``, the model's
    entry, then ``overrides`` (a run's params; a None there leaves the setting as it is). Unknown
    keys are errors naming the file (or the params) and the section."""
    data = read_models_file(path)
    layers = [
        (str(path), (data.get("defaults") or {}).get(section)),
        (str(path), ((data.get("models") or {}).get(model) or {}).get(section) if model else None),
        ("the run's params", {k: v for k, v in (overrides or {}).items() if v is not None}),
    ]
    merged: dict[str, Any] = {}
    for where, layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: '{section}' must be a mapping, got {layer!r}")
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in '{section}' (known: {sorted(known)})")
        merged.update(layer)
    return merged


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "") else bind_host


def env_name(loc: tuple[Any, ...]) -> str:
    """The environment variable that sets the field at ``loc`` (e.g. MLOPS_MLFLOW__PORT)."""
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def config_file_path(config_file: str | Path | None) -> Path | None:
    """The config file to read: the flag, else $MLOPS_CONFIG, else ./mlops.toml if present."""
    if config_file is not None:
        path, source = Path(config_file), "--config"
    elif os.environ.get(f"{ENV_PREFIX}CONFIG"):
        path, source = Path(os.environ[f"{ENV_PREFIX}CONFIG"]), f"{ENV_PREFIX}CONFIG"
    else:
        default = Path.cwd() / DEFAULT_CONFIG_FILE
        return default if default.is_file() else None
    if not path.is_file():
        raise ConfigError(f"{source}: config file '{path}' does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{source}: config file '{path}' is not readable")
    return path


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the settings once; a bad value raises ConfigError naming the variable and the file."""
    path = config_file_path(config_file)
    cls: type[Settings] = Settings
    if path is not None:
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc
    except (OSError, ValueError) as exc:  # an unparsable TOML file
        raise ConfigError(f"config file '{path}': {exc}") from exc


def _describe(exc: ValidationError, path: Path | None) -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        where = env_name(loc)
        if path is not None:
            where += (
                f" (or [{'.'.join(map(str, loc[:-1]))}] {loc[-1]} in {path})"
                if len(loc) > 1
                else (f" (or {loc[0]} in {path})")
            )
        value = error.get("input")
        shown = f", got {value!r}" if value is not None and not isinstance(value, dict) else ""
        if _is_secret(loc):
            shown = ""  # a secret is never echoed, even a wrong one
        problems.append(f"{where}: {error['msg']}{shown}")
    return "invalid setting: " + "; ".join(problems)


def _is_secret(loc: tuple[Any, ...]) -> bool:
    """Whether the field at ``loc`` holds a secret (SecretStr), whose value no message may show."""
    model: Any = Settings
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return "SecretStr" in str(model)
