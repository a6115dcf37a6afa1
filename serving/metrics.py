"""Prometheus metrics of the model server, served at /metrics (kserve's registry).

Labelled children are cached per (model, version, role): a label lookup per request costs more
than the counter increment itself.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "mlops_requests_total", "Inference requests answered", ["model", "version", "role", "protocol", "code"]
)
LATENCY = Histogram(
    "mlops_request_latency_seconds",
    "Inference latency from body read to response, by the version that answered",
    ["model", "version", "role"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ERRORS = Counter("mlops_request_errors_total", "Requests refused or failed", ["model", "code"])
CANARY_FALLBACKS = Counter(
    "mlops_canary_fallbacks_total",
    "Requests the canary failed on and stable answered instead",
    ["model", "version"],
)
BATCH_ROWS = Histogram(
    "mlops_batch_rows",
    "Rows per compute batch",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
SHADOW_FAILURES = Counter(
    "mlops_shadow_failures_total", "Mirrored requests the shadow version failed", ["model", "version"]
)
SHADOW_DROPPED = Counter(
    "mlops_shadow_dropped_total",
    "Mirrored requests dropped: the shadow version had MLOPS_SERVING__SHADOW_MAX_PENDING waiting",
    ["model", "version"],
)
FEEDBACK = Counter("mlops_feedback_requests_total", "POST /v1/feedback requests, by status code", ["code"])
UNKNOWN_CATEGORIES = Counter(
    "mlops_unknown_categories_total",
    "Raw categorical values a version's transformer had never seen",
    ["model", "version"],
)
NONFINITE = Counter(
    "mlops_nonfinite_results_total",
    "Computations refused because an input overflowed the model's float type or an output was not finite",
    ["model", "version"],
)
LOADED = Gauge(
    "mlops_model_loaded",
    "1 for each loaded version, by role",
    ["model", "version", "role"],
    multiprocess_mode="livemax",  # workers (serving/workers.py) load the same versions
)


@functools.lru_cache(maxsize=4096)
def requests(model: str, version: str, role: str, protocol: str, code: str) -> Counter:
    return REQUESTS.labels(model, version, role, protocol, code)


@functools.lru_cache(maxsize=1024)
def latency(model: str, version: str, role: str) -> Histogram:
    return LATENCY.labels(model, version, role)


@functools.lru_cache(maxsize=1024)
def batch_rows(model: str, version: str) -> Histogram:
    return BATCH_ROWS.labels(model, version)
