"""Per-model rollout policy: which approvals count, how the canary ramps, what fails it.

One version-controlled YAML file (``MLOPS_DEPLOY__MODELS_FILE``, default ``config/models.yaml``)
holds ``defaults`` and, under ``models``, what a model changes of them. The deploy commands read
it; the ``deploy_model`` DAG shows the defaults in its trigger form; a DAG run's params override
it for that run only. A key the file does not know is an error naming the file and the key, never
a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from common.errors import ConfigError
from common.settings import read_models_file
from serving.canary import Thresholds

Insufficient = Literal["rollback", "fail"]


@dataclass(frozen=True)
class Approval:
    """What marks a registered version approved for production (any one of them)."""

    alias: str | None = "challenger"  # the MLflow 3 way
    tag: str | None = "approval=approved"  # key=value on the version
    legacy_stage: bool = False  # the deprecated `Staging` stage counts too

    @property
    def tag_pair(self) -> tuple[str, str] | None:
        if not self.tag:
            return None
        key, _, value = self.tag.partition("=")
        return key, value


@dataclass(frozen=True)
class Ramp:
    """The canary's steps: each holds until it has ``min_requests`` canary requests and
    ``min_step_s`` seconds, then is decided; ``max_step_s`` without enough requests is
    ``insufficient``, which rolls back or fails the run (``insufficient``), never promotes."""

    initial_percent: float = 5.0
    steps: tuple[float, ...] = (25.0, 50.0)  # after the initial one; 100 % is the promotion itself
    min_requests: int = 100
    min_step_s: float = 60.0
    max_step_s: float = 900.0
    insufficient: Insufficient = "rollback"
    poke_s: float = 15.0  # how often the DAG's ramp sensor looks

    @property
    def percents(self) -> tuple[float, ...]:
        return (self.initial_percent, *self.steps)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Ramp:
        """From a mapping (the file's, or a record's JSON), its steps a list or a tuple."""
        return cls(**{**values, "steps": tuple(values.get("steps", cls.steps))})


ScaleMetric = Literal["concurrency", "rps", "cpu", "memory"]
# Where a kserve:// target runs a version's predictor: this project's runtime image, or KServe's
# Triton runtime (serving/targets/triton.py).
Runtime = Literal["mlops", "triton"]


@dataclass(frozen=True)
class Scaling:
    """How a model's InferenceService grows with load (the KServe target; the predictor and the
    transformer alike). ``min_replicas: 0`` scales to zero when idle: the next request then waits
    for a pod to be scheduled, the version downloaded and loaded. ``scale_target`` None: the
    dynamic batcher's batch size (a replica fills a batch before another is added)."""

    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: ScaleMetric = "concurrency"
    scale_target: int | None = None
    container_concurrency: int = 0  # requests one replica takes at once (0: no limit)


@dataclass(frozen=True)
class Policy:
    model: str
    approval: Approval = Approval()
    ramp: Ramp = Ramp()
    thresholds: Thresholds = Thresholds()
    scaling: Scaling = Scaling()
    target: str | None = None  # default: MLOPS_SERVING__TARGET, else the stack's model server
    runtime: Runtime = "mlops"
    source: str = "built-in defaults"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "approval": Approval,
    "ramp": Ramp,
    "thresholds": Thresholds,
    "scaling": Scaling,
}


def load_policy(path: Path, model: str, overrides: dict[str, dict[str, Any]] | None = None) -> Policy:
    """The model's policy: the file's defaults, the model's own entry, then ``overrides`` (a run's
    params: ``{"ramp": {"min_requests": 20}}``; there a None leaves the setting as it is)."""
    data = read_models_file(path)
    layers = [data.get("defaults") or {}, (data.get("models") or {}).get(model) or {}, overrides or {}]
    merged: dict[str, Any] = {}
    for number, layer in enumerate(layers):
        where = f"{path}" if number < 2 else "the run's params"
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: a model's entry must be a mapping, got {layer!r}")
        for key, value in layer.items():
            if key in ("target", "runtime"):
                if value is not None:
                    merged[key] = str(value)
                continue
            if key in ("monitor", "retrain"):  # their own domains read and check these sections
                continue
            if key not in _SECTIONS:
                raise ConfigError(
                    f"{where}: unknown key '{key}' (known: {', '.join([*_SECTIONS, 'target', 'runtime', 'monitor', 'retrain'])})"
                )
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
            known = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            if key == "thresholds":
                known.discard("min_requests")  # a step waits for the ramp's own minimum
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown} in '{key}' (known: {sorted(known)})")
            # In the file a null is a value (no alias); in a run's params it means "as configured".
            merged.setdefault(key, {}).update({k: v for k, v in value.items() if v is not None or number < 2})
    try:
        ramp = Ramp.from_dict(merged.get("ramp", {}))
        policy = Policy(
            model=model,
            approval=Approval(**merged.get("approval", {})),
            ramp=ramp,
            # a step waits for the ramp's minimum of requests, and is decided on the same
            thresholds=Thresholds(**merged.get("thresholds", {}), min_requests=ramp.min_requests),
            scaling=Scaling(**merged.get("scaling", {})),
            target=merged.get("target"),
            runtime=merged.get("runtime", "mlops"),  # type: ignore[arg-type]  # checked below
            source=str(path) if path.is_file() else "built-in defaults",
        )
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    _check(policy, path)
    return policy


def _check(policy: Policy, path: Path) -> None:
    ramp, t = policy.ramp, policy.thresholds
    percents = ramp.percents
    problems = []
    if not all(0 < p < 100 for p in percents):
        problems.append(
            f"ramp percents must be above 0 and below 100 (100 is the promotion), got {list(percents)}"
        )
    if list(percents) != sorted(set(percents)):
        problems.append(f"ramp percents must rise, got {list(percents)}")
    if ramp.min_requests < 1:
        problems.append(f"ramp.min_requests must be at least 1, got {ramp.min_requests}")
    if not 0 <= ramp.min_step_s <= ramp.max_step_s:
        problems.append(
            f"need 0 <= ramp.min_step_s <= ramp.max_step_s, got {ramp.min_step_s}, {ramp.max_step_s}"
        )
    if ramp.insufficient not in ("rollback", "fail"):
        problems.append(f"ramp.insufficient must be rollback or fail, got {ramp.insufficient!r}")
    if ramp.poke_s <= 0:
        problems.append(f"ramp.poke_s must be positive, got {ramp.poke_s}")
    if (
        not 0 < t.alpha < 1
        or t.error_margin < 0
        or t.p95_ratio_max <= 0
        or t.p95_margin_ms < 0
        or not 0 < t.js_max <= 1
    ):
        problems.append(f"thresholds out of range: {dataclasses.asdict(t)}")
    scale = policy.scaling
    if not 0 <= scale.min_replicas <= scale.max_replicas or scale.max_replicas < 1:
        problems.append(
            f"need 0 <= scaling.min_replicas <= scaling.max_replicas, 1 <= max_replicas;"
            f" got {scale.min_replicas}, {scale.max_replicas}"
        )
    if scale.scale_metric not in get_args(ScaleMetric):
        problems.append(
            f"scaling.scale_metric must be {', '.join(get_args(ScaleMetric)[:-1])} or"
            f" {get_args(ScaleMetric)[-1]}, got {scale.scale_metric!r}"
        )
    if scale.scale_target is not None and scale.scale_target < 1:
        problems.append(f"scaling.scale_target must be at least 1, got {scale.scale_target}")
    if (
        scale.scale_metric in ("cpu", "memory")
        and scale.scale_target is not None
        and scale.scale_target > 100
    ):
        problems.append(
            f"scaling.scale_target of {scale.scale_metric} is a percent, got {scale.scale_target}"
        )
    if scale.container_concurrency < 0:
        problems.append(
            f"scaling.container_concurrency must be 0 (no limit) or more, got {scale.container_concurrency}"
        )
    if policy.runtime not in get_args(Runtime):
        problems.append(f"runtime must be {' or '.join(get_args(Runtime))}, got {policy.runtime!r}")
    if not policy.approval.alias and not policy.approval.tag and not policy.approval.legacy_stage:
        problems.append("approval: no signal is enabled (alias, tag or legacy_stage)")
    if problems:
        raise ConfigError(f"rollout policy of model '{policy.model}' ({path}): " + "; ".join(problems))
