"""The inference logger against a store that goes away: spool, replay in order, nothing lost."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from common.errors import BackendUnavailable
from monitoring.events import (
    AnsweredBatch,
    Feedback,
    InferenceRequest,
    LoggedRequest,
    MalformedEvent,
    answered_payload,
)
from monitoring.logstore import WriteResult
from serving.logger import InferenceLogger, LogWriter, PipeReader, Spool, decode, encode, encode_request
from serving.signature import RequestDecoder, Signature, TensorSpec


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

    def write_batches(self, batches):
        return self.write_requests([r for b in batches for r in b.requests() if r is not None])

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
    spool.replay(lambda requests, feedback, events, batches: replayed.extend(requests), chunk=100)
    assert [e.event_id for r in replayed for e in r.events()] == ["000001-0", "000001-1"]
    assert not spool.files()


def test_records_cross_the_pipe_unchanged():
    original = request(5, rows=3)
    back = decode(encode(original.logged()))
    assert back == original.logged()
    assert back.events() == original.events()
    labels = [Feedback("req-5", 0, {"lost": 3.5}), Feedback("req-5", 1, "legit")]
    assert decode(encode(labels)) == labels


@pytest.mark.parametrize("native", [True, False], ids=["line-in-c", "line-in-python"])
def test_a_full_queue_drops_and_counts_instead_of_blocking(native):
    from serving.logger import DROPPED

    # A writer that never reads, and a hand-over that waits a minute: the queue fills at 100.
    logger = InferenceLogger(["sleep", "60"], queue_events=100, flush_ms=60_000, native=native)
    before = DROPPED._value.get()
    began = time.perf_counter()
    for i in range(150):
        logger.log(request(i))
    assert time.perf_counter() - began < 0.5
    assert DROPPED._value.get() - before == 2 * 50
    assert logger.depth == 100
    # Answered requests have a queue of their own, as long: its 101st and later are dropped too.
    args = answered(
        FRAUD, "v1", b'{"instances": [{"amount": 1, "country": "DE"}, {"amount": 2, "country": "FR"}]}'
    )
    for _ in range(130):
        logger.answered(*args)
    assert DROPPED._value.get() - before == 2 * 50 + 2 * 30  # their rows, two a request
    assert logger.depth == 200
    logger.close(timeout_s=2)


def test_the_writer_process_stores_what_the_model_server_hands_over(tmp_path, monkeypatch):
    from monitoring.logstore import get_log_store
    from serving.logger import WRITTEN

    url = f"sqlite:///{tmp_path / 'inference.db'}"
    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MLOPS_LOGS__STORE", url)
    before = WRITTEN._value.get()
    logger = InferenceLogger([sys.executable, "-m", "serving.logger"], flush_ms=20)
    for i in range(40):
        logger.log(request(i))
    body = b'{"instances": [{"amount": 3, "country": "FR"}]}'
    outputs = {"label": np.asarray(["legit"], dtype=object), "probabilities": np.full((1, 2), 0.5)}
    began = time.time()
    now = time.perf_counter()
    logger.answered(now - 0.002, now, "fraud", "1", "stable", "req-a", "v1", body, None, outputs)
    logger.feedback([Feedback("req-1", 0, "fraud")])
    logger.close()
    store = get_log_store(url)
    assert store.count("fraud", 0, 2**62) == 81
    [answered] = [e for e in store.query("fraud", 0, 2**62) if e.request_id == "req-a"]
    assert answered.inputs == {"amount": 3, "country": "FR"}
    assert answered.outputs == {"label": "legit", "probabilities": [0.5, 0.5]}
    assert 2 <= answered.latency_ms < 1000
    assert began * 1000 - 1 <= answered.ts_ms <= time.time() * 1000
    assert [x.label for x in store.labelled("fraud", 0, 2**62) if x.event.request_id == "req-1"] == [
        "fraud",
        None,
    ]
    wait_until(lambda: WRITTEN._value.get() - before == 81)  # the writer's counts reach /metrics


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


# --- answered requests: the body as it came, its columns taken out when read -------------------

FRAUD = Signature(
    inputs=(TensorSpec("amount", "FP64", (-1,)), TensorSpec("country", "BYTES", (-1,))),
    outputs=(TensorSpec("label", "BYTES", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
    source="mlflow",
)
WIDE = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "INT64", (-1,)),), "onnx")


def handed_over(
    tmp_path: Path, *groups: list[Any], flush_ms: float = 600_000, native: bool = True
) -> list[bytes]:
    """The lines InferenceLogger hands its writer for these groups of ``answered`` calls, the
    groups a flush interval apart (to a process that keeps the lines in a file); ``native``: the
    line made in C (serving/_lines.c), else in Python."""
    out = tmp_path / f"pipe-{time.monotonic_ns()}"
    keep = "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, open(sys.argv[1], 'wb'))"
    logger = InferenceLogger([sys.executable, "-c", keep, str(out)], flush_ms=flush_ms, native=native)
    for number, group in enumerate(groups):
        if number:
            time.sleep(3 * flush_ms / 1000)
        for args in group:
            if callable(args):  # anything else the logger is handed: a failed request, labels
                args(logger)
            else:
                logger.answered(*args)
    logger.close()
    return out.read_bytes().splitlines(keepends=True)


def answered(signature: Signature, protocol: str, body: bytes) -> tuple[Any, ...]:
    """The arguments of ``InferenceLogger.answered`` for a body the model server's decoder accepted."""
    decoder = RequestDecoder("fraud", "4", signature, max_batch_rows=100)
    inputs = decoder.v2(orjson.loads(body)) if protocol == "v2" else decoder.v1(orjson.loads(body))
    rows = len(next(iter(inputs.values())))
    outputs = {"label": np.asarray(["legit"] * rows, dtype=object), "probabilities": np.full((rows, 2), 0.5)}
    now = time.perf_counter()
    return (
        now - 0.0004,
        now,
        "fraud",
        "4",
        "stable",
        "req-3",
        protocol,
        body,
        decoder.row_input,
        outputs,
    )


def stored_answer(
    tmp_path: Path, signature: Signature, protocol: str, body: bytes, native: bool = True
) -> LoggedRequest:
    """What the writer process makes of an answered request: the request the store keeps."""
    lines = handed_over(tmp_path, [answered(signature, protocol, body)], native=native)
    assert len(lines) == 2  # the event ids, then the request: a newline in the body is whitespace
    pipe = PipeReader()
    assert pipe.read(lines[0]) is None
    return pipe.read(lines[1])


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
            Signature((TensorSpec("amount", "FP64", (-1,)),), (), "onnx"),
            "v2",
            b'{"inputs": [{"name": "amount", "shape": [2], "datatype": "FP64", "data": [[1.5, 2]]}]}',
            [{"amount": 1.5}, {"amount": 2}],
        ),
        (
            Signature((TensorSpec("img", "UINT8", (-1, 2, 2)),), (), "onnx"),
            "v2",
            b'{"inputs": [{"name": "img", "shape": [2, 2, 2], "datatype": "UINT8", "data": [1,2,3,4,5,6,7,8]}]}',
            [{"img": [[1, 2], [3, 4]]}, {"img": [[5, 6], [7, 8]]}],
        ),
    ],
)
@pytest.mark.parametrize("native", [True, False], ids=["line-in-c", "line-in-python"])
def test_an_answered_request_is_logged_as_its_body_and_read_as_columns(
    tmp_path, signature, protocol, body, inputs, native
):
    began = time.time()
    logged = stored_answer(tmp_path, signature, protocol, body, native)
    assert (logged.model, logged.version, logged.role, logged.request_id, logged.rows) == (
        "fraud", "4", "stable", "req-3", 2,
    )  # fmt: skip
    assert began * 1000 - 1 <= logged.ts_ms <= time.time() * 1000
    events = logged.events()
    assert [e.event_id for e in events] == [f"{logged.event_id}-0", f"{logged.event_id}-1"]
    assert [e.inputs for e in events] == inputs  # values as the client sent them
    assert [e.outputs for e in events] == [{"label": "legit", "probabilities": [0.5, 0.5]}] * 2
    assert all(0.4 <= e.latency_ms < 1000 for e in events)
    assert decode(encode(logged)) == logged  # the spool keeps the same line


@pytest.mark.parametrize("native", [True, False], ids=["line-in-c", "line-in-python"])
def test_the_request_path_writes_the_payload_answered_payload_defines(tmp_path, native):
    """InferenceLogger.answered makes the payload inline (a call costs on the request path), in C
    or in Python: the same bytes as monitoring.events.answered_payload, which the benchmark and the
    readers go by."""
    args = answered(FRAUD, "v1", b'{"instances": [\n{"amount": 1.5, "country": "DE"}]}')
    [_, line] = handed_over(tmp_path, [args], native=native)
    _, ts_s, latency_s, *_ = orjson.loads(line[1 : line.index(b"\t")])
    started, ended, model, version, role, request_id, protocol, body, row_input, outputs = args
    # Its time is the wall clock's at ``ended`` (one perf_counter read on the request path).
    assert latency_s == pytest.approx(ended - started) and abs(ts_s - time.time()) < 5
    expected = answered_payload(
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
    assert line == b"a" + expected + b"\n"


def test_answered_requests_are_numbered_by_hand_over_and_a_resent_hand_over_keeps_its_ids(tmp_path):
    """Event ids come from the logger's count, not the writer's: the lines of a hand-over sent again
    to a new writer (the first died reading it) get the same ids, so the store keeps them once."""
    request = answered(WIDE, "v1", b'{"instances": [[1, 2, 3]]}')

    def failed(logger: InferenceLogger) -> None:
        logger.log(InferenceRequest("failed", 1, "m", "1", "stable", "q", 0.1, {}, {}, "error"))

    def labels(logger: InferenceLogger) -> None:
        logger.feedback([Feedback("req-1", 0, "fraud")])

    lines = handed_over(
        tmp_path, [request, failed, request, labels, request], [labels, request] * 2, flush_ms=50
    )
    items = [item for item in map(PipeReader().read, lines) if item is not None]
    assert [item for item in map(PipeReader().read, lines) if item is not None] == items  # sent again
    prefix = orjson.loads(lines[0][1:])[0]
    answers = [item for item in items if isinstance(item, LoggedRequest) and item.event_id != "failed"]
    assert [item.event_id for item in answers] == [f"{prefix}{n}" for n in range(5)]
    assert len(items) == 5 + 1 + 3
    # Each hand-over starts with the number of the answered requests handed over before it.
    for position, line in enumerate(lines):
        if line.startswith(b"i"):
            assert orjson.loads(line[1:]) == [prefix, sum(x.startswith(b"a") for x in lines[:position])]

    # The writer reads whatever the pipe holds: lines cut anywhere make the same requests (runs of
    # answered requests come as batches, cut where the pipe was).
    data = b"".join(lines)
    for size in (1, 7, 4096, len(data)):
        pipe = PipeReader()
        fed = [item for start in range(0, len(data), size) for item in pipe.feed(data[start : start + size])]
        assert unbatched(fed) == items and pipe.rest == b""
    # A hand-over's answered requests come first (one batch), then anything else queued with them.
    assert [type(item).__name__ for item in fed] == [
        "AnsweredBatch", "LoggedRequest", "list", "AnsweredBatch", "list", "list"
    ]  # fmt: skip

    # A line the writer cannot read still takes its number: the lines after it keep theirs.
    pipe = PipeReader()
    pipe.read(lines[0])
    with pytest.raises(MalformedEvent):
        pipe.read(b"a[1]\t{}\n")
    assert pipe.read(lines[3]).event_id == f"{prefix}1"
    pipe = PipeReader()
    fed = pipe.feed(lines[0] + b"a[1]\t{}\n" + lines[3] + lines[1][:20])
    assert [r.event_id for r in unbatched(fed)] == [f"{prefix}1"] and pipe.rest == lines[1][:20].rstrip(b"\n")


def unbatched(items: list[Any]) -> list[Any]:
    """The items, each batch of answered requests as its requests."""
    return [r for item in items for r in (item.requests() if isinstance(item, AnsweredBatch) else [item])]


def test_a_hand_over_is_one_batch_found_without_a_parse_per_request(tmp_path):
    """The writer keeps a hand-over of answered requests as it came: one record, its times, rows
    and models found by one regular expression; a line of another layout is read on its own, and
    the lines around it keep their ids and their batches."""
    one = answered(WIDE, "v1", b'{"instances": [[1, 2, 3]]}')
    two = answered(WIDE, "v1", b'{"instances": [[1, 2, 3], [4, 5, 6]]}')
    other = (*one[:2], "other", *one[3:])
    lines = handed_over(tmp_path, [one, two, other, two])
    [batch] = PipeReader().feed(b"".join(lines))
    assert (batch.count, batch.rows, batch.models) == (4, 6, ("fraud", "other"))
    times = [r.ts_ms for r in batch.requests()]
    assert (batch.ts_min_ms, batch.ts_max_ms) == (min(times), max(times))
    assert batch.body == b"".join(lines[1:]) and batch.first == 0
    assert [r.rows for r in batch.requests()] == [1, 2, 1, 2]

    old = b'a[1,1795736830.9,0.001,"m","1","stable","q","v1","x",{"y":[1]}]\t{"instances": [[1, 2, 3]]}\n'
    fed = PipeReader().feed(lines[0] + lines[1] + lines[2] + old + b"a[1]\t{}\n" + lines[3] + lines[4])
    assert [type(i).__name__ for i in fed] == ["AnsweredBatch", "LoggedRequest", "AnsweredBatch"]
    assert [(i.first, i.count) for i in (fed[0], fed[2])] == [(0, 2), (4, 2)]
    assert fed[1].event_id == f"{batch.source}2" and fed[1].events()[0].inputs == {"x": [1, 2, 3]}


@pytest.mark.parametrize(
    "line",
    [
        b'a[1,1795736830.9,0.001,"m","1","stable","q","v1",null,{"y":[1]}]',  # cut short
        b'a[1,1795736830.9,0.001,"m","1","stable","q","v1",null,{"y":[1]}]\n',  # no body
        b'a[1,1795736830.9,0.001,"m","1","stable","q","v1",null]\t{}\n',
        b'a[1,1795736830.9,0.001,"m","1","stable","q","v1",null,[1]]\t{}\n',
        b'a[1,1795736830.9,0.001,"m","1","stable","q","v1",null,{}]\t{}\n',
        b"anot json\t{}\n",
        b"i[1,2]\n",
        b"i{]\n",
    ],
)
def test_an_unreadable_answered_or_id_line_is_malformed_not_a_crash(line):
    with pytest.raises(MalformedEvent):
        PipeReader().read(line)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"[[1, 2, 3]]", b"[]"),  # no rows
        (b"[[1, 2, 3]]", b"[[1, 2, 3], [4, 5, 6]]"),  # rows that disagree with the header
        (b'"v1","x"', b'"v1",null'),  # plain rows and no input named for them
        (b'"v1"', b'"v7"'),  # the protocol
        (b'"instances"', b'"rows"'),
        (b"[1,", b"[9,"),  # the schema version
        (b"\t", b" "),  # no head
    ],
)
def test_an_answered_request_that_does_not_fit_is_malformed(tmp_path, old, new):
    logged = stored_answer(tmp_path, WIDE, "v1", b'{"instances": [[1, 2, 3]]}')
    assert logged.rows == 1 and logged.events()[0].inputs == {"x": [1, 2, 3]}
    assert old in logged.body
    with pytest.raises(MalformedEvent):
        logged._replace(body=logged.body.replace(old, new)).events()


def test_an_answered_request_of_the_previous_layout_is_still_read():
    """Stored before the payload was the model server's line: a JSON object, the body under "request"."""
    payload = (
        b'{"schema_version":1,"latency_ms":0.4,"protocol":"v1","row_input":null,'
        b'"request":{"instances": [{"amount": 2, "country": "FR"}]},"outputs":{"label":["legit"]},'
        b'"status":"ok","error":null}'
    )
    [event] = LoggedRequest("old", 1_000, "fraud", "1", "stable", "req-9", 1, payload).events()
    assert (event.event_id, event.inputs, event.outputs) == (
        "old-0",
        {"amount": 2, "country": "FR"},
        {"label": "legit"},
    )


def test_the_writer_leaves_the_cpu_to_others_while_it_keeps_up_and_takes_its_share_when_behind():
    """In a process of its own: the policy is changed for every thread of the process."""
    import os
    import subprocess

    script = """
import os
from serving.logger import PIPE_BYTES, CpuPriority
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
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    usable, seen = done.stdout.split(" ", 1)
    idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
    if usable == "True":
        # Behind (over a quarter of the pipe, or 20 batches) at two checks in a row, not one; caught
        # up under a 16th of the pipe and 10 batches.
        expected = [idle, idle, idle, idle, normal, normal, idle, idle, normal, normal, idle]
        assert seen.strip() == str(expected)
    else:  # where SCHED_IDLE could not be left again, it is never taken
        assert seen.strip() == str([normal] * 11)


def test_a_hand_over_of_more_lines_than_one_writev_takes_arrives_whole_and_in_order():
    import os

    from serving.logger import IOV_MAX, _write_all

    lines = [b"a%d\n" % i * (1 + i % 7) for i in range(3 * IOV_MAX + 5)]
    read_end, write_end = os.pipe()
    received = bytearray()

    def read() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    _write_all(write_end, lines)
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    assert bytes(received) == b"".join(lines)


def test_hand_overs_spool_while_the_store_is_away_and_arrive_with_their_ids(tmp_path):
    """A hand-over the store could not take is spooled as it came (its id line and its lines) and
    replayed with the same event ids, by this writer or by the next one after a clean stop."""
    one = answered(WIDE, "v1", b'{"instances": [[1, 2, 3]]}')
    two = answered(WIDE, "v1", b'{"instances": [[1, 2, 3], [4, 5, 6]]}')
    lines = handed_over(tmp_path, [one, two, one], [two, one], flush_ms=50)
    batches = [item for item in PipeReader().feed(b"".join(lines)) if isinstance(item, AnsweredBatch)]
    assert [b.count for b in batches] == [3, 2]
    expected = [e.event_id for r in unbatched(batches) for e in r.events()]
    assert len(expected) == 7

    store = FlakyStore()
    store.up.clear()
    first = LogWriter(store, tmp_path / "spool", batch_events=2, flush_ms=20, retry_s=0.05)
    first.submit(batches[0])
    wait_until(lambda: first.spool.events == 4)
    first.close()
    assert Spool(tmp_path / "spool").events == 4 and not store.events

    store.up.set()
    second = LogWriter(store, tmp_path / "spool", batch_events=2, flush_ms=20, retry_s=0.05)
    second.submit(batches[1])
    wait_until(lambda: len(store.events) == 7)
    second.close()
    assert store.order == expected  # the spooled hand-over first, then the new one
    assert second.spool.events == 0 and not second.spool.files()


def test_the_line_maker_in_c_is_built_and_used():
    """``make setup`` compiles serving/_lines.c (setup.py); the model server uses it by default."""
    from serving import _lines

    logger = InferenceLogger(["sleep", "60"], flush_ms=60_000)
    try:
        assert isinstance(logger.answered.__self__, _lines.Lines)
    finally:
        logger.close(timeout_s=2)


def _odd(rows: int) -> dict[str, Any]:
    return {"y": np.arange(rows, dtype=np.float32) / 3, "label": np.asarray(['a"b'] * rows, dtype=object)}


@pytest.mark.parametrize(
    ("request_id", "row_input", "outputs", "body"),
    [
        ("plain-id", None, {"y": np.asarray([[0.1, 0.2]], dtype=np.float32)}, b'{"instances": [[1, 2]]}'),
        ('quote " back \\ tab \t', "row", _odd(3), b'{"instances":\n[1,\n2,\n3]}\n'),
        ("ünïcode-✓", None, {}, b"{}"),
        ("big", None, _odd(2), b'{"instances": [' + b", ".join([b"[1.5, 2.5]"] * 20_000) + b"]}"),
        ("mapping", None, types.MappingProxyType({"y": np.zeros((2, 3))}), b'{"instances": [[0], [0]]}'),
    ],
    ids=["plain", "escapes-and-newlines", "unicode-no-outputs", "large-body", "mapping"],
)
def test_the_line_made_in_c_is_the_line_made_in_python(tmp_path, request_id, row_input, outputs, body):
    now = time.perf_counter()
    args = (now - 0.25, now, "fraud", "4", "canary", request_id, "v1", body, row_input, outputs)
    [_, in_c] = handed_over(tmp_path, [args], native=True)
    [_, in_python] = handed_over(tmp_path, [args], native=False)
    head_c, body_c = in_c.split(b"\t", 1)
    head_python, body_python = in_python.split(b"\t", 1)
    assert body_c == body_python == body.replace(b"\n", b" ") + b"\n"
    (_, ts_c, *rest_c), (_, ts_python, *rest_python) = orjson.loads(head_c[1:]), orjson.loads(head_python[1:])
    assert rest_c == rest_python  # the wall-clock offset is each logger's own: the times agree closely
    assert ts_c == pytest.approx(ts_python, abs=1.0)
    latency_s, rows, *named, logged_outputs = rest_c
    assert latency_s == pytest.approx(0.25) and rows == (len(next(iter(outputs.values()))) if outputs else 0)
    assert named == ["fraud", "4", "canary", request_id, "v1", row_input]
    assert logged_outputs.keys() == outputs.keys()


@pytest.mark.parametrize(
    ("position", "value", "error"),
    [
        (7, "not bytes", "body: expected bytes, not str"),
        (0, "soon", "must be real number, not str"),
        (9, {"y": np.float32(1)}, "len"),
    ],
)
def test_the_line_maker_in_c_refuses_what_python_would_refuse(position, value, error):
    logger = InferenceLogger(["sleep", "60"], flush_ms=60_000)
    try:
        now = time.perf_counter()
        args = [now, now, "fraud", "4", "stable", "r", "v1", b"{}", None, {"y": np.zeros(1)}]
        args[position] = value
        with pytest.raises(TypeError, match=error):
            logger.answered(*args)
        with pytest.raises(TypeError, match="takes 10 arguments"):
            logger.answered(*args[:9])
        assert logger.depth == 0
    finally:
        logger.close(timeout_s=2)
