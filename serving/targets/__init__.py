"""Where versions are rolled out: one interface for the deploy DAG and `mlops serve`, chosen by URL.

- ``http://host:port`` (or https): this project's model server, through its admin API (the
  embedded stack's serving process, or any other instance);
- ``kserve://<namespace>``: a KServe InferenceService per model on Kubernetes, applied with the
  kserve SDK (``canaryTrafficPercent`` for the split).

Backends are imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

from common.errors import ConfigError
from common.settings import Settings
from serving.router import Mode, Role


@dataclass(frozen=True)
class VersionRef:
    version: str
    uri: str


@dataclass(frozen=True)
class Deployment:
    """A model's rollout state on a target."""

    target: str
    model: str
    stable: VersionRef | None
    canary: VersionRef | None
    canary_percent: float
    mode: Mode
    detail: dict | None = None  # what the target adds (providers, the InferenceService's status, ...)


@dataclass(frozen=True)
class Lease:
    """Who holds a model's rollout, until when, and the progress record kept with it."""

    model: str
    owner: str | None
    expires_at: float | None = None  # epoch seconds
    record: dict | None = None
    expired: dict | None = None  # the last lease that ran out unrenewed, and what the target undid


class DeploymentTarget(Protocol):
    """A place that serves models with a stable and a canary version.

    Every method returns the model's state after the change. A method that cannot be done (no
    canary to promote, an unknown model) raises ``InvalidInput`` or ``ModelNotFound`` and changes
    nothing; a target that does not answer raises ``BackendUnavailable``.
    """

    def deploy(self, model: str, version: str, uri: str, role: Role = "canary") -> Deployment:
        """Load ``version`` from ``uri`` as ``role`` (the first version of a model becomes stable)."""
        ...

    def set_traffic(self, model: str, canary_percent: float, mode: Mode = "split") -> Deployment:
        """Send ``canary_percent`` % of requests to the canary (``shadow``: mirror, answer from stable)."""
        ...

    def promote(self, model: str) -> Deployment:
        """Make the canary the stable version, with all traffic."""
        ...

    def rollback(self, model: str) -> Deployment:
        """Drop the canary; the stable version gets all traffic again."""
        ...

    def status(self, model: str) -> Deployment: ...

    def take_lease(self, model: str, owner: str, ttl_s: float, record: dict | None = None) -> Lease:
        """Hold the model for ``owner`` for ``ttl_s`` s (take or renew), keeping ``record`` with it;
        ``LeaseHeld`` when another owner holds it. While held, only the owner changes the model."""
        ...

    def release_lease(self, model: str, owner: str) -> Lease: ...

    def lease(self, model: str) -> Lease: ...


def _server(url: str, settings: Settings, token: str | None, owner: str | None) -> DeploymentTarget:
    from serving.auth import admin_token
    from serving.targets.server import ServerTarget

    if token is None and settings.serving.target_token is not None:
        token = settings.serving.target_token.get_secret_value()
    # The stack's own token goes to the stack's own server only (a pod has no stack: only a
    # server named by MLOPS_SERVING__URL, whose token is then MLOPS_SERVING__ADMIN_TOKEN).
    own = settings.local_state or settings.serving.url is not None
    if token is None and own and same_server(url, settings.serving_url):
        token = admin_token(settings)
    if token is None and not settings.local_state:
        raise settings.no_local_state(
            f"the model server at {url}: set MLOPS_SERVING__TARGET_TOKEN (its admin token)"
        )
    return ServerTarget(url, token, owner=owner)


def same_server(url: str, other: str) -> bool:
    """Whether two URLs reach the same server (scheme, port, and host; loopback names as one)."""
    from serving.auth import loopback

    a, b = urlparse(url), urlparse(other)
    if (a.scheme, a.port or _PORTS.get(a.scheme)) != (b.scheme, b.port or _PORTS.get(b.scheme)):
        return False
    hosts = (a.hostname or "", b.hostname or "")
    return hosts[0] == hosts[1] or all(loopback(host) for host in hosts)


_PORTS = {"http": 80, "https": 443}


def _kserve(url: str, settings: Settings, token: str | None, owner: str | None) -> DeploymentTarget:
    from serving.policy import load_policy
    from serving.targets.kserve import KServeTarget

    def policy(model: str) -> Any:
        return load_policy(settings.deploy.models_file, model)

    return KServeTarget(urlparse(url).netloc or "default", settings.kserve, owner=owner, policy=policy)


_BUILDERS: dict[str, Callable[[str, Settings, str | None, str | None], DeploymentTarget]] = {
    "http": _server,
    "https": _server,
    "kserve": _kserve,
}


def get_deployment_target(
    url: str, settings: Settings, token: str | None = None, owner: str | None = None
) -> DeploymentTarget:
    """The target at ``url``; an unknown scheme is refused with the list of known ones. Changes are
    made as ``owner`` (a rollout holding the model's lease), or as nobody in particular.

    A model server target is sent ``token``, else ``MLOPS_SERVING__TARGET_TOKEN``, else, when it is
    the stack's own model server (``MLOPS_SERVING__URL``), the stack's admin token; else none.
    """
    scheme = urlparse(url).scheme
    builder = _BUILDERS.get(scheme)
    if builder is None:
        raise ConfigError(
            f"deployment target '{url}': scheme '{scheme}' is not one of {', '.join(sorted(_BUILDERS))}"
        )
    return builder(url, settings, token, owner)
