"""The registry watcher: an approval in MLflow becomes an asset event that starts the deploy DAG.

A version counts as approved when the alias (``challenger``) names it, when it carries the approval
tag (``approval=approved``), or, with ``legacy_stage``, when it is the latest version in ``Staging``.
The trigger reads that state on every poll, not a change feed, so an approval made while Airflow
was down is found at the first poll. What has been fired lives in MLflow, on the version itself:

- no ``rollout`` tag: pending;
- ``rollout=queued``: fired at ``rollout.queued_at`` (epoch ms); pending again only once that is
  older than ``requeue_s`` (the event, or the run it started, was lost), or if it is missing;
- any other ``rollout`` (``in_progress``, ``promoted``, ``rolled_back``, ``replaced``): handled by
  the deploy DAG, never fired again.

Before an event is yielded the trigger tags the version ``rollout=queued`` with the time, and it
yields nothing if that fails: a version approved twice (alias and tag), seen by two polls or by a
new instance of the trigger is fired once.

What Airflow 3.3 does with it (``airflow/jobs/triggerer_job_runner.py``, read on 3.3.2): the
triggerer drives ``run()`` with ``async for`` and keeps iterating after each event, so one instance
yields many events and is not re-created per event; a new instance is made when the triggerer
restarts, the trigger moves to another triggerer, the DAG is paused and unpaused (a paused DAG's
watchers are dropped), or the watcher's kwargs change (a new Trigger row, found by
``BaseEventTrigger.hash`` of the serialized kwargs). None of that matters here, because the
instance keeps no state of its own: the tags in MLflow are the state.

One event a poll: the scheduler wakes an asset-scheduled DAG through one queue row per (asset,
DAG), written by the first event and not updated by later ones, and deletes it when it creates the
run, which consumes only the events up to that row's time. An event landing between the first
event and the run's creation is stranded until some later event (seen on 3.3.2 with SQLite, with
events 60 ms and 1.5 s apart; apache/airflow#54659, #56050). Spacing events a poll apart makes
that rarer; a stranded approval stays ``queued`` and is fired again after ``requeue_s``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from airflow.triggers.base import BaseEventTrigger, TriggerEvent

CLASSPATH = "mlops_airflow.approvals.ApprovalTrigger"
ROLLOUT_TAG = "rollout"
QUEUED_AT_TAG = "rollout.queued_at"
QUEUED = "queued"
STAGING = "Staging"
MAX_BACKOFF_S = 60.0
HTTP_TIMEOUT_S = 10.0
PAGE_SIZE = 1000  # the most registered-models/search accepts
# MLflow 3 keeps prompts as registered models; its own client leaves them out the same way.
NOT_A_PROMPT = "tags.`mlflow.prompt.is_prompt` != 'true'"


@dataclass(frozen=True)
class Approval:
    """One approved model version as the registry shows it, with its rollout tags."""

    model: str
    version: str
    signal: str  # the rule that approved it: "alias", "tag" or "stage"
    rollout: str | None = None
    queued_at_ms: int | None = None

    @classmethod
    def from_version(cls, version: Mapping[str, Any], signal: str) -> Approval:
        """From a model version as MLflow's REST API returns it (tags as a key/value list)."""
        tags = {tag["key"]: tag.get("value", "") for tag in version.get("tags", [])}
        return cls(
            model=version["name"],
            version=str(version["version"]),
            signal=signal,
            rollout=tags.get(ROLLOUT_TAG),
            queued_at_ms=_parse_ms(tags.get(QUEUED_AT_TAG)),
        )


def pending(approvals: Iterable[Approval], now_ms: int, requeue_s: float) -> list[Approval]:
    """The approvals to fire now: one per version (its first signal), not yet handled.

    A ``queued`` version without a readable ``rollout.queued_at`` counts as lost: left alone it
    would never be fired again.
    """
    seen: set[tuple[str, str]] = set()
    found: list[Approval] = []
    for approval in approvals:
        key = (approval.model, approval.version)
        if key in seen:
            continue
        seen.add(key)
        if _is_pending(approval, now_ms, requeue_s):
            found.append(approval)
    return found


def _is_pending(approval: Approval, now_ms: int, requeue_s: float) -> bool:
    if approval.rollout is None:
        return True
    if approval.rollout != QUEUED:
        return False  # in_progress, promoted, rolled_back, replaced: the deploy DAG has it
    return approval.queued_at_ms is None or now_ms - approval.queued_at_ms >= requeue_s * 1000


class RegistryError(Exception):
    """MLflow answered, but not with what a poll needs (an error status or an unreadable body)."""


class ApprovalTrigger(BaseEventTrigger):
    """Poll MLflow's model registry and yield one event per pending approval (at most one a poll).

    The event's payload is ``{"model", "version", "signal", "queued_at"}`` (version as MLflow
    spells it, a string; queued_at in epoch ms, as tagged on the version).

    :param mlflow_url: the tracking server, e.g. ``http://mlflow:5000``.
    :param poll_s: seconds between polls; after a failed poll the wait doubles, up to 60 s.
    :param alias: the alias that approves the version it names (with ``use_alias``).
    :param tag: ``key=value`` of the version tag that approves; ``""`` turns the tag off.
    :param use_alias: whether the alias approves.
    :param legacy_stage: whether the latest version in ``Staging`` approves too.
    :param models: the registered models to watch; ``None`` watches all of them.
    :param requeue_s: how long a ``queued`` version may wait for the deploy DAG to take it
        before its event is taken as lost and fired again.
    :param token_env: the variable holding a bearer token. ``MLFLOW_TRACKING_USERNAME`` and
        ``MLFLOW_TRACKING_PASSWORD``, when both set, give basic auth instead (MLflow's own
        client does the same). Secrets are read in the triggerer, never stored in the kwargs.
    """

    def __init__(
        self,
        mlflow_url: str,
        poll_s: float = 5.0,
        alias: str = "challenger",
        tag: str = "approval=approved",
        use_alias: bool = True,
        legacy_stage: bool = False,
        models: list[str] | None = None,
        requeue_s: float = 600.0,
        token_env: str = "MLFLOW_TRACKING_TOKEN",
    ) -> None:
        super().__init__()
        if not mlflow_url.startswith(("http://", "https://")):
            raise ValueError(f"mlflow_url {mlflow_url!r} is not an http(s) URL")
        if poll_s <= 0 or requeue_s <= 0:
            raise ValueError(f"poll_s ({poll_s}) and requeue_s ({requeue_s}) must be positive")
        self.tag_key, self.tag_value = _parse_tag(tag)
        if not (use_alias or tag or legacy_stage):
            raise ValueError("no approval rule is on: set use_alias, tag or legacy_stage")
        self.mlflow_url = mlflow_url.rstrip("/")
        # Normalised so that every parse of a DAG serializes the same kwargs, whatever their
        # spelling (5 or 5.0, models in any order): Airflow keys watcher triggers by them.
        self.poll_s = float(poll_s)
        self.alias = alias
        self.tag = tag
        self.use_alias = bool(use_alias)
        self.legacy_stage = bool(legacy_stage)
        self.models = sorted(set(models)) if models is not None else None
        self.requeue_s = float(requeue_s)
        self.token_env = token_env

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "mlflow_url": self.mlflow_url,
                "poll_s": self.poll_s,
                "alias": self.alias,
                "tag": self.tag,
                "use_alias": self.use_alias,
                "legacy_stage": self.legacy_stage,
                "models": self.models,
                "requeue_s": self.requeue_s,
                "token_env": self.token_env,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll for ever; an unreachable or failing MLflow is logged and waited out, never raised."""
        failures = 0
        async with self._client() as client:
            while True:
                try:
                    approvals = await self._approvals(client)
                except Exception as exc:  # a raising watcher is torn down and restarted by Airflow
                    failures += 1
                    delay_s = min(self.poll_s * 2**failures, MAX_BACKOFF_S)
                    self.log.warning(
                        "MLflow registry at %s: %s; next poll in %.1f s",
                        self.mlflow_url,
                        _describe(exc),
                        delay_s,
                    )
                    await asyncio.sleep(delay_s)
                    continue
                if failures:
                    self.log.info("MLflow registry at %s answers again", self.mlflow_url)
                    failures = 0
                for approval in pending(approvals, _now_ms(), self.requeue_s):
                    event = await self._claim(client, approval)
                    if event is not None:
                        yield event
                        break  # one event a poll: see "one event a poll" in the module's docstring
                await asyncio.sleep(self.poll_s)

    async def _approvals(self, client: httpx.AsyncClient) -> list[Approval]:
        """Every approved version, in the order of the rules (alias, tag, stage); may repeat one."""
        models = await self._registered_models(client) if self.use_alias or self.legacy_stage else []
        found: list[Approval] = []
        if self.use_alias:
            for model in models:
                # registered-models/search carries each model's aliases; version search results
                # carry none on SQL backends (mlflow#9783), so the aliased version is read alone.
                for alias in model.get("aliases", []):
                    if alias.get("alias") == self.alias:
                        params = {"name": model["name"], "version": alias["version"]}
                        body = await self._find(client, "GET", "model-versions/get", params)
                        if body is not None:
                            found.append(Approval.from_version(body["model_version"], "alias"))
        if self.tag:
            for version in await self._tagged_versions(client):
                if self.models is None or version["name"] in self.models:
                    found.append(Approval.from_version(version, "tag"))
        if self.legacy_stage:
            for model in models:
                for version in model.get("latest_versions", []):
                    if version.get("current_stage") == STAGING:
                        found.append(Approval.from_version(version, "stage"))
        return found

    async def _registered_models(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        if self.models is None:
            return await self._paged(
                client, "registered-models/search", "registered_models", {"filter": NOT_A_PROMPT}
            )
        models = []
        for name in self.models:  # by name: no quoting of names inside a filter string
            body = await self._find(client, "GET", "registered-models/get", {"name": name})
            if body is not None:
                models.append(body["registered_model"])
        return models

    async def _tagged_versions(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        query = f"tags.`{self.tag_key}` = '{self.tag_value}'"
        return await self._paged(client, "model-versions/search", "model_versions", {"filter": query})

    async def _claim(self, client: httpx.AsyncClient, approval: Approval) -> TriggerEvent | None:
        """Tag the version queued, then make its event; None if the tags could not be set.

        ``rollout`` goes first: if the time then fails to be set, the version reads as queued at
        an unknown time, which counts as lost, so the next poll claims it again.
        """
        queued_at_ms = _now_ms()
        where = f"model={approval.model!r} version={approval.version}"
        try:
            for key, value in ((ROLLOUT_TAG, QUEUED), (QUEUED_AT_TAG, str(queued_at_ms))):
                body = {"name": approval.model, "version": approval.version, "key": key, "value": value}
                await self._call(client, "POST", "model-versions/set-tag", body)
        except Exception as exc:
            self.log.warning("%s: approved (%s) but not queued: %s", where, approval.signal, _describe(exc))
            return None
        again = " again" if approval.rollout == QUEUED else ""
        self.log.info("%s: approved (%s), queued%s for deployment", where, approval.signal, again)
        return TriggerEvent(
            {
                "model": approval.model,
                "version": approval.version,
                "signal": approval.signal,
                "queued_at": queued_at_ms,
            }
        )

    async def _paged(
        self, client: httpx.AsyncClient, path: str, field: str, params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            page = {**params, "max_results": PAGE_SIZE, **({"page_token": token} if token else {})}
            body = await self._call(client, "GET", path, page)
            items.extend(body.get(field, []))
            token = body.get("next_page_token", "")
            if not token:
                return items

    @staticmethod
    async def _call(
        client: httpx.AsyncClient, method: str, path: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        """One REST call's JSON body; RegistryError for any answer but a 200 with a JSON object."""
        return _body(method, path, await _send(client, method, path, data))

    @staticmethod
    async def _find(
        client: httpx.AsyncClient, method: str, path: str, data: dict[str, Any]
    ) -> dict[str, Any] | None:
        """As _call, but None for a missing object (404): deleted since listed, or not registered yet."""
        response = await _send(client, method, path, data)
        return None if response.status_code == 404 else _body(method, path, response)

    def _client(self) -> httpx.AsyncClient:
        username = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        token = os.environ.get(self.token_env) if self.token_env else None
        auth: httpx.Auth | None = None
        headers = {}
        if username and password:
            auth = httpx.BasicAuth(username, password)
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.AsyncClient(
            base_url=f"{self.mlflow_url}/api/2.0/mlflow/", auth=auth, headers=headers, timeout=HTTP_TIMEOUT_S
        )


async def _send(client: httpx.AsyncClient, method: str, path: str, data: dict[str, Any]) -> httpx.Response:
    if method == "GET":
        return await client.get(path, params=data)
    return await client.post(path, json=data)


def _body(method: str, path: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        message = body.get("message") if isinstance(body, dict) else response.text[:200] or "(no body)"
        raise RegistryError(f"{method} {path}: HTTP {response.status_code}: {message}")
    return body


def _parse_tag(tag: str) -> tuple[str, str]:
    if not tag:
        return "", ""
    key, sep, value = tag.partition("=")
    # The pair goes into a filter string between ` and ': those characters would break it.
    if not sep or not key or any(c in tag for c in "`'\""):
        raise ValueError(f"tag {tag!r} is not key=value (without quotes), nor '' to turn it off")
    return key, value


def _parse_ms(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(exc: Exception) -> str:
    # httpx's ConnectError and its kin can have an empty message: the type says what happened.
    return str(exc) or type(exc).__name__
