"""Reading the inference log as a person does: a window's summary, the newest events, retention.

The plain functions behind `mlops logs query|tail|prune`.
"""

from __future__ import annotations

import collections
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from common.errors import InvalidInput
from monitoring.events import InferenceEvent, now_ms
from monitoring.logstore import LogStore, ReadStats

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(text: str) -> int | None:
    """``1h``, ``30m``, ``2d``, ``500ms`` as milliseconds; None if it is not one."""
    match = _DURATION.match(text.strip())
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)]) if match else None


def parse_time(text: str, now: int, flag: str) -> int:
    """``1h``/``30m``/``2d`` ago, or an ISO 8601 time (UTC unless it says otherwise), as epoch ms."""
    text = text.strip()
    if (ago := duration_ms(text)) is not None:
        return now - ago
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{flag}: expected a duration like 1h, 30m, 2d or an ISO time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


@dataclass
class WindowSummary:
    model: str
    start: str
    end: str
    count: int
    errors: int
    by_version: dict[str, int]
    by_role: dict[str, int]
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    malformed_skipped: int
    events: list[dict[str, Any]] = field(default_factory=list)  # the first ``limit`` of them


def summarize(
    store: LogStore,
    model: str,
    start_ms: int,
    end_ms: int,
    version: str | None = None,
    role: str | None = None,
    limit: int = 20,
) -> WindowSummary:
    if end_ms <= start_ms:
        raise InvalidInput(
            f"the window is empty: --until ({iso(end_ms)}) is not after --since ({iso(start_ms)})"
        )
    stats = ReadStats()
    versions: collections.Counter[str] = collections.Counter()
    roles: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    errors = 0
    first: list[dict[str, Any]] = []
    for event in store.query(model, start_ms, end_ms, version, role, stats=stats):
        versions[event.version] += 1
        roles[event.role] += 1
        latencies.append(event.latency_ms)
        errors += event.status != "ok"
        if len(first) < limit:
            first.append(event.to_dict())
    latencies.sort()
    return WindowSummary(
        model=model,
        start=iso(start_ms),
        end=iso(end_ms),
        count=sum(versions.values()),
        errors=errors,
        by_version=dict(sorted(versions.items())),
        by_role=dict(sorted(roles.items())),
        latency_ms_p50=_percentile(latencies, 0.50),
        latency_ms_p99=_percentile(latencies, 0.99),
        malformed_skipped=stats.malformed,
        events=first,
    )


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def line(event: InferenceEvent) -> str:
    """One event as a terminal line."""
    shown = orjson.dumps(event.inputs).decode()
    if len(shown) > 120:
        shown = shown[:117] + "..."
    outcome = orjson.dumps(event.outputs).decode() if event.status == "ok" else f"ERROR {event.error}"
    if len(outcome) > 120:
        outcome = outcome[:117] + "..."
    return (
        f"{iso(event.ts_ms)}  {event.model} v{event.version} {event.role:<6} {event.latency_ms:7.2f} ms"
        f"  req={event.request_id} row={event.row}  {shown} -> {outcome}"
    )


def iso(ts_ms: int) -> str:
    return (
        dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def retention_cutoff(days: int) -> int:
    return now_ms() - days * _UNIT_MS["d"]
