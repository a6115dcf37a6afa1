"""A model version on disk (an MLflow model directory), read into what the server needs.

``MLmodel`` says which flavor holds the model file (``onnx``: ``model.onnx``; ``pytorch``: an
exported program ``data/model.pt2``, MLflow 3's default, or a TorchScript ``data/model.pth``), its
signature, and the version's transformer spec (metadata).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import InvalidInput, ModelNotFound
from serving.frameworks import FLAVORS
from serving.signature import Signature, from_mlflow
from serving.sources import inside
from serving.transformer import METADATA_KEY, Transformer


@dataclass(frozen=True)
class Bundle:
    path: Path
    flavor: str  # onnx | torch_export | torchscript
    model_file: Path
    sha256: str  # of the version's own model file
    signature: Signature | None  # the MLflow signature, when the version has one
    transformer: Transformer | None
    converted_from: str | None = None  # sklearn | xgboost | lightgbm: served as its ONNX conversion
    parity: dict[str, Any] | None = None  # the conversion's check against the native model


def read_bundle(path: Path, convert: bool = True) -> Bundle:
    """The version in ``path``; a version of another framework is converted to ONNX (once: see
    serving/frameworks.py), unless ``convert`` is False (then its ``model_file`` is its own)."""
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
    elif native := next((name for name in FLAVORS if name in flavors), None):
        conf = flavors[native] if isinstance(flavors[native], dict) else {}
        key = "pickled_model" if native == "sklearn" else "data"
        flavor, model_file = native, _named(path, conf, key, "model.skops")
    else:
        raise InvalidInput(
            f"'{path}': no servable flavor (onnx, pytorch, {', '.join(FLAVORS)}) in MLmodel, found {sorted(flavors)}"
        )
    if not model_file.is_file():
        raise ModelNotFound(f"'{path}': MLmodel names '{model_file.name}', which is missing")
    signature = None
    if mlmodel.get("signature"):
        from mlflow.models.signature import ModelSignature

        signature = from_mlflow(ModelSignature.from_dict(mlmodel["signature"]))
    spec = (mlmodel.get("metadata") or {}).get(METADATA_KEY)
    bundle = Bundle(
        path=path,
        flavor=flavor,
        model_file=model_file,
        sha256=_sha256(model_file),
        signature=signature,
        transformer=Transformer.from_spec(spec) if spec else None,
    )
    if flavor not in FLAVORS or not convert:
        return bundle
    from serving.frameworks import convert as to_onnx

    columns = _columns(mlmodel.get("signature") or {})
    converted = to_onnx(path, flavor, conf, columns, bundle.sha256)
    return dataclasses.replace(
        bundle, flavor="onnx", model_file=converted.model_file, converted_from=flavor,
        transformer=Transformer.from_spec(converted.spec), parity=converted.parity,
    )  # fmt: skip


def input_example(folder: Path, where: str) -> list[Any] | None:
    """The version's input example (MLmodel's ``saved_input_example_info``) as V1 instances (a
    DataFrame's or named tensors' rows as named rows); None when it has none, InvalidInput when it
    cannot be read."""
    info = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("saved_input_example_info") or {}
    name = info.get("artifact_path")
    if not name:
        return None
    try:
        example = json.loads(inside(folder, name, f"{where}: input example").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{where}: its input example cannot be read: {exc}") from exc
    if isinstance(example, dict) and {"columns", "data"} <= example.keys():  # a DataFrame, split
        return [dict(zip(example["columns"], row, strict=False)) for row in example["data"]]
    if isinstance(example, dict):  # named tensors
        rows = len(next(iter(example.values()), []))
        return [{key: values[i] for key, values in example.items()} for i in range(rows)]
    return example


def _columns(signature: dict[str, Any]) -> list[tuple[str, str]]:
    """The (name, type) of a signature's named column inputs (what a tabular model takes)."""
    try:
        inputs = json.loads(signature.get("inputs") or "[]")
    except ValueError:
        return []
    return [(str(i["name"]), str(i.get("type", ""))) for i in inputs if isinstance(i, dict) and i.get("name")]


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
