"""Training a candidate without a registry: the splits, a short fit on the shipped digits, the
ONNX export's parity (and its refusal of a graph that differs), the metrics, the approval rule."""

from __future__ import annotations

import numpy as np
import pytest

from retraining.builtin import load, shift_right
from retraining.config import RetrainConfig
from retraining.pipeline import decide
from retraining.train import (
    encode,
    export_onnx,
    fit,
    metrics,
    onnx_probabilities,
    parity,
    split,
    targets,
    transformer_spec,
)
from serving.transformer import Transformer


def test_split_keeps_the_newest_traffic_out_of_training():
    sources = ["reference"] * 80 + ["traffic"] * 20
    splits = split(sources, RetrainConfig(recent_share=0.25))
    assert splits.recent == list(range(95, 100))
    everything = splits.train + splits.val + splits.test + splits.recent
    assert sorted(everything) == list(range(100))
    assert not set(splits.recent) & set(splits.train + splits.val + splits.test)


def test_a_short_fit_learns_digits_and_its_onnx_export_agrees(tmp_path):
    frame = load("digits").iloc[:600].reset_index(drop=True)
    features = [c for c in frame.columns if c != "label"]
    spec = transformer_spec(frame.iloc[:400], features, "label")
    assert spec["output"]["labels"] == [str(d) for d in range(10)]
    transformer = Transformer.from_spec(spec)
    x, y = encode(transformer, frame), targets(transformer, frame["label"])
    module, history = fit(
        x[:400], y[:400], x[400:500], y[400:500], 10, RetrainConfig(epochs=60, patience=10), lambda _: None
    )
    assert history["best_epoch"] >= 1
    path = export_onnx(module, x.shape[1], tmp_path / "model.onnx")
    check = parity(path, module, x[500:], atol=1e-4)
    assert check["passed"] and check["max_abs_diff"] <= 1e-4
    scores = metrics(onnx_probabilities(path, x[500:]), frame["label"][500:], spec["output"]["labels"])
    assert scores["accuracy"] > 0.75  # 100 rows, 400 trained on
    shifted = encode(transformer, shift_right(frame.iloc[500:]))
    worse = metrics(onnx_probabilities(path, shifted), frame["label"][500:], spec["output"]["labels"])
    assert worse["accuracy"] < scores["accuracy"] - 0.2  # the demo's drift hurts the model
    with pytest.raises(AssertionError):  # a graph whose weights moved is refused by the check
        import torch

        with torch.no_grad():
            module[0].bias += 0.5
        assert parity(path, module, x[500:], atol=1e-4)["passed"]


def test_metrics_count_a_label_the_model_lacks_as_wrong():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    scores = metrics(probabilities, ["a", "b", "c"], ["a", "b"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["log_loss"] > 5  # the unknown label's probability is taken as ~0


def test_approval_needs_the_margin_and_no_held_out_regression():
    def evaluation(candidate_recent, candidate_held, champion_recent=0.5, champion_held=0.9):
        return {"candidate": {"recent": {"rows": 100, "accuracy": candidate_recent}, "held_out": {"rows": 100, "accuracy": candidate_held}},
                "champion": {"recent": {"rows": 100, "accuracy": champion_recent}, "held_out": {"rows": 100, "accuracy": champion_held}}}  # fmt: skip

    config = RetrainConfig(margin=0.02, held_out_tolerance=0.02)
    assert decide(evaluation(0.8, 0.9), config)[0]
    assert not decide(evaluation(0.51, 0.9), config)[0]  # within the margin
    assert not decide(evaluation(0.8, 0.8), config)[0]  # worse on the held-out rows
    approved, reason = decide(evaluation(0.8, 0.9), RetrainConfig(approve="manual"))
    assert not approved and "manual" in reason
    assert not decide({"candidate": evaluation(0.8, 0.9)["candidate"], "champion": {}}, config)[0]
