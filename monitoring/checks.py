"""A window's checks against its version's profile and the windows before it, and the decision.

For each version that answered in the window (``check_version``):

- **quality**: the version's great-expectations suite on the window's rows (columns, null rates,
  ranges, categorical domains; an unseen category is named);
- **skew** (window vs training): per feature, KS (numeric) or chi-square (categorical) against
  the profile's reference sample, Bonferroni-corrected across the features; a feature drifts only
  when it is significant *and* large: Wasserstein distance in reference standard deviations
  (numeric) or Jensen-Shannon distance (categorical) at least the threshold. On big windows every
  test flags trivial shifts (evidently#50): the effect size is what keeps them quiet;
- **multivariate**: an MMD test on a seeded sample of the window's numeric features (the same
  two-sided rule: p-value and MMD² both past their thresholds);
- **drift** (window vs the previous windows that did not trip): each feature's histogram, and the
  predictions', against the previous windows' pooled, by chi-square and Jensen-Shannon distance
  (the previous windows keep histograms, not rows);
- **outliers**: the share of rows whose Mahalanobis score is past the reference's 99th
  percentile, against the 1 % expected (one-sided binomial test, and at least the threshold);
- **performance**: where labels came back, accuracy against the previous windows' (one-sided
  Fisher test, and a drop of at least the threshold); the share labelled and the label delay said.

Too few events for a version decide nothing for it, and say so. The window trips when a version
does; a cooldown (from the previous windows' summaries) makes one incident one trigger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError
from common.settings import models_file_section, read_models_file
from monitoring.detectors import Detectors
from monitoring.expectations import validate
from monitoring.profile import MMD_ROWS, FeatureProfile, Profile, encode, standardized
from monitoring.statistics import jensen_shannon
from monitoring.window import VersionWindow


@dataclass(frozen=True)
class MonitorConfig:
    """A model's monitoring settings: ``monitor`` in config/models.yaml (defaults, then the model's)."""

    window: str = "1h"  # each run looks at the hour (or this) before its data interval's end
    min_events: int = 500  # a version's events a window needs before anything is decided
    alpha: float = 0.01  # significance of each family of tests, Bonferroni-corrected across features
    wasserstein_min: float = 0.2  # a numeric feature drifts only this far (reference standard deviations)
    js_min: float = 0.1  # a categorical feature or the predictions: Jensen-Shannon distance at least
    mmd_min: float = 0.02  # the multivariate test: MMD² at least
    mmd_permutations: int = 100
    outlier_rate_max: float = 0.03  # share of outlying rows that trips (the reference has 1 %)
    quality: bool = True  # a failed expectation trips
    accuracy_drop_max: float = 0.05  # accuracy this much below the previous windows' trips
    min_labels: int = 200  # labelled rows each side needs before accuracy is compared
    history: int = 24  # previous windows the drift checks pool
    cooldown: str = "6h"  # after a trip, no second trigger for this long
    schedule: str = "@hourly"  # the DAG's schedule (read from the defaults only)
    enabled: bool = True  # the scheduled DAG looks at this model
    output: str | None = None  # the output whose predictions are compared (default: label, else the first)

    @property
    def window_ms(self) -> int:
        return parse_duration(self.window, "monitor window")

    @property
    def cooldown_ms(self) -> int:
        return parse_duration(self.cooldown, "monitor cooldown")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_duration(text: str | int | float, what: str) -> int:
    """``30m``, ``1h``, ``2d`` or a number of seconds, as milliseconds."""
    from monitoring.logs import duration_ms

    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text * 1000)
    found = duration_ms(str(text))
    if found is None:
        raise ConfigError(f"{what}: expected a duration like 30m, 1h or 2d, got {text!r}")
    return found


def load_monitor_config(
    path: Path, model: str | None, overrides: Mapping[str, Any] | None = None
) -> MonitorConfig:
    """The ``monitor`` sections of the models file: ``defaults``, the model's, then ``overrides``
    (a run's params; a None there leaves the setting as it is). Unknown keys are errors."""
    known = {f.name for f in dataclasses.fields(MonitorConfig)}
    merged = models_file_section(path, "monitor", known, model, dict(overrides or {}))
    try:
        config = MonitorConfig(**merged)
        config.window_ms, config.cooldown_ms  # noqa: B018 - checked here, once
    except TypeError as exc:
        raise ConfigError(f"{path}: 'monitor': {exc}") from exc
    if not 0 < config.alpha < 1:
        raise ConfigError(f"{path}: monitor alpha must lie between 0 and 1")
    if config.min_events < 2 or config.history < 1 or config.mmd_permutations < 10:
        raise ConfigError(f"{path}: monitor min_events >= 2, history >= 1 and mmd_permutations >= 10")
    return config


def monitored_models(path: Path) -> list[str]:
    """The models the scheduled DAG looks at: every model of the file whose monitor is enabled."""
    data = read_models_file(path)
    return [name for name in sorted(data.get("models") or {}) if load_monitor_config(path, name).enabled]


# --- one check's result --------------------------------------------------------------------------


@dataclass
class Check:
    kind: str  # quality | skew | multivariate | drift | prediction | outliers | performance
    name: str  # the feature (or expectation, or "predictions")
    tripped: bool
    detail: str  # in words, for the report and the trigger's reason
    statistic: float | None = None
    p_value: float | None = None
    effect: float | None = None
    effect_min: float | None = None
    alpha: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class VersionResult:
    version: str
    events: int
    status: str  # ok | tripped | insufficient | no_profile
    reason: str
    checks: list[Check] = field(default_factory=list)
    histograms: dict[str, list[int]] = field(default_factory=dict)  # per feature, on the profile's bins
    predictions: dict[str, int] = field(default_factory=dict)
    labelled: int = 0
    correct: int = 0
    outlier_rate: float | None = None
    outlier_scores: dict[str, Any] = field(default_factory=dict)  # for the report's plot
    roles: dict[str, int] = field(default_factory=dict)

    @property
    def tripped(self) -> list[str]:
        return [check.key for check in self.checks if check.tripped]


def check_version(
    window: VersionWindow,
    profile: Profile | None,
    previous: Sequence[Mapping[str, Any]],
    config: MonitorConfig,
    detectors: Detectors,
    seed: int,
    label_delay_s: float | None = None,
) -> VersionResult:
    """Every check of one version's rows; ``previous``: the earlier windows' summaries of it;
    ``label_delay_s``: how long after the window's end its labels are read (said in the result)."""
    if profile is None:
        return VersionResult(
            window.version, window.count, "no_profile", "the version has no reference profile"
        )
    result = VersionResult(window.version, window.count, "ok", "", roles=dict(window.roles))
    result.histograms = {f.name: f.histogram(window.columns[f.name]).tolist() for f in profile.features}
    result.predictions = _counts(window.predictions)
    labelled = np.array([label is not None for label in window.labels], dtype=bool)
    result.labelled = int(labelled.sum())
    result.correct = int(
        sum(
            1
            for p, y in zip(window.predictions[labelled], window.labels[labelled], strict=True)
            if _same(p, y)
        )
    )
    if window.count < config.min_events:
        result.status = "insufficient"
        result.reason = (
            f"{window.count} events, fewer than the {config.min_events} a decision needs: nothing decided"
        )
        return result
    checks = quality(window, profile)
    if not config.quality:
        for check in checks:
            check.tripped = False  # reported, not decided on
    result.checks += checks
    result.checks += skew(window, profile, config, detectors)
    # The numeric features' complete rows in reference standard deviations: what the MMD test
    # and the outlier detector both take, made once.
    reference = standardized(profile, profile.sample, profile.outlier_features)
    current = standardized(profile, window.columns, profile.outlier_features)
    result.checks += multivariate(reference, current, profile, config, detectors, seed)
    result.checks += drift(result, profile, previous, config)
    outliers, rate, scores = outlier_check(reference, current, profile, config, detectors)
    result.checks += outliers
    result.outlier_rate, result.outlier_scores = rate, scores
    result.checks += performance(result, previous, config, label_delay_s)
    tripped = [check for check in result.checks if check.tripped]
    result.status = "tripped" if tripped else "ok"
    result.reason = "; ".join(check.detail for check in tripped) or "every check passed"
    return result


def _counts(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(
        np.asarray([str(v) for v in values if v is not None], dtype=str), return_counts=True
    )
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}


def _same(prediction: Any, label: Any) -> bool:
    return str(prediction) == str(label)


# --- quality ---------------------------------------------------------------------------------------


def quality(window: VersionWindow, profile: Profile) -> list[Check]:
    """The version's GX suite on the window's rows; each failed expectation a tripped check."""
    import pandas as pd

    frame = pd.DataFrame({name: window.columns[name] for name in profile.names})
    checks = []
    for outcome in validate(frame, profile.suite):
        column, kind, share = outcome.column, outcome.kind, outcome.unexpected_share
        detail = outcome.words(examples=False)  # the unseen categories instead, when a domain is missed
        if not outcome.success and "in_set" in kind:
            unseen = _unseen(window.columns.get(column), profile, column)
            detail += f"; unseen values {unseen}" if unseen else ""
        checks.append(
            Check("quality", f"{column}:{kind}", not outcome.success, detail, effect=share,
                  effect_min=1 - outcome.mostly, figures={"expectation": outcome.type, "unexpected_share": share,
                                                         "unexpected_examples": outcome.examples})
        )  # fmt: skip
    return checks


def _unseen(values: np.ndarray | None, profile: Profile, column: str) -> list[str]:
    if values is None:
        return []
    known = set(profile.feature(column).categories)
    found = {v for v in values if v is not None and v not in known}
    return sorted(found)[:10]


# --- training-serving skew -------------------------------------------------------------------------


def skew(window: VersionWindow, profile: Profile, config: MonitorConfig, detectors: Detectors) -> list[Check]:
    alpha = config.alpha / max(1, len(profile.features))  # Bonferroni across the features
    checks = []
    for feature in profile.features:
        reference, current = _present(profile.sample[feature.name]), _present(window.columns[feature.name])
        if len(current) < 2 or len(reference) < 2:
            checks.append(Check("skew", feature.name, False, f"'{feature.name}': too few values to compare"))
            continue
        if feature.kind == "numeric":
            statistic, p_value = detectors.numeric_test(reference, current)
            effect = wasserstein_sd(reference, current, feature)
            effect_min, unit = config.wasserstein_min, "reference standard deviations (Wasserstein)"
        else:
            codes_ref = encode(reference, feature.categories)
            codes_win = encode(current, feature.categories)
            statistic, p_value = detectors.categorical_test(codes_ref, codes_win)
            effect = jensen_shannon(_code_counts(codes_ref, feature), _code_counts(codes_win, feature))
            effect_min, unit = config.js_min, "Jensen-Shannon distance"
        tripped = p_value < alpha and effect >= effect_min
        verdict = "drifted from training" if tripped else "as in training"
        checks.append(
            Check("skew", feature.name, tripped,
                  f"'{feature.name}' {verdict}: {effect:.3f} {unit} (at least {effect_min} trips), p={p_value:.2g}"
                  f" (below {alpha:.2g} trips)",
                  statistic, p_value, effect, effect_min, alpha)
        )  # fmt: skip
    return checks


def _present(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return values[~np.isnan(values)]
    return values[np.asarray([v is not None for v in values], dtype=bool)] if len(values) else values


def _code_counts(codes: np.ndarray, feature: FeatureProfile) -> np.ndarray:
    return np.bincount(codes[codes >= 0], minlength=len(feature.categories) + 1)


def wasserstein_sd(reference: np.ndarray, window: np.ndarray, feature: FeatureProfile) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(reference, window) / (feature.std or 1.0))


# --- multivariate ---------------------------------------------------------------------------------


def multivariate(
    reference: np.ndarray,
    current: np.ndarray,
    profile: Profile,
    config: MonitorConfig,
    detectors: Detectors,
    seed: int,
) -> list[Check]:
    """``reference``, ``current``: the numeric features' complete rows, standardized."""
    names = list(profile.outlier_features)
    if len(names) < 2:
        return []
    if len(current) < 20 or len(reference) < 20:
        return [Check("multivariate", "numeric features", False, "too few complete rows for the MMD test")]
    rng = np.random.default_rng(seed)
    reference = reference[rng.choice(len(reference), min(MMD_ROWS, len(reference)), replace=False)]
    current = current[rng.choice(len(current), min(MMD_ROWS, len(current)), replace=False)]
    mmd2, p_value = detectors.mmd(reference, current, profile.mmd_sigma, config.mmd_permutations, seed)
    tripped = p_value < config.alpha and mmd2 >= config.mmd_min
    verdict = (
        "the numeric features together drifted" if tripped else "the numeric features together as in training"
    )
    return [
        Check("multivariate", "numeric features", tripped,
              f"{verdict}: MMD² {mmd2:.4f} (at least {config.mmd_min} trips), p={p_value:.2g} on {len(current)} rows",
              mmd2, p_value, mmd2, config.mmd_min, config.alpha, {"features": names})
    ]  # fmt: skip


# --- drift against the previous windows ------------------------------------------------------------


def drift(
    result: VersionResult, profile: Profile, previous: Sequence[Mapping[str, Any]], config: MonitorConfig
) -> list[Check]:
    from scipy.stats import chi2_contingency

    earlier = _last(previous, result.version, config)
    if not earlier:
        return [
            Check("drift", "previous windows", False, "no previous window of this version: drift not decided")
        ]
    alpha = config.alpha / (len(profile.features) + 1)
    checks = []
    items: list[tuple[str, list[int], list[int]]] = []
    for feature in profile.features:
        pooled = np.sum(
            [p["histograms"].get(feature.name, []) for p in earlier if feature.name in p["histograms"]],
            axis=0,
        )
        items.append((feature.name, result.histograms[feature.name], list(np.atleast_1d(pooled))))
    labels = sorted(set(result.predictions) | {k for p in earlier for k in p.get("predictions", {})})
    pooled_predictions = [sum(p.get("predictions", {}).get(k, 0) for p in earlier) for k in labels]
    items.append(("predictions", [result.predictions.get(k, 0) for k in labels], pooled_predictions))
    for name, now, before in items:
        now_a, before_a = np.asarray(now, dtype=float), np.asarray(before, dtype=float)
        if now_a.shape != before_a.shape or now_a.sum() == 0 or before_a.sum() == 0:
            checks.append(
                Check(
                    "prediction" if name == "predictions" else "drift",
                    name,
                    False,
                    f"'{name}': nothing to compare",
                )
            )
            continue
        table = np.vstack([before_a, now_a])
        table = table[:, table.sum(axis=0) > 0]
        p_value = 1.0 if table.shape[1] < 2 else float(chi2_contingency(table)[1])
        effect = jensen_shannon(before_a, now_a)
        tripped = p_value < alpha and effect >= config.js_min
        kind = "prediction" if name == "predictions" else "drift"
        verdict = "moved from the previous windows" if tripped else "as in the previous windows"
        checks.append(
            Check(kind, name, tripped,
                  f"'{name}' {verdict}: Jensen-Shannon distance {effect:.3f} (at least {config.js_min} trips),"
                  f" p={p_value:.2g} against {len(earlier)} window(s)",
                  None, p_value, effect, config.js_min, alpha)
        )  # fmt: skip
    return checks


def _last(
    previous: Sequence[Mapping[str, Any]], version: str, config: MonitorConfig
) -> list[Mapping[str, Any]]:
    """The version's last ``history`` earlier windows that did not trip (``previous`` is oldest
    first): a window that tripped is an incident, not the normal the next ones are compared with
    (after a shift and its fix, the traffic going back to normal must not trip as "drift")."""
    return [
        p
        for p in previous
        if p.get("version") == version and p.get("histograms") and p.get("decision") != "tripped"
    ][-config.history :]


# --- outliers ---------------------------------------------------------------------------------------


def outlier_check(
    reference: np.ndarray, current: np.ndarray, profile: Profile, config: MonitorConfig, detectors: Detectors
) -> tuple[list[Check], float | None, dict[str, Any]]:
    """``reference``, ``current``: the numeric features' complete rows, standardized."""
    from scipy.stats import binomtest

    if not profile.outlier_features:
        return [], None, {}
    if len(current) == 0:
        return [Check("outliers", "rows", False, "no complete rows to score")], None, {}
    ref_scores, scores = detectors.outlier_scores(reference, current)
    threshold = float(np.quantile(ref_scores, profile.outlier_quantile))
    outlying = int((scores > threshold).sum())
    rate = outlying / len(scores)
    expected = 1 - profile.outlier_quantile
    p_value = float(binomtest(outlying, len(scores), expected, alternative="greater").pvalue)
    tripped = rate >= config.outlier_rate_max and p_value < config.alpha
    verdict = "too many outliers" if tripped else "outliers as expected"
    edges = np.linspace(0, max(float(np.quantile(scores, 0.999)), threshold * 2), 41)
    plot = {
        "edges": edges.tolist(),
        "reference": np.histogram(np.minimum(ref_scores, edges[-1]), edges)[0].tolist(),
        "window": np.histogram(np.minimum(scores, edges[-1]), edges)[0].tolist(),
        "threshold": threshold,
    }
    check = Check(
        "outliers", "rows", tripped,
        f"{verdict}: {rate:.2%} of {len(scores)} rows past the reference's {profile.outlier_quantile:.0%} score"
        f" (at most {config.outlier_rate_max:.0%}; {expected:.0%} expected), p={p_value:.2g}",
        float(outlying), p_value, rate, config.outlier_rate_max, config.alpha, {"threshold": threshold},
    )  # fmt: skip
    return [check], rate, plot


# --- performance -------------------------------------------------------------------------------------


def performance(
    result: VersionResult,
    previous: Sequence[Mapping[str, Any]],
    config: MonitorConfig,
    label_delay_s: float | None = None,
) -> list[Check]:
    """Accuracy where labels came back. Labels arrive late: the share labelled so far, and how
    long after the window's end they were read, are said (a later re-run may see more)."""
    from scipy.stats import fisher_exact

    earlier = _last(previous, result.version, config)
    labelled_before = sum(int(p.get("labelled") or 0) for p in earlier)
    correct_before = sum(int(p.get("correct") or 0) for p in earlier)
    share = result.labelled / result.events if result.events else 0.0
    delay = (
        f", labels read {_hours(label_delay_s)} after the window's end" if label_delay_s is not None else ""
    )
    if result.labelled < config.min_labels or labelled_before < config.min_labels:
        return [
            Check("performance", "accuracy", False,
                  f"{result.labelled} labelled rows ({share:.0%} of the window{delay}) and {labelled_before} before:"
                  f" fewer than {config.min_labels} each side, accuracy not compared",
                  figures={"labelled": result.labelled, "labelled_share": share, "label_delay_s": label_delay_s})
        ]  # fmt: skip
    accuracy = result.correct / result.labelled
    before = correct_before / labelled_before
    table = [
        [result.correct, result.labelled - result.correct],
        [correct_before, labelled_before - correct_before],
    ]
    p_value = float(fisher_exact(table, alternative="less")[1])
    drop = before - accuracy
    tripped = drop >= config.accuracy_drop_max and p_value < config.alpha
    verdict = "accuracy fell" if tripped else "accuracy held"
    return [
        Check("performance", "accuracy", tripped,
              f"{verdict}: {accuracy:.1%} on {result.labelled} labelled rows ({share:.0%} of the window{delay}) against"
              f" {before:.1%} before (a drop of {config.accuracy_drop_max:.0%} trips), p={p_value:.2g}",
              accuracy, p_value, drop, config.accuracy_drop_max, config.alpha,
              {"accuracy": accuracy, "before": before, "labelled": result.labelled, "labelled_share": share,
               "label_delay_s": label_delay_s})
    ]  # fmt: skip


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def effect_of(check: Check) -> float:
    """How far past its threshold a check's effect is (1: at it), for a summary's ``max_effect``."""
    if check.effect is None or not check.effect_min:
        return 0.0
    return float(check.effect / check.effect_min)
