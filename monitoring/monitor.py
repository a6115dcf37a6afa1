"""`mlops monitor run`: one window of one model, checked, decided, reported and summarised.

The window is ``[end - window, end)``, ``end`` being the DAG run's data interval end: a re-run of
the same interval reads the same events and the same earlier summaries (those ending at or before
its start), so it gives the same answer (labels that came back meanwhile aside) and replaces its
own summary and report. Steps, each a progress line:

1. the window's events, streamed from the log store into columns, by version;
2. per version, against its reference profile (from MLflow): quality, skew, multivariate drift,
   drift against the previous windows, outliers, performance (monitoring/checks.py);
3. the decision, and the cooldown: a trip within ``cooldown`` of a window whose trigger was
   raised raises none;
4. the report (HTML with plots) logged to MLflow, one run per window in the experiment
   ``MLOPS_MONITOR__EXPERIMENT``, and linked from the version (tag ``monitoring.report``);
5. the window's summary written to the log store, where dashboards and the next windows read it.

The result says whether to raise the trigger (``emit``) and with what (``event``); the DAG posts
it as an asset event on ``mlops://models/<model>/drift``.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import BackendUnavailable, ConfigError, ModelNotFound
from common.settings import Settings
from monitoring.checks import (
    MonitorConfig,
    VersionResult,
    check_version,
    effect_of,
    load_monitor_config,
)
from monitoring.detectors import get_detectors
from monitoring.logstore import get_log_store
from monitoring.profile import Profile, load_stored_profile
from monitoring.report import experiment_id, iso, log_report, write_monitor_report
from monitoring.window import read_window

REPORT_TAG = "monitoring.report"
STATUS_TAG = "monitoring.status"


def drift_asset(model: str) -> str:
    return f"mlops://models/{model}/drift"


def monitor_window(
    settings: Settings,
    model: str,
    end_ms: int,
    overrides: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    config = load_monitor_config(settings.deploy.models_file, model, overrides)
    start_ms = end_ms - config.window_ms
    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    try:
        store.ping()
    except BackendUnavailable as exc:
        raise BackendUnavailable(
            f"log store {settings.log_store_url} does not answer ({exc}); the window ending {iso(end_ms)}"
            " is not checked: run it again once the store answers"
        ) from exc
    detectors = get_detectors(settings.monitor.backend)
    profiles: dict[str, Profile | None] = {}
    missing: dict[str, str] = {}

    def kinds(version: str) -> dict[str, Any] | None:
        try:
            profile = load_stored_profile(
                settings.mlflow_url, model, version, settings.scratch_dir("profiles")
            )
        except (ConfigError, ModelNotFound) as exc:
            profiles[version], missing[version] = None, str(exc)
            return None
        profiles[version] = profile
        return {feature.name: feature.kind for feature in profile.features}

    progress(f"[1/5] reading {model}'s events from {iso(start_ms)} to {iso(end_ms)} ({config.window})")
    window = read_window(
        store, model, start_ms, end_ms, kinds, output=config.output,
        progress=lambda n: progress(f"    {n} events read"),
    )  # fmt: skip
    progress(
        f"    {window.events} events of version(s) {sorted(window.versions) or 'none'} in {window.read_s} s;"
        f" {window.malformed} malformed skipped, {window.failed} failed requests left out"
    )
    # Every version's summaries are in one list: enough for the last `history` of a few versions
    # each (the checks keep their own version's), and for the cooldown, which looks at them all.
    previous = store.windows(model, start_ms, config.history * 4)
    outcomes: dict[str, VersionResult] = {}
    delay_s = max(0.0, (time.time_ns() // 1_000_000 - end_ms) / 1000)  # how late the labels are read
    for version, rows in sorted(window.versions.items()):
        progress(f"[2/5] version {version}: {rows.count} events: quality, skew, drift, outliers, performance")
        seed = zlib.crc32(f"{model}:{version}:{start_ms}:{end_ms}".encode())
        outcome = check_version(rows, profiles.get(version), previous, config, detectors, seed, delay_s)
        if outcome.status == "no_profile":
            outcome.reason = missing.get(version, outcome.reason)
        outcomes[version] = outcome
        progress(f"    {outcome.status}: {outcome.reason}")

    decision, reason = _decide(outcomes, config)
    tripped = sorted({key for o in outcomes.values() for key in o.tripped})
    emitted_before = [p for p in previous if p.get("emitted") and p["end_ms"] > start_ms - config.cooldown_ms]
    cooldown = None
    if decision == "tripped" and emitted_before:
        last = emitted_before[-1]
        cooldown = {
            "since": iso(last["end_ms"]),
            "until": iso(last["end_ms"] + config.cooldown_ms),
            "window": last["id"],
        }
    emit = decision == "tripped" and cooldown is None
    progress(
        f"[3/5] decision: {decision}: {reason}" + ("; in the cooldown: no second trigger" if cooldown else "")
    )

    result: dict[str, Any] = {
        "model": model,
        "window": {"start": iso(start_ms), "end": iso(end_ms), "start_ms": start_ms, "end_ms": end_ms},
        "events": window.events,
        "malformed": window.malformed,
        "failed": window.failed,
        "read_s": window.read_s,
        "decision": decision,
        "reason": reason,
        "tripped": tripped,
        "emit": emit,
        "cooldown": cooldown,
        "asset": drift_asset(model),
        "backend": detectors.name,
        "config": config.to_dict(),
        "versions": {version: _outcome(o) for version, o in outcomes.items()},
    }
    progress("[4/5] the report, to MLflow")
    report = _report(settings, result, profiles, previous)
    result["report"] = report
    result["links"] = {
        "report": report["url"],
        **({"version": report["version_url"]} if report.get("version_url") else {}),
    }
    if emit:
        result["event"] = {
            "asset": drift_asset(model),
            "extra": {
                "model": model,
                "versions": sorted(v for v, o in outcomes.items() if o.status == "tripped"),
                "window": result["window"],
                "tripped": tripped,
                "reason": reason,
                "report": report["url"],
            },
        }
    progress(f"[5/5] the window's summary, to the log store at {store.url}")
    for version, outcome in outcomes.items():
        store.write_window(_summary(result, version, outcome, report["url"]))
    return result


def _decide(outcomes: Mapping[str, VersionResult], config: MonitorConfig) -> tuple[str, str]:
    tripped = [o for o in outcomes.values() if o.status == "tripped"]
    if tripped:
        return "tripped", "; ".join(f"version {o.version}: {o.reason}" for o in tripped)
    if any(o.status == "ok" for o in outcomes.values()):
        return "ok", "every check passed"
    if not outcomes:
        return "insufficient", f"no events in the window: fewer than the {config.min_events} a decision needs"
    return "insufficient", "; ".join(f"version {o.version}: {o.reason}" for o in outcomes.values())


def _outcome(outcome: VersionResult) -> dict[str, Any]:
    return {
        "events": outcome.events,
        "status": outcome.status,
        "reason": outcome.reason,
        "tripped": outcome.tripped,
        "roles": outcome.roles,
        "checks": [dataclasses.asdict(c) for c in outcome.checks],
        "histograms": outcome.histograms,
        "predictions": outcome.predictions,
        "labelled": outcome.labelled,
        "correct": outcome.correct,
        "outlier_rate": outcome.outlier_rate,
        "outlier_scores": outcome.outlier_scores,
    }


def _summary(
    result: Mapping[str, Any], version: str, outcome: VersionResult, report_url: str
) -> dict[str, Any]:
    """The document dashboards read and the next windows compare with (one per version)."""
    window = result["window"]
    accuracy = outcome.correct / outcome.labelled if outcome.labelled else None
    return {
        "id": f"{result['model']}:{version}:{window['start_ms']}:{window['end_ms']}",
        "model": result["model"],
        "version": version,
        "start_ms": window["start_ms"],
        "end_ms": window["end_ms"],
        "events": outcome.events,
        "decision": outcome.status,
        "reason": outcome.reason,
        "tripped": outcome.tripped,
        "emitted": bool(result["emit"]) and outcome.status == "tripped",
        "outlier_rate": outcome.outlier_rate,
        "accuracy": accuracy,
        "labelled": outcome.labelled,
        "correct": outcome.correct,
        "max_effect": max((effect_of(c) for c in outcome.checks), default=0.0),
        "effects": {c.name: c.effect for c in outcome.checks if c.kind == "skew" and c.effect is not None},
        "histograms": outcome.histograms,
        "predictions": outcome.predictions,
        "report": report_url,
        "written_ms": time.time_ns() // 1_000_000,
    }


def _report(
    settings: Settings,
    result: dict[str, Any],
    profiles: Mapping[str, Profile | None],
    previous: list[dict[str, Any]],
) -> dict[str, Any]:
    """The page, written under the state dir and logged to MLflow (one run per window: a re-run
    logs into the same run); the versions' ``monitoring.report`` tag links it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    window = result["window"]
    name = f"{result['model']}-{window['start_ms']}-{window['end_ms']}"
    features = {v: list(p.features) for v, p in profiles.items() if p is not None}
    local = write_monitor_report(
        result, features, previous, settings.scratch_dir("monitoring") / f"{name}.html"
    )
    client = MlflowClient(settings.mlflow_url)
    try:
        experiment = experiment_id(client, settings.monitor.experiment)
        found = client.search_runs([experiment], f"tags.`mlops.window` = '{name}'", max_results=1)
        run_id = found[0].info.run_id if found else client.create_run(
            experiment, run_name=name,
            tags={"mlops.model": result["model"], "mlops.window": name, "mlops.window_end": window["end"]},
        ).info.run_id  # fmt: skip
        client.set_tag(run_id, "mlops.decision", result["decision"])
        client.set_tag(run_id, "mlops.versions", ",".join(sorted(result["versions"])))
        for version, outcome in result["versions"].items():
            for check in outcome["checks"]:
                if check["kind"] == "skew" and check["effect"] is not None:
                    client.log_metric(run_id, f"v{version}.skew.{_metric(check['name'])}", check["effect"])
            if outcome["outlier_rate"] is not None:
                client.log_metric(run_id, f"v{version}.outlier_rate", outcome["outlier_rate"])
            client.log_metric(run_id, f"v{version}.events", outcome["events"])
        url = log_report(
            client, run_id, settings.mlflow_url, local, "monitor-report.html", result, "window.json"
        )
        version_url = None
        for version, outcome in result["versions"].items():
            if outcome["status"] == "no_profile":
                continue
            client.set_model_version_tag(result["model"], version, REPORT_TAG, url)
            client.set_model_version_tag(
                result["model"], version, STATUS_TAG, f"{outcome['status']} at {window['end']}"
            )
            version_url = f"{settings.mlflow_url}/#/models/{result['model']}/versions/{version}"
    except MlflowException as exc:
        raise BackendUnavailable(
            f"MLflow: the monitoring report could not be logged: {str(exc)[:300]}"
        ) from exc
    return {
        "path": str(local),
        "url": url,
        "run_id": run_id,
        "run_url": f"{settings.mlflow_url}/#/experiments/{experiment}/runs/{run_id}",
        "version_url": version_url,
    }


def _metric(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
