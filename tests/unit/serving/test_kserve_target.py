"""The InferenceService objects the kserve target applies, checked as the cluster would get them."""

from __future__ import annotations

import json
import os
import time
from unittest.mock import MagicMock

import pytest
from kserve import KServeClient
from kubernetes.client.rest import ApiException

from common.errors import InvalidInput, LeaseHeld, ModelNotFound
from common.settings import KServeSettings, LogsSettings
from serving.targets import VersionRef
from serving.targets.kserve import (
    RECEIVER,
    RUNTIME,
    TENSOR_RUNTIME,
    KServeTarget,
    Rollout,
    cluster_settings,
    inference_service,
    log_receiver,
    runtime_steps,
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
    # The transformer logs (raw features, what monitoring reads); the predictor's tensors do not.
    assert manifest["spec"]["transformer"]["logger"] == {"mode": "all", "url": SETTINGS.logger_url}
    assert "logger" not in predictor(manifest)


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

    for name, text in render_manifests(KServeSettings(), LogsSettings()).items():
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


def by_kind(objects: list) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for manifest in map(to_manifest, objects):
        kinds.setdefault(manifest["kind"], []).append(manifest)
    return kinds


def test_inference_services_log_to_the_receivers_service_by_default():
    manifests = by_kind(log_receiver("ml", KServeSettings(), 8095, 1 << 30))
    service = next(s for s in manifests["Service"] if s["metadata"]["name"] == RECEIVER)
    isvc = to_manifest(inference_service("fraud", "ml", Rollout(V1), KServeSettings()))
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local/"
    assert predictor(isvc)["logger"] == {"mode": "all", "url": url}
    assert service["spec"]["ports"][0]["port"] == 80  # the URL names no port
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # a request and its response: one replica
    off = to_manifest(inference_service("fraud", "ml", Rollout(V1), KServeSettings(logger_url="")))
    assert "logger" not in predictor(off)


def test_the_receiver_runs_mlops_logs_receive_with_cluster_settings_and_no_file_but_its_spool(monkeypatch):
    from common.settings import load_settings
    from serving.logger.kserve import create_app

    manifests = by_kind(log_receiver("ml", KServeSettings(), 8095, 1 << 30))
    [workload] = manifests["StatefulSet"]
    pod = workload["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["mlops", "logs", "receive"]
    service = next(s for s in manifests["Service"] if s["metadata"]["name"] == RECEIVER)
    assert service["spec"]["selector"] == workload["spec"]["template"]["metadata"]["labels"]
    port = next(p for p in container["ports"] if p["name"] == service["spec"]["ports"][0]["targetPort"])
    routes = {
        (r.path, method) for r in create_app(MagicMock()).routes for method in getattr(r, "methods", ())
    }
    assert ("/", "POST") in routes and (container["readinessProbe"]["httpGet"]["path"], "GET") in routes
    # What the process reads: its env, then the namespace's ConfigMap; the Secret only by reference.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {"configMapRef": {"name": "mlops-settings"}} in container["envFrom"]
    assert {"secretRef": {"name": "mlops-secrets", "optional": True}} in container["envFrom"]
    for key in [k for k in os.environ if k.startswith("MLOPS_")]:
        monkeypatch.delenv(key)
    for key, value in {**to_manifest(cluster_settings("ml"))["data"], **env}.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.logs.receiver_port == port["containerPort"] == 8095
    assert settings.deployment_target == "kserve://ml" and settings.log_store_url.startswith(
        "elasticsearch://"
    )
    mount = container["volumeMounts"][0]
    assert str(settings.serving_dir).startswith(mount["mountPath"])  # the spool is on the claim
    assert workload["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == mount["name"]
    # It reads the InferenceServices (the version of each role), and nothing more.
    [role] = manifests["Role"]
    assert role["rules"] == [
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "list"]}
    ]
    [binding] = manifests["RoleBinding"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] == role["metadata"]["name"]


def test_the_steps_account_may_do_what_the_kserve_target_does_and_nothing_else():
    [role] = by_kind(runtime_steps("ml"))["Role"]
    [rule] = role["rules"]
    assert rule["resources"] == ["inferenceservices"]
    assert {"get", "create", "update"} <= set(rule["verbs"])  # _read, create, replace


def test_each_component_scales_as_the_models_policy_says_through_every_rollout_step():
    from serving.policy import Policy, Scaling

    cluster = FakeCluster()
    scaling = Scaling(
        min_replicas=0, max_replicas=8, scale_metric="rps", scale_target=40, container_concurrency=4
    )
    kserve = KServeTarget(
        "ml",
        SETTINGS,
        client=cluster.client,
        has_transformer=lambda uri: True,
        policy=lambda m: Policy(m, scaling=scaling),
    )
    expected = {
        "minReplicas": 0, "maxReplicas": 8, "scaleMetric": "rps", "scaleTarget": 40, "containerConcurrency": 4,
    }  # fmt: skip
    steps = (
        lambda: kserve.deploy("fraud", "1", V1.uri, role="stable"),
        lambda: kserve.deploy("fraud", "2", V2.uri),
        lambda: kserve.set_traffic("fraud", 50),
        lambda: kserve.promote("fraud"),
        lambda: kserve.deploy("fraud", "3", V2.uri),
        lambda: kserve.rollback("fraud"),
    )
    for step in steps:
        step()
        spec = cluster.objects["fraud"]["spec"]
        for component in ("predictor", "transformer"):
            assert {k: spec[component].get(k) for k in expected} == expected, component


def test_default_scaling_is_by_concurrency_up_to_the_batchers_batch_size():
    from common.settings import ServingSettings

    spec = predictor(to_manifest(inference_service("fraud", "ml", Rollout(V1), SETTINGS)))
    assert (spec["minReplicas"], spec["maxReplicas"], spec["scaleMetric"]) == (1, 3, "concurrency")
    assert spec["scaleTarget"] == ServingSettings().batch_max_rows
    assert "containerConcurrency" not in spec  # no limit


def test_the_kserve_target_reads_each_models_scaling_from_the_models_file(tmp_path):
    from common.settings import Settings
    from serving.targets import get_deployment_target

    models = tmp_path / "models.yaml"
    models.write_text("models: {fraud: {scaling: {min_replicas: 0, max_replicas: 5}}}")
    cluster = FakeCluster()
    kserve = get_deployment_target("kserve://ml", Settings(deploy={"models_file": models}))
    kserve._client, kserve._has_transformer = cluster.client, lambda uri: False
    kserve.deploy("fraud", "1", V1.uri, role="stable")
    kserve.deploy("other", "1", V1.uri, role="stable")
    assert [predictor(cluster.objects[m])["minReplicas"] for m in ("fraud", "other")] == [0, 1]
    assert predictor(cluster.objects["fraud"])["maxReplicas"] == 5


def test_a_model_on_triton_gets_its_version_as_a_triton_repository_through_every_step():
    from serving.policy import Policy
    from serving.targets.triton import Repository

    cluster = FakeCluster()
    published: list[tuple[str, str, int]] = []

    def publish(model: str, uri: str, batch: int) -> Repository:
        published.append((model, uri, batch))
        return Repository(f"{uri}-triton-{model}", indexed=uri == V2.uri)  # version 2: TorchScript

    kserve = KServeTarget(
        "ml", SETTINGS, client=cluster.client, has_transformer=lambda uri: True,
        policy=lambda m: Policy(m, runtime="triton"), publish=publish,
    )  # fmt: skip
    steps = (
        (lambda: kserve.deploy("fraud", "1", V1.uri, role="stable"), V1),
        (lambda: kserve.deploy("fraud", "2", V2.uri), V2),
        (lambda: kserve.set_traffic("fraud", 50), V2),
        (lambda: kserve.rollback("fraud"), V1),
    )
    for step, serving in steps:
        step()
        manifest = cluster.objects["fraud"]
        model = predictor(manifest)["model"]
        assert model["runtime"] == "kserve-tritonserver"
        assert model["modelFormat"] == {"name": "pytorch" if serving == V2 else "onnx"}
        assert model["protocolVersion"] == "v2" and model["storageUri"] == f"{serving.uri}-triton-fraud"
        assert "env" not in model  # Triton reads no setting of ours
        assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
        # Raw features still meet our transformer, which reads the version itself and speaks V2 to Triton.
        container = manifest["spec"]["transformer"]["containers"][0]
        assert {"name": "STORAGE_URI", "value": serving.uri} in container["env"]
        assert ("--indexed_tensors" in container["args"]) == (
            serving == V2
        )  # TorchScript: tensors by position
        assert manifest["metadata"]["annotations"]["mlops.io/runtime"] == "triton"
    assert published[-1] == ("fraud", V1.uri, 256) and {p[1] for p in published} == {V1.uri, V2.uri}
    assert cluster.objects["fraud"]["metadata"]["annotations"]["mlops.io/stable-version"] == "1"
