"""Where a model version's files come from: a local folder, the MLflow registry, or S3.

``fetch`` turns a URI into a local MLflow model directory, downloading it once into the cache:

- ``/path/to/model`` or ``file:///path``: used in place;
- ``models:/<name>/<version>``, ``runs:/...``, ``mlflow-artifacts:/...``: downloaded through the
  MLflow tracking server (which serves the artifacts, local or S3); ``models:/<name>@<alias>`` is
  first resolved to the version the alias names (``resolve``);
- ``s3://bucket/prefix``: downloaded with boto3 (``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``
  for an S3-compatible store; credentials from the environment, as boto3 reads them).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common.errors import BackendUnavailable, InvalidInput, ModelNotFound, mlflow_not_found

_MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")
_DONE = ".complete"


def resolve(uri: str, tracking_uri: str) -> tuple[str, str | None]:
    """``models:/<name>@<alias>`` as the version the alias names now (``models:/<name>/<version>``,
    the version): fetched and cached under that, so a moved alias never serves the bytes of the
    version it used to name. Any other URI as it is, and None."""
    parsed = urlparse(uri)
    if parsed.scheme != "models" or "@" not in uri:
        return uri, None
    name, _, alias = uri.removeprefix("models:/").partition("@")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(
            tracking_uri=tracking_uri, registry_uri=tracking_uri
        ).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if mlflow_not_found(exc):
            raise ModelNotFound(
                f"model uri '{uri}': no alias '{alias}' on model '{name}' at {tracking_uri}"
            ) from exc
        raise BackendUnavailable(
            f"MLflow at {tracking_uri} could not resolve '{uri}': {exc.message}"
        ) from exc
    except OSError as exc:
        raise BackendUnavailable(f"MLflow at {tracking_uri} is unreachable for '{uri}': {exc}") from exc
    return f"models:/{name}/{version.version}", str(version.version)


def fetch(uri: str, cache_dir: Path, tracking_uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if not path.is_dir():
            raise ModelNotFound(f"model folder '{path}' does not exist")
        return path
    if parsed.scheme not in (*_MLFLOW_SCHEMES, "s3"):
        raise InvalidInput(
            f"model uri '{uri}': scheme '{parsed.scheme}' is not one of file, {', '.join(_MLFLOW_SCHEMES)}, s3"
        )
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if (target / _DONE).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One fetch of a URI at a time (threads of this server, or other processes sharing the cache):
    # the others wait for it, then find it done.
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE).exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        staging = target.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if parsed.scheme == "s3":
            _from_s3(parsed.netloc, parsed.path.lstrip("/"), staging, uri)
        else:
            _from_mlflow(uri, staging, tracking_uri)
        root = _model_root(staging, uri)
        root.rename(target) if root == staging else shutil.move(str(root), str(target))
        shutil.rmtree(staging, ignore_errors=True)
        (target / _DONE).write_text(uri + "\n")
    return target


def _from_mlflow(uri: str, staging: Path, tracking_uri: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    # Parts of MLflow's download path (models:/ resolution, LoggedModel artifacts) read the
    # process-wide tracking and registry URIs, not the arguments: without these it opens a
    # local database of its own. This process talks to one registry, so set them for it.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
    except MlflowException as exc:
        if mlflow_not_found(exc):
            raise ModelNotFound(
                f"model uri '{uri}' is not in the registry at {tracking_uri}: {exc.message}"
            ) from exc
        raise BackendUnavailable(f"MLflow at {tracking_uri} could not serve '{uri}': {exc.message}") from exc
    except OSError as exc:
        raise BackendUnavailable(f"MLflow at {tracking_uri} is unreachable for '{uri}': {exc}") from exc


def s3_client() -> tuple[Any, str | None]:
    """A boto3 S3 client (``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` for an S3-compatible
    store; credentials as boto3 reads them), and that endpoint (None: AWS)."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint), endpoint


def _from_s3(bucket: str, prefix: str, staging: Path, uri: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client, endpoint = s3_client()
    folder = prefix.rstrip("/")  # "models/1" holds models/1/..., not models/10/...
    try:
        found = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if folder and not key.startswith(folder + "/"):
                    continue
                relative = key[len(folder) + 1 :] if folder else key
                if not relative or relative.endswith("/"):
                    continue
                destination = inside(staging, relative, f"model uri '{uri}': object key '{key}'")
                destination.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(destination))
                found += 1
    except ClientError as exc:
        raise ModelNotFound(f"model uri '{uri}': {exc}") from exc
    except BotoCoreError as exc:
        raise BackendUnavailable(f"S3 ({endpoint or 'AWS'}) is unreachable for '{uri}': {exc}") from exc
    if not found:
        raise ModelNotFound(f"model uri '{uri}': no objects under that prefix")


def inside(folder: Path, relative: str, what: str) -> Path:
    """``folder / relative``, refused (InvalidInput naming ``what``) unless it resolves inside
    ``folder``: an absolute path, ``..`` or a link out of it would read or write anywhere."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise InvalidInput(f"{what} points outside '{folder}': {relative!r}")
    return path


def _model_root(staging: Path, uri: str) -> Path:
    """The folder holding MLmodel: the download itself, or its one subfolder."""
    if (staging / "MLmodel").is_file():
        return staging
    candidates = [p.parent for p in staging.rglob("MLmodel")]
    if len(candidates) != 1:
        raise ModelNotFound(f"model uri '{uri}' holds {len(candidates)} MLflow models; expected one")
    return candidates[0]
