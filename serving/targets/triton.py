"""A version on KServe's Triton runtime: a Triton model repository, published next to the version.

Triton serves a model repository, not an MLflow model: ``<repository>/<model>/config.pbtxt`` and
``<repository>/<model>/1/model.onnx`` (or ``model.pt``), the model's name being its folder's.
KServe's storage initializer downloads the predictor's ``storageUri`` to /mnt/models, which the
``kserve-tritonserver`` runtime serves. So a model whose policy says ``runtime: triton`` gets,
when a version is deployed to a ``kserve://`` target, that repository written next to the version
in the artifact store (``<version uri>-triton-<model>``), once: the version's ONNX graph (a
scikit-learn, XGBoost or LightGBM version: its ONNX conversion, checked against the native model
as the model server checks it), and a config naming its tensors, batched by Triton's dynamic
batcher up to the model server's batch size. The config is written last: its presence means the
repository is whole. A version with a transformer spec keeps the transformer component in front
(raw features in, V2 tensors to Triton); one without answers Triton's V2 only.

A TorchScript version goes to Triton's libtorch backend, which takes tensors by position
(``<name>__<index>``): its config is read from what the loaded version answers to a row of zeros,
and the transformer component renames the tensors both ways (``--indexed_tensors``). An exported
program (pt2) cannot go: libtorch loads TorchScript only.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from common.errors import BackendRefused, BackendUnavailable, InvalidInput

if TYPE_CHECKING:
    from serving.bundle import Bundle

TRITON_RUNTIME = "kserve-tritonserver"
_LIBTORCH = 'platform: "pytorch_libtorch"'
_VERSION_FOLDER = "1"  # Triton's version policy serves the newest folder: the repository holds one
# Triton's data types, by numpy dtype (kind and size, as ``dtype.str`` has them after the byte
# order): TorchScript's answers come as arrays, ONNX's element types through their numpy dtype.
_TRITON_TYPES = {
    "f4": "TYPE_FP32",
    "f8": "TYPE_FP64",
    "f2": "TYPE_FP16",
    "i8": "TYPE_INT64",
    "i4": "TYPE_INT32",
    "i2": "TYPE_INT16",
    "i1": "TYPE_INT8",
    "u1": "TYPE_UINT8",
    "b1": "TYPE_BOOL",
    "O": "TYPE_STRING",
}
_POSITION = re.compile(r"__\d+$")  # a positional tensor name's index


def repository_uri(uri: str, model: str) -> str:
    """Where the version's Triton repository for ``model`` lives: next to the version."""
    return f"{uri.rstrip('/')}-triton-{model}"


Tensor = tuple[str, str, list[int]]  # name, Triton data type, dims


def model_config(model: str, onnx_file: Path, max_batch_size: int) -> str:
    """``config.pbtxt`` for an ONNX graph: its inputs and outputs by name, type and shape. When
    every tensor's first dimension is free (the batch), Triton batches requests together up to
    ``max_batch_size``; else the shapes are given whole and Triton does not batch."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    found: dict[str, list[Tensor]] = {"input": [], "output": []}
    for section, tensors in (
        ("input", [t for t in graph.input if t.name not in initializers]),
        ("output", graph.output),
    ):
        for tensor in tensors:
            kind = tensor.type.tensor_type
            try:
                triton = _triton_type(onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type))
            except KeyError:  # an element type numpy has no dtype for
                triton = None
            if triton is None:
                raise InvalidInput(
                    f"model '{model}': tensor '{tensor.name}' has ONNX element type {kind.elem_type}, which this"
                    " Triton config does not map; serve it with runtime mlops"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
            found[section].append((tensor.name, triton, dims))
    batched = all(dims and dims[0] == -1 for _, _, dims in found["input"] + found["output"])
    if batched:
        found = {section: [(n, t, dims[1:]) for n, t, dims in tensors] for section, tensors in found.items()}
    return _render(model, 'backend: "onnxruntime"', max_batch_size if batched else 0, found)


def torchscript_config(model: str, bundle: Bundle, max_batch_size: int) -> str:
    """``config.pbtxt`` for a TorchScript version, which names no shapes: the version is loaded and
    answers one row of zeros, and its tensors as they come (the transformer's output, if it has
    one) give the config. Triton's libtorch backend takes tensors by position, named
    ``<name>__<index>``; rows are the first dimension (the model server batches them so too)."""
    from serving.model import VersionModel

    version = VersionModel(model, "triton", bundle)
    version.load()
    feeds, answers = version.tensors()
    found = {
        section: [
            (indexed(name, index), _array_type(model, name, array), list(array.shape[1:]))
            for index, (name, array) in enumerate(arrays.items())
        ]
        for section, arrays in (("input", feeds), ("output", answers))
    }
    return _render(model, _LIBTORCH, max_batch_size, found)


def indexed(name: str, index: int) -> str:
    """A tensor's name as Triton's libtorch backend takes it: by position."""
    return f"{name}__{index}"


def unindexed(name: str) -> str:
    """A positional tensor name (``indexed``) without its index: the tensor's own name."""
    return _POSITION.sub("", name)


def _triton_type(dtype: Any) -> str | None:
    return _TRITON_TYPES.get(dtype.str.lstrip("<>=|"))


def _array_type(model: str, name: str, array: Any) -> str:
    triton = _triton_type(array.dtype)
    if triton is None:
        raise InvalidInput(
            f"model '{model}': tensor '{name}' is {array.dtype}, which this Triton config does not map;"
            " serve it with runtime mlops"
        )
    return triton


def _render(model: str, runs_on: str, max_batch_size: int, found: dict[str, list[Tensor]]) -> str:
    lines = [f'name: "{model}"', runs_on, f"max_batch_size: {max_batch_size}"]
    for section in ("input", "output"):
        entries = []
        for name, kind, dims in found[section]:
            # A tensor of one value per row: Triton wants a dimension, the graph has none.
            shape = (
                f"dims: [ {', '.join(map(str, dims))} ]" if dims else "dims: [ 1 ] reshape: { shape: [ ] }"
            )
            entries.append(f'  {{ name: "{name}" data_type: {kind} {shape} }}')
        lines += [f"{section} [", ",\n".join(entries), "]"]
    if max_batch_size:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Repository:
    """A version's Triton repository: where, and whether its tensors go by position (TorchScript)."""

    uri: str
    indexed: bool = False

    @property
    def model_format(self) -> str:
        return "pytorch" if self.indexed else "onnx"


def publish(model: str, uri: str, max_batch_size: int) -> Repository:
    """Write the version's Triton repository for ``model`` next to it (once) and return it. The
    version must be in S3 (where the artifact store keeps it, and where KServe reads it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from serving.bundle import read_bundle
    from serving.sources import fetch, s3_client

    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        raise InvalidInput(
            f"model '{model}' runs on Triton (runtime: triton): its repository is written next to the version,"
            f" which needs an s3:// version URI, got '{uri}'"
        )
    repository = repository_uri(uri, model)
    bucket, prefix = parsed.netloc, urlparse(repository).path.strip("/")
    config_key = f"{prefix}/{model}/config.pbtxt"
    client, endpoint = s3_client()
    try:
        try:  # published before: the config is written last
            written = client.get_object(Bucket=bucket, Key=config_key)["Body"].read().decode()
            return Repository(repository, _LIBTORCH in written)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        bundle = read_bundle(fetch(uri, Path(tempfile.gettempdir()) / "mlops-kserve-target", tracking_uri=""))
        if bundle.flavor == "onnx":
            config, file_name = model_config(model, bundle.model_file, max_batch_size), "model.onnx"
        elif bundle.flavor == "torchscript":
            config, file_name = torchscript_config(model, bundle, max_batch_size), "model.pt"
        else:
            raise InvalidInput(
                f"model '{model}': Triton's libtorch backend loads TorchScript, not an exported program (pt2);"
                f" '{uri}' is {bundle.flavor}: set the model's runtime to mlops, or log the version as ONNX"
            )
        client.upload_file(str(bundle.model_file), bucket, f"{prefix}/{model}/{_VERSION_FOLDER}/{file_name}")
        client.put_object(Bucket=bucket, Key=config_key, Body=config.encode())
    except ClientError as exc:
        raise BackendRefused(
            f"S3 ({endpoint or 'AWS'}) refused the Triton repository '{repository}': {exc}"
        ) from exc
    except BotoCoreError as exc:
        raise BackendUnavailable(
            f"S3 ({endpoint or 'AWS'}) is unreachable for '{repository}': {exc}"
        ) from exc
    return Repository(repository, bundle.flavor == "torchscript")
