"""Operations files, rendered from the code that uses them: search templates and retention
policies (the same objects the search log store installs), Kibana / OpenSearch Dashboards data
views and saved searches over the events and over monitoring's window summaries, a Grafana
dashboard for the model server's Prometheus metrics and one for the monitoring windows. `mlops logs assets --output-dir docker` writes them; a test keeps the
committed copies equal to this rendering.
"""

from __future__ import annotations

import json
from typing import Any

from monitoring.logstore.search import (
    DEFAULT_PREFIX,
    events_pattern,
    feedback_template,
    ilm_policy,
    index_template,
    ism_policy,
    windows_index,
    windows_template,
)


def render_assets(prefix: str = DEFAULT_PREFIX, retention_days: int = 30) -> dict[str, str]:
    """File path (under docker/) -> content."""
    policy = f"{prefix}-retention"
    files: dict[str, Any] = {
        "search/index-template-events.json": index_template(prefix, {"index.lifecycle.name": policy}),
        "search/index-template-feedback.json": feedback_template(prefix),
        "search/ilm-policy.json": {"policy": ilm_policy(retention_days)},
        "search/ism-policy.json": ism_policy(retention_days, prefix),
        "search/index-template-monitoring.json": windows_template(prefix),
        "grafana/mlops-serving.json": grafana_dashboard(),
        "grafana/mlops-monitoring.json": monitoring_dashboard(),
    }
    rendered = {path: json.dumps(body, indent=2) + "\n" for path, body in files.items()}
    rendered["search/kibana-saved-objects.ndjson"] = "".join(
        json.dumps(obj, separators=(",", ":")) + "\n" for obj in saved_objects(prefix)
    )
    return rendered


def saved_objects(prefix: str) -> list[dict[str, Any]]:
    """Data views over the events (time field ts_ms) and the monitoring windows (end_ms), and a
    saved search of the useful columns of each.

    Import with Kibana's or OpenSearch Dashboards' saved objects import (Stack Management).
    """
    return [
        *_view_and_search(
            f"{prefix}-events", events_pattern(prefix), "ts_ms", "mlops inference events",
            f"{prefix}-recent", "mlops: predictions",
            ["model", "version", "role", "status", "latency_ms", "request_id"],
        ),
        *_view_and_search(
            f"{prefix}-monitoring", windows_index(prefix), "end_ms", "mlops monitoring windows",
            f"{prefix}-windows", "mlops: monitoring windows",
            ["model", "version", "decision", "tripped", "events", "outlier_rate", "max_effect", "emitted", "report"],
        ),
    ]  # fmt: skip


def _view_and_search(
    view_id: str,
    title: str,
    time_field: str,
    name: str,
    search_id: str,
    search_title: str,
    columns: list[str],
) -> list[dict[str, Any]]:
    return [
        {
            "type": "index-pattern",
            "id": view_id,
            "attributes": {"title": title, "timeFieldName": time_field, "name": name},
            "references": [],
        },
        {
            "type": "search",
            "id": search_id,
            "attributes": {
                "title": search_title,
                "columns": columns,
                "sort": [[time_field, "desc"]],
                "kibanaSavedObjectMeta": {
                    "searchSourceJSON": json.dumps(
                        {
                            "query": {"query": "", "language": "kuery"},
                            "filter": [],
                            "indexRefName": "kibanaSavedObjectMeta.searchSourceJSON.index",
                        }
                    )
                },
            },
            "references": [
                {
                    "name": "kibanaSavedObjectMeta.searchSourceJSON.index",
                    "type": "index-pattern",
                    "id": view_id,
                }
            ],
        },
    ]


def grafana_dashboard() -> dict[str, Any]:
    """Requests, errors, latency per model/version/role; batching; the inference log's health."""
    panels = [
        (
            "Requests per second by version and role",
            'sum by (model, version, role) (rate(mlops_requests_total{code="200"}[1m]))',
            "reqps",
        ),
        ("Errors per second by code", "sum by (model, code) (rate(mlops_request_errors_total[1m]))", "reqps"),
        (
            "p50 latency by version",
            "histogram_quantile(0.5, sum by (le, model, version) (rate(mlops_request_latency_seconds_bucket[5m])))",
            "s",
        ),
        (
            "p99 latency by version",
            "histogram_quantile(0.99, sum by (le, model, version) (rate(mlops_request_latency_seconds_bucket[5m])))",
            "s",
        ),
        (
            "Rows per compute batch (mean)",
            "sum by (model, version) (rate(mlops_batch_rows_sum[5m])) / sum by (model, version) (rate(mlops_batch_rows_count[5m]))",
            "none",
        ),
        ("Loaded versions", "mlops_model_loaded == 1", "none"),
        ("Inference log: queue depth", "mlops_log_queue_depth", "none"),
        ("Inference log: events in the spool", "mlops_log_spool_events", "none"),
        ("Inference log: store up", "mlops_log_store_up", "none"),
        (
            "Inference log: events dropped (by reason), rejected and dead-lettered per second",
            "sum by (reason) (rate(mlops_log_events_dropped_total[5m]))"
            " or label_replace(rate(mlops_log_events_rejected_total[5m]), 'reason', 'rejected', '', '')"
            " or label_replace(sum by (reason) (rate(mlops_log_events_dead_lettered_total[5m])),"
            " 'reason', 'dead-lettered: $1', 'reason', '(.*)')",
            "none",
        ),
        (
            "Labels: kept (a row had one) and for unknown requests, per second",
            "label_replace(rate(mlops_feedback_kept_total[5m]), 'what', 'kept', '', '')"
            " or label_replace(rate(mlops_feedback_unknown_total[5m]), 'what', 'unknown', '', '')",
            "none",
        ),
        (
            "Shadow failures and drops per second",
            "label_replace(sum by (model, version) (rate(mlops_shadow_failures_total[5m])), 'what', 'failed', '', '')"
            " or label_replace(sum by (model, version) (rate(mlops_shadow_dropped_total[5m])), 'what', 'dropped', '', '')",
            "none",
        ),
        (
            "Unseen categories per second",
            "sum by (model, version) (rate(mlops_unknown_categories_total[5m]))",
            "none",
        ),
    ]
    return _dashboard(
        "mlops: model serving", "mlops-serving", "10s", "now-1h", "prometheus", "Prometheus",
        [(title, {"refId": "A", "expr": expr, "legendFormat": "__auto"}, unit) for title, expr, unit in panels],
    )  # fmt: skip


def monitoring_dashboard() -> dict[str, Any]:
    """Monitoring's window summaries (the log store's ``<prefix>-monitoring`` index) through an
    Elasticsearch / OpenSearch data source: decisions, effect sizes, outlier rates, accuracy."""

    def target(metric: dict[str, Any], query: str = "") -> dict[str, Any]:
        return {
            "refId": "A",
            "query": query,
            "timeField": "end_ms",
            "metrics": [{"id": "1", **metric}],
            "bucketAggs": [
                {"id": "2", "type": "terms", "field": "version", "settings": {"size": "10", "order": "desc"}},
                {"id": "3", "type": "date_histogram", "field": "end_ms", "settings": {"interval": "auto"}},
            ],
        }

    panels = [
        ("Tripped windows by version", target({"type": "count"}, "decision:tripped"), "none"),
        (
            "Largest effect against its threshold (1: at it)",
            target({"type": "max", "field": "max_effect"}),
            "none",
        ),
        ("Outlier rate", target({"type": "max", "field": "outlier_rate"}), "percentunit"),
        ("Accuracy where labels came back", target({"type": "avg", "field": "accuracy"}), "percentunit"),
        ("Events per window", target({"type": "sum", "field": "events"}), "none"),
        ("Triggers raised", target({"type": "count"}, "emitted:true"), "none"),
    ]
    return _dashboard(
        "mlops: monitoring windows", "mlops-monitoring", "1m", "now-7d", "elasticsearch",
        "The log store (index <prefix>-monitoring, time field end_ms)", panels,
    )  # fmt: skip


def _dashboard(
    title: str,
    uid: str,
    refresh: str,
    since: str,
    source: str,
    source_label: str,
    panels: list[tuple[str, dict[str, Any], str]],
) -> dict[str, Any]:
    """A Grafana dashboard of time series, two a row, each (title, query target, unit), all on
    the data source the dashboard's ``datasource`` variable picks (of type ``source``)."""
    return {
        "title": title,
        "uid": uid,
        "schemaVersion": 39,
        "version": 1,
        "refresh": refresh,
        "time": {"from": since, "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": source, "label": source_label}]
        },
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": {"type": source, "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [target],
            }
            for i, (panel_title, target, unit) in enumerate(panels)
        ],
    }
