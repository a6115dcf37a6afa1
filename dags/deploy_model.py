"""deploy_model: an approved MLflow version reaches 100 % through an analysed canary, or is rolled back.

**Started by** an approval in the MLflow registry (the `challenger` alias, or the tag
`approval=approved`; config/models.yaml says which count): the registry watcher in the triggerer
sees it within seconds and posts an event on the asset `mlops://registry/approvals`, which
schedules one run. **Or by hand**, from the trigger form: a model, a version, and any change to
its rollout policy for this run (empty fields: the model's policy, from config/models.yaml).

Tasks, each an `mlops deploy` command in the runtime environment:

1. `request`: the model and version, from the form or from the approval event;
2. `begin`: checks the approval, takes the model's lease on the target (a second run for the
   same model waits here, retrying), reconciles what a dead run left; `go` skips the rest when
   there is nothing to do (already promoted, already serving);
3. `verify`: the version's bytes, signature, runtime and input example;
4. `ramp`: the canary at each share until it has enough requests and time, decided from the
   inference log (errors, p95 latency, prediction distribution): a sensor in reschedule mode;
5. `finish`: promotion (the `champion` alias) or the recorded rollback, the canary report;
6. `abort`: when any step fails: the canary is rolled back and the registry says why; `failed`
   then keeps the run failed.

The task buttons link the canary report, the MLflow version and the model server's metrics.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, AssetWatcher, Param, task

from mlops_airflow import MlopsOperator, MlopsSensor
from mlops_airflow.approvals import ApprovalTrigger
from mlops_airflow.models_file import read_models, setting_help

# Where the registry is: an Airflow Variable set through the environment (the embedded stack sets
# it; at scale, the deployment does), so parsing this file reads no database; the policies: the
# models file (mlops_airflow.models_file).
MLFLOW_URL = os.environ.get("AIRFLOW_VAR_MLOPS_MLFLOW_URL", "http://127.0.0.1:5000")
POLICIES = read_models()
DEFAULTS = POLICIES.get("defaults") or {}
RAMP = DEFAULTS.get("ramp") or {}
APPROVAL = DEFAULTS.get("approval") or {}
_ramps = [RAMP, *((m or {}).get("ramp") or {} for m in (POLICIES.get("models") or {}).values())]
POKE_S = min(float(r.get("poke_s", RAMP.get("poke_s", 15))) for r in _ramps)
# The longest a ramp may take: every step waiting its longest, and the pokes between.
RAMP_TIMEOUT_S = (
    max(
        (1 + len(r.get("steps", RAMP.get("steps", [25, 50]))))
        * float(r.get("max_step_s", RAMP.get("max_step_s", 900)))
        for r in _ramps
    )
    * 1.5
    + 300
)

REQUEUE_S = 180.0  # more than begin's retry delay: a waiting run refreshes its approval in time

APPROVALS = Asset(
    "mlops://registry/approvals",
    watchers=[
        AssetWatcher(
            name="mlflow-approvals",
            trigger=ApprovalTrigger(
                mlflow_url=MLFLOW_URL,
                alias=APPROVAL.get("alias") or "challenger",
                use_alias=bool(APPROVAL.get("alias", "challenger")),
                tag=APPROVAL.get("tag") or "",
                legacy_stage=bool(APPROVAL.get("legacy_stage", False)),
                # An approval whose event was lost (or left behind by Airflow's asset queue) is fired
                # again after this; a run waiting on the model's lease keeps it fresh meanwhile.
                requeue_s=REQUEUE_S,
            ),
        )
    ],
)


def _model_help(key: str) -> str:
    """The file's value of a ramp or threshold setting, and each model's own."""
    thresholds = key in ("alpha", "error_margin", "p95_ratio_max", "p95_margin_ms", "js_max")
    return setting_help(POLICIES, "thresholds" if thresholds else "ramp", key)


def _number(key: str, what: str, minimum: float | None = None) -> Param:
    return Param(None, type=["null", "number"], minimum=minimum, description=f"{what}; {_model_help(key)}")


def _flag(name: str, key: str) -> str:
    """A Jinja argument: ``--name=<param>`` when the param is set, else nothing (dropped)."""
    return "{{ '--" + name + "=%s' % params." + key + " if params." + key + " is not none else '' }}"


MODEL = "{{ ti.xcom_pull(task_ids='request')['model'] }}"
RUN = "--run-id={{ run_id }}"
TARGET = "{{ '--target=%s' % ti.xcom_pull(task_ids='begin')['record']['target'] if ti.xcom_pull(task_ids='begin')['record'] else '' }}"

with DAG(
    dag_id="deploy_model",
    description="approved MLflow version -> canary ramp analysed on the inference log -> 100 % or rollback",
    schedule=APPROVALS,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,  # runs for different models go on together; one model: the lease decides
    tags=["mlops", "deploy"],
    doc_md=__doc__,
    params={
        "model": Param("", type="string", description="registered model name; empty: the approval event's"),
        "version": Param("", type="string", description="registry version; empty: the approved one"),
        "initial_percent": _number("initial_percent", "the canary's first share of traffic (%)", 0),
        "steps": Param(
            None,
            type=["null", "array"],
            items={"type": "number"},
            description=f"the shares after it, rising, below 100; {_model_help('steps')}",
        ),
        "min_requests": _number("min_requests", "canary requests a step needs before it is decided", 1),
        "min_step_s": _number("min_step_s", "seconds a step lasts at least", 0),
        "max_step_s": _number("max_step_s", "seconds a step may wait for enough requests", 0),
        "insufficient": Param(
            None,
            type=["null", "string"],
            enum=[None, "rollback", "fail"],
            description=f"too few requests in time: roll back, or fail the run; {_model_help('insufficient')}",
        ),
        "alpha": _number("alpha", "significance of the one-sided error-rate test", 0),
        "error_margin": _number("error_margin", "error-rate increase that fails", 0),
        "p95_ratio_max": _number("p95_ratio_max", "canary/stable p95 latency at most", 0),
        "p95_margin_ms": _number("p95_margin_ms", "and the canary at most this much slower (ms)", 0),
        "js_max": _number("js_max", "Jensen-Shannon distance of the prediction distributions at most", 0),
        "target": Param(
            None,
            type=["null", "string"],
            description="deployment target URL; empty: the model's policy, else the stack's",
        ),
    },
):

    @task
    def request(params: dict[str, Any], triggering_asset_events: Any = None) -> dict[str, str]:
        """The model and version: the form's, else the oldest approval among the run's events.
        (Approvals of other models in the same run are picked up again by the watcher.)"""
        if params.get("model"):
            return {"model": params["model"], "version": params.get("version") or ""}
        events = [event for batch in (triggering_asset_events or {}).values() for event in batch]
        # An event from a watcher's trigger keeps the trigger's payload under "payload".
        payloads = [(event.extra or {}).get("payload") or event.extra or {} for event in events]
        approvals = [payload for payload in payloads if payload.get("model")]
        if not approvals:
            raise ValueError("no model: set 'model' in the form, or approve a version in MLflow")
        first = min(approvals, key=lambda extra: int(extra.get("queued_at") or 0))
        return {"model": first["model"], "version": str(first.get("version") or "")}

    chosen = request()
    begin = MlopsOperator(
        task_id="begin",
        arguments=[
            "deploy",
            "begin",
            MODEL,
            RUN,
            "{{ '--version=%s' % ti.xcom_pull(task_ids='request')['version'] if ti.xcom_pull(task_ids='request')['version'] else '' }}",
            _flag("initial-percent", "initial_percent"),
            "{{ '--steps=%s' % (params.steps | join(',')) if params.steps else '' }}",
            _flag("min-requests", "min_requests"),
            _flag("min-step-s", "min_step_s"),
            _flag("max-step-s", "max_step_s"),
            _flag("insufficient", "insufficient"),
            _flag("alpha", "alpha"),
            _flag("error-margin", "error_margin"),
            _flag("p95-ratio-max", "p95_ratio_max"),
            _flag("p95-margin-ms", "p95_margin_ms"),
            _flag("js-max", "js_max"),
            _flag("target", "target"),
        ],  # fmt: skip
        retries=60,  # LeaseHeld: another run rolls this model out; wait for it (an hour)
        retry_delay=timedelta(seconds=60),
        links=True,
    )

    @task.short_circuit
    def go(claim: dict[str, Any]) -> bool:
        """False (the rest skipped) when begin found nothing to do; its reason is in its XCom."""
        print(f"begin: {claim['action']}: {claim.get('reason') or claim.get('version')}")
        return claim["action"] in ("deploy", "resume")

    verify = MlopsOperator(
        task_id="verify",
        arguments=["deploy", "verify", MODEL, "--version={{ ti.xcom_pull(task_ids='begin')['version'] }}"],
    )
    ramp = MlopsSensor(
        task_id="ramp",
        arguments=["deploy", "advance", MODEL, RUN, TARGET],
        mode="reschedule",
        poke_interval=POKE_S,
        timeout=RAMP_TIMEOUT_S,
        retries=2,  # a poke killed with its worker: the next one resumes from the record
        retry_delay=timedelta(seconds=POKE_S),
    )
    finish = MlopsOperator(task_id="finish", arguments=["deploy", "finish", MODEL, RUN, TARGET], links=True)
    abort = MlopsOperator(
        task_id="abort",
        arguments=[
            "deploy",
            "abort",
            MODEL,
            RUN,
            TARGET,
            "--reason={{ (ti.xcom_pull(task_ids=['verify', 'ramp', 'finish'], key='mlops_error') or [])"
            " | reject('none') | map(attribute='message') | first | default('a step of the run failed') }}",
        ],  # fmt: skip
        trigger_rule="one_failed",
        links=True,
    )

    @task
    def failed(undone: dict[str, Any]) -> None:
        """The run stays failed after abort undid what it left (a run that undid a failure is not a
        success); the reason is the failed step's."""
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"the deploy failed and was undone: {undone.get('reason', undone)}")

    claim = go(begin.output)
    chosen >> begin >> claim >> verify >> ramp >> finish
    [verify, ramp, finish] >> abort
    failed(abort.output)
