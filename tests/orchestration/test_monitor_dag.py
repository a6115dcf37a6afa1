"""The monitor_model DAG, run with dag.test() against a live MLflow server and a live log store (the
embedded one, written through its own interface): a window without a shift decides nothing; a
shifted one trips, names the feature and raises the asset event with its reason; a window below
the minimum decides nothing and says so; a trip inside the cooldown raises no second event. The
version was registered without a profile: `mlops profile` makes it first."""

from __future__ import annotations

import json
import subprocess

import pytest
from airflow.utils.state import DagRunState

from tests.orchestration.conftest import PROJECT_ROOT, RUNTIME_PYTHON, RuntimeWorld, clean_env, iso

MODEL = "dag-monitored"
T0 = 1_793_577_600_000  # 2026-11-01T00:00Z: fixed windows, in the past
MINUTE = 60_000
POLICY = f"""
models:
  {MODEL}:
    monitor: {{window: 10m, min_events: 500, cooldown: 6h}}
"""
REGISTER = """
import sys
import mlflow
from serving.examples import fraud_transformer, log_mlp
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run():
    version = log_mlp(sys.argv[2], seed=1, transformer=fraud_transformer())
print(version)
"""
# Windows of ten minutes from T0: clean, age_days shifted by half a standard deviation, too few
# events, shifted again (inside the cooldown of the second), a new country in 5 % of rows, 5 %
# outliers.
WRITE = """
import sys
import numpy as np
import pandas as pd
from monitoring.events import InferenceEvent
from monitoring.logstore import get_log_store

store_url, model, version, t0, data = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
rng = np.random.default_rng(7)
n = 5000
pd.DataFrame({"amount": rng.lognormal(3.5, 1.0, n), "age_days": rng.normal(400, 300, n),
              "country": rng.choice(["DE", "FR", "US"], n)}).to_csv(data, index=False)
store = get_log_store(store_url)
windows = [(1000, "none"), (1000, "mean"), (100, "none"), (1000, "mean"), (1000, "category"), (1000, "outliers")]
for number, (rows, shift) in enumerate(windows):
    start = t0 + number * 600_000
    events = []
    for i in range(rows):
        amount, age = float(rng.lognormal(3.5, 1.0)), float(rng.normal(400, 300))
        country = str(rng.choice(["DE", "FR", "US"]))
        if shift == "mean":
            age += 150.0
        elif shift == "category" and i % 20 == 0:
            country = "BR"
        elif shift == "outliers" and i % 20 == 0:
            amount, age = amount + 3000.0, age + 1800.0
        events.append(InferenceEvent(
            f"w{number}-{i}", start + i * 500, model, version, "stable", f"r{number}-{i}", 0,
            {"amount": amount, "age_days": age, "country": country},
            {"label": "legit", "probabilities": {"legit": 0.9, "fraud": 0.1}}, 1.0))
    store.write(events)
print("written")
"""


@pytest.fixture(scope="module")
def world(mlflow_registry, airflow_db, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor-dag")
    runtime = RuntimeWorld(tmp, mlflow_registry.url, POLICY)
    settings = runtime.settings
    version = runtime.run("-c", REGISTER, mlflow_registry.url, MODEL)
    data = tmp / "training.csv"
    runtime.run("-c", WRITE, settings["MLOPS_LOGS__STORE"], MODEL, version, str(T0), str(data))
    return {
        "registry": mlflow_registry,
        "version": version,
        "settings": settings,
        "runtime": runtime,
        "data": data,
    }


@pytest.fixture(scope="module")
def profiled(world):
    """`mlops profile` on a version registered without one: it is stored and linked from the version."""
    assert "monitoring.profile" not in world["registry"].tags(MODEL, world["version"])
    made = json.loads(
        world["runtime"].run(
            "-m", "mlops", "profile", MODEL, "--version", world["version"], "--data", str(world["data"])
        )
    )
    assert made["features"] == {"amount": "numeric", "age_days": "numeric", "country": "categorical"}
    assert made["rows"] == 5000 and made["expectations"] == 9  # per feature: exists, nulls, range or domain
    tag = world["registry"].tags(MODEL, world["version"])["monitoring.profile"]
    assert tag == made["profile"]["uri"] and tag.endswith("/monitoring-profile")
    return made


@pytest.fixture
def monitor_dag(world, profiled, monkeypatch):
    return world["runtime"].load_dag(monkeypatch, "monitor_model")


def window(monitor_dag, number: int) -> tuple[dict, dict]:
    """Run the DAG for window ``number`` (its end); the check's result and the trigger's."""
    run = monitor_dag.test(run_conf={"model": MODEL, "end": iso(T0 + (number + 1) * 10 * MINUTE)})
    assert run.state == DagRunState.SUCCESS
    check = run.get_task_instance("check", map_index=0).xcom_pull(task_ids="check", map_indexes=0)
    trigger = run.get_task_instance("trigger").xcom_pull(task_ids="trigger")
    return check, trigger


def drift_events() -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == f"mlops://models/{MODEL}/drift")
        ).all()  # fmt: skip
        return [row[0] for row in rows]


def test_windows_in_order_ok_tripped_insufficient_and_cooled_down(world, monitor_dag):
    clean, trigger = window(monitor_dag, 0)
    assert clean["decision"] == "ok" and clean["events"] == 1000, clean["reason"]
    assert trigger["raised"] == [] and drift_events() == []

    shifted, trigger = window(monitor_dag, 1)
    assert shifted["decision"] == "tripped"
    assert "skew:age_days" in shifted["tripped"] and "drift:age_days" in shifted["tripped"]
    assert "skew:amount" not in shifted["tripped"] and "'age_days' drifted from training" in shifted["reason"]
    assert shifted["emit"] and trigger["raised"] == [f"mlops://models/{MODEL}/drift"]
    [extra] = drift_events()
    assert extra["versions"] == [world["version"]] and "skew:age_days" in extra["tripped"]
    assert (
        extra["window"]["end"] == shifted["window"]["end"] and extra["report"] == shifted["links"]["report"]
    )

    few, trigger = window(monitor_dag, 2)
    assert few["decision"] == "insufficient" and "100 events, fewer than the 500" in few["reason"]
    assert trigger["raised"] == []

    again, trigger = window(monitor_dag, 3)
    assert again["decision"] == "tripped" and not again["emit"]
    assert again["cooldown"]["since"] == shifted["window"]["end"].replace("+00:00", "Z")
    assert trigger["raised"] == [] and len(drift_events()) == 1  # one incident, one trigger

    category, _ = window(monitor_dag, 4)
    assert "skew:country" in category["tripped"] and "unseen values ['BR']" in category["reason"]
    outliers, _ = window(monitor_dag, 5)
    assert "outliers:rows" in outliers["tripped"] and not outliers["emit"]  # still the cooldown


def test_a_store_that_is_down_fails_the_step_with_its_address(world):
    done = subprocess.run(
        [str(RUNTIME_PYTHON), "-m", "mlops", "monitor", "run", MODEL, "--store", "opensearch://127.0.0.1:9?timeout_ms=500"],
        capture_output=True, text=True, env=clean_env(**world["settings"]), cwd=PROJECT_ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "BackendUnavailable" and "127.0.0.1:9" in error["message"]


def test_the_report_is_logged_where_the_version_links_to_it(world, monitor_dag):
    import httpx

    shifted, _ = window(monitor_dag, 1)  # a re-run of the same window: the same answer
    assert shifted["decision"] == "tripped" and "skew:age_days" in shifted["tripped"]
    tags = world["registry"].tags(MODEL, world["version"])
    assert tags["monitoring.report"] == shifted["links"]["report"]
    page = httpx.get(shifted["links"]["report"], timeout=30)
    assert page.status_code == 200 and "age_days" in page.text
    assert page.text.count("<img") >= 4  # three features, the outlier scores (and the past windows)
    assert "drifted from training" in page.text
