"""The model server's side of the inference log: queue on the request path, hand over to the writer.

The request path makes one logged request per answer (``monitoring.events.encode_request``'s
bytes, inline: one orjson call for the head, then the request body as it came, no second encoding
of the inputs, no event id) and appends it to a bounded in-memory queue: no I/O, no lock. Every
``flush_ms`` a thread hands the queue to the writer process through a pipe: an id line first (the
requests' event ids are this process's prefix and a count of the requests handed over before, so
the same lines sent again get the same ids), then the lines from where they lie (``writev``: no
copy of them joined). The writer's counts come back on its stdout, for ``/metrics``. A full queue
drops and counts (``mlops_log_events_dropped_total``): the request path never waits.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from monitoring.events import SCHEMA_VERSION, Feedback, encode_request, plain
from serving.logger.wire import PIPE_BYTES, encode, id_line, write_all

log = logging.getLogger(__name__)

# Gauges, in the multiprocess mode of several workers: the sum of the live ones, or the worst.
QUEUE_DEPTH = Gauge(
    "mlops_log_queue_depth", "Inference records waiting to go to the log writer", multiprocess_mode="livesum"
)
DROPPED = Counter(
    "mlops_log_events_dropped_total",
    "Inference events dropped: the model server's queue full (queue_full), or the writer's queue,"
    " spool or dead letters full (writer)",
    ["reason"],
)
WRITTEN = Counter("mlops_log_events_written_total", "Events the log store accepted (new or already there)")
SPOOLED = Counter(
    "mlops_log_events_spooled_total", "Events written to the local spool while the store was away"
)
SPOOL_EVENTS = Gauge(
    "mlops_log_spool_events", "Events in the local spool, waiting for the store", multiprocess_mode="livesum"
)
REJECTED = Counter("mlops_log_events_rejected_total", "Events the log store refused one by one, as invalid")
DEAD_LETTERED = Counter(
    "mlops_log_events_dead_lettered_total",
    "Events the log store refused as a whole (credentials, a corrupt database), kept in the dead letters,"
    " by the kind of error (BackendRefused, or what nobody foresaw)",
    ["reason"],
)
MALFORMED = Counter("mlops_log_lines_malformed_total", "Lines the log writer could not read, skipped")
FEEDBACK_KEPT = Counter(
    "mlops_feedback_kept_total", "Labels not stored: their row had one already, and overwrite was not asked"
)
FEEDBACK_UNKNOWN = Counter(
    "mlops_feedback_unknown_total",
    "Labels stored for a request id the log did not hold (within the look-back)",
)
STORE_UP = Gauge("mlops_log_store_up", "1 while the log store accepts writes", multiprocess_mode="livemin")
WRITER_RESTARTS = Counter("mlops_log_writer_restarts_total", "Times the log writer process was restarted")
# The writer's counts (its report's keys) and where each goes.
_COUNTERS = {
    "written": WRITTEN,
    "spooled": SPOOLED,
    "rejected": REJECTED,
    "dropped": DROPPED.labels("writer"),
    "malformed": MALFORMED,
    "feedback_kept": FEEDBACK_KEPT,
    "feedback_unknown": FEEDBACK_UNKNOWN,
}


class InferenceLogger:
    """Queue on the request path, hand over to the writer process (``command``), restart it if it dies."""

    def __init__(self, command: Sequence[str], queue_events: int = 100_000, flush_ms: float = 200.0) -> None:
        self._command = list(command)
        self._requests: collections.deque[bytes] = collections.deque()  # logged requests' lines
        self._labels: collections.deque[bytes] = collections.deque()
        self._capacity = queue_events
        self._flush_s = flush_ms / 1000
        self._dropped = DROPPED.labels("queue_full")
        # Event ids: this process's prefix and a count of the requests handed over.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._numbered = 0
        self._set_wall_offset()
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
        queue = self._requests
        rows = len(next(iter(outputs.values()), ()))  # the batcher's slices: a row each
        if len(queue) >= self._capacity:
            self._dropped.inc(rows)
            return
        # JSON whitespace (a newline inside a string is escaped): a line per request. 10 is b"\n"'s
        # value: ``b"\n" in body`` first tries its argument as an int, and makes and drops a
        # TypeError with a formatted message on every call.
        if 10 in body:
            body = body.replace(b"\n", b" ")
        # encode_request, inline (each call costs on the request path): the same bytes.
        head = orjson.dumps(
            (SCHEMA_VERSION, ended + self._wall_offset, ended - started, rows, model, version, role,
             request_id, protocol, row_input, outputs, None),
            default=plain,
            option=orjson.OPT_SERIALIZE_NUMPY,
        )  # fmt: skip
        queue.append(b"%b\t%b\n" % (head, body))

    def failed(
        self, started: float, model: str, version: str, role: str, request_id: str, protocol: str, error: str
    ) -> None:
        """A request a version was chosen for that failed: one event with its error, no inputs."""
        if len(self._requests) >= self._capacity:
            self._dropped.inc()
            return
        ended = time.perf_counter()
        line = encode_request(
            ended + self._wall_offset, ended - started, model, version, role, request_id, protocol, b"{}",
            None, {}, error,
        )  # fmt: skip
        self._requests.append(line + b"\n")

    def feedback(self, items: list[Feedback]) -> bool:
        """Queue labels; False when the queue is full (the caller answers 503 and the client retries)."""
        if len(self._labels) >= self._capacity:
            return False
        self._labels.append(encode(items))
        return True

    @property
    def depth(self) -> int:
        return len(self._requests) + len(self._labels)

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
        """Wall-clock time less perf_counter's, set again at every hand-over: a request's time is
        its perf_counter plus this, one clock read on the request path instead of two."""
        self._wall_offset = time.time() - time.perf_counter()

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
            requests, labels = self._requests, self._labels
            lines = [requests.popleft() for _ in range(len(requests))]
            numbered = len(lines)  # one line each, first: their ids are numbered in this order
            lines += [labels.popleft() for _ in range(len(labels))]
            QUEUE_DEPTH.set(len(requests) + len(labels))
            if lines:
                first, self._numbered = self._numbered, self._numbered + numbered
                self._send([id_line(self._id_prefix, first), *lines])
            if stopping:
                return

    def _send(self, lines: list[bytes]) -> None:
        """One hand-over: its id line, then its lines, from where they lie (no copy of them joined)."""
        for _ in range(2):
            try:
                assert self._process.stdin is not None
                write_all(self._process.stdin.fileno(), lines)
                return
            except (OSError, ValueError) as exc:  # the writer died: a new one replays its spool
                log.error("log writer (pid %s) is gone (%s); starting another", self._process.pid, exc)
                WRITER_RESTARTS.inc()
                self._process = self._spawn()
        self._dropped.inc(len(lines) - 1)

    def _read_reports(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        reported = dict.fromkeys(_COUNTERS, 0)  # a new writer counts from 0
        refused: dict[str, int] = {}
        for line in process.stdout:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                stats = orjson.loads(line)
                for key, counter in _COUNTERS.items():
                    counter.inc(max(0, stats[key] - reported[key]))
                    reported[key] = stats[key]
                for reason, count in stats["dead_lettered_by"].items():
                    DEAD_LETTERED.labels(reason).inc(max(0, count - refused.get(reason, 0)))
                    refused[reason] = count
                SPOOL_EVENTS.set(stats["spool_events"])
                STORE_UP.set(stats["store_up"])
