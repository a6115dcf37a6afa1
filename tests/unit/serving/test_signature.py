"""Every kind of bad input is refused before compute, with a message naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InvalidInput

ROW = [0.5] * 16


def v2(data=None, **override):
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 16], "data": ROW if data is None else data}
    tensor.update(override)
    return {"inputs": [tensor]}


def test_v2_body_decodes_to_the_declared_shape(mlp):
    arrays = mlp.decoder.v2(v2(ROW * 2, shape=[2, 16]))
    assert arrays["input"].shape == (2, 16) and arrays["input"].dtype == np.float32


def test_v2_accepts_nested_data(mlp):
    assert mlp.decoder.v2(v2([ROW, ROW], shape=[2, 16]))["input"].shape == (2, 16)


@pytest.mark.parametrize(
    "body, message",
    [
        ([1, 2], "must be a JSON object"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": ["x"]}, r"inputs\[0\] must be an object"),
        (v2(name="amount"), r"'amount' is not an input of this model; expected \['input'\]"),
        (v2(datatype="FP64"), "input 'input' expected datatype FP32, got 'FP64'"),
        (v2(shape=[1, 15], data=ROW[:15]), r"expected shape \[-1, 16\], got \[1, 15\]"),
        (v2(shape="1x16"), "'shape' must be a list of non-negative integers"),
        (v2(data=ROW[:15]), "has 15 values, shape \\[1, 16\\] needs 16"),
        (v2(data=["a"] * 16), "input 'input' expected FP32 values"),
        (v2(data=[float("nan")] * 16), "NaN or infinity"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16]}]}, "'data' is missing"),
        ({"inputs": [v2()["inputs"][0], v2()["inputs"][0]]}, "given twice"),
    ],
)
def test_bad_v2_input_names_the_field(mlp, body, message):
    with pytest.raises(InvalidInput, match=message) as caught:
        mlp.decoder.v2(body)
    assert str(caught.value).startswith("model 'mlp' version 1: ")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"instances": []}, "'instances' must be a non-empty list"),
        ({"rows": [ROW]}, "'instances' must be a non-empty list"),
        ({"instances": [ROW, ROW[:3]]}, r"instances\[1\] has 3 values; input 'input' takes 16 per row"),
        ({"instances": [ROW, {"input": ROW}]}, "all lists or all objects"),
        ({"instances": [ROW] * 9}, "9 rows in one request; at most 8 are accepted"),
    ],
)
def test_bad_v1_input_names_the_problem(mlp, body, message):
    with pytest.raises(InvalidInput, match=message):
        mlp.decoder.v1(body)


def test_v1_rows_of_named_raw_features(fraud):
    arrays = fraud.decoder.v1({"instances": [{"amount": 10, "age_days": 1.5, "country": "FR"}]})
    assert arrays["amount"].dtype == np.float64 and arrays["country"].tolist() == ["FR"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"amount": 10, "age_days": 1}, r"instances\[0\] is missing input 'country'"),
        ({"amount": "ten", "age_days": 1, "country": "FR"}, "input 'amount' expected FP64 values"),
        ({"amount": 1, "age_days": 1, "country": 7}, "input 'country' expected BYTES values"),
        ({"amount": 1, "age_days": 1, "country": "FR", "colour": "red"}, r"unknown input\(s\) \['colour'\]"),
    ],
)
def test_bad_raw_features_name_the_feature(fraud, row, message):
    with pytest.raises(InvalidInput, match=message):
        fraud.decoder.v1({"instances": [row]})


def test_plain_list_rows_are_refused_when_the_model_takes_named_features(fraud):
    with pytest.raises(InvalidInput, match="rows must be objects keyed by input name"):
        fraud.decoder.v1({"instances": [[1, 2, 3]]})
