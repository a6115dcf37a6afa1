"""The task's buttons in the Airflow UI: the report (a rollout's canary report, a window's
monitoring report), the MLflow version page, the model server's metrics.

An ``mlops`` command names its links in its JSON result (``"links": {"report": url, ...}``); the
operator stores each under its link's XCom key while the task runs, which is where Airflow 3's
UI reads an operator's extra links from (nothing is computed when the page is shown).
"""

from __future__ import annotations

from typing import Any

import attrs
from airflow.sdk import BaseOperatorLink


@attrs.define()
class MlopsLink(BaseOperatorLink):
    """One named link, read back from the XCom the task stored it in."""

    label: str
    key: str  # the name in the command's "links"

    @property
    def name(self) -> str:
        return self.label

    @property
    def xcom_key(self) -> str:
        return f"_link_mlops_{self.key}"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow.sdk.bases.xcom import BaseXCom as XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""


LINKS = (
    MlopsLink("Report", "report"),  # the canary report, or the monitoring report
    MlopsLink("MLflow model version", "version"),
    MlopsLink("Model server metrics", "metrics"),
)


def push_links(context: Any, result: Any) -> None:
    """Store the links a command's result names, for the task's buttons."""
    if not isinstance(result, dict) or not isinstance(result.get("links"), dict):
        return
    ti = context.get("ti") if hasattr(context, "get") else None
    if ti is None:
        return
    for link in LINKS:
        url = result["links"].get(link.key)
        if url:
            ti.xcom_push(key=link.xcom_key, value=url)
