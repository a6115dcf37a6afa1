"""The search-server log store: Elasticsearch (official client) or OpenSearch (opensearch-py).

Both flavours share everything that matters, built once here: the index template and its
mappings, the bulk operations, the window query and its paging, the retention. Only the thin
client adapters differ (``_Elasticsearch``, ``_OpenSearch``): which library sends the request,
and where the retention policy lives (ILM on Elasticsearch, ISM on OpenSearch).

Layout: events in daily indices ``<prefix>-events-YYYY.MM.DD`` (UTC), ``_id`` = event_id and
written with ``create``, so a replayed event is a 409 and counted as a duplicate, never stored
twice; labels in ``<prefix>-feedback`` with ``_id`` = ``request_id:row``. Inputs and outputs are
kept in ``_source`` but not indexed (``enabled: false``): every model has its own features, and
mapping them all would explode the mapping; readers get them back whole.

Reads sort on (ts_ms, event_id), a total order, and page with ``search_after``: exact past the
10,000-hit window, and for past windows (whose events no longer change) consistent without a
point in time. Retention: the ILM/ISM policy where the server has one, and ``prune`` (whole
daily indices) everywhere.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

from common.errors import BackendRefused, BackendUnavailable, ConfigError
from monitoring.events import (
    Feedback,
    InferenceEvent,
    Labelled,
    MalformedEvent,
    RequestBatch,
    RowBlock,
    event_block,
)
from monitoring.logstore import ReadStats, WriteResult, timeout_ms

log = logging.getLogger(__name__)
PAGE = 2000
DEFAULT_PREFIX = "mlops-inference"

# --- what both flavours share ---------------------------------------------------------------------


def events_pattern(prefix: str) -> str:
    return f"{prefix}-events-*"


def events_index(prefix: str, ts_ms: int) -> str:
    day = dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime("%Y.%m.%d")
    return f"{prefix}-events-{day}"


def feedback_index(prefix: str) -> str:
    return f"{prefix}-feedback"


def windows_index(prefix: str) -> str:
    return f"{prefix}-monitoring"


def windows_template(prefix: str) -> dict[str, Any]:
    """Monitoring's window summaries: the fields dashboards filter and plot on are mapped; the
    histograms and checks stay in _source."""
    keyword = {"type": "keyword"}
    return {
        "index_patterns": [windows_index(prefix)],
        "priority": 200,
        "template": {
            "settings": {"number_of_shards": 1, "number_of_replicas": 1},
            "mappings": {
                "dynamic": False,
                "properties": {
                    "id": keyword,
                    "model": keyword,
                    "version": keyword,
                    "decision": keyword,
                    "tripped": keyword,
                    "emitted": {"type": "boolean"},
                    "start_ms": {"type": "date", "format": "epoch_millis"},
                    "end_ms": {"type": "date", "format": "epoch_millis"},
                    "events": {"type": "long"},
                    "outlier_rate": {"type": "float"},
                    "accuracy": {"type": "float"},
                    "max_effect": {"type": "float"},
                    "report": keyword,
                },
            },
        },
    }


def event_mappings() -> dict[str, Any]:
    keyword = {"type": "keyword"}
    return {
        "dynamic": "strict",
        "properties": {
            "schema_version": {"type": "short"},
            "event_id": keyword,
            "ts_ms": {"type": "date", "format": "epoch_millis"},
            "model": keyword,
            "version": keyword,
            "role": keyword,
            "request_id": keyword,
            "row": {"type": "integer"},
            "latency_ms": {"type": "float"},
            "status": keyword,
            "error": {"type": "text"},
            "inputs": {"type": "object", "enabled": False},
            "outputs": {"type": "object", "enabled": False},
        },
    }


def index_template(prefix: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "index_patterns": [events_pattern(prefix)],
        "priority": 200,
        "template": {
            "settings": {"number_of_shards": 1, "number_of_replicas": 1, **(settings or {})},
            "mappings": event_mappings(),
        },
        "_meta": {"description": "mlops inference events, one document per predicted row"},
    }


def feedback_template(prefix: str) -> dict[str, Any]:
    return {
        "index_patterns": [feedback_index(prefix)],
        "priority": 200,
        "template": {
            "settings": {"number_of_shards": 1, "number_of_replicas": 1},
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "request_id": {"type": "keyword"},
                    "row": {"type": "integer"},
                    "ts_ms": {"type": "date", "format": "epoch_millis"},
                    # {"value": <label>}: any JSON label, kept in _source, not indexed
                    "label": {"type": "object", "enabled": False},
                },
            },
        },
    }


def bulk_operations(events: Sequence[InferenceEvent], prefix: str) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for event in events:
        ops.append({"create": {"_index": events_index(prefix, event.ts_ms), "_id": event.event_id}})
        ops.append(event.to_dict())
    return ops


def window_query(
    model: str | None, start_ms: int | None, end_ms: int | None, version: str | None, role: str | None
) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if model is not None:
        filters.append({"term": {"model": model}})
    if start_ms is not None or end_ms is not None:
        bounds = {"format": "epoch_millis"}
        if start_ms is not None:
            bounds["gte"] = start_ms
        if end_ms is not None:
            bounds["lt"] = end_ms
        filters.append({"range": {"ts_ms": bounds}})
    for field, value in (("version", version), ("role", role)):
        if value is not None:
            filters.append({"term": {field: value}})
    return {"bool": {"filter": filters}}


def page_request(
    query: dict[str, Any], after: list[Any] | None, size: int = PAGE, descending: bool = False
) -> dict[str, Any]:
    order = "desc" if descending else "asc"
    body: dict[str, Any] = {
        "query": query,
        "sort": [{"ts_ms": {"order": order}}, {"event_id": {"order": order}}],
        "size": size,
        "track_total_hits": False,
    }
    if after is not None:
        body["search_after"] = after
    return body


def ilm_policy(retention_days: int) -> dict[str, Any]:
    return {
        "phases": {
            "hot": {"actions": {}},
            "delete": {"min_age": f"{retention_days}d", "actions": {"delete": {}}},
        }
    }


def ism_policy(retention_days: int, prefix: str) -> dict[str, Any]:
    return {
        "policy": {
            "description": f"mlops inference events: delete after {retention_days} days",
            "default_state": "hot",
            "states": [
                {
                    "name": "hot",
                    "actions": [],
                    "transitions": [
                        {"state_name": "delete", "conditions": {"min_index_age": f"{retention_days}d"}}
                    ],
                },
                {"name": "delete", "actions": [{"delete": {}}], "transitions": []},
            ],
            "ism_template": [{"index_patterns": [events_pattern(prefix)], "priority": 100}],
        }
    }


# --- the two client libraries ---------------------------------------------------------------------


class _Client(Protocol):
    flavour: str

    def bulk(self, operations: list[dict[str, Any]]) -> dict[str, Any]: ...
    def search(self, index: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def put_template(self, name: str, body: dict[str, Any]) -> None: ...
    def put_retention(self, name: str, retention_days: int, prefix: str) -> bool: ...
    def indices(self, pattern: str) -> list[str]: ...
    def delete_index(self, name: str) -> None: ...
    def refresh(self, pattern: str) -> None: ...
    def ping(self) -> None: ...


class _Elasticsearch:
    flavour = "elasticsearch"

    def __init__(self, url: str, timeout_s: float, **auth: Any) -> None:
        from elasticsearch import Elasticsearch

        self._es = Elasticsearch(url, request_timeout=timeout_s, max_retries=1, retry_on_timeout=True, **auth)

    def _call(self, what: str, call: Any) -> Any:
        import elasticsearch

        try:
            return call()
        except elasticsearch.ApiError as exc:
            if exc.meta.status == 429 or exc.meta.status >= 500:
                raise BackendUnavailable(f"Elasticsearch: {what}: {exc}") from exc
            raise BackendRefused(f"Elasticsearch refused {what} ({exc.meta.status}): {exc}") from exc
        except (elasticsearch.ConnectionError, elasticsearch.TransportError) as exc:
            raise BackendUnavailable(f"Elasticsearch is unreachable ({what}): {exc}") from exc

    def bulk(self, operations: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("bulk", lambda: self._es.bulk(operations=operations).body)

    def search(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(
            "search",
            lambda: self._es.search(index=index, ignore_unavailable=True, allow_no_indices=True, **body).body,
        )

    def put_template(self, name: str, body: dict[str, Any]) -> None:
        self._call("index template", lambda: self._es.indices.put_index_template(name=name, **body))

    def put_retention(self, name: str, retention_days: int, prefix: str) -> bool:
        try:
            self._call(
                "ILM policy", lambda: self._es.ilm.put_lifecycle(name=name, policy=ilm_policy(retention_days))
            )
        except BackendRefused as exc:
            log.warning("no ILM on this server (%s): retention by `prune` only", exc)
            return False
        return True

    def indices(self, pattern: str) -> list[str]:
        rows = self._call("cat indices", lambda: self._es.cat.indices(index=pattern, format="json").body)
        return sorted(row["index"] for row in rows)

    def delete_index(self, name: str) -> None:
        self._call("delete index", lambda: self._es.indices.delete(index=name))

    def refresh(self, pattern: str) -> None:
        self._call(
            "refresh",
            lambda: self._es.indices.refresh(index=pattern, ignore_unavailable=True, allow_no_indices=True),
        )

    def ping(self) -> None:
        self._call("info", lambda: self._es.info())


class _OpenSearch:
    flavour = "opensearch"

    def __init__(self, url: str, timeout_s: float, **auth: Any) -> None:
        from opensearchpy import OpenSearch

        options: dict[str, Any] = {"timeout": timeout_s, "max_retries": 1, "retry_on_timeout": True}
        if auth.get("basic_auth"):
            options["http_auth"] = auth["basic_auth"]
        if auth.get("api_key"):
            options["headers"] = {"Authorization": f"ApiKey {auth['api_key']}"}
        if "verify_certs" in auth:
            options["verify_certs"] = auth["verify_certs"]
        self._os = OpenSearch(hosts=[url], **options)

    def _call(self, what: str, call: Any) -> Any:
        from opensearchpy import exceptions

        try:
            return call()
        except exceptions.ConnectionError as exc:
            raise BackendUnavailable(f"OpenSearch is unreachable ({what}): {exc}") from exc
        except exceptions.TransportError as exc:
            status = exc.status_code if isinstance(exc.status_code, int) else 0
            if status == 429 or status >= 500:
                raise BackendUnavailable(f"OpenSearch: {what}: {exc}") from exc
            refused = BackendRefused(f"OpenSearch refused {what} ({status}): {exc}")
            refused.status = status  # type: ignore[attr-defined]
            raise refused from exc

    def bulk(self, operations: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("bulk", lambda: self._os.bulk(body=operations))

    def search(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        params = {"ignore_unavailable": "true", "allow_no_indices": "true"}
        return self._call("search", lambda: self._os.search(index=index, body=body, params=params))

    def put_template(self, name: str, body: dict[str, Any]) -> None:
        self._call("index template", lambda: self._os.indices.put_index_template(name=name, body=body))

    def put_retention(self, name: str, retention_days: int, prefix: str) -> bool:
        path = f"/_plugins/_ism/policies/{name}"
        try:
            self._call(
                "ISM policy",
                lambda: self._os.transport.perform_request(
                    "PUT", path, body=ism_policy(retention_days, prefix)
                ),
            )
        except BackendRefused as exc:
            if getattr(exc, "status", None) == 409:  # already there
                return True
            log.warning("no ISM on this server (%s): retention by `prune` only", exc)
            return False
        return True

    def indices(self, pattern: str) -> list[str]:
        rows = self._call("cat indices", lambda: self._os.cat.indices(index=pattern, format="json"))
        return sorted(row["index"] for row in rows)

    def delete_index(self, name: str) -> None:
        self._call("delete index", lambda: self._os.indices.delete(index=name))

    def refresh(self, pattern: str) -> None:
        params = {"ignore_unavailable": "true", "allow_no_indices": "true"}
        self._call("refresh", lambda: self._os.indices.refresh(index=pattern, params=params))

    def ping(self) -> None:
        self._call("info", lambda: self._os.info())


# --- the store ------------------------------------------------------------------------------------


class SearchLogStore:
    def __init__(
        self, url: str, client: _Client, prefix: str = DEFAULT_PREFIX, retention_days: int = 30
    ) -> None:
        self.url = url
        self.client = client
        self.prefix = prefix
        self.retention_days = retention_days
        self._ready = False

    def _ensure_setup(self) -> None:
        """Template and retention policy, once per process (idempotent on the server)."""
        if self._ready:
            return
        policy = f"{self.prefix}-retention"
        settings: dict[str, Any] = {}
        if (
            self.client.put_retention(policy, self.retention_days, self.prefix)
            and self.client.flavour == "elasticsearch"
        ):
            settings["index.lifecycle.name"] = policy
        self.client.put_template(f"{self.prefix}-events", index_template(self.prefix, settings))
        self.client.put_template(f"{self.prefix}-feedback", feedback_template(self.prefix))
        self.client.put_template(f"{self.prefix}-monitoring", windows_template(self.prefix))
        self._ready = True

    # --- writes ------------------------------------------------------------------------------

    def write(self, events: Sequence[InferenceEvent]) -> WriteResult:
        if not events:
            return WriteResult(0, 0, [])
        self._ensure_setup()
        response = self.client.bulk(bulk_operations(events, self.prefix))
        written = duplicates = 0
        rejected: list[str] = []
        retry = []
        for item in response.get("items", []):
            result = item.get("create", {})
            status = result.get("status", 500)
            if status in (200, 201):
                written += 1
            elif status == 409:
                duplicates += 1
            elif status == 429 or status >= 500:
                retry.append(result.get("_id"))
            else:
                reason = (result.get("error") or {}).get("reason", f"status {status}")
                rejected.append(f"{result.get('_id')}: {reason}")
        if retry:
            # Stored ones are kept (create is idempotent): the caller retries the batch later.
            raise BackendUnavailable(
                f"{self.client.flavour}: {len(retry)} of {len(events)} events refused for now"
            )
        return WriteResult(written, duplicates, rejected)

    def write_requests(self, batches: Sequence[RequestBatch]) -> WriteResult:
        events: list[InferenceEvent] = []
        unreadable: list[str] = []
        for batch in batches:
            for index, request in enumerate(batch.requests()):
                try:
                    if request is None:
                        raise MalformedEvent("not a logged request")
                    events += request.events()
                except MalformedEvent as exc:
                    unreadable.append(f"{batch.event_id(index)}: {exc}")
        result = self.write(events)
        return WriteResult(result.written, result.duplicates, unreadable + result.rejected)

    def write_feedback(self, feedback: Sequence[Feedback]) -> WriteResult:
        """``create`` keeps the first label of a key (409: counted as kept), ``index`` overwrites."""
        if not feedback:
            return WriteResult(0, 0, [])
        self._ensure_setup()
        ops: list[dict[str, Any]] = []
        for item in feedback:
            ops.append(
                {
                    "index" if item.overwrite else "create": {
                        "_index": feedback_index(self.prefix),
                        "_id": item.key,
                    }
                }
            )
            ops.append({"request_id": item.request_id, "row": item.row, "ts_ms": item.ts_ms, "label": {"value": item.label}})  # fmt: skip
        written = kept = retry = 0
        rejected: list[str] = []
        for item in self.client.bulk(ops).get("items", []):
            result = next(iter(item.values()), {})
            status = result.get("status", 500)
            if status < 300:
                written += 1
            elif status == 409:
                kept += 1
            elif status == 429 or status >= 500:
                retry += 1
            else:
                reason = (result.get("error") or {}).get("reason", f"status {status}")
                rejected.append(f"{result.get('_id')}: {reason}")
        if retry:  # stored ones are kept, and a label written again is the same label
            raise BackendUnavailable(
                f"{self.client.flavour}: {retry} of {len(feedback)} labels refused for now"
            )
        return WriteResult(written, kept, rejected)

    def labels(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Any]:
        found = self._labels([f"{request_id}:{row}" for request_id, row in keys])
        return {key: found[f"{key[0]}:{key[1]}"] for key in keys if f"{key[0]}:{key[1]}" in found}

    def known_requests(self, request_ids: Sequence[str], since_ms: int) -> set[str]:
        """One terms aggregation over the whole log (request ids are indexed)."""
        wanted = sorted(set(request_ids))
        if not wanted:
            return set()
        body = {
            "size": 0,
            "query": {"terms": {"request_id": wanted}},
            "aggs": {"ids": {"terms": {"field": "request_id", "size": len(wanted)}}},
        }
        response = self.client.search(events_pattern(self.prefix), body)
        return {b["key"] for b in (response.get("aggregations") or {}).get("ids", {}).get("buckets", [])}

    def write_window(self, summary: Mapping[str, Any]) -> None:
        self._ensure_setup()
        ops = [{"index": {"_index": windows_index(self.prefix), "_id": str(summary["id"])}}, dict(summary)]
        for item in self.client.bulk(ops).get("items", []):
            result = next(iter(item.values()), {})
            status = result.get("status", 500)
            if status == 429 or status >= 500:
                raise BackendUnavailable(f"{self.client.flavour}: the window summary was refused for now")
            if status >= 300:
                reason = (result.get("error") or {}).get("reason", f"status {status}")
                raise BackendRefused(f"{self.client.flavour}: the window summary was refused: {reason}")
        self.client.refresh(windows_index(self.prefix))

    def windows(self, model: str, before_ms: int, limit: int) -> list[dict[str, Any]]:
        if not self.client.indices(windows_index(self.prefix) + "*"):  # none yet (a name alone: 404)
            return []
        body = {
            "query": {
                "bool": {"filter": [{"term": {"model": model}}, {"range": {"end_ms": {"lte": before_ms}}}]}
            },
            "sort": [{"end_ms": "desc"}, {"id": "asc"}],
            "size": limit,
        }
        hits = self.client.search(windows_index(self.prefix), body)["hits"]["hits"]
        return [hit["_source"] for hit in hits][::-1]

    def refresh(self) -> None:
        """Make what was written visible to searches now (else within the refresh interval)."""
        self.client.refresh(f"{events_pattern(self.prefix)},{feedback_index(self.prefix)}")

    # --- reads -------------------------------------------------------------------------------

    def query(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        role: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[InferenceEvent]:
        for page in self._pages(window_query(model, start_ms, end_ms, version, role)):
            yield from _events(page, stats)

    def labelled(
        self,
        model: str,
        start_ms: int,
        end_ms: int,
        version: str | None = None,
        stats: ReadStats | None = None,
    ) -> Iterator[Labelled]:
        for page in self._pages(window_query(model, start_ms, end_ms, version, None)):
            events = list(_events(page, stats))
            labels = self._labels([f"{e.request_id}:{e.row}" for e in events])
            for event in events:
                yield Labelled(event, labels.get(f"{event.request_id}:{event.row}"))

    def blocks(
        self, model: str, start_ms: int, end_ms: int, stats: ReadStats | None = None
    ) -> Iterator[RowBlock]:
        """A block per event: the search stores keep a document per row."""
        for event in self.query(model, start_ms, end_ms, stats=stats):
            yield event_block(event)

    def request_labels(self, request_ids: Sequence[str]) -> dict[tuple[str, int], Any]:
        """A terms query on the requests' ids, paged by (request_id, row)."""
        found: dict[tuple[str, int], Any] = {}
        if not request_ids:
            return found
        body: dict[str, Any] = {
            "query": {"terms": {"request_id": sorted(set(request_ids))}},
            "sort": [{"request_id": "asc"}, {"row": "asc"}],
            "size": PAGE,
        }
        while True:
            hits = self.client.search(feedback_index(self.prefix), body)["hits"]["hits"]
            for hit in hits:
                source = hit["_source"]
                found[(source["request_id"], int(source["row"]))] = (source.get("label") or {}).get("value")
            if len(hits) < PAGE:
                return found
            body["search_after"] = hits[-1]["sort"]

    def _labels(self, keys: list[str]) -> dict[str, Any]:
        if not keys:
            return {}
        body = {"query": {"ids": {"values": keys}}, "size": len(keys)}
        hits = self.client.search(feedback_index(self.prefix), body)["hits"]["hits"]
        return {hit["_id"]: (hit["_source"].get("label") or {}).get("value") for hit in hits}

    def _pages(self, query: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        after = None
        while True:
            hits = self.client.search(events_pattern(self.prefix), page_request(query, after))["hits"]["hits"]
            if hits:
                yield hits
            if len(hits) < PAGE:
                return
            after = hits[-1]["sort"]

    def count(
        self, model: str, start_ms: int, end_ms: int, version: str | None = None, role: str | None = None
    ) -> int:
        body = {
            "query": window_query(model, start_ms, end_ms, version, role),
            "size": 0,
            "track_total_hits": True,
        }
        return int(self.client.search(events_pattern(self.prefix), body)["hits"]["total"]["value"])

    def models(self) -> list[str]:
        body = {"size": 0, "aggs": {"models": {"terms": {"field": "model", "size": 1000}}}}
        response = self.client.search(events_pattern(self.prefix), body)
        return sorted(
            b["key"] for b in (response.get("aggregations") or {}).get("models", {}).get("buckets", [])
        )

    def latest(self, model: str | None, limit: int) -> list[InferenceEvent]:
        body = page_request(window_query(model, None, None, None, None), None, size=limit, descending=True)
        hits = self.client.search(events_pattern(self.prefix), body)["hits"]["hits"]
        return list(_events(hits, None))[::-1]

    def prune(self, older_than_ms: int) -> int:
        """Drop whole daily indices that end before the cutoff; returns how many."""
        cutoff = events_index(self.prefix, older_than_ms)
        gone = [name for name in self.client.indices(events_pattern(self.prefix)) if name < cutoff]
        for name in gone:
            self.client.delete_index(name)
        return len(gone)

    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        pass


def _events(hits: list[dict[str, Any]], stats: ReadStats | None) -> Iterator[InferenceEvent]:
    for hit in hits:
        try:
            yield InferenceEvent.from_dict(hit["_source"])
        except (MalformedEvent, KeyError):
            if stats is not None:
                stats.malformed += 1


def search_log_store(
    url: str,
    index_prefix: str = DEFAULT_PREFIX,
    retention_days: int = 30,
    username: str | None = None,
    password: str | None = None,
    api_key: str | None = None,
    verify_certs: bool = True,
) -> SearchLogStore:
    parsed = urlparse(url)
    flavour, _, transport = parsed.scheme.partition("+")
    if not parsed.hostname:
        raise ConfigError(f"log store '{url}': no host (expected {flavour}://host:9200)")
    endpoint = f"{transport or 'http'}://{parsed.hostname}:{parsed.port or 9200}{parsed.path}"
    auth: dict[str, Any] = {"verify_certs": verify_certs} if (transport == "https") else {}
    if username:
        auth["basic_auth"] = (username, password or "")
    if api_key:
        auth["api_key"] = api_key
    timeout_s = timeout_ms(url, default=10_000) / 1000
    kind = _Elasticsearch if flavour == "elasticsearch" else _OpenSearch
    client: _Client = kind(endpoint, timeout_s, **auth)
    return SearchLogStore(url, client, index_prefix, retention_days)
