"""The per-model policy file (config/models.yaml) as the DAG files read it when they are parsed:
for their schedules, the models they cover, and their forms' help text. The runtime reads and
checks the same file for real; here a file that cannot be read is an empty one (a DAG still
parses, and its runs fail in the runtime with the file's error)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import Param

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def models_file() -> Path:
    """Where it is: the Airflow Variable ``mlops_models_file`` set through the environment (the
    embedded stack sets it; at scale, the deployment does), so parsing a DAG reads no database."""
    return Path(os.environ.get("AIRFLOW_VAR_MLOPS_MODELS_FILE", PROJECT_ROOT / "config" / "models.yaml"))


def read_models() -> dict[str, Any]:
    try:
        data = yaml.safe_load(models_file().read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def section(models: dict[str, Any], name: str, model: str | None = None) -> dict[str, Any]:
    """A section (``ramp``, ``monitor``, ...) of the defaults, or of one model's entry."""
    entry = (models.get("models") or {}).get(model) if model else models.get("defaults")
    return (entry or {}).get(name) or {}


def setting_help(models: dict[str, Any], name: str, key: str) -> str:
    """A form field's help: empty means the file's value, its default and each model's own."""
    own = {
        model: section(models, name, model)[key]
        for model in models.get("models") or {}
        if section(models, name, model).get(key) is not None
    }
    per_model = "; ".join(f"{model}: {value}" for model, value in own.items())
    default = section(models, name).get(key)
    return f"empty: the model's setting (default {default}{'; ' + per_model if per_model else ''})"


def drift_uri(model: str) -> str:
    """The asset a model's tripped monitoring window raises (monitoring.monitor.drift_asset's URI,
    written again here because the DAG files never import the runtime)."""
    return f"mlops://models/{model}/drift"


def enabled_models(models: dict[str, Any], name: str) -> list[str]:
    """The models a DAG covers: every model of the file whose section ``name`` is enabled."""
    default = section(models, name).get("enabled", True)
    return sorted(m for m in models.get("models") or {} if section(models, name, m).get("enabled", default))


# A setting a DAG run may change: (param, flag, JSON type, what it is).
Setting = tuple[str, str, str, str]


def setting_params(models: dict[str, Any], name: str, settings: tuple[Setting, ...]) -> dict[str, Param]:
    """The form's field for each setting of section ``name``: typed, empty by default, its help
    naming the file's values."""
    return {
        key: Param(None, type=["null", kind], description=f"{what}; {setting_help(models, name, key)}")
        for key, _, kind, what in settings
    }


def setting_flags(settings: tuple[Setting, ...], params: dict[str, Any]) -> list[str]:
    """The run's changes as the command's flags: ``--flag=value`` for each field filled in (an
    empty one is the file's value, as its help says)."""
    return [f"--{flag}={params[key]}" for key, flag, _, _ in settings if params.get(key) not in (None, "")]
