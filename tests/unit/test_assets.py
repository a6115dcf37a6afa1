"""The operations files under docker/ are the rendering of the code that uses them."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

from monitoring.dashboards import grafana_dashboard, render_assets
from monitoring.logstore.search import DEFAULT_PREFIX, event_mappings
from tests.helpers import PROJECT_ROOT


def test_committed_assets_equal_the_rendering():
    for name, text in render_assets().items():
        assert (PROJECT_ROOT / "docker" / name).read_text() == text, (
            f"run: .venv/bin/mlops logs assets --output-dir docker ({name})"
        )


def test_the_index_template_is_the_one_the_store_installs():
    template = json.loads((PROJECT_ROOT / "docker" / "search" / "index-template-events.json").read_text())
    assert template["index_patterns"] == [f"{DEFAULT_PREFIX}-events-*"]
    assert template["template"]["mappings"] == event_mappings()
    assert template["template"]["settings"]["index.lifecycle.name"] == f"{DEFAULT_PREFIX}-retention"


def test_every_dashboard_query_names_a_metric_the_server_exports():
    import serving.logger.client  # noqa: F401  (registers the log metrics)
    import serving.metrics  # noqa: F401

    exported = {name for names in REGISTRY._collector_to_names.values() for name in names}
    for panel in grafana_dashboard()["panels"]:
        for name in re.findall(r"\bmlops_[a-z_]+", panel["targets"][0]["expr"]):
            assert name in exported, (panel["title"], name)
