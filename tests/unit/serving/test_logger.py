"""The inference logger against a store that goes away: spool, replay in order, nothing lost."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mlops.errors import BackendUnavailable
from monitoring.events import Feedback, InferenceRequest, MalformedEvent
from monitoring.logstore import WriteResult
from serving.logger import InferenceLogger, LogWriter, Spool, decode, encode, encode_request


class FlakyStore:
    """A LogStore in memory that can be switched off (it then refuses every write)."""

    url = "memory://"

    def __init__(self) -> None:
        self.events: dict[str, object] = {}
        self.order: list[str] = []
        self.labels: dict[str, object] = {}
        self.up = threading.Event()
        self.up.set()
        self.closed = False

    def write_requests(self, requests):
        return self.write([e for r in requests for e in r.events()])

    def write(self, events):
        if not self.up.is_set():
            raise BackendUnavailable("store is down")
        written = 0
        for event in events:
            if event.event_id not in self.events:
                self.events[event.event_id] = event
                self.order.append(event.event_id)
                written += 1
        return WriteResult(written, len(events) - written, [])

    def write_feedback(self, feedback):
        if not self.up.is_set():
            raise BackendUnavailable("store is down")
        self.labels.update({f.key: f.label for f in feedback})
        return len(feedback)

    def close(self):
        self.closed = True


def request(i: int, rows: int = 2) -> InferenceRequest:
    return InferenceRequest(
        event_id=f"{i:06d}", ts_ms=1_000 + i, model="fraud", version="1", role="stable", request_id=f"req-{i}",
        latency_ms=0.4, inputs={"amount": np.arange(rows, dtype=np.float64) + i, "country": np.asarray(["DE"] * rows, dtype=object)},
        outputs={"label": np.asarray(["legit"] * rows, dtype=object), "probabilities": np.full((rows, 2), 0.5, np.float32)},
    )  # fmt: skip


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def record(i: int, rows: int = 2):
    return request(i, rows).logged()


def test_a_request_becomes_one_event_per_row_with_plain_values():
    events = request(7, rows=3).events()
    assert [e.event_id for e in events] == ["000007-0", "000007-1", "000007-2"]
    assert events[1].inputs == {"amount": 8.0, "country": "DE"}
    assert events[1].outputs == {"label": "legit", "probabilities": [0.5, 0.5]}
    assert {e.request_id for e in events} == {"req-7"} and [e.row for e in events] == [0, 1, 2]


def test_a_failed_request_is_one_error_event():
    failed = InferenceRequest("e", 1, "fraud", "1", "stable", "r", 2.0, {}, {}, status="error", error="boom")
    (event,) = failed.events()
    assert (event.status, event.error, event.inputs) == ("error", "boom", {})


def test_an_outage_spools_and_everything_arrives_in_order_after_it(tmp_path):
    store = FlakyStore()
    logger = LogWriter(store, tmp_path / "spool", batch_events=10, flush_ms=20, retry_s=0.05)
    for i in range(50):
        logger.submit(record(i))
    wait_until(lambda: len(store.events) == 100)
    store.up.clear()
    for i in range(50, 120):
        logger.submit(record(i))
    wait_until(lambda: logger.spool.events == 140)
    assert len(store.events) == 100
    store.up.set()
    wait_until(lambda: len(store.events) == 240)
    logger.close()
    assert store.order == sorted(store.order)  # replayed oldest first, new ones behind
    assert logger.spool.events == 0 and not logger.spool.files()


def test_a_clean_stop_drains_the_queue_to_the_spool_and_the_next_logger_replays_it(tmp_path):
    store = FlakyStore()
    store.up.clear()
    first = LogWriter(store, tmp_path / "spool", batch_events=1000, flush_ms=5000)
    for i in range(30):
        first.submit(record(i))
    first.submit([Feedback("req-3", 1, "fraud")])
    first.close()
    assert store.closed and len(store.events) == 0
    assert Spool(tmp_path / "spool").events == 60 + 1

    store.up.set()
    second = LogWriter(FlakyStore(), tmp_path / "spool", batch_events=10, flush_ms=20, retry_s=0.05)
    wait_until(lambda: len(second.store.events) == 60)
    wait_until(lambda: second.store.labels == {"req-3:1": "fraud"})
    second.close()


def test_a_spool_line_cut_short_by_a_crash_is_skipped_not_fatal(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.append([record(1)])
    with spool.files()[0].open("ab") as handle:
        handle.write(encode(record(2))[:-20])  # the crash
    replayed = []
    spool.replay(lambda requests, feedback, events: replayed.extend(requests), chunk=100)
    assert [e.event_id for r in replayed for e in r.events()] == ["000001-0", "000001-1"]
    assert not spool.files()


def test_records_cross_the_pipe_unchanged():
    original = request(5, rows=3)
    back = decode(encode(original.logged()))
    assert back == original.logged()
    assert back.events() == original.events()
    labels = [Feedback("req-5", 0, {"lost": 3.5}), Feedback("req-5", 1, "legit")]
    assert decode(encode(labels)) == labels


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    from serving.logger import DROPPED

    # A writer that never reads, and a hand-over that waits a minute: the queue fills at 100.
    logger = InferenceLogger(["sleep", "60"], queue_events=100, flush_ms=60_000)
    before = DROPPED._value.get()
    began = time.perf_counter()
    for i in range(150):
        logger.log(request(i))
    assert time.perf_counter() - began < 0.5
    assert DROPPED._value.get() - before == 2 * 50
    assert logger.depth == 100
    logger.close(timeout_s=2)


def test_the_writer_process_stores_what_the_model_server_hands_over(tmp_path, monkeypatch):
    import sys

    from monitoring.logstore import get_log_store
    from serving.logger import WRITTEN

    url = f"sqlite:///{tmp_path / 'inference.db'}"
    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MLOPS_LOGS__STORE", url)
    before = WRITTEN._value.get()
    logger = InferenceLogger([sys.executable, "-m", "serving.logger"], flush_ms=20)
    for i in range(40):
        logger.log(request(i))
    logger.feedback([Feedback("req-1", 0, "fraud")])
    logger.close()
    store = get_log_store(url)
    assert store.count("fraud", 0, 2**62) == 80
    assert [x.label for x in store.labelled("fraud", 0, 2**62) if x.event.request_id == "req-1"] == [
        "fraud",
        None,
    ]
    wait_until(lambda: WRITTEN._value.get() - before == 80)  # the writer's counts reach /metrics


def test_a_request_of_many_rows_lists_its_events_in_event_id_order():
    events = request(1, rows=12).events()
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)
    assert sorted(e.row for e in events) == list(range(12))
    assert all(e.inputs["amount"] == 1.0 + e.row for e in events)


def test_a_logged_request_is_its_header_and_its_payload():
    logged = request(3, rows=4).logged()
    assert (logged.event_id, logged.model, logged.request_id, logged.rows) == ("000003", "fraud", "req-3", 4)
    assert logged.events() == request(3, rows=4).events()
    assert encode_request(request(3, rows=4)) == encode(logged)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"x{}\n",
        b"r[1,2]\t{}\n",
        b"rnot json\t{}\n",
        b"r" + b'["a",1,"m","1","stable","q",1]' + b"\n",
        b"f{]\n",
    ],
)
def test_an_unreadable_pipe_line_is_malformed_not_a_crash(line):
    with pytest.raises(MalformedEvent):
        decode(line)


@pytest.mark.parametrize(
    "change",
    [
        {"schema_version": 99},
        {"status": "maybe"},
        {"inputs": {"amount": [1.0, 2.0], "country": ["DE"]}},
        {"latency_ms": "noon"},
        {"inputs": None},
        {"rows": 3},
        {"ts_ms": "noon"},
    ],
)
def test_a_logged_request_that_does_not_fit_is_malformed(change):
    import orjson

    logged = request(1).logged()
    header = {k: v for k, v in change.items() if k in logged._fields}
    body = orjson.loads(logged.body) | {k: v for k, v in change.items() if k not in header}
    with pytest.raises(MalformedEvent):
        logged._replace(**header, body=orjson.dumps(body)).events()


def test_a_spool_of_the_first_layout_is_replayed_too(tmp_path):
    """Spool files written before requests were kept whole (a JSON event per line) still arrive."""
    import orjson

    folder = tmp_path / "spool"
    folder.mkdir()
    old_events = request(1, rows=3).events()
    lines = [orjson.dumps({"e": e.to_dict()}) for e in old_events] + [
        orjson.dumps({"f": Feedback("req-1", 2, "fraud").to_dict()})
    ]
    (folder / "spool-000000007.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert Spool(folder).events == 4
    store = FlakyStore()
    writer = LogWriter(store, folder, batch_events=10, flush_ms=20, retry_s=0.05)
    writer.submit(record(2))
    wait_until(lambda: len(store.events) == 5)
    writer.close()
    assert store.order[:3] == [e.event_id for e in old_events]  # the old spool first, in order
    assert store.labels == {"req-1:2": "fraud"} and not list(folder.iterdir())
