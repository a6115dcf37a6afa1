"""A rollout: an approved registry version taken to 100 % through an analysed canary, or back.

The deploy DAG's steps, each an ``mlops deploy`` command, each safe to run again:

- ``begin``: the version must be approved (``serving.policy.Approval``); the run takes the model's
  lease on the target (one rollout per model at a time: a second run is refused with
  ``LeaseHeld`` and retries later), reconciles what a dead run left (a canary without a live
  lease is rolled back), and starts the **rollout record**, kept with the lease on the target;
  the same run beginning again resumes from that record;
- ``advance``: one look at the ramp (the DAG's sensor calls it every ``poke_s``, holding no worker
  between looks): load the canary at the first share, wait for each step's minimum of canary
  requests and time, decide it (``serving.canary.analyze`` over the step's window of the
  inference log), move to the next share, or roll back at once at the first failure;
- ``finish``: promote (target, then registry) when every step passed, else record the rollback;
  write the canary report, log it to MLflow, link it from the version, release the lease;
- ``abort``: what a failed task leaves is undone (the DAG runs it when any step fails).

The registry tells what happened (``ROLLOUT_TAG`` and the ``rollout.*`` tags on the version, the
``champion`` alias on the version serving 100 %); the record on the target says where a run is.
Every renewal of the lease is a heartbeat: a run that stops renewing loses the model, and the
model server rolls its canary back by itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidInput, LeaseHeld, MLOpsError, ModelNotFound
from common.settings import Settings
from monitoring.events import now_ms
from monitoring.report import experiment_id, log_report
from serving.canary import Thresholds, analyze
from serving.policy import Approval, Ramp, load_policy
from serving.registry import HANDLED, ROLLOUT_TAG, Registry
from serving.targets import Deployment, DeploymentTarget, get_deployment_target

CHAMPION = "champion"


class RolloutFailed(MLOpsError):
    """The rollout ended without a promotion and its policy says the run must fail."""


@dataclass(frozen=True)
class Step:
    """What ``advance`` did at one look: the DAG's sensor is done when ``done`` is true."""

    model: str
    version: str
    done: bool
    percent: float | None
    state: str  # in words: waiting for what, decided what
    record: dict[str, Any]


# --- the steps --------------------------------------------------------------------------------


def begin(
    settings: Settings,
    model: str,
    version: str | None,
    run_id: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    target_url: str | None = None,
) -> dict[str, Any]:
    """Claim the rollout of ``version`` (default: the approved one) for ``run_id``: the plan, or a
    skip with the reason when there is nothing to do."""
    policy = load_policy(settings.deploy.models_file, model, overrides)
    registry = Registry(settings.mlflow_url)
    if version is None:
        version = registry.approved(model, policy.approval)
        if version is None:
            raise InvalidInput(
                f"model '{model}' has no approved version to roll out ({_signals(policy.approval)})"
            )
    registered = registry.version(model, version)
    signal = registry.signal(model, registered, policy.approval)
    if signal is None:
        raise InvalidInput(
            f"model '{model}' version {version} is not approved ({_signals(policy.approval)}): nothing deployed"
        )
    state, by = registered.tags.get(ROLLOUT_TAG), registered.tags.get("rollout.run")
    if state in HANDLED and by != run_id:
        return _skip(model, version, f"version {version} was already {state.replace('_', ' ')} by run {by}")
    target_url = target_url or policy.target or settings.deployment_target
    target = get_deployment_target(target_url, settings, owner=run_id)
    if state == "in_progress" and by and by != run_id and target.lease(model).owner == by:
        return _skip(model, version, f"version {version} is being rolled out by run {by}")
    try:
        held = target.take_lease(model, run_id, settings.deploy.lease_s)
    except LeaseHeld:
        # Another version of the model is being rolled out; this run waits (its task retries). The
        # approval stays queued, seen just now, so the registry watcher does not fire it again.
        registry.tag(model, version, {ROLLOUT_TAG: "queued", "rollout.queued_at": now_ms()})
        raise
    record = held.record or {}
    if record.get("run_id") == run_id and record.get("version") == version:
        return {
            "action": "resume",
            "model": model,
            "version": version,
            "record": record,
            "links": _links(registry, record),
        }
    deployment = _status(target, model)
    if deployment is not None and deployment.stable is not None and deployment.stable.version == version:
        target.release_lease(model, run_id)
        return _skip(model, version, f"version {version} already serves 100 % of '{model}' at {target_url}")
    if deployment is not None and deployment.canary is not None:  # left by a run that is gone
        left = deployment.canary.version
        target.rollback(model)
        if left != version:
            _note_abandoned(registry, model, left, run_id)
        deployment = target.status(model)
    started = now_ms()
    record = {
        "model": model,
        "version": version,
        "uri": f"models:/{model}/{version}",
        "stable_version": deployment.stable.version if deployment and deployment.stable else None,
        "first": deployment is None or deployment.stable is None,
        "run_id": run_id,
        "target": target_url,
        "outcome": "in_progress",
        "decided": None,
        "reason": "",
        "started_at_ms": started,
        "finished_at_ms": None,
        "approval": {"signal": signal, "approved_at_ms": _int(registered.tags.get("rollout.queued_at"))},
        "policy": policy.to_dict(),
        "thresholds": dataclasses.asdict(policy.thresholds),
        "steps": [],
    }
    target.take_lease(model, run_id, settings.deploy.lease_s, record)
    registry.tag(
        model, version, {ROLLOUT_TAG: "in_progress", "rollout.run": run_id, "rollout.started_at": started}
    )
    return {
        "action": "deploy",
        "model": model,
        "version": version,
        "record": record,
        "links": _links(registry, record),
    }


def advance(settings: Settings, model: str, run_id: str, target_url: str | None = None) -> Step:
    """One look at the ramp (see the module docstring); the record is saved with each renewal."""
    target, record = _owned(settings, model, run_id, target_url)
    version = record["version"]
    if record["decided"] is not None:
        return Step(model, version, True, None, f"decided: {record['decided']}", record)
    ramp = Ramp.from_dict(record["policy"]["ramp"])
    steps: list[dict[str, Any]] = record["steps"]
    now = now_ms()
    if record["first"]:  # nothing to compare with: the model's first version goes straight to stable
        target.deploy(model, version, record["uri"], role="stable")
        record["decided"] = "promote"
        record["reason"] = "the model's first version: no stable version to compare a canary with"
        return _saved(target, settings, record, True, 100.0, "first version deployed as stable")
    if not steps:
        status = target.status(model)
        if status.canary is None or status.canary.version != version:
            target.deploy(model, version, record["uri"], role="canary")
        target.set_traffic(model, ramp.percents[0])
        steps.append(_new_step(ramp.percents[0], now))
        return _saved(target, settings, record, False, ramp.percents[0], f"canary at {ramp.percents[0]:g} %")
    step = steps[-1]
    elapsed_s = (now - step["started_at_ms"]) / 1000
    analysis = _analyze(settings, model, record, step["started_at_ms"], now)
    step["analysis"] = dataclasses.asdict(analysis)
    waiting = analysis.outcome == "insufficient" or elapsed_s < ramp.min_step_s
    if waiting and elapsed_s < ramp.max_step_s:
        need = f"{analysis.canary.requests}/{ramp.min_requests} canary requests, {elapsed_s:.0f}/{ramp.min_step_s:g} s"
        return _saved(
            target, settings, record, False, step["percent"], f"waiting at {step['percent']:g} %: {need}"
        )
    step["ended_at_ms"] = now
    if waiting:  # the step's time ran out before it had enough requests
        step["decision"] = "insufficient"
        target.rollback(model)
        record["decided"] = "insufficient"
        record["reason"] = (
            f"too few requests at {step['percent']:g} % in {ramp.max_step_s:g} s: {analysis.reason}"
        )
        return _saved(target, settings, record, True, 0.0, "insufficient: canary rolled back")
    step["decision"] = analysis.outcome
    if analysis.outcome == "fail":
        target.rollback(model)  # at once: stable takes all traffic again before anything else
        record["decided"] = "rollback"
        record["reason"] = f"step {step['percent']:g} % failed: {analysis.reason}"
        return _saved(target, settings, record, True, 0.0, "failed: canary rolled back")
    following = [p for p in ramp.percents if p > step["percent"]]
    if not following:
        record["decided"] = "promote"
        return _saved(target, settings, record, True, step["percent"], "every step passed")
    target.set_traffic(model, following[0])
    steps.append(_new_step(following[0], now))
    return _saved(target, settings, record, False, following[0], f"passed; canary at {following[0]:g} %")


def finish(settings: Settings, model: str, run_id: str, target_url: str | None = None) -> dict[str, Any]:
    """Promote or record the rollback, as the ramp decided; report; release the model."""
    target, record = _owned(settings, model, run_id, target_url)
    decided, version = record["decided"], record["version"]
    if decided is None:
        raise InvalidInput(
            f"model '{model}': the ramp of run {run_id} has not decided yet (advance it first)"
        )
    registry = Registry(settings.mlflow_url)
    record["finished_at_ms"] = now_ms()
    if decided == "promote":
        if not record["first"]:
            target.promote(model)
        record["outcome"] = "promoted"
    else:
        _drop_canary(target, model, version)
        record["outcome"] = (
            "insufficient" if decided == "insufficient" and _fails_run(record) else "rolled_back"
        )
    report = _report(settings, registry, record)
    _record_in_registry(registry, record, report)
    target.take_lease(model, run_id, settings.deploy.lease_s, record)
    target.release_lease(model, run_id)
    result = _summary(record, report, registry)
    if record["outcome"] == "insufficient":
        raise RolloutFailed(
            f"model '{model}' version {version}: {record['reason']} (policy: fail the run); report: {report['url']}"
        )
    return result


def abort(
    settings: Settings, model: str, run_id: str, reason: str, target_url: str | None = None
) -> dict[str, Any]:
    """Undo what ``run_id`` left on the target and say so in the registry (the DAG's failure path).
    A model another run holds is left alone."""
    target = get_deployment_target(_target_url(settings, model, target_url), settings, owner=run_id)
    lease = target.lease(model)
    if lease.owner is not None and lease.owner != run_id:
        return _untouched(model, run_id, f"model '{model}' is held by run {lease.owner}")
    record = lease.record if lease.owner == run_id else (lease.expired or {}).get("record")
    if not record or record.get("run_id") != run_id:
        return _untouched(model, run_id, f"run {run_id} holds no rollout of '{model}'")
    if record.get("outcome") in HANDLED:
        if lease.owner == run_id:
            target.release_lease(model, run_id)
        return _untouched(model, run_id, f"already {record['outcome']}")
    if lease.owner == run_id:
        _drop_canary(target, model, record["version"])
    registry = Registry(settings.mlflow_url)
    record.update(outcome="rolled_back", decided=record.get("decided") or "rollback", finished_at_ms=now_ms())
    record["reason"] = record.get("reason") or f"the deploy run failed: {reason}"
    report = _report(settings, registry, record)
    _record_in_registry(registry, record, report)
    if lease.owner == run_id:
        target.release_lease(model, run_id)
    return {**_summary(record, report, registry), "action": "rolled_back"}


# --- helpers ----------------------------------------------------------------------------------


def _target_url(settings: Settings, model: str, given: str | None) -> str:
    return given or load_policy(settings.deploy.models_file, model).target or settings.deployment_target


def _owned(
    settings: Settings, model: str, run_id: str, target_url: str | None
) -> tuple[DeploymentTarget, dict[str, Any]]:
    """The target, as the run, and the run's record, renewing its lease (a heartbeat)."""
    target = get_deployment_target(_target_url(settings, model, target_url), settings, owner=run_id)
    current = target.lease(model)
    if current.owner is None:
        expired = current.expired or {}
        if expired.get("owner") == run_id:
            raise InvalidInput(
                f"the lease of run {run_id} on '{model}' ran out unrenewed (longer than MLOPS_DEPLOY__LEASE_S"
                f" between steps); the target rolled back canary version {expired.get('rolled_back')}: start a new run"
            )
        raise InvalidInput(
            f"run {run_id} has no rollout of model '{model}' on its target: run `deploy begin` first"
        )
    try:
        lease = target.take_lease(model, run_id, settings.deploy.lease_s)
    except LeaseHeld as exc:
        raise InvalidInput(f"run {run_id} lost the rollout of '{model}' (its lease ran out): {exc}") from exc
    record = lease.record or {}
    if record.get("run_id") != run_id:
        raise InvalidInput(
            f"run {run_id} holds '{model}' but keeps no rollout record there: run `deploy begin` again"
        )
    return target, record


def _saved(
    target: DeploymentTarget,
    settings: Settings,
    record: dict[str, Any],
    done: bool,
    percent: float | None,
    state: str,
) -> Step:
    target.take_lease(record["model"], record["run_id"], settings.deploy.lease_s, record)
    return Step(record["model"], record["version"], done, percent, state, record)


def _new_step(percent: float, now: int) -> dict[str, Any]:
    return {"percent": percent, "started_at_ms": now, "ended_at_ms": None, "decision": None, "analysis": None}


def _analyze(settings: Settings, model: str, record: dict[str, Any], start: int, end: int) -> Any:
    from monitoring.logstore import get_log_store

    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    try:
        thresholds = Thresholds(**record["thresholds"])
        return analyze(
            store.query(model, start, end, record["stable_version"], "stable"),
            store.query(model, start, end, record["version"], "canary"),
            thresholds,
        )
    finally:
        store.close()


def _status(target: DeploymentTarget, model: str) -> Deployment | None:
    """The model's state on the target; None when the target has never served it."""
    try:
        return target.status(model)
    except ModelNotFound:
        return None


def _drop_canary(target: DeploymentTarget, model: str, version: str) -> None:
    status = _status(target, model)
    if status is not None and status.canary is not None and status.canary.version == version:
        target.rollback(model)


def _fails_run(record: dict[str, Any]) -> bool:
    return record["policy"]["ramp"]["insufficient"] == "fail"


def _note_abandoned(registry: Registry, model: str, version: str, run_id: str) -> None:
    """A canary found without a live rollout: its version is tagged, so no one thinks it was judged."""
    try:
        registered = registry.version(model, version)
    except ModelNotFound:
        return
    if registered.tags.get(ROLLOUT_TAG) in (None, "queued", "in_progress"):
        registry.tag(
            model,
            version,
            {
                ROLLOUT_TAG: "rolled_back",
                "rollout.reason": f"its rollout stopped unfinished; rolled back by run {run_id}",
            },
        )


def _record_in_registry(registry: Registry, record: dict[str, Any], report: dict[str, Any]) -> None:
    """The registry after the rollout, as the module docstring says it reads."""
    model, version, run_id = record["model"], record["version"], record["run_id"]
    policy = record["policy"]
    alias = policy["approval"]["alias"]
    when = record["finished_at_ms"]
    links = {"rollout.report": report["url"], "rollout.report_run": report["run_id"]}
    if record["outcome"] == "promoted":
        previous = registry.alias(model, CHAMPION)
        registry.client.set_registered_model_alias(model, CHAMPION, version)
        if alias:
            registry.drop_alias_if(model, alias, version)
        last = next((s for s in reversed(record["steps"]) if s.get("analysis")), None)
        figures = _figures(last["analysis"]) if last else {}
        registry.tag(
            model,
            version,
            {
                ROLLOUT_TAG: "promoted",
                "rollout.promoted_at": when,
                "rollout.run": run_id,
                "rollout.canary": json.dumps(figures),
                **links,
            },
        )
        if previous and previous != version:
            registry.tag(
                model,
                previous,
                {ROLLOUT_TAG: "replaced", "rollout.replaced_by": version, "rollout.replaced_at": when},
            )
        if policy["approval"]["legacy_stage"]:
            registry.client.transition_model_version_stage(
                model, version, "Production", archive_existing_versions=True
            )
        return
    if alias:
        registry.drop_alias_if(model, alias, version)
    registry.tag(
        model,
        version,
        {
            ROLLOUT_TAG: record["outcome"],
            "rollout.reason": record["reason"][:4000],
            "rollout.rolled_back_at": when,
            "rollout.run": run_id,
            **links,
        },
    )


def _figures(analysis: dict[str, Any]) -> dict[str, Any]:
    checks = {
        c["name"]: round(c["statistic"], 4) if c["statistic"] is not None else None
        for c in analysis["checks"]
    }
    return {
        "canary_requests": analysis["canary"]["requests"],
        "stable_requests": analysis["stable"]["requests"],
        "canary_error_rate": round(_error_rate(analysis["canary"]), 4),
        **checks,
    }


def _error_rate(figures: dict[str, Any]) -> float:
    """A role's error rate from its figures as a record keeps them (``RoleFigures``, as JSON)."""
    return figures["errors"] / figures["requests"] if figures["requests"] else 0.0


def _report(settings: Settings, registry: Registry, record: dict[str, Any]) -> dict[str, Any]:
    """The canary report: written under the state dir, logged to MLflow as a run's artifact."""
    from serving.report import write_report

    name = f"{record['model']}-v{record['version']}-{_safe(record['run_id'])}"
    local = write_report(record, settings.scratch_dir("reports") / f"{name}.html")
    client = registry.client
    experiment = experiment_id(client, settings.deploy.reports_experiment)
    run = client.create_run(
        experiment,
        run_name=name,
        tags={
            "mlops.model": record["model"],
            "mlops.version": record["version"],
            "mlops.dag_run": record["run_id"],
            "mlops.outcome": record["outcome"],
        },
    )
    run_id = run.info.run_id
    for number, step in enumerate(record["steps"]):
        analysis = step.get("analysis")
        if analysis:
            for role in ("canary", "stable"):
                client.log_metric(run_id, f"{role}_error_rate", _error_rate(analysis[role]), step=number)
    # The page itself (MLflow serves it as HTML), and the run that keeps it in the MLflow UI.
    url = log_report(client, run_id, registry.url, local, "canary-report.html", record, "rollout.json")
    run_url = f"{registry.url}/#/experiments/{experiment}/runs/{run_id}"
    return {"path": str(local), "url": url, "run_id": run_id, "run_url": run_url}


def _links(
    registry: Registry, record: dict[str, Any], report: dict[str, Any] | None = None
) -> dict[str, str]:
    """What the Airflow task links to: the MLflow version page, the report, the server's metrics."""
    links = {"version": f"{registry.url}/#/models/{record['model']}/versions/{record['version']}"}
    if report:
        links["report"] = report["url"]
    if record["target"].startswith(("http://", "https://")):
        links["metrics"] = f"{record['target'].rstrip('/')}/metrics"
    return links


def _summary(record: dict[str, Any], report: dict[str, Any], registry: Registry) -> dict[str, Any]:
    return {
        "model": record["model"],
        "version": record["version"],
        "outcome": record["outcome"],
        "reason": record["reason"],
        "run_id": record["run_id"],
        "stable_version": record["stable_version"],
        "steps": [{"percent": s["percent"], "decision": s["decision"]} for s in record["steps"]],
        "started_at_ms": record["started_at_ms"],
        "finished_at_ms": record["finished_at_ms"],
        "report": report,
        "links": _links(registry, record, report),
    }


def _untouched(model: str, run_id: str, reason: str) -> dict[str, Any]:
    """What ``abort`` answers when there was nothing of the run's to undo."""
    return {"model": model, "run_id": run_id, "action": "none", "reason": reason}


def _skip(model: str, version: str, reason: str) -> dict[str, Any]:
    return {"action": "skip", "model": model, "version": version, "reason": reason, "record": None}


def _signals(approval: Approval) -> str:
    signals = [
        f"alias '{approval.alias}'" if approval.alias else "",
        f"tag {approval.tag}" if approval.tag else "",
    ]
    signals.append("stage Staging" if approval.legacy_stage else "")
    return "approval is " + " or ".join(s for s in signals if s)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
