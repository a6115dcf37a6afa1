"""The embedded log store: SQLite in WAL mode, one writer process, any number of readers.

Why SQLite: WAL lets the model server write while Airflow tasks read the same file from other
processes (DuckDB allows no reader in another process while one has it open for writing), and a
committed transaction survives a crash of the writer. ``synchronous=FULL`` makes it survive a
power cut too, at one fsync per batch (the logger writes batches, so that is cheap).

Written in hand-overs, read in rows. Table ``batches``: a hand-over of answered requests as the
model server wrote them (``AnsweredBatch``: its lines, the range of their event ids, their time
range, event count and models), one insert and no decoding however many requests it holds: that
is what keeps the log writer's CPU off the model server's cores. Table ``records``: a whole request
(kind ``r``: the columns of its header and its payload; a failed request, one of another layout)
or a single event written on its own (kind ``e``). A read selects the window's records by keyset
on (ts_ms, key) and the hand-overs whose time range meets it, parses and filters the hand-overs'
requests exactly, and merges both in (ts_ms, event id) order; a window of any size is read without
OFFSET. An event id is stored once: records by INSERT OR IGNORE, hand-overs by the ranges of their
source already stored (a replayed batch adds nothing twice).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import operator
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson

from common.errors import BackendUnavailable, ConfigError
from monitoring.events import (
    AnsweredBatch,
    Feedback,
    InferenceEvent,
    Labelled,
    LoggedRequest,
    MalformedEvent,
    batch_requests,
)
from monitoring.logstore import ReadStats, WriteResult, timeout_ms

PAGE = 2000  # records per read
BATCH_PAGE = 8  # batches (hand-overs: some 2,000 requests each at 10,000 requests/s) per read
# A batch whose requests' times lie further apart is kept as single requests: window reads look
# back this far for a batch that began before the window.
MAX_SPAN_MS = 600_000
# A new file's pages: a hand-over is one record of some 200 KB to 2 MB, written a page at a time
# to the log and again at each checkpoint; 16 KB pages took the writer's CPU for a hand-over of
# 1.6 KB requests from 2.2 to 1.5 µs a request (4 KB, SQLite's default: files made so keep them).
_PAGE_BYTES = 16384
_SCHEMA_VERSION = 3  # PRAGMA user_version; 1 kept one row per event in a table "events", 2 no batches
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT NOT NULL UNIQUE,
    ts_ms INTEGER NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL,
    request_id TEXT NOT NULL,
    rows INTEGER NOT NULL,
    body BLOB NOT NULL,
    kind TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_model_time ON records (model, ts_ms, key);
CREATE TABLE IF NOT EXISTS batches (
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
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (ts_min_ms);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    row INTEGER NOT NULL,
    label BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (request_id, row)
);
"""
_MIGRATE_EVENTS = """
INSERT OR IGNORE INTO records (key, ts_ms, model, version, role, request_id, rows, body, kind)
    SELECT event_id, ts_ms, model, version, role, request_id, 1, body, 'e' FROM events;
DROP TABLE events;
"""
_INSERT = (
    "INSERT OR IGNORE INTO records (key, ts_ms, model, version, role, request_id, rows, body, kind)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_REQUEST = _INSERT.replace("?)", "'r')")
_RECORD = "kind, key, ts_ms, model, version, role, request_id, rows, body"  # kind, then a LoggedRequest
_BATCH = "source, first, count, rows, ts_min_ms, ts_max_ms, models, body"  # an AnsweredBatch
_INSERT_BATCH = f"INSERT INTO batches ({_BATCH}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._migrate()
        except (OSError, BackendUnavailable) as exc:
            raise BackendUnavailable(f"log store {path} cannot be opened: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None)
            db.execute(f"PRAGMA page_size = {_PAGE_BYTES}")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; a SQLite error is the store away."""
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
            raise BackendUnavailable(f"log store {self.path}: {what} failed: {exc}") from exc

    def _migrate(self) -> None:
        """Create the tables; a file of the first layout (a row per event) keeps its events."""
        if self._scalar("PRAGMA user_version", []) >= _SCHEMA_VERSION:
            return
        with self._transaction("creating the tables") as db:
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
            old = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
            ).fetchone()
            if old:
                for statement in _MIGRATE_EVENTS.split(";"):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # --- writes ------------------------------------------------------------------------------

    def write(self, events: Sequence[InferenceEvent]) -> WriteResult:
        records = [
            (e.event_id, e.ts_ms, e.model, e.version, e.role, e.request_id, 1, orjson.dumps(e.to_dict()), "e")
            for e in events
        ]
        return self._insert(_INSERT, records)

    def write_requests(self, requests: Sequence[LoggedRequest]) -> WriteResult:
        return self._insert(_INSERT_REQUEST, requests)

    def _insert(self, sql: str, records: Sequence[Sequence[Any]]) -> WriteResult:
        """One transaction; the counts are in events (a record holds ``rows`` of them)."""
        total = sum(r[6] for r in records)
        with self._transaction("write") as db:
            before = db.total_changes
            db.executemany(sql, records)
            if db.total_changes - before == len(records):
                written = total
            else:  # some were stored already (a replay): count record by record
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                written = sum(r[6] for r in records if db.execute(sql, r).rowcount == 1)
        return WriteResult(written=written, duplicates=total - written, rejected=[])

    def write_batches(self, batches: Sequence[AnsweredBatch]) -> WriteResult:
        """One record per batch, in one transaction. An event id already stored (a hand-over sent
        again after the writer died reading it, cut in other places) is kept as it was: only the
        part of a batch that no stored batch of its source holds is written. A batch whose times
        lie further apart than ``MAX_SPAN_MS`` is written as single requests."""
        narrow = [b for b in batches if b.ts_max_ms - b.ts_min_ms <= MAX_SPAN_MS]
        wide, unreadable = batch_requests(b for b in batches if b.ts_max_ms - b.ts_min_ms > MAX_SPAN_MS)
        total = sum(b.rows for b in narrow)
        with self._transaction("write") as db:
            written = 0
            for batch in narrow:
                for part in _new_parts(db, batch):
                    db.execute(_INSERT_BATCH, _batch_row(part))
                    written += part.rows
        result = WriteResult(written=written, duplicates=total - written, rejected=unreadable)
        if not wide:
            return result
        single = self.write_requests(wide)
        return WriteResult(
            result.written + single.written,
            result.duplicates + single.duplicates,
            unreadable + single.rejected,
        )

    def write_feedback(self, feedback: Sequence[Feedback]) -> int:
        rows = [(f.request_id, f.row, orjson.dumps(f.label), f.ts_ms) for f in feedback]
        with self._transaction("feedback write") as db:
            db.executemany(
                "INSERT OR REPLACE INTO feedback (request_id, row, label, ts_ms) VALUES (?, ?, ?, ?)", rows
            )
        return len(rows)

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
            labels = self._labels(sorted({record[6] for record in page}))
            for record in page:
                for event in _expand(record, stats):
                    label = labels.get((event.request_id, event.row))
                    yield Labelled(event, orjson.loads(label) if label is not None else None)

    def _labels(self, request_ids: list[str]) -> dict[tuple[str, int], bytes]:
        sql = (
            "SELECT request_id, row, label FROM feedback WHERE request_id IN (SELECT value FROM json_each(?))"
        )
        rows = self._read(sql, [orjson.dumps(request_ids).decode()])
        return {(request_id, row): label for request_id, row, label in rows}

    def _ordered(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None,
        role: str | None,
        stats: ReadStats | None,
    ) -> Iterator[tuple[Any, ...]]:
        """The window's records (``_RECORD`` columns) in (ts_ms, key) order: the single ones and
        the requests of the batches, merged. Both come in order of their (first) time, and nothing
        after a batch's start can be older than it, so what is older than the next start is final."""
        singles = ((record[2], (record,)) for page in self._pages(model, start_ms, end_ms, version, role)
                   for record in page)  # fmt: skip
        batches = (
            (batch.ts_min_ms, _requests(batch, model, start_ms, end_ms, version, role, stats))
            for batch in self._batches(model, start_ms, end_ms)
        )
        waiting: list[tuple[int, str, tuple[Any, ...]]] = []
        for start, records in heapq.merge(singles, batches, key=operator.itemgetter(0)):
            while waiting and waiting[0][0] < start:
                yield heapq.heappop(waiting)[2]
            for record in records:
                heapq.heappush(waiting, (record[2], record[1], record))
        while waiting:
            yield heapq.heappop(waiting)[2]

    def _batches(self, model: str, start_ms: int, end_ms: int) -> Iterator[AnsweredBatch]:
        """The batches holding requests of ``model`` that may lie in the window, by first time."""
        sql = (
            f"SELECT {_BATCH} FROM batches WHERE ts_min_ms >= ? AND ts_min_ms < ? AND ts_max_ms >= ?"
            " AND EXISTS (SELECT 1 FROM json_each(models) WHERE value = ?)"
            " AND (ts_min_ms > ? OR (ts_min_ms = ? AND (source > ? OR (source = ? AND first > ?))))"
            " ORDER BY ts_min_ms, source, first LIMIT ?"
        )
        after: tuple[int, str, int] = (-(2**62), "", -1)
        while True:
            params = [start_ms - MAX_SPAN_MS, end_ms, start_ms, model]
            page = self._read(sql, [*params, after[0], after[0], after[1], after[1], after[2], BATCH_PAGE])
            for row in page:
                yield _stored_batch(row)
            if len(page) < BATCH_PAGE:
                return
            after = (page[-1][4], page[-1][0], page[-1][1])

    def _pages(
        self, model: str, start_ms: int, end_ms: int, version: str | None, role: str | None
    ) -> Iterator[list[tuple[Any, ...]]]:
        """The window's records (``_RECORD`` columns), a page at a time."""
        where, params = _window(model, start_ms, end_ms, version, role)
        sql = (
            f"SELECT {_RECORD} FROM records WHERE {where}"
            " AND (ts_ms > ? OR (ts_ms = ? AND key > ?)) ORDER BY ts_ms, key LIMIT ?"
        )
        after_ts, after_key = -1, ""
        while True:
            page = self._read(sql, [*params, after_ts, after_ts, after_key, PAGE])
            yield page
            if len(page) < PAGE:
                return
            after_ts, after_key = page[-1][2], page[-1][1]

    def count(
        self, model: str, start_ms: int, end_ms: int, version: str | None = None, role: str | None = None
    ) -> int:
        where, params = _window(model, start_ms, end_ms, version, role)
        count = self._scalar(f"SELECT COALESCE(SUM(rows), 0) FROM records WHERE {where}", params)
        for batch in self._batches(model, start_ms, end_ms):
            whole = start_ms <= batch.ts_min_ms and batch.ts_max_ms < end_ms and batch.models == (model,)
            if whole and version is None and role is None:
                count += batch.rows  # all of it: no need to read it
            else:
                count += sum(r[7] for r in _requests(batch, model, start_ms, end_ms, version, role, None))
        return count

    def models(self) -> list[str]:
        sql = (
            "SELECT model FROM records UNION SELECT value FROM batches, json_each(batches.models) ORDER BY 1"
        )
        return [r[0] for r in self._read(sql, [])]

    def latest(self, model: str | None, limit: int) -> list[InferenceEvent]:
        where, params = ("WHERE model = ?", [model]) if model is not None else ("", [])
        sql = f"SELECT {_RECORD} FROM records {where} ORDER BY ts_ms DESC, key DESC LIMIT ?"
        # A record holds at least one event: `limit` records are enough, and fewer usually are.
        records = self._read(sql, [*params, limit]) + self._latest_batched(model, limit)
        records.sort(key=_time_order, reverse=True)
        newest: list[list[InferenceEvent]] = []
        found = 0
        for record in records:
            if found >= limit:
                break
            newest.append(_expand(record, None))
            found += len(newest[-1])
        events = [event for record in reversed(newest) for event in record]
        return events[len(events) - limit :] if limit > 0 else []

    def _latest_batched(self, model: str | None, limit: int) -> list[tuple[Any, ...]]:
        """The newest requests of the batches (of one model, or all), enough for ``limit`` events.
        Batches come newest end first; reading stops at one that ends before the ``limit``-th
        newest event found so far: nothing in it, or after it, can be newer."""
        found: list[tuple[Any, ...]] = []
        if limit <= 0:
            return found
        for batch in self._batches_by_end(model):
            if _nth_newest_ts(found, limit) > batch.ts_max_ms:
                break
            found += _requests(batch, model, -(2**62), 2**62, None, None, None)
        return found

    def _batches_by_end(self, model: str | None) -> Iterator[AnsweredBatch]:
        """The batches (holding requests of ``model``, or all), newest end first."""
        where, params = ("WHERE EXISTS (SELECT 1 FROM json_each(models) WHERE value = ?)", [model]) if model else ("", [])  # fmt: skip
        sql = f"SELECT {_BATCH} FROM batches {where} ORDER BY ts_max_ms DESC, source, first LIMIT ? OFFSET ?"
        for offset in itertools.count(0, BATCH_PAGE):
            page = self._read(sql, [*params, BATCH_PAGE, offset])
            for row in page:
                yield _stored_batch(row)
            if len(page) < BATCH_PAGE:
                return

    def prune(self, older_than_ms: int) -> int:
        with self._transaction("prune") as db:
            sql = "SELECT COALESCE(SUM(rows), 0) FROM records WHERE ts_ms < ?"
            gone = int(db.execute(sql, [older_than_ms]).fetchone()[0])
            sql = "SELECT COALESCE(SUM(rows), 0) FROM batches WHERE ts_max_ms < ?"
            gone += int(db.execute(sql, [older_than_ms]).fetchone()[0])
            db.execute("DELETE FROM batches WHERE ts_max_ms < ?", [older_than_ms])
            db.execute("DELETE FROM records WHERE ts_ms < ?", [older_than_ms])
            db.execute("DELETE FROM feedback WHERE ts_ms < ?", [older_than_ms])
        return gone

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
        """The rows a read returns; a SQLite error is the store away."""
        try:
            return self._connect().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: read failed: {exc}") from exc

    def _scalar(self, sql: str, params: list[object]) -> int:
        return int(self._read(sql, params)[0][0])


def _window(
    model: str, start_ms: int, end_ms: int, version: str | None, role: str | None
) -> tuple[str, list[object]]:
    """The WHERE clause selecting one model's records in a window, of one version and role."""
    where = ["model = ?", "ts_ms >= ?", "ts_ms < ?"]
    params: list[object] = [model, start_ms, end_ms]
    for column, value in (("version", version), ("role", role)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return " AND ".join(where), params


def _batch_row(batch: AnsweredBatch) -> tuple[Any, ...]:
    """A batch as its ``_BATCH`` columns (its models as a JSON list)."""
    return (*batch[:6], orjson.dumps(batch.models), batch.body)


def _stored_batch(row: tuple[Any, ...]) -> AnsweredBatch:
    """The batch of a row of ``_BATCH`` columns."""
    return AnsweredBatch(*row[:6], tuple(orjson.loads(row[6])), row[7])


def _time_order(record: tuple[Any, ...]) -> tuple[int, str]:
    """The read order of a ``_RECORD`` row: (ts_ms, key)."""
    return record[2], record[1]


def _nth_newest_ts(records: list[tuple[Any, ...]], n: int) -> float:
    """The time of the ``n``-th newest event of these ``_RECORD`` rows (-inf if they hold fewer)."""
    held = 0
    for record in sorted(records, key=_time_order, reverse=True):
        held += record[7]
        if held >= n:
            return record[2]
    return float("-inf")


def _requests(
    batch: AnsweredBatch,
    model: str | None,
    start_ms: int,
    end_ms: int,
    version: str | None,
    role: str | None,
    stats: ReadStats | None,
) -> list[tuple[Any, ...]]:
    """A batch's requests (as ``_RECORD`` rows) of one model (or all), in a window, of one version
    and role; a line that is no request is skipped and counted."""
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
            found.append(("r", *request))
    return found


def _new_parts(db: sqlite3.Connection, batch: AnsweredBatch) -> list[AnsweredBatch]:
    """The parts of ``batch`` that no stored batch of its source holds (the stored ones of a source
    never overlap: at most one begins before this one and reaches into it)."""
    first, stop = batch.first, batch.first + batch.count
    before = db.execute(
        "SELECT first, count FROM batches WHERE source = ? AND first <= ? ORDER BY first DESC LIMIT 1",
        [batch.source, first],
    ).fetchall()
    inside = db.execute(
        "SELECT first, count FROM batches WHERE source = ? AND first > ? AND first < ? ORDER BY first",
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


def _expand(record: tuple[Any, ...], stats: ReadStats | None) -> list[InferenceEvent]:
    """A record's events; a malformed record is skipped and counted, never raised to the reader."""
    try:
        if record[0] == "r":
            return LoggedRequest(*record[1:]).events()
        return [InferenceEvent.from_dict(orjson.loads(record[-1]))]
    except (orjson.JSONDecodeError, MalformedEvent, TypeError, AttributeError):
        if stats is not None:
            stats.malformed += 1
        return []
