"""Canary analysis: does the canary answer as well as stable, over one window of the inference log?

The deploy DAG's decision at each step of a ramp, as a pure function of the two roles' events
(``analyze``) and stated thresholds, so it is tested alone and explained in full:

- **errors**: the canary's error rate against stable's, one-sided Fisher's exact test on the
  requests that failed; a failure needs both significance (``p < alpha``) and a difference that
  matters (more than ``error_margin``), since on large windows every test flags trivia;
- **latency**: the ratio of the canary's p95 request latency to stable's, at most ``p95_ratio_max``,
  failing only when the canary is also more than ``p95_margin_ms`` slower (on small windows a p95 of
  a few milliseconds moves by half its value between identical versions);
- **predictions**: the Jensen-Shannon distance (base 2: 0 the same, 1 disjoint) between the two
  roles' prediction distributions, at most ``js_max``: a label (or, for a vector of scores, its
  largest position) as categories; a number in ten bins cut at stable's deciles.

Too few requests (fewer than ``min_requests`` in either role) is its own outcome,
``insufficient``: the caller decides (hold, or roll back), never a silent promote.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from monitoring.events import InferenceEvent, prediction
from monitoring.statistics import jensen_shannon

Outcome = Literal["pass", "fail", "insufficient"]


@dataclass(frozen=True)
class Thresholds:
    min_requests: int = 100  # per role, in the window
    alpha: float = 0.01  # significance of the error-rate test
    error_margin: float = 0.01  # and by how much the canary's rate must exceed stable's (absolute)
    p95_ratio_max: float = 1.5
    p95_margin_ms: float = (
        5.0  # and by how much the canary's p95 must exceed stable's (a few ms of noise is not a failure)
    )
    js_max: float = 0.2
    output: str | None = None  # which output's distribution to compare (default: label, else the first)


@dataclass(frozen=True)
class RoleFigures:
    version: str
    requests: int
    errors: int
    p95_latency_ms: float | None
    predictions: dict[str, int]  # category (or bin) -> requests

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Check:
    name: str  # errors | latency | predictions
    statistic: float | None
    threshold: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class CanaryAnalysis:
    outcome: Outcome
    stable: RoleFigures
    canary: RoleFigures
    checks: list[Check] = field(default_factory=list)
    reason: str = ""  # in words: why it did not pass


def analyze(
    stable: Iterable[InferenceEvent],
    canary: Iterable[InferenceEvent],
    thresholds: Thresholds = Thresholds(),
) -> CanaryAnalysis:
    """The canary's window against stable's (both: one model's events, each role's own)."""
    stable_requests, canary_requests = _requests(stable), _requests(canary)
    output = thresholds.output or _default_output(stable_requests + canary_requests)
    edges = _edges(stable_requests, output)
    figures = [_figures(requests, output, edges) for requests in (stable_requests, canary_requests)]
    stable_figures, canary_figures = figures
    short = [f"{role} has {f.requests}" for role, f in zip(("stable", "canary"), figures, strict=True)
             if f.requests < thresholds.min_requests]  # fmt: skip
    if short:
        reason = f"too few requests to decide: {', '.join(short)} (at least {thresholds.min_requests} each)"
        return CanaryAnalysis("insufficient", stable_figures, canary_figures, [], reason)
    checks = [
        _errors(stable_figures, canary_figures, thresholds),
        _latency(stable_figures, canary_figures, thresholds),
        _predictions(stable_figures, canary_figures, thresholds),
    ]
    failed = [check for check in checks if not check.passed]
    reason = "; ".join(check.detail for check in failed)
    return CanaryAnalysis("fail" if failed else "pass", stable_figures, canary_figures, checks, reason)


# --- the figures of one role ------------------------------------------------------------------


def _requests(events: Iterable[InferenceEvent]) -> list[InferenceEvent]:
    """One event per request (its first row): errors and latency are the request's."""
    first: dict[str, InferenceEvent] = {}
    for event in events:
        if event.request_id not in first or event.row < first[event.request_id].row:
            first[event.request_id] = event
    return list(first.values())


def _default_output(requests: list[InferenceEvent]) -> str | None:
    for event in requests:
        if event.status == "ok" and event.outputs:
            return "label" if "label" in event.outputs else next(iter(event.outputs))
    return None


def _value(event: InferenceEvent, output: str | None) -> Any:
    return prediction(event.outputs, output) if output else None


def _edges(stable: list[InferenceEvent], output: str | None) -> np.ndarray | None:
    """Stable's deciles, when the output is a number (None: categories)."""
    numbers = [v for e in stable if e.status == "ok" and isinstance(v := _value(e, output), int | float)]
    if not numbers or isinstance(numbers[0], bool):
        return None
    return np.unique(np.quantile(np.asarray(numbers, dtype=float), np.linspace(0.1, 0.9, 9)))


def _figures(requests: list[InferenceEvent], output: str | None, edges: np.ndarray | None) -> RoleFigures:
    latencies = sorted(e.latency_ms for e in requests)
    predictions: Counter[str] = Counter()
    for event in requests:
        if event.status != "ok":
            continue
        value = _value(event, output)
        if edges is not None and isinstance(value, int | float):
            predictions[f"bin {int(np.searchsorted(edges, value, side='right'))}"] += 1
        elif value is not None:
            predictions[str(value)] += 1
    versions = sorted({e.version for e in requests})
    return RoleFigures(
        version=",".join(versions),
        requests=len(requests),
        errors=sum(e.status != "ok" for e in requests),
        p95_latency_ms=latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)]
        if latencies
        else None,
        predictions=dict(sorted(predictions.items())),
    )


# --- the three checks -------------------------------------------------------------------------


def _errors(stable: RoleFigures, canary: RoleFigures, t: Thresholds) -> Check:
    from scipy.stats import fisher_exact

    table = [
        [canary.errors, canary.requests - canary.errors],
        [stable.errors, stable.requests - stable.errors],
    ]
    p_value = float(fisher_exact(table, alternative="greater").pvalue)
    worse_by = canary.error_rate - stable.error_rate
    passed = not (p_value < t.alpha and worse_by > t.error_margin)
    detail = (
        f"error rate {canary.error_rate:.2%} on the canary against {stable.error_rate:.2%} on stable"
        f" (Fisher's exact, one-sided: p = {p_value:.3g}; fails under {t.alpha} when worse by more than"
        f" {t.error_margin:.1%})"
    )
    return Check("errors", p_value, t.alpha, passed, detail)


def _latency(stable: RoleFigures, canary: RoleFigures, t: Thresholds) -> Check:
    if not stable.p95_latency_ms or canary.p95_latency_ms is None:
        return Check("latency", None, t.p95_ratio_max, True, "no latency to compare")
    ratio = canary.p95_latency_ms / stable.p95_latency_ms
    slower_ms = canary.p95_latency_ms - stable.p95_latency_ms
    detail = (
        f"p95 latency {canary.p95_latency_ms:.2f} ms on the canary against {stable.p95_latency_ms:.2f} ms"
        f" on stable ({ratio:.2f}x, {slower_ms:+.2f} ms; fails above {t.p95_ratio_max}x and"
        f" {t.p95_margin_ms:g} ms slower)"
    )
    passed = ratio <= t.p95_ratio_max or slower_ms <= t.p95_margin_ms
    return Check("latency", ratio, t.p95_ratio_max, passed, detail)


def _predictions(stable: RoleFigures, canary: RoleFigures, t: Thresholds) -> Check:
    keys = sorted(set(stable.predictions) | set(canary.predictions))
    if not keys or not sum(stable.predictions.values()) or not sum(canary.predictions.values()):
        return Check("predictions", None, t.js_max, True, "no predictions to compare")
    p = np.asarray([stable.predictions.get(k, 0) for k in keys], dtype=float)
    q = np.asarray([canary.predictions.get(k, 0) for k in keys], dtype=float)
    distance = jensen_shannon(p, q)
    detail = (
        f"prediction distributions {distance:.3f} apart (Jensen-Shannon distance, base 2; at most {t.js_max})"
    )
    return Check("predictions", distance, t.js_max, distance <= t.js_max, detail)
