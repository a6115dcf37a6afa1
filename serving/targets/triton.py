"""A version on KServe's Triton runtime: a Triton model repository, published next to the version.

Triton serves a model repository, not an MLflow model: ``<repository>/<model>/config.pbtxt`` and
``<repository>/<model>/1/model.onnx``, the model's name being its folder's. KServe's storage
initializer downloads the predictor's ``storageUri`` to /mnt/models, which the
``kserve-tritonserver`` runtime serves. So a model whose policy says ``runtime: triton`` gets,
when a version is deployed to a ``kserve://`` target, that repository written next to the version
in the artifact store (``<version uri>-triton-<model>``), once: the version's ONNX graph (a
scikit-learn, XGBoost or LightGBM version: its ONNX conversion, checked against the native model
as the model server checks it), and a config naming its tensors, batched by Triton's dynamic
batcher up to the model server's batch size. The config is written last: its presence means the
repository is whole. A version with a transformer spec keeps the transformer component in front
(raw features in, V2 tensors to Triton); one without answers Triton's V2 only.

Only ONNX goes to Triton here: a PyTorch version stays on this project's runtime (Triton's
libtorch backend takes TorchScript with its own tensor naming; not done).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import urlparse

from common.errors import BackendRefused, BackendUnavailable, InvalidInput

TRITON_RUNTIME = "kserve-tritonserver"
TRITON_FORMAT = "onnx"
_VERSION_FOLDER = "1"  # Triton's version policy serves the newest folder: the repository holds one
# ONNX element types (onnx.TensorProto) as Triton's data types.
_TYPES = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
}


def repository_uri(uri: str, model: str) -> str:
    """Where the version's Triton repository for ``model`` lives: next to the version."""
    return f"{uri.rstrip('/')}-triton-{model}"


def model_config(model: str, onnx_file: Path, max_batch_size: int) -> str:
    """``config.pbtxt`` for an ONNX graph: its inputs and outputs by name, type and shape. When
    every tensor's first dimension is free (the batch), Triton batches requests together up to
    ``max_batch_size``; else the shapes are given whole and Triton does not batch."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [t for t in graph.input if t.name not in initializers]
    tensors = [("input", t) for t in inputs] + [("output", t) for t in graph.output]
    shapes = {}
    for _, tensor in tensors:
        kind = tensor.type.tensor_type
        if kind.elem_type not in _TYPES:
            raise InvalidInput(
                f"model '{model}': tensor '{tensor.name}' has ONNX element type {kind.elem_type}, which this"
                " Triton config does not map; serve it with runtime mlops"
            )
        shapes[tensor.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    batched = all(shape and shape[0] == -1 for shape in shapes.values())
    lines = [
        f'name: "{model}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size if batched else 0}",
    ]
    for section in ("input", "output"):
        entries = []
        for _, tensor in (pair for pair in tensors if pair[0] == section):
            dims = shapes[tensor.name][1:] if batched else shapes[tensor.name]
            # A tensor of one value per row: Triton wants a dimension, the graph has none.
            shape = (
                f"dims: [ {', '.join(map(str, dims))} ]" if dims else "dims: [ 1 ] reshape: { shape: [ ] }"
            )
            entries.append(
                f'  {{ name: "{tensor.name}" data_type: {_TYPES[tensor.type.tensor_type.elem_type]} {shape} }}'
            )
        lines += [f"{section} [", ",\n".join(entries), "]"]
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def publish(model: str, uri: str, max_batch_size: int) -> str:
    """Write the version's Triton repository for ``model`` next to it (once) and return its URI.
    The version must be in S3 (where the artifact store keeps it, and where KServe reads it)."""
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
        client.head_object(Bucket=bucket, Key=config_key)
        return repository  # published before (the config is written last)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise BackendUnavailable(f"S3 ({endpoint or 'AWS'}) refused '{repository}': {exc}") from exc
    except BotoCoreError as exc:
        raise BackendUnavailable(
            f"S3 ({endpoint or 'AWS'}) is unreachable for '{repository}': {exc}"
        ) from exc
    cache = Path(tempfile.gettempdir()) / "mlops-kserve-target"
    bundle = read_bundle(fetch(uri, cache, tracking_uri=""))
    if bundle.flavor != "onnx":
        raise InvalidInput(
            f"model '{model}': runtime triton serves ONNX versions (and scikit-learn, XGBoost, LightGBM ones,"
            f" converted); '{uri}' is {bundle.flavor}: set the model's runtime to mlops"
        )
    config = model_config(model, bundle.model_file, max_batch_size)
    try:
        client.upload_file(str(bundle.model_file), bucket, f"{prefix}/{model}/{_VERSION_FOLDER}/model.onnx")
        client.put_object(Bucket=bucket, Key=config_key, Body=config.encode())
    except ClientError as exc:
        raise BackendRefused(
            f"S3 ({endpoint or 'AWS'}) refused the Triton repository '{repository}': {exc}"
        ) from exc
    except BotoCoreError as exc:
        raise BackendUnavailable(
            f"S3 ({endpoint or 'AWS'}) is unreachable for '{repository}': {exc}"
        ) from exc
    return repository
