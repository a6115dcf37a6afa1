"""The checks and decisions on fixed seeds, on both detector backends: each case decides the same."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError
from monitoring.checks import MonitorConfig, check_version, load_monitor_config, parse_duration
from monitoring.detectors import get_detectors
from monitoring.profile import Profile, build_profile
from monitoring.window import ArrayWindow

BACKENDS = ("scipy", "alibi")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Profile:
    rng = np.random.default_rng(0)
    n = 20_000
    train = pd.DataFrame(
        {
            "amount": rng.lognormal(3.5, 1.0, n),
            "age_days": rng.normal(400, 300, n),
            "country": rng.choice(["DE", "FR", "US"], n),
        }
    )
    folder = tmp_path_factory.mktemp("profile")
    build_profile("fraud", "1", train).save(folder)
    return Profile.load(folder)  # what a check reads: the stored profile


def window(rows: int, seed: int, shift: str | None = None):
    rng = np.random.default_rng(seed)
    amount, age = rng.lognormal(3.5, 1.0, rows), rng.normal(400, 300, rows)
    country = rng.choice(["DE", "FR", "US"], rows).astype(object)
    if shift == "mean":  # 0.5 standard deviations on one feature
        age = age + 0.5 * 300
    elif shift == "category":  # a value training never had
        country[: rows // 20] = "BR"
    elif shift == "outliers":  # 5 % of rows far out
        cut = rows // 20
        amount[:cut] += 3_000
        age[:cut] += 6 * 300
    return ArrayWindow({"amount": amount, "age_days": age, "country": country}).as_version("1")


CASES = [
    (None, []),
    ("mean", ["skew:age_days"]),
    ("category", ["quality:country:values_to_be_in_set", "skew:country"]),
    ("outliers", ["outliers:rows"]),
]


@pytest.mark.parametrize(("shift", "names"), CASES, ids=[str(c[0]) for c in CASES])
def test_each_case_decides_the_same_on_both_backends_and_names_what_moved(profile, shift, names):
    decisions = {}
    for backend in BACKENDS:
        result = check_version(
            window(1000, 5, shift), profile, [], MonitorConfig(), get_detectors(backend), seed=1
        )
        decisions[backend] = (result.status, result.tripped)
        assert result.status == ("tripped" if names else "ok"), (backend, result.reason)
        for name in names:
            assert name in result.tripped, (backend, result.tripped)
    assert decisions["scipy"] == decisions["alibi"]


def test_a_new_category_is_named_in_the_reason(profile):
    result = check_version(
        window(1000, 5, "category"), profile, [], MonitorConfig(), get_detectors("scipy"), 1
    )
    assert "unseen values ['BR']" in result.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_large_window_without_a_shift_does_not_trip(profile, backend):
    """On 100k rows the KS p-values are tiny for trivial differences: the effect size keeps them quiet."""
    result = check_version(window(100_000, 6), profile, [], MonitorConfig(), get_detectors(backend), seed=2)
    assert result.status == "ok", result.reason
    p_values = [c.p_value for c in result.checks if c.kind == "skew"]
    assert len(p_values) == 3


def test_too_few_events_decide_nothing_and_say_so(profile):
    result = check_version(window(100, 5, "mean"), profile, [], MonitorConfig(), get_detectors("scipy"), 1)
    assert result.status == "insufficient"
    assert "100 events, fewer than the 500" in result.reason
    assert result.checks == []


def _summary(result) -> dict:
    return {"version": "1", "histograms": result.histograms, "predictions": result.predictions,
            "labelled": result.labelled, "correct": result.correct}  # fmt: skip


def test_drift_against_the_previous_windows(profile):
    detectors, config = get_detectors("scipy"), MonitorConfig()
    earlier = [_summary(check_version(window(1000, s), profile, [], config, detectors, s)) for s in (10, 11)]
    same = check_version(window(1000, 12), profile, earlier, config, detectors, 3)
    assert not [c for c in same.checks if c.kind == "drift" and c.tripped]
    moved = check_version(window(1000, 13, "mean"), profile, earlier, config, detectors, 3)
    assert "drift:age_days" in moved.tripped
    assert "drift:amount" not in moved.tripped


def test_accuracy_compared_only_with_enough_labels_each_side(profile):
    detectors, config = get_detectors("scipy"), MonitorConfig(min_labels=200)

    def labelled(seed: int, right: float):
        rows = window(1000, seed)
        rng = np.random.default_rng(seed)
        rows.predictions = np.asarray(["legit"] * 1000, dtype=object)
        rows.labels = np.asarray(
            ["legit" if rng.random() < right else "fraud" for _ in range(1000)], dtype=object
        )
        return rows

    before = [_summary(check_version(labelled(20, 0.95), profile, [], config, detectors, 1))]
    worse = check_version(labelled(21, 0.80), profile, before, config, detectors, 1)
    assert "performance:accuracy" in worse.tripped
    held = check_version(labelled(22, 0.95), profile, before, config, detectors, 1)
    assert "performance:accuracy" not in held.tripped
    alone = check_version(labelled(23, 0.5), profile, [], config, detectors, 1, label_delay_s=7200)
    check = next(c for c in alone.checks if c.kind == "performance")
    assert not check.tripped and "accuracy not compared" in check.detail
    assert "(100% of the window, labels read 2.0 h after the window's end)" in check.detail


def test_quality_off_reports_but_does_not_trip(profile):
    result = check_version(
        window(1000, 5, "category"), profile, [], MonitorConfig(quality=False), get_detectors("scipy"), 1
    )
    assert "quality:country:values_to_be_in_set" not in result.tripped
    assert any(c.kind == "quality" and "failed" in c.detail for c in result.checks)
    assert "skew:country" in result.tripped


def test_the_models_file_monitor_section(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "defaults:\n  monitor:\n    window: 2h\n    min_events: 50\nmodels:\n  a:\n    monitor:\n      window: 10m\n"
        "  b:\n    monitor:\n      enabled: false\n"
    )
    assert load_monitor_config(path, "a").window_ms == 600_000
    assert load_monitor_config(path, "b").min_events == 50
    assert load_monitor_config(path, "a", {"window": "30m", "alpha": None}).window == "30m"
    from monitoring.checks import monitored_models

    assert monitored_models(path) == ["a"]
    path.write_text("defaults:\n  monitor:\n    windw: 2h\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['windw'\]"):
        load_monitor_config(path, None)
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("an hour", "window")


def test_the_shipped_models_file_reads_for_both_domains():
    from common.settings import PROJECT_ROOT
    from serving.policy import load_policy

    path = PROJECT_ROOT / "config" / "models.yaml"
    assert load_monitor_config(path, "demo-fraud").window == "10m"
    assert load_policy(path, "demo-fraud").ramp.min_requests == 40


def test_drift_pools_only_the_last_history_windows(profile):
    detectors = get_detectors("scipy")
    shifted = [
        _summary(check_version(window(1000, s, "mean"), profile, [], MonitorConfig(), detectors, s))
        for s in (30, 31)
    ]
    clean = _summary(check_version(window(1000, 32), profile, [], MonitorConfig(), detectors, 32))
    earlier = [*shifted, clean]  # oldest first, as the store gives them
    now = window(1000, 33)
    assert (
        "drift:age_days"
        in check_version(now, profile, earlier, MonitorConfig(history=3), detectors, 3).tripped
    )
    assert (
        "drift:age_days"
        not in check_version(now, profile, earlier, MonitorConfig(history=1), detectors, 3).tripped
    )


def test_drift_leaves_out_the_windows_that_tripped(profile):
    """After an incident (a shift, then a fix), normal traffic is compared with the windows that
    passed, not with the incident's."""
    detectors = get_detectors("scipy")
    incident = [
        {**_summary(check_version(window(1000, s, "mean"), profile, [], MonitorConfig(), detectors, s)),
         "decision": "tripped"}
        for s in (40, 41)
    ]  # fmt: skip
    normal = {
        **_summary(check_version(window(1000, 42), profile, [], MonitorConfig(), detectors, 42)),
        "decision": "ok",
    }
    now = window(1000, 43)
    assert (
        "drift:age_days"
        not in check_version(now, profile, [normal, *incident], MonitorConfig(), detectors, 3).tripped
    )
    alone = check_version(now, profile, incident, MonitorConfig(), detectors, 3)
    assert "drift:age_days" not in alone.tripped
    assert any(c.kind == "drift" and "no previous window" in c.detail for c in alone.checks)
