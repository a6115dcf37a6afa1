"""One behaviour for every log store: the embedded SQLite store, OpenSearch (opensearch-py against
osmem-server) and Elasticsearch (the official client, through a header proxy, against the same)."""

from __future__ import annotations

import sqlite3
import uuid

import numpy as np
import orjson
import pytest

from monitoring.events import (
    AnsweredBatch,
    Feedback,
    InferenceEvent,
    InferenceRequest,
    LoggedRequest,
    answered_payload,
)
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
                "INSERT INTO records (key, ts_ms, model, version, role, request_id, rows, body, kind)"
                " VALUES ('bad', ?, 'fraud', '1', 'stable', 'r', 1, ?, 'e')",
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


def request(i: int, rows: int, version: str = "1", role: str = "stable") -> InferenceRequest:
    """A request of ``rows`` rows as the model server logs it (columns; a failed one has none)."""
    if rows == 0:
        return InferenceRequest(
            f"rq-{i:05d}", T0 + i, "fraud", version, role, f"req-{i}", 1.5, {}, {}, "error", "boom"
        )
    return InferenceRequest(
        event_id=f"rq-{i:05d}", ts_ms=T0 + i, model="fraud", version=version, role=role, request_id=f"req-{i}",
        latency_ms=1.5, inputs={"amount": np.arange(rows, dtype=np.float64) + i, "country": np.array(["DE"] * rows, dtype=object)},
        outputs={"label": np.array(["legit"] * rows, dtype=object), "probabilities": np.full((rows, 2), 0.5, np.float32)},
    )  # fmt: skip


def test_a_request_is_stored_as_one_event_per_row(store):
    requests = [request(1, 1), request(2, 12), request(3, 0)]
    result = store.write_requests([r.logged() for r in requests])
    store.refresh()
    assert (result.written, result.duplicates, result.rejected) == (14, 0, [])
    back = list(store.query("fraud", T0, T0 + 10))
    assert back == [e for r in requests for e in r.events()]
    assert [e.event_id for e in back] == sorted(e.event_id for e in back)  # rq-00002-10 before rq-00002-2
    assert back[13].status == "error" and back[13].error == "boom"
    assert store.count("fraud", T0 + 2, T0 + 3) == 12 and store.count("fraud", T0, T0 + 10) == 14


def test_a_request_written_twice_counts_its_rows_once(store):
    first = store.write_requests([request(i, 3).logged() for i in range(4)])
    again = store.write_requests([request(i, 3).logged() for i in range(2, 6)])
    store.refresh()
    assert (first.written, first.duplicates) == (12, 0)
    assert (again.written, again.duplicates) == (6, 6)
    assert store.count("fraud", T0, T0 + 10) == 18


def test_windows_filters_labels_and_latest_over_requests(store):
    store.write_requests([request(i, 2, version=str(1 + i % 2), role="canary" if i == 3 else "stable").logged() for i in range(6)])  # fmt: skip
    store.write_feedback([Feedback("req-4", 1, "fraud")])
    store.refresh()
    assert store.count("fraud", T0 + 1, T0 + 4) == 6
    assert store.count("fraud", T0, T0 + 10, version="2") == 6
    assert [e.event_id for e in store.query("fraud", T0, T0 + 10, role="canary")] == [
        "rq-00003-0",
        "rq-00003-1",
    ]
    labels = {(x.event.request_id, x.event.row): x.label for x in store.labelled("fraud", T0 + 4, T0 + 5)}
    assert labels == {("req-4", 0): None, ("req-4", 1): "fraud"}
    assert [e.event_id for e in store.latest("fraud", 3)] == ["rq-00004-1", "rq-00005-0", "rq-00005-1"]


def test_a_request_that_cannot_be_read_is_refused_or_skipped_never_fatal(store):
    good = request(1, 2).logged()
    bad = LoggedRequest("rq-bad", T0 + 2, "fraud", "1", "stable", "req-bad", 3, b'{"schema_version": 1, "inp')
    result = store.write_requests([good, bad])
    store.refresh()
    stats = ReadStats()
    assert [e.event_id for e in store.query("fraud", T0, T0 + 10, stats=stats)] == [
        "rq-00001-0",
        "rq-00001-1",
    ]
    # The search stores expand on write and refuse it; the embedded store reads it only when asked.
    assert (len(result.rejected), stats.malformed) == ((0, 1) if store.kind == "sqlite" else (1, 0))


# --- hand-overs of answered requests, kept whole by the embedded store -----------------------


def answered_batch(
    first: int, count: int, times: list[int] | None = None, source: str = "srv", model: str = "fraud"
) -> AnsweredBatch:
    """A hand-over as the log writer reads it: request ``first + i`` at ``times[i]`` (default
    T0 + first + i), of 1 + i % 2 rows, version 1 + i % 2; event ids ``source`` + hex."""
    lines = []
    for i in range(first, first + count):
        rows = 1 + i % 2
        body = orjson.dumps({"instances": [[float(i), float(row)] for row in range(rows)]})
        ts_ms = T0 + i if times is None else times[i - first]
        outputs = {"y": np.full((rows, 2), i, np.float32)}
        payload = answered_payload(
            ts_ms / 1000, 0.002, model, str(1 + i % 2), "stable", f"req-{i}", "v1", body, "x", outputs
        )
        lines.append(b"a" + payload + b"\n")
    batch = AnsweredBatch.scan(source, first, b"".join(lines))
    assert batch is not None
    return batch


def events_of(*batches: AnsweredBatch) -> list[InferenceEvent]:
    events = [e for batch in batches for r in batch.requests() if r is not None for e in r.events()]
    return sorted(events, key=lambda e: (e.ts_ms, e.event_id))


def test_hand_overs_read_back_as_events_merged_in_time_order_with_single_requests(store):
    """Two servers' hand-overs overlap in time; single requests lie among them. A window holds
    exactly its events, in time order, whatever batch they came in."""
    a = answered_batch(0, 30, times=[T0 + 2 * i for i in range(30)], source="a")
    b = answered_batch(0, 30, times=[T0 + 1 + 2 * i for i in range(30)], source="b")
    c = answered_batch(0, 5, source="c", model="churn")
    result = store.write_batches([a, b, c])
    singles = [request(i, 1) for i in (5, 40, 70)]
    store.write_requests([r.logged() for r in singles])
    store.refresh()
    assert (result.written, result.duplicates, result.rejected) == (a.rows + b.rows + c.rows, 0, [])
    everything = events_of(a, b) + [e for r in singles for e in r.events()]
    everything.sort(key=lambda e: (e.ts_ms, e.event_id))
    window = [e for e in everything if T0 + 7 <= e.ts_ms < T0 + 41]
    assert list(store.query("fraud", T0 + 7, T0 + 41)) == window
    assert store.count("fraud", T0 + 7, T0 + 41) == len(window) and store.count("fraud", T0, T0 + 99) == 93
    assert store.count("fraud", T0, T0 + 99, version="2") == sum(e.version == "2" for e in everything)
    assert [e.event_id for e in store.query("fraud", T0, T0 + 99, version="2")] == [
        e.event_id for e in everything if e.version == "2"
    ]
    assert store.models() == ["churn", "fraud"]
    assert [e.event_id for e in store.latest("fraud", 4)] == [e.event_id for e in everything[-4:]]
    assert store.latest("churn", 2) == events_of(c)[-2:]
    store.write_feedback([Feedback("req-7", 1, "fraud")])
    store.refresh()
    labels = {(x.event.event_id, x.label) for x in store.labelled("fraud", T0 + 14, T0 + 16) if x.label}
    assert labels == {("a7-1", "fraud"), ("b7-1", "fraud")}


def test_a_hand_over_sent_again_and_cut_elsewhere_is_stored_once(store):
    """A writer died reading a hand-over; the next one reads it again, cut in other places."""
    whole = answered_batch(0, 12)
    first = store.write_batches([answered_batch(0, 6)])
    again = store.write_batches([answered_batch(0, 10), answered_batch(10, 2)])
    overlap = store.write_batches([answered_batch(3, 9)])
    store.refresh()
    assert (first.written, first.duplicates) == (9, 0)
    assert (again.written, again.duplicates) == (9, 9)
    assert (overlap.written, overlap.duplicates) == (0, 14)
    assert list(store.query("fraud", T0, T0 + 99)) == events_of(whole)
    assert store.count("fraud", T0, T0 + 99) == whole.rows == 18


def test_a_line_of_a_hand_over_that_cannot_be_read_is_refused_or_skipped_never_fatal(store):
    good = answered_batch(0, 3)
    broken = good.body.replace(b'{"instances":[[1.0,0.0],[1.0,1.0]]}', b'{"instances":[[1.0,0.0],[1.0')
    assert broken != good.body
    batch = AnsweredBatch.scan("srv", 0, broken)
    assert batch is not None
    result = store.write_batches([batch])
    store.refresh()
    stats = ReadStats()
    assert [e.event_id for e in store.query("fraud", T0, T0 + 10, stats=stats)] == ["srv0-0", "srv2-0"]
    assert (len(result.rejected), stats.malformed) == ((0, 1) if store.kind == "sqlite" else (1, 0))


def test_hand_overs_older_than_the_retention_are_pruned(store):
    day = 86_400_000
    store.write_batches([answered_batch(0, 3, times=[T0 - 3 * day] * 3), answered_batch(3, 2)])
    store.refresh()
    assert store.prune(T0 - day) >= 1
    store.refresh()
    assert list(store.query("fraud", T0 - 10 * day, T0 + 99)) == events_of(answered_batch(3, 2))


def test_an_embedded_store_keeps_a_hand_over_of_far_apart_times_as_single_requests(tmp_path):
    from monitoring.logstore.sqlite import MAX_SPAN_MS

    store = get_log_store(f"sqlite:///{tmp_path / 'inference.db'}")
    wide = answered_batch(0, 3, times=[T0, T0 + MAX_SPAN_MS + 1, T0 + 5])
    assert store.write_batches([wide]).written == wide.rows
    assert list(store.query("fraud", T0, T0 + 10)) == events_of(wide)[:2]
    assert store.count("fraud", T0, T0 + 2 * MAX_SPAN_MS) == wide.rows
    with sqlite3.connect(tmp_path / "inference.db") as db:
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone() == (0,)


def test_an_unreadable_line_of_a_hand_over_kept_as_single_requests_is_refused_and_counted(tmp_path):
    """Kept as single requests, a hand-over cannot keep a line that is not a request in its body to
    be counted when read: the store refuses that line, by its event id, and writes the others."""
    from monitoring.logstore.sqlite import MAX_SPAN_MS

    store = get_log_store(f"sqlite:///{tmp_path / 'inference.db'}")
    good = answered_batch(0, 3, times=[T0, T0 + MAX_SPAN_MS + 1, T0 + 5])
    lines = good.body.split(b"\n")
    lines[1] = lines[1].replace(b'"stable"', b"stable", 1)  # its head still matches up to the model
    broken = AnsweredBatch.scan("srv", 0, b"\n".join(lines))
    assert broken is not None and broken.ts_max_ms - broken.ts_min_ms > MAX_SPAN_MS
    result = store.write_batches([broken])
    assert result.rejected == ["srv1: not an answered request"]
    assert result.written == good.rows - 2  # request 1 has two rows
    assert [e.event_id for e in store.query("fraud", T0, T0 + 2 * MAX_SPAN_MS)] == ["srv0-0", "srv2-0"]


def test_an_embedded_store_of_the_first_layout_keeps_its_events(tmp_path):
    """A file written by the first layout (a row per event, table ``events``) opens with its events."""
    import orjson

    path = tmp_path / "inference.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE events (event_id TEXT NOT NULL UNIQUE, ts_ms INTEGER NOT NULL, model TEXT NOT NULL,"
            " version TEXT NOT NULL, role TEXT NOT NULL, request_id TEXT NOT NULL, row INTEGER NOT NULL,"
            " body BLOB NOT NULL)"
        )
        db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.event_id, e.ts_ms, e.model, e.version, e.role, e.request_id, e.row, orjson.dumps(e.to_dict()))
             for e in (event(i) for i in range(5))],
        )  # fmt: skip
    store = get_log_store(f"sqlite:///{path}")
    store.write_requests([request(9, 2).logged()])
    assert list(store.query("fraud", T0, T0 + 5)) == [event(i) for i in range(5)]
    assert store.count("fraud", T0, T0 + 10) == 7
    store.close()
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "events" not in tables and get_log_store(f"sqlite:///{path}").count("fraud", T0, T0 + 10) == 7
