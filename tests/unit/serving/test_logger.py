"""The inference log's way in: the request path's lines, the pipe, the writer, the spool."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from common.errors import BackendRefused, BackendUnavailable
from monitoring.events import Feedback, MalformedEvent, RequestBatch, decode_request, encode_request
from monitoring.logstore import WriteResult
from serving.logger import spool as spool_module
from serving.logger.client import InferenceLogger
from serving.logger.spool import Spool, adopt, worker_folder
from serving.logger.wire import IOV_MAX, PipeReader, encode, id_line, write_all
from serving.logger.writer import LogWriter
from serving.signature import RequestDecoder, Signature, TensorSpec


class FlakyStore:
    """A LogStore in memory that can be switched off (BackendUnavailable), made to refuse
    (``refuse``: an exception to raise), or held (every write waits until ``held`` is set)."""

    url = "memory://"

    def __init__(self) -> None:
        self.events: dict[str, object] = {}
        self.order: list[str] = []
        self.labels_: dict[str, object] = {}
        self.up = threading.Event()
        self.up.set()
        self.held = threading.Event()
        self.held.set()
        self.refuse: Exception | None = None
        self.writes = 0
        self.closed = False

    def _check(self) -> None:
        self.held.wait(30)
        if not self.up.is_set():
            raise BackendUnavailable("store is down")
        if self.refuse is not None:
            raise self.refuse

    def write_requests(self, batches):
        self._check()
        self.writes += 1
        events = [e for b in batches for r in b.requests() if r is not None for e in r.events()]
        written = 0
        for event in events:
            if event.event_id not in self.events:
                self.events[event.event_id] = event
                self.order.append(event.event_id)
                written += 1
        return WriteResult(written, len(events) - written, [])

    def write_feedback(self, feedback):
        self._check()
        written = 0
        for label in feedback:  # one by one: the first label of a key stays, unless overwritten
            if label.overwrite or label.key not in self.labels_:
                self.labels_[label.key] = label.label
                written += 1
        return WriteResult(written, len(feedback) - written, [])

    def known_requests(self, request_ids, since_ms):
        return {e.request_id for e in self.events.values()} & set(request_ids)

    def close(self):
        self.closed = True


T0_S = 1_790_000_000.0


def line(i: int, rows: int = 2, model: str = "fraud", ts_s: float | None = None) -> bytes:
    """Request ``i`` as the model server logs it: a V1 body of ``rows`` rows, and its outputs."""
    body = orjson.dumps({"instances": [{"amount": float(i + row), "country": "DE"} for row in range(rows)]})
    outputs = {"label": np.asarray(["legit"] * rows, dtype=object), "probabilities": np.full((rows, 2), 0.5)}
    ts = T0_S + i / 1000 if ts_s is None else ts_s
    return encode_request(ts, 0.0004, model, "1", "stable", f"req-{i}", "v1", body, None, outputs) + b"\n"


def batch(first: int, count: int, rows: int = 2, source: str = "srv") -> RequestBatch:
    found = RequestBatch.scan(source, first, b"".join(line(i, rows) for i in range(first, first + count)))
    assert found is not None
    return found


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def writer(store, tmp_path: Path, max_bytes: int = 1 << 30, **options: Any) -> LogWriter:
    options = {"batch_events": 10, "flush_ms": 20, "retry_s": 0.05} | options
    return LogWriter(
        store, Spool(tmp_path / "spool", max_bytes), Spool(tmp_path / "dead", max_bytes), **options
    )


# --- a logged request -----------------------------------------------------------------------------


def test_a_logged_request_becomes_one_event_per_row_with_plain_values():
    request = decode_request("srv7", line(7, rows=3)[:-1])
    assert (request.model, request.request_id, request.rows, request.latency_ms) == ("fraud", "req-7", 3, 0.4)
    events = request.events()
    assert [e.event_id for e in events] == ["srv7-0", "srv7-1", "srv7-2"]
    assert events[1].inputs == {"amount": 8.0, "country": "DE"}
    assert events[1].outputs == {"label": "legit", "probabilities": [0.5, 0.5]}
    assert {e.request_id for e in events} == {"req-7"} and [e.row for e in events] == [0, 1, 2]


def test_a_failed_request_is_one_error_event_with_no_inputs():
    payload = encode_request(T0_S, 0.002, "fraud", "1", "canary", "r", "v1", b"{}", None, {}, "boom")
    (event,) = decode_request("srv1", payload).events()
    assert (event.status, event.error, event.inputs, event.role) == ("error", "boom", {}, "canary")


def test_a_request_of_many_rows_lists_its_events_in_event_id_order():
    events = decode_request("srv1", line(1, rows=12)[:-1]).events()
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)
    assert sorted(e.row for e in events) == list(range(12))
    assert all(e.inputs["amount"] == 1.0 + e.row for e in events)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"[1,", b"[9,"),  # the schema version
        (b"\t", b" "),  # no head
        (b',"v1",', b',"v7",'),  # the protocol
        (b',2,"fraud"', b',0,"fraud"'),  # no rows
        (b',2,"fraud"', b',"2","fraud"'),
        (b',"fraud",', b",7,"),  # the model
        (b"null,{", b"null,["),  # outputs that are not named
        (b"]]},null]", b']]},"boom"]'),  # an error with two rows
    ],
)
def test_a_logged_request_whose_head_does_not_fit_is_malformed(old, new):
    payload = line(1)[:-1]
    assert old in payload
    with pytest.raises(MalformedEvent):
        decode_request("srv1", payload.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"instances":[{', b'"rows":[{'),
        (
            b'"instances":[{"amount":1.0,"country":"DE"},',
            b'"instances":[',
        ),  # rows that disagree with the head
        (b'"instances"', b"instances"),  # not JSON
    ],
)
def test_a_logged_request_whose_body_does_not_fit_is_malformed_when_read(old, new):
    payload = line(1)[:-1]
    assert old in payload
    request = decode_request("srv1", payload.replace(old, new, 1))  # its head is fine
    with pytest.raises(MalformedEvent):
        request.events()


# --- the pipe ---------------------------------------------------------------------------------


def test_items_cross_the_pipe_unchanged_however_it_is_cut():
    labels = [Feedback("req-5", 0, {"lost": 3.5}), Feedback("req-5", 1, "legit", overwrite=True)]
    items = [batch(0, 3), labels, batch(3, 2, source="other")]
    data = b"".join(map(encode, items))
    for size in (1, 7, 4096, len(data)):
        pipe = PipeReader()
        fed = [item for start in range(0, len(data), size) for item in pipe.feed(data[start : start + size])]
        assert merged(fed) == merged(items) and pipe.rest == b"" and pipe.malformed == 0


def merged(items: list[Any]) -> list[Any]:
    """The items, each batch as its requests' (event id, line): how a batch was cut does not matter."""
    out = []
    for item in items:
        if isinstance(item, RequestBatch):
            out += [(item.event_id(i), text) for i, text in enumerate(item.body.split(b"\n")[:-1])]
        else:
            out.append(item)
    return out


@pytest.mark.parametrize(
    "bad",
    [
        b"x{}\n",
        b"i[1,2]\n",
        b"i{]\n",
        b"f{]\n",
        b'f[{"request_id": "q"}]\n',
        b'f[{"request_id":"q","row":0,"label":1,"ts_ms":5,"overwrite":"yes"}]\n',
    ],
)
def test_an_unreadable_line_is_skipped_and_counted_and_the_others_arrive(bad):
    pipe = PipeReader()
    fed = pipe.feed(encode(batch(0, 2)) + bad + encode([Feedback("req-1", 0, "fraud", ts_ms=5)]))
    assert pipe.malformed == 1
    assert merged(fed) == merged([batch(0, 2), [Feedback("req-1", 0, "fraud", ts_ms=5)]])


def test_a_request_line_that_cannot_be_read_keeps_its_number_so_the_others_keep_their_ids():
    good = [line(i) for i in range(4)]
    data = id_line("srv", 10) + good[0] + good[1] + b"[1]\t{}\n" + good[2] + good[3][:20]
    pipe = PipeReader()
    fed = pipe.feed(data)
    assert [(b.first, b.count) for b in fed] == [(10, 2), (13, 1)]
    assert pipe.malformed == 1 and pipe.rest == good[3][:20]


def test_a_hand_over_of_more_lines_than_one_writev_takes_arrives_whole_and_in_order():
    lines = [b"a%d\n" % i * (1 + i % 7) for i in range(3 * IOV_MAX + 5)]
    read_end, write_end = os.pipe()
    received = bytearray()

    def read() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    write_all(write_end, lines)
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    assert bytes(received) == b"".join(lines)


# --- the model server's side: the request path, numbered hand-overs ---------------------------

FRAUD = Signature(
    inputs=(TensorSpec("amount", "FP64", (-1,)), TensorSpec("country", "BYTES", (-1,))),
    outputs=(TensorSpec("label", "BYTES", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
    source="mlflow",
)
WIDE = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "INT64", (-1,)),), "onnx")


def handed_over(tmp_path: Path, *groups: list[Any], flush_ms: float = 600_000) -> bytes:
    """What InferenceLogger hands its writer for these groups of ``answered`` calls (or callables
    given the logger), the groups a flush interval apart, to a process that keeps it in a file."""
    out = tmp_path / f"pipe-{time.monotonic_ns()}"
    keep = "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, open(sys.argv[1], 'wb'))"
    logger = InferenceLogger([sys.executable, "-c", keep, str(out)], flush_ms=flush_ms)
    for number, group in enumerate(groups):
        if number:
            time.sleep(3 * flush_ms / 1000)
        for args in group:
            args(logger) if callable(args) else logger.answered(*args)
    logger.close()
    return out.read_bytes()


def answered(signature: Signature, protocol: str, body: bytes, model: str = "fraud") -> tuple[Any, ...]:
    """The arguments of ``InferenceLogger.answered`` for a body the model server's decoder accepted."""
    decoder = RequestDecoder(model, "4", signature, max_batch_rows=100)
    inputs = decoder.v2(orjson.loads(body)) if protocol == "v2" else decoder.v1(orjson.loads(body))
    rows = len(next(iter(inputs.values())))
    outputs = {"label": np.asarray(["legit"] * rows, dtype=object), "probabilities": np.full((rows, 2), 0.5)}
    now = time.perf_counter()
    return (now - 0.0004, now, model, "4", "stable", "req-3", protocol, body, decoder.row_input, outputs)


def requests_of(data: bytes) -> list[Any]:
    """The requests (decoded heads) in pipe bytes, in order."""
    return [r for item in PipeReader().feed(data) if isinstance(item, RequestBatch) for r in item.requests()]


@pytest.mark.parametrize(
    ("signature", "protocol", "body", "inputs"),
    [
        (
            FRAUD,
            "v1",
            b'{"instances": [\n\t{"amount": 1.5, "country": "DE"},\n\t{"amount": 2, "country": "a\\tb\\nc"}\n]}',
            [{"amount": 1.5, "country": "DE"}, {"amount": 2, "country": "a\tb\nc"}],
        ),
        (WIDE, "v1", b'{"instances": [[1, 2, 3], [4, 5, 6.5]]}', [{"x": [1, 2, 3]}, {"x": [4, 5, 6.5]}]),
        (
            WIDE,
            "v2",
            b'{"id": "7", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1,2,3,4,5,6]}]}',
            [{"x": [1, 2, 3]}, {"x": [4, 5, 6]}],
        ),
        (
            WIDE,
            "v2",
            b'{"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1,2,3],[4,5,6]]}]}',
            [{"x": [1, 2, 3]}, {"x": [4, 5, 6]}],
        ),
        (  # nested otherwise than the shape: the server reshapes it, and so does the reader
            WIDE,
            "v2",
            b'{"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1,2],[3,4],[5,6]]}]}',
            [{"x": [1, 2, 3]}, {"x": [4, 5, 6]}],
        ),
        (
            Signature((TensorSpec("img", "UINT8", (-1, 2, 2)),), (), "onnx"),
            "v2",
            b'{"inputs": [{"name": "img", "shape": [2, 2, 2], "datatype": "UINT8", "data": [1,2,3,4,5,6,7,8]}]}',
            [{"img": [[1, 2], [3, 4]]}, {"img": [[5, 6], [7, 8]]}],
        ),
    ],
)
def test_an_answered_request_is_logged_as_its_body_and_read_as_columns(
    tmp_path, signature, protocol, body, inputs
):
    began = time.time()
    [request] = requests_of(handed_over(tmp_path, [answered(signature, protocol, body)]))
    assert (request.model, request.version, request.role, request.request_id, request.rows) == (
        "fraud", "4", "stable", "req-3", 2,
    )  # fmt: skip
    assert began * 1000 - 1 <= request.ts_ms <= time.time() * 1000
    events = request.events()
    assert [e.event_id for e in events] == [f"{request.event_id}-0", f"{request.event_id}-1"]
    assert [e.inputs for e in events] == inputs  # values as the client sent them
    assert [e.outputs for e in events] == [{"label": "legit", "probabilities": [0.5, 0.5]}] * 2
    assert all(0.4 <= e.latency_ms < 1000 for e in events)


def test_the_request_path_writes_the_bytes_encode_request_defines(tmp_path):
    """InferenceLogger.answered makes its line inline (a call costs on the request path): the same
    bytes as monitoring.events.encode_request, which the readers and the benchmark go by."""
    args = answered(FRAUD, "v1", b'{"instances": [\n{"amount": 1.5, "country": "DE"}]}')
    data = handed_over(tmp_path, [args])
    request_line = data.split(b"\n")[1]
    _, ts_s, latency_s, *_ = orjson.loads(request_line[: request_line.index(b"\t")])
    started, ended, model, version, role, request_id, protocol, body, row_input, outputs = args
    # Its time is the wall clock's at ``ended`` (one perf_counter read on the request path).
    assert latency_s == pytest.approx(ended - started) and abs(ts_s - time.time()) < 5
    expected = encode_request(
        ts_s,
        latency_s,
        model,
        version,
        role,
        request_id,
        protocol,
        body.replace(b"\n", b" "),
        row_input,
        outputs,
    )
    assert request_line == expected


def test_requests_are_numbered_by_hand_over_and_a_resent_hand_over_keeps_its_ids(tmp_path):
    """Event ids come from the logger's count, not the writer's: a hand-over sent again to a new
    writer (the first died reading it) gets the same ids, so the store keeps it once. A failed
    request takes its number too; labels take none."""
    request = answered(WIDE, "v1", b'{"instances": [[1, 2, 3]]}')

    def failed(logger: InferenceLogger) -> None:
        logger.failed(time.perf_counter(), "fraud", "4", "stable", "q", "v1", "boom")

    def labels(logger: InferenceLogger) -> None:
        logger.feedback([Feedback("req-1", 0, "fraud")])

    data = handed_over(
        tmp_path, [request, failed, request, labels, request], [labels, request] * 2, flush_ms=50
    )
    lines = data.splitlines(keepends=True)
    prefix = orjson.loads(lines[0][1:])[0]
    requests = requests_of(data)
    assert [r.event_id for r in requests] == [f"{prefix}{n}" for n in range(6)]
    assert [r.error for r in requests] == [None, "boom", None, None, None, None]
    assert requests_of(data) == requests  # read again: the same ids
    # Each hand-over starts with the number of the requests handed over before it.
    for position, text in enumerate(lines):
        if text.startswith(b"i"):
            assert orjson.loads(text[1:]) == [prefix, sum(x.startswith(b"[") for x in lines[:position])]
    # A hand-over's requests come first (one batch), then its labels.
    kinds = [type(item).__name__ for item in PipeReader().feed(data)]
    assert kinds == ["RequestBatch", "list", "RequestBatch", "list", "list"]


def test_a_hand_over_is_one_batch_its_times_rows_and_models_found_without_a_parse(tmp_path):
    one = answered(WIDE, "v1", b'{"instances": [[1, 2, 3]]}')
    two = answered(WIDE, "v1", b'{"instances": [[1, 2, 3], [4, 5, 6]]}')
    other = answered(WIDE, "v1", b'{"instances": [[1, 2, 3]]}', model="other")
    data = handed_over(tmp_path, [one, two, other, two])
    [found] = PipeReader().feed(data)
    assert (found.count, found.rows, found.models, found.first) == (4, 6, ("fraud", "other"), 0)
    times = [r.ts_ms for r in found.requests()]
    assert (found.ts_min_ms, found.ts_max_ms) == (min(times), max(times))
    assert found.body == data[data.index(b"\n") + 1 :]
    assert [r.rows for r in found.requests()] == [1, 2, 1, 2]


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    from serving.logger.client import DROPPED

    # A writer that never reads, and a hand-over that waits a minute: the queue fills at 100.
    logger = InferenceLogger(["sleep", "60"], queue_events=100, flush_ms=60_000)
    dropped = DROPPED.labels("queue_full")
    before = dropped._value.get()
    args = answered(
        FRAUD, "v1", b'{"instances": [{"amount": 1, "country": "DE"}, {"amount": 2, "country": "FR"}]}'
    )
    began = time.perf_counter()
    for _ in range(130):
        logger.answered(*args)
    for _ in range(10):
        logger.failed(time.perf_counter(), "fraud", "4", "stable", "q", "v1", "boom")
    assert time.perf_counter() - began < 0.5
    assert dropped._value.get() - before == 2 * 30 + 10  # the rows of the requests past the 100th
    # Labels have a queue of their own, as long.
    assert all(logger.feedback([Feedback("r", 0, 1)]) for _ in range(100))
    assert not logger.feedback([Feedback("r", 0, 1)])
    assert logger.depth == 200
    logger.close(timeout_s=2)


def test_the_writer_process_stores_what_the_model_server_hands_over(tmp_path, monkeypatch):
    from monitoring.logstore import get_log_store
    from serving.logger.client import WRITTEN

    url = f"sqlite:///{tmp_path / 'inference.db'}"
    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MLOPS_LOGS__STORE", url)
    before = WRITTEN._value.get()
    logger = InferenceLogger([sys.executable, "-m", "serving.logger"], flush_ms=20)
    body = b'{"instances": [{"amount": 3, "country": "FR"}, {"amount": 4, "country": "DE"}]}'
    outputs = {"label": np.asarray(["legit"] * 2, dtype=object), "probabilities": np.full((2, 2), 0.5)}
    began = time.time()
    for i in range(40):
        now = time.perf_counter()
        logger.answered(now - 0.002, now, "fraud", "1", "stable", f"req-{i}", "v1", body, None, outputs)
    logger.failed(time.perf_counter(), "fraud", "1", "canary", "req-x", "v1", "boom")
    logger.feedback([Feedback("req-1", 0, "fraud")])
    logger.close()
    store = get_log_store(url)
    assert store.count("fraud", 0, 2**62) == 81
    first = [e for e in store.query("fraud", 0, 2**62) if e.request_id == "req-0"]
    assert [e.inputs for e in first] == [{"amount": 3, "country": "FR"}, {"amount": 4, "country": "DE"}]
    assert first[0].outputs == {"label": "legit", "probabilities": [0.5, 0.5]}
    assert 2 <= first[0].latency_ms < 1000
    assert began * 1000 - 1 <= first[0].ts_ms <= time.time() * 1000
    [error] = [e for e in store.query("fraud", 0, 2**62) if e.request_id == "req-x"]
    assert (error.status, error.error, error.role) == ("error", "boom", "canary")
    assert [x.label for x in store.labelled("fraud", 0, 2**62) if x.event.request_id == "req-1"] == [
        "fraud",
        None,
    ]
    wait_until(lambda: WRITTEN._value.get() - before == 81)  # the writer's counts reach /metrics


# --- the writer: outages, refusals, bounds ------------------------------------------------------


def test_the_writers_counts_reach_metrics_with_the_reason_of_what_was_dead_lettered():
    from serving.logger.client import DEAD_LETTERED, DROPPED, FEEDBACK_UNKNOWN
    from serving.logger.writer import COUNTS

    stats = dict.fromkeys(COUNTS, 0) | {"spool_events": 0, "store_up": 1}
    reports = [
        stats | {"dropped": 4, "dead_lettered": 10, "dead_lettered_by": {"BackendRefused": 10}},
        stats | {"dropped": 6, "dead_lettered": 13, "feedback_unknown": 2,
                 "dead_lettered_by": {"BackendRefused": 10, "KeyError": 3}},
    ]  # fmt: skip
    script = f"import sys; print({orjson.dumps(reports[0]).decode()!r}); print({orjson.dumps(reports[1]).decode()!r}, flush=True); sys.stdin.read()"
    before = [DEAD_LETTERED.labels(r)._value.get() for r in ("BackendRefused", "KeyError")]
    dropped, unknown = DROPPED.labels("writer")._value.get(), FEEDBACK_UNKNOWN._value.get()
    logger = InferenceLogger([sys.executable, "-c", script], flush_ms=60_000)
    wait_until(lambda: DEAD_LETTERED.labels("KeyError")._value.get() == before[1] + 3)
    assert DEAD_LETTERED.labels("BackendRefused")._value.get() == before[0] + 10
    assert DROPPED.labels("writer")._value.get() == dropped + 6
    assert FEEDBACK_UNKNOWN._value.get() == unknown + 2
    logger.close(timeout_s=5)


def test_an_outage_spools_and_everything_arrives_in_order_after_it(tmp_path):
    store = FlakyStore()
    logs = writer(store, tmp_path)
    for i in range(0, 50, 5):
        logs.submit(batch(i, 5))
    wait_until(lambda: len(store.events) == 100)
    store.up.clear()
    for i in range(50, 120, 5):
        logs.submit(batch(i, 5))
    wait_until(lambda: logs.spool.events == 140)
    assert len(store.events) == 100
    store.up.set()
    wait_until(lambda: len(store.events) == 240)
    logs.close()
    numbers = [int(e.split("-")[0][3:], 16) for e in store.order]
    assert numbers == sorted(numbers)  # replayed oldest first, new ones behind
    assert logs.spool.events == 0 and not logs.spool.files() and logs.stats["spooled"] == 140


def test_a_clean_stop_drains_the_queue_to_the_spool_and_the_next_writer_replays_it(tmp_path):
    store = FlakyStore()
    store.up.clear()
    first = writer(store, tmp_path, batch_events=1000, flush_ms=5000)
    for i in range(0, 30, 3):
        first.submit(batch(i, 3))
    first.submit([Feedback("req-3", 1, "fraud")])
    first.close()
    assert store.closed and len(store.events) == 0
    assert Spool(tmp_path / "spool", 1 << 30).events == 60 + 1

    second = writer(FlakyStore(), tmp_path)
    wait_until(lambda: len(second.store.events) == 60)
    wait_until(lambda: second.store.labels_ == {"req-3:1": "fraud"})
    second.close()


def test_a_spool_line_cut_short_by_a_crash_is_skipped_not_fatal(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 30)
    spool.append([batch(1, 1)])
    with spool.files()[0].open("ab") as handle:
        handle.write(encode(batch(2, 1))[:-20])  # the crash
    replayed: list[Any] = []
    spool.replay(replayed.extend)
    assert merged(replayed) == merged([batch(1, 1)])
    assert not spool.files() and spool.events == 0


def test_worker_zero_adopts_the_spools_of_workers_that_no_longer_run(tmp_path):
    base = tmp_path / "spool"
    Spool(base, 1 << 30).append([batch(0, 1)])
    Spool(worker_folder(base, 1), 1 << 30).append([batch(10, 1)])  # worker 1 still runs: kept
    gone = Spool(worker_folder(base, 3), 1 << 30, file_bytes=10)  # a server of 4 workers, before
    gone.append([batch(20, 1)])
    gone.append([batch(30, 2)])
    (tmp_path / "spool-notes").mkdir()  # not a worker's folder
    assert adopt(base, workers=2) == 2
    assert not worker_folder(base, 3).exists() and (tmp_path / "spool-notes").exists()
    assert Spool(worker_folder(base, 1), 1 << 30).events == 2
    replayed: list[Any] = []
    Spool(base, 1 << 30).replay(replayed.extend)  # its own file first, then the adopted ones in order
    assert merged(replayed) == merged([batch(0, 1), batch(20, 1), batch(30, 2)])
    assert adopt(base, workers=2) == 0


def test_a_spool_is_replayed_a_chunk_at_a_time_however_large(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "CHUNK_BYTES", 4096)
    spool = Spool(tmp_path / "spool", 1 << 30, file_bytes=50_000)
    for i in range(0, 400, 20):
        assert spool.append([batch(i, 20)])
    assert len(spool.files()) > 1 and Spool(tmp_path / "spool", 1 << 30).events == 800
    writes: list[list[Any]] = []
    spool.replay(writes.append)
    assert len(writes) > 20 and max(len(encode_all(w)) for w in writes) < 2 * 4096
    assert merged([i for w in writes for i in w]) == merged([batch(i, 20) for i in range(0, 400, 20)])
    assert not spool.files() and spool.events == 0 and spool.bytes == 0


def encode_all(items: list[Any]) -> bytes:
    return b"".join(map(encode, items))


def test_the_spool_is_capped_on_disk_and_what_does_not_fit_is_dropped_and_counted(tmp_path):
    size = sum(len(encode(batch(i, 5))) for i in (0, 5, 10))  # the first three batches fit
    store = FlakyStore()
    store.up.clear()
    logs = writer(store, tmp_path, max_bytes=size + 10, batch_events=10)
    for i in range(0, 50, 5):
        logs.submit(batch(i, 5))
    wait_until(lambda: logs.stats["spooled"] + logs.stats["dropped"] == 100)
    assert logs.stats["spooled"] == 30 and logs.stats["dropped"] == 70
    assert sum(p.stat().st_size for p in logs.spool.files()) == size
    store.up.set()
    wait_until(lambda: len(store.events) == 30)  # the oldest ones, kept, arrive
    logs.close()


def test_a_store_that_refuses_sends_batches_to_the_dead_letters_and_the_writer_carries_on(tmp_path):
    store = FlakyStore()
    store.refuse = BackendRefused("401: wrong credentials")
    logs = writer(store, tmp_path)
    label = [Feedback("req-0", 0, "fraud")]
    logs.submit(batch(0, 5))
    logs.submit(label)
    wait_until(lambda: logs.stats["dead_lettered"] == 11)
    assert logs.spool.events == 0  # not spooled: retrying would not help
    reasons = (tmp_path / "dead" / "reasons.log").read_text()
    assert "BackendRefused: 401: wrong credentials" in reasons
    kept = [i for path in logs.dead_letters.files() for i in PipeReader().feed(path.read_bytes())]
    assert merged(kept) == merged([batch(0, 5), label])
    store.refuse = None  # fixed: what comes next is stored
    logs.submit(batch(5, 5))
    wait_until(lambda: len(store.events) == 10)
    logs.close()


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("items"), TypeError("None")])
def test_an_unforeseen_store_error_does_not_stop_the_writer(tmp_path, error):
    store = FlakyStore()
    store.refuse = error
    logs = writer(store, tmp_path)
    logs.submit(batch(0, 5))
    wait_until(lambda: logs.stats["dead_lettered"] == 10)
    store.refuse = None
    logs.submit(batch(5, 5))
    wait_until(lambda: len(store.events) == 10)
    assert logs._thread.is_alive()
    logs.close()


def test_the_writers_queue_is_bounded_and_drops_count(tmp_path):
    store = FlakyStore()
    store.held.clear()  # the store takes its time: the queue fills
    logs = writer(store, tmp_path, queue_events=40)
    for i in range(0, 100, 5):
        logs.submit(batch(i, 5))
    assert logs.backlog <= 40  # what it holds (the batch being written is taken)
    assert logs.dropped >= 100 * 2 - 40 - 10  # at once: the store holds the writer's thread
    store.held.set()
    logs.close()
    assert len(store.events) + logs.stats["dropped"] == 200


def test_labels_are_kept_first_and_those_for_unknown_requests_are_counted(tmp_path):
    store = FlakyStore()
    logs = writer(store, tmp_path)
    logs.submit(batch(0, 2))
    logs.submit([Feedback("req-0", 0, "fraud"), Feedback("req-9", 0, "fraud")])
    logs.submit([Feedback("req-0", 0, "legit")])
    logs.submit([Feedback("req-1", 1, "legit"), Feedback("req-1", 1, "fraud", overwrite=True)])
    wait_until(lambda: logs.stats["feedback_kept"] == 1 and logs.stats["feedback_unknown"] == 1)
    logs.close()
    assert store.labels_ == {"req-0:0": "fraud", "req-9:0": "fraud", "req-1:1": "fraud"}


def test_hand_overs_spool_while_the_store_is_away_and_arrive_with_their_ids(tmp_path):
    """A batch the store could not take is spooled as it came (its id line and its lines) and
    replayed with the same event ids, by this writer or by the next one after a clean stop."""
    store = FlakyStore()
    store.up.clear()
    first = writer(store, tmp_path, batch_events=2)
    first.submit(batch(0, 3, rows=1))
    wait_until(lambda: first.spool.events == 3)
    first.close()
    assert Spool(tmp_path / "spool", 1 << 30).events == 3 and not store.events

    store.up.set()
    second = writer(store, tmp_path, batch_events=2)
    second.submit(batch(3, 2, rows=1))
    wait_until(lambda: len(store.events) == 5)
    second.close()
    assert store.order == [f"srv{i}-0" for i in range(5)]  # the spooled batch first, then the new one
    assert second.spool.events == 0 and not second.spool.files()


# --- the writer's CPU priority ------------------------------------------------------------------

PRIORITY_SCRIPT = """
import os
from serving.logger.writer import PIPE_BYTES, CpuPriority
backlog = [0, 0]
priority = CpuPriority(lambda: tuple(backlog), batch_events=100, patience=2)
seen = []
for unread, waiting in [
    (0, 0), (PIPE_BYTES // 2, 0), (0, 0), (PIPE_BYTES // 2, 0), (0, 2001),
    (PIPE_BYTES // 8, 1000), (0, 0), (0, 2001), (0, 2001), (0, 1001), (0, 1000),
]:
    backlog[:] = unread, waiting
    priority.update()
    seen.append(os.sched_getscheduler(0))
print(priority.usable, seen)
"""


def _priority_run() -> tuple[bool, str]:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", PRIORITY_SCRIPT], capture_output=True, text=True, check=True, timeout=60
    )
    usable, seen = done.stdout.split(" ", 1)
    return usable == "True", seen.strip()


def test_the_writer_leaves_the_cpu_to_others_while_it_keeps_up_and_takes_its_share_when_behind():
    """In a process of its own: the policy is changed for every thread of the process."""
    usable, seen = _priority_run()
    if not usable:
        pytest.skip("SCHED_IDLE cannot be left again here (no CAP_SYS_NICE, RLIMIT_NICE too low)")
    idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
    # Behind (over a quarter of the pipe, or 20 batches) at two checks in a row, not one; caught
    # up under a 16th of the pipe and 10 batches.
    assert seen == str([idle, idle, idle, idle, normal, normal, idle, idle, normal, normal, idle])


def test_where_sched_idle_cannot_be_left_the_writer_never_takes_it():
    usable, seen = _priority_run()
    if usable:
        pytest.skip("SCHED_IDLE can be left again here: the test above checks the switching")
    assert seen == str([os.SCHED_OTHER] * 11)
