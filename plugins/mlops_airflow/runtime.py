"""Where and how `mlops` commands run, read from one Airflow connection (default ``mlops_runtime``).

The connection's extra (JSON) is the runtime section of the settings, in Airflow's terms:

- ``launcher``: ``subprocess`` (the runtime interpreter on this machine) or ``kubernetes`` (a pod
  from the runtime image, through the KubernetesPodOperator);
- ``python``: the runtime interpreter, for ``subprocess``;
- ``image``, ``namespace``, ``kubernetes_conn_id``, ``service_account``, ``image_pull_policy``,
  ``resources`` (``requests``/``limits`` of every step's pod), ``gpus`` (``nvidia.com/gpu`` for the
  steps that ask for one: training), ``config_maps`` and ``secrets`` (names: their keys become the
  pod's environment, so a secret's value never passes through Airflow): for ``kubernetes``;
- ``env``: MLOPS_* settings passed to the command (MLflow URL, state dir, ...).

`mlops stack up` defines it through ``AIRFLOW_CONN_MLOPS_RUNTIME``; at scale it lives in the
metadata database or a secrets backend, edited in the UI, never in DAG code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException

LAUNCHERS = ("subprocess", "kubernetes")
DEFAULT_CONN_ID = "mlops_runtime"


@dataclass(frozen=True)
class RuntimeConfig:
    launcher: str = "subprocess"
    python: str | None = None
    image: str | None = None
    namespace: str = "default"
    kubernetes_conn_id: str | None = None
    service_account: str | None = None
    gpus: int = 0
    image_pull_policy: str = "IfNotPresent"
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    config_maps: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_extra(cls, conn_id: str, extra: dict[str, Any]) -> RuntimeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise AirflowFailException(
                f"connection '{conn_id}': unknown key(s) {unknown} in extra; known: {sorted(known)}"
            )
        config = cls(**extra)
        if config.launcher not in LAUNCHERS:
            raise AirflowFailException(
                f"connection '{conn_id}': launcher '{config.launcher}' is not one of {', '.join(LAUNCHERS)}"
            )
        if config.launcher == "subprocess" and not config.python:
            raise AirflowFailException(
                f"connection '{conn_id}': launcher 'subprocess' needs 'python' in extra"
            )
        if config.launcher == "kubernetes" and not config.image:
            raise AirflowFailException(
                f"connection '{conn_id}': launcher 'kubernetes' needs 'image' in extra"
            )
        extra_keys = sorted(set(config.resources) - {"requests", "limits"})
        if extra_keys:
            raise AirflowFailException(
                f"connection '{conn_id}': 'resources' takes 'requests' and 'limits', not {extra_keys}"
            )
        return config


class MlopsRuntimeHook(BaseHook):
    """Reads the runtime connection; the operator asks it where to run."""

    conn_name_attr = "mlops_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "generic"
    hook_name = "mlops runtime"

    def __init__(self, mlops_conn_id: str = DEFAULT_CONN_ID) -> None:
        super().__init__()
        self.mlops_conn_id = mlops_conn_id

    def get_runtime(self) -> RuntimeConfig:
        try:
            connection = self.get_connection(self.mlops_conn_id)
        except Exception as exc:  # Airflow raises its own not-found type, which moved across releases
            raise AirflowFailException(
                f"Airflow connection '{self.mlops_conn_id}' is not defined: it tells tasks where the mlops "
                f"runtime is (`mlops stack up` sets AIRFLOW_CONN_{self.mlops_conn_id.upper()}): {exc}"
            ) from exc
        return RuntimeConfig.from_extra(self.mlops_conn_id, connection.extra_dejson)
