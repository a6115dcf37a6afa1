"""The embedded log store: SQLite in WAL mode, one writer process, any number of readers.

Why SQLite: WAL lets the model server write while Airflow tasks read the same file from other
processes (DuckDB allows no reader in another process while one has it open for writing), and a
committed transaction survives a crash of the writer. ``synchronous=FULL`` makes it survive a
power cut too, at one fsync per batch (the logger writes batches, so that is cheap).

Written in requests, read in rows: a record is a whole request as the model server encoded it
(kind ``r``: the columns of its header and its payload, expanded to one event per row when read)
or a single event written on its own (kind ``e``). Writing a request costs one row insert and no
decoding, whatever its size: that is what keeps the log writer's CPU off the model server's
cores. Records are keyed by their event id (INSERT OR IGNORE: a replayed batch adds nothing
twice); every row of a record shares its time, model, version and role, so window filters are
exact on records; reads page by (ts_ms, key) keyset, so a window of any size is read without
OFFSET.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson

from mlops.errors import BackendUnavailable, ConfigError
from monitoring.events import (
    Feedback,
    InferenceEvent,
    Labelled,
    LoggedRequest,
    MalformedEvent,
)
from monitoring.logstore import ReadStats, WriteResult, timeout_ms

PAGE = 2000  # records per read
_SCHEMA_VERSION = 2  # PRAGMA user_version; 1 kept one row per event in a table "events"
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
        for page in self._pages(model, start_ms, end_ms, version, role):
            for record in page:
                yield from _expand(record, stats)

    def labelled(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[Labelled]:
        for page in self._pages(model, start_ms, end_ms, version, None):
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
        return self._scalar(f"SELECT COALESCE(SUM(rows), 0) FROM records WHERE {where}", params)

    def models(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT model FROM records ORDER BY model", [])]

    def latest(self, model: str | None, limit: int) -> list[InferenceEvent]:
        where, params = ("WHERE model = ?", [model]) if model is not None else ("", [])
        sql = f"SELECT {_RECORD} FROM records {where} ORDER BY ts_ms DESC, key DESC LIMIT ?"
        # A record holds at least one event: `limit` records are enough, and fewer usually are.
        records = self._read(sql, [*params, limit])
        newest: list[list[InferenceEvent]] = []
        found = 0
        for record in records:
            if found >= limit:
                break
            newest.append(_expand(record, None))
            found += len(newest[-1])
        events = [event for record in reversed(newest) for event in record]
        return events[len(events) - limit :] if limit > 0 else []

    def prune(self, older_than_ms: int) -> int:
        with self._transaction("prune") as db:
            sql = "SELECT COALESCE(SUM(rows), 0) FROM records WHERE ts_ms < ?"
            gone = int(db.execute(sql, [older_than_ms]).fetchone()[0])
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
