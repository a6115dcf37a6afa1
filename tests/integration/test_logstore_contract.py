"""One behaviour for every log store: the embedded SQLite store, OpenSearch (opensearch-py against
osmem-server) and Elasticsearch (the official client, through a header proxy, against the same)."""

from __future__ import annotations

import sqlite3
import uuid

import numpy as np
import orjson
import pytest

from common.errors import BackendRefused, BackendUnavailable, ConfigError
from monitoring.events import Feedback, InferenceEvent, RequestBatch, encode_request
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


def test_a_label_joins_its_event_and_the_first_label_stays_unless_overwritten(store):
    store.write([event(i) for i in range(6)])
    first = store.write_feedback(
        [
            Feedback("req-2", 0, "fraud"),
            Feedback("req-4", 0, {"amount_lost": 12.5}),
            Feedback("req-5", 0, "x"),
        ]
    )
    again = store.write_feedback([Feedback("req-2", 0, "legit"), Feedback("req-5", 0, "y", overwrite=True)])
    store.refresh()
    assert (first.written, first.duplicates) == (3, 0)
    assert (again.written, again.duplicates) == (1, 1)
    labels = {item.event.request_id: item.label for item in store.labelled("fraud", T0, T0 + 6)}
    assert labels == {
        "req-0": None,
        "req-1": None,
        "req-2": "fraud",
        "req-3": None,
        "req-4": {"amount_lost": 12.5},
        "req-5": "y",
    }
    assert store.labels([("req-2", 0), ("req-2", 1), ("req-9", 0), ("req-4", 0)]) == {
        ("req-2", 0): "fraud",
        ("req-4", 0): {"amount_lost": 12.5},
    }


def test_known_requests_are_the_ids_that_have_events(store):
    store.write([event(i) for i in range(3)])
    store.write_requests([request_batch(0, 4, times=[T0 - 60_000 + i for i in range(4)])])
    store.refresh()
    since = T0 - 3_600_000
    assert store.known_requests(["req-1", "req-2", "req-3", "nope"], since) == {"req-1", "req-2", "req-3"}
    assert store.known_requests([], since) == set()


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
                "INSERT INTO events (event_id, ts_ms, model, version, role, request_id, body)"
                " VALUES ('bad', ?, 'fraud', '1', 'stable', 'r', ?)",
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


def logged(
    i: int, rows: int, ts_ms: int, version: str = "1", role: str = "stable", model: str = "fraud"
) -> bytes:
    """Request ``i`` as the model server logs it: ``rows`` V1 rows (none: a failed request)."""
    if rows == 0:
        return encode_request(
            ts_ms / 1000, 0.0015, model, version, role, f"req-{i}", "v1", b"{}", None, {}, "boom"
        )
    body = orjson.dumps({"instances": [[float(i), float(row)] for row in range(rows)]})
    outputs = {"y": np.full((rows, 2), i, np.float32)}
    return encode_request(ts_ms / 1000, 0.0015, model, version, role, f"req-{i}", "v1", body, "x", outputs)


def request_batch(
    first: int,
    count: int,
    times: list[int] | None = None,
    source: str = "srv",
    model: str = "fraud",
    rows: list[int] | None = None,
    versions: list[str] | None = None,
    roles: list[str] | None = None,
) -> RequestBatch:
    """Requests ``first`` to ``first + count`` as the log writer reads them: request ``i`` at
    ``times[i]`` (default T0 + i), of ``rows[i]`` rows (default 1 + i % 2), version 1 + i % 2;
    event ids ``source`` + hex."""
    lines = []
    for n, i in enumerate(range(first, first + count)):
        ts_ms = T0 + i if times is None else times[n]
        lines.append(
            logged(
                i,
                1 + i % 2 if rows is None else rows[n],
                ts_ms,
                str(1 + i % 2) if versions is None else versions[n],
                "stable" if roles is None else roles[n],
                model,
            )
            + b"\n"
        )
    batch = RequestBatch.scan(source, first, b"".join(lines))
    assert batch is not None
    return batch


def events_of(*batches: RequestBatch) -> list[InferenceEvent]:
    events = [e for batch in batches for r in batch.requests() if r is not None for e in r.events()]
    return sorted(events, key=lambda e: (e.ts_ms, e.event_id))


def test_a_request_is_stored_as_one_event_per_row(store):
    batch = request_batch(1, 3, rows=[1, 12, 0])
    result = store.write_requests([batch])
    store.refresh()
    assert (result.written, result.duplicates, result.rejected) == (14, 0, [])
    back = list(store.query("fraud", T0, T0 + 10))
    assert back == events_of(batch)
    assert [e.event_id for e in back] == sorted(e.event_id for e in back)  # srv2-10 before srv2-2
    assert back[13].status == "error" and back[13].error == "boom" and back[13].inputs == {}
    assert store.count("fraud", T0 + 2, T0 + 3) == 12 and store.count("fraud", T0, T0 + 10) == 14


def test_windows_filters_labels_and_latest_over_requests(store):
    roles = ["canary" if i == 3 else "stable" for i in range(6)]
    store.write_requests([request_batch(0, 6, rows=[2] * 6, roles=roles)])
    store.write_feedback([Feedback("req-4", 1, "fraud")])
    store.refresh()
    assert store.count("fraud", T0 + 1, T0 + 4) == 6
    assert store.count("fraud", T0, T0 + 10, version="2") == 6
    assert [e.event_id for e in store.query("fraud", T0, T0 + 10, role="canary")] == ["srv3-0", "srv3-1"]
    labels = {(x.event.request_id, x.event.row): x.label for x in store.labelled("fraud", T0 + 4, T0 + 5)}
    assert labels == {("req-4", 0): None, ("req-4", 1): "fraud"}
    assert [e.event_id for e in store.latest("fraud", 3)] == ["srv4-1", "srv5-0", "srv5-1"]


def test_batches_read_back_as_events_merged_in_time_order_with_single_events(store):
    """Two servers' batches overlap in time; single events lie among them. A window holds
    exactly its events, in time order, whatever batch they came in."""
    a = request_batch(0, 30, times=[T0 + 2 * i for i in range(30)], source="a")
    b = request_batch(0, 30, times=[T0 + 1 + 2 * i for i in range(30)], source="b")
    c = request_batch(0, 5, source="c", model="churn")
    result = store.write_requests([a, b, c])
    singles = [event(i, ts=T0 + i) for i in (5, 40, 70)]
    store.write(singles)
    store.refresh()
    assert (result.written, result.duplicates, result.rejected) == (a.rows + b.rows + c.rows, 0, [])
    everything = sorted(events_of(a, b) + singles, key=lambda e: (e.ts_ms, e.event_id))
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


def test_a_batch_sent_again_and_cut_elsewhere_is_stored_once(store):
    """A writer died reading a hand-over; the next one reads it again, cut in other places."""
    whole = request_batch(0, 12)
    first = store.write_requests([request_batch(0, 6)])
    again = store.write_requests([request_batch(0, 10), request_batch(10, 2)])
    overlap = store.write_requests([request_batch(3, 9)])
    store.refresh()
    assert (first.written, first.duplicates) == (9, 0)
    assert (again.written, again.duplicates) == (9, 9)
    assert (overlap.written, overlap.duplicates) == (0, 14)
    assert list(store.query("fraud", T0, T0 + 99)) == events_of(whole)
    assert store.count("fraud", T0, T0 + 99) == whole.rows == 18


def test_a_request_of_a_batch_that_cannot_be_read_is_refused_or_skipped_never_fatal(store):
    good = request_batch(0, 3)
    broken = good.body.replace(b'{"instances":[[1.0,0.0],[1.0,1.0]]}', b'{"instances":[[1.0,0.0],[1.0')
    assert broken != good.body
    batch = RequestBatch.scan("srv", 0, broken)
    assert batch is not None
    result = store.write_requests([batch])
    store.refresh()
    stats = ReadStats()
    assert [e.event_id for e in store.query("fraud", T0, T0 + 10, stats=stats)] == ["srv0-0", "srv2-0"]
    # The search stores expand on write and refuse it; the embedded store reads it only when asked.
    assert (len(result.rejected), stats.malformed) == ((0, 1) if store.kind == "sqlite" else (1, 0))


def test_batches_older_than_the_retention_are_pruned(store):
    day = 86_400_000
    store.write_requests([request_batch(0, 3, times=[T0 - 3 * day] * 3), request_batch(3, 2)])
    store.refresh()
    assert store.prune(T0 - day) >= 1
    store.refresh()
    assert list(store.query("fraud", T0 - 10 * day, T0 + 99)) == events_of(request_batch(3, 2))


# --- the embedded store's own ---------------------------------------------------------------------


def test_an_embedded_store_keeps_a_batch_of_far_apart_times_a_request_at_a_time(tmp_path):
    from monitoring.logstore.sqlite import MAX_SPAN_MS

    store = get_log_store(f"sqlite:///{tmp_path / 'inference.db'}")
    wide = request_batch(0, 3, times=[T0, T0 + MAX_SPAN_MS + 1, T0 + 5])
    assert store.write_requests([wide]).written == wide.rows
    assert list(store.query("fraud", T0, T0 + 10)) == [e for e in events_of(wide) if e.ts_ms < T0 + 10]
    assert store.count("fraud", T0, T0 + 2 * MAX_SPAN_MS) == wide.rows
    assert store.write_requests([wide]).duplicates == wide.rows  # sent again: stored once
    with sqlite3.connect(tmp_path / "inference.db") as db:
        assert db.execute("SELECT COUNT(*), MAX(count) FROM requests").fetchone() == (3, 1)


def test_an_embedded_store_of_another_layout_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "inference.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE records (key TEXT)")
        db.execute("PRAGMA user_version = 3")
        db.execute("INSERT INTO records VALUES ('kept')")
    with pytest.raises(ConfigError, match=r"was made by another layout \(user_version 3"):
        get_log_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("records",)]
        assert db.execute("SELECT key FROM records").fetchall() == [("kept",)]
        assert db.execute("PRAGMA user_version").fetchone() == (3,)


def test_a_corrupt_embedded_store_is_a_refusal_not_an_outage(tmp_path):
    """Retrying cannot mend a corrupt file: the writer must not spool for ever behind it."""
    path = tmp_path / "inference.db"
    store = get_log_store(f"sqlite:///{path}")
    store.write([event(1)])
    store.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema pages
    path.write_bytes(bytes(data))
    for name in ("inference.db-wal", "inference.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(BackendRefused):
        broken = get_log_store(f"sqlite:///{path}")
        broken.write_requests([request_batch(0, 2)])


def test_an_embedded_store_locked_by_another_process_is_away_not_refusing(tmp_path):
    path = tmp_path / "inference.db"
    store = get_log_store(f"sqlite:///{path}?timeout_ms=200")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(BackendUnavailable):
            store.write_requests([request_batch(0, 2)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.write_requests([request_batch(0, 2)]).written == 3


def test_a_window_of_many_small_batches_reads_whole_across_pages(store):
    """A quiet model hands over a request at a time: more batches than one page of the store's
    reads holds, read back exactly, newest and oldest alike."""
    from monitoring.logstore.sqlite import BATCH_PAGE

    count = BATCH_PAGE * 2 + 37
    batches = [request_batch(i, 1, rows=[1], source="q") for i in range(count)]
    store.write_requests(batches)
    store.refresh()
    assert [e.event_id for e in store.query("fraud", T0, T0 + count)] == [f"q{i:x}-0" for i in range(count)]
    assert store.count("fraud", T0 + 1, T0 + count - 1) == count - 2
    assert [e.event_id for e in store.latest("fraud", 3)] == [f"q{i:x}-0" for i in range(count - 3, count)]
    assert store.known_requests(["req-0", f"req-{count - 1}", "nope"], T0 - 1) == {
        "req-0",
        f"req-{count - 1}",
    }


def test_window_summaries_replace_by_id_and_read_back_oldest_first(store):
    def summary(end: int, decision: str = "ok", model: str = "fraud") -> dict:
        return {"id": f"{model}:1:{end - 10}:{end}", "model": model, "version": "1", "start_ms": end - 10,
                "end_ms": end, "decision": decision, "histograms": {"amount": [1, 2, 3]}, "emitted": False}  # fmt: skip

    assert store.windows("fraud", T0 + 100, 10) == []
    for end in (T0 + 10, T0 + 20, T0 + 30):
        store.write_window(summary(end))
    store.write_window(summary(T0 + 20, "tripped"))  # a re-run of the same window replaces it
    store.write_window(summary(T0 + 20, model="other"))
    found = store.windows("fraud", T0 + 30, 10)
    assert [w["end_ms"] for w in found] == [T0 + 10, T0 + 20, T0 + 30]
    assert found[1]["decision"] == "tripped" and found[1]["histograms"] == {"amount": [1, 2, 3]}
    assert [w["end_ms"] for w in store.windows("fraud", T0 + 25, 1)] == [T0 + 20]


def test_blocks_hold_the_windows_rows_as_query_gives_them(store):
    store.write([event(i) for i in range(30)])
    store.refresh()
    stats = ReadStats()
    blocks = list(store.blocks("fraud", T0 + 5, T0 + 25, stats=stats))
    rows = [(b.request_id, b.first_row + r, b.inputs["amount"][r]) for b in blocks for r in range(b.rows)]
    expected = [(e.request_id, e.row, e.inputs["amount"]) for e in store.query("fraud", T0 + 5, T0 + 25)]
    assert sorted(rows) == sorted(expected) and len(rows) == 20 and stats.malformed == 0


def test_blocks_of_logged_requests_keep_their_rows_and_errors(store):
    batch = request_batch(1, 3, rows=[1, 12, 0])
    store.write_requests([batch])
    store.refresh()
    blocks = list(store.blocks("fraud", T0, T0 + 10))
    ok = sorted((b.request_id, b.first_row + r) for b in blocks if b.status == "ok" for r in range(b.rows))
    expected = sorted((e.request_id, e.row) for e in events_of(batch) if e.status == "ok")
    assert ok == expected and sum(b.rows for b in blocks if b.status == "error") == 1
    assert sum(b.rows for b in blocks) == 14


def test_request_labels_are_every_label_of_those_requests(store):
    store.write_requests([request_batch(0, 3, rows=[2, 2, 2])])
    store.write_feedback(
        [Feedback("req-1", 0, "fraud"), Feedback("req-1", 1, "legit"), Feedback("req-2", 1, "x")]
    )
    store.refresh()
    assert store.request_labels(["req-1", "req-9"]) == {("req-1", 0): "fraud", ("req-1", 1): "legit"}
    assert store.request_labels([]) == {}
