"""The canary report of one rollout: a single self-contained HTML page, plots included.

Two readers open it: a data scientist from the MLflow model version page (the ``rollout.report``
tag links the run's artifact), an operator from the Airflow task's link. Both want to know what was
rolled out against what, how it ended and why, and what each step of the ramp measured: error
rates and p95 latency per role across the steps, the two prediction distributions of the last
analysed step, and every check ``serving.canary`` made, with its statistic and threshold.

The page is made from the rollout record alone (``serving.rollout`` keeps it; each step's
``analysis`` is ``dataclasses.asdict`` of a ``CanaryAnalysis``) and needs nothing else to show:
CSS inline, plots as base64 PNG drawn on matplotlib's Agg canvas (no display, no pyplot, no global
state changed), every string from the record escaped. It renders at any point of a rollout: no step
yet, a step still waiting for its analysis, a role with no latency or no predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from monitoring.report import CSS, iso, png

ROLES = ("stable", "canary")
COLOURS = {"stable": "#4c72b0", "canary": "#dd8452"}
BADGES = {
    "promoted": "#2e7d32",
    "rolled_back": "#c62828",
    "insufficient": "#ef6c00",
    "in_progress": "#1565c0",
}


def render_report(rollout: dict[str, Any]) -> str:
    """The whole page, as one HTML document (see the module docstring for what it shows)."""
    steps: list[dict[str, Any]] = rollout.get("steps") or []
    analysed = [step for step in steps if step.get("analysis")]
    body = [_header(rollout)]
    if not steps:
        body.append("<p>No ramp step was reached: the canary never took traffic.</p>")
    elif not analysed:
        body.append("<p>No step has been analysed yet: the first step is still waiting for its window.</p>")
    else:
        plots = [_error_rates(analysed), _latencies(analysed), _distribution(analysed[-1])]
        body += ["<h2>Across the ramp</h2>", '<div class="plots">', *plots, "</div>"]
    if steps:
        body += ["<h2>Steps</h2>", _table(steps)]
    title = escape(f"Canary report: {rollout.get('model')} version {rollout.get('version')}")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_report(rollout: dict[str, Any], path: Path) -> Path:
    """Write the page to ``path`` (utf-8, its folder made if missing) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(rollout), encoding="utf-8")
    return path


# --- the header -------------------------------------------------------------------------------


def _header(rollout: dict[str, Any]) -> str:
    outcome = str(rollout.get("outcome") or "unknown")
    stable = rollout.get("stable_version")
    started, finished = rollout.get("started_at_ms"), rollout.get("finished_at_ms")
    approval = rollout.get("approval") or {}
    approved = approval.get("approved_at_ms")
    thresholds = rollout.get("thresholds") or {}
    rows = {
        "reason": rollout.get("reason") or ("none: every step passed" if outcome == "promoted" else "none"),
        "run": rollout.get("run_id"),
        "target": rollout.get("target"),
        "approval": f"{approval.get('signal') or 'unknown signal'}, at {iso(approved)}",
        "started": iso(started),
        "finished": iso(finished) if finished is not None else "not yet",
        "approval to start": _duration(approved, started),
        "approval to end": _duration(approved, finished),
        "thresholds": ", ".join(f"{name} {value}" for name, value in thresholds.items()) or "not recorded",
    }
    against = f"against stable version {stable}" if stable is not None else "(first version: no stable)"
    return (
        f"<h1>{escape(str(rollout.get('model')))} version {escape(str(rollout.get('version')))}"
        f" <small>{escape(against)}</small>"
        f' <span class="badge" style="background:{BADGES.get(outcome, "#616161")}">{escape(outcome)}</span></h1>\n'
        "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows.items()) + "</dl>"
    )


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if start_ms is None or end_ms is None:
        return "unknown"
    seconds = round((end_ms - start_ms) / 1000)
    hours, rest = divmod(abs(seconds), 3600)
    text = f"{hours} h {rest // 60} min {rest % 60} s" if hours else f"{rest // 60} min {rest % 60} s"
    return f"-{text}" if seconds < 0 else text


# --- the plots --------------------------------------------------------------------------------


def _error_rates(analysed: list[dict[str, Any]]) -> str:
    def rate(role: dict[str, Any]) -> float:
        return role["errors"] / role["requests"] if role["requests"] else math.nan

    return _by_step(analysed, "error rate per role", "error rate", rate, percent=True)


def _latencies(analysed: list[dict[str, Any]]) -> str:
    if all(step["analysis"][role]["p95_latency_ms"] is None for step in analysed for role in ROLES):
        return "<p>No latency was recorded in any analysed step.</p>"

    def p95(role: dict[str, Any]) -> float:
        return math.nan if role["p95_latency_ms"] is None else float(role["p95_latency_ms"])

    return _by_step(analysed, "p95 latency per role", "p95 latency (ms)", p95)


def _by_step(
    analysed: list[dict[str, Any]],
    title: str,
    ylabel: str,
    value: Callable[[dict[str, Any]], float],
    percent: bool = False,
) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    figure = Figure(figsize=(4.6, 3.0), dpi=90, layout="constrained")
    axes = figure.add_subplot()
    shares = [float(step["percent"]) for step in analysed]
    for role in ROLES:
        values = [value(step["analysis"][role]) for step in analysed]
        axes.plot(shares, values, marker="o", color=COLOURS[role], label=role)
    axes.set(title=title, xlabel="canary share of traffic (%)", ylabel=ylabel)
    axes.set_xticks(shares, labels=[f"{share:g}" for share in shares])
    if percent:
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    return png(figure, title)


def _distribution(step: dict[str, Any]) -> str:
    analysis = step["analysis"]
    counts = {role: analysis[role]["predictions"] or {} for role in ROLES}
    keys = sorted(set(counts["stable"]) | set(counts["canary"]))
    if not keys:
        return f"<p>No predictions were recorded at {step['percent']:g} %: no distribution to compare.</p>"
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.6, 0.45 * len(keys) + 1.5), 3.0), dpi=90, layout="constrained")
    axes = figure.add_subplot()
    for offset, role in zip((-0.2, 0.2), ROLES, strict=True):
        total = sum(counts[role].values()) or 1
        shares = [counts[role].get(key, 0) / total for key in keys]
        label = f"{role} (v{analysis[role]['version']})".replace("$", r"\$")
        axes.bar([i + offset for i in range(len(keys))], shares, 0.4, color=COLOURS[role], label=label)
    # "$" would start mathtext in a tick label; a category is plain text.
    axes.set_xticks(range(len(keys)), labels=[key.replace("$", r"\$") for key in keys])
    title = f"predictions at {step['percent']:g} % (shares per role)"
    axes.set(title=title, ylabel="share of predictions")
    axes.grid(alpha=0.3, axis="y")
    axes.legend()
    return png(figure, title)


# --- the table of steps -----------------------------------------------------------------------


def _table(steps: list[dict[str, Any]]) -> str:
    names: list[str] = []  # every check any step made, in the order the analysis makes them
    for step in steps:
        for check in (step.get("analysis") or {}).get("checks") or []:
            if check["name"] not in names:
                names.append(check["name"])
    head = ["step", "window", "decision", "requests (errors)", *names, "reason"]
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for step in steps:
        analysis = step.get("analysis") or {}
        checks = {check["name"]: check for check in analysis.get("checks") or []}
        cells = [
            escape(f"{step['percent']:g} %"),
            escape(f"{iso(step.get('started_at_ms'))} to {iso(step.get('ended_at_ms'))}")
            + f"<br><small>{escape(_duration(step.get('started_at_ms'), step.get('ended_at_ms')))}</small>",
            escape(str(step.get("decision") or "waiting")),
            "<br>".join(
                escape(f"{role}: {analysis[role]['requests']} ({analysis[role]['errors']})")
                for role in ROLES
                if role in analysis
            )
            or "not analysed yet",
            *(_check(checks[name]) if name in checks else "" for name in names),
            escape(str(analysis.get("reason") or "")),
        ]
        rows.append('<tr class="step">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _check(check: dict[str, Any]) -> str:
    verdict = "pass" if check["passed"] else "fail"
    statistic = "n/a" if check["statistic"] is None else f"{check['statistic']:.3g}"
    threshold = f"{check['threshold']:g}"
    return (
        f'<span class="{verdict}">{verdict}</span> {escape(statistic)} (threshold {escape(threshold)})'
        f"<br><small>{escape(str(check['detail']))}</small>"
    )
