"""The inference logger: every predicted row to the log store, off the request path, without loss.

Two halves, in two processes, so that writing the log never takes the model server's CPU (its
GIL) from answering requests:

- ``InferenceLogger``, in the model server: the request path encodes each request once and
  appends the line to a bounded in-memory queue (no I/O, no lock). An answered request's inputs
  are the body the server read, passed on as it came (``answered_payload``): no second encoding of
  the decoded inputs; a reader takes the columns out of the body. A thread hands the queue over
  to the writer process through a pipe every ``flush_ms``, and reads back the writer's counters
  for ``/metrics``. If the queue is full, records are dropped and counted
  (``mlops_log_events_dropped_total``): the request path never waits.
- ``LogWriter``, in its own process (``python -m serving.logger``, started and restarted by the
  logger): reads each line's header, leaves the body encoded, and writes the requests in batches
  (``batch_events`` rows) to the store, which keeps them whole (the embedded store: rows are
  expanded when read) or expands them to one document per row (the search stores). So the
  writer's CPU per request is a header parse and one insert, whatever the request's size. When the
  store is down or slow, batches go to a durable local spool instead (the same lines, fsynced per
  batch) and are replayed, oldest first, when the store answers again; while the spool
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
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from mlops.errors import BackendUnavailable
from monitoring.events import (
    Feedback,
    InferenceEvent,
    InferenceRequest,
    LoggedRequest,
    MalformedEvent,
    answered_payload,
)
from monitoring.logstore import LogStore

log = logging.getLogger(__name__)
WRITER_NICENESS = 10  # the writer process's CPU priority below the model server's (see main)

# What the spool replays through: (requests, labels, single events of the first spool layout).
Writer = Callable[[list[LoggedRequest], list[Feedback], list[InferenceEvent]], None]

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


# The pipe between the model server and its writer carries one line per item:
#   b"r" + JSON [event_id, ts_ms, model, version, role, request_id, rows] + b"\t" + payload
#   b"f" + JSON [feedback, ...]
# orjson escapes tabs and newlines inside strings, so the first tab splits a request line, and a
# newline ends every line (an answered request's body has none left: see answered_payload). The
# writer reads the header and passes the payload on unread: the embedded store keeps it as it
# is. The spool holds the same lines.


def encode(item: LoggedRequest | Sequence[Feedback]) -> bytes:
    """One line of the pipe (and of the spool)."""
    if isinstance(item, LoggedRequest):
        return _request_line(item[:7], item.body)
    return b"f%b\n" % orjson.dumps([f.to_dict() for f in item])


def encode_request(request: InferenceRequest) -> bytes:
    """``encode(request.logged())`` without the tuple in between: this runs on the request path."""
    return _request_line(request.header(), request.payload())


def _request_line(header: tuple[object, ...], body: bytes) -> bytes:
    return b"r%b\t%b\n" % (orjson.dumps(header), body)


def decode(line: bytes) -> LoggedRequest | list[Feedback]:
    """The item of one line (with its newline: one without was cut short); MalformedEvent if none."""
    if not line.endswith(b"\n"):
        raise MalformedEvent("a log line cut short")
    kind, line = line[:1], line[1:-1]
    try:
        if kind == b"r":
            header, body = line.split(b"\t", 1)
            event_id, ts_ms, model, version, role, request_id, rows = orjson.loads(header)
            return LoggedRequest(event_id, ts_ms, model, version, role, request_id, rows, body)
        if kind == b"f":
            return [Feedback.from_dict(f) for f in orjson.loads(line)]
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise MalformedEvent(f"unreadable log line: {exc!r}") from exc
    raise MalformedEvent(f"unreadable log line: kind {kind!r}")


class Spool:
    """Append-only files of pipe lines in a folder; replayed oldest first, deleted once stored.

    ``events`` counts what the spool holds in events (a request's rows, and labels). Files of the
    first layout (``spool-*.jsonl``: one JSON event or label per line) are replayed first.
    """

    def __init__(self, folder: Path, file_items: int = 20_000) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_items = file_items
        self._current: Path | None = None
        self._current_items = 0
        self.events = sum(_events(_read(path)) for path in self._replay_order())

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("spool-*.spool"))

    def _replay_order(self) -> list[Path]:
        return sorted(self.folder.glob("spool-*.jsonl")) + self.files()

    def append(self, items: Sequence[LoggedRequest | list[Feedback]]) -> None:
        if not items:
            return
        if self._current is None or self._current_items >= self._file_items or not self._current.exists():
            files = self.files()
            number = int(files[-1].stem.split("-")[1]) + 1 if files else 1
            self._current, self._current_items = self.folder / f"spool-{number:09d}.spool", 0
        with self._current.open("ab") as handle:
            handle.write(b"".join(encode(item) for item in items))
            handle.flush()
            os.fsync(handle.fileno())
        self._current_items += len(items)
        self.events += _events(items)

    def replay(self, write: Writer, chunk: int) -> None:
        """Write every spooled item through ``write``, oldest first; raises if the store fails."""
        for path in self._replay_order():
            if path == self._current:
                self._current = None  # start a new file for anything appended from now on
            items = _read(path)
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                write(
                    [i for i in part if isinstance(i, LoggedRequest)],
                    [f for i in part if isinstance(i, list) for f in i],
                    [i for i in part if isinstance(i, InferenceEvent)],
                )
            path.unlink()
            self.events = max(0, self.events - _events(items))


# What a spool file holds: requests and labels; single events in a file of the first layout.
SpoolItem = LoggedRequest | InferenceEvent | list[Feedback]


def _read(path: Path) -> list[SpoolItem]:
    items: list[SpoolItem] = []
    with contextlib.suppress(FileNotFoundError):
        for line in io.BytesIO(path.read_bytes()):  # lines end at b"\n" only, and keep it
            try:
                items.append(_decode_legacy(line) if path.suffix == ".jsonl" else decode(line))
            except MalformedEvent:
                log.error("spool %s: skipping an unreadable line (a write cut short by a crash?)", path)
    return items


def _decode_legacy(line: bytes) -> InferenceEvent | list[Feedback]:
    try:
        item = orjson.loads(line)
        return InferenceEvent.from_dict(item["e"]) if "e" in item else [Feedback.from_dict(item["f"])]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise MalformedEvent(f"unreadable spool line: {exc!r}") from exc


def _events(items: Sequence[SpoolItem]) -> int:
    """How many events: a request's rows, one per single event, one per label."""
    return sum(
        item.rows if isinstance(item, LoggedRequest) else 1 if isinstance(item, InferenceEvent) else len(item)
        for item in items
    )


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
        self._pending: collections.deque[LoggedRequest | list[Feedback]] = collections.deque()
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

    def submit(self, item: LoggedRequest | list[Feedback]) -> None:
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
            requests: list[LoggedRequest] = []
            feedback: list[Feedback] = []
            size = 0  # in events
            while pending and size < self._batch_events:
                item = pending.popleft()
                if isinstance(item, LoggedRequest):
                    requests.append(item)
                    size += item.rows
                else:
                    feedback += item
                    size += len(item)
            self._deliver(requests, feedback)

    def _deliver(self, requests: list[LoggedRequest], feedback: list[Feedback]) -> None:
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
                self._to_spool(requests, feedback)
                return
        elif not self._store_up and now < self._next_retry:
            self._to_spool(requests, feedback)
            return
        try:
            self._write(requests, feedback)
            self._up()
        except BackendUnavailable as exc:
            self._down(exc)
            self._to_spool(requests, feedback)

    def _to_spool(self, requests: list[LoggedRequest], feedback: list[Feedback]) -> None:
        self.spool.append([*requests, feedback] if feedback else requests)
        self.stats["spooled"] += _events(requests)

    def _write(
        self, requests: list[LoggedRequest], feedback: list[Feedback], events: Sequence[InferenceEvent] = ()
    ) -> None:
        results = [self.store.write_requests(requests)] if requests else []
        if events:  # only from a spool of the first layout
            results.append(self.store.write(events))
        for result in results:
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

    def answered(
        self,
        header: tuple[str, int, str, str, str, str, int],
        latency_ms: float,
        protocol: str,
        body: bytes,
        row_input: str | None,
        outputs: Mapping[str, Any],
    ) -> None:
        """An answered request: its header (``LoggedRequest``'s first seven fields), the request
        body as it came (``protocol`` v1 or v2; see ``answered_payload``) and its outputs."""
        if len(self._pending) >= self._capacity:
            DROPPED.inc(header[6])
            return
        self._pending.append(
            _request_line(header, answered_payload(latency_ms, protocol, body, row_input, outputs))
        )

    def log(self, request: InferenceRequest) -> None:
        """A request whose inputs were decoded here (a failed request, a shadow's answer)."""
        if len(self._pending) >= self._capacity:
            DROPPED.inc(request.rows)
            return
        self._pending.append(encode_request(request))

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
    # When the cores are busy, answering requests comes first: the writer catches up in the gaps
    # (the server's queue and the pipe hold what it has not read yet; a full queue drops and counts).
    with contextlib.suppress(OSError):
        os.nice(WRITER_NICENESS)
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
        except MalformedEvent:
            log.error("skipping an unreadable record from the model server")
    writer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
