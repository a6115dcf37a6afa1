"""The Triton model configs written for KServe's Triton runtime, parsed with Triton's own proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
import tritonclient
from google.protobuf import text_format
from onnx import TensorProto, helper

from common.errors import InvalidInput
from serving.bundle import read_bundle
from serving.examples import save_framework_model, save_mlp
from serving.targets.triton import Repository, model_config, publish, repository_uri, torchscript_config


def _triton_proto():
    """Triton's ModelConfig proto, from the file alone: the ``tritonclient.grpc`` package would also
    register Triton's service protos, whose names kserve's own registered first."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _triton_proto()


def parse(text: str) -> model_config_pb2.ModelConfig:
    """Strict: a field Triton does not know, or a wrong value type, fails here."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def tensors(config_tensors) -> list[tuple[str, str, list[int], list[int] | None]]:
    return [
        (
            t.name,
            model_config_pb2.DataType.Name(t.data_type),
            list(t.dims),
            list(t.reshape.shape) if t.HasField("reshape") else None,
        )
        for t in config_tensors
    ]


def test_an_mlp_is_batched_by_triton_up_to_the_model_servers_batch_size(tmp_path):
    bundle = read_bundle(save_mlp(tmp_path / "v1", seed=1))
    config = parse(model_config("fraud", bundle.model_file, 256))
    assert (config.name, config.backend, config.max_batch_size) == ("fraud", "onnxruntime", 256)
    assert config.HasField("dynamic_batching")
    assert tensors(config.input) == [("input", "TYPE_FP32", [16], None)]
    graph = onnx.load(str(bundle.model_file)).graph
    assert [t[0] for t in tensors(config.output)] == [o.name for o in graph.output]
    assert all(t[2] and -1 not in t[2] for t in tensors(config.output))


def test_a_converted_classifier_is_served_as_its_conversion(tmp_path):
    bundle = read_bundle(save_framework_model("sklearn", tmp_path / "iris"))
    assert bundle.converted_from == "sklearn"
    config = parse(model_config("iris", bundle.model_file, 64))
    assert tensors(config.input) == [("input", "TYPE_FP32", [4], None)]
    assert tensors(config.output) == [("probabilities", "TYPE_FP32", [3], None)]  # classes: the transformer's


def test_a_tensor_of_one_value_per_row_gets_a_dimension_reshaped_away(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)],
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
    )
    path = tmp_path / "argmax.onnx"
    onnx.save(helper.make_model(graph), str(path))
    config = parse(model_config("argmax", path, 32))
    assert config.max_batch_size == 32
    assert tensors(config.output) == [("label", "TYPE_INT64", [1], [])]


def test_a_graph_with_a_fixed_batch_is_given_whole_and_not_batched(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 3])],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph), str(path))
    config = parse(model_config("fixed", path, 256))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert tensors(config.input) == [("x", "TYPE_FP64", [1, 3], None)]


def test_a_tensor_type_triton_has_no_name_for_is_refused_by_name(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "complex",
        [helper.make_tensor_value_info("x", TensorProto.COMPLEX64, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.COMPLEX64, ["n", 2])],
    )
    path = tmp_path / "complex.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(InvalidInput, match="tensor 'x' has ONNX element type 14.*runtime mlops"):
        model_config("complex", path, 256)


def test_only_an_s3_version_can_have_its_repository_published_next_to_it(tmp_path):
    assert (
        repository_uri("s3://mlflow/1/abc/artifacts/model/", "fraud")
        == "s3://mlflow/1/abc/artifacts/model-triton-fraud"
    )
    with pytest.raises(InvalidInput, match="needs an s3:// version URI, got 'gs://b/m'"):
        publish("fraud", "gs://b/m", 256)


def test_a_torchscript_version_is_described_by_what_it_answers_and_named_by_position(tmp_path):
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    class Scorer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.softmax(x[:, :2], dim=1), x.sum(dim=1)

    signature = ModelSignature(
        Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "features")]),
        Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 2), "scores"),
                TensorSpec(np.dtype(np.float32), (-1,), "total"),
            ]
        ),
    )
    mlflow.pytorch.save_model(
        torch.jit.script(Scorer()),
        str(tmp_path / "torch"),
        signature=signature,
        serialization_format="pickle",
    )
    text = torchscript_config("scorer", read_bundle(tmp_path / "torch"), 128)
    config = parse(text)
    assert 'platform: "pytorch_libtorch"' in text and config.max_batch_size == 128
    assert tensors(config.input) == [("features__0", "TYPE_FP32", [4], None)]
    assert tensors(config.output) == [
        ("scores__0", "TYPE_FP32", [2], None),
        ("total__1", "TYPE_FP32", [1], []),
    ]
    assert Repository("s3://b/m-triton-scorer", indexed=True).model_format == "pytorch"


def test_the_transformer_speaks_to_a_predictor_that_takes_tensors_by_position(tmp_path):
    import asyncio

    from kserve.protocol.infer_type import InferOutput, InferResponse

    from serving.examples import fraud_transformer
    from serving.runtime import OnnxRuntime
    from serving.transformer_model import TransformerModel

    bundle = read_bundle(save_mlp(tmp_path / "fraud", seed=3, transformer=fraud_transformer()))
    rows = {"instances": [{"amount": 42.0, "age_days": 10, "country": "US"}]}
    answers = {}
    for indexed in (False, True):
        model = TransformerModel("fraud", "5", bundle, indexed_tensors=indexed)
        headers: dict[str, str] = {}
        request = asyncio.run(model.preprocess(rows, headers))
        names = [t.name for t in request.inputs]
        assert names == (["input__0"] if indexed else ["input"])
        computed = OnnxRuntime(bundle.model_file).run({"input": request.inputs[0].as_numpy()})
        response = InferResponse(
            response_id="r",
            model_name="fraud",
            infer_outputs=[
                InferOutput(f"{name}__{i}" if indexed else name, list(array.shape), "FP32", array.tolist())
                for i, (name, array) in enumerate(computed.items())
            ],
        )
        answers[indexed] = asyncio.run(model.postprocess(response, headers))
    assert answers[True] == answers[False] and answers[True]["predictions"][0]["label"] in ("legit", "fraud")
