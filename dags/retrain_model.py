"""retrain_model: a model whose monitoring tripped is trained again on what it sees now, and the
candidate reaches the registry with its lineage, approved by policy or left for a person.

**Scheduled** on the monitoring DAG's asset events, `mlops://models/<model>/drift`, for every model
of config/models.yaml whose `retrain.enabled` holds: the event's extra (the window, the checks that
tripped, the reason, the report) is the trigger. **Or by hand**, from the form: a model, a trigger
key (one candidate per key), and any change to its retrain settings for this run.

Tasks, each an `mlops retrain` command in the runtime environment; the steps of one trigger share
one MLflow run in the retraining experiment, so a step run again finds what the others left:

1. `request`: the model and the trigger, from the form or from the drift event (several models
   drifting at once: this run takes the first, `fan_out` starts one run for each other);
2. `dataset`: the parent version's training rows plus the labelled traffic before the window's
   end, with a content hash and counts by source; `go` skips the rest when this trigger has
   registered its candidate already (the same trigger twice registers one version);
3. `validate`: the dataset against a great-expectations suite; a failure lists the failing
   expectations and ends the run: nothing is registered;
4. `train`: a seeded PyTorch MLP, early-stopped on a validation split, on CUDA when present;
5. `export`: ONNX, and ONNX Runtime against PyTorch on the held-out rows within `parity_atol`,
   or the run ends: nothing is registered;
6. `evaluate`: the candidate and the champion on the same held-out rows and the recent window;
7. `register`: the version in MLflow with its signature, input example, transformer spec,
   metrics, reference profile and lineage (parent, trigger, monitoring run and report, dataset
   hash, code version);
8. `approve`: by the model's policy: the `challenger` alias when the candidate beats the champion
   by the margin (and `deploy_model` takes it through the canary on its own), else left for a
   person in the MLflow UI, with the reason on the version and in this task's result.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Asset, AssetAny, Param, task

from mlops_airflow import MlopsOperator
from mlops_airflow.models_file import drift_uri, enabled_models, read_models, setting_flags, setting_params

MODELS = read_models()
RETRAINED = enabled_models(MODELS, "retrain")
DRIFTS = [Asset(drift_uri(model)) for model in RETRAINED]
STEPS = ("dataset", "validate", "train", "export", "evaluate", "register", "approve")
LINKED = ("dataset", "register", "approve")  # results that name the monitoring report or the version

# The settings a run may change: (param, flag, JSON type, what); the runtime checks the values.
SETTINGS = (
    ("window", "window", "string", "labelled traffic this far back from the window's end: 7d"),
    ("epochs", "epochs", "integer", "training epochs at most"),
    ("hidden", "hidden", "string", "the MLP's hidden layer widths: 64 or 128,64"),
    ("learning_rate", "learning-rate", "number", "Adam's learning rate"),
    ("patience", "patience", "integer", "epochs without a better validation loss before stopping"),
    ("seed", "seed", "integer", "the split's and the training's seed"),
    ("parity_atol", "parity-atol", "number", "ONNX Runtime and PyTorch probabilities may differ by this"),
    ("metric", "metric", "string", "what approval compares: accuracy, macro_f1, log_loss"),
    ("margin", "margin", "number", "how much the candidate must beat the champion by"),
    ("approve", "approve", "string", "auto (the challenger alias when it wins) or manual (a person)"),
    ("min_rows", "min-rows", "integer", "the dataset's rows at least"),
    ("min_traffic_rows", "min-traffic-rows", "integer", "its labelled traffic rows at least"),
)


def _request(conf: dict[str, Any]) -> dict[str, Any]:
    """One model's trigger as the form's fields: model, trigger, reason, monitor_run, report, end."""
    return {
        key: conf.get(key) or ""
        for key in ("model", "trigger", "reason", "monitor_run", "report", "end", "parent")
    }


def _from_event(event: Any) -> dict[str, Any]:
    """A drift event's trigger: its key is the model and the window's end, so a window that
    tripped once is one trigger however often its event is seen."""
    extra = event.extra or {}
    window = extra.get("window") or {}
    end = window.get("end") or ""  # to the second: the window's own end_ms, to the millisecond, wins
    if window.get("end_ms"):
        end = pendulum.from_timestamp(int(window["end_ms"]) / 1000, tz="UTC").isoformat()
    return _request({
        "model": extra.get("model"),
        "trigger": f"drift:{extra.get('model')}:{window.get('end_ms') or end}",
        "reason": extra.get("reason") or "",
        "monitor_run": f"{event.source_dag_id}/{event.source_run_id}" if event.source_run_id else "",
        "report": extra.get("report") or "",
        "end": end,
    })  # fmt: skip


def triggers(events: list[Any]) -> list[dict[str, Any]]:
    """One trigger per model among a run's events, oldest model first: its newest tripped window
    (one event can be listed more than once: under its asset and under the alias it came by)."""
    newest: dict[str, Any] = {}
    for event in sorted(events, key=lambda event: str(event.timestamp)):
        model = (event.extra or {}).get("model")
        if model:
            newest[model] = event  # the later one wins; the model keeps its first place
    return [_from_event(event) for event in newest.values()]


with DAG(
    dag_id="retrain_model",
    description="drift event -> dataset, validate, train, export + parity, evaluate, register with lineage -> approval by policy",
    schedule=AssetAny(*DRIFTS) if DRIFTS else None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one candidate at a time: the same trigger twice finds the first's version
    tags=["mlops", "retrain"],
    doc_md=__doc__,
    params={
        "model": Param("", type="string", description=f"the model; empty: the drift event's ({', '.join(RETRAINED) or 'none'} scheduled)"),
        "trigger": Param("", type="string", description="what asked for it: one candidate per key; empty: the drift event's window, or this run's id"),
        "reason": Param("", type="string", description="why, in words: recorded on the version"),
        "parent": Param("", type="string", description="the version retrained; empty: the champion"),
        "end": Param("", type="string", description="labelled traffic up to here: an ISO time; empty: the drift window's end, or now"),
        "monitor_run": Param("", type="string", description="the monitoring run that tripped (a drift event's fan-out fills it)"),
        "report": Param("", type="string", description="its report"),
        **setting_params(MODELS, "retrain", SETTINGS),
    },
):  # fmt: skip

    @task(multiple_outputs=True)
    def request(
        params: dict[str, Any], run_id: Any = None, triggering_asset_events: Any = None
    ) -> dict[str, Any]:
        """This run's model and trigger, each step's command line, and the other models' triggers."""
        if params.get("model"):
            wanted = [_request(params)]
        else:
            wanted = triggers([e for batch in (triggering_asset_events or {}).values() for e in batch])
        if not wanted:
            raise ValueError(
                "no model: set 'model' in the form, or let a drift event from monitor_model start the run"
            )
        first, others = wanted[0], wanted[1:]
        first["trigger"] = first["trigger"] or f"manual:{run_id}"
        flags = setting_flags(SETTINGS, params)
        base = [first["model"], f"--trigger={first['trigger']}"]
        dataset = [
            f"--{key.replace('_', '-')}={first[key]}"
            for key in ("reason", "monitor_run", "report", "end", "parent")
            if first[key]
        ]
        commands = {
            step: ["retrain", step, *base, *(dataset if step == "dataset" else []), *flags] for step in STEPS
        }
        print(f"retraining '{first['model']}' for trigger {first['trigger']}: {first['reason'] or 'by hand'}")
        return {"model": first["model"], "trigger": first["trigger"], "others": others, **commands}  # fmt: skip

    asked = request()
    steps = {
        step: MlopsOperator(
            task_id=step,
            arguments=asked[step],
            links=step in LINKED,
            gpu=step == "train",  # in a pod: the connection's GPUs (a process uses what it finds)
            retries=1,  # MLflow or the log store away for a moment (a refused candidate is not retried)
            retry_delay=timedelta(seconds=30),
        )
        for step in STEPS
    }

    @task.short_circuit
    def go(made: dict[str, Any]) -> bool:
        """False (the rest skipped) when this trigger's candidate is registered already."""
        print(f"dataset: {made['action']}: {made.get('reason') or made.get('dataset')}")
        return made["action"] == "train"

    @task
    def others(pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The other models' triggers in this run's events: each its own run, started by fan_out."""
        return pending

    fan_out = TriggerDagRunOperator.partial(
        task_id="fan_out", trigger_dag_id="retrain_model", wait_for_completion=False
    ).expand(conf=others(asked["others"]))

    asked >> steps["dataset"]
    gate = go(steps["dataset"].output)
    gate >> steps["validate"]
    for before, after in zip(STEPS[1:], STEPS[2:], strict=False):
        steps[before] >> steps[after]
