"""The per-model rollout policy: defaults, a model's own entry, a run's params; errors name the key."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from serving.policy import Ramp, Scaling, load_policy
from tests.conftest import PROJECT_ROOT


def write(tmp_path, text: str):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_a_model_changes_the_defaults_and_a_run_changes_both(tmp_path):
    path = write(
        tmp_path,
        """
defaults:
  ramp: {initial_percent: 10, steps: [30, 60], min_requests: 200}
  thresholds: {js_max: 0.3}
models:
  fraud:
    ramp: {steps: [50]}
    target: kserve://ml
""",
    )
    fraud = load_policy(path, "fraud", {"ramp": {"min_requests": 20, "max_step_s": None}})
    assert fraud.ramp.percents == (10, 50)
    assert fraud.ramp.min_requests == 20 and fraud.ramp.max_step_s == Ramp.max_step_s
    assert (
        fraud.thresholds.js_max == 0.3 and fraud.thresholds.min_requests == 20
    )  # decided on what it waits for
    assert fraud.target == "kserve://ml" and fraud.source == str(path)
    other = load_policy(path, "other")
    assert other.ramp.percents == (10, 30, 60) and other.target is None


def test_the_committed_models_file_is_valid_for_every_model_it_names():
    path = PROJECT_ROOT / "config" / "models.yaml"
    assert load_policy(path, "demo-fraud").ramp.percents == (10, 50)
    assert load_policy(path, "any-model").ramp.percents == (5, 25, 50)
    assert load_policy(path, "any-model").scaling == Scaling()  # the file's defaults are the built-in ones


def test_a_model_scales_as_its_entry_says(tmp_path):
    path = write(
        tmp_path, "models: {fraud: {scaling: {min_replicas: 0, scale_metric: rps, scale_target: 50}}}"
    )
    scaling = load_policy(path, "fraud").scaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.scale_metric, scaling.scale_target) == (
        0, 3, "rps", 50,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("defaults: {ramp: {min_request: 5}}", "unknown key(s) ['min_request'] in 'ramp'"),
        ("defaults: {canary: {}}", "unknown key 'canary'"),
        ("defaults: {ramp: {steps: [50, 25]}}", "ramp percents must rise"),
        ("defaults: {ramp: {steps: [50, 100]}}", "100 is the promotion"),
        ("defaults: {ramp: {insufficient: hold}}", "rollback or fail"),
        ("defaults: {thresholds: {min_requests: 5}}", "unknown key(s) ['min_requests'] in 'thresholds'"),
        ("defaults: {approval: {alias: null, tag: null}}", "no signal is enabled"),
        ("model: {}", "expected the keys 'defaults' and 'models' only"),
        ("defaults: {scaling: {min_replicas: 4}}", "need 0 <= scaling.min_replicas <= scaling.max_replicas"),
        ("defaults: {scaling: {scale_metric: gpu}}", "concurrency, rps, cpu or memory, got 'gpu'"),
        ("defaults: {scaling: {scale_metric: cpu, scale_target: 400}}", "scale_target of cpu is a percent"),
        ("defaults: {scaling: {container_concurrency: -1}}", "container_concurrency must be 0"),
        ("defaults: {scaling: {replicas: 2}}", "unknown key(s) ['replicas'] in 'scaling'"),
    ],
)
def test_a_bad_policy_is_refused_naming_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ConfigError, match="models.yaml") as caught:
        load_policy(write(tmp_path, text), "m")
    assert message in str(caught.value)


def test_without_a_file_the_built_in_defaults_apply(tmp_path):
    policy = load_policy(tmp_path / "absent.yaml", "m")
    assert policy.source == "built-in defaults" and policy.approval.alias == "challenger"
