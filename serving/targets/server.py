"""The deployment target for this project's model server: its admin API over HTTP."""

from __future__ import annotations

from typing import Any

import httpx

from common.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    LeaseHeld,
    MLOpsError,
    ModelNotFound,
    ModelNotReady,
)
from serving.router import Mode, Role
from serving.targets import Deployment, Lease, VersionRef

# The admin API's status codes, back to the errors the server raised.
_ERRORS: dict[int, type[MLOpsError]] = {
    400: InvalidInput,
    404: ModelNotFound,
    409: LeaseHeld,
    413: InvalidInput,
    503: ModelNotReady,
}


class ServerTarget:
    def __init__(
        self, url: str, token: str | None, timeout_s: float = 300.0, owner: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if owner:
            headers["x-mlops-lease-owner"] = owner
        self._http = httpx.Client(base_url=f"{self.url}/admin/v1/models", headers=headers, timeout=timeout_s)

    def deploy(self, model: str, version: str, uri: str, role: Role = "canary") -> Deployment:
        return self._call("POST", f"/{model}/versions", {"version": str(version), "uri": uri, "role": role})

    def set_traffic(self, model: str, canary_percent: float, mode: Mode = "split") -> Deployment:
        return self._call("PUT", f"/{model}/traffic", {"canary_percent": canary_percent, "mode": mode})

    def promote(self, model: str) -> Deployment:
        return self._call("POST", f"/{model}/promote")

    def rollback(self, model: str) -> Deployment:
        return self._call("POST", f"/{model}/rollback")

    def status(self, model: str) -> Deployment:
        return self._call("GET", f"/{model}")

    def take_lease(self, model: str, owner: str, ttl_s: float, record: dict | None = None) -> Lease:
        body: dict[str, Any] = {"owner": owner, "ttl_s": ttl_s}
        if record is not None:
            body["record"] = record
        return _lease(self._request("PUT", f"/{model}/lease", body))

    def release_lease(self, model: str, owner: str) -> Lease:
        return _lease(self._request("DELETE", f"/{model}/lease", {"owner": owner}))

    def lease(self, model: str) -> Lease:
        return _lease(self._request("GET", f"/{model}/lease"))

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Deployment:
        state = self._request(method, path, body)
        return Deployment(
            target=self.url,
            model=state["model"],
            stable=_ref(state.get("stable")),
            canary=_ref(state.get("canary")),
            canary_percent=state["canary_percent"],
            mode=state["mode"],
            detail={role: state[role] for role in ("stable", "canary") if state.get(role)},
        )

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"model server at {self.url} is unreachable: {exc}") from exc
        if response.status_code == 401:  # configuration, not a failure worth a retry
            raise ConfigError(
                f"model server at {self.url} refused the admin token ({_message(response)}); a target"
                " other than this stack's model server takes its own: MLOPS_SERVING__TARGET_TOKEN or --token-file"
            )
        if response.status_code != 200:
            raise _ERRORS.get(response.status_code, MLOpsError)(_message(response))
        return response.json()


def _lease(state: dict[str, Any]) -> Lease:
    return Lease(
        model=state["model"],
        owner=state.get("owner"),
        expires_at=state.get("expires_at"),
        record=state.get("record"),
        expired=state.get("expired"),
    )


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _ref(entry: dict[str, Any] | None) -> VersionRef | None:
    return VersionRef(entry["version"], entry["uri"]) if entry else None
