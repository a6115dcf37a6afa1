"""A model version's reference profile: what its training data looked like, kept with the version.

Built from the training data (``build_profile``) when a version is registered, or later for any
registered version (``mlops profile MODEL --version V --data FILE``), and stored with the version
in MLflow (``store_profile``: artifacts under ``monitoring-profile/`` of the version's run, and the
version's tag ``monitoring.profile`` naming them). Every monitoring decision is made against the
profile of the version that answered, so it traces to that version.

A profile holds:

- per feature, its kind (numeric or categorical), null rate, summary statistics, and a histogram
  on fixed bins (numeric: the reference's quantiles; categorical: its categories), which every
  window's summary uses too, so windows compare with each other without their rows;
- a great-expectations suite (GX Core 1.x, ``expectations.json``): the columns, ranges, null rates
  and categorical domains, each with the share of rows allowed to miss it;
- a seeded sample of the reference rows (``reference.npz``) and the detectors' parameters: the
  feature-wise tests (KS, chi-square) and the multivariate test (MMD, its kernel bandwidth) run on
  it, and the outlier detector (Mahalanobis distance on the numeric features) is fitted on it with
  its threshold. No fitted object is pickled: loading a pickle from a registry anyone can write to
  runs their code, and a fit from the stored sample is the same detector (monitoring/detectors.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from common.errors import ConfigError, InvalidInput

PROFILE_VERSION = 1
PROFILE_DIR = "monitoring-profile"  # the artifact folder in the version's run
PROFILE_TAG = "monitoring.profile"  # the version's tag naming the artifacts (runs:/<run>/monitoring-profile)
SAMPLE_ROWS = 5_000  # reference rows kept for the tests (a KS test on more gains nothing here)
MMD_ROWS = 500  # rows of each side in the multivariate test
BINS = 20  # numeric histogram bins between the reference's quantiles (and one below, one above)
OUTLIER_QUANTILE = 0.99  # the outlier threshold: this quantile of the reference's scores
UNSEEN = "<unseen>"  # a categorical histogram's last bin: values the reference never had
NULL = "<null>"

Kind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class FeatureProfile:
    name: str
    kind: Kind
    count: int
    null_rate: float
    # numeric
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)  # "p01" .. "p99"
    edges: tuple[float, ...] = ()  # inner bin edges: the histogram has len(edges) + 1 bins
    # categorical
    categories: tuple[str, ...] = ()
    # the reference's histogram: numeric bins, or categories then UNSEEN (0 here)
    counts: tuple[int, ...] = ()

    @property
    def bins(self) -> list[str]:
        """The histogram's bin names (for reports and summaries)."""
        if self.kind == "categorical":
            return [*self.categories, UNSEEN]
        lows = ["-inf", *(f"{edge:.4g}" for edge in self.edges)]
        highs = [*(f"{edge:.4g}" for edge in self.edges), "inf"]
        return [f"[{low}, {high})" for low, high in zip(lows, highs, strict=True)]

    def histogram(self, values: np.ndarray) -> np.ndarray:
        """Counts of ``values`` (nulls left out) on this feature's bins."""
        if self.kind == "categorical":
            codes = encode(values, self.categories)
            codes = codes[codes >= 0]
            return np.bincount(codes, minlength=len(self.categories) + 1)[: len(self.categories) + 1]
        numbers = values[~np.isnan(values)]
        return np.bincount(np.searchsorted(self.edges, numbers, side="right"), minlength=len(self.edges) + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureProfile:
        values = dict(data)
        for key in ("edges", "categories", "counts"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


@dataclass(frozen=True)
class Profile:
    model: str
    version: str
    rows: int
    features: tuple[FeatureProfile, ...]
    suite: dict[str, Any]  # the GX expectation suite, as GX writes it (to_json_dict)
    sample: dict[str, np.ndarray]  # reference rows: numeric float64 (NaN: null), categorical str/None
    mmd_sigma: float  # the multivariate test's kernel bandwidth (median distance of the sample)
    outlier_features: tuple[str, ...]  # numeric features the outlier detector sees
    outlier_quantile: float = OUTLIER_QUANTILE
    label: dict[str, Any] | None = None  # the label column's name and class counts, when the data had one
    source: str = ""  # where the data came from, in words
    created_ms: int = 0
    seed: int = 0
    profile_version: int = PROFILE_VERSION

    def feature(self, name: str) -> FeatureProfile:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [feature.name for feature in self.features]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the sample and the suite (profile.json)."""
        return {
            "profile_version": self.profile_version,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "features": [feature.to_dict() for feature in self.features],
            "mmd_sigma": self.mmd_sigma,
            "outlier_features": list(self.outlier_features),
            "outlier_quantile": self.outlier_quantile,
            "label": self.label,
            "source": self.source,
            "created_ms": self.created_ms,
            "seed": self.seed,
        }

    def save(self, directory: Path) -> Path:
        """profile.json, expectations.json and reference.npz in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "profile.json").write_text(json.dumps(self.to_dict(), indent=1))
        (directory / "expectations.json").write_text(json.dumps(self.suite, indent=1))
        arrays = {name: _storable(values) for name, values in self.sample.items()}
        np.savez_compressed(
            directory / "reference.npz", **{f"f{i}": a for i, a in enumerate(arrays.values())}
        )
        (directory / "reference-columns.json").write_text(json.dumps(list(arrays)))
        return directory

    @classmethod
    def load(cls, directory: Path) -> Profile:
        try:
            data = json.loads((directory / "profile.json").read_text())
            suite = json.loads((directory / "expectations.json").read_text())
            columns = json.loads((directory / "reference-columns.json").read_text())
            with np.load(directory / "reference.npz", allow_pickle=False) as stored:
                arrays = [stored[f"f{i}"] for i in range(len(columns))]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"profile in '{directory}' cannot be read: {exc}") from exc
        if data.get("profile_version") != PROFILE_VERSION:
            raise ConfigError(
                f"profile in '{directory}' has version {data.get('profile_version')}, not {PROFILE_VERSION}:"
                " build it again with `mlops profile`"
            )
        features = tuple(FeatureProfile.from_dict(f) for f in data.pop("features"))
        kinds = {feature.name: feature.kind for feature in features}
        sample = {
            name: (values.astype(float) if kinds.get(name) == "numeric" else _categorical(values))
            for name, values in zip(columns, arrays, strict=True)
        }
        data.pop("profile_version")
        data["outlier_features"] = tuple(data["outlier_features"])
        return cls(features=features, suite=suite, sample=sample, **data)


def _storable(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return values
    return np.asarray(["" if v is None else f"={v}" for v in values], dtype=str)  # "" is a null


def _categorical(values: np.ndarray) -> np.ndarray:
    return np.asarray([None if v == "" else str(v)[1:] for v in values.tolist()], dtype=object)


# --- building one ------------------------------------------------------------------------------


def read_table(path: Path) -> Any:
    """A data file as a pandas DataFrame: .csv, .parquet, .jsonl/.ndjson or .json (records)."""
    import pandas as pd

    if not path.is_file():
        raise InvalidInput(f"--data: no file '{path}'")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path, orient="records")
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"--data: '{path}' cannot be read as {suffix[1:]}: {exc}") from exc
    raise InvalidInput(f"--data: '{path}': expected .csv, .parquet, .jsonl or .json")


def build_profile(
    model: str,
    version: str,
    data: Any,
    label: str | None = None,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    source: str = "",
    seed: int = 0,
) -> Profile:
    """The profile of ``data`` (a pandas DataFrame of training rows, named as the model's inputs).

    ``label``: the label column (left out of the features; its classes are kept); ``features``:
    the columns to profile (default: all others); ``categorical``: columns to treat as categories
    although they hold numbers (text and booleans are categorical anyway).
    """
    columns = list(features) if features else [c for c in data.columns if c != label]
    missing = [c for c in [*columns, *([label] if label else [])] if c not in data.columns]
    if missing:
        raise InvalidInput(f"--data: no column(s) {missing} (it has {list(data.columns)})")
    if not columns:
        raise InvalidInput("--data: no feature columns")
    if len(data) < 20:
        raise InvalidInput(f"--data: {len(data)} rows; a profile needs at least 20")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(data), size=min(SAMPLE_ROWS, len(data)), replace=False))
    profiles, sample = [], {}
    for name in columns:
        series = data[name]
        kind = column_kind(series, name in categorical)
        values = column_values(series.tolist(), kind)
        profiles.append(_feature(name, kind, values))
        sample[name] = values[take]
    numeric = tuple(p.name for p in profiles if p.kind == "numeric" and (p.std or 0) > 0)
    profile = Profile(
        model=model,
        version=str(version),
        rows=len(data),
        features=tuple(profiles),
        suite={},
        sample=sample,
        mmd_sigma=1.0,
        outlier_features=numeric,
        label=_label(data, label),
        source=source,
        created_ms=time.time_ns() // 1_000_000,
        seed=seed,
    )
    sigma = median_distance(standardized(profile, sample, numeric)[:MMD_ROWS])
    return dataclasses.replace(profile, suite=expectation_suite(profile), mmd_sigma=sigma)


def column_kind(series: Any, categorical: bool = False) -> Kind:
    """A pandas column's kind: numbers are numeric unless said to be categories; text and
    booleans are categorical."""
    return "categorical" if categorical or series.dtype.kind not in "iuf" else "numeric"


def column_values(values: Sequence[Any], kind: Kind) -> np.ndarray:
    """A column as the checks take it: numeric float64 with NaN for a null or a non-number,
    categorical an object array of strings, None for a null."""
    if kind == "numeric":
        try:  # numbers and nulls (None becomes NaN): the common case, in C
            out = np.asarray(values, dtype=float)
            if out.ndim == 1 and not any(type(v) is bool for v in values):
                return out
        except (TypeError, ValueError):
            pass
        out = np.empty(len(values), dtype=float)
        for i, value in enumerate(values):
            out[i] = value if type(value) in (float, int) else _number(value)
        return out
    return np.asarray(
        [v if type(v) is str else None if v is None or v != v else str(v) for v in values], dtype=object
    )


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def encode(values: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """Categorical values as codes: a category's index, len(categories) for an unseen value, -1 for a null."""
    index = {category: code for code, category in enumerate(categories)}
    unseen = len(categories)
    return np.fromiter(
        (-1 if v is None else index.get(v, unseen) for v in values), dtype=np.int64, count=len(values)
    )


def _feature(name: str, kind: Kind, values: np.ndarray) -> FeatureProfile:
    if kind == "categorical":
        present = [v for v in values if v is not None]
        nulls = len(values) - len(present)
        categories, counts = np.unique(np.asarray(present, dtype=str), return_counts=True)
        return FeatureProfile(
            name, kind, len(values), nulls / len(values),
            categories=tuple(str(c) for c in categories), counts=(*(int(c) for c in counts), 0),
        )  # fmt: skip
    numbers = values[~np.isnan(values)]
    if not len(numbers):
        raise InvalidInput(f"--data: column '{name}' has no numbers")
    edges = np.unique(np.quantile(numbers, np.linspace(0, 1, BINS + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, numbers, side="right"), minlength=len(edges) + 1)
    points = {"p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99}
    return FeatureProfile(
        name, kind, len(values), 1 - len(numbers) / len(values),
        mean=float(numbers.mean()), std=float(numbers.std()), min=float(numbers.min()), max=float(numbers.max()),
        quantiles={key: float(np.quantile(numbers, q)) for key, q in points.items()},
        edges=tuple(float(e) for e in edges), counts=tuple(int(c) for c in counts),
    )  # fmt: skip


def _label(data: Any, label: str | None) -> dict[str, Any] | None:
    if not label:
        return None
    classes = data[label].dropna().astype(str).value_counts().sort_index()
    return {"column": label, "classes": {str(k): int(v) for k, v in classes.items()}}


def standardized(profile: Profile, columns: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The numeric ``names`` of ``columns`` as rows, each feature in the reference's standard
    deviations from its mean; rows with a null left out."""
    if not names:
        return np.empty((0, 0))
    matrix = np.column_stack(
        [(columns[name] - profile.feature(name).mean) / profile.feature(name).std for name in names]  # type: ignore[operator]
    )
    return matrix[~np.isnan(matrix).any(axis=1)]


def median_distance(rows: np.ndarray) -> float:
    """The median pairwise distance of ``rows``: the multivariate test's kernel bandwidth."""
    if rows.shape[0] < 2 or rows.shape[1] == 0:
        return 1.0
    squared = (rows**2).sum(axis=1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * rows @ rows.T, 0))
    upper = distances[np.triu_indices(len(rows), k=1)]
    return float(np.median(upper)) or 1.0


# --- the data-quality suite ----------------------------------------------------------------------

NULL_SLACK = 0.05  # a window may have this much more nulls than the reference
OUT_OF_RANGE = 0.01  # and this share of values outside the reference's range, or unseen categories


def expectation_suite(profile: Profile) -> dict[str, Any]:
    """The GX Core 1.x suite of the profile: columns, ranges, null rates, categorical domains."""
    expectations: list[dict[str, Any]] = []

    def expect(kind: str, **kwargs: Any) -> None:
        expectations.append({"type": kind, "kwargs": kwargs, "meta": {}})

    for feature in profile.features:
        expect("expect_column_to_exist", column=feature.name)
        expect(
            "expect_column_values_to_not_be_null",
            column=feature.name,
            mostly=round(max(0.0, 1 - feature.null_rate - NULL_SLACK), 6),
        )
        if feature.kind == "numeric":
            expect(
                "expect_column_values_to_be_between",
                column=feature.name,
                min_value=feature.min,
                max_value=feature.max,
                mostly=1 - OUT_OF_RANGE,
            )
        else:
            expect(
                "expect_column_values_to_be_in_set",
                column=feature.name,
                value_set=list(feature.categories),
                mostly=1 - OUT_OF_RANGE,
            )
    return {
        "name": f"{profile.model}-v{profile.version}",
        "expectations": expectations,
        "meta": {"made_by": "mlops profile", "rows": profile.rows},
    }


# --- in MLflow -----------------------------------------------------------------------------------


def store_profile(profile: Profile, mlflow_url: str, experiment: str, workdir: Path) -> dict[str, str]:
    """Log the profile as artifacts of the version's run (a run of its own in ``experiment`` when
    the version has none, as for one registered elsewhere) and name them in the version's tag."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(mlflow_url)
    try:
        version = client.get_model_version(profile.model, profile.version)
        run_id = version.run_id
        if not run_id:
            from monitoring.report import experiment_id

            run = client.create_run(
                experiment_id(client, experiment),
                run_name=f"profile-{profile.model}-v{profile.version}",
                tags={"mlops.model": profile.model, "mlops.version": profile.version},
            )
            run_id = run.info.run_id
            client.set_terminated(run_id)
        directory = profile.save(workdir / "profile")
        client.log_artifacts(run_id, str(directory), PROFILE_DIR)
        uri = f"runs:/{run_id}/{PROFILE_DIR}"
        client.set_model_version_tag(profile.model, profile.version, PROFILE_TAG, uri)
    except MlflowException as exc:
        raise _registry_error(exc, profile.model, profile.version) from exc
    return {
        "uri": uri,
        "run_id": run_id,
        "artifacts": f"{mlflow_url}/#/experiments/{_experiment_of(client, run_id)}/runs/{run_id}/artifacts",
    }


def _experiment_of(client: Any, run_id: str) -> str:
    return client.get_run(run_id).info.experiment_id


def load_stored_profile(mlflow_url: str, model: str, version: str, cache: Path) -> Profile:
    """The version's profile, downloaded once into ``cache``; ConfigError when it has none."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(mlflow_url)
    try:
        uri = client.get_model_version(model, version).tags.get(PROFILE_TAG)
    except MlflowException as exc:
        raise _registry_error(exc, model, version) from exc
    if not uri:
        raise ConfigError(
            f"model '{model}' version {version} has no reference profile: build it with"
            f" `mlops profile {model} --version {version} --data <training data>`"
        )
    where = cache / model / str(version) / uri.replace(":", "_").replace("/", "_")
    if not (where / "profile.json").is_file():
        where.mkdir(parents=True, exist_ok=True)
        try:
            download_artifacts(artifact_uri=uri, dst_path=str(where), tracking_uri=mlflow_url)
        except (MlflowException, OSError) as exc:
            raise _registry_error(exc, model, version) from exc
        nested = where / PROFILE_DIR
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(where / item.name)
    return Profile.load(where)


def _registry_error(exc: Exception, model: str, version: str) -> Exception:
    from common.errors import BackendUnavailable, ModelNotFound, mlflow_not_found

    if mlflow_not_found(exc):
        return ModelNotFound(f"model '{model}' version {version} is not in the registry")
    return BackendUnavailable(f"MLflow: {str(exc)[:300]}")
