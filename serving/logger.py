"""The inference logger: every predicted row to the log store, off the request path, without loss.

Two halves, in two processes, so that writing the log never takes the model server's CPU (its
GIL) from answering requests:

- ``InferenceLogger``, in the model server: the request path makes the payload of each answered
  request (``monitoring.events.answered_payload``) with a single orjson call (its times, model,
  role, request id and outputs), followed by the request body the server read, as it came: no
  second encoding of the decoded inputs, no event id; and appends the line to a bounded in-memory
  queue (no I/O, no lock). The line is made in C (``serving/_lines.c``: the same bytes in one call,
  no Python frame; a third fewer instructions than in Python), or in Python where that module was
  not built. The request path does as little as it can; the rest is the writer's. A thread
  hands the queue over to the writer process through a pipe every ``flush_ms``, numbering the
  answered requests of each hand-over (their event ids: the same lines sent again give the same
  ids; answered requests have a queue of their own, so their count is the queue's length), writes
  the lines from where they lie (``os.writev``: no copy of them joined), and reads back the
  writer's counters for ``/metrics``. If the queue is full, records are
  dropped and counted (``mlops_log_events_dropped_total``): the request path never waits.
- ``LogWriter``, in its own process (``python -m serving.logger``, started and restarted by the
  logger): keeps each hand-over of answered requests as it came, one ``AnsweredBatch`` (their
  event ids a range; one regular expression over it finds each line's time, rows and model, no
  parse per request), and writes them in batches (``batch_events`` rows) to the store, which keeps
  a hand-over as one record (the embedded store: requests are read, and rows expanded, when a
  window is asked for) or expands it to one document per row (the search stores). So the writer's
  CPU per request is a small share of one regular expression and of one insert, whatever the size
  of the request body (about 2 µs, against 7 µs with a parse and an insert per request). It runs
  on CPU time nothing else wants while it
  keeps up, and takes its (niced) share when it falls behind (``CpuPriority``). When the
  store is down or slow, batches go to a durable local spool instead (the same lines, fsynced per
  batch) and are replayed, oldest first, when the store answers again; while the spool
  holds anything, new batches queue behind it, so events reach the store in order. Stores keep the
  first write of an event id, so a replay that overlaps what was already stored adds nothing twice.

What can be lost: on a clean stop (SIGTERM) nothing: the queue goes to the writer, which drains
to the store or the spool before it exits. If the model server crashes, what it had not handed
over yet: at most one flush interval of traffic (``flush_ms``, 200 ms by default); what the writer
had received it still writes (it ignores signals and stops at the end of its input). If the
writer crashes, what it had read and not yet stored and what sat in the pipe: about two flush
intervals of traffic while it keeps up (a hand-over it dies reading is sent again to the next
writer).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from common.errors import BackendUnavailable
from monitoring.events import (
    SCHEMA_VERSION,
    AnsweredBatch,
    Feedback,
    InferenceEvent,
    InferenceRequest,
    LoggedRequest,
    MalformedEvent,
    logged_answer,
    plain,
)
from monitoring.logstore import LogStore

try:  # the request path's line made in C (serving/_lines.c), where it was built
    from serving import _lines
except ImportError:  # pragma: no cover - the same line, made in Python
    _lines = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
REPORT_EVERY_S = 1.0  # the writer's counts to the model server's /metrics
PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
WRITER_NICENESS = 10  # the writer process's CPU priority below the model server's (see main)

# What the spool replays through: (requests, labels, single events of the first spool layout,
# batches of answered requests).
Writer = Callable[[list[LoggedRequest], list[Feedback], list[InferenceEvent], list[AnsweredBatch]], None]
Item = LoggedRequest | AnsweredBatch | list[Feedback]  # what the writer stores

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
#   b"a" + an answered request's payload (monitoring.events.answered_payload: a JSON head, a tab,
#        the request body as it came, its newlines made spaces)
#   b"i" + JSON [prefix, first]: the "a" lines that follow have the event ids prefix + hex(first),
#        prefix + hex(first + 1), ... (the forwarder sends one before each hand-over)
#   b"r" + JSON [event_id, ts_ms, model, version, role, request_id, rows] + b"\t" + payload
#   b"f" + JSON [feedback, ...]
# orjson escapes tabs and newlines inside strings, so the first tab splits "a" and "r" lines, and
# a newline ends every line (JSON whitespace is the only place a body can hold one). The writer
# keeps a run of "a" lines as it came, one batch (AnsweredBatch; see PipeReader), and passes an
# "r" line's payload on unread: the embedded store keeps both as they are. The spool holds what
# the pipe does: "i" lines and their "a" lines, "r" and "f" lines.


def encode(item: Item) -> bytes:
    """The lines of an item, as in the pipe (and the spool)."""
    if isinstance(item, LoggedRequest):
        return _request_line(item[:7], item.body)
    if isinstance(item, AnsweredBatch):
        return b"i%b\n%b" % (orjson.dumps([item.source, item.first]), item.body)
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


# The newline before a line that is not an answered request's: one pass over a hand-over finds
# where its run of "a" lines ends (three finds, one per other kind, took 6 times as long on lines
# of 1.6 KB).
_OTHER_LINE = re.compile(rb"\n[^a]")


class PipeReader:
    """The writer's side of the pipe: the items of its lines, with the event ids of answered requests.

    ``feed`` takes whatever the pipe held (the writer empties it in one read, so the model server's
    next hand-over finds room for all of it) and returns the items of its whole lines: a run of
    "a" lines is one AnsweredBatch, kept as it came (no parse per request: one regular expression
    over the run finds its times, rows and models), or, if a line of it is not of the current
    layout, a request per line. ``read`` takes one line. An id line is no item. An "a" line takes
    the next id whether it is readable or not, so the lines after it keep their ids when a
    hand-over is sent again.
    """

    def __init__(self) -> None:
        self._prefix = f"{uuid.uuid4().hex[:12]}w"  # until the first id line (the logger sends one first)
        self._next = 0
        self.rest = b""  # the start of a line whose end has not come yet

    def feed(self, data: bytes) -> list[Item]:
        data = self.rest + data if self.rest else data
        end = data.rfind(b"\n") + 1
        data, self.rest = data[:end], data[end:]
        items: list[Item] = []
        at = 0
        while at < end:
            if data.startswith(b"a", at):
                other = _OTHER_LINE.search(data, at)  # where the run of "a" lines ends
                stop = other.start() + 1 if other else end
                items += self._answered(data[at:stop])
            else:
                stop = data.index(b"\n", at) + 1
                items += self._items([data[at : stop - 1]])
            at = stop
        return items

    def _answered(self, lines: bytes) -> list[Item]:
        """A run of "a" lines: one batch; if a line of another layout is among them, it is read on
        its own and the lines around it make batches (so a line goes to the same place however the
        pipe was cut: a hand-over sent again is stored once)."""
        batch = AnsweredBatch.scan(self._prefix, self._next, lines)
        if batch is not None:
            self._next += batch.count
            return [batch]
        items: list[Item] = []
        run: list[bytes] = []
        for line in lines[:-1].split(b"\n"):
            if AnsweredBatch.scan(self._prefix, 0, line + b"\n") is not None:
                run.append(line + b"\n")
                continue
            items += self._answered(b"".join(run)) if run else []
            items += self._items([line])
            run = []
        return items + (self._answered(b"".join(run)) if run else [])

    def _items(self, lines: list[bytes]) -> list[Item]:
        items = []
        for line in lines:
            try:
                item = self._item(line)
            except MalformedEvent as exc:
                log.error("skipping an unreadable record from the model server: %s", exc)
                continue
            if item is not None:
                items.append(item)
        return items

    def read(self, line: bytes) -> Item | None:
        """The item of one line, with its newline (one without was cut short: MalformedEvent)."""
        if not line.endswith(b"\n"):
            if line.startswith(b"a"):
                self._next += 1  # its number is taken all the same
            raise MalformedEvent("a log line cut short")
        return self._item(line[:-1])

    def _item(self, line: bytes) -> Item | None:
        """The item of a line without its newline."""
        kind = line[:1]
        if kind == b"a":
            number, self._next = self._next, self._next + 1
            return logged_answer(f"{self._prefix}{number:x}", line[1:])  # the payload as it came
        if kind == b"i":
            try:
                prefix, first = orjson.loads(line[1:])
                if not isinstance(prefix, str) or not isinstance(first, int):
                    raise TypeError(f"{prefix!r}, {first!r}")
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                raise MalformedEvent(f"unreadable event id line: {exc!r}") from exc
            self._prefix, self._next = prefix, first
            return None
        return decode(line + b"\n")


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

    def append(self, items: Sequence[Item]) -> None:
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
                    [i for i in part if isinstance(i, AnsweredBatch)],
                )
            path.unlink()
            self.events = max(0, self.events - _events(items))


# What a spool file holds: what the pipe does; single events in a file of the first layout.
SpoolItem = Item | InferenceEvent


def _read(path: Path) -> list[SpoolItem]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    if path.suffix != ".jsonl":
        pipe = PipeReader()
        items: list[SpoolItem] = [*pipe.feed(data)]
        if pipe.rest:
            log.error("spool %s: skipping a line cut short (by a crash?)", path)
        return items
    items = []
    for line in io.BytesIO(data):  # lines end at b"\n" only, and keep it
        try:
            items.append(_decode_legacy(line))
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
        item.rows if isinstance(item, LoggedRequest | AnsweredBatch)
        else 1 if isinstance(item, InferenceEvent)
        else len(item)
        for item in items
    )  # fmt: skip


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
        self._pending: collections.deque[Item] = collections.deque()
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
        self._reported: dict[str, int] = {}
        self._reported_at = -REPORT_EVERY_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> None:
        self._pending.append(item)

    @property
    def backlog(self) -> int:
        """Items submitted and not yet written (to the store or the spool)."""
        return len(self._pending)

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
                self._deliver([], [], [])  # nothing new: try to empty the spool
            self._publish()
            if stopping:
                self._drain()  # what arrived while the last batch was written
                self._publish(final=True)
                return

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            requests: list[LoggedRequest] = []
            feedback: list[Feedback] = []
            batches: list[AnsweredBatch] = []
            size = 0  # in events
            while pending and size < self._batch_events:
                item = pending.popleft()
                if isinstance(item, AnsweredBatch):
                    batches.append(item)
                    size += item.rows
                elif isinstance(item, LoggedRequest):
                    requests.append(item)
                    size += item.rows
                else:
                    feedback += item
                    size += len(item)
            self._deliver(requests, feedback, batches)

    def _deliver(
        self, requests: list[LoggedRequest], feedback: list[Feedback], batches: list[AnsweredBatch]
    ) -> None:
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
                self._to_spool(requests, feedback, batches)
                return
        elif not self._store_up and now < self._next_retry:
            self._to_spool(requests, feedback, batches)
            return
        try:
            self._write(requests, feedback, (), batches)
            self._up()
        except BackendUnavailable as exc:
            self._down(exc)
            self._to_spool(requests, feedback, batches)

    def _to_spool(
        self, requests: list[LoggedRequest], feedback: list[Feedback], batches: list[AnsweredBatch]
    ) -> None:
        items: list[Item] = [*batches, *requests]
        self.spool.append([*items, feedback] if feedback else items)
        self.stats["spooled"] += _events(items)

    def _write(
        self,
        requests: list[LoggedRequest],
        feedback: list[Feedback],
        events: Sequence[InferenceEvent] = (),
        batches: Sequence[AnsweredBatch] = (),
    ) -> None:
        results = [self.store.write_batches(batches)] if batches else []
        if requests:
            results.append(self.store.write_requests(requests))
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

    def _publish(self, final: bool = False) -> None:
        """Report the counts when they have changed, at most every ``REPORT_EVERY_S``: each report
        wakes a thread of the model server, which takes the GIL from the request path."""
        self.stats["spool_events"] = self.spool.events
        self.stats["store_up"] = int(self._store_up)
        if self._report is None or self.stats == self._reported:
            return
        now = time.monotonic()
        if final or now - self._reported_at >= REPORT_EVERY_S:
            self._reported, self._reported_at = dict(self.stats), now
            self._report(self._reported)


class InferenceLogger:
    """The model server's side: queue on the request path, hand over to the writer process."""

    def __init__(
        self,
        command: Sequence[str],
        queue_events: int = 100_000,
        flush_ms: float = 200.0,
        native: bool = True,
    ) -> None:
        self._command = list(command)
        self._pending: collections.deque[bytes] = collections.deque()  # answered requests' lines
        self._others: collections.deque[bytes] = collections.deque()  # failed requests', labels'
        self._capacity = queue_events
        self._flush_s = flush_ms / 1000
        # Answered requests' event ids: this process's prefix and a count of those handed over.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._numbered = 0
        self._native: Any = None
        if native and _lines is None:
            log.warning("inference log: serving._lines was not built (no C compiler?): lines made in Python")
        elif native:
            # The same line in one call of a C method, no Python frame: it replaces the method below.
            self._native = _lines.Lines(
                self._pending, queue_events, SCHEMA_VERSION, orjson.dumps, plain,
                orjson.OPT_SERIALIZE_NUMPY, DROPPED.inc,
            )  # fmt: skip
            self.answered = self._native.answered  # type: ignore[method-assign]
        self._set_wall_offset()
        self._reported = {"written": 0, "spooled": 0, "rejected": 0}
        self._stop = threading.Event()
        self._process = self._spawn()
        self._forwarder = threading.Thread(target=self._forward, name="log-forwarder", daemon=True)
        self._forwarder.start()

    # --- the request path: one encode, one append -----------------------------------------

    def answered(
        self,
        started: float,
        ended: float,
        model: str,
        version: str,
        role: str,
        request_id: str,
        protocol: str,
        body: bytes,
        row_input: str | None,
        outputs: Mapping[str, Any],
    ) -> None:
        """An answered request: ``started`` and ``ended`` its ``time.perf_counter()`` on arrival and
        once answered (the server's latency metric reads the same clock once for both), ``body``
        the request body as it came (``protocol`` v1 or v2; ``row_input`` the input V1 rows of
        plain values belong to), ``outputs`` one array per output, a row each."""
        pending = self._pending
        rows = len(next(iter(outputs.values()), ()))  # the batcher's slices: a row each
        if len(pending) >= self._capacity:
            DROPPED.inc(rows)
            return
        # JSON whitespace (a newline inside a string is escaped): a line per request. 10 is b"\n"'s
        # value: ``b"\n" in body`` first tries its argument as an int, and makes and drops a
        # TypeError with a formatted message on every call (callgrind: ~1,500 instructions).
        if 10 in body:
            body = body.replace(b"\n", b" ")
        # answered_payload, inline (each call costs on the request path): the same bytes.
        head = orjson.dumps(
            (SCHEMA_VERSION, ended + self._wall_offset, ended - started, rows, model, version, role,
             request_id, protocol, row_input, outputs),
            default=plain,
            option=orjson.OPT_SERIALIZE_NUMPY,
        )  # fmt: skip
        pending.append(b"a%b\t%b\n" % (head, body))

    def log(self, request: InferenceRequest) -> None:
        """A request whose inputs were decoded here (a failed request, a shadow's answer)."""
        if len(self._others) >= self._capacity:
            DROPPED.inc(request.rows)
            return
        self._others.append(encode_request(request))

    def feedback(self, items: list[Feedback]) -> bool:
        """Queue labels; False when the queue is full (the caller answers 503 and the client retries)."""
        if len(self._others) >= self._capacity:
            return False
        self._others.append(encode(items))
        return True

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._others)

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

    def _set_wall_offset(self) -> None:
        """Wall-clock time less perf_counter's, set again at every hand-over: an answered request's
        time is its perf_counter plus this, one clock read on the request path instead of two (the
        C line maker keeps its own copy)."""
        self._wall_offset = time.time() - time.perf_counter()
        if self._native is not None:
            self._native.wall_offset = self._wall_offset

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        # A hand-over (200 ms of traffic: some 700 KB at 10,000 requests/s) in a few writes, so
        # the writer wakes a few times for it, not once per 64 KB (the default pipe): each wake can
        # take the core the model server was answering on. As large as Linux lets a process make it.
        with contextlib.suppress(OSError, AttributeError):
            assert process.stdin is not None
            fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        threading.Thread(target=self._read_reports, args=(process,), name="log-reports", daemon=True).start()
        return process

    def _forward(self) -> None:
        while True:
            stopping = self._stop.wait(self._flush_s)
            self._set_wall_offset()  # a wall clock set meanwhile
            pending, others = self._pending, self._others
            lines = [pending.popleft() for _ in range(len(pending))]
            answered = len(lines)  # one line each, first: their ids are numbered in this order
            lines += [others.popleft() for _ in range(len(others))]
            QUEUE_DEPTH.set(len(pending) + len(others))
            if lines:
                first, self._numbered = self._numbered, self._numbered + answered
                self._send([b"i%b\n" % orjson.dumps([self._id_prefix, first]), *lines])
            if stopping:
                return

    def _send(self, lines: list[bytes]) -> None:
        """One hand-over: its id line, then its lines, from where they lie (no copy of them joined)."""
        for _ in range(2):
            try:
                assert self._process.stdin is not None
                _write_all(self._process.stdin.fileno(), lines)
                return
            except (OSError, ValueError) as exc:  # the writer died: a new one replays its spool
                log.error("log writer (pid %s) is gone (%s); starting another", self._process.pid, exc)
                WRITER_RESTARTS.inc()
                self._process = self._spawn()
        DROPPED.inc(len(lines) - 1)

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


class CpuPriority:
    """The writer process's CPU priority: idle while it keeps up, its niced share when it falls behind.

    Idle (Linux's SCHED_IDLE): the writer runs only on CPU time nothing else wants, and any thread
    of the model server that wakes takes its core at once. Under the normal policy, even niced, a
    writer woken on the core the server is answering on holds it for a slice: the server's p99 at
    concurrency 1 went from 0.14 to 1.3 ms. When it falls behind, it takes its niced fair share
    until it has caught up, so that a machine busy to the last cycle slows it down instead of
    starving it until the model server's queue fills and drops events. Behind: a quarter of the
    pipe unread, or 20 batches waiting for the store, at every check for ``patience`` checks in a
    row (a hand-over arrives all at once: a moment over is normal). Caught up: under a 16th of the
    pipe and 10 batches.
    """

    def __init__(self, backlog: Callable[[], tuple[int, int]], batch_events: int, patience: int = 4) -> None:
        self._backlog = backlog  # (bytes unread in the pipe, items waiting for the store)
        self._batch = max(1, batch_events)
        self._patience = patience
        self._over = 0  # checks in a row with a backlog
        self.idle: bool | None = None
        # Leaving SCHED_IDLE takes CAP_SYS_NICE or an RLIMIT_NICE that allows the writer's nice
        # value; where it is not allowed (a container's unprivileged user), the writer stays niced.
        self.usable = _leaves_idle()
        if not self.usable:
            log.info("log writer: CPU priority stays niced (SCHED_IDLE could not be left again here)")

    def update(self) -> None:
        if not self.usable:
            return
        unread, waiting = self._backlog()
        over = unread > PIPE_BYTES // 4 or waiting > 20 * self._batch
        self._over = self._over + 1 if over else 0
        if self.idle is None:  # the first check: start idle
            self._set(idle=True)
        elif self.idle and self._over >= self._patience:
            log.info("log writer behind (%d bytes unread, %d waiting): taking its CPU share", unread, waiting)
            self._set(idle=False)
        elif not self.idle and unread < PIPE_BYTES // 16 and waiting <= 10 * self._batch:
            log.info("log writer caught up: leaving the CPU to others again")
            self._set(idle=True)

    def follow(self, every_s: float = 0.05) -> None:
        """Check the backlog every ``every_s``, for good (in a thread of the writer process)."""
        while True:
            self.update()
            time.sleep(every_s)

    def _set(self, idle: bool) -> None:
        policy = getattr(os, "SCHED_IDLE", None) if idle else getattr(os, "SCHED_OTHER", None)
        if policy is not None:
            for thread in os.listdir("/proc/self/task"):  # the policy is each thread's own
                with contextlib.suppress(OSError, ValueError):
                    os.sched_setscheduler(int(thread), policy, os.sched_param(0))
        self.idle = idle


def _leaves_idle() -> bool:
    """Whether a thread of this process can go SCHED_IDLE and come back (tried on a thread of its own)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            result.append(False)
            return
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="log-priority-probe")
    thread.start()
    thread.join()
    return result == [True]


IOV_MAX = 1024  # buffers per writev (Linux)


def _write_all(fd: int, buffers: list[bytes]) -> None:
    """Write the buffers to ``fd`` in order, a writev per ``IOV_MAX`` of them."""
    for start in range(0, len(buffers), IOV_MAX):
        part = buffers[start : start + IOV_MAX]
        sent = os.writev(fd, part)
        if sent < sum(map(len, part)):  # cut short (a signal): the rest in plain writes
            rest = memoryview(b"".join(part))[sent:]
            while rest:
                rest = rest[os.write(fd, rest) :]


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


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
    from common.settings import load_settings
    from monitoring.logstore import get_log_store

    settings = load_settings()
    out = sys.stdout.buffer

    def report(stats: dict[str, int]) -> None:
        out.write(orjson.dumps(stats) + b"\n")
        out.flush()

    logs = settings.logs
    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    writer = LogWriter(store, settings.serving_dir / "spool", logs.batch_events, logs.flush_ms, report=report)
    priority = CpuPriority(lambda: (_unread(sys.stdin.fileno()), writer.backlog), logs.batch_events)
    threading.Thread(target=priority.follow, name="log-priority", daemon=True).start()
    pipe = PipeReader()
    while chunk := sys.stdin.buffer.read1(PIPE_BYTES):  # all the pipe holds, in one read
        for item in pipe.feed(chunk):
            writer.submit(item)
    if pipe.rest:
        log.error("skipping a record cut short at the end of the model server's input")
    writer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
