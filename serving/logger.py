"""The inference logger: every predicted row to the log store, off the request path, without loss.

Two halves, in two processes, so that writing the log never takes the model server's CPU (its
GIL) from answering requests:

- ``InferenceLogger``, in the model server: the request path appends one encoded line per request
  (orjson, no I/O, no lock) to a bounded in-memory queue; a thread hands the queue over to the
  writer process through a pipe every ``flush_ms``, and reads back the writer's counters for
  ``/metrics``. If the queue is full, records are dropped and counted
  (``mlops_log_events_dropped_total``): the request path never waits.
- ``LogWriter``, in its own process (``python -m serving.logger``, started and restarted by the
  logger): expands records to one event per row, writes them in batches (``batch_events``) to the
  store. When the store is down or slow, batches go to a durable local spool instead (JSON lines,
  fsynced per batch) and are replayed, oldest first, when the store answers again; while the spool
  holds anything, new batches queue behind it, so events reach the store in order. Stores keep the
  first write of an event id, so a replay that overlaps what was already stored adds nothing twice.

What can be lost: on a clean stop (SIGTERM) nothing: the queue goes to the writer, which drains
to the store or the spool before it exits. If the model server crashes, what it had not handed
over yet: at most one flush interval of traffic (``flush_ms``, 200 ms by default); what the writer
had received it still writes (it ignores signals and stops at the end of its input). If the
writer crashes, the batch it was holding (at most ``batch_events``) plus what sat in the pipe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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

QUEUE_DEPTH = Gauge("mlops_log_queue_depth", "Inference records waiting to go to the log writer")
DROPPED = Counter(
    "mlops_log_events_dropped_total", "Inference records dropped because the log queue was full"
)
WRITTEN = Counter("mlops_log_events_written_total", "Events the log store accepted (new or already there)")
SPOOLED = Counter(
    "mlops_log_events_spooled_total", "Events written to the local spool while the store was away"
)
SPOOL_EVENTS = Gauge("mlops_log_spool_events", "Events in the local spool, waiting for the store")
REJECTED = Counter("mlops_log_events_rejected_total", "Events the log store refused as invalid")
STORE_UP = Gauge("mlops_log_store_up", "1 while the log store accepts writes")
WRITER_RESTARTS = Counter("mlops_log_writer_restarts_total", "Times the log writer process was restarted")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, per request
class Record:
    """One answered request, as the request path hands it over (expanded to rows later)."""

    model: str
    version: str
    role: str
    request_id: str
    event_id: str  # the request's own id; row events are <event_id>-<row>
    ts_ms: int
    latency_ms: float
    inputs: Mapping[str, Any]  # arrays on the request path, lists once decoded from the wire
    outputs: Mapping[str, Any]
    status: str = "ok"
    error: str | None = None


_RECORD_FIELDS = tuple(Record.__dataclass_fields__)


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


def _column(values: Any) -> list[Any]:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def encode(item: Record | Sequence[Feedback]) -> bytes:
    """One line of the pipe between the model server and its log writer."""
    if isinstance(item, Record):
        fields = {name: getattr(item, name) for name in _RECORD_FIELDS}  # not asdict(): it deep-copies arrays
        return orjson.dumps({"r": fields}, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    return orjson.dumps({"f": [f.to_dict() for f in item]}) + b"\n"


def _plain(value: Any) -> Any:
    # What orjson does not serialize itself: arrays of strings (object dtype), and bytes.
    if isinstance(value, np.ndarray):
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot log a {type(value).__name__}")


def decode(line: bytes) -> Record | list[Feedback]:
    item = orjson.loads(line)
    if "r" in item:
        return Record(**item["r"])
    return [Feedback.from_dict(f) for f in item["f"]]


class Spool:
    """Append-only JSON-lines files in a folder; replayed oldest first, deleted once stored."""

    def __init__(self, folder: Path, file_events: int = 20_000) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_events = file_events
        self._current: Path | None = None
        self._current_events = 0
        self.events = sum(self._lines(path) for path in self.files())

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

    @staticmethod
    def _lines(path: Path) -> int:
        with contextlib.suppress(OSError):
            return path.read_bytes().count(b"\n")
        return 0


class LogWriter:
    """Batches to the store, or to the spool while the store is away; replays the spool in order."""

    def __init__(
        self,
        store: LogStore,
        spool_dir: Path,
        batch_events: int = 500,
        flush_ms: float = 200.0,
        retry_s: float = 1.0,
        report: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.store = store
        self.spool = Spool(spool_dir)
        self._pending: collections.deque[Record | list[Feedback]] = collections.deque()
        self._batch_events = batch_events
        self._flush_s = flush_ms / 1000
        self._retry_s = retry_s
        self._report = report
        self._store_up = True
        self._next_retry = 0.0
        self.stats = {
            "written": 0,
            "spooled": 0,
            "rejected": 0,
            "spool_events": self.spool.events,
            "store_up": 1,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Record | list[Feedback]) -> None:
        self._pending.append(item)

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything submitted to the store or the spool, then stop."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self.store.close()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self._flush_s)
            self._drain()
            if self.spool.events and not stopping and time.monotonic() >= self._next_retry:
                self._deliver([], [])  # nothing new: try to empty the spool
            self._publish()
            if stopping:
                self._drain()  # what arrived while the last batch was written
                self._publish()
                return

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            events: list[InferenceEvent] = []
            feedback: list[Feedback] = []
            while pending and len(events) + len(feedback) < self._batch_events:
                item = pending.popleft()
                if isinstance(item, Record):
                    events += expand(item)
                else:
                    feedback += item
            self._deliver(events, feedback)

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
                self._to_spool(events, feedback)
                return
        elif not self._store_up and now < self._next_retry:
            self._to_spool(events, feedback)
            return
        try:
            self._write(events, feedback)
            self._up()
        except BackendUnavailable as exc:
            self._down(exc)
            self._to_spool(events, feedback)

    def _to_spool(self, events: list[InferenceEvent], feedback: list[Feedback]) -> None:
        self.spool.append(events, feedback)
        self.stats["spooled"] += len(events)

    def _write(self, events: list[InferenceEvent], feedback: list[Feedback]) -> None:
        if events:
            result = self.store.write(events)
            self.stats["written"] += result.written + result.duplicates
            if result.rejected:
                self.stats["rejected"] += len(result.rejected)
                log.error("log store rejected %d events, first: %s", len(result.rejected), result.rejected[0])
        if feedback:
            self.store.write_feedback(feedback)

    def _up(self) -> None:
        if not self._store_up:
            log.warning("log store %s is back; spool drained", self.store.url)
        self._store_up = True

    def _down(self, exc: Exception) -> None:
        if self._store_up:
            log.warning(
                "log store %s unavailable, spooling to %s: %s", self.store.url, self.spool.folder, exc
            )
        self._store_up = False
        self._next_retry = time.monotonic() + self._retry_s

    def _publish(self) -> None:
        self.stats["spool_events"] = self.spool.events
        self.stats["store_up"] = int(self._store_up)
        if self._report is not None:
            self._report(dict(self.stats))


class InferenceLogger:
    """The model server's side: queue on the request path, hand over to the writer process."""

    def __init__(self, command: Sequence[str], queue_events: int = 100_000, flush_ms: float = 200.0) -> None:
        self._command = list(command)
        self._pending: collections.deque[bytes] = collections.deque()
        self._capacity = queue_events
        self._flush_s = flush_ms / 1000
        self._reported = {"written": 0, "spooled": 0, "rejected": 0}
        self._stop = threading.Event()
        self._process = self._spawn()
        self._forwarder = threading.Thread(target=self._forward, name="log-forwarder", daemon=True)
        self._forwarder.start()

    # --- the request path: one encode, one append -----------------------------------------

    def log(self, record: Record) -> None:
        if len(self._pending) >= self._capacity:
            DROPPED.inc(len(next(iter(record.inputs.values()))) if record.inputs else 1)
            return
        self._pending.append(encode(record))

    def feedback(self, items: list[Feedback]) -> bool:
        """Queue labels; False when the queue is full (the caller answers 503 and the client retries)."""
        if len(self._pending) >= self._capacity:
            return False
        self._pending.append(encode(items))
        return True

    @property
    def depth(self) -> int:
        return len(self._pending)

    def close(self, timeout_s: float = 60.0) -> None:
        """Hand everything to the writer, let it drain to the store or the spool, wait for it."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._forwarder.join(timeout_s)
        with contextlib.suppress(OSError, ValueError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("log writer did not finish within %s s; stopping it", timeout_s)
            self._process.kill()

    # --- the hand-over thread ---------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        threading.Thread(target=self._read_reports, args=(process,), name="log-reports", daemon=True).start()
        return process

    def _forward(self) -> None:
        while True:
            stopping = self._stop.wait(self._flush_s)
            pending = self._pending
            lines = [pending.popleft() for _ in range(len(pending))]
            QUEUE_DEPTH.set(len(pending))
            if lines:
                self._send(b"".join(lines))
            if stopping:
                return

    def _send(self, data: bytes) -> None:
        for _ in range(2):
            try:
                assert self._process.stdin is not None
                self._process.stdin.write(data)
                self._process.stdin.flush()
                return
            except (OSError, ValueError) as exc:  # the writer died: a new one replays its spool
                log.error("log writer (pid %s) is gone (%s); starting another", self._process.pid, exc)
                WRITER_RESTARTS.inc()
                self._process = self._spawn()
        DROPPED.inc(data.count(b"\n"))

    def _read_reports(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                stats = orjson.loads(line)
                for key, counter in (("written", WRITTEN), ("spooled", SPOOLED), ("rejected", REJECTED)):
                    counter.inc(max(0, stats[key] - self._reported[key]))
                    self._reported[key] = stats[key]
                SPOOL_EVENTS.set(stats["spool_events"])
                STORE_UP.set(stats["store_up"])
        self._reported = {"written": 0, "spooled": 0, "rejected": 0}  # a new writer counts from 0


def main() -> int:
    """`python -m serving.logger`: the writer process. Reads records on stdin until it closes."""
    # The model server's stop (or a Ctrl-C) reaches the whole process group: the writer keeps
    # going until its input ends, so what it was handed is written, not lost.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s log-writer %(levelname)s %(message)s")
    from mlops.settings import load_settings
    from monitoring.logstore import get_log_store

    settings = load_settings()
    out = sys.stdout.buffer

    def report(stats: dict[str, int]) -> None:
        out.write(orjson.dumps(stats) + b"\n")
        out.flush()

    logs = settings.logs
    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    writer = LogWriter(store, settings.serving_dir / "spool", logs.batch_events, logs.flush_ms, report=report)
    for line in sys.stdin.buffer:
        try:
            writer.submit(decode(line))
        except (orjson.JSONDecodeError, MalformedEvent, TypeError, KeyError):
            log.error("skipping an unreadable record from the model server")
    writer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
