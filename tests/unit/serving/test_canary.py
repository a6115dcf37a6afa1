"""Canary analysis: each check alone, with the statistic and threshold it states."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from monitoring.events import InferenceEvent
from monitoring.logstore import get_log_store
from monitoring.statistics import jensen_shannon
from serving.canary import Thresholds, analyze
from tests.helpers import mlops_env, run_mlops

T0 = 1_790_000_000_000


def events(
    role: str,
    count: int,
    error_rate: float = 0.0,
    latency_ms: float = 2.0,
    fraud_share: float = 0.1,
    seed: int = 0,
    version: str | None = None,
    labelled: bool = True,
) -> list[InferenceEvent]:
    """``count`` requests of one role (a row each), about ``error_rate`` of them failed."""
    rng = random.Random(seed)
    made = []
    for i in range(count):
        failed = rng.random() < error_rate
        label = "fraud" if rng.random() < fraud_share else "legit"
        outputs = {"label": label, "probabilities": [0.9, 0.1]} if labelled else {}
        made.append(
            InferenceEvent(
                f"{role}{seed}-{i}-0", T0 + i, "fraud", version or ("1" if role == "stable" else "2"), role,
                f"{role}{seed}-{i}", 0, {"amount": 1.0}, {} if failed else outputs,
                latency_ms * (1 + 0.2 * rng.random()), "error" if failed else "ok", "boom" if failed else None,
            )
        )  # fmt: skip
    return made


def checks(result) -> dict[str, bool]:
    return {check.name: check.passed for check in result.checks}


def test_a_canary_like_stable_passes_every_check():
    result = analyze(events("stable", 400, 0.01, seed=1), events("canary", 400, 0.01, seed=2))
    assert result.outcome == "pass" and result.reason == ""
    assert checks(result) == {"errors": True, "latency": True, "predictions": True}
    assert result.stable.requests == result.canary.requests == 400
    assert set(result.canary.predictions) == {"fraud", "legit"}


def test_a_canary_that_fails_more_often_fails_on_errors_with_the_test_named():
    result = analyze(events("stable", 500, 0.005, seed=1), events("canary", 500, 0.10, seed=2))
    assert result.outcome == "fail" and checks(result)["errors"] is False
    [errors] = [c for c in result.checks if c.name == "errors"]
    assert errors.statistic < 0.01 and "Fisher's exact, one-sided" in errors.detail
    assert "error rate" in result.reason


def test_significance_alone_does_not_fail_a_canary_when_the_difference_is_trivial():
    # 100,000 requests each: 1.0 % against 1.3 % is "significant", and not worth a rollback.
    result = analyze(events("stable", 100_000, 0.010, seed=1), events("canary", 100_000, 0.013, seed=2))
    [errors] = [c for c in result.checks if c.name == "errors"]
    assert errors.statistic < 0.01 and errors.passed


def test_a_slow_canary_fails_on_latency():
    slow = Thresholds(p95_margin_ms=1.0)
    result = analyze(events("stable", 300, seed=1), events("canary", 300, latency_ms=5.0, seed=2), slow)
    assert result.outcome == "fail" and checks(result) == {
        "errors": True,
        "latency": False,
        "predictions": True,
    }
    [latency] = [c for c in result.checks if c.name == "latency"]
    assert 2.0 < latency.statistic < 3.0 and latency.threshold == 1.5


def test_a_canary_that_predicts_otherwise_fails_on_predictions():
    result = analyze(
        events("stable", 300, fraud_share=0.1, seed=1), events("canary", 300, fraud_share=0.8, seed=2)
    )
    assert checks(result)["predictions"] is False
    assert "Jensen-Shannon" in result.reason


def test_too_few_requests_is_insufficient_never_a_pass():
    result = analyze(events("stable", 300), events("canary", 40), Thresholds(min_requests=100))
    assert result.outcome == "insufficient" and result.checks == []
    assert "canary has 40 (at least 100 each)" in result.reason


def test_rows_of_one_request_count_once():
    stable = events("stable", 150)
    canary = [e for e in events("canary", 150) for _ in range(3)]  # three rows a request
    canary = [InferenceEvent(**{**e.__dict__, "row": i % 3}) for i, e in enumerate(canary)]
    assert analyze(stable, canary).canary.requests == 150


def test_numeric_outputs_are_binned_at_stables_deciles_and_score_vectors_by_their_largest():
    def numeric(role: str, shift: float) -> list[InferenceEvent]:
        rng = np.random.default_rng(3 if role == "stable" else 4)
        return [
            InferenceEvent(f"{role}{i}-0", T0, "m", "1", role, f"{role}-{i}", 0, {}, {"score": float(x)}, 1.0)
            for i, x in enumerate(rng.normal(shift, 1.0, 500))
        ]

    assert analyze(numeric("stable", 0.0), numeric("canary", 0.0)).outcome == "pass"
    shifted = analyze(numeric("stable", 0.0), numeric("canary", 2.0))
    assert checks(shifted)["predictions"] is False and len(shifted.stable.predictions) == 10

    def vectors(role: str, first: float) -> list[InferenceEvent]:
        return [
            InferenceEvent(
                f"{role}{i}-0", T0, "m", "1", role, f"{role}-{i}", 0, {}, {"p": [first, 1 - first]}, 1.0
            )
            for i in range(200)
        ]

    flipped = analyze(vectors("stable", 0.9), vectors("canary", 0.1))
    assert flipped.stable.predictions == {"#0": 200} and flipped.canary.predictions == {"#1": 200}
    assert checks(flipped)["predictions"] is False


@pytest.mark.parametrize(
    ("p", "q", "expected"),
    [([1, 1], [1, 1], 0.0), ([1, 0], [0, 1], 1.0), ([3, 1], [1, 3], 0.4344)],  # sqrt(0.75 log2 1.5 - 0.25)
)
def test_jensen_shannon_distance(p, q, expected):
    assert jensen_shannon(np.asarray(p, float), np.asarray(q, float)) == pytest.approx(expected, abs=1e-4)


def test_cli_analyzes_a_window_of_the_log(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    store = get_log_store(url)
    store.write(events("stable", 200, seed=1) + events("canary", 200, latency_ms=8.0, seed=2))
    run = run_mlops(
        "serve", "analyze", "fraud", "--since", "2026-09-21T00:00:00Z", "--until", "2026-09-23T00:00:00Z",
        "--stable-version", "1", "--canary-version", "2", "--store", url,
        env=mlops_env(MLOPS_STATE_DIR=str(tmp_path)),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    result = run.json
    assert result["outcome"] == "fail" and result["canary"]["requests"] == 200
    assert [c["name"] for c in result["checks"] if not c["passed"]] == ["latency"]
    assert json.dumps(result)  # plain JSON, for the DAG's XCom


def test_a_canary_slower_by_less_than_the_margin_passes_however_large_the_ratio():
    # 2 ms against 5 ms is 2.5x: on a p95 of a few milliseconds that is noise, not a regression.
    result = analyze(events("stable", 300, seed=1), events("canary", 300, latency_ms=5.0, seed=2))
    [latency] = [c for c in result.checks if c.name == "latency"]
    assert latency.statistic > 1.5 and latency.passed and "5 ms slower" in latency.detail
