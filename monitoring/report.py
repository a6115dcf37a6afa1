"""The monitoring report of one window: a self-contained HTML page, plots included.

Read from the MLflow model version (its ``monitoring.report`` tag links it) and from the Airflow
task's link. It says what was decided and why, then shows the evidence: per feature the
reference's and the window's distributions on the profile's bins with the statistic and its
threshold; the outlier scores of the reference and of the window with the threshold; and a time
series of the past windows (each feature's effect against its threshold, the outlier rate). Made
from the window's result and the past windows' summaries alone; plots are base64 PNG drawn on
matplotlib's Agg canvas (no display, no global state); every string from the data is escaped.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

BADGES = {"ok": "#2e7d32", "tripped": "#c62828", "insufficient": "#ef6c00", "no_profile": "#616161"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.badge { color: #fff; padding: .15em .6em; border-radius: .8em; font-size: .8em; vertical-align: middle; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1.2em; } dt { color: #666; }
dd { margin: 0; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
table { border-collapse: collapse; width: 100%; } th, td { border: 1px solid #ddd; padding: .35em .5em;
  vertical-align: top; text-align: left; } th { background: #f4f4f4; }
.pass { color: #2e7d32; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
small { color: #555; }
"""
REF, WIN = "#4c72b0", "#dd8452"


def iso(ms: int | None) -> str:
    if ms is None:
        return "unknown"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def png(figure: Any, alt: str) -> str:
    """A matplotlib Figure as an inline image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # a bare Figure saves through the Agg canvas
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def experiment_id(client: Any, name: str) -> str:
    """The id of the MLflow experiment ``name`` (made when missing), where reports' runs go."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def log_report(
    client: Any, run_id: str, mlflow_url: str, page: Path, page_name: str, record: Any, record_name: str
) -> str:
    """Log a report page and the record it was made from (JSON) as the run's artifacts, and
    finish the run; returns the page's URL (MLflow serves it as HTML)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        artifact, data = Path(folder) / page_name, Path(folder) / record_name
        artifact.write_bytes(page.read_bytes())
        data.write_text(json.dumps(record, indent=2, default=str))
        client.log_artifact(run_id, str(artifact))
        client.log_artifact(run_id, str(data))
    client.set_terminated(run_id, "FINISHED")
    return f"{mlflow_url}/get-artifact?path={page_name}&run_uuid={run_id}"


def badge(status: str) -> str:
    return f'<span class="badge" style="background:{BADGES.get(status, "#616161")}">{escape(status)}</span>'


def render_monitor_report(
    result: Mapping[str, Any], profiles: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> str:
    """The page of a window's ``result`` (monitoring.monitor's), the versions' ``profiles``
    (FeatureProfile lists by version) and the past windows' summaries, oldest first."""
    window = result["window"]
    rows = {
        "window": f"{window['start']} to {window['end']}",
        "decision": result["decision"],
        "reason": result["reason"],
        "trigger": _trigger_words(result),
        "events": f"{result['events']} read in {result.get('read_s', 0)} s; {result['malformed']} malformed skipped,"
        f" {result['failed']} failed requests left out",
        "detectors": result.get("backend", ""),
        "thresholds": ", ".join(f"{k} {v}" for k, v in (result.get("config") or {}).items()
                                if k not in ("schedule", "enabled", "output")),
    }  # fmt: skip
    body = [
        f"<h1>{escape(str(result['model']))} <small>monitoring window</small> {badge(result['decision'])}</h1>",
        "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows.items()) + "</dl>",
    ]
    for version, outcome in result["versions"].items():
        body.append(f"<h2>Version {escape(version)} {badge(outcome['status'])}</h2>")
        body.append(
            f"<p>{escape(str(outcome['events']))} events ({escape(_roles(outcome))}). {escape(outcome['reason'])}</p>"
        )
        features = profiles.get(version)
        if features and outcome.get("histograms"):
            plots = [_feature_plot(f, outcome) for f in features]
            if outcome.get("outlier_scores"):
                plots.append(_outlier_plot(outcome))
            past = [h for h in history if h.get("version") == version]
            if past:
                plots.append(_history_plot([*past, _as_summary(outcome, result)], features))
            body += ['<div class="plots">', *plots, "</div>"]
        if outcome.get("checks"):
            body.append(_table(outcome["checks"]))
    title = escape(f"Monitoring: {result['model']} {window['start']} to {window['end']}")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_monitor_report(
    result: Mapping[str, Any], profiles: Mapping[str, Any], history: Sequence[Mapping[str, Any]], path: Path
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_monitor_report(result, profiles, history), encoding="utf-8")
    return path


def _trigger_words(result: Mapping[str, Any]) -> str:
    if result["decision"] != "tripped":
        return "none"
    if result.get("emit"):
        return f"raised: an event on {result.get('asset')}"
    cooldown = result.get("cooldown") or {}
    return f"not raised: inside the cooldown of the incident raised for the window ending {cooldown.get('since', '?')}"


def _roles(outcome: Mapping[str, Any]) -> str:
    roles = outcome.get("roles") or {}
    return ", ".join(f"{role} {count}" for role, count in roles.items()) or "no roles"


def _as_summary(outcome: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "end_ms": result["window"]["end_ms"],
        "effects": {c["name"]: c["effect"] for c in outcome.get("checks", []) if c["kind"] == "skew" and c.get("effect") is not None},
        "outlier_rate": outcome.get("outlier_rate"),
    }  # fmt: skip


def _figure(width: float = 5.2, height: float = 3.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=96, layout="constrained")
    return figure, figure.add_subplot()


def _feature_plot(feature: Any, outcome: Mapping[str, Any]) -> str:
    import numpy as np

    now = np.asarray(outcome["histograms"].get(feature.name, []), dtype=float)
    reference = np.asarray(feature.counts, dtype=float)
    figure, axes = _figure()
    if now.sum() and reference.sum() and len(now) == len(reference):
        positions = np.arange(len(reference))
        axes.bar(positions - 0.2, reference / reference.sum(), 0.4, label="training", color=REF)
        axes.bar(positions + 0.2, now / now.sum(), 0.4, label="window", color=WIN)
        labels = feature.bins
        axes.set_xticks(
            positions, labels, rotation=60 if len(labels) > 6 else 0, fontsize=6 if len(labels) > 6 else 8
        )
    check = next(
        (c for c in outcome.get("checks", []) if c["kind"] == "skew" and c["name"] == feature.name), None
    )
    title = feature.name
    if check and check.get("effect") is not None:
        mark = "DRIFT" if check["tripped"] else "ok"
        title += f": effect {check['effect']:.3f} (trips at {check['effect_min']}), p={check['p_value']:.2g} {mark}"
    axes.set_title(title, fontsize=9)
    axes.set_ylabel("share of rows")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    return png(figure, f"{feature.name}: training vs window")


def _outlier_plot(outcome: Mapping[str, Any]) -> str:
    import numpy as np

    scores = outcome["outlier_scores"]
    edges = np.asarray(scores["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    figure, axes = _figure()
    for key, colour, label in (("reference", REF, "training"), ("window", WIN, "window")):
        counts = np.asarray(scores[key], dtype=float)
        if counts.sum():
            axes.bar(centres, counts / counts.sum(), width, alpha=0.55, color=colour, label=label)
    axes.axvline(scores["threshold"], color="#c62828", linestyle="--", label="threshold")
    rate = outcome.get("outlier_rate")
    axes.set_title(
        f"outlier scores (Mahalanobis²): {rate:.2%} past the threshold"
        if rate is not None
        else "outlier scores",
        fontsize=9,
    )
    axes.set_ylabel("share of rows")
    axes.legend(fontsize=8)
    return png(figure, "outlier scores")


def _history_plot(history: Sequence[Mapping[str, Any]], features: Sequence[Any]) -> str:
    figure, axes = _figure(6.4, 3.0)
    times = [datetime.fromtimestamp(h["end_ms"] / 1000, UTC) for h in history]
    for feature in features:
        values = [(h.get("effects") or {}).get(feature.name) for h in history]
        axes.plot(times, [float("nan") if v is None else v for v in values], marker="o", label=feature.name)
    rates = [h.get("outlier_rate") for h in history]
    axes.plot(
        times,
        [float("nan") if r is None else r for r in rates],
        marker="s",
        linestyle=":",
        label="outlier rate",
    )
    axes.set_title("past windows: each feature's effect against training, and the outlier rate", fontsize=9)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.autofmt_xdate()
    return png(figure, "past windows")


def _table(checks: Sequence[Mapping[str, Any]]) -> str:
    rows = ["<table><tr><th>check</th><th>on</th><th>result</th><th>in words</th></tr>"]
    for check in checks:
        verdict = '<span class="fail">tripped</span>' if check["tripped"] else '<span class="pass">ok</span>'
        rows.append(
            f"<tr><td>{escape(check['kind'])}</td><td>{escape(str(check['name']))}</td><td>{verdict}</td>"
            f"<td>{escape(check['detail'])}</td></tr>"
        )
    return "".join(rows) + "</table>"
