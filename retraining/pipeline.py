"""The retraining DAG's steps, each one `mlops retrain <step>` command, sharing one MLflow run.

A trigger (a monitoring window that tripped, or a person's request) owns one run in the
retraining experiment, found again by its tag ``mlops.trigger``: each step reads what the steps
before it logged there and logs its own, so the steps may run in different processes, pods or
machines, and a step run again finds its inputs where they were. A trigger whose run already
registered a candidate registers no second one (`dataset` answers ``done``).

1. ``dataset``: the parent version's own training rows (logged with it under ``dataset/``) plus
   the labelled traffic of the window before the trigger, with a content hash and counts by source;
2. ``validate``: a great-expectations suite on it (rows, nulls, labels the parent knows, at least
   two classes); a failure lists the failing expectations and ends the run: nothing is registered;
3. ``train``: the transformer spec from the training split, a seeded PyTorch MLP, early-stopped on
   the validation split, on CUDA when present;
4. ``export``: ONNX, and ONNX Runtime against PyTorch on the held-out rows within ``parity_atol``,
   or the run ends refused;
5. ``evaluate``: candidate and champion on the same held-out rows and on the recent window (the
   newest labelled traffic, never trained on);
6. ``register``: the version, with signature, input example, transformer spec, metrics, its
   reference profile and lineage tags;
7. ``approve``: by the model's policy: the ``challenger`` alias when it beats the champion by the
   margin (the deploy DAG's watcher sees it), else left for a person, with the reason on the version.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, InvalidInput, ModelNotFound, mlflow_not_found
from common.settings import Settings
from monitoring.expectations import validate as run_suite
from retraining.config import RetrainConfig, load_retrain_config
from retraining.dataset import SOURCE, Dataset, assemble, canonical_csv, labelled_traffic
from retraining.train import CandidateRefused
from serving.transformer import Transformer

Progress = Callable[[str], None]
TRIGGER_TAG = "mlops.trigger"
MODEL_TAG = "mlops.model"
VERSION_TAG = "mlops.version"  # on the run: the version it registered
DATASET_TAG = "mlops.dataset"  # on a version: where its training rows are (runs:/<run>/dataset)
CHAMPION = "champion"


@dataclass(frozen=True)
class Trigger:
    """What asked for a retraining: its key (one candidate per key), and what to record of it."""

    key: str
    reason: str = ""
    monitor_run: str = ""  # the monitoring DAG run whose window tripped
    report: str = ""  # its report
    end_ms: int | None = None  # the window's end: labelled traffic is read up to it
    parent: str | None = None  # the version retrained (default: the champion)


class Retraining:
    """One model's retraining run for one trigger, in MLflow."""

    def __init__(
        self, settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None = None
    ):
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a step's log: its own lines
        self.settings, self.model, self.key = settings, model, trigger_key
        self.config: RetrainConfig = load_retrain_config(settings.deploy.models_file, model, overrides)
        self.client = MlflowClient(settings.mlflow_url)
        # The versions fetched (the model server's cache format).
        self.cache = settings.scratch_dir("retraining")
        self._scratch = tempfile.TemporaryDirectory(prefix="retrain-")  # downloads and files to log

    # --- the run and its artifacts ------------------------------------------------------------

    def find_run(self) -> Any | None:
        from monitoring.report import experiment_id

        runs = self.client.search_runs(
            [experiment_id(self.client, self.settings.retrain.experiment)],
            filter_string=f"tags.`{TRIGGER_TAG}` = '{_quoted(self.key)}' and tags.`{MODEL_TAG}` = '{_quoted(self.model)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def run(self) -> Any:
        run = self.find_run()
        if run is None:
            raise ConfigError(
                f"no retraining run of '{self.model}' for trigger '{self.key}': run `mlops retrain dataset` first"
            )
        return run

    def read(self, run_id: str, name: str) -> Path:
        """An artifact of the run, downloaded (a file or a folder)."""
        return self._download(
            f"runs:/{run_id}/{name}",
            f"retraining run {run_id} has no '{name}': run the step that makes it first",
        )

    def _download(self, uri: str, missing: str) -> Path:
        """``uri`` into this job's scratch folder (gone with the job: a step's process)."""
        import mlflow

        folder = tempfile.mkdtemp(dir=self._scratch.name)
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=folder, tracking_uri=self.settings.mlflow_url
                )
            )
        except Exception as exc:
            raise ConfigError(f"{missing} ({exc})") from exc

    def read_json(self, run_id: str, name: str) -> Any:
        return json.loads(self.read(run_id, name).read_text())

    def write(self, run_id: str, folder: str, files: Mapping[str, Any]) -> None:
        """Files (bytes, text, JSON-able, or a Path) under ``folder`` of the run."""
        with tempfile.TemporaryDirectory(dir=self._scratch.name) as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                if isinstance(content, Path):
                    path.write_bytes(content.read_bytes())
                elif isinstance(content, bytes):
                    path.write_bytes(content)
                elif isinstance(content, str):
                    path.write_text(content)
                else:
                    path.write_text(json.dumps(content, indent=1, default=str))
            self.client.log_artifacts(run_id, tmp, folder)

    def fail(self, run_id: str, step: str, reason: str) -> None:
        self.client.set_tag(run_id, "mlops.failed", f"{step}: {reason}"[:5000])
        self.client.set_terminated(run_id, "FAILED")

    def dataset(self, run_id: str) -> Dataset:
        return self._dataset(
            f"runs:/{run_id}/dataset",
            f"retraining run {run_id} has no dataset: run `mlops retrain dataset` first",
        )

    def _dataset(self, where: str, missing: str) -> Dataset:
        """A dataset as `dataset` logged it: the rows (labels and categories as text) and its summary."""
        import pandas as pd

        summary = json.loads(self._download(f"{where}/summary.json", missing).read_text())
        frame = pd.read_csv(
            self._download(f"{where}/dataset.csv", missing), dtype={summary["label"]: str, SOURCE: str}
        )
        for name, kind in summary["kinds"].items():
            if kind == "categorical":
                frame[name] = frame[name].astype(str)
        return Dataset(
            frame, summary["label"], tuple(summary["features"]), summary["sha256"], summary["rows_by_source"]
        )

    def version_url(self, version: str) -> str:
        return f"{self.settings.mlflow_url}/#/models/{self.model}/versions/{version}"

    # --- the parent version -------------------------------------------------------------------

    def champion(self) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.model, CHAMPION).version)
        except Exception as exc:
            if mlflow_not_found(exc):
                return None
            raise

    def bundle(self, version: str) -> Any:
        from serving.bundle import read_bundle
        from serving.sources import fetch

        return read_bundle(
            fetch(f"models:/{self.model}/{version}", self.cache / "models", self.settings.mlflow_url)
        )

    def training_rows(self, version: str) -> Any:
        """The rows ``version`` was trained on, from where its tag ``mlops.dataset`` says."""
        try:
            tags = self.client.get_model_version(self.model, version).tags
        except Exception as exc:
            if mlflow_not_found(exc):
                raise ModelNotFound(f"model '{self.model}' has no version {version}") from exc
            raise
        where = tags.get(DATASET_TAG)
        if not where:
            raise ConfigError(
                f"version {version} of '{self.model}' has no training data logged with it (tag {DATASET_TAG});"
                " retraining starts from a version `mlops train` or `mlops retrain` registered"
            )
        dataset = self._dataset(
            where, f"version {version}'s training data ({DATASET_TAG} {where}) cannot be read"
        )
        return dataset.frame.drop(columns=[SOURCE], errors="ignore"), dataset.label


# --- the steps ----------------------------------------------------------------------------------


def step_dataset(
    settings: Settings, model: str, trigger: Trigger, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    from monitoring.events import now_ms
    from monitoring.logstore import get_log_store
    from monitoring.profile import column_kind

    job = Retraining(settings, model, trigger.key, overrides)
    existing = job.find_run()
    if existing is not None and existing.data.tags.get(VERSION_TAG):
        version = existing.data.tags[VERSION_TAG]
        progress(f"[1/7] trigger '{trigger.key}' already registered version {version}: nothing to do")
        return {"action": "done", "model": model, "version": version, "run_id": existing.info.run_id,
                "reason": f"this trigger's candidate is registered already: version {version}",
                "links": {"version": job.version_url(version)}}  # fmt: skip
    parent = trigger.parent or job.champion()
    if parent is None:
        raise ConfigError(
            f"model '{model}' has no '{CHAMPION}' to retrain: train its first version with `mlops train`"
        )
    config = job.config
    reference, label = job.training_rows(parent)
    if label != config.label:
        raise ConfigError(
            f"version {parent} was trained with the label '{label}'; the retrain settings name '{config.label}'"
        )
    if len(reference) > config.max_reference_rows:
        reference = reference.iloc[len(reference) - config.max_reference_rows :].reset_index(drop=True)
    end = trigger.end_ms or now_ms()
    start = end - config.window_ms
    progress(
        f"[1/7] dataset: version {parent}'s {len(reference)} training rows, and the labelled traffic of the {config.window} before the trigger"
    )
    store = get_log_store(settings.log_store_url, **settings.log_store_options())
    traffic = labelled_traffic(store, model, start, end, reference, label)
    dataset = assemble(reference, traffic, label)
    progress(f"    {len(dataset.frame)} rows {dataset.rows_by_source}; sha256 {dataset.sha256[:16]}")
    summary = {
        **dataset.summary(),
        "kinds": {name: column_kind(dataset.frame[name]) for name in dataset.features},
        "parent": parent,
        "traffic_window": {"start_ms": start, "end_ms": end},
    }
    run_id = open_run(job, trigger, existing, dataset, summary, _spec(job.bundle(parent), parent), parent)
    return {"action": "train", "model": model, "run_id": run_id, "parent": parent, "trigger": trigger.key,
            "dataset": {k: summary[k] for k in ("rows", "rows_by_source", "sha256")},
            "links": {"version": job.version_url(parent), **({"report": trigger.report} if trigger.report else {})}}  # fmt: skip


def open_run(
    job: Retraining,
    trigger: Trigger,
    existing: Any,
    dataset: Dataset,
    summary: dict[str, Any],
    parent_spec: dict[str, Any],
    parent: str | None,
) -> str:
    """The trigger's run (made, or the one a failed attempt left), with the dataset and the
    parent's features and labels logged, and the lineage known so far tagged."""
    from monitoring.report import experiment_id

    if existing is None:
        run = job.client.create_run(
            experiment_id(job.client, job.settings.retrain.experiment),
            run_name=f"retrain-{job.model}-{hashlib.sha256(trigger.key.encode()).hexdigest()[:8]}",
            tags={TRIGGER_TAG: trigger.key, MODEL_TAG: job.model},
        )
    else:
        run = existing
        job.client.set_tag(run.info.run_id, "mlops.failed", "")
    run_id = run.info.run_id
    for key, value in {
        "mlops.parent_version": parent or "", "mlops.trigger_reason": trigger.reason[:5000],
        "mlops.monitor_run": trigger.monitor_run, "mlops.monitor_report": trigger.report,
        "mlops.dataset_sha256": dataset.sha256, "mlops.code_version": code_version(),
    }.items():  # fmt: skip
        job.client.set_tag(run_id, key, value)
    job.write(run_id, "dataset", {"dataset.csv": canonical_csv(dataset.frame), "summary.json": summary})
    job.write(run_id, "parent", {"transformer.json": parent_spec})
    return run_id


def _spec(bundle: Any, version: str) -> dict[str, Any]:
    if bundle.transformer is None:
        raise ConfigError(
            f"version {version} has no transformer spec: retraining needs its named features and labels"
        )
    transformer = bundle.transformer
    return {
        "features": [{"name": f.name, "type": f.type} for f in transformer.features],
        "labels": list(transformer.labels),
    }


def training_suite(dataset: Dataset, labels: list[str], config: RetrainConfig) -> dict[str, Any]:
    """The dataset's expectations: enough rows, every feature present and never null, every label
    one the parent knows, at least two classes."""
    expectations: list[dict[str, Any]] = [
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": config.min_rows}}
    ]
    for name in (*dataset.features, dataset.label):
        expectations += [
            {"type": "expect_column_to_exist", "kwargs": {"column": name}},
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": name}},
        ]
    expectations += [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": dataset.label, "value_set": labels},
        },
        {
            "type": "expect_column_unique_value_count_to_be_between",
            "kwargs": {"column": dataset.label, "min_value": 2},
        },
    ]
    return {"name": f"retrain-{dataset.label}", "expectations": expectations}


def step_validate(
    settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    job = Retraining(settings, model, trigger_key, overrides)
    run = job.run()
    run_id = run.info.run_id
    dataset = job.dataset(run_id)
    parent = job.read_json(run_id, "parent/transformer.json")
    progress(f"[2/7] validate: {len(dataset.frame)} rows against the training suite (great-expectations)")
    outcomes = run_suite(dataset.frame, training_suite(dataset, parent["labels"], job.config))
    failures = [o.words() for o in outcomes if not o.success]
    traffic = dataset.rows_by_source.get("traffic", 0)
    if traffic < job.config.min_traffic_rows:
        failures.append(
            f"labelled traffic: {traffic} rows, fewer than min_traffic_rows {job.config.min_traffic_rows}"
        )
    record = {"passed": not failures, "failures": failures, "expectations": [o.words() for o in outcomes]}
    job.write(run_id, "validate", {"result.json": record})
    if failures:
        reason = f"the dataset fails {len(failures)} expectation(s): " + "; ".join(failures)
        job.fail(run_id, "validate", reason)
        raise CandidateRefused(reason + "; nothing is registered")
    progress(f"    {len(outcomes)} expectations hold")
    return {"model": model, "run_id": run_id, "passed": True, "expectations": len(outcomes)}


def step_train(
    settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    from retraining.train import device, encode, fit, save_module, split, targets, transformer_spec

    job = Retraining(settings, model, trigger_key, overrides)
    run_id = job.run().info.run_id
    dataset = job.dataset(run_id)
    parent = job.read_json(run_id, "parent/transformer.json")
    config = job.config
    splits = split(dataset.frame[SOURCE].tolist(), config)
    frame = dataset.frame
    train_rows, val_rows = frame.iloc[splits.train], frame.iloc[splits.val]
    categorical = [f["name"] for f in parent["features"] if f["type"] == "categorical"]
    spec = transformer_spec(train_rows, dataset.features, dataset.label, categorical)
    learnt = spec["output"]["labels"]  # and the parent's labels this data lacks: the output keeps them all
    spec["output"]["labels"] = [*learnt, *(label for label in parent["labels"] if label not in learnt)]
    classes = len(spec["output"]["labels"])
    transformer = Transformer.from_spec(spec)
    progress(
        f"[3/7] train: {len(splits.train)} rows, {len(splits.val)} for early stopping, {len(splits.test)} held out,"
        f" {len(splits.recent)} recent; an MLP {list(config.hidden)} on {device()}, seed {config.seed}"
    )
    x_train, x_val = encode(transformer, train_rows), encode(transformer, val_rows)
    module, history = fit(
        x_train,
        targets(transformer, train_rows[dataset.label]),
        x_val,
        targets(transformer, val_rows[dataset.label]),
        classes,
        config,
        progress,
    )
    with tempfile.TemporaryDirectory(dir=job._scratch.name) as tmp:
        architecture = {"width": int(x_train.shape[1]), "hidden": list(config.hidden), "classes": classes}
        save_module(module, architecture, Path(tmp))
        job.write(run_id, "train", {"weights.pt": Path(tmp) / "weights.pt", "architecture.json": architecture,
                                    "transformer.json": spec, "splits.json": splits.to_dict(), "history.json": history})  # fmt: skip
    for item in history["per_epoch"]:
        job.client.log_metric(run_id, "val_loss", item["val_loss"], step=item["epoch"])
        job.client.log_metric(run_id, "train_loss", item["train_loss"], step=item["epoch"])
    for key, value in {
        **config.to_dict(),
        "device": history["device"],
        "epochs_run": history["epochs"],
    }.items():
        job.client.log_param(run_id, key, json.dumps(value) if isinstance(value, list) else value)
    return {
        "model": model,
        "run_id": run_id,
        **{k: history[k] for k in ("device", "epochs", "best_epoch", "best_val_loss", "seconds")},
    }


def step_export(
    settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    from retraining.train import encode, export_onnx, load_module, parity

    job = Retraining(settings, model, trigger_key, overrides)
    run_id = job.run().info.run_id
    dataset = job.dataset(run_id)
    spec = job.read_json(run_id, "train/transformer.json")
    splits = job.read_json(run_id, "train/splits.json")
    module, architecture = load_module(job.read(run_id, "train"))
    rows = dataset.frame.iloc[splits["test"] + splits["recent"]]
    x = encode(Transformer.from_spec(spec), rows)
    progress(f"[4/7] export: ONNX (opset 17), then ONNX Runtime against PyTorch on {len(x)} held-out rows")
    with tempfile.TemporaryDirectory(dir=job._scratch.name) as tmp:
        path = export_onnx(module, architecture["width"], Path(tmp) / "model.onnx")
        check = parity(path, module, x, job.config.parity_atol)
        job.write(run_id, "export", {"model.onnx": path, "parity.json": check})
    words = (
        f"largest probability difference {check.get('max_abs_diff', float('nan')):.3g} (at most {check['atol']:.3g}),"
        f" best class agreeing on {check.get('argmax_agreement', 0):.1%} of {check['rows']} rows"
    )
    if not check["passed"]:
        reason = f"the ONNX export disagrees with PyTorch: {words}"
        job.fail(run_id, "export", reason)
        raise CandidateRefused(reason + "; nothing is registered")
    progress(f"    parity: {words}")
    job.client.log_metric(run_id, "parity_max_abs_diff", check["max_abs_diff"])
    return {"model": model, "run_id": run_id, "parity": check}


def step_evaluate(
    settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    from retraining.train import encode, metrics, onnx_probabilities

    job = Retraining(settings, model, trigger_key, overrides)
    run = job.run()
    run_id = run.info.run_id
    dataset = job.dataset(run_id)
    spec = job.read_json(run_id, "train/transformer.json")
    splits = job.read_json(run_id, "train/splits.json")
    onnx_path = job.read(run_id, "export/model.onnx")
    sets = {"held_out": dataset.frame.iloc[splits["test"]], "recent": dataset.frame.iloc[splits["recent"]]}
    parent = run.data.tags.get("mlops.parent_version")
    models = {"candidate": (onnx_path, Transformer.from_spec(spec))}
    if parent:
        bundle = job.bundle(parent)
        if bundle.flavor != "onnx" or bundle.transformer is None:
            raise ConfigError(
                f"the champion, version {parent}, is not an ONNX model with a transformer spec: it cannot be scored here"
            )
        models["champion"] = (bundle.model_file, bundle.transformer)
    who = (
        f"the candidate and the champion (version {parent})" if parent else "the candidate (no champion yet)"
    )
    progress(
        f"[5/7] evaluate: {who} on {len(sets['held_out'])} held-out and {len(sets['recent'])} recent rows"
    )
    result: dict[str, dict[str, Any]] = {"candidate": {}, "champion": {}}
    for role, (model_file, transformer) in models.items():
        for name, rows in sets.items():
            result[role][name] = (
                metrics(
                    onnx_probabilities(model_file, encode(transformer, rows)),
                    rows[dataset.label],
                    transformer.labels,
                )
                if len(rows)
                else {"rows": 0}
            )
    for who, by_set in result.items():
        for name, figures in by_set.items():
            for metric, value in figures.items():
                if metric != "rows":
                    job.client.log_metric(run_id, f"{who}_{name}_{metric}", value)
            if figures.get("rows"):
                progress(
                    f"    {who} on {name}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "rows")
                    + f" ({figures['rows']} rows)"
                )
    job.write(run_id, "evaluate", {"metrics.json": result})
    return {"model": model, "run_id": run_id, "parent": parent, "metrics": result}


def step_register(
    settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    import mlflow
    import onnx
    import pandas as pd

    from monitoring.profile import build_profile, store_profile
    from serving.transformer import METADATA_KEY

    job = Retraining(settings, model, trigger_key, overrides)
    run = job.run()
    run_id, tags = run.info.run_id, run.data.tags
    version = tags.get(VERSION_TAG)
    if not version:  # registered, and the run's tag lost: the same version, tagged again
        already = job.client.search_model_versions(
            f"name = '{_quoted(model)}' and tags.`{TRIGGER_TAG}` = '{_quoted(trigger_key)}'"
        )
        if already:
            version = str(already[0].version)
            job.client.set_tag(run_id, VERSION_TAG, version)
    if version:
        progress(f"[6/7] register: the trigger's candidate is version {version} already")
        return {"model": model, "run_id": run_id, "version": version, "registered": False,
                "links": {"version": job.version_url(version)}}  # fmt: skip
    dataset = job.dataset(run_id)
    spec = job.read_json(run_id, "train/transformer.json")
    splits = job.read_json(run_id, "train/splits.json")
    evaluation = job.read_json(run_id, "evaluate/metrics.json")
    graph = onnx.load(str(job.read(run_id, "export/model.onnx")))
    example = dataset.frame.iloc[splits["test"][:3]][list(dataset.features)].reset_index(drop=True)
    progress(
        f"[6/7] register: '{model}' in MLflow with signature, input example, transformer spec and lineage"
    )
    mlflow.set_tracking_uri(settings.mlflow_url)
    # The run's own experiment (in a process that set another one before, fluent MLflow refuses).
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            graph, name="model", signature=signature(spec), input_example=example,
            registered_model_name=model, metadata={METADATA_KEY: spec},
            onnx_execution_providers=["CPUExecutionProvider"],  # MLflow's own check of the example
        )  # fmt: skip
    version = str(info.registered_model_version)
    candidate = evaluation["candidate"]
    lineage = {
        TRIGGER_TAG: trigger_key,
        "mlops.parent_version": tags.get("mlops.parent_version", ""),
        "mlops.trigger_reason": tags.get("mlops.trigger_reason", ""),
        "mlops.monitor_run": tags.get("mlops.monitor_run", ""),
        "mlops.monitor_report": tags.get("mlops.monitor_report", ""),
        "mlops.dataset_sha256": dataset.sha256,
        "mlops.dataset_rows": json.dumps(dataset.rows_by_source),
        DATASET_TAG: f"runs:/{run_id}/dataset",
        "mlops.code_version": tags.get("mlops.code_version") or code_version(),
        "mlops.retrain_run": run_id,
        **{f"mlops.metric.{name}.{metric}": f"{value:.6g}" for name, figures in candidate.items() for metric, value in figures.items() if metric != "rows"},
    }  # fmt: skip
    for key, value in lineage.items():
        if value:
            job.client.set_model_version_tag(model, version, key, value)
    job.client.update_model_version(
        model, version, description=_description(tags, dataset, candidate, evaluation.get("champion") or {})
    )
    train_rows = dataset.frame.iloc[splits["train"]]
    profile = build_profile(model, version, pd.DataFrame(train_rows[[*dataset.features, dataset.label]]), label=dataset.label,
                            source=f"the training split of dataset {dataset.sha256[:16]} (retraining run {run_id})")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=job._scratch.name) as tmp:
        stored = store_profile(profile, settings.mlflow_url, settings.monitor.experiment, Path(tmp))
    job.client.set_tag(run_id, VERSION_TAG, version)
    progress(f"    version {version}, profile {stored['uri']}")
    return {"model": model, "run_id": run_id, "version": version, "registered": True, "lineage": lineage,
            "profile": stored, "links": {"version": job.version_url(version)}}  # fmt: skip


def signature(spec: Mapping[str, Any]) -> Any:
    """The MLflow signature of a version with a transformer: named raw features in, probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema(
        [ColSpec("double" if f["type"] == "numeric" else "string", f["name"]) for f in spec["features"]]
    )
    outputs = Schema(
        [TensorSpec(np.dtype(np.float32), (-1, len(spec["output"]["labels"])), spec["output"]["name"])]
    )
    return ModelSignature(inputs, outputs)


def _description(
    tags: Mapping[str, str], dataset: Dataset, candidate: Mapping[str, Any], champion: Mapping[str, Any]
) -> str:
    def figures(by_set: Mapping[str, Any]) -> str:
        return "; ".join(
            f"{name}: accuracy {f['accuracy']:.3f}" for name, f in by_set.items() if f.get("rows")
        )

    parent = tags.get("mlops.parent_version")
    lines = [
        f"Retrained from version {parent}" if parent else "First version",
        f"trigger: {tags.get('mlops.trigger_reason') or tags.get(TRIGGER_TAG, '')}"[:600],
        f"dataset: {len(dataset.frame)} rows {dataset.rows_by_source}, sha256 {dataset.sha256[:16]}",
        f"candidate: {figures(candidate)}",
    ]
    if champion:
        lines.append(f"champion (version {parent}): {figures(champion)}")
    return "\n".join(lines)


def step_approve(
    settings: Settings, model: str, trigger_key: str, overrides: Mapping[str, Any] | None, progress: Progress
) -> dict[str, Any]:
    job = Retraining(settings, model, trigger_key, overrides)
    run = job.run()
    run_id, version = run.info.run_id, run.data.tags.get(VERSION_TAG)
    if not version:
        raise ConfigError(
            f"the retraining run for trigger '{trigger_key}' has registered nothing: run `mlops retrain register` first"
        )
    evaluation = job.read_json(run_id, "evaluate/metrics.json")
    approved, reason = decide(evaluation, job.config)
    progress(f"[7/7] approve: {reason}")
    alias = None
    if approved:
        from serving.policy import load_policy

        alias = load_policy(settings.deploy.models_file, model).approval.alias or "challenger"
        job.client.set_registered_model_alias(model, alias, version)
        decision = "approved"
    else:
        decision = "needs_review"
    job.client.set_model_version_tag(model, version, "mlops.approval", decision)
    job.client.set_model_version_tag(model, version, "mlops.approval_reason", reason[:5000])
    job.client.set_tag(run_id, "mlops.approval", decision)
    job.client.set_terminated(run_id, "FINISHED")
    summary = (
        f"version {version}: approved by policy, alias '{alias}' set; the deploy DAG takes it through the canary"
        if approved
        else f"version {version}: left for a person: {reason}. To deploy it, set the alias 'challenger' on it in the MLflow UI"
    )
    return {"model": model, "run_id": run_id, "version": version, "decision": decision, "alias": alias,
            "reason": reason, "summary": summary, "links": {"version": job.version_url(version)}}  # fmt: skip


def decide(evaluation: Mapping[str, Any], config: RetrainConfig) -> tuple[bool, str]:
    """The policy: ``approve: auto`` and the candidate's metric on the recent window past the
    champion's by ``margin`` (or the held-out data's, without recent rows), and on the held-out
    data no worse than the champion's by more than ``held_out_tolerance``."""
    metric, sign = config.metric, 1.0 if config.higher_is_better else -1.0
    candidate, champion = evaluation["candidate"], evaluation.get("champion") or {}
    if not champion:
        return False, "no champion to compare with: a first version is approved by a person"
    basis = (
        "recent"
        if candidate.get("recent", {}).get("rows") and champion.get("recent", {}).get("rows")
        else "held_out"
    )
    gain = sign * (candidate[basis][metric] - champion[basis][metric])
    held = sign * (candidate["held_out"][metric] - champion["held_out"][metric])
    figures = (
        f"{metric} on the {basis.replace('_', '-')} rows {candidate[basis][metric]:.4f} against the champion's"
        f" {champion[basis][metric]:.4f} (margin {config.margin}); held-out {candidate['held_out'][metric]:.4f}"
        f" against {champion['held_out'][metric]:.4f}"
    )
    if gain < config.margin:
        return False, f"the candidate does not beat the champion by the margin: {figures}"
    if held < -config.held_out_tolerance:
        return (
            False,
            f"the candidate is worse on the held-out rows by more than {config.held_out_tolerance}: {figures}",
        )
    if config.approve == "manual":
        return False, f"the candidate beats the champion, and this model's approval is manual: {figures}"
    return True, f"the candidate beats the champion: {figures}"


def code_version() -> str:
    """This package's version, and the git commit it runs from when it runs from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("mlops")
    except PackageNotFoundError:
        __version__ = "unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return __version__
    return (
        f"{__version__}+g{commit.stdout.strip()}"
        if commit.returncode == 0 and commit.stdout.strip()
        else __version__
    )


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")


def train_first(
    settings: Settings,
    model: str,
    frame: Any,
    label: str,
    source: str,
    overrides: Mapping[str, Any] | None,
    progress: Progress,
) -> dict[str, Any]:
    """A model's first version, through the same steps (no parent: nothing to compare it with, so
    it is registered and left for a person to approve). Run again on the same data, it registers
    nothing new: the data's hash is its trigger."""
    from monitoring.profile import column_kind

    if label not in frame.columns:
        raise InvalidInput(f"--label: the data has no column '{label}' (it has {list(frame.columns)[:20]})")
    # A first version has no traffic: the model's minimum of labelled traffic is for retraining.
    overrides = {**(overrides or {}), "label": label, "min_traffic_rows": 0}
    dataset = assemble(frame, frame.iloc[0:0], label)
    trigger = Trigger(key=f"first:{dataset.sha256}", reason=f"first version, trained on {source}")
    job = Retraining(settings, model, trigger.key, overrides)
    existing = job.find_run()
    if existing is not None and existing.data.tags.get(VERSION_TAG):
        version = existing.data.tags[VERSION_TAG]
        progress(f"these rows trained version {version} already: nothing to do")
        return {"model": model, "version": version, "registered": False, "run_id": existing.info.run_id,
                "links": {"version": job.version_url(version)}}  # fmt: skip
    kinds = {name: column_kind(dataset.frame[name]) for name in dataset.features}
    summary = {**dataset.summary(), "kinds": kinds, "parent": None, "source": source}
    labels = sorted({str(v) for v in dataset.frame[label]})
    spec = {"features": [{"name": n, "type": k} for n, k in kinds.items()], "labels": labels}
    progress(f"[1/7] dataset: {len(dataset.frame)} rows of {source}; sha256 {dataset.sha256[:16]}")
    run_id = open_run(job, trigger, existing, dataset, summary, spec, None)
    steps = {"dataset": {"run_id": run_id, **{k: summary[k] for k in ("rows", "rows_by_source", "sha256")}}}
    for name, step in (("validate", step_validate), ("train", step_train), ("export", step_export),
                       ("evaluate", step_evaluate), ("register", step_register)):  # fmt: skip
        steps[name] = step(settings, model, trigger.key, overrides, progress)
    version = steps["register"]["version"]
    job.client.set_tag(run_id, "mlops.approval", "needs_review")
    job.client.set_terminated(run_id, "FINISHED")
    return {"model": model, "version": version, "registered": True, "run_id": run_id, "trigger": trigger.key,
            "metrics": steps["evaluate"]["metrics"]["candidate"], "parity": steps["export"]["parity"],
            "training": steps["train"], "links": {"version": job.version_url(version)}}  # fmt: skip
