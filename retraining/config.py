"""A model's retraining settings: ``retrain`` in config/models.yaml (defaults, then the model's, then
a run's params).

They say what the dataset is made of, how the candidate is trained and checked, what it is
compared on and when it is approved without a person.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.settings import models_file_section

METRICS = ("accuracy", "macro_f1", "log_loss")  # log_loss: lower is better
APPROVALS = ("auto", "manual")
STEPS = ("dataset", "validate", "train", "export", "evaluate", "register", "approve")  # the DAG's, in order


@dataclass(frozen=True)
class RetrainConfig:
    label: str = "label"  # the label column: of the training data, and the feedback's labels
    window: str = "7d"  # labelled traffic this far back from the trigger's window end
    recent_share: float = 0.25  # the newest labelled traffic, kept out of training: the recent window
    max_reference_rows: int = 200_000  # the parent's training rows kept (the newest)
    min_rows: int = 200  # a dataset with fewer rows fails validation
    min_traffic_rows: int = 0  # and one with fewer labelled traffic rows than this
    val_share: float = 0.15  # of the rows for training: the early-stopping split
    test_share: float = 0.15  # and the held-out split both models are evaluated on
    seed: int = 0
    hidden: tuple[int, ...] = (64,)  # the MLP's hidden layers
    epochs: int = 200  # at most
    patience: int = 10  # epochs without a better validation loss before training stops
    batch_size: int = 64
    learning_rate: float = 0.003
    weight_decay: float = 0.0001
    parity_atol: float = 0.0001  # ONNX Runtime and PyTorch probabilities differ by at most this
    metric: str = "accuracy"  # what approval compares: accuracy, macro_f1 or log_loss
    margin: float = 0.02  # the candidate beats the champion by this on the recent window
    held_out_tolerance: float = 0.02  # and is at most this much worse on the held-out data
    approve: str = "auto"  # auto: the challenger alias when it wins; manual: a person decides
    enabled: bool = True  # the DAG is scheduled on this model's drift events

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}

    @property
    def window_ms(self) -> int:
        from monitoring.checks import parse_duration

        return parse_duration(self.window, "retrain window")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "log_loss"


def load_retrain_config(
    path: Path, model: str | None, overrides: Mapping[str, Any] | None = None
) -> RetrainConfig:
    known = {f.name for f in dataclasses.fields(RetrainConfig)}
    merged = models_file_section(path, "retrain", known, model, dict(overrides or {}))
    if "hidden" in merged:
        hidden = merged["hidden"]
        if isinstance(hidden, int | str):
            hidden = [hidden] if isinstance(hidden, int) else [h for h in str(hidden).split(",") if h.strip()]
        try:
            merged["hidden"] = tuple(int(h) for h in hidden)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{path}: retrain hidden must be a list of layer widths, got {hidden!r}"
            ) from None
    try:
        config = RetrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"{path}: 'retrain': {exc}") from exc
    problems = []
    if config.metric not in METRICS:
        problems.append(f"metric must be one of {', '.join(METRICS)}, got {config.metric!r}")
    if config.approve not in APPROVALS:
        problems.append(f"approve must be one of {', '.join(APPROVALS)}, got {config.approve!r}")
    if not 0 <= config.recent_share < 1 or not 0 < config.val_share < 0.5 or not 0 < config.test_share < 0.5:
        problems.append("recent_share in [0, 1), val_share and test_share in (0, 0.5)")
    if config.epochs < 1 or config.patience < 1 or config.batch_size < 1 or config.learning_rate <= 0:
        problems.append("epochs, patience and batch_size at least 1, learning_rate above 0")
    if not config.hidden or min(config.hidden) < 1:
        problems.append(f"hidden must list positive layer widths, got {list(config.hidden)}")
    if config.parity_atol < 0 or config.min_rows < 1:
        problems.append("parity_atol at least 0 and min_rows at least 1")
    if problems:
        raise ConfigError(f"{path}: retrain settings: {'; '.join(problems)}")
    config.window_ms  # noqa: B018 - checked here, once
    return config
