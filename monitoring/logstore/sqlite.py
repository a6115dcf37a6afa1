"""The embedded log store: SQLite in WAL mode, a writer process per model server worker, any number of readers.

Why SQLite: WAL lets the model server's log writer write while Airflow tasks read the same file
from other processes (DuckDB allows no reader in another process while one has it open for
writing), and a committed transaction survives a crash of the writer. ``synchronous=FULL`` makes
it survive a power cut too, at one fsync per batch (the writer writes batches, so that is cheap).

Written in batches, read in rows. Table ``requests``: a batch of logged requests as the model
server wrote them (``RequestBatch``: their lines, the range of their event ids, their time range,
event count and models), one insert and no decoding however many requests it holds: that is what
keeps the log writer's CPU off the model server's cores. Table ``events``: single events written
on their own (``write``). A read selects the batches whose time range meets the window and the
single events in it (by keyset on (ts_ms, event_id)), reads the batches' requests, filters them
exactly and merges both in (ts_ms, event id) order; a window of any size is read without OFFSET.
An event id is stored once: single events by INSERT OR IGNORE, batches by the ranges of their
source already stored (a replayed batch adds nothing twice).

SQLite errors are sorted once (``_failure``): a lock held too long, or a disk that is full or
failing, is the store away (``BackendUnavailable``: the writer spools and retries); a corrupt file,
a constraint or a schema that is not ours is a refusal (``BackendRefused``: retrying cannot help).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import operator
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson

from common.errors import BackendRefused, BackendUnavailable, ConfigError, MLOpsError
from monitoring.events import (
    Feedback,
    InferenceEvent,
    Labelled,
    LoggedRequest,
    MalformedEvent,
    RequestBatch,
    RowBlock,
    event_block,
    logged_request_ids,
)
from monitoring.logstore import ReadStats, WriteResult, timeout_ms

PAGE = 2000  # single events per read
BATCH_PAGE = 500  # batches' columns per read (their bodies, up to some 2 MB each, are read one by one)
# A batch whose requests' times lie further apart is kept as single-request batches: window reads
# look back this far for a batch that began before the window.
MAX_SPAN_MS = 600_000
# A new file's pages: a batch is one record of some 200 KB to 2 MB, written a page at a time to the
# log and again at each checkpoint; 16 KB pages took the writer's CPU for a batch of 1.6 KB
# requests from 2.2 to 1.5 µs a request (SQLite's default is 4 KB).
_PAGE_BYTES = 16384
_LAYOUT = 4  # PRAGMA user_version of this layout (1 to 3 were earlier ones, which nothing reads)
_SCHEMA = """
CREATE TABLE requests (
    source TEXT NOT NULL,
    first INTEGER NOT NULL,
    count INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    ts_min_ms INTEGER NOT NULL,
    ts_max_ms INTEGER NOT NULL,
    models TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (source, first)
);
CREATE INDEX requests_by_start ON requests (ts_min_ms, source, first);
CREATE INDEX requests_by_end ON requests (ts_max_ms, source, first);
CREATE TABLE events (
    event_id TEXT NOT NULL PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX events_by_model_time ON events (model, ts_ms, event_id);
CREATE INDEX events_by_request ON events (request_id);
CREATE TABLE feedback (
    request_id TEXT NOT NULL,
    row INTEGER NOT NULL,
    label BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (request_id, row)
);
"""
_BATCH = "source, first, count, rows, ts_min_ms, ts_max_ms, models"  # a RequestBatch, but its body
_INSERT_BATCH = f"INSERT INTO requests ({_BATCH}, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_EVENT = "event_id, ts_ms, body"  # what a read of single events needs
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (event_id, ts_ms, model, version, role, request_id, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_WINDOWS = """CREATE TABLE IF NOT EXISTS monitor_windows (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, end_ms INTEGER NOT NULL, doc BLOB NOT NULL
)"""
# What a stored record that is not a readable event raises (a reader skips and counts it).
_UNREADABLE = (orjson.JSONDecodeError, MalformedEvent, TypeError, AttributeError)
# What the store is away for (retry later); any other SQLite error is a refusal.
_AWAY = ("locked", "busy", "disk i/o error", "unable to open", "disk is full", "readonly database")

# What a read merges: a single event's row (event_id, ts_ms, body), or a batch's request.
Record = tuple[Any, ...] | LoggedRequest


class SqliteLogStore:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        path = Path(parsed.path)
        if parsed.netloc or not path.is_absolute():
            raise ConfigError(f"log store '{url}': use sqlite:////absolute/path/inference.db")
        self.url = url
        self.path = path
        # How long a write waits for a lock held by another process before the store counts as away.
        self._busy_timeout_ms = timeout_ms(url, default=10_000)
        self._local = threading.local()  # one connection per thread (sqlite3 objects are not shared)
        self._windows_ready = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"log store {path} cannot be opened: {exc}") from exc
        self._create()

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None)
            db.execute(f"PRAGMA page_size = {_PAGE_BYTES}")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def _failure(self, exc: sqlite3.Error, what: str) -> MLOpsError:
        """A SQLite error as the store away (retry) or a refusal (retrying cannot help)."""
        message = f"log store {self.path}: {what} failed: {exc}"
        if isinstance(exc, sqlite3.OperationalError) and any(s in str(exc).lower() for s in _AWAY):
            return BackendUnavailable(message)
        return BackendRefused(message)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; a SQLite error sorted by ``_failure``."""
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._failure(exc, what) from exc

    def _create(self) -> None:
        """Create the tables in a new file; a file of another layout is refused, left as it is."""
        if self._scalar("PRAGMA user_version", []) == _LAYOUT:
            return
        with self._transaction("creating the tables") as db:  # another process may be creating it too
            layout = db.execute("PRAGMA user_version").fetchone()[0]
            if layout == _LAYOUT:
                return
            if layout != 0 or db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                raise ConfigError(
                    f"log store {self.path} was made by another layout (user_version {layout}, this"
                    f" one is {_LAYOUT}): move it away, or set MLOPS_LOGS__STORE to another file"
                )
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {_LAYOUT}")

    # --- writes ------------------------------------------------------------------------------

    def write(self, events: Sequence[InferenceEvent]) -> WriteResult:
        rows = [
            (e.event_id, e.ts_ms, e.model, e.version, e.role, e.request_id, orjson.dumps(e.to_dict()))
            for e in events
        ]
        with self._transaction("write") as db:
            before = db.total_changes
            db.executemany(_INSERT_EVENT, rows)
            written = db.total_changes - before
        return WriteResult(written=written, duplicates=len(rows) - written, rejected=[])

    def write_requests(self, batches: Sequence[RequestBatch]) -> WriteResult:
        """One record per batch, in one transaction. An event id already stored (a batch sent
        again after the writer died reading it, cut in other places) is kept as it was: only the
        part of a batch that no stored batch of its source holds is written. A batch whose times
        lie further apart than ``MAX_SPAN_MS`` is written a request at a time."""
        parts = [part for batch in batches for part in _narrow(batch)]
        total = sum(b.rows for b in batches)
        with self._transaction("write") as db:
            written = 0
            for part in parts:
                for new in _new_parts(db, part):
                    db.execute(_INSERT_BATCH, (*new[:6], orjson.dumps(new.models), new.body))
                    written += new.rows
        return WriteResult(written=written, duplicates=total - written, rejected=[])

    def write_feedback(self, feedback: Sequence[Feedback]) -> WriteResult:
        sql = "INSERT OR {} INTO feedback (request_id, row, label, ts_ms) VALUES (?, ?, ?, ?)"
        with self._transaction("feedback write") as db:
            before = db.total_changes
            for overwrite in (False, True):
                rows = [
                    (f.request_id, f.row, orjson.dumps(f.label), f.ts_ms)
                    for f in feedback
                    if f.overwrite is overwrite
                ]
                db.executemany(sql.format("REPLACE" if overwrite else "IGNORE"), rows)
            written = db.total_changes - before
        return WriteResult(written=written, duplicates=len(feedback) - written, rejected=[])

    # --- reads -------------------------------------------------------------------------------

    def query(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        role: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[InferenceEvent]:
        for record in self._ordered(model, start_ms, end_ms, version, role, stats):
            yield from _expand(record, stats)

    def labelled(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[Labelled]:
        records = self._ordered(model, start_ms, end_ms, version, None, stats)
        while page := list(itertools.islice(records, PAGE)):
            events = [event for record in page for event in _expand(record, stats)]
            labels = self.labels([(e.request_id, e.row) for e in events])
            for event in events:
                yield Labelled(event, labels.get((event.request_id, event.row)))

    def blocks(
        self, model: str, start_ms: int, end_ms: int, stats: ReadStats | None = None
    ) -> Iterator[RowBlock]:
        for record in self._ordered(model, start_ms, end_ms, None, None, stats):
            try:
                if isinstance(record, LoggedRequest):
                    yield record.block()
                else:
                    yield event_block(InferenceEvent.from_dict(orjson.loads(record[2])))
            except _UNREADABLE:
                if stats is not None:
                    stats.malformed += 1

    def labels(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Any]:
        wanted = set(keys)
        if not wanted:
            return {}
        found = self.request_labels(sorted({r for r, _ in wanted}))
        return {key: label for key, label in found.items() if key in wanted}

    def request_labels(self, request_ids: Sequence[str]) -> dict[tuple[str, int], Any]:
        if not request_ids:
            return {}
        sql = (
            "SELECT request_id, row, label FROM feedback WHERE request_id IN (SELECT value FROM json_each(?))"
        )
        rows = self._read(sql, [orjson.dumps(list(request_ids)).decode()])
        return {(r, row): orjson.loads(label) for r, row, label in rows}

    def known_requests(self, request_ids: Sequence[str], since_ms: int) -> set[str]:
        """Single events by their index; batches ending at ``since_ms`` or later by one regular
        expression over each (their request ids are not indexed: the writer keeps its CPU)."""
        wanted = {orjson.dumps(r): r for r in set(request_ids)}
        if not wanted:
            return set()
        sql = "SELECT DISTINCT request_id FROM events WHERE request_id IN (SELECT value FROM json_each(?))"
        found = {row[0] for row in self._read(sql, [orjson.dumps(sorted(wanted.values())).decode()])}
        batches = self._batches_in("ts_max_ms", since_ms, "1", []) if len(found) < len(wanted) else ()
        for batch in batches:
            found.update(wanted[r] for r in set(logged_request_ids(batch.body)) & wanted.keys())
            if len(found) == len(wanted):
                break
        return found

    def _ordered(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None,
        role: str | None,
        stats: ReadStats | None,
    ) -> Iterator[Record]:
        """The window's single events and batches' requests, merged in (ts_ms, event id) order.
        Both come in order of their (first) time, and nothing after a batch's start can be older
        than it, so what is older than the next start is final."""
        singles = ((row[1], (row,)) for row in self._events(model, start_ms, end_ms, version, role))
        batches = (
            (batch.ts_min_ms, _requests(batch, model, start_ms, end_ms, version, role, stats))
            for batch in self._batches(model, start_ms, end_ms)
        )
        waiting: list[tuple[int, str, Record]] = []
        for start, records in heapq.merge(singles, batches, key=operator.itemgetter(0)):
            while waiting and waiting[0][0] < start:
                yield heapq.heappop(waiting)[2]
            for record in records:
                heapq.heappush(waiting, (*_order(record), record))
        while waiting:
            yield heapq.heappop(waiting)[2]

    def _batches(self, model: str, start_ms: int, end_ms: int) -> Iterator[RequestBatch]:
        """The batches holding requests of ``model`` that may lie in the window, by first time."""
        where = (
            "ts_min_ms < ? AND ts_max_ms >= ? AND EXISTS (SELECT 1 FROM json_each(models) WHERE value = ?)"
        )
        return self._batches_in("ts_min_ms", start_ms - MAX_SPAN_MS, where, [end_ms, start_ms, model])

    def _batches_in(
        self, key: str, low: int | None, where: str, params: list[object], newest_first: bool = False
    ) -> Iterator[RequestBatch]:
        """The batches with ``key`` (ts_min_ms or ts_max_ms) at ``low`` or later that match
        ``where``, in (key, source, first) order: their columns a page at a time, by keyset on the
        index of that order (no OFFSET: a log of any number of small batches reads in one pass),
        and each body read when its batch is reached (a page of bodies could be a gigabyte)."""
        sign, order = ("<", "DESC") if newest_first else (">", "ASC")
        sql = (
            f"SELECT {_BATCH} FROM requests WHERE ({key}, source, first) {sign} (?, ?, ?) AND {where}"
            f" ORDER BY {key} {order}, source {order}, first {order} LIMIT ?"
        )
        after: list[Any] = (
            [2**62, "", 0] if newest_first else [-(2**62) if low is None else low, "", -(2**62)]
        )
        column = 5 if key == "ts_max_ms" else 4
        while True:
            page = self._read(sql, [*after, *params, BATCH_PAGE])
            for row in page:
                body = self._read(
                    "SELECT body FROM requests WHERE source = ? AND first = ?", [row[0], row[1]]
                )
                if body:  # gone since the page was read: pruned
                    yield RequestBatch(*row[:6], tuple(orjson.loads(row[6])), body[0][0])
            if len(page) < BATCH_PAGE:
                return
            after = [page[-1][column], page[-1][0], page[-1][1]]

    def _events(
        self, model: str, start_ms: int, end_ms: int, version: str | None, role: str | None
    ) -> Iterator[tuple[Any, ...]]:
        """The window's single events (``_EVENT`` columns), read a page at a time."""
        where, params = _window(model, start_ms, end_ms, version, role)
        sql = f"SELECT {_EVENT} FROM events WHERE {where} AND (ts_ms, event_id) > (?, ?) ORDER BY ts_ms, event_id LIMIT ?"
        after: list[Any] = [-(2**62), ""]
        while True:
            page = self._read(sql, [*params, *after, PAGE])
            yield from page
            if len(page) < PAGE:
                return
            after = [page[-1][1], page[-1][0]]

    def count(
        self, model: str, start_ms: int, end_ms: int, version: str | None = None, role: str | None = None
    ) -> int:
        where, params = _window(model, start_ms, end_ms, version, role)
        count = self._scalar(f"SELECT COUNT(*) FROM events WHERE {where}", params)
        for batch in self._batches(model, start_ms, end_ms):
            whole = start_ms <= batch.ts_min_ms and batch.ts_max_ms < end_ms and batch.models == (model,)
            if whole and version is None and role is None:
                count += batch.rows  # all of it: no need to read it
            else:
                count += sum(r.rows for r in _requests(batch, model, start_ms, end_ms, version, role, None))
        return count

    def models(self) -> list[str]:
        sql = (
            "SELECT model FROM events UNION SELECT value FROM requests, json_each(requests.models) ORDER BY 1"
        )
        return [r[0] for r in self._read(sql, [])]

    def latest(self, model: str | None, limit: int) -> list[InferenceEvent]:
        if limit <= 0:
            return []
        where, params = ("WHERE model = ?", [model]) if model is not None else ("", [])
        sql = f"SELECT {_EVENT} FROM events {where} ORDER BY ts_ms DESC, event_id DESC LIMIT ?"
        records: list[Record] = [*self._read(sql, [*params, limit]), *self._latest_requests(model, limit)]
        records.sort(key=_order, reverse=True)
        taken: list[list[InferenceEvent]] = []  # newest record first; each record's events in order
        found = 0
        for record in records:
            if found >= limit:
                break
            taken.append(_expand(record, None))
            found += len(taken[-1])
        return [event for events in reversed(taken) for event in events][-limit:]

    def _latest_requests(self, model: str | None, limit: int) -> list[LoggedRequest]:
        """The newest requests of the batches (of one model, or all), enough for ``limit`` events.
        Batches come newest end first; reading stops at one that ends before the ``limit``-th
        newest event found so far: nothing in it, or after it, can be newer."""
        found: list[LoggedRequest] = []
        for batch in self._batches_by_end(model):
            if _nth_newest_ts(found, limit) > batch.ts_max_ms:
                break
            found += _requests(batch, model, -(2**62), 2**62, None, None, None)
        return found

    def _batches_by_end(self, model: str | None) -> Iterator[RequestBatch]:
        """The batches (holding requests of ``model``, or all), newest end first."""
        if model is None:
            return self._batches_in("ts_max_ms", None, "1", [], newest_first=True)
        where = "EXISTS (SELECT 1 FROM json_each(models) WHERE value = ?)"
        return self._batches_in("ts_max_ms", None, where, [model], newest_first=True)

    def prune(self, older_than_ms: int) -> int:
        with self._transaction("prune") as db:
            gone = int(
                db.execute("SELECT COUNT(*) FROM events WHERE ts_ms < ?", [older_than_ms]).fetchone()[0]
            )
            sql = "SELECT COALESCE(SUM(rows), 0) FROM requests WHERE ts_max_ms < ?"
            gone += int(db.execute(sql, [older_than_ms]).fetchone()[0])
            db.execute("DELETE FROM requests WHERE ts_max_ms < ?", [older_than_ms])
            db.execute("DELETE FROM events WHERE ts_ms < ?", [older_than_ms])
            db.execute("DELETE FROM feedback WHERE ts_ms < ?", [older_than_ms])
        return gone

    def write_window(self, summary: Mapping[str, Any]) -> None:
        self._windows_table()
        row = (str(summary["id"]), str(summary["model"]), int(summary["end_ms"]), orjson.dumps(summary))
        with self._transaction("window summary write") as db:
            db.execute(
                "INSERT OR REPLACE INTO monitor_windows (id, model, end_ms, doc) VALUES (?, ?, ?, ?)", row
            )

    def windows(self, model: str, before_ms: int, limit: int) -> list[dict[str, Any]]:
        self._windows_table()
        sql = (
            "SELECT doc FROM monitor_windows WHERE model = ? AND end_ms <= ? ORDER BY end_ms DESC, id LIMIT ?"
        )
        return [orjson.loads(doc) for (doc,) in self._read(sql, [model, before_ms, limit])][::-1]

    def _windows_table(self) -> None:
        """Monitoring's window summaries: a table added to any file of this layout when first used."""
        if self._windows_ready:  # CREATE ... IF NOT EXISTS once per store, not per call
            return
        with self._transaction("creating the window summaries' table") as db:
            db.execute(_WINDOWS)
            db.execute("CREATE INDEX IF NOT EXISTS monitor_windows_end ON monitor_windows (model, end_ms)")
        self._windows_ready = True

    def refresh(self) -> None:
        """Nothing to do: a committed write is visible to every reader at once."""

    def ping(self) -> None:
        self._scalar("SELECT 1", [])
        if not os.access(self.path, os.W_OK):
            raise BackendUnavailable(f"log store {self.path} is not writable")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def _read(self, sql: str, params: list[object]) -> list[tuple[Any, ...]]:
        """The rows a read returns; a SQLite error sorted by ``_failure``."""
        try:
            return self._connect().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(exc, "read") from exc

    def _scalar(self, sql: str, params: list[object]) -> int:
        return int(self._read(sql, params)[0][0])


def _window(
    model: str, start_ms: int, end_ms: int, version: str | None, role: str | None
) -> tuple[str, list[object]]:
    """The WHERE clause selecting one model's single events in a window, of one version and role."""
    where = ["model = ?", "ts_ms >= ?", "ts_ms < ?"]
    params: list[object] = [model, start_ms, end_ms]
    for column, value in (("version", version), ("role", role)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return " AND ".join(where), params


def _narrow(batch: RequestBatch) -> list[RequestBatch]:
    """The batch, or, if its times lie further apart than ``MAX_SPAN_MS``, a batch per request."""
    if batch.ts_max_ms - batch.ts_min_ms <= MAX_SPAN_MS:
        return [batch]
    return [part for i in range(batch.count) if (part := batch.part(i, i + 1)) is not None]


def _order(record: Record) -> tuple[int, str]:
    """A record's place in the read order: (ts_ms, event id)."""
    if isinstance(record, LoggedRequest):
        return record.ts_ms, record.event_id
    return record[1], record[0]


def _nth_newest_ts(requests: list[LoggedRequest], n: int) -> float:
    """The time of the ``n``-th newest event of these requests (-inf if they hold fewer)."""
    held = 0
    for request in sorted(requests, key=_order, reverse=True):
        held += request.rows
        if held >= n:
            return request.ts_ms
    return float("-inf")


def _requests(
    batch: RequestBatch,
    model: str | None,
    start_ms: int,
    end_ms: int,
    version: str | None,
    role: str | None,
    stats: ReadStats | None,
) -> list[LoggedRequest]:
    """A batch's requests of one model (or all), in a window, of one version and role; a line
    that is no request is skipped and counted."""
    found = []
    for request in batch.requests():
        if request is None:
            if stats is not None:
                stats.malformed += 1
        elif (
            (model is None or request.model == model)
            and start_ms <= request.ts_ms < end_ms
            and (version is None or request.version == version)
            and (role is None or request.role == role)
        ):
            found.append(request)
    return found


def _new_parts(db: sqlite3.Connection, batch: RequestBatch) -> list[RequestBatch]:
    """The parts of ``batch`` that no stored batch of its source holds (the stored ones of a source
    never overlap: at most one begins before this one and reaches into it)."""
    first, stop = batch.first, batch.first + batch.count
    before = db.execute(
        "SELECT first, count FROM requests WHERE source = ? AND first <= ? ORDER BY first DESC LIMIT 1",
        [batch.source, first],
    ).fetchall()
    inside = db.execute(
        "SELECT first, count FROM requests WHERE source = ? AND first > ? AND first < ? ORDER BY first",
        [batch.source, first, stop],
    ).fetchall()
    stored = [(f, f + c) for f, c in before if f + c > first] + [(f, f + c) for f, c in inside]
    if not stored:
        return [batch]
    gaps, at = [], first
    for held_from, held_to in stored:
        if held_from > at:
            gaps.append((at, held_from))
        at = max(at, held_to)
    if at < stop:
        gaps.append((at, stop))
    return [part for a, b in gaps if (part := batch.part(a - first, b - first)) is not None]


def _expand(record: Record, stats: ReadStats | None) -> list[InferenceEvent]:
    """A record's events; a malformed record is skipped and counted, never raised to the reader."""
    try:
        if isinstance(record, LoggedRequest):
            return record.events()
        return [InferenceEvent.from_dict(orjson.loads(record[2]))]
    except _UNREADABLE:
        if stats is not None:
            stats.malformed += 1
        return []
