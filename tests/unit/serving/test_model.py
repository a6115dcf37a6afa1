"""A version model: the transformer path, kserve's own handlers, and what loading refuses."""

from __future__ import annotations

import asyncio
import shutil

import mlflow.pytorch
import numpy as np
import pytest
import torch
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from common.errors import InvalidInput, ModelNotFound, ModelNotReady
from serving.bundle import read_bundle
from serving.model import VersionModel


def test_transformer_maps_raw_features_to_labels(fraud):
    arrays = fraud.decoder.v1(
        {
            "instances": [
                {"amount": 10.0, "age_days": 3, "country": "DE"},
                {"amount": 900, "age_days": 0, "country": "US"},
            ]
        }
    )
    outputs = fraud.compute(arrays)
    predictions = fraud.v1_predictions(outputs)
    assert [p["label"] for p in predictions] == outputs["label"].tolist()
    for p in predictions:
        assert set(p["probabilities"]) == {"legit", "fraud"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)


def test_unknown_category_is_counted_and_still_answered(fraud):
    from serving.metrics import UNKNOWN_CATEGORIES

    before = fraud.unknown_categories
    exported = UNKNOWN_CATEGORIES.labels("fraud", "3")._value.get()
    outputs = fraud.compute(fraud.decoder.v1({"instances": [{"amount": 1, "age_days": 1, "country": "ZZ"}]}))
    assert fraud.unknown_categories == before + 1
    assert UNKNOWN_CATEGORIES.labels("fraud", "3")._value.get() == exported + 1
    assert outputs["probabilities"].shape == (1, 2)


def test_kserve_v2_handlers_answer_an_infer_request(mlp):
    tensor = InferInput("input", [2, 16], "FP32", data=[0.25] * 32)
    request = InferRequest("mlp", [tensor], request_id="req-9")
    decoded = asyncio.run(mlp.preprocess(request))
    response = asyncio.run(mlp.postprocess(mlp.predict(decoded)))
    assert isinstance(response, InferResponse)
    assert (response.id, response.model_version) == ("req-9", "1")
    assert np.asarray(response.outputs[0].data).reshape(2, 2).sum(axis=1) == pytest.approx([1, 1], abs=1e-5)


def test_kserve_v1_handlers_answer_instances(mlp):
    decoded = asyncio.run(mlp.preprocess({"instances": [[0.1] * 16]}))
    assert len(asyncio.run(mlp.postprocess(mlp.predict(decoded)))["predictions"]) == 1


def test_metadata_lists_the_request_signature(fraud):
    assert [i["name"] for i in fraud.get_input_types()] == ["amount", "age_days", "country"]
    assert [o["name"] for o in fraud.get_output_types()] == ["label", "probabilities"]


def test_a_folder_without_mlmodel_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFound, match="no MLmodel file"):
        read_bundle(tmp_path)


@pytest.mark.parametrize(
    ("flavor", "key", "name"),
    [
        ("onnx", "data", "/etc/hostname"),
        ("onnx", "data", "../outside.onnx"),
        ("onnx", "data", "link.onnx"),  # a link inside that points outside
        ("pytorch", "model_data", "../.."),
    ],
)
def test_a_path_in_mlmodel_that_leads_out_of_the_model_folder_is_refused(
    mlp_dir, tmp_path, flavor, key, name
):
    import yaml

    version = tmp_path / "version"
    shutil.copytree(mlp_dir, version)
    (tmp_path / "outside.onnx").write_bytes((version / "model.onnx").read_bytes())
    (version / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    mlmodel = yaml.safe_load((version / "MLmodel").read_text())
    mlmodel["flavors"] = {flavor: {key: name}}
    (version / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(InvalidInput, match=f"{key} points outside '{version}'"):
        read_bundle(version)


def test_a_corrupt_model_file_fails_at_load_not_at_request(mlp_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mlp_dir, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelNotReady, match="cannot load"):
        VersionModel("mlp", "2", read_bundle(broken)).load()


class Scorer(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x[:, :2] * 2.0, dim=1)


SIGNATURE = ModelSignature(
    Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "features")]),
    Schema([TensorSpec(np.dtype(np.float32), (-1, 2), "scores")]),
)


@pytest.mark.parametrize(
    "fmt, flavor, module",
    [("pickle", "torchscript", lambda: torch.jit.script(Scorer())), ("pt2", "torch_export", Scorer)],
)
def test_a_pytorch_version_serves_through_its_signature(tmp_path, fmt, flavor, module):
    example = np.asarray([[1.0, 0.0, 5.0, 5.0], [0.0, 1.0, 0.0, 0.0]], dtype=np.float32)
    mlflow.pytorch.save_model(
        module(), str(tmp_path / "torch"), signature=SIGNATURE, serialization_format=fmt,
        input_example=example if fmt == "pt2" else None,
    )  # fmt: skip
    model = VersionModel("torchy", "1", read_bundle(tmp_path / "torch"))
    model.load()
    assert model.bundle.flavor == flavor
    assert model.provider in ("torch:cpu", "torch:cuda")
    outputs = model.compute(model.decoder.v1({"instances": [[1.0, 0.0, 5.0, 5.0]] * 3}))
    expected = torch.softmax(torch.tensor([[2.0, 0.0]] * 3), dim=1).numpy()
    assert outputs["scores"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InvalidInput, match="expected shape"):
        model.decoder.v1({"instances": [{"features": [1.0, 0.0]}]})


def test_a_pickled_pytorch_module_is_refused_with_the_reason(tmp_path):
    mlflow.pytorch.save_model(
        torch.nn.Linear(4, 2), str(tmp_path / "pickled"), signature=SIGNATURE, serialization_format="pickle"
    )
    with pytest.raises(ModelNotReady, match="is not a TorchScript module"):
        VersionModel("pickled", "1", read_bundle(tmp_path / "pickled")).load()


def test_a_raw_feature_the_model_overflows_on_is_refused_naming_it(fraud):
    from serving.metrics import NONFINITE

    before = NONFINITE.labels("fraud", fraud.version)._value.get()
    arrays = fraud.decoder.v1({"instances": [{"amount": 1e300, "age_days": 3, "country": "DE"}]})
    with pytest.raises(
        InvalidInput, match=r"input 'amount' value 1e\+300 is out of the range the model computes in"
    ):
        fraud.compute(arrays)
    assert NONFINITE.labels("fraud", fraud.version)._value.get() == before + 1


def test_a_non_finite_output_is_never_an_answer(mlp):
    arrays = mlp.decoder.v1({"instances": [[3e38] * 16, [0.1] * 16]})  # finite in FP32, not once multiplied
    with pytest.raises(InvalidInput, match=r"output '\w+' is not finite for input row\(s\) \[0\]"):
        mlp.compute(arrays)
    assert np.isfinite(mlp.compute(mlp.decoder.v1({"instances": [[0.1] * 16]}))["probabilities"]).all()
