"""monitor_model: is each deployed model still seeing the world it was trained on?

**Scheduled** (hourly by default: `defaults.monitor.schedule` in config/models.yaml) for every
model the file lists, each with its own window and thresholds (`monitor`); **or by hand**, from
the trigger form: one model, a window end, and any change to its thresholds for this run.

Tasks:

1. `plan`: the models, and the window's end: the run's data interval end (a re-run of the same
   interval checks the same window, and gives the same answer);
2. `check`, one per model (`mlops monitor run`, in the runtime environment): the window's events
   streamed from the inference log; per serving version, against its reference profile from
   MLflow: data quality (great-expectations), training-serving skew and drift against the
   previous windows (with effect sizes, not p-values alone), multivariate drift, outliers,
   accuracy where labels came back; the decision (too few events decide nothing, and say so; a
   cooldown makes one incident one trigger); the HTML report logged to MLflow and linked from the
   version and from this task's **Report** button; the window's summary written to the log store;
3. `trigger`: for each model whose check tripped outside the cooldown, an asset event on
   `mlops://models/<model>/drift` whose extra says which checks tripped, the window, the version
   and the report's link: the retraining DAG is scheduled on it.

A log store that is down fails `check` with its message (the next run covers its own window; a
re-run of this one covers the gap).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, AssetAlias, Param, task

from mlops_airflow import MlopsReportOperator
from mlops_airflow.models_file import (
    enabled_models,
    models_file,
    read_models,
    section,
    setting_flags,
    setting_params,
)

MODELS = read_models()
DEFAULTS = section(MODELS, "monitor")
SCHEDULE = DEFAULTS.get("schedule") or "@hourly"
MONITORED = enabled_models(MODELS, "monitor")
DRIFT = AssetAlias("mlops-model-drift")  # each event names its model's asset: mlops://models/<model>/drift

# The settings a run may change: (param, flag, JSON type, what).
SETTINGS = (
    ("window", "window", "string", "how far back from the end: 30m, 1h, 2d"),
    ("min_events", "min-events", "integer", "a version's events a decision needs"),
    ("alpha", "alpha", "number", "significance per family of tests (Bonferroni across features)"),
    ("wasserstein_min", "wasserstein-min", "number", "a numeric feature's effect that trips (reference SDs)"),
    (
        "js_min",
        "js-min",
        "number",
        "a categorical feature's or the predictions' Jensen-Shannon distance that trips",
    ),
    ("mmd_min", "mmd-min", "number", "the multivariate test's MMD² that trips"),
    ("outlier_rate_max", "outlier-rate-max", "number", "share of outlying rows that trips"),
    ("accuracy_drop_max", "accuracy-drop-max", "number", "accuracy drop that trips"),
    ("cooldown", "cooldown", "string", "after a trigger, none for this long: 6h"),
)


with DAG(
    dag_id="monitor_model",
    description="inference log window -> quality, skew, drift, outliers, performance -> report; a trigger when it trips",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # windows in order: each compares with the ones before it
    tags=["mlops", "monitor"],
    doc_md=__doc__,
    params={
        "model": Param("", type="string", description=f"one model; empty: every monitored model ({', '.join(MONITORED) or 'none'})"),
        "end": Param(
            None, type=["null", "string"],
            description="the window's end: an ISO time, or 10m (that long ago); empty: the run's data interval end (by hand: now)",
        ),
        **setting_params(MODELS, "monitor", SETTINGS),
    },
):  # fmt: skip

    @task
    def plan(params: dict[str, Any], data_interval_end: Any = None) -> list[list[str]]:
        """One `mlops monitor run` command line per model."""
        models = [params["model"]] if params.get("model") else MONITORED
        if not models:
            raise ValueError(f"no model to monitor: {models_file()} lists none, and the form names none")
        end = params.get("end") or (data_interval_end or pendulum.now("UTC")).isoformat()
        flags = setting_flags(SETTINGS, params)
        return [["monitor", "run", model, f"--end={end}", *flags] for model in models]

    check = MlopsReportOperator.partial(
        task_id="check",
        retries=1,  # the log store or MLflow away for a moment; the window is the same on retry
        retry_delay=timedelta(minutes=2),
    ).expand(arguments=plan())

    @task(outlets=[DRIFT])
    def trigger(results: Any, outlet_events: Any = None) -> dict[str, Any]:
        """The asset events of the models that tripped outside their cooldown."""
        raised, quiet = [], {}
        for result in results or []:
            if not isinstance(result, dict):
                continue
            if result.get("emit") and result.get("event"):
                event = result["event"]
                outlet_events[DRIFT].add(Asset(event["asset"]), extra=event["extra"])
                raised.append(event["asset"])
                print(f"raised {event['asset']}: {event['extra']['reason']}")
            else:
                why = result.get("reason") if result.get("decision") != "tripped" else "in the cooldown"
                quiet[result.get("model", "?")] = f"{result.get('decision')}: {why}"
        return {"raised": raised, "quiet": quiet}

    trigger(check.output)
