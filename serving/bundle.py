"""A model version on disk (an MLflow model directory), read into what the server needs.

``MLmodel`` says which flavor holds the model file (``onnx``: ``model.onnx``; ``pytorch``: an
exported program ``data/model.pt2``, MLflow 3's default, or a TorchScript ``data/model.pth``), its
signature, and the version's transformer spec (metadata).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import InvalidInput, ModelNotFound
from serving.signature import Signature, from_mlflow
from serving.sources import inside
from serving.transformer import METADATA_KEY, Transformer


@dataclass(frozen=True)
class Bundle:
    path: Path
    flavor: str  # onnx | torch_export | torchscript
    model_file: Path
    sha256: str
    signature: Signature | None  # the MLflow signature, when the version has one
    transformer: Transformer | None


def read_bundle(path: Path) -> Bundle:
    path = Path(path)
    mlmodel_path = path / "MLmodel"
    if not mlmodel_path.is_file():
        raise ModelNotFound(f"'{path}' is not an MLflow model directory (no MLmodel file)")
    try:
        mlmodel: dict[str, Any] = yaml.safe_load(mlmodel_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInput(f"'{mlmodel_path}' is not valid YAML: {exc}") from exc
    flavors = mlmodel.get("flavors") or {}
    if not isinstance(flavors, dict):
        raise InvalidInput(f"'{mlmodel_path}': flavors must be a mapping, got {flavors!r}")
    if "onnx" in flavors:
        flavor, model_file = "onnx", _named(path, flavors["onnx"], "data", "model.onnx")
    elif "pytorch" in flavors:
        data = _named(path, flavors["pytorch"], "model_data", "data")
        exported = data / "model.pt2"
        flavor, model_file = (
            ("torch_export", exported) if exported.is_file() else ("torchscript", data / "model.pth")
        )
    else:
        raise InvalidInput(
            f"'{path}': no servable flavor (onnx or pytorch) in MLmodel, found {sorted(flavors)}"
        )
    if not model_file.is_file():
        raise ModelNotFound(f"'{path}': MLmodel names '{model_file.name}', which is missing")
    signature = None
    if mlmodel.get("signature"):
        from mlflow.models.signature import ModelSignature

        signature = from_mlflow(ModelSignature.from_dict(mlmodel["signature"]))
    spec = (mlmodel.get("metadata") or {}).get(METADATA_KEY)
    return Bundle(
        path=path,
        flavor=flavor,
        model_file=model_file,
        sha256=_sha256(model_file),
        signature=signature,
        transformer=Transformer.from_spec(spec) if spec else None,
    )


def _named(folder: Path, flavor: Any, key: str, default: str) -> Path:
    """The file or folder a flavor names, which must lie inside the model's folder."""
    name = flavor.get(key, default) if isinstance(flavor, dict) else default
    if not isinstance(name, str):
        raise InvalidInput(f"'{folder / 'MLmodel'}': {key} must be a path, got {name!r}")
    return inside(folder, name, f"'{folder / 'MLmodel'}': {key}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
