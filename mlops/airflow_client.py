"""A small client for Airflow's REST API (v2): how the runtime side triggers and follows DAG runs.

It speaks HTTP only, so the runtime environment never imports Airflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from common.errors import BackendUnavailable, MLOpsError

FINISHED = ("success", "failed")


@dataclass(frozen=True)
class DagRun:
    dag_id: str
    run_id: str
    state: str
    url: str  # the run in the Airflow UI


class AirflowClient:
    def __init__(self, url: str, user: str, password: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)
        response = self._call("POST", "/auth/token", json={"username": user, "password": password})
        self._http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``; raise with its import error if any."""
        deadline = time.monotonic() + timeout_s
        while True:
            response = self._http.get(f"/api/v2/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            errors = self._call("GET", "/api/v2/importErrors").json().get("import_errors", [])
            if errors:
                first = errors[0]
                raise MLOpsError(
                    f"Airflow could not import {first['filename']}: {first['stack_trace'].strip()[-500:]}"
                )
            if time.monotonic() > deadline:
                raise MLOpsError(f"DAG '{dag_id}' did not appear in Airflow within {timeout_s:.0f} s")
            time.sleep(1.0)

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> DagRun:
        body = self._call(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}
        )
        return self._run(body.json())

    def wait_for_run(
        self, run: DagRun, timeout_s: float = 300.0, progress: Callable[[str], None] | None = None
    ) -> DagRun:
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            current = self.get_run(run.dag_id, run.run_id)
            if progress is not None and current.state != last:
                progress(f"{run.dag_id} {run.run_id}: {current.state}")
                last = current.state
            if current.state in FINISHED:
                return current
            if time.monotonic() > deadline:
                raise MLOpsError(
                    f"DAG run {run.dag_id}/{run.run_id} still {current.state} after {timeout_s:.0f} s"
                )
            time.sleep(1.0)

    def runs(self, dag_id: str, limit: int = 50) -> list[DagRun]:
        """The DAG's newest runs, newest first (however they were started: asset event, by hand)."""
        body = self._call(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": limit}
        ).json()
        return [self._run(run) for run in body["dag_runs"]]

    def get_run(self, dag_id: str, run_id: str) -> DagRun:
        return self._run(self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json())

    def task_states(self, run: DagRun) -> dict[str, str]:
        body = self._call("GET", f"/api/v2/dags/{run.dag_id}/dagRuns/{run.run_id}/taskInstances").json()
        return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}

    def xcom(self, run: DagRun, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        path = f"/api/v2/dags/{run.dag_id}/dagRuns/{run.run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        params: dict[str, Any] = {"deserialize": True, "map_index": map_index}
        return self._call("GET", path, params=params).json()["value"]

    def asset_events(self, uri: str, limit: int = 10) -> tuple[str | None, list[dict[str, Any]]]:
        """The asset's page in the Airflow UI, and its newest events (None, [] if it has none yet)."""
        # Inactive ones too: an asset that only an alias's event named, and no DAG schedules on,
        # is made inactive by the scheduler's next clean-up, its events kept.
        params = {"uri_pattern": uri, "limit": 100, "only_active": False}
        assets = self._call("GET", "/api/v2/assets", params=params).json()["assets"]
        found = next((a for a in assets if a["uri"] == uri), None)
        if found is None:
            return None, []
        params = {"asset_id": found["id"], "order_by": "-timestamp", "limit": limit}
        events = self._call("GET", "/api/v2/assets/events", params=params).json()["asset_events"]
        return f"{self.url}/assets/{found['id']}", events

    def _run(self, body: dict[str, Any]) -> DagRun:
        return DagRun(
            dag_id=body["dag_id"],
            run_id=body["dag_run_id"],
            state=body["state"],
            url=f"{self.url}/dags/{body['dag_id']}/runs/{body['dag_run_id']}",
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"Airflow at {self.url} is unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise MLOpsError(
                f"Airflow {method} {path} answered {response.status_code}: {response.text[:300]}"
            )
        return response
