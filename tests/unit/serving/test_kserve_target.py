"""The InferenceService objects the kserve target applies, checked as the cluster would get them."""

from __future__ import annotations

import json
import time
from unittest.mock import MagicMock

import pytest
from kserve import KServeClient
from kubernetes.client.rest import ApiException

from common.errors import InvalidInput, LeaseHeld, ModelNotFound
from common.settings import KServeSettings
from serving.targets import VersionRef
from serving.targets.kserve import (
    RUNTIME,
    TENSOR_RUNTIME,
    KServeTarget,
    Rollout,
    inference_service,
    serving_runtimes,
    to_manifest,
)

V1 = VersionRef("1", "s3://models/fraud/1")
V2 = VersionRef("2", "s3://models/fraud/2")
SETTINGS = KServeSettings(
    image="registry.example/mlops-runtime:0.1.0", gpus=1, logger_url="http://logger.mlops/events"
)


class FakeCluster:
    """KServeClient's get/create/replace over a dict, as MagicMock(spec=KServeClient)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.client = MagicMock(spec=KServeClient)
        self.client.get.side_effect = self.get
        self.client.create.side_effect = lambda isvc, namespace: self.store(isvc)
        self.client.replace.side_effect = lambda name, isvc, namespace: self.replace(name, isvc)
        self.writes = 0

    def get(self, name, namespace):
        if name not in self.objects:
            try:
                raise ApiException(status=404, reason="Not Found")
            except ApiException as exc:
                raise RuntimeError(f"Exception when calling CustomObjectsApi: {exc}")  # noqa: B904 (as the SDK does)
        return self.objects[name]

    def store(self, isvc):
        manifest = to_manifest(isvc)
        self.writes += 1
        manifest["metadata"]["resourceVersion"] = str(self.writes)  # as the API server sets it
        self.objects[manifest["metadata"]["name"]] = manifest
        return manifest

    def replace(self, name, isvc):
        # The API server refuses a replace whose resourceVersion is not the stored one (409).
        sent = to_manifest(isvc)["metadata"].get("resourceVersion")
        if sent is not None and sent != self.objects[name]["metadata"]["resourceVersion"]:
            try:
                raise ApiException(status=409, reason="Conflict")
            except ApiException as exc:
                raise RuntimeError(f"Exception when calling CustomObjectsApi: {exc}")  # noqa: B904
        return self.store(isvc)


def target(cluster: FakeCluster, transformer: bool = False, owner: str | None = None) -> KServeTarget:
    return KServeTarget(
        "ml", SETTINGS, client=cluster.client, has_transformer=lambda uri: transformer, owner=owner
    )


def predictor(manifest: dict) -> dict:
    return manifest["spec"]["predictor"]


def test_stable_only_inference_service():
    manifest = to_manifest(inference_service("fraud", "ml", Rollout(V1), SETTINGS))
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["namespace"] == "ml"
    spec = predictor(manifest)
    assert spec["model"]["storageUri"] == "s3://models/fraud/1"
    assert spec["model"]["modelFormat"] == {"name": "mlops"} and spec["model"]["runtime"] == RUNTIME
    assert spec["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["model"]["env"] == [{"name": "MLOPS_MODEL_VERSION", "value": "1"}]
    assert spec["logger"] == {"mode": "all", "url": "http://logger.mlops/events"}
    assert "canaryTrafficPercent" not in spec
    assert "transformer" not in manifest["spec"]
    # camelCase, no nulls: what a cluster accepts (kubernetes<37, see docs/ARCHITECTURE.md)
    assert "storage_uri" not in str(manifest) and "None" not in str(manifest)


def test_canary_rollout_sends_its_share_to_the_new_version():
    cluster = FakeCluster()
    kserve = target(cluster)
    kserve.deploy("fraud", "1", V1.uri, role="stable")
    kserve.deploy("fraud", "2", V2.uri)
    state = kserve.set_traffic("fraud", 10)
    spec = predictor(cluster.objects["fraud"])
    assert spec["model"]["storageUri"] == V2.uri
    assert spec["canaryTrafficPercent"] == 10
    assert (state.stable, state.canary, state.canary_percent) == (V1, V2, 10)
    notes = cluster.objects["fraud"]["metadata"]["annotations"]
    assert notes["mlops.io/stable-version"] == "1" and notes["mlops.io/canary-version"] == "2"
    assert cluster.client.create.call_count == 1 and cluster.client.replace.call_count == 2


def test_rollback_returns_to_the_stable_version_without_a_split():
    cluster = FakeCluster()
    kserve = target(cluster)
    kserve.deploy("fraud", "1", V1.uri, role="stable")
    kserve.deploy("fraud", "2", V2.uri)
    kserve.set_traffic("fraud", 25)
    state = kserve.rollback("fraud")
    manifest = cluster.objects["fraud"]
    assert predictor(manifest)["model"]["storageUri"] == V1.uri
    assert "canaryTrafficPercent" not in predictor(manifest)
    assert not any(key.startswith("mlops.io/canary") for key in manifest["metadata"]["annotations"])
    assert (state.stable, state.canary) == (V1, None)


def test_promote_makes_the_canary_stable_with_all_traffic():
    cluster = FakeCluster()
    kserve = target(cluster)
    kserve.deploy("fraud", "1", V1.uri, role="stable")
    kserve.deploy("fraud", "2", V2.uri)
    state = kserve.promote("fraud")
    assert (state.stable, state.canary) == (V2, None)
    assert predictor(cluster.objects["fraud"])["model"]["storageUri"] == V2.uri
    assert kserve.status("fraud").stable == V2


def test_a_version_with_a_transformer_gets_the_transformer_component():
    cluster = FakeCluster()
    target(cluster, transformer=True).deploy("fraud", "1", V1.uri, role="stable")
    manifest = cluster.objects["fraud"]
    assert predictor(manifest)["model"]["runtime"] == TENSOR_RUNTIME
    container = manifest["spec"]["transformer"]["containers"][0]
    assert container["image"] == SETTINGS.image
    assert container["args"] == ["--transformer", "--model_dir=/mnt/models"]
    assert {"name": "STORAGE_URI", "value": V1.uri} in container["env"]


def test_cpu_only_settings_request_no_gpu():
    manifest = to_manifest(inference_service("fraud", "ml", Rollout(V1), KServeSettings(gpus=0)))
    assert "nvidia.com/gpu" not in str(manifest)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.deploy("fraud", "3", "models:/fraud/3"), "cannot read MLflow URIs"),
        (lambda t: t.deploy("fraud", "3", "ftp://x/y"), "scheme 'ftp' is not one KServe can download"),
        (lambda t: t.deploy("Fraud_Model", "3", V1.uri), "not a valid InferenceService name"),
        (lambda t: t.set_traffic("fraud", 10, mode="shadow"), "no shadow mode"),
        (lambda t: t.set_traffic("fraud", 10), "no canary"),
        (lambda t: t.promote("fraud"), "no canary to promote"),
    ],
)
def test_what_the_target_refuses_changes_nothing(call, message):
    cluster = FakeCluster()
    kserve = target(cluster)
    kserve.deploy("fraud", "1", V1.uri, role="stable")
    before = dict(cluster.objects)
    with pytest.raises(InvalidInput, match=message):
        call(kserve)
    assert cluster.objects == before and cluster.client.replace.call_count == 0


def test_status_of_a_model_without_inference_service_is_not_found():
    with pytest.raises(ModelNotFound, match="no InferenceService in namespace 'ml'"):
        target(FakeCluster()).status("fraud")


def test_serving_runtimes_run_the_predictor_entry_with_and_without_the_transformer():
    runtimes = [to_manifest(r) for r in serving_runtimes(SETTINGS)]
    assert [r["metadata"]["name"] for r in runtimes] == [RUNTIME, TENSOR_RUNTIME]
    for runtime in runtimes:
        assert runtime["kind"] == "ClusterServingRuntime"
        container = runtime["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "serving.predictor"]
        assert "--model_name={{.Name}}" in container["args"]
        assert runtime["spec"]["supportedModelFormats"][0]["name"] == "mlops"
    assert "--no-transformer" in runtimes[1]["spec"]["containers"][0]["args"]


def test_committed_k8s_manifests_are_the_rendering_of_the_target_code():
    from serving.targets.kserve import render_manifests
    from tests.helpers import PROJECT_ROOT

    for name, text in render_manifests(KServeSettings()).items():
        committed = (PROJECT_ROOT / "docker" / "k8s" / name).read_text()
        assert committed == text, f"run: .venv/bin/mlops serve manifests --output-dir docker/k8s ({name})"


def test_a_lease_on_the_inference_service_lets_only_its_owner_change_the_model():
    cluster = FakeCluster()
    first, second = target(cluster, owner="run-a"), target(cluster, owner="run-b")
    first.deploy("fraud", "1", V1.uri, role="stable")
    first.deploy("fraud", "2", V2.uri)
    lease = first.take_lease("fraud", "run-a", 60, {"step": 0})
    assert (
        json.loads(cluster.objects["fraud"]["metadata"]["annotations"]["mlops.io/lease"])["owner"] == "run-a"
    )
    with pytest.raises(LeaseHeld, match="being rolled out by 'run-a'"):
        second.set_traffic("fraud", 50)
    with pytest.raises(LeaseHeld, match="run-a"):
        second.take_lease("fraud", "run-b", 60)
    assert first.set_traffic("fraud", 10).canary_percent == 10  # the owner changes it; the lease stays
    assert first.lease("fraud").record == {"step": 0} and first.lease("fraud").expires_at == lease.expires_at
    first.release_lease("fraud", "run-a")
    assert second.take_lease("fraud", "run-b", 60).owner == "run-b"


def test_a_lease_that_ran_out_is_taken_by_the_next_rollout():
    cluster = FakeCluster()
    first = target(cluster, owner="run-a")
    first.deploy("fraud", "1", V1.uri, role="stable")
    first.take_lease("fraud", "run-a", 0.05)
    time.sleep(0.1)
    assert target(cluster).lease("fraud").owner is None
    assert target(cluster, owner="run-b").take_lease("fraud", "run-b", 60).owner == "run-b"


def test_of_two_writers_racing_the_cluster_refuses_the_stale_one():
    cluster = FakeCluster()
    kserve = target(cluster)
    kserve.deploy("fraud", "1", V1.uri, role="stable")
    kserve.deploy("fraud", "2", V2.uri)
    stale = cluster.objects["fraud"]
    fresh = dict(stale, metadata=dict(stale["metadata"], resourceVersion="999"))
    cluster.objects["fraud"] = fresh  # someone else wrote after this target read `stale`
    with pytest.raises(LeaseHeld, match="another writer"):
        kserve._apply("fraud", kserve_rollout(stale), stale)


def kserve_rollout(manifest: dict) -> Rollout:
    notes = manifest["metadata"]["annotations"]
    return Rollout(VersionRef(notes["mlops.io/stable-version"], notes["mlops.io/stable-uri"]))
