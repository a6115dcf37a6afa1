"""One behaviour for every log store: the embedded SQLite store, OpenSearch (opensearch-py against
osmem-server) and Elasticsearch (the official client, through a header proxy, against the same)."""

from __future__ import annotations

import sqlite3
import uuid

import pytest

from monitoring.events import Feedback, InferenceEvent
from monitoring.logstore import ReadStats, get_log_store
from tests.integration.conftest import store_url

pytestmark = pytest.mark.integration
KINDS = ["sqlite", "opensearch", "elasticsearch"]
T0 = 1_790_000_000_000  # a fixed millisecond, far from any day boundary problem: 2026-09-21


def event(
    i: int, model: str = "fraud", version: str = "1", role: str = "stable", ts: int | None = None
) -> InferenceEvent:
    return InferenceEvent(
        event_id=f"ev-{i:07d}", ts_ms=T0 + i if ts is None else ts, model=model, version=version, role=role,
        request_id=f"req-{i}", row=0, inputs={"amount": float(i), "country": "DE"},
        outputs={"label": "legit", "probabilities": [0.9, 0.1]}, latency_ms=0.5,
    )  # fmt: skip


@pytest.fixture(params=KINDS)
def store(request, tmp_path, osmem, es_proxy):
    prefix = f"t{uuid.uuid4().hex[:10]}"
    store = get_log_store(store_url(request.param, tmp_path, osmem, es_proxy), index_prefix=prefix)
    store.kind = request.param
    yield store
    store.close()


def test_a_window_holds_exactly_its_events_start_in_end_out(store):
    store.write([event(i) for i in range(100)])
    store.refresh()
    got = [e.event_id for e in store.query("fraud", T0 + 10, T0 + 20)]
    assert got == [f"ev-{i:07d}" for i in range(10, 20)]
    assert store.count("fraud", T0 + 10, T0 + 20) == 10
    assert store.count("other-model", T0, T0 + 100) == 0


def test_events_come_back_whole(store):
    original = event(3)
    store.write([original])
    store.refresh()
    (back,) = store.query("fraud", T0, T0 + 10)
    assert back == original


def test_a_window_past_10000_hits_pages_through_all_of_them(store):
    total = 12_500
    for start in range(0, total, 2500):
        store.write([event(i) for i in range(start, start + 2500)])
    store.refresh()
    ids = [e.event_id for e in store.query("fraud", T0, T0 + total)]
    assert len(ids) == total and len(set(ids)) == total
    assert ids == sorted(ids)
    assert store.count("fraud", T0, T0 + total) == total


def test_writing_an_event_twice_stores_it_once(store):
    first = store.write([event(i) for i in range(10)])
    again = store.write([event(i) for i in range(5, 15)])
    store.refresh()
    assert (first.written, first.duplicates) == (10, 0)
    assert (again.written, again.duplicates) == (5, 5)
    assert store.count("fraud", T0, T0 + 100) == 15


def test_version_and_role_filters(store):
    store.write(
        [event(i, version=str(1 + i % 2), role="canary" if i % 5 == 0 else "stable") for i in range(50)]
    )
    store.refresh()
    assert store.count("fraud", T0, T0 + 50, version="2") == 25
    assert store.count("fraud", T0, T0 + 50, role="canary") == 10
    assert {e.version for e in store.query("fraud", T0, T0 + 50, version="1")} == {"1"}


def test_a_label_joins_its_event_and_the_last_label_wins(store):
    store.write([event(i) for i in range(6)])
    store.write_feedback([Feedback("req-2", 0, "fraud"), Feedback("req-4", 0, {"amount_lost": 12.5})])
    store.write_feedback([Feedback("req-2", 0, "legit")])
    store.refresh()
    labels = {item.event.request_id: item.label for item in store.labelled("fraud", T0, T0 + 6)}
    assert labels == {
        "req-0": None,
        "req-1": None,
        "req-2": "legit",
        "req-3": None,
        "req-4": {"amount_lost": 12.5},
        "req-5": None,
    }


def test_a_malformed_record_does_not_break_a_reader(store):
    store.write([event(i) for i in range(5)])
    plant_malformed(store, T0 + 2)
    store.refresh()
    stats = ReadStats()
    ids = [e.event_id for e in store.query("fraud", T0, T0 + 10, stats=stats)]
    assert ids == [f"ev-{i:07d}" for i in range(5)]
    assert stats.malformed == 1


def plant_malformed(store, ts_ms: int) -> None:
    """A record that is not a valid event, put where a reader will meet it."""
    if store.kind == "sqlite":
        with sqlite3.connect(store.path) as db:
            db.execute(
                "INSERT INTO events (event_id, ts_ms, model, version, role, request_id, row, body)"
                " VALUES ('bad', ?, 'fraud', '1', 'stable', 'r', 0, ?)",
                (ts_ms, b"{not json"),
            )
        return
    from monitoring.logstore.search import events_index

    store.client.bulk(
        [{"index": {"_index": events_index(store.prefix, ts_ms), "_id": "bad"}},
         {"schema_version": 99, "event_id": "bad", "ts_ms": ts_ms, "model": "fraud"}]
    )  # fmt: skip


def test_models_and_latest(store):
    store.write([event(i, model="fraud" if i % 2 else "churn") for i in range(20)])
    store.refresh()
    assert store.models() == ["churn", "fraud"]
    latest = store.latest("fraud", 3)
    assert [e.event_id for e in latest] == ["ev-0000015", "ev-0000017", "ev-0000019"]


def test_prune_drops_what_is_older_than_the_retention(store):
    day = 86_400_000
    store.write([event(0, ts=T0 - 3 * day), event(1, ts=T0 - 2 * day), event(2, ts=T0)])
    store.refresh()
    assert store.prune(T0 - day) >= 1
    store.refresh()
    assert [e.event_id for e in store.query("fraud", T0 - 10 * day, T0 + 1)] == ["ev-0000002"]
