"""The embedded log store: SQLite in WAL mode, one writer process, any number of readers.

Why SQLite: WAL lets the model server write while Airflow tasks read the same file from other
processes (DuckDB allows no reader in another process while one has it open for writing), and a
committed transaction survives a crash of the writer. ``synchronous=FULL`` makes it survive a
power cut too, at one fsync per batch (the logger writes batches, so that is cheap).

Events are keyed by ``event_id`` (INSERT OR IGNORE: a replayed batch adds nothing twice); the
event's body is JSON; reads page by (ts_ms, event_id) keyset, so a window of any size is read
without OFFSET.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import orjson

from mlops.errors import BackendUnavailable, ConfigError
from monitoring.events import Feedback, InferenceEvent, Labelled, MalformedEvent
from monitoring.logstore import ReadStats, WriteResult, timeout_ms

PAGE = 2000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT NOT NULL UNIQUE,
    ts_ms INTEGER NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL,
    request_id TEXT NOT NULL,
    row INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_model_time ON events (model, ts_ms, event_id);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    row INTEGER NOT NULL,
    label BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (request_id, row)
);
"""


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
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise BackendUnavailable(f"log store {path} cannot be opened: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    # --- writes ------------------------------------------------------------------------------

    def write(self, events: Sequence[InferenceEvent]) -> WriteResult:
        rows = [
            (e.event_id, e.ts_ms, e.model, e.version, e.role, e.request_id, e.row, orjson.dumps(e.to_dict()))
            for e in events
        ]
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO events (event_id, ts_ms, model, version, role, request_id, row, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                written = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: write failed: {exc}") from exc
        return WriteResult(written=written, duplicates=len(rows) - written, rejected=[])

    def write_feedback(self, feedback: Sequence[Feedback]) -> int:
        rows = [(f.request_id, f.row, orjson.dumps(f.label), f.ts_ms) for f in feedback]
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO feedback (request_id, row, label, ts_ms) VALUES (?, ?, ?, ?)", rows
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: feedback write failed: {exc}") from exc
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
        for body, _ in self._pages(model, start_ms, end_ms, version, role, with_labels=False):
            event = _parse(body, stats)
            if event is not None:
                yield event

    def labelled(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[Labelled]:
        for body, label in self._pages(model, start_ms, end_ms, version, None, with_labels=True):
            event = _parse(body, stats)
            if event is not None:
                yield Labelled(event, orjson.loads(label) if label is not None else None)

    def _pages(
        self, model: str, start_ms: int, end_ms: int, version: str | None, role: str | None, with_labels: bool
    ) -> Iterator[tuple[bytes, bytes | None]]:
        where, params = _window(model, start_ms, end_ms, version, role)
        label = "f.label" if with_labels else "NULL"
        join = "LEFT JOIN feedback f ON f.request_id = e.request_id AND f.row = e.row" if with_labels else ""
        sql = (
            f"SELECT e.body, {label}, e.ts_ms, e.event_id FROM events e {join} WHERE {where}"
            " AND (e.ts_ms > ? OR (e.ts_ms = ? AND e.event_id > ?)) ORDER BY e.ts_ms, e.event_id LIMIT ?"
        )
        after_ts, after_id = -1, ""
        while True:
            try:
                page = self._connect().execute(sql, [*params, after_ts, after_ts, after_id, PAGE]).fetchall()
            except sqlite3.Error as exc:
                raise BackendUnavailable(f"log store {self.path}: read failed: {exc}") from exc
            for body, label, _, _ in page:
                yield body, label
            if len(page) < PAGE:
                return
            after_ts, after_id = page[-1][2], page[-1][3]

    def count(
        self, model: str, start_ms: int, end_ms: int, version: str | None = None, role: str | None = None
    ) -> int:
        where, params = _window(model, start_ms, end_ms, version, role)
        return self._scalar(f"SELECT COUNT(*) FROM events e WHERE {where}", params)

    def models(self) -> list[str]:
        try:
            return [r[0] for r in self._connect().execute("SELECT DISTINCT model FROM events ORDER BY model")]
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: read failed: {exc}") from exc

    def latest(self, model: str | None, limit: int) -> list[InferenceEvent]:
        where, params = ("WHERE model = ?", [model, limit]) if model is not None else ("", [limit])
        sql = f"SELECT body FROM events {where} ORDER BY ts_ms DESC, event_id DESC LIMIT ?"
        try:
            rows = self._connect().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: read failed: {exc}") from exc
        events = [e for e in (_parse(body, None) for (body,) in rows) if e is not None]
        return events[::-1]

    def prune(self, older_than_ms: int) -> int:
        try:
            db = self._connect()
            gone = db.execute("DELETE FROM events WHERE ts_ms < ?", [older_than_ms]).rowcount
            db.execute("DELETE FROM feedback WHERE ts_ms < ?", [older_than_ms])
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: prune failed: {exc}") from exc
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

    def _scalar(self, sql: str, params: list[object]) -> int:
        try:
            return int(self._connect().execute(sql, params).fetchone()[0])
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"log store {self.path}: read failed: {exc}") from exc


def _window(
    model: str, start_ms: int, end_ms: int, version: str | None, role: str | None
) -> tuple[str, list[object]]:
    """The WHERE clause (over ``events e``) selecting one model's window, version and role."""
    where = ["e.model = ?", "e.ts_ms >= ?", "e.ts_ms < ?"]
    params: list[object] = [model, start_ms, end_ms]
    for column, value in (("version", version), ("role", role)):
        if value is not None:
            where.append(f"e.{column} = ?")
            params.append(value)
    return " AND ".join(where), params


def _parse(body: bytes, stats: ReadStats | None) -> InferenceEvent | None:
    try:
        return InferenceEvent.from_dict(orjson.loads(body))
    except (orjson.JSONDecodeError, MalformedEvent, TypeError):
        if stats is not None:
            stats.malformed += 1
        return None
