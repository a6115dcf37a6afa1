"""`mlops doctor`: what the runtime environment holds and can reach (GPU, providers, registry)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

import httpx

from common.errors import BackendUnavailable, MLOpsError

PACKAGES = (
    "mlops", "kserve", "onnxruntime-gpu", "onnx", "torch", "mlflow", "great-expectations",
    "alibi-detect", "elasticsearch", "opensearch-py", "boto3",
)  # fmt: skip


@dataclass(frozen=True)
class Registry:
    url: str
    reachable: bool
    detail: str


@dataclass(frozen=True)
class DoctorReport:
    python: str
    packages: dict[str, str | None]
    onnxruntime_providers: list[str]  # usable here, in preference order
    cuda_available: bool
    cuda_device: str | None
    registry: Registry | None


def doctor(mlflow_url: str | None, require_gpu: bool = False) -> DoctorReport:
    """Report the runtime; fail if a GPU is required and absent, or the registry is unreachable.

    ``mlflow_url=None`` skips the registry check.
    """
    packages = {name: _version(name) for name in PACKAGES}
    missing = [name for name, version in packages.items() if version is None]
    if missing:
        raise MLOpsError(f"runtime environment is missing {', '.join(missing)}; run `make setup`")

    import torch

    from serving.providers import usable_providers

    providers = list(usable_providers())
    cuda = bool(torch.cuda.is_available())
    device = torch.cuda.get_device_name(0) if cuda else None
    if require_gpu and not cuda:
        raise MLOpsError(
            f"a GPU is required but none is usable: torch.cuda.is_available() is False "
            f"(onnxruntime providers: {', '.join(providers)})"
        )
    registry = _check_registry(mlflow_url) if mlflow_url else None
    return DoctorReport(
        python=platform.python_version(),
        packages=packages,
        onnxruntime_providers=providers,
        cuda_available=cuda,
        cuda_device=device,
        registry=registry,
    )


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _check_registry(url: str) -> Registry:
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=5.0)
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"MLflow tracking server at {url} is unreachable: {exc}") from exc
    if response.status_code != 200:
        raise BackendUnavailable(
            f"MLflow tracking server at {url} answered {response.status_code} on /health"
        )
    return Registry(url=url, reachable=True, detail=response.text.strip())
