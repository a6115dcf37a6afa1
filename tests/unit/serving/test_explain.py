from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.errors import InvalidInput
from serving.explain import explain


def additive(inputs):
    x = inputs["x"]
    return {"y": 2.0 * x[:, 0] + x[:, 1] - 0.0 * x[:, 2]}


def test_additive_model_gets_its_exact_contributions():
    inputs = {"x": np.asarray([[1.5, -2.0, 9.0]], dtype=np.float32)}
    result = explain(additive, inputs, None, permutations=8)
    (row,) = result["explanations"]
    assert row["attributions"] == pytest.approx({"x[0]": 3.0, "x[1]": -2.0, "x[2]": 0.0})
    assert (row["prediction"], row["baseline_prediction"]) == pytest.approx((1.0, 0.0))
    assert result["model_evaluations"] == 8 * 4


def test_attributions_add_up_to_prediction_minus_baseline(mlp):
    inputs = mlp.decoder.v1({"instances": [[0.3 * i - 2 for i in range(16)], [1.0] * 16]})
    result = explain(mlp.compute, inputs, None, permutations=16)
    for row in result["explanations"]:
        total = sum(row["attributions"].values())
        assert total == pytest.approx(row["prediction"] - row["baseline_prediction"], abs=1e-4)
        assert row["target_index"] in (0, 1) and len(row["attributions"]) == 16


def test_raw_features_are_explained_by_name_with_the_predicted_label(fraud):
    inputs = fraud.decoder.v1({"instances": [{"amount": 400.0, "age_days": 2, "country": "US"}]})
    (row,) = explain(fraud.compute, inputs, fraud.transformer, permutations=16)["explanations"]
    assert set(row["attributions"]) == {"amount", "age_days", "country"}
    predicted = fraud.v1_predictions(fraud.compute(inputs))[0]
    assert row["label"] == predicted["label"]
    assert row["prediction"] == pytest.approx(predicted["probabilities"][row["label"]], abs=1e-6)
    assert sum(row["attributions"].values()) == pytest.approx(
        row["prediction"] - row["baseline_prediction"], abs=1e-4
    )


def test_a_chosen_target_class_is_explained(fraud):
    inputs = fraud.decoder.v1({"instances": [{"amount": 10.0, "age_days": 2, "country": "FR"}]})
    (row,) = explain(fraud.compute, inputs, fraud.transformer, target=0)["explanations"]
    assert (row["label"], row["target_index"]) == ("legit", 0)


def test_bad_target_and_too_many_rows_are_refused(mlp):
    with pytest.raises(InvalidInput, match="target 5 is not an output index"):
        explain(mlp.compute, mlp.decoder.v1({"instances": [[0.0] * 16]}), None, target=5)
    with pytest.raises(InvalidInput, match="at most 16 per request"):
        explain(mlp.compute, {"input": np.zeros((17, 16), np.float32)}, None)


def test_kserve_explain_handler_returns_the_explanation(fraud):
    decoded = asyncio.run(fraud.preprocess({"instances": [{"amount": 10.0, "age_days": 2, "country": "FR"}]}))
    body = asyncio.run(fraud.postprocess(asyncio.run(fraud.explain(decoded))))
    assert body["method"] == "shapley-permutation-sampling" and body["model_version"] == "3"
