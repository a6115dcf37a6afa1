"""The Kubernetes target: one KServe InferenceService per model, built and applied with the kserve SDK.

A rollout is a desired state (stable version, canary version, canary percent) written into the
InferenceService: the predictor runs the newest version (``storageUri``) and, while there is a
canary, ``canaryTrafficPercent`` sends that share to it and the rest to the previous revision.
The versions are recorded in annotations, so the state is read back from the cluster itself, and so
is a rollout's lease (``mlops.io/lease``): every change is a replace carrying the object's
``resourceVersion``, so of two writers racing the cluster takes one and refuses the other. A lease
that ran out is not undone by the cluster (there is no controller of ours there): the next rollout
of the model reconciles it.

Pods run this project's runtime image through a ClusterServingRuntime (``serving_runtimes``):
``python -m serving.predictor``, the same model class as the local model server. A version with a
transformer spec gets KServe's transformer component (raw features -> tensor), and its predictor
serves bare tensors. GPUs are requested as ``nvidia.com/gpu`` limits.

``KServeClient()`` reads a kubeconfig when constructed, so it is built on first use; tests pass
a fake client.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from common.errors import BackendUnavailable, InvalidInput, LeaseHeld, ModelNotFound
from common.settings import KServeSettings, LogsSettings, ServingSettings
from serving.policy import Policy, Runtime, Scaling
from serving.router import Mode, Role
from serving.targets import Deployment, Lease, VersionRef, triton
from serving.targets.triton import TRITON_RUNTIME, Repository

API_VERSION = "serving.kserve.io/v1beta1"
MODEL_FORMAT = "mlops"
RUNTIME = "mlops-runtime"  # the version's transformer runs inside the predictor
TENSOR_RUNTIME = "mlops-runtime-tensor"  # predictor of bare tensors, behind a transformer component
VERSION_ENV = "MLOPS_MODEL_VERSION"
_ANNOTATION = "mlops.io/"
LEASE_ANNOTATION = f"{_ANNOTATION}lease"  # JSON: owner, expires_at, record
# What KServe's storage initializer can download.
STORAGE_SCHEMES = ("s3", "gs", "https", "http", "pvc", "hdfs", "webhdfs", "oci", "hf")
DEFAULT_SCALING = Scaling()
_PART_OF = {"app.kubernetes.io/part-of": "mlops"}
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Rollout:
    stable: VersionRef
    canary: VersionRef | None = None
    canary_percent: float = 0.0
    transformer: bool = False

    @property
    def serving(self) -> VersionRef:
        """The version the predictor runs (KServe keeps the previous revision for the rest)."""
        return self.canary or self.stable


def check_model_name(model: str) -> None:
    if not _DNS_LABEL.match(model):
        raise InvalidInput(f"model name '{model}' is not a valid InferenceService name (lowercase DNS label)")


def check_storage_uri(uri: str) -> None:
    scheme = urlparse(uri).scheme
    if scheme in ("models", "runs", "mlflow-artifacts"):
        raise InvalidInput(
            f"'{uri}': KServe's storage initializer cannot read MLflow URIs; deploy the version's artifact "
            "location (run MLflow with an S3 artifact root and pass the s3:// URI)"
        )
    if scheme not in STORAGE_SCHEMES:
        raise InvalidInput(
            f"'{uri}': scheme '{scheme}' is not one KServe can download ({', '.join(STORAGE_SCHEMES)})"
        )


def inference_service(
    model: str,
    namespace: str,
    rollout: Rollout,
    settings: KServeSettings,
    scaling: Scaling = DEFAULT_SCALING,
    runtime: Runtime = "mlops",
    triton_repository: Repository | None = None,
) -> Any:
    """The V1beta1InferenceService for a model's rollout state, scaled as its policy says; with
    ``runtime`` triton, the predictor is KServe's Triton runtime on the version's Triton repository
    (serving/targets/triton.py), the transformer component (if any) still ours."""
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1LoggerSpec,
        V1beta1ModelFormat,
        V1beta1ModelSpec,
        V1beta1PredictorSpec,
        V1beta1TransformerSpec,
    )
    from kubernetes.client import V1Container, V1EnvVar, V1ObjectMeta, V1ResourceRequirements

    check_model_name(model)
    serving = rollout.serving
    version_env = [V1EnvVar(name=VERSION_ENV, value=serving.version)]
    gpus = {"nvidia.com/gpu": str(settings.gpus)} if settings.gpus else {}
    scaled = _autoscaling(scaling)  # the same for both components
    # One component logs each request: the transformer where there is one (raw features, what
    # monitoring and retraining read), else the predictor.
    logger = (
        V1beta1LoggerSpec(mode="all", url=settings.logger_url.format(namespace=namespace))
        if settings.logger_url
        else None
    )
    resources = V1ResourceRequirements(
        requests={"cpu": "1", "memory": "2Gi", **gpus}, limits={"cpu": "2", "memory": "4Gi", **gpus}
    )
    if runtime == "triton":
        if triton_repository is None:
            raise InvalidInput(f"model '{model}': runtime triton needs the version's Triton repository")
        spec = V1beta1ModelSpec(
            name="kserve-container",
            model_format=V1beta1ModelFormat(name=triton_repository.model_format),
            runtime=TRITON_RUNTIME,
            protocol_version="v2",
            storage_uri=triton_repository.uri,
            resources=resources,
        )
    else:
        spec = V1beta1ModelSpec(
            name="kserve-container",
            model_format=V1beta1ModelFormat(name=MODEL_FORMAT),
            runtime=TENSOR_RUNTIME if rollout.transformer else RUNTIME,
            storage_uri=serving.uri,
            env=version_env,
            resources=resources,
        )
    predictor = V1beta1PredictorSpec(
        model=spec,
        canary_traffic_percent=_percent(rollout),
        service_account_name=settings.service_account,
        logger=None if rollout.transformer else logger,
        **scaled,
    )
    transformer = None
    if rollout.transformer:
        transformer = V1beta1TransformerSpec(
            containers=[
                V1Container(
                    name="kserve-container",
                    image=settings.image,
                    command=["python", "-m", "serving.predictor"],
                    args=[
                        "--transformer",
                        "--model_dir=/mnt/models",
                        # TorchScript on Triton takes its tensors by position: <name>__<index>.
                        *(["--indexed_tensors"] if triton_repository and triton_repository.indexed else []),
                    ],
                    # STORAGE_URI: KServe's storage initializer fetches the version here too (the spec).
                    env=[V1EnvVar(name="STORAGE_URI", value=serving.uri), *version_env],
                    resources=V1ResourceRequirements(
                        requests={"cpu": "500m", "memory": "1Gi"}, limits={"cpu": "1", "memory": "2Gi"}
                    ),
                )
            ],
            canary_traffic_percent=_percent(rollout),
            service_account_name=settings.service_account,
            logger=logger,
            **scaled,
        )
    annotations = {
        f"{_ANNOTATION}runtime": runtime,
        f"{_ANNOTATION}stable-version": rollout.stable.version,
        f"{_ANNOTATION}stable-uri": rollout.stable.uri,
        f"{_ANNOTATION}transformer": str(rollout.transformer).lower(),
    }
    if rollout.canary is not None:
        annotations[f"{_ANNOTATION}canary-version"] = rollout.canary.version
        annotations[f"{_ANNOTATION}canary-uri"] = rollout.canary.uri
        annotations[f"{_ANNOTATION}canary-percent"] = f"{rollout.canary_percent:g}"
    return V1beta1InferenceService(
        api_version=API_VERSION,
        kind="InferenceService",
        metadata=V1ObjectMeta(
            name=model,
            namespace=namespace,
            labels={**_PART_OF, f"{_ANNOTATION}model": model},
            annotations=annotations,
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor, transformer=transformer),
    )


def _autoscaling(scaling: Scaling) -> dict[str, Any]:
    """A component's replicas and what scales them (KServe's fields; the same for both components)."""
    target = scaling.scale_target
    if target is None and scaling.scale_metric == "concurrency":
        # The pods' batch size (the runtime sets no other): a replica fills a batch before another comes.
        target = ServingSettings().batch_max_rows
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "scale_metric": scaling.scale_metric,
        "scale_target": target,
        "container_concurrency": scaling.container_concurrency or None,
    }


def _percent(rollout: Rollout) -> int | None:
    # KServe takes whole percents; without a canary the field is left out (100 % to the latest).
    return int(round(rollout.canary_percent)) if rollout.canary is not None else None


def serving_runtimes(settings: KServeSettings) -> list[Any]:
    """The ClusterServingRuntimes the InferenceServices name: with and without the transformer inside."""
    from kserve import (
        V1alpha1ClusterServingRuntime,
        V1alpha1ServingRuntimeSpec,
        V1alpha1SupportedModelFormat,
    )
    from kubernetes.client import V1Container, V1ObjectMeta, V1ResourceRequirements

    runtimes = []
    for name, extra in ((RUNTIME, []), (TENSOR_RUNTIME, ["--no-transformer"])):
        container = V1Container(
            name="kserve-container",
            image=settings.image,
            command=["python", "-m", "serving.predictor"],
            args=["--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080", *extra],
            resources=V1ResourceRequirements(
                requests={"cpu": "1", "memory": "2Gi"}, limits={"cpu": "2", "memory": "4Gi"}
            ),
        )
        runtimes.append(
            V1alpha1ClusterServingRuntime(
                api_version="serving.kserve.io/v1alpha1",
                kind="ClusterServingRuntime",
                metadata=V1ObjectMeta(name=name, labels=_PART_OF),
                spec=V1alpha1ServingRuntimeSpec(
                    supported_model_formats=[
                        V1alpha1SupportedModelFormat(
                            name=MODEL_FORMAT, version="1", auto_select=name == RUNTIME
                        )
                    ],
                    protocol_versions=["v1", "v2"],
                    containers=[container],
                ),
            )
        )
    return runtimes


def to_manifest(obj: Any) -> dict[str, Any]:
    """The object as the cluster receives it (camelCase keys, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


class KServeTarget:
    def __init__(
        self,
        namespace: str,
        settings: KServeSettings,
        client: Any | None = None,
        has_transformer: Any | None = None,
        owner: str | None = None,
        policy: Callable[[str], Policy] | None = None,
        publish: Callable[[str, str, int], Repository] | None = None,
    ) -> None:
        self.namespace = namespace
        self.owner = owner
        self.settings = settings
        self._client = client
        self._has_transformer = has_transformer or _version_has_transformer
        # Read at each change, so canary, promotion and rollback all keep the model's scaling and runtime.
        self._policy = policy or (lambda model: Policy(model))
        self._publish = publish or triton.publish

    @property
    def client(self) -> Any:
        if self._client is None:
            from kserve import KServeClient

            try:
                self._client = KServeClient()
            except Exception as exc:  # no kubeconfig, no in-cluster config
                raise BackendUnavailable(
                    f"cannot reach Kubernetes for namespace '{self.namespace}': {exc}"
                ) from exc
        return self._client

    def deploy(self, model: str, version: str, uri: str, role: Role = "canary") -> Deployment:
        check_model_name(model)
        check_storage_uri(uri)
        if role not in ("stable", "canary"):
            raise InvalidInput(f"role must be stable or canary, got {role!r}")
        current, isvc = self._read(model)
        ref = VersionRef(str(version), uri)
        transformer = bool(self._has_transformer(uri))
        if current is None or role == "stable":
            rollout = Rollout(stable=ref, transformer=transformer)
        else:
            if transformer != current.transformer:
                raise InvalidInput(
                    f"model '{model}': version {version} {'has' if transformer else 'lacks'} a transformer spec and the "
                    "stable one does not match; deploy it as stable instead"
                )
            rollout = Rollout(stable=current.stable, canary=ref, canary_percent=0.0, transformer=transformer)
        return self._apply(model, rollout, isvc)

    def set_traffic(self, model: str, canary_percent: float, mode: Mode = "split") -> Deployment:
        if mode != "split":
            raise InvalidInput(
                "the kserve target splits traffic only (KServe has no shadow mode); use mode 'split'"
            )
        if not 0 <= canary_percent <= 100:
            raise InvalidInput(f"canary_percent must be between 0 and 100, got {canary_percent}")
        current, isvc = self._require(model)
        if current.canary is None:
            raise InvalidInput(f"model '{model}' has no canary to send traffic to; load one first")
        return self._apply(
            model, Rollout(current.stable, current.canary, canary_percent, current.transformer), isvc
        )

    def promote(self, model: str) -> Deployment:
        current, isvc = self._require(model)
        if current.canary is None:
            raise InvalidInput(f"model '{model}': there is no canary to promote")
        return self._apply(model, Rollout(stable=current.canary, transformer=current.transformer), isvc)

    def rollback(self, model: str) -> Deployment:
        current, isvc = self._require(model)
        if current.canary is None:
            raise InvalidInput(f"model '{model}': there is no canary to roll back")
        return self._apply(model, Rollout(stable=current.stable, transformer=current.transformer), isvc)

    def status(self, model: str) -> Deployment:
        current, isvc = self._read(model)
        if current is None:
            raise ModelNotFound(f"model '{model}' has no InferenceService in namespace '{self.namespace}'")
        return self._deployment(model, current, isvc)

    # ---------------------------------------------------------------------------------------

    def _require(self, model: str) -> tuple[Rollout, dict[str, Any]]:
        current, isvc = self._read(model)
        if current is None or isvc is None:
            raise ModelNotFound(f"model '{model}' has no InferenceService in namespace '{self.namespace}'")
        return current, isvc

    def _read(self, model: str) -> tuple[Rollout | None, dict[str, Any] | None]:
        """The rollout recorded on the model's InferenceService (None if there is none), and the object."""
        from kubernetes.client.rest import ApiException

        try:
            isvc = self.client.get(model, namespace=self.namespace)
        except RuntimeError as exc:  # the kserve SDK wraps the ApiException
            cause = exc.__context__
            if isinstance(cause, ApiException) and cause.status == 404:
                return None, None
            raise BackendUnavailable(f"Kubernetes refused reading InferenceService '{model}': {exc}") from exc
        notes = (isvc.get("metadata") or {}).get("annotations") or {}
        if f"{_ANNOTATION}stable-uri" not in notes:
            raise InvalidInput(
                f"InferenceService '{model}' in '{self.namespace}' was not made by mlops (no annotations)"
            )
        canary = None
        if f"{_ANNOTATION}canary-uri" in notes:
            canary = VersionRef(notes[f"{_ANNOTATION}canary-version"], notes[f"{_ANNOTATION}canary-uri"])
        rollout = Rollout(
            stable=VersionRef(notes[f"{_ANNOTATION}stable-version"], notes[f"{_ANNOTATION}stable-uri"]),
            canary=canary,
            canary_percent=float(notes.get(f"{_ANNOTATION}canary-percent", 0)),
            transformer=notes.get(f"{_ANNOTATION}transformer") == "true",
        )
        return rollout, isvc

    def take_lease(self, model: str, owner: str, ttl_s: float, record: dict | None = None) -> Lease:
        current, isvc = self._read(model)
        if current is None:
            raise InvalidInput(
                f"model '{model}' has no InferenceService in namespace '{self.namespace}' to hold a rollout on:"
                f" deploy its first version with `mlops serve load {model} --role stable --target"
                f" kserve://{self.namespace}`"
            )
        held = _held(isvc)
        if held is not None and held.owner != owner:
            raise _lease_held(model, held)
        lease = Lease(
            model, owner, time.time() + ttl_s, record if record is not None else (held.record if held else {})
        )
        self._apply(model, current, isvc, lease=lease)
        return lease

    def release_lease(self, model: str, owner: str) -> Lease:
        current, isvc = self._read(model)
        if current is None:
            return Lease(model, None)
        held = _held(isvc)
        if held is not None and held.owner != owner:
            raise _lease_held(model, held)
        self._apply(model, current, isvc, lease=None)
        return Lease(model, None)

    def lease(self, model: str) -> Lease:
        _, isvc = self._read(model)
        held = _held(isvc) if isvc is not None else None
        return held or Lease(model, None)

    def _apply(
        self, model: str, rollout: Rollout, isvc: dict[str, Any] | None, lease: Lease | None | bool = True
    ) -> Deployment:
        """Write ``rollout`` over ``isvc``, the object as read when the change was worked out (None:
        create it), keeping its lease (``lease`` True) or writing ``lease`` instead (None: none)."""
        held = _held(isvc) if isvc is not None else None
        if lease is True and held is not None and held.owner != self.owner:
            raise _lease_held(model, held)
        kept = held if lease is True else lease
        policy = self._policy(model)
        repository = None
        if policy.runtime == "triton":  # the version the predictor runs, as a Triton repository
            repository = self._publish(model, rollout.serving.uri, ServingSettings().batch_max_rows)
        desired = inference_service(
            model, self.namespace, rollout, self.settings, policy.scaling, policy.runtime, repository
        )
        if isinstance(kept, Lease) and kept.owner:
            desired.metadata.annotations[LEASE_ANNOTATION] = json.dumps(
                {"owner": kept.owner, "expires_at": kept.expires_at, "record": kept.record or {}}
            )
        if isvc is not None:  # optimistic concurrency: the cluster refuses a replace of a changed object
            desired.metadata.resource_version = (isvc.get("metadata") or {}).get("resourceVersion")
        try:
            if isvc is not None:
                applied = self.client.replace(model, desired, namespace=self.namespace)
            else:
                applied = self.client.create(desired, namespace=self.namespace)
        except RuntimeError as exc:
            from kubernetes.client.rest import ApiException

            cause = exc.__context__
            if isinstance(cause, ApiException) and cause.status == 409:
                raise LeaseHeld(
                    f"InferenceService '{model}' changed while this change was made (another writer); read it"
                    " again and retry"
                ) from exc
            raise BackendUnavailable(f"Kubernetes refused InferenceService '{model}': {exc}") from exc
        return self._deployment(model, rollout, applied)

    def _deployment(self, model: str, rollout: Rollout, isvc: Any) -> Deployment:
        status = (isvc or {}).get("status") if isinstance(isvc, dict) else None
        return Deployment(
            target=f"kserve://{self.namespace}",
            model=model,
            stable=rollout.stable,
            canary=rollout.canary,
            canary_percent=rollout.canary_percent if rollout.canary else 0.0,
            mode="split",
            detail={
                "inference_service": model,
                "namespace": self.namespace,
                "url": (status or {}).get("url"),
            },
        )


def _held(isvc: dict[str, Any] | None) -> Lease | None:
    """The live lease recorded on an InferenceService, if any."""
    notes = ((isvc or {}).get("metadata") or {}).get("annotations") or {}
    if LEASE_ANNOTATION not in notes:
        return None
    try:
        data = json.loads(notes[LEASE_ANNOTATION])
    except ValueError:
        return None
    name = ((isvc or {}).get("metadata") or {}).get("name", "")
    lease = Lease(name, data.get("owner"), data.get("expires_at"), data.get("record") or {})
    return lease if lease.owner and (lease.expires_at or 0) > time.time() else None


def _lease_held(model: str, lease: Lease) -> LeaseHeld:
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lease.expires_at or 0))
    return LeaseHeld(
        f"model '{model}' is being rolled out by '{lease.owner}' (lease until {until}); only that owner"
        " may change it until it ends or the lease runs out"
    )


def _version_has_transformer(uri: str) -> bool:
    """Read the version's MLmodel (downloading it once) to see whether it carries a transformer spec."""
    import tempfile
    from pathlib import Path

    from serving.bundle import read_bundle
    from serving.frameworks import FLAVORS
    from serving.sources import fetch

    cache = Path(tempfile.gettempdir()) / "mlops-kserve-target"
    # A version of another framework is served converted, with a generated transformer spec.
    bundle = read_bundle(fetch(uri, cache, tracking_uri=""), convert=False)
    return bundle.transformer is not None or bundle.flavor in FLAVORS


RECEIVER = "mlops-log-receiver"
RUNTIME_ACCOUNT = "mlops-runtime"
SETTINGS_MAP, SECRETS = "mlops-settings", "mlops-secrets"
_STATE = "/var/lib/mlops"


def cluster_settings(namespace: str) -> Any:
    """The settings every mlops pod of the namespace reads (a ConfigMap, as MLOPS_* variables): where
    MLflow, the log store and the InferenceServices are. Secrets (the store's password or API key,
    S3 credentials) go in the Secret ``mlops-secrets``, made by hand or by a secrets operator."""
    from kubernetes.client import V1ConfigMap, V1ObjectMeta

    data = {
        "MLOPS_MLFLOW__URL": f"http://mlflow.{namespace}.svc.cluster.local:5000",
        "MLOPS_LOGS__STORE": f"elasticsearch://elasticsearch.{namespace}.svc.cluster.local:9200",
        "MLOPS_SERVING__TARGET": f"kserve://{namespace}",
    }
    return V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=V1ObjectMeta(name=SETTINGS_MAP, namespace=namespace, labels=_PART_OF), data=data,
    )  # fmt: skip


def _settings_from_cluster() -> list[Any]:
    from kubernetes.client import V1ConfigMapEnvSource, V1EnvFromSource, V1SecretEnvSource

    return [
        V1EnvFromSource(config_map_ref=V1ConfigMapEnvSource(name=SETTINGS_MAP)),
        V1EnvFromSource(secret_ref=V1SecretEnvSource(name=SECRETS, optional=True)),
    ]


def _account(name: str, namespace: str, verbs: list[str]) -> list[Any]:
    """A service account allowed ``verbs`` on the namespace's InferenceServices."""
    from kubernetes.client import (
        RbacV1Subject,
        V1ObjectMeta,
        V1PolicyRule,
        V1Role,
        V1RoleBinding,
        V1RoleRef,
        V1ServiceAccount,
    )

    meta = V1ObjectMeta(name=name, namespace=namespace, labels=_PART_OF)
    return [
        V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=meta),
        V1Role(
            api_version="rbac.authorization.k8s.io/v1", kind="Role", metadata=meta,
            rules=[V1PolicyRule(api_groups=["serving.kserve.io"], resources=["inferenceservices"], verbs=verbs)],
        ),
        V1RoleBinding(
            api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding", metadata=meta,
            role_ref=V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
            subjects=[RbacV1Subject(kind="ServiceAccount", name=name, namespace=namespace)],
        ),
    ]  # fmt: skip


def runtime_steps(namespace: str) -> list[Any]:
    """What the DAGs' steps run as in pods (the operator's Kubernetes launcher, ``service_account``
    ``mlops-runtime``): the rollout steps replace InferenceServices; nothing else in the cluster."""
    return _account(
        RUNTIME_ACCOUNT, namespace, ["get", "list", "watch", "create", "update", "patch", "delete"]
    )


def log_receiver(namespace: str, settings: KServeSettings, port: int, spool_bytes: int) -> list[Any]:
    """KServe's logger sink (`mlops logs receive`) in the cluster: the InferenceServices' logger URL
    names its Service. A StatefulSet, so each replica's spool (a store outage loses nothing) is on
    a volume of its own that outlives the pod; the Service keeps a caller on one replica (session
    affinity by client IP: a predictor's request and response events come from one agent, and are
    paired in one process). Its account may read InferenceServices: the versions each role serves."""
    from kubernetes.client import (
        V1Container,
        V1ContainerPort,
        V1EnvVar,
        V1HTTPGetAction,
        V1LabelSelector,
        V1ObjectMeta,
        V1PersistentVolumeClaim,
        V1PersistentVolumeClaimSpec,
        V1PodSpec,
        V1PodTemplateSpec,
        V1Probe,
        V1ResourceRequirements,
        V1Service,
        V1ServicePort,
        V1ServiceSpec,
        V1StatefulSet,
        V1StatefulSetSpec,
        V1VolumeMount,
        V1VolumeResourceRequirements,
    )

    labels = {**_PART_OF, "app.kubernetes.io/name": RECEIVER}
    health = V1HTTPGetAction(path="/healthz", port="http")
    env = {
        "MLOPS_HOST": "0.0.0.0",
        "MLOPS_STATE_DIR": _STATE,  # the spool and dead letters: the volume below
        "MLOPS_LOGS__RECEIVER_PORT": str(port),
        "MLOPS_LOGS__SPOOL_MAX_BYTES": str(spool_bytes),
    }
    container = V1Container(
        name="receiver",
        image=settings.image,
        command=["mlops", "logs", "receive"],
        env=[V1EnvVar(name=k, value=v) for k, v in env.items()],
        env_from=_settings_from_cluster(),
        ports=[V1ContainerPort(name="http", container_port=port)],
        readiness_probe=V1Probe(http_get=health, period_seconds=5),
        liveness_probe=V1Probe(http_get=health, period_seconds=20, failure_threshold=3),
        resources=V1ResourceRequirements(
            requests={"cpu": "250m", "memory": "512Mi"}, limits={"cpu": "1", "memory": "1Gi"}
        ),
        volume_mounts=[V1VolumeMount(name="state", mount_path=_STATE)],
    )
    # The spool and the dead letters each hold up to spool_bytes: the claim has room for both.
    claim = V1PersistentVolumeClaim(
        metadata=V1ObjectMeta(name="state"),
        spec=V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"],
            resources=V1VolumeResourceRequirements(
                requests={"storage": f"{-(-3 * spool_bytes // (1 << 30))}Gi"}
            ),
        ),
    )
    meta = V1ObjectMeta(name=RECEIVER, namespace=namespace, labels=labels)
    pods = f"{RECEIVER}-pods"
    return [
        *_account(RECEIVER, namespace, ["get", "list"]),
        V1StatefulSet(
            api_version="apps/v1", kind="StatefulSet", metadata=meta,
            spec=V1StatefulSetSpec(
                replicas=2, service_name=pods, selector=V1LabelSelector(match_labels=labels),
                template=V1PodTemplateSpec(
                    metadata=V1ObjectMeta(labels=labels),
                    # Time to hand what it holds to the store or the spool after SIGTERM.
                    spec=V1PodSpec(service_account_name=RECEIVER, containers=[container],
                                   termination_grace_period_seconds=30),
                ),
                volume_claim_templates=[claim],
            ),
        ),
        V1Service(
            api_version="v1", kind="Service", metadata=meta,
            spec=V1ServiceSpec(
                selector=labels, session_affinity="ClientIP",
                ports=[V1ServicePort(name="http", port=80, target_port="http")],
            ),
        ),
        V1Service(  # the StatefulSet's governing (headless) Service
            api_version="v1", kind="Service", metadata=V1ObjectMeta(name=pods, namespace=namespace, labels=labels),
            spec=V1ServiceSpec(cluster_ip="None", selector=labels, ports=[V1ServicePort(name="http", port=port)]),
        ),
    ]  # fmt: skip


def render_manifests(settings: KServeSettings, logs: LogsSettings) -> dict[str, str]:
    """The files of docker/k8s/: the serving runtimes, the settings every mlops pod reads, the log
    receiver, the steps' account, and an example InferenceService mid-canary (on this project's
    runtime, and on Triton)."""
    import yaml

    header = "# Generated by `mlops serve manifests --output-dir docker/k8s` (serving/targets/kserve.py).\n"
    example = Rollout(
        stable=VersionRef("1", "s3://mlflow/models/demo-fraud/1"),
        canary=VersionRef("2", "s3://mlflow/models/demo-fraud/2"),
        canary_percent=10,
        transformer=True,
    )
    namespace = "mlops"
    documents = {
        "cluster-serving-runtimes.yaml": [to_manifest(r) for r in serving_runtimes(settings)],
        "settings.yaml": [to_manifest(cluster_settings(namespace))],
        "log-receiver.yaml": [
            to_manifest(o)
            for o in log_receiver(namespace, settings, logs.receiver_port, logs.spool_max_bytes)
        ],
        "runtime-steps.yaml": [to_manifest(o) for o in runtime_steps(namespace)],
        "example-inferenceservice.yaml": [
            to_manifest(inference_service("demo-fraud", namespace, example, settings))
        ],
        "example-inferenceservice-triton.yaml": [
            to_manifest(
                inference_service(
                    "demo-fraud",
                    namespace,
                    example,
                    settings,
                    DEFAULT_SCALING,
                    "triton",
                    Repository(triton.repository_uri(example.serving.uri, "demo-fraud")),
                )  # fmt: skip
            )
        ],
    }
    return {
        name: header + yaml.safe_dump_all(docs, sort_keys=False, width=100)
        for name, docs in documents.items()
    }
