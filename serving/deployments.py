"""Which versions are loaded, per model: load, split, promote, roll back, and remember it.

Loading a version (fetch, read, open the runtime, smoke-test) runs in a worker thread, off the
request path; only a fully loaded version is put into a model's routing, in one assignment.
A replaced version keeps serving the requests that already hold it, and its batcher closes once
it is idle. The state (which version is stable, which canary, the split, the leases) is written to
``<state_dir>/serving/deployments.json`` after each change, and restored when the server starts.

A rollout holds a model's **lease**: one owner (a deploy run) at a time, for a time it renews.
While a lease is held only its owner may change the model; when it runs out unrenewed (the run
died, Airflow is down) the server rolls the canary back by itself, so a canary share never
outlives the run that set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kserve

from common.errors import InvalidInput, LeaseHeld, MLOpsError, ModelNotFound, ModelNotReady
from common.settings import Settings
from serving import metrics
from serving.batching import Batcher
from serving.bundle import read_bundle
from serving.model import VersionModel
from serving.router import Mode, Role, Routing
from serving.sources import fetch, resolve
from serving.targets import Lease

log = logging.getLogger(__name__)
_RETIRE_CHECK_S = 5.0
LEASE_CHECK_S = 1.0
MAX_LEASE_S = 24 * 3600.0


@dataclass(frozen=True)
class Loaded:
    """A version ready to answer: the model, its batcher, where it came from."""

    model: VersionModel
    batcher: Batcher
    uri: str
    loaded_at: float

    @property
    def version(self) -> str:
        return self.model.version

    def describe(self) -> dict[str, Any]:
        bundle = self.model.bundle
        return {
            "version": self.version,
            "uri": self.uri,
            "provider": self.model.provider,
            "flavor": bundle.flavor,
            "converted_from": bundle.converted_from,  # sklearn, xgboost, lightgbm: its ONNX conversion
            "sha256": bundle.sha256,
            "signature": self.model.request_signature.source if self.model.request_signature else None,
            "transformer": bundle.transformer is not None,
            "unknown_categories": self.model.unknown_categories,
            "loaded_at": self.loaded_at,
        }


class RoutedModel(kserve.Model):
    """What kserve's own endpoints see for a model name: readiness, metadata, and (for requests the
    fast path leaves to kserve, such as binary V2 tensors) the stable version's handlers."""

    def __init__(self, name: str, deployments: Deployments) -> None:
        super().__init__(name)
        self._deployments = deployments
        self.ready = True

    def _stable(self) -> VersionModel:
        routing = self._deployments.routing(self.name)
        version, _, _ = routing.pick(None, 0.99)
        return version.model

    async def __call__(self, body: Any, headers: dict[str, str] | None = None, verb: Any = None) -> Any:
        model = self._stable()
        return await model(body, headers) if verb is None else await model(body, headers, verb)

    def get_input_types(self) -> list[dict[str, Any]]:
        return self._stable().get_input_types()

    def get_output_types(self) -> list[dict[str, Any]]:
        return self._stable().get_output_types()


class Deployments:
    def __init__(self, settings: Settings, threads: int | None = None, persist: bool = True) -> None:
        self.settings = settings
        self.threads = threads or settings.serving.threads  # compute threads per version
        self.persist = persist  # False: a follower worker, whose routing is the leader's (serving/workers.py)
        # After each change of routing, once set (the leading worker): the routing reaches the others.
        self.replicate: Callable[[], Awaitable[dict[str, Any] | None]] | None = None
        self.state_file = settings.serving_dir / "deployments.json"
        self.cache_dir = settings.serving_dir / "models"
        self._routing: dict[str, Routing[Loaded]] = {}
        self._lock = asyncio.Lock()  # one admin change at a time; requests never take it
        self._leases: dict[str, Lease] = {}  # model -> its rollout's lease (owner, expiry, record)
        # model -> the last lease that ran out unrenewed, and what it undid
        self.expired: dict[str, dict[str, Any]] = {}
        self._repository: kserve.model_repository.ModelRepository | None = None  # set by attach()
        self.restored = False  # until the saved deployments are back, the server is not ready

    def attach(self, repository: kserve.model_repository.ModelRepository) -> None:
        """Show the deployed models to kserve's own endpoints (readiness, metadata)."""
        self._repository = repository
        for name in self._routing:
            repository.update(RoutedModel(name, self), name)

    # --- the request path: one dict lookup --------------------------------------------------

    def routing(self, name: str) -> Routing[Loaded]:
        routing = self._routing.get(name)
        if routing is None:
            raise ModelNotFound(
                f"model '{name}' is not deployed here; deployed: {sorted(self._routing) or 'none'}"
            )
        return routing

    # --- admin changes ------------------------------------------------------------------------

    async def load(self, name: str, version: str, uri: str, role: Role) -> dict[str, Any]:
        if role not in ("stable", "canary"):
            raise InvalidInput(f"role must be stable or canary, got {role!r}")
        loaded = await asyncio.get_running_loop().run_in_executor(
            None, self._load_blocking, name, str(version), uri
        )
        async with self._lock:
            current = self._routing.get(name, Routing())
            replaced = current.stable if (role == "stable" or current.stable is None) else current.canary
            self._set(name, current.with_version(loaded, role))
        if replaced is not None and replaced is not loaded:
            self._retire(replaced)
        log.info(
            "model %s: version %s loaded as %s from %s (%s)", name, version, role, uri, loaded.model.provider
        )
        return await self._changed(name)

    async def set_traffic(self, name: str, canary_percent: float, mode: Mode) -> dict[str, Any]:
        async with self._lock:
            routing = self.routing(name)
            if routing.canary is None and (canary_percent > 0 or mode == "shadow"):
                raise InvalidInput(f"model '{name}' has no canary to send traffic to; load one first")
            self._set(name, routing.with_traffic(canary_percent, mode))
        return await self._changed(name)

    async def promote(self, name: str) -> dict[str, Any]:
        """The canary becomes stable; the old stable version retires."""
        return await self._end_canary(name, Routing.promoted, retire="stable")

    async def rollback(self, name: str) -> dict[str, Any]:
        """The canary retires; stable gets all traffic again."""
        return await self._end_canary(name, Routing.rolled_back, retire="canary")

    async def _end_canary(
        self, name: str, transition: Callable[[Routing[Loaded]], Routing[Loaded]], retire: Role
    ) -> dict[str, Any]:
        async with self._lock:
            routing = self.routing(name)
            try:
                self._set(name, transition(routing))
            except InvalidInput as exc:
                raise InvalidInput(f"model '{name}': {exc}") from None
        retired = getattr(routing, retire)
        if retired is not None:
            self._retire(retired)
        return await self._changed(name)

    async def unload(self, name: str) -> dict[str, Any]:
        await self._drop(name)
        return await self._changed(None, {"model": name, "unloaded": True})

    async def _drop(self, name: str) -> None:
        async with self._lock:
            routing = self.routing(name)
            del self._routing[name]
            if self._repository is not None:
                self._repository.unload(name)
            self._save()
        for loaded in (routing.stable, routing.canary):
            if loaded is not None:
                self._retire(loaded)

    # --- leases: one rollout at a time per model ------------------------------------------------

    def check_owner(self, name: str, owner: str | None) -> None:
        """Refuse a change to a model whose lease someone else holds."""
        lease = self._live_lease(name)
        if lease is not None and lease.owner != owner:
            raise LeaseHeld(
                f"model '{name}' is being rolled out by '{lease.owner}' (lease until"
                f" {_iso(lease.expires_at or 0)}); only that owner may change it until it ends or the lease runs out"
            )

    async def take_lease(
        self, name: str, owner: str, ttl_s: float, record: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Take or renew the lease for ``ttl_s`` seconds; ``record`` replaces the kept record if given."""
        if not owner:
            raise InvalidInput("field 'owner' must be a non-empty string")
        if not 0 < ttl_s <= MAX_LEASE_S:
            raise InvalidInput(f"field 'ttl_s' must be between 0 and {MAX_LEASE_S:g} seconds, got {ttl_s}")
        async with self._lock:
            self.check_owner(name, owner)
            current = self._live_lease(name)
            kept = record if record is not None else ((current.record or {}) if current else {})
            self._leases[name] = Lease(name, owner, time.time() + ttl_s, kept)
            self._save()
        return self.lease(name)

    async def release_lease(self, name: str, owner: str) -> dict[str, Any]:
        async with self._lock:
            self.check_owner(name, owner)
            self._leases.pop(name, None)
            self._save()
        return self.lease(name)

    def lease(self, name: str) -> dict[str, Any]:
        lease = self._live_lease(name) or Lease(name, None, expired=self.expired.get(name))
        return dataclasses.asdict(lease)

    def _live_lease(self, name: str) -> Lease | None:
        lease = self._leases.get(name)
        return lease if lease is not None and (lease.expires_at or 0) > time.time() else None

    async def watch_leases(self) -> None:
        """Forever: end each lease that ran out, rolling back the canary it left (a server task)."""
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            try:
                await self.expire_leases()
            except Exception:  # the watcher must outlive one bad model
                log.exception("lease check failed")

    async def expire_leases(self) -> None:
        now = time.time()
        for name, lease in list(self._leases.items()):
            if (lease.expires_at or 0) > now:
                continue
            undone = None
            async with self._lock:
                if self._leases.get(name) is not lease:
                    continue
                del self._leases[name]
                routing = self._routing.get(name)
                if routing is not None and routing.canary is not None:
                    undone = routing.canary
                    self._set(name, routing.rolled_back())
                else:
                    self._save()
            if undone is not None:
                self._retire(undone)
                with contextlib.suppress(MLOpsError):  # the failures are logged where they happen
                    await self._changed(name)
            self.expired[name] = {
                "owner": lease.owner,
                "expired_at": lease.expires_at,
                "rolled_back": undone.version if undone else None,
                "record": lease.record,
            }
            log.warning(
                "model %s: the lease of '%s' ran out%s",
                name,
                lease.owner,
                f"; canary version {undone.version} rolled back, stable serves all traffic" if undone else "",
            )

    # --- status and persistence -------------------------------------------------------------

    def status(self, name: str | None = None) -> dict[str, Any]:
        if name is not None:
            routing = self.routing(name)
            return {
                "model": name,
                "stable": routing.stable.describe() if routing.stable else None,
                "canary": routing.canary.describe() if routing.canary else None,
                "canary_percent": routing.canary_percent,
                "mode": routing.mode,
                "lease": self.lease(name) if self._live_lease(name) else None,
            }
        return {"models": [self.status(n) for n in sorted(self._routing)]}

    async def restore(self) -> None:
        """Load what the state file says was deployed (called once, at start)."""
        try:
            await self._restore()
        finally:
            self.restored = True

    async def _restore(self) -> None:
        if not self.state_file.exists():
            return
        try:
            saved = json.loads(self.state_file.read_text())
        except ValueError:
            log.error("ignoring unreadable %s", self.state_file)
            return
        for name, entry in saved.get("leases", {}).items():
            self._leases[name] = Lease(
                name, entry["owner"], float(entry["expires_at"]), entry.get("record") or {}
            )
        for name, entry in saved.get("models", {}).items():
            try:
                for role in ("stable", "canary"):
                    if entry.get(role):
                        await self.load(name, entry[role]["version"], entry[role]["uri"], role)
                if entry.get("canary"):
                    await self.set_traffic(name, entry.get("canary_percent", 0.0), entry.get("mode", "split"))
            except Exception:  # one broken model must not keep the others from serving
                log.exception("could not restore model %s", name)

    def _set(self, name: str, routing: Routing[Loaded]) -> None:
        previous = self._routing.get(name)
        self._routing[name] = routing
        if self._repository is not None and previous is None:
            self._repository.update(RoutedModel(name, self), name)
        for role in ("stable", "canary"):
            old = getattr(previous, role, None) if previous else None
            new = getattr(routing, role)
            if old is not None and old is not new:
                metrics.LOADED.labels(name, old.version, role).set(0)
            if new is not None:
                metrics.LOADED.labels(name, new.version, role).set(1)
        self._save()

    def snapshot(self) -> dict[str, Any]:
        """Every model's routing as data: its versions (number and where from) and split."""
        return {
            name: {
                role: {"version": loaded.version, "uri": loaded.uri}
                for role, loaded in (("stable", routing.stable), ("canary", routing.canary))
                if loaded is not None
            }
            | {"canary_percent": routing.canary_percent, "mode": routing.mode}
            for name, routing in self._routing.items()
        }

    async def apply(self, models: dict[str, Any]) -> None:
        """Make this routing the one given (``snapshot()``'s form; a follower worker, from the
        leader): versions already loaded are kept, the others loaded, models not given unloaded."""
        loop = asyncio.get_running_loop()
        for name, entry in models.items():
            current = self._routing.get(name, Routing())
            held = {(v.version, v.uri): v for v in (current.stable, current.canary) if v is not None}
            chosen: dict[str, Loaded | None] = {}
            for role in ("stable", "canary"):
                wanted = entry.get(role)
                key = (str(wanted["version"]), wanted["uri"]) if wanted else None
                if key is not None and key not in held:
                    held[key] = await loop.run_in_executor(None, self._load_blocking, name, *key)
                    log.info("model %s: version %s loaded from %s (the leader's routing)", name, *key)
                chosen[role] = held[key] if key is not None else None
            async with self._lock:
                self._set(
                    name, Routing(chosen["stable"], chosen["canary"], entry["canary_percent"], entry["mode"])
                )
            for version in held.values():
                if all(version is not kept for kept in chosen.values()):
                    self._retire(version)
        for name in set(self._routing) - set(models):
            await self._drop(name)

    async def _changed(self, name: str | None, result: dict[str, Any] | None = None) -> dict[str, Any]:
        """What an admin change answers: the model's status, and where there are several workers,
        which have the new routing (``replicate`` raises if one failed to take it)."""
        workers = await self.replicate() if self.replicate is not None else None
        result = result if result is not None else self.status(name)
        return result | {"workers": workers} if workers is not None else result

    def _save(self) -> None:
        if not self.persist:
            return
        models = self.snapshot()
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        leases = {
            name: {"owner": lease.owner, "expires_at": lease.expires_at, "record": lease.record}
            for name, lease in self._leases.items()
        }
        tmp.write_text(json.dumps({"models": models, "leases": leases}, indent=2))
        os.replace(tmp, self.state_file)

    # --- loading and retiring ---------------------------------------------------------------

    def _load_blocking(self, name: str, version: str, uri: str) -> Loaded:
        serving = self.settings.serving
        requested = uri
        uri, aliased = resolve(requested, self.settings.mlflow_url)
        if aliased is not None and aliased != version:
            raise InvalidInput(
                f"model '{name}': '{requested}' names version {aliased} now, not version {version}"
            )
        path = fetch(uri, self.cache_dir, self.settings.mlflow_url)
        model = VersionModel(name, version, read_bundle(path), serving.max_request_rows, self.threads)
        try:
            model.load()
        except MLOpsError:
            raise
        except Exception as exc:
            raise ModelNotReady(
                f"model '{name}' version {version} from '{uri}' failed to load: {exc}"
            ) from exc
        batcher = Batcher(
            model.compute,
            max_rows=serving.batch_max_rows,
            max_wait_ms=serving.batch_max_wait_ms,
            name=f"{name}-{version}",
            on_batch=metrics.batch_rows(name, version).observe,
        )
        return Loaded(model, batcher, uri, time.time())

    def _retire(self, loaded: Loaded) -> None:
        """Close a replaced version's batcher once no request is waiting on it."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            if not loaded.batcher.idle:
                loop.call_later(_RETIRE_CHECK_S, check)
            else:
                loaded.batcher.close()

        loop.call_later(_RETIRE_CHECK_S, check)


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
