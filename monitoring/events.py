"""The inference event: one record per predicted row, the input of monitoring and retraining.

Defined once, here, with a schema version. Serving writes events (through serving/logger.py) and
ground-truth labels that arrive later (``Feedback``, keyed by request id and row); the log stores
keep both; monitoring and retraining read them back by model and time window.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "error")


class MalformedEvent(ValueError):
    """A stored record that is not a valid event (a reader skips it and counts it)."""


@dataclass(frozen=True)
class InferenceEvent:
    event_id: str  # unique; a store keeps the first write of an id, so a replay never duplicates
    ts_ms: int  # when the prediction was answered, epoch milliseconds (UTC)
    model: str
    version: str
    role: str  # stable | canary | shadow
    request_id: str
    row: int  # the row's position in its request
    inputs: dict[str, Any]  # named features as the application sent them (raw, before any transform)
    outputs: dict[str, Any]  # named outputs as returned (label, scores, ...)
    latency_ms: float  # of the whole request the row came in
    status: str = "ok"
    error: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "ts_ms": self.ts_ms,
            "model": self.model,
            "version": self.version,
            "role": self.role,
            "request_id": self.request_id,
            "row": self.row,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceEvent:
        """Parse a stored record; anything that does not fit raises MalformedEvent."""
        try:
            version = int(data.get("schema_version", 0))
            if version != SCHEMA_VERSION:
                raise MalformedEvent(f"schema_version {version} is not {SCHEMA_VERSION}")
            event = cls(
                event_id=str(data["event_id"]),
                ts_ms=int(data["ts_ms"]),
                model=str(data["model"]),
                version=str(data["version"]),
                role=str(data["role"]),
                request_id=str(data["request_id"]),
                row=int(data["row"]),
                inputs=dict(data["inputs"]),
                outputs=dict(data["outputs"]),
                latency_ms=float(data["latency_ms"]),
                status=str(data.get("status", "ok")),
                error=data.get("error"),
                schema_version=version,
            )
        except MalformedEvent:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"not an inference event: {exc!r}") from exc
        if event.status not in STATUSES:
            raise MalformedEvent(f"status {event.status!r} is not one of {STATUSES}")
        return event


@dataclass(frozen=True)
class Feedback:
    """A ground-truth label for one predicted row, joined to its event by (request_id, row)."""

    request_id: str
    row: int
    label: Any
    ts_ms: int = field(default_factory=lambda: now_ms())

    @property
    def key(self) -> str:
        return f"{self.request_id}:{self.row}"

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "row": self.row, "label": self.label, "ts_ms": self.ts_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feedback:
        try:
            return cls(str(data["request_id"]), int(data["row"]), data["label"], int(data["ts_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"not a feedback record: {exc!r}") from exc


@dataclass(frozen=True)
class Labelled:
    """An event with the label that came back for it (None while none has)."""

    event: InferenceEvent
    label: Any | None


def now_ms() -> int:
    return time.time_ns() // 1_000_000
