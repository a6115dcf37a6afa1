"""The error base every mlops command and server raises; the CLI and HTTP layers map it once."""

from __future__ import annotations


class MLOpsError(Exception):
    """A failure the user can act on; its message names the object and what went wrong."""

    exit_code = 1


class ConfigError(MLOpsError):
    """Bad configuration: a setting, a flag, a file, a port, a missing environment."""

    exit_code = 2


class InvalidInput(MLOpsError):
    """A request or argument that does not match what was expected."""

    exit_code = 2


class ModelNotFound(MLOpsError):
    """A model or version that the registry or the server does not know."""


class ModelNotReady(MLOpsError):
    """A model that is known but not loaded (yet)."""


class BackendUnavailable(MLOpsError):
    """An external system (registry, log store, object store, Airflow) that does not answer (or
    answers "later": overloaded, locked): worth trying again."""


class BackendRefused(MLOpsError):
    """An external system that answered and refused (bad credentials, a request it cannot take, a
    corrupt database): trying again will not help until someone fixes the cause."""


class LeaseHeld(MLOpsError):
    """A model another rollout holds the lease of: wait for it to end (worth trying again later)."""


class StackError(MLOpsError):
    """A component of the embedded stack that failed to start, answer, or stop."""


def mlflow_not_found(exc: Exception) -> bool:
    """Whether an MlflowException says the thing asked for does not exist (else MLflow failed)."""
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()
