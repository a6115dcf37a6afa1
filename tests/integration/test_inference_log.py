"""Every prediction reaches the log store, counted, through a store outage and a server restart,
for each store: SQLite (outage: another process holds its write lock), OpenSearch (outage: the
server is frozen with SIGSTOP) and Elasticsearch (outage: the server's proxy is down)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
import uuid

import httpx
import pytest

from monitoring.logstore import get_log_store
from serving.examples import fraud_transformer, save_mlp
from serving.logger.spool import Spool
from tests.conftest import free_port
from tests.esproxy import ElasticsearchProxy
from tests.integration.conftest import store_url
from tests.servers import Admin, model_server

pytestmark = pytest.mark.integration
ROWS = [{"amount": 10.0, "age_days": 3, "country": "DE"}, {"amount": 99.5, "age_days": 800, "country": "XX"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_mlp(tmp_path_factory.mktemp("logged") / "fraud", seed=9, transformer=fraud_transformer())


@contextlib.contextmanager
def outage(kind: str, url: str, osmem, proxy_box: dict):
    """The store away for the length of the block, then back with everything it had."""
    if kind == "sqlite":
        db = sqlite3.connect(url.removeprefix("sqlite://").split("?")[0], isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")  # every other writer waits, then gives up
        try:
            yield
        finally:
            db.execute("ROLLBACK")
            db.close()
    elif kind == "opensearch":
        os.killpg(osmem.process.pid, signal.SIGSTOP)  # the group: `timeout` and the server under it
        try:
            yield
        finally:
            os.killpg(osmem.process.pid, signal.SIGCONT)
    else:
        proxy_box["proxy"].__exit__(None, None, None)
        try:
            yield
        finally:
            proxy_box["proxy"] = ElasticsearchProxy(osmem.url, port=proxy_box["port"]).__enter__()


def send(url: str, requests: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(requests):
            response = client.post("/v1/models/fraud:predict", json={"instances": ROWS})
            assert response.status_code == 200, response.text


def count_when_settled(store, expected: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        store.refresh()
        found = store.count("fraud", 0, 2**62)
        if found >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


@pytest.mark.parametrize("kind", ["sqlite", "opensearch", "elasticsearch"])
def test_every_event_arrives_through_an_outage_and_a_restart(kind, tmp_path, model_dir, osmem, es_proxy):
    proxy_box = {"port": free_port()}
    proxy_box["proxy"] = ElasticsearchProxy(osmem.url, port=proxy_box["port"]).__enter__()
    base = store_url(kind, tmp_path, osmem, es_proxy)
    if kind == "elasticsearch":
        base = f"elasticsearch://127.0.0.1:{proxy_box['port']}"
    url = f"{base}?timeout_ms=400"
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = {"MLOPS_LOGS__STORE": url, "MLOPS_LOGS__INDEX_PREFIX": prefix, "MLOPS_LOGS__FLUSH_MS": "50"}
    reader = get_log_store(base, index_prefix=prefix)
    sent = 0
    try:
        with model_server(tmp_path / "state", **settings) as server:
            Admin(server.url).load("fraud", "1", str(model_dir), role="stable")
            send(server.url, 50)
            sent += 50
            with outage(kind, url, osmem, proxy_box):
                send(server.url, 80)  # answered while the store is away: spooled
                sent += 80
                time.sleep(1.5)
            send(server.url, 40)
            sent += 40
            assert count_when_settled(reader, 2 * sent) == 2 * sent
            with outage(kind, url, osmem, proxy_box):
                send(server.url, 30)
                sent += 30
                time.sleep(1.0)
                server.stop()  # a clean stop while the store is away: the queue drains to the spool
        spool = tmp_path / "state" / "serving" / "spool"
        spooled_at_stop = Spool(spool, 1 << 30).events
        with model_server(tmp_path / "state", **settings) as restarted:
            send(restarted.url, 20)  # the restarted server replays its spool, then logs these
            sent += 20
            assert count_when_settled(reader, 2 * sent) == 2 * sent
            spooled = httpx.get(f"{restarted.url}/metrics").text
        events = list(reader.query("fraud", 0, 2**62))
    finally:
        proxy_box["proxy"].__exit__(None, None, None)
    assert spooled_at_stop == 2 * 30  # the stop drained the queue to the spool, nothing was lost
    assert len(events) == 2 * sent and len({e.event_id for e in events}) == 2 * sent
    assert {e.row for e in events} == {0, 1}
    assert events[0].inputs == ROWS[0] or events[0].inputs == ROWS[1]
    assert "mlops_log_spool_events 0.0" in spooled


def test_feedback_joins_its_prediction_and_a_second_label_needs_overwrite(tmp_path, model_dir):
    with model_server(tmp_path / "state", MLOPS_LOGS__FLUSH_MS="50") as server:
        Admin(server.url).load("fraud", "1", str(model_dir), role="stable")
        answer = httpx.post(
            f"{server.url}/v1/models/fraud:predict", json={"instances": ROWS}, timeout=30
        ).json()
        request_id = answer["request_id"]
        feedback = f"{server.url}/v1/feedback"
        accepted = httpx.post(feedback, json={"request_id": request_id, "labels": ["legit", "fraud"]})
        bad = httpx.post(feedback, json={"request_id": request_id, "labels": []})
        missing = httpx.post(feedback, json={"labels": ["x"]})
        wrong_flag = httpx.post(feedback, json={"request_id": request_id, "label": "x", "overwrite": "yes"})
        unknown = httpx.post(feedback, json={"request_id": "never-answered", "label": "fraud"})
        store = get_log_store(f"sqlite:///{tmp_path / 'state' / 'logs' / 'inference.db'}")
        labelled = wait_for_labels(store, {0: "legit", 1: "fraud"})
        again = httpx.post(feedback, json={"request_id": request_id, "labels": ["fraud", "fraud"]})
        replaced = httpx.post(feedback, json={"request_id": request_id, "label": "fraud", "overwrite": True})
        relabelled = wait_for_labels(store, {0: "fraud", 1: "fraud"})
        metrics = wait_for_metric(server.url, "mlops_feedback_unknown_total 1.0")
    assert accepted.status_code == 202 and accepted.json() == {"accepted": 2}
    assert bad.status_code == 400 and "'labels'" in bad.json()["error"]
    assert missing.status_code == 400 and "'request_id'" in missing.json()["error"]
    assert wrong_flag.status_code == 400 and "'overwrite'" in wrong_flag.json()["error"]
    assert unknown.status_code == 202  # kept, and counted: its request may be older than the log
    assert labelled == {0: "legit", 1: "fraud"}
    assert again.status_code == 409 and '"overwrite": true' in again.json()["error"]
    assert "row(s) [0, 1]" in again.json()["error"]
    assert replaced.status_code == 202 and relabelled == {0: "fraud", 1: "fraud"}
    assert 'mlops_feedback_requests_total{code="409"} 1.0' in metrics


def wait_for_labels(store, expected: dict[int, str], timeout_s: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        labelled = {x.event.row: x.label for x in store.labelled("fraud", 0, 2**62)}
        if labelled == expected or time.monotonic() > deadline:
            return labelled
        time.sleep(0.2)


def wait_for_metric(url: str, line: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics").text
        if line in text or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def test_feedback_with_a_token_set_refuses_requests_without_it(tmp_path):
    """MLOPS_SERVING__FEEDBACK_TOKEN (or, beyond loopback, the generated one: tests/unit/serving/
    test_auth.py) is asked for; nothing refused is queued."""
    token = "feedback-token-for-tests"
    with model_server(tmp_path / "state", MLOPS_SERVING__FEEDBACK_TOKEN=token) as server:
        body = {"request_id": "r1", "label": "fraud"}
        anonymous = httpx.post(f"{server.url}/v1/feedback", json=body)
        wrong = httpx.post(f"{server.url}/v1/feedback", json=body, headers={"Authorization": "Bearer nope"})
        right = httpx.post(
            f"{server.url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        metrics = wait_for_metric(server.url, 'mlops_feedback_requests_total{code="202"} 1.0')
    assert anonymous.status_code == 401 and "feedback token" in anonymous.json()["error"]
    assert wrong.status_code == 401
    assert right.status_code == 202
    assert 'mlops_feedback_requests_total{code="401"} 2.0' in metrics


def test_a_reader_in_another_process_reads_while_the_server_writes(tmp_path, model_dir):
    with model_server(tmp_path / "state", MLOPS_LOGS__FLUSH_MS="20") as server:
        Admin(server.url).load("fraud", "1", str(model_dir), role="stable")
        store = get_log_store(f"sqlite:///{tmp_path / 'state' / 'logs' / 'inference.db'}")
        seen = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                seen.append(sum(1 for _ in store.query("fraud", 0, 2**62)))

        reader = threading.Thread(target=read)
        reader.start()
        send(server.url, 150)
        final = count_when_settled(store, 300)
        stop.set()
        reader.join()
    assert final == 300
    assert seen == sorted(seen) and len(seen) > 3  # it read all along, and saw the log grow
