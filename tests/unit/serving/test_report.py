"""The canary report: one self-contained page, built from records whose analyses are real ones."""

from __future__ import annotations

import base64
import dataclasses
import re
from html import escape

from serving.canary import analyze
from serving.report import render_report, write_report
from tests.unit.serving.test_canary import T0
from tests.unit.serving.test_canary import events as canary_events

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def events(role: str, count: int, error_rate: float = 0.0, seed: int = 0, labelled: bool = True):
    """The canary tests' events, as versions 2 (stable) and 3 (canary)."""
    version = "2" if role == "stable" else "3"
    return canary_events(role, count, error_rate, seed=seed, version=version, labelled=labelled)


def step(percent: float, number: int, canary_error_rate: float = 0.0, labelled: bool = True) -> dict:
    analysis = analyze(
        events("stable", 300, 0.01, seed=2 * number, labelled=labelled),
        events("canary", 150, canary_error_rate, seed=2 * number + 1, labelled=labelled),
    )
    started = T0 + number * 60_000
    return {
        "percent": percent,
        "started_at_ms": started,
        "ended_at_ms": started + 60_000,
        "decision": analysis.outcome,
        "analysis": dataclasses.asdict(analysis),
    }


def rollout(steps: list[dict], outcome: str = "promoted", reason: str = "", **fields: object) -> dict:
    return {
        "model": "demo-fraud",
        "version": "3",
        "stable_version": "2",
        "run_id": "manual__2026-12-02T10:00:00+00:00",
        "target": "http://127.0.0.1:8081",
        "outcome": outcome,
        "reason": reason,
        "started_at_ms": T0,
        "finished_at_ms": T0 + 300_000,
        "approval": {"signal": "alias", "approved_at_ms": T0 - 10_000},
        "thresholds": {
            "min_requests": 100,
            "alpha": 0.01,
            "error_margin": 0.01,
            "p95_ratio_max": 1.5,
            "js_max": 0.2,
        },
        "steps": steps,
        **fields,
    }


def rows(page: str) -> list[str]:
    return re.findall(r'<tr class="step">.*?</tr>', page, flags=re.S)


def test_a_ramp_of_analysed_steps_renders_one_page_with_three_png_plots():
    page = render_report(rollout([step(5, 0), step(25, 1), step(100, 2)]))
    assert (
        page.startswith("<!DOCTYPE html>") and page.count("<html") == 1 and page.rstrip().endswith("</html>")
    )
    images = IMAGE.findall(page)
    assert len(images) == 3  # error rates, p95 latency, the last step's prediction distributions
    assert base64.b64decode(images[0]).startswith(PNG_SIGNATURE)
    assert "http://" not in page.replace("http://127.0.0.1:8081", "")  # nothing fetched from elsewhere


def test_the_table_has_a_row_per_step_with_every_checks_statistic_and_threshold():
    steps = [step(5, 0), step(25, 1), step(100, 2)]
    found = rows(render_report(rollout(steps)))
    assert len(found) == 3
    for row, made in zip(found, steps, strict=True):
        assert f"{made['percent']:g} %" in row
        checks = made["analysis"]["checks"]
        assert [c["name"] for c in checks] == ["errors", "latency", "predictions"]
        for check in checks:
            assert f"{check['statistic']:.3g} (threshold {check['threshold']:g})" in row
            assert escape(check["detail"]) in row
        assert f"stable: {made['analysis']['stable']['requests']}" in row


def test_a_rollback_shows_its_outcome_its_reason_and_the_failed_check():
    failed = step(25, 1, canary_error_rate=0.3)
    assert failed["decision"] == "fail"
    reason = "step 25 % failed: " + failed["analysis"]["reason"]
    page = render_report(rollout([step(5, 0), failed], outcome="rolled_back", reason=reason))
    assert ">rolled_back</span>" in page
    assert escape(reason) in page
    first, second = rows(page)
    assert '<span class="fail">fail</span>' in second and "<td>fail</td>" in second
    assert 'class="fail"' not in first and "<td>pass</td>" in first


def test_strings_from_the_record_are_escaped():
    hostile = "<script>alert(1)</script>"
    made = step(5, 0)
    made["analysis"]["checks"][0]["detail"] = hostile
    page = render_report(rollout([made], outcome=hostile, reason=hostile, model=hostile, run_id=hostile))
    assert "<script>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # title, name, badge, reason, run, detail


def test_a_rollout_that_reached_no_step_renders_without_plots_and_says_so():
    page = render_report(rollout([], outcome="in_progress", finished_at_ms=None))
    assert "<img" not in page and "<table" not in page
    assert "No ramp step was reached" in page
    assert "not yet" in page  # the end, and the approval-to-end duration, unknown


def test_without_predictions_the_distribution_plot_is_replaced_by_a_sentence():
    made = step(5, 0, labelled=False)
    assert made["analysis"]["stable"]["predictions"] == {} == made["analysis"]["canary"]["predictions"]
    page = render_report(rollout([made]))
    assert len(IMAGE.findall(page)) == 2
    assert "No predictions were recorded at 5 %" in page


def test_a_step_still_waiting_and_a_step_without_latency_still_render():
    waiting = {
        "percent": 25,
        "started_at_ms": T0 + 60_000,
        "ended_at_ms": None,
        "decision": None,
        "analysis": None,
    }
    page = render_report(rollout([step(5, 0), waiting], outcome="in_progress", finished_at_ms=None))
    assert len(IMAGE.findall(page)) == 3  # drawn from the one analysed step
    assert len(rows(page)) == 2 and "waiting" in rows(page)[1] and "not analysed yet" in rows(page)[1]

    empty = dataclasses.asdict(analyze([], []))  # no request at all: insufficient, p95 None
    assert empty["stable"]["p95_latency_ms"] is None and empty["outcome"] == "insufficient"
    first = {**waiting, "percent": 5, "analysis": empty}
    page = render_report(rollout([first], outcome="in_progress", finished_at_ms=None))
    assert "No latency was recorded" in page and "No predictions were recorded" in page
    assert len(IMAGE.findall(page)) == 1  # the error rates alone
    assert "too few requests to decide" in rows(page)[0]


def test_write_report_writes_the_page_as_utf8_and_returns_its_path(tmp_path):
    record = rollout([step(5, 0)], reason="größer als erlaubt")
    path = write_report(record, tmp_path / "reports" / "demo.html")
    assert path == tmp_path / "reports" / "demo.html"
    assert path.read_text(encoding="utf-8") == render_report(record)
    assert "größer als erlaubt" in path.read_text(encoding="utf-8")
