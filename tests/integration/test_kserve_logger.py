"""KServe's logger into the log store: CloudEvents posted over real HTTP as an InferenceService's
agent posts them (binary mode, request and response in either order, V1 and V2, the canary's),
paired, and read back from the embedded store like the model server's own events; an event that is
not one is refused naming the header; a store that is down still acknowledges what it spooled; a
request whose response never came is logged as an error."""

from __future__ import annotations

import contextlib
import threading
import time
from unittest.mock import MagicMock

import httpx
import numpy as np
import orjson
import pytest
import uvicorn

from monitoring.logstore import get_log_store
from serving.logger.kserve import Receiver, Versions, create_app
from serving.logger.spool import Spool
from serving.logger.writer import LogWriter
from tests.conftest import free_port

pytestmark = pytest.mark.integration
SERVED = {"stable": "3", "canary": "4"}


@contextlib.contextmanager
def receiver_at(store_url: str, tmp_path, hold_s: float = 60.0):
    """The receiver on a free loopback port, writing through a log writer to ``store_url``."""
    writer = LogWriter(
        get_log_store(store_url), Spool(tmp_path / "spool", 1 << 26), Spool(tmp_path / "dead", 1 << 26),
        flush_ms=20.0, retry_s=0.2,
    )  # fmt: skip
    receiver = Receiver(writer, lambda model, role: SERVED[role], hold_s=hold_s, ack_timeout_s=10.0)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(receiver), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            yield client, receiver
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        writer.close()


def post(
    client: httpx.Client,
    kind: str,
    event_id: str,
    body: dict,
    endpoint: str = "",
    at: str = "",
    service: str = "fraud",
    component: str = "predictor",
) -> httpx.Response:
    """One event as KServe's agent posts it (binary mode)."""
    headers = {
        "ce-specversion": "1.0", "ce-id": event_id, "ce-source": "http://localhost:9081/",
        "ce-type": f"org.kubeflow.serving.inference.{kind}", "ce-inferenceservicename": service,
        "ce-namespace": "models", "ce-endpoint": endpoint, "ce-component": component,
        "content-type": "application/json",
    }  # fmt: skip
    if at:
        headers["ce-time"] = at
    return client.post("/", content=orjson.dumps(body), headers=headers)


def test_pairs_become_events_in_the_store_like_the_model_servers(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    rows = [
        {"amount": 12.5, "age_days": 40, "country": "DE"},
        {"amount": 99.0, "age_days": 3, "country": "US"},
    ]
    answer = {"predictions": [{"label": "legit", "score": 0.9}, {"label": "fraud", "score": 0.7}]}
    with receiver_at(url, tmp_path) as (client, receiver):
        first = post(client, "request", "a1", {"instances": rows}, at="2026-12-05T10:00:00.100000000Z")
        assert first.status_code == 202 and first.json() == {"paired": False}
        done = post(client, "response", "a1", answer, at="2026-12-05T10:00:00.125Z")
        assert done.status_code == 200 and done.json() == {"paired": True, "logged": 1}
        # The response first, the canary's, and V2.
        assert post(client, "response", "b1", {"predictions": [1]}, endpoint="canary").status_code == 202
        assert (
            post(client, "request", "b1", {"instances": [[0.5, 1.5]]}, endpoint="canary").status_code == 200
        )
        v2_in = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        v2_out = {"outputs": [{"name": "p", "shape": [2], "datatype": "FP32", "data": [0.1, 0.9]}]}
        post(client, "request", "c1", v2_in)
        assert post(client, "response", "c1", v2_out).status_code == 200
        bad = client.post("/", content=b"{}", headers={"ce-id": "x", "ce-inferenceservicename": "fraud"})
        assert bad.status_code == 400 and "ce-type" in bad.json()["error"]
        health = client.get("/healthz").json()
        assert health["logged"] == 3 and health["refused"] == 1 and health["waiting"] == 0

    store = get_log_store(url)
    events = sorted(
        store.query("fraud", 0, int(time.time() * 1000) + 1000), key=lambda e: (e.request_id, e.row)
    )
    assert [(e.request_id, e.row, e.version, e.role) for e in events] == [
        ("a1", 0, "3", "stable"), ("a1", 1, "3", "stable"), ("b1", 0, "4", "canary"),
        ("c1", 0, "3", "stable"), ("c1", 1, "3", "stable"),
    ]  # fmt: skip
    a0 = events[0]
    assert a0.inputs == rows[0] and a0.outputs == {"label": "legit", "score": 0.9}
    assert a0.ts_ms == 1796464800100 and a0.latency_ms == pytest.approx(25.0)
    assert events[2].inputs == {"input": [0.5, 1.5]} and events[2].outputs == {"predictions": 1}
    assert events[3].inputs == {"x": [1, 2]} and events[4].outputs == {"p": 0.9}


def test_a_store_that_is_down_still_loses_nothing_acknowledged(tmp_path):
    with receiver_at("opensearch://127.0.0.1:9?timeout_ms=300", tmp_path) as (client, receiver):
        post(client, "request", "d1", {"instances": [{"amount": 1.0}]})
        assert post(client, "response", "d1", {"predictions": [0]}).status_code == 200
        assert receiver.writer.spool.events == 1  # acknowledged because it is on disk, to replay
    assert len(Spool(tmp_path / "spool", 1 << 26).files()) == 1


def test_a_request_without_its_response_is_logged_as_an_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    with receiver_at(url, tmp_path, hold_s=0.2) as (client, receiver):
        post(client, "request", "lost", {"instances": [{"amount": 1.0}]})
        time.sleep(0.3)
        post(client, "request", "next", {"instances": [{"amount": 2.0}]})  # its arrival expires the first
        assert receiver.stats["unpaired"] == 1
    [event] = list(get_log_store(url).query("fraud", 0, int(time.time() * 1000) + 1000))
    assert event.request_id == "lost" and event.status == "error" and "no response" in event.error


def test_versions_come_from_the_target_and_are_asked_again_after_their_ttl():
    served = MagicMock()
    served.stable.version, served.canary = "7", None
    status = MagicMock(return_value=served)
    versions = Versions(status, ttl_s=60)
    assert versions("fraud", "stable") == "7" and versions("fraud", "canary") == "unknown"
    assert status.call_count == 1
    status.side_effect = RuntimeError("target away")
    assert Versions(status)("other", "stable") == "unknown"


def test_what_the_agent_posts_is_logged_as_the_model_server_logs_the_same_request(tmp_path):
    """The model server answers V1 (named rows) and V2; the same bodies, posted as KServe's agent
    posts them (the transformer's V1, the predictor's V2), become the same events: model, version,
    role, row, inputs, outputs and status, read back from the store as the server's own are."""
    from serving.examples import fraud_transformer, save_mlp
    from tests.servers import Admin, model_server

    model_dir = save_mlp(tmp_path / "fraud", seed=9, transformer=fraud_transformer())
    rows = [
        {"amount": 10.0, "age_days": 3, "country": "DE"},
        {"amount": 99.5, "age_days": 800, "country": "XX"},
    ]
    v2 = {
        "inputs": [
            {"name": "amount", "datatype": "FP64", "shape": [1], "data": [42.0]},
            {"name": "age_days", "datatype": "FP64", "shape": [1], "data": [10.0]},
            {"name": "country", "datatype": "BYTES", "shape": [1], "data": ["US"]},
        ]
    }
    served_url = f"sqlite:///{tmp_path / 'served.db'}"
    with model_server(tmp_path / "state", MLOPS_LOGS__STORE=served_url, MLOPS_LOGS__FLUSH_MS="50") as server:
        Admin(server.url).load("fraud", "3", str(model_dir), role="stable")
        with httpx.Client(base_url=server.url, timeout=30) as http:
            v1_answer = http.post("/v1/models/fraud:predict", json={"instances": rows})
            v2_answer = http.post("/v2/models/fraud/infer", json=v2)
        assert v1_answer.status_code == v2_answer.status_code == 200
        deadline = time.monotonic() + 30
        while len(list(get_log_store(served_url).query("fraud", 0, 2**62))) < 3:
            assert time.monotonic() < deadline, "the model server did not log its 3 rows"
            time.sleep(0.2)

    received_url = f"sqlite:///{tmp_path / 'received.db'}"
    with receiver_at(received_url, tmp_path) as (client, receiver):
        for key, body, answer, component in (
            ("v1", {"instances": rows}, v1_answer.json(), "transformer"),
            ("v2", v2, v2_answer.json(), "predictor"),
        ):
            post(client, "request", key, body, component=component)
            assert post(client, "response", key, answer, component=component).status_code == 200

    def events(url: str) -> list[tuple]:
        found = get_log_store(url).query("fraud", 0, 2**62)
        rows = [(e.model, e.version, e.role, e.row, e.inputs, as_float32(e.outputs), e.status) for e in found]
        return sorted(rows, key=lambda row: orjson.dumps(row, option=orjson.OPT_SORT_KEYS))

    served, received = events(served_url), events(received_url)
    # The server logs its FP32 tensors; the agent posts the answer's JSON numbers: equal as FP32.
    assert len(served) == 3 and served == received, "\n".join(map(str, [*served, "--", *received]))


def as_float32(value):
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    return value
