"""The inference logger: every predicted row to the log store, off the request path, without loss.

The request path only puts one record per request on a bounded in-memory queue (no I/O, no JSON).
A writer thread takes records in batches (``batch_events`` or every ``flush_ms``), expands them to
one event per row, and writes the batch to the store. When the store is down or slow, batches go
to a durable local spool instead (JSON lines, fsynced per batch) and are replayed, oldest first,
when the store answers again; while the spool holds anything, new batches queue behind it, so
events reach the store in order. Stores keep the first write of an event id, so a replay that
overlaps what was already stored adds nothing twice.

What can be lost: on a clean stop (SIGTERM) nothing, the queue is drained to the store or the
spool. On a crash of the model server, the records still in memory: at most one flush interval of
traffic plus any backlog the writer had not taken yet (the ``mlops_log_queue_depth`` gauge shows
it). If the queue is full (the writer cannot keep up even with the local spool), new records are
dropped and counted in ``mlops_log_events_dropped_total``: the request path never waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import Counter, Gauge

from mlops.errors import BackendUnavailable
from monitoring.events import Feedback, InferenceEvent, MalformedEvent
from monitoring.logstore import LogStore

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("mlops_log_queue_depth", "Inference records waiting for the log writer")
WRITTEN = Counter("mlops_log_events_written_total", "Events the log store accepted (new or already there)")
SPOOLED = Counter(
    "mlops_log_events_spooled_total", "Events written to the local spool while the store was away"
)
SPOOL_EVENTS = Gauge("mlops_log_spool_events", "Events in the local spool, waiting for the store")
DROPPED = Counter(
    "mlops_log_events_dropped_total", "Inference records dropped because the log queue was full"
)
REJECTED = Counter("mlops_log_events_rejected_total", "Events the log store refused as invalid")
STORE_UP = Gauge("mlops_log_store_up", "1 while the log store accepts writes")


@dataclass(frozen=True)
class Record:
    """One answered request, as the request path hands it over (expanded to rows later)."""

    model: str
    version: str
    role: str
    request_id: str
    event_id: str  # the request's own id; row events are <event_id>-<row>
    ts_ms: int
    latency_ms: float
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    status: str = "ok"
    error: str | None = None


def expand(record: Record) -> list[InferenceEvent]:
    """One event per row; a failed request is one event with its error."""
    if record.status != "ok" or not record.inputs:
        return [
            InferenceEvent(
                f"{record.event_id}-0",
                record.ts_ms,
                record.model,
                record.version,
                record.role,
                record.request_id,
                0,
                {},
                {},
                record.latency_ms,
                "error",
                record.error,
            )  # fmt: skip
        ]
    rows = len(next(iter(record.inputs.values())))
    inputs = {name: _column(values) for name, values in record.inputs.items()}
    outputs = {name: _column(values) for name, values in record.outputs.items()}
    return [
        InferenceEvent(
            event_id=f"{record.event_id}-{row}",
            ts_ms=record.ts_ms,
            model=record.model,
            version=record.version,
            role=record.role,
            request_id=record.request_id,
            row=row,
            inputs={name: column[row] for name, column in inputs.items()},
            outputs={name: column[row] for name, column in outputs.items()},
            latency_ms=record.latency_ms,
        )
        for row in range(rows)
    ]


def _column(values: np.ndarray) -> list[Any]:
    if values.dtype == object:
        return [v.decode() if isinstance(v, bytes) else v for v in values.tolist()]
    return values.tolist()


class Spool:
    """Append-only JSON-lines files in a folder; replayed oldest first, deleted once stored."""

    def __init__(self, folder: Path, file_events: int = 20_000) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_events = file_events
        self._current: Path | None = None
        self._current_events = 0
        self.events = sum(self._lines(path) for path in self.files())
        SPOOL_EVENTS.set(self.events)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("spool-*.jsonl"))

    def append(self, events: list[InferenceEvent], feedback: list[Feedback]) -> None:
        if not events and not feedback:
            return
        if self._current is None or self._current_events >= self._file_events or not self._current.exists():
            files = self.files()
            number = int(files[-1].stem.split("-")[1]) + 1 if files else 1
            self._current, self._current_events = self.folder / f"spool-{number:09d}.jsonl", 0
        lines = [orjson.dumps({"e": e.to_dict()}) for e in events] + [
            orjson.dumps({"f": f.to_dict()}) for f in feedback
        ]
        with self._current.open("ab") as handle:
            handle.write(b"\n".join(lines) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._current_events += len(lines)
        self.events += len(lines)
        SPOOL_EVENTS.set(self.events)
        SPOOLED.inc(len(events))

    def replay(self, write: Callable[[list[InferenceEvent], list[Feedback]], None], chunk: int) -> None:
        """Write every spooled record through ``write``, oldest first; raises if the store fails."""
        for path in self.files():
            if path == self._current:
                self._current = None  # start a new file for anything appended from now on
            events: list[InferenceEvent] = []
            feedback: list[Feedback] = []
            for line in path.read_bytes().splitlines():
                try:
                    item = orjson.loads(line)
                    if "e" in item:
                        events.append(InferenceEvent.from_dict(item["e"]))
                    else:
                        feedback.append(Feedback.from_dict(item["f"]))
                except (orjson.JSONDecodeError, MalformedEvent, KeyError, TypeError):
                    log.error("spool %s: skipping an unreadable line (a write cut short by a crash?)", path)
                if len(events) + len(feedback) >= chunk:
                    write(events, feedback)
                    events, feedback = [], []
            write(events, feedback)
            count = self._lines(path)
            path.unlink()
            self.events = max(0, self.events - count)
            SPOOL_EVENTS.set(self.events)

    @staticmethod
    def _lines(path: Path) -> int:
        with contextlib.suppress(OSError):
            return path.read_bytes().count(b"\n")
        return 0


class InferenceLogger:
    def __init__(
        self,
        store: LogStore,
        spool_dir: Path,
        queue_events: int = 100_000,
        batch_events: int = 500,
        flush_ms: float = 200.0,
        retry_s: float = 1.0,
    ) -> None:
        self.store = store
        self.spool = Spool(spool_dir)
        self._queue: queue.Queue[Record | list[Feedback] | None] = queue.Queue(maxsize=queue_events)
        self._batch_events = batch_events
        self._flush_s = flush_ms / 1000
        self._retry_s = retry_s
        self._store_up = True
        self._next_retry = 0.0
        self._thread = threading.Thread(target=self._run, name="inference-logger", daemon=True)
        self._stopped = False
        self._thread.start()

    # --- the request path: never blocks -----------------------------------------------------

    def log(self, record: Record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            DROPPED.inc(len(next(iter(record.inputs.values()))) if record.inputs else 1)

    def feedback(self, items: list[Feedback]) -> bool:
        """Queue labels; False when the queue is full (the caller answers 503 and the client retries)."""
        try:
            self._queue.put_nowait(items)
        except queue.Full:
            return False
        return True

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain everything to the store or the spool, then stop."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        self.store.close()

    # --- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            events, feedback, stop = self._collect()
            QUEUE_DEPTH.set(self._queue.qsize())
            if events or feedback:
                self._deliver(events, feedback)
            elif self.spool.events and time.monotonic() >= self._next_retry:
                self._deliver([], [])  # nothing new: try to drain the spool
            if stop:
                return

    def _collect(self) -> tuple[list[InferenceEvent], list[Feedback], bool]:
        events: list[InferenceEvent] = []
        feedback: list[Feedback] = []
        deadline = time.monotonic() + self._flush_s
        while len(events) + len(feedback) < self._batch_events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                # Stop: take what is left without waiting, then return.
                while True:
                    try:
                        rest = self._queue.get_nowait()
                    except queue.Empty:
                        return events, feedback, True
                    if isinstance(rest, Record):
                        events += expand(rest)
                    elif rest is not None:
                        feedback += rest
            if isinstance(item, Record):
                events += expand(item)
            else:
                feedback += item
        return events, feedback, False

    def _deliver(self, events: list[InferenceEvent], feedback: list[Feedback]) -> None:
        """To the store when it is up and nothing is spooled; else behind the spool, in order."""
        now = time.monotonic()
        if self.spool.events:
            if self._store_up or now >= self._next_retry:
                try:
                    self.spool.replay(self._write, chunk=max(self._batch_events, 1000))
                    self._up()
                except BackendUnavailable as exc:
                    self._down(exc)
            if self.spool.events:  # still a backlog: new records queue behind it
                self.spool.append(events, feedback)
                return
        elif not self._store_up and now < self._next_retry:
            self.spool.append(events, feedback)
            return
        try:
            self._write(events, feedback)
            self._up()
        except BackendUnavailable as exc:
            self._down(exc)
            self.spool.append(events, feedback)

    def _write(self, events: list[InferenceEvent], feedback: list[Feedback]) -> None:
        if events:
            result = self.store.write(events)
            WRITTEN.inc(result.written + result.duplicates)
            if result.rejected:
                REJECTED.inc(len(result.rejected))
                log.error("log store rejected %d events, first: %s", len(result.rejected), result.rejected[0])
        if feedback:
            self.store.write_feedback(feedback)

    def _up(self) -> None:
        if not self._store_up:
            log.info("log store %s is back; spool drained", self.store.url)
        self._store_up = True
        STORE_UP.set(1)

    def _down(self, exc: Exception) -> None:
        if self._store_up:
            log.warning(
                "log store %s unavailable, spooling to %s: %s", self.store.url, self.spool.folder, exc
            )
        self._store_up = False
        self._next_retry = time.monotonic() + self._retry_s
        STORE_UP.set(0)
