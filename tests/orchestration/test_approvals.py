"""The registry watcher: an approval in a live MLflow registry yields one event, tagged queued first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from airflow.serialization.decoders import smart_decode_trigger_kwargs
from airflow.serialization.encoders import encode_trigger
from airflow.triggers.base import BaseEventTrigger

from mlops_airflow.approvals import Approval, ApprovalTrigger, pending
from tests.orchestration.conftest import (
    PROJECT_ROOT,
    TEST_DAGS,
    MlflowRegistry,
    clean_env,
    free_port,
    start_detached,
    stop_detached,
)

POLL_S = 0.2


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_model() -> str:
    # One server serves the whole session: every test registers its own model.
    return f"model-{uuid.uuid4().hex[:8]}"


def watcher(registry: MlflowRegistry, model: str | None, **kwargs: object) -> ApprovalTrigger:
    models = [model] if model is not None else None
    return ApprovalTrigger(mlflow_url=registry.url, poll_s=POLL_S, models=models, **kwargs)


async def collect(trigger: ApprovalTrigger, seconds: float, during: object = None) -> list[dict]:
    """The payloads ``run()`` yields in ``seconds``; ``during``, a callable, runs after 0.5 s."""
    events: list[dict] = []

    async def consume() -> None:
        async for event in trigger.run():
            events.append({**event.payload, "seen_at": now_ms()})

    task = asyncio.ensure_future(asyncio.wait_for(consume(), seconds))
    if callable(during):
        await asyncio.sleep(0.5)
        await asyncio.to_thread(during)
    with contextlib.suppress(TimeoutError):
        await task
    return events


def own(events: list[dict], model: str) -> list[dict]:
    return [event for event in events if event["model"] == model]


# --- pending(): pure ----------------------------------------------------------------------------


def test_pending_fires_unhandled_and_lost_versions_only():
    now = 1_000_000_000
    approvals = [
        Approval("m", "1", "alias"),
        Approval("m", "2", "tag", rollout="queued", queued_at_ms=now - 1_000),
        Approval("m", "3", "tag", rollout="queued", queued_at_ms=now - 601_000),
        Approval("m", "4", "tag", rollout="queued", queued_at_ms=None),
        *(Approval("m", str(5 + i), "tag", rollout=state) for i, state in enumerate(
            ["in_progress", "promoted", "rolled_back", "replaced"]
        )),
    ]  # fmt: skip
    assert [a.version for a in pending(approvals, now, requeue_s=600)] == ["1", "3", "4"]


def test_pending_gives_one_approval_per_version_with_its_first_signal():
    found = pending(
        [Approval("m", "1", "alias"), Approval("m", "1", "tag"), Approval("n", "1", "tag")], 0, 600
    )
    assert [(a.model, a.signal) for a in found] == [("m", "alias"), ("n", "tag")]


def test_approval_reads_mlflows_version_json():
    version = {
        "name": "fraud", "version": "3", "current_stage": "None",
        "tags": [{"key": "rollout", "value": "queued"}, {"key": "rollout.queued_at", "value": "17"}],
    }  # fmt: skip
    assert Approval.from_version(version, "tag") == Approval("fraud", "3", "tag", "queued", 17)


# --- kwargs -------------------------------------------------------------------------------------


def test_serialize_round_trips_through_airflows_encoding():
    trigger = ApprovalTrigger(mlflow_url="http://mlflow:5000", models=["b", "a"], legacy_stage=True)
    classpath, kwargs = trigger.serialize()
    assert classpath == "mlops_airflow.approvals.ApprovalTrigger"
    encoded = encode_trigger(trigger)["kwargs"]  # what the dag-processor stores
    decoded = {key: smart_decode_trigger_kwargs(value) for key, value in encoded.items()}  # the triggerer
    assert ApprovalTrigger(**decoded).serialize() == (classpath, kwargs)


def test_two_spellings_of_one_watcher_serialize_alike_so_airflow_keeps_one_trigger():
    one = ApprovalTrigger(mlflow_url="http://mlflow:5000/", poll_s=5, models=["b", "a", "b"], requeue_s=600)
    other = ApprovalTrigger(mlflow_url="http://mlflow:5000", poll_s=5.0, models=["a", "b"])
    assert one.serialize() == other.serialize()
    assert BaseEventTrigger.hash(*one.serialize()) == BaseEventTrigger.hash(*other.serialize())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mlflow_url": "mlflow:5000"}, "not an http"),
        ({"tag": "approved"}, "not key=value"),
        ({"tag": "approval='yes'"}, "not key=value"),
        ({"poll_s": 0}, "must be positive"),
        ({"use_alias": False, "tag": ""}, "no approval rule"),
    ],
)
def test_bad_kwargs_fail_the_dag_parse_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ApprovalTrigger(**{"mlflow_url": "http://mlflow:5000", **kwargs})


# --- run() against a live registry --------------------------------------------------------------


@pytest.mark.integration
def test_alias_approval_yields_one_event_within_a_few_polls_and_tags_the_version_queued(mlflow_registry):
    model = new_model()
    version = mlflow_registry.create_version(model)
    approved_at: list[int] = []

    def approve() -> None:
        approved_at.append(now_ms())
        mlflow_registry.set_alias(model, "challenger", version)

    events = asyncio.run(collect(watcher(mlflow_registry, model), 4.0, during=approve))

    assert [(e["model"], e["version"], e["signal"]) for e in events] == [(model, version, "alias")]
    # A few polls of 0.2 s, each a handful of requests to a SQLite-backed server on a busy machine.
    assert events[0]["seen_at"] - approved_at[0] < 2_000
    tags = mlflow_registry.tags(model, version)
    assert tags["rollout"] == "queued"
    assert tags["rollout.queued_at"] == str(events[0]["queued_at"])


@pytest.mark.integration
def test_approval_made_before_the_trigger_starts_is_yielded_at_its_first_poll(mlflow_registry):
    model = new_model()
    version = mlflow_registry.create_version(model)
    mlflow_registry.set_tag(model, version, "approval", "approved")
    slow = ApprovalTrigger(mlflow_url=mlflow_registry.url, poll_s=60, models=[model])
    events = asyncio.run(collect(slow, 5.0))  # a second poll would come only after 60 s
    assert [(e["version"], e["signal"]) for e in events] == [(version, "tag")]


@pytest.mark.integration
def test_version_with_alias_and_tag_yields_once_over_many_polls_and_trigger_instances(mlflow_registry):
    model = new_model()
    version = mlflow_registry.create_version(model)
    mlflow_registry.set_alias(model, "challenger", version)
    mlflow_registry.set_tag(model, version, "approval", "approved")
    first = asyncio.run(collect(watcher(mlflow_registry, model), 2.0))
    # A re-created instance (triggerer restarted, watcher moved) reads the queued tag and stays quiet.
    second = asyncio.run(collect(watcher(mlflow_registry, model), 1.5))
    assert [(e["version"], e["signal"]) for e in first] == [(version, "alias")]
    assert second == []


@pytest.mark.integration
@pytest.mark.parametrize("state", ["in_progress", "promoted", "rolled_back", "replaced"])
def test_version_the_deploy_dag_has_handled_never_yields(mlflow_registry, state):
    model = new_model()
    version = mlflow_registry.create_version(model)
    mlflow_registry.set_tag(model, version, "rollout", state)
    mlflow_registry.set_alias(model, "challenger", version)
    mlflow_registry.set_tag(model, version, "approval", "approved")
    assert asyncio.run(collect(watcher(mlflow_registry, model), 1.5)) == []
    assert mlflow_registry.tags(model, version)["rollout"] == state


@pytest.mark.integration
def test_queued_version_older_than_requeue_s_yields_again_and_a_younger_one_does_not(mlflow_registry):
    model = new_model()
    lost, waiting = mlflow_registry.create_version(model), mlflow_registry.create_version(model)
    for version, age_s in ((lost, 700), (waiting, 60)):
        mlflow_registry.set_tag(model, version, "rollout", "queued")
        mlflow_registry.set_tag(model, version, "rollout.queued_at", str(now_ms() - age_s * 1000))
        mlflow_registry.set_tag(model, version, "approval", "approved")
    started_ms = now_ms()
    events = asyncio.run(collect(watcher(mlflow_registry, model, requeue_s=600), 2.0))
    assert [e["version"] for e in events] == [lost]
    assert int(mlflow_registry.tags(model, lost)["rollout.queued_at"]) >= started_ms


@pytest.mark.integration
def test_legacy_staging_stage_counts_as_approval_when_asked(mlflow_registry):
    model = new_model()
    version = mlflow_registry.create_version(model)
    mlflow_registry.call(
        "POST", "model-versions/transition-stage", name=model, version=version, stage="Staging",
        archive_existing_versions=False,
    )  # fmt: skip
    assert asyncio.run(collect(watcher(mlflow_registry, model), 1.0)) == []
    events = asyncio.run(collect(watcher(mlflow_registry, model, legacy_stage=True), 1.5))
    assert [(e["version"], e["signal"]) for e in events] == [(version, "stage")]


@pytest.mark.integration
def test_watching_every_model_finds_an_approval_of_any_of_them(mlflow_registry):
    model = new_model()
    version = mlflow_registry.create_version(model)
    mlflow_registry.set_alias(model, "champion", version)
    events = asyncio.run(collect(watcher(mlflow_registry, None, alias="champion", tag=""), 2.0))
    assert [(e["version"], e["signal"]) for e in own(events, model)] == [(version, "alias")]


@pytest.mark.integration
def test_version_whose_queued_tag_cannot_be_set_is_not_yielded_until_it_can(mlflow_registry, monkeypatch):
    model = new_model()
    version = mlflow_registry.create_version(model)
    mlflow_registry.set_alias(model, "challenger", version)
    writes = {"allowed": False, "refused": 0}
    upstream = httpx.AsyncClient(base_url=f"{mlflow_registry.url}/api/2.0/mlflow/")

    async def registry(request: httpx.Request) -> httpx.Response:
        # Reads reach the live server; writes fail as a read-only replica or a full disk would.
        if request.method == "POST" and not writes["allowed"]:
            writes["refused"] += 1
            return httpx.Response(503, json={"message": "read-only"})
        forwarded = await upstream.send(
            upstream.build_request(request.method, request.url.path.split("/mlflow/")[1],
                                   params=request.url.params, content=request.content,
                                   headers={"content-type": request.headers.get("content-type", "")})
        )  # fmt: skip
        return httpx.Response(forwarded.status_code, content=forwarded.content, headers=forwarded.headers)

    trigger = watcher(mlflow_registry, model)
    transport = httpx.MockTransport(registry)
    monkeypatch.setattr(
        trigger,
        "_client",
        lambda: httpx.AsyncClient(base_url="http://registry/api/2.0/mlflow/", transport=transport),
    )
    refused = asyncio.run(collect(trigger, 1.5))
    assert refused == [] and writes["refused"] >= 2
    assert "rollout" not in mlflow_registry.tags(model, version)
    writes["allowed"] = True
    assert [e["version"] for e in asyncio.run(collect(trigger, 1.5))] == [version]


# --- a registry that is down --------------------------------------------------------------------


def test_unreachable_registry_yields_nothing_and_does_not_raise():
    trigger = ApprovalTrigger(mlflow_url=f"http://127.0.0.1:{free_port()}", poll_s=POLL_S)
    assert asyncio.run(collect(trigger, 2.0)) == []


@contextlib.contextmanager
def failing_server(status: int) -> Iterator[tuple[str, list[float]]]:
    """A loopback HTTP server answering every request with ``status``; yields its URL and hit times."""
    hits: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(time.monotonic())
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_failing_registry_is_polled_with_backoff_and_yields_nothing():
    with failing_server(503) as (url, hits):
        trigger = ApprovalTrigger(mlflow_url=url, poll_s=POLL_S)
        assert asyncio.run(collect(trigger, 3.0)) == []
    # Polls at 0, 0.4, 1.2 and 2.8 s (the wait doubling from poll_s), not every 0.2 s.
    assert 2 <= len(hits) <= 5


# --- through Airflow's own processes ------------------------------------------------------------

AIRFLOW = Path(sys.executable).parent / "airflow"
TEST_DAG = "deploy_on_approval"


def query(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute(sql).fetchall()


def wait_for(what: str, check, timeout_s: float, logs: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(logs.glob("*.log")))
    raise AssertionError(f"{what}: not within {timeout_s} s\n{tails}")


@pytest.fixture
def airflow_on_test_dags(tmp_path, mlflow_registry) -> Iterator[tuple[Path, list[str]]]:
    """Scheduler, dag-processor and triggerer on a fresh home whose one bundle is tests/orchestration/dags.

    Not the session's test home: that one runs in unit-test mode, for dag.test() in this process.
    Yields the metadata database and the models the test DAG's watcher looks at.
    """
    home = tmp_path / "airflow"
    home.mkdir()
    models = [new_model(), new_model()]
    bundle = {"name": "test-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
              "kwargs": {"path": str(TEST_DAGS)}}  # fmt: skip
    env = clean_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(TEST_DAGS),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PROJECT_ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",  # a paused DAG's watchers do not run
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=json.dumps([bundle]),
        MLOPS_TEST_APPROVALS_MLFLOW_URL=mlflow_registry.url,
        MLOPS_TEST_APPROVALS_MODELS=",".join(models),
        MLOPS_TEST_APPROVALS_REQUEUE_S="10",
    )
    done = subprocess.run(
        [str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    processes = [
        start_detached([str(AIRFLOW), name], env, tmp_path / f"{name}.log")
        for name in ("dag-processor", "scheduler", "triggerer")
    ]
    try:
        yield home / "airflow.db", models
    finally:
        for process in processes:  # all told at once: the scheduler takes a while to go
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            stop_detached(process, grace_s=5)


@pytest.mark.integration
def test_every_approval_reaches_a_dag_run_through_airflows_triggerer_and_scheduler(
    airflow_on_test_dags, mlflow_registry, tmp_path
):
    # Two approvals a second apart: Airflow 3.3.2 gives the second a run of its own, or strands its
    # event when it lands before the scheduler has made the run for the first (it queues one
    # wake-up per asset and DAG); then the version, still queued, is fired again after requeue_s
    # (10 s here) and that run consumes both. Either way every approval reaches a run.
    db, models = airflow_on_test_dags
    # The watcher runs once the dag-processor has stored it and the triggerer has taken it.
    wait_for("the watcher assigned to the triggerer",
             lambda: query(db, "SELECT id FROM trigger WHERE triggerer_id IS NOT NULL"), 90, tmp_path)  # fmt: skip
    versions = {model: mlflow_registry.create_version(model) for model in models}
    approved_at = time.monotonic()
    for model, version in versions.items():
        mlflow_registry.set_alias(model, "challenger", version)

    def consumed() -> set[tuple[str, str, str]]:
        rows = query(db, f"""
            SELECT e.extra FROM dag_run r JOIN dagrun_asset_event l ON l.dag_run_id = r.id
            JOIN asset_event e ON e.id = l.event_id WHERE r.dag_id = '{TEST_DAG}'""")  # fmt: skip
        payloads = {
            (p["model"], p["version"], p["signal"]) for p in (json.loads(x)["payload"] for (x,) in rows)
        }
        return payloads if {model for model, _, _ in payloads} == set(models) else set()

    assert wait_for("a DAG run for each approval", consumed, 60, tmp_path) == {
        (model, version, "alias") for model, version in versions.items()
    }
    assert time.monotonic() - approved_at < 60
