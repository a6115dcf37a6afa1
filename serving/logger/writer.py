"""The log writer process (``python -m serving.logger``): what the model server hands over, to the store.

It reads the pipe (``serving.logger.wire``) whole, keeps each run of logged requests as one
``RequestBatch``, and writes batches of ``batch_events`` events to the store. It survives any error
the store raises, sorted by what can be done about it:

- the store is away (``BackendUnavailable``: down, slow, locked, overloaded): batches go to the
  spool (``serving.logger.spool``, durable, capped on disk) and are replayed, oldest first, when
  it answers again; while the spool holds anything, new batches queue behind it, so events reach
  the store in order. Stores keep the first write of an event id, so a replay adds nothing twice;
- the store refuses (``BackendRefused``: bad credentials, a corrupt database, a request it cannot
  take) or fails in a way nobody foresaw: those batches go to the dead letters (the same files, in
  ``<state>/serving/dead-letter``, with the reason in ``reasons.log``), counted, and the writer
  carries on with the next;
- what it cannot keep at all (its own queue full, the spool or the dead letters at their cap) is
  dropped and counted, never blocking the model server.

Its counts go back to the model server's ``/metrics`` (a JSON line on stdout, at most once a
second). It runs on CPU time nothing else wants while it keeps up, and takes its niced share when
it falls behind (``CpuPriority``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import logging
import os
import signal
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from common.errors import BackendUnavailable
from monitoring.events import Feedback, RequestBatch, now_ms
from monitoring.logstore import LogStore, WriteResult
from serving.logger.spool import Spool, adopt, worker_folder
from serving.logger.wire import PIPE_BYTES, Item, PipeReader, events

log = logging.getLogger(__name__)
REPORT_EVERY_S = 1.0  # the writer's counts to the model server's /metrics
LOG_EVERY_S = 60.0  # the same trouble is logged again at most this often
WRITER_NICENESS = 10  # the writer process's CPU priority below the model server's (see main)
COUNTS = ("written", "spooled", "rejected", "dead_lettered", "dropped", "malformed", "feedback_kept",
          "feedback_unknown")  # fmt: skip


class LogWriter:
    """Batches to the store; behind the spool while it is away; what it refuses to the dead letters."""

    def __init__(
        self,
        store: LogStore,
        spool: Spool,
        dead_letters: Spool,
        batch_events: int = 500,
        flush_ms: float = 200.0,
        retry_s: float = 1.0,
        queue_events: int = 100_000,
        feedback_lookback_s: float = 86_400.0,
        report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.dead_letters = dead_letters
        self._pending: collections.deque[Item] = collections.deque()
        # Events submitted (by the reading thread) and taken (by the writing thread): each counter
        # has one writer, so their difference, the backlog, needs no lock.
        self._submitted = self._taken = 0
        self._delivered = 0  # events through _deliver: to the store, the spool or the dead letters
        self._delivery = threading.Condition()
        self._refused = self._dropped = 0  # events dropped: at submit (reading thread), later (writing)
        self._queue_events = queue_events
        self._batch_events = batch_events
        self._flush_s = flush_ms / 1000
        self._retry_s = retry_s
        self._lookback_ms = int(feedback_lookback_s * 1000)
        self._report = report
        self._store_up = True
        self._next_retry = 0.0
        self.stats: dict[str, Any] = dict.fromkeys(COUNTS, 0) | {"spool_events": spool.events, "store_up": 1}
        self._refusals: dict[str, int] = {}  # events dead-lettered, by the kind of error
        self._reported: dict[str, Any] = {}
        self._reported_at = -REPORT_EVERY_S
        self._logged: dict[str, float] = {}  # trouble -> when it was last logged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> int | None:
        """Queue the item; its mark for ``wait_delivered``, or None when it was dropped (queue full)."""
        held = events([item])
        if self.backlog + held > self._queue_events:
            self._refused += held
            self._trouble(
                "queue", f"dropping {held} events: the log writer's queue is full (the store is slower)"
            )
            return None
        self._pending.append(item)
        self._submitted += held
        return self._submitted

    def wait_delivered(self, mark: int, timeout_s: float) -> bool:
        """Whether everything submitted up to ``mark`` was handed to the store, the spool or the
        dead letters within ``timeout_s`` (one thread submits; waiting is for any thread)."""
        with self._delivery:
            return self._delivery.wait_for(lambda: self._delivered >= mark, timeout_s)

    @property
    def dropped(self) -> int:
        """Events dropped so far: its queue full, the spool or the dead letters at their cap."""
        return self._dropped + self._refused

    @property
    def backlog(self) -> int:
        """Events submitted and not yet written (to the store, the spool or the dead letters)."""
        return self._submitted - self._taken

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything submitted to the store or the spool, then stop."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        with contextlib.suppress(Exception):
            self.store.close()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self._flush_s)
            self._step(retry=not stopping)
            if stopping:
                self._step(retry=False)  # what arrived while the last batch was written
                self._publish(final=True)
                return

    def _step(self, retry: bool) -> None:
        try:
            self._drain()
            if retry and self.spool.events and time.monotonic() >= self._next_retry:
                self._deliver([])  # nothing new: try to empty the spool
        except Exception:  # a bug of ours: the thread must not die, the model server keeps handing over
            log.exception("log writer: unexpected error, carrying on")
        self._publish()

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            items: list[Item] = []
            size = 0  # in events
            while pending and size < self._batch_events:
                item = pending.popleft()
                held = events([item])
                self._taken += held
                items.append(item)
                size += held
            try:
                self._deliver(items)
            finally:
                with self._delivery:
                    self._delivered += size
                    self._delivery.notify_all()

    def _deliver(self, items: list[Item]) -> None:
        """To the store when it is up and nothing is spooled; else behind the spool, in order."""
        now = time.monotonic()
        if self.spool.events:
            if self._store_up or now >= self._next_retry:
                try:
                    self.spool.replay(self._store)
                    self._up()
                except BackendUnavailable as exc:
                    self._down(exc)
            if self.spool.events:  # still a backlog: new items queue behind it
                self._to_spool(items)
                return
        elif not self._store_up and now < self._next_retry:
            self._to_spool(items)
            return
        try:
            self._store(items)
            self._up()
        except BackendUnavailable as exc:
            self._down(exc)
            self._to_spool(items)

    def _store(self, items: list[Item]) -> None:
        """Write the items; raises BackendUnavailable (the caller spools them all), and sends what
        the store refuses, or fails on unforeseen, to the dead letters."""
        batches = [item for item in items if isinstance(item, RequestBatch)]
        feedback = [label for item in items if isinstance(item, list) for label in item]
        if batches:
            try:
                self._count(self.store.write_requests(batches))
            except BackendUnavailable:
                raise
            except Exception as exc:
                self._dead_letter(list(batches), exc)
        if feedback:
            try:
                result = self.store.write_feedback(feedback)
            except BackendUnavailable:
                raise
            except Exception as exc:
                self._dead_letter([feedback], exc)
                return
            self.stats["feedback_kept"] += result.duplicates
            self._count_unknown(feedback)

    def _count(self, result: WriteResult) -> None:
        self.stats["written"] += result.written + result.duplicates
        if result.rejected:
            self.stats["rejected"] += len(result.rejected)
            self._trouble(
                "rejected", f"log store rejected {len(result.rejected)} events, first: {result.rejected[0]}"
            )

    def _count_unknown(self, feedback: list[Feedback]) -> None:
        """Labels whose request id the log does not hold (within the look-back): counted, kept."""
        if self._lookback_ms <= 0:
            return
        try:
            known = self.store.known_requests([f.request_id for f in feedback], now_ms() - self._lookback_ms)
        except Exception as exc:
            self._trouble("unknown", f"could not look up the request ids of {len(feedback)} labels: {exc}")
            return
        self.stats["feedback_unknown"] += sum(f.request_id not in known for f in feedback)

    def _dead_letter(self, items: list[Item], exc: Exception) -> None:
        held = events(items)
        reason = f"{type(exc).__name__}: {exc}"
        if not self.dead_letters.append(items):
            self._drop(held, f"the dead letters are at their cap; the store refused them: {reason}")
            return
        self._refusals[type(exc).__name__] = self._refusals.get(type(exc).__name__, 0) + held
        with contextlib.suppress(OSError), (self.dead_letters.folder / "reasons.log").open("a") as out:
            out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {held} events: {reason}\n")
        self._trouble(
            type(exc).__name__,
            f"log store refused {held} events, kept in {self.dead_letters.folder}: {reason}",
        )

    def _to_spool(self, items: list[Item]) -> None:
        if not items:
            return
        held = events(items)
        if self.spool.append(items):
            self.stats["spooled"] += held
        else:
            self._drop(held, f"the spool {self.spool.folder} is at its cap ({self.spool.max_bytes} bytes)")

    def _drop(self, held: int, why: str) -> None:
        self._dropped += held
        self._trouble(why, f"dropping {held} events: {why}")

    def _trouble(self, kind: str, message: str) -> None:
        """Log it, but the same kind of trouble at most every ``LOG_EVERY_S`` (counts are in /metrics)."""
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[kind] = now
            log.error("%s", message)

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
        self.stats["dropped"] = self.dropped
        self.stats["dead_lettered_by"] = dict(self._refusals)
        self.stats["dead_lettered"] = sum(self._refusals.values())
        if self._report is None or self.stats == self._reported:
            return
        now = time.monotonic()
        if final or now - self._reported_at >= REPORT_EVERY_S:
            self._reported, self._reported_at = dict(self.stats), now
            self._report(self._reported)


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


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.logger [--worker=I/N]`: the writer process (of model server worker I of N).
    Reads the pipe on stdin until it closes."""
    parser = argparse.ArgumentParser(prog="python -m serving.logger")
    parser.add_argument("--worker", default="0/1", help="the model server worker it writes for, of how many")
    args = parser.parse_args(argv)
    index, count = (int(part) for part in args.worker.split("/"))
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

    def report(stats: dict[str, Any]) -> None:
        out.write(orjson.dumps(stats) + b"\n")
        out.flush()

    logs = settings.logs
    spool, dead_letters = (
        worker_folder(settings.serving_dir / kind, index) for kind in ("spool", "dead-letter")
    )
    if index == 0:  # what the writers of workers that no longer exist left
        for folder in (spool, dead_letters):
            adopt(folder, count)
    writer = LogWriter(
        get_log_store(settings.log_store_url, **settings.log_store_options()),
        Spool(spool, logs.spool_max_bytes),
        Spool(dead_letters, logs.spool_max_bytes),
        logs.batch_events,
        logs.flush_ms,
        queue_events=logs.queue_events,
        feedback_lookback_s=logs.feedback_lookback_s,
        report=report,
    )
    priority = CpuPriority(lambda: (_unread(sys.stdin.fileno()), writer.backlog), logs.batch_events)
    threading.Thread(target=priority.follow, name="log-priority", daemon=True).start()
    pipe = PipeReader()
    while chunk := sys.stdin.buffer.read1(PIPE_BYTES):  # all the pipe holds, in one read
        for item in pipe.feed(chunk):
            writer.submit(item)
        writer.stats["malformed"] = pipe.malformed
    if pipe.rest:
        log.error("skipping a record cut short at the end of the model server's input")
    writer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
