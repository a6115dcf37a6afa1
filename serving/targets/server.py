"""The deployment target for this project's model server: its admin API over HTTP."""

from __future__ import annotations

from typing import Any

import httpx

from common.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    MLOpsError,
    ModelNotFound,
    ModelNotReady,
)
from serving.router import Mode, Role
from serving.targets import Deployment, VersionRef

# The admin API's status codes, back to the errors the server raised.
_ERRORS: dict[int, type[MLOpsError]] = {
    400: InvalidInput,
    404: ModelNotFound,
    413: InvalidInput,
    503: ModelNotReady,
}


class ServerTarget:
    def __init__(self, url: str, token: str | None, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=f"{self.url}/admin/v1/models",
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=timeout_s,
        )

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

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Deployment:
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
        state = response.json()
        return Deployment(
            target=self.url,
            model=state["model"],
            stable=_ref(state.get("stable")),
            canary=_ref(state.get("canary")),
            canary_percent=state["canary_percent"],
            mode=state["mode"],
            detail={role: state[role] for role in ("stable", "canary") if state.get(role)},
        )


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _ref(entry: dict[str, Any] | None) -> VersionRef | None:
    return VersionRef(entry["version"], entry["uri"]) if entry else None
