"""Where inference events live: one interface, backends chosen by URL.

URLs may end in ``?timeout_ms=N``: how long one request may take before the store counts as away
(and the model server's log writer spools).

- ``sqlite:///path/to/inference.db``: the embedded default. SQLite in WAL mode: one process
  writes (the model server's log writer) while others read (Airflow tasks, ``mlops logs``), and a
  committed batch survives a crash of the writer. It keeps each batch of logged requests as one
  record and expands it to rows on read.
- ``elasticsearch://host:9200`` (``elasticsearch+https://``): Elasticsearch 8/9 with the official
  ``elasticsearch`` client: index template with explicit mappings, ILM retention, daily indices.
- ``opensearch://host:9200`` (``opensearch+https://``): the OpenSearch flavour through
  ``opensearch-py``; same mappings and queries (monitoring/logstore/search.py builds them once).

Backends are imported when a store is built, so importing this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from common.errors import ConfigError
from monitoring.events import Feedback, InferenceEvent, Labelled, RequestBatch, RowBlock


@dataclass(frozen=True)
class WriteResult:
    written: int  # new events (or labels) stored
    duplicates: int  # already stored (a replay, or a label already there): kept as they were
    rejected: list[str]  # what the store refused, one "<event id>: <reason>" each


@dataclass
class ReadStats:
    """What a read skipped: a malformed record never stops a reader."""

    malformed: int = 0


class LogStore(Protocol):
    """The inference log.

    Events are keyed by ``event_id``: writing an id that is already stored keeps the stored event
    and counts a duplicate, so a batch replayed after an outage never doubles anything.

    A write either stores the whole batch (but for what the store rejects, reported one by one in
    the result) or raises: ``BackendUnavailable`` when the store does not answer or says "later"
    (the caller keeps the batch and tries again), ``BackendRefused`` when it answered and will not
    take it (bad credentials, a corrupt database: trying again will not help). Either way it has
    stored nothing the caller must not write again.

    Reads select one model's events in the half-open window ``[start_ms, end_ms)`` (epoch ms),
    optionally one version and one role, in (ts_ms, event_id) order, and page through any number
    of them. A stored record that cannot be parsed is skipped and counted in ``stats``.
    """

    url: str

    def write(self, events: Sequence[InferenceEvent]) -> WriteResult:
        """Store single events, each under its own ``event_id``."""
        ...

    def write_requests(self, batches: Sequence[RequestBatch]) -> WriteResult:
        """Store batches of logged requests; request ``i`` of a batch holds the events
        ``<batch.event_id(i)>-<row>``, and the result counts events. The embedded store keeps each
        batch as one record, its requests unread (one that turns out malformed is skipped and
        counted on read); the search stores expand them to documents and reject a request that
        cannot be read by its event id."""
        ...

    def write_feedback(self, feedback: Sequence[Feedback]) -> WriteResult:
        """Store labels: the first label of a (request_id, row) stays unless the new one says
        ``overwrite`` (a label kept so is counted in ``duplicates``)."""
        ...

    def labels(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Any]:
        """The stored labels of these (request_id, row) keys (keys without one are left out)."""
        ...

    def request_labels(self, request_ids: Sequence[str]) -> dict[tuple[str, int], Any]:
        """Every stored label of these requests, by (request_id, row)."""
        ...

    def known_requests(self, request_ids: Sequence[str], since_ms: int) -> set[str]:
        """Which of these request ids have events, looking back at least to ``since_ms`` (a store
        may look further: the search stores look at everything)."""
        ...

    def query(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        role: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[InferenceEvent]: ...

    def blocks(
        self, model: str, start_ms: int, end_ms: int, stats: ReadStats | None = None
    ) -> Iterator[RowBlock]:
        """The window's rows as columns, a logged request (or a single event) at a time, in time
        order: what ``query`` reads, without an event object per row (monitoring's windows)."""
        ...

    def count(
        self, model: str, start_ms: int, end_ms: int, version: str | None = None, role: str | None = None
    ) -> int: ...

    def labelled(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[Labelled]:
        """The window's events, each with its label if one came back."""
        ...

    def models(self) -> list[str]:
        """The models that have events."""
        ...

    def write_window(self, summary: Mapping[str, Any]) -> None:
        """Store a monitoring window's summary under its ``id`` (a re-run of the window replaces
        it): what dashboards read, and what the next windows compare with."""
        ...

    def windows(self, model: str, before_ms: int, limit: int) -> list[dict[str, Any]]:
        """The model's last ``limit`` window summaries that end at or before ``before_ms``, oldest first."""
        ...

    def latest(self, model: str | None, limit: int) -> list[InferenceEvent]:
        """The newest events (of one model, or all), newest last."""
        ...

    def prune(self, older_than_ms: int) -> int:
        """Drop events older than this (retention); returns how many (or indices) went."""
        ...

    def refresh(self) -> None:
        """Make what was written visible to reads now (search servers refresh every second)."""
        ...

    def ping(self) -> None:
        """Raise BackendUnavailable unless the store answers."""
        ...

    def close(self) -> None: ...


def _sqlite(url: str, options: dict[str, Any]) -> LogStore:
    from monitoring.logstore.sqlite import SqliteLogStore

    return SqliteLogStore(url)


def _search(url: str, options: dict[str, Any]) -> LogStore:
    from monitoring.logstore.search import search_log_store

    return search_log_store(url, **options)


_BUILDERS: dict[str, Callable[[str, dict[str, Any]], LogStore]] = {
    "sqlite": _sqlite,
    "elasticsearch": _search,
    "elasticsearch+http": _search,
    "elasticsearch+https": _search,
    "opensearch": _search,
    "opensearch+http": _search,
    "opensearch+https": _search,
}


def get_log_store(url: str, **options: Any) -> LogStore:
    """The store at ``url``; options (index prefix, credentials, ...) go to search backends."""
    scheme = urlparse(url).scheme
    builder = _BUILDERS.get(scheme)
    if builder is None:
        raise ConfigError(f"log store '{url}': scheme '{scheme}' is not one of {', '.join(_BUILDERS)}")
    return builder(url, options)


def timeout_ms(url: str, default: int) -> int:
    """A store URL's ``?timeout_ms=`` (how long one request may take before the store is away)."""
    values = parse_qs(urlparse(url).query).get("timeout_ms")
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise ConfigError(f"log store '{url}': timeout_ms must be an integer, got {values[0]!r}") from None
    if value <= 0:
        raise ConfigError(f"log store '{url}': timeout_ms must be positive")
    return value
