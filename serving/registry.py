"""The MLflow registry as the rollout sees it: versions, aliases, approval signals, tags.

What a version's rollout came to is kept on the version itself, in ``ROLLOUT_TAG`` (and the
``rollout.*`` tags beside it): the registry watcher, the deploy steps and a data scientist in the
MLflow UI read the same place.
"""

from __future__ import annotations

from typing import Any

from common.errors import BackendUnavailable, ModelNotFound, mlflow_not_found
from serving.policy import Approval

ROLLOUT_TAG = "rollout"  # queued | in_progress | promoted | rolled_back | replaced | insufficient
HANDLED = ("promoted", "rolled_back", "replaced", "insufficient")


class Registry:
    """The MLflow calls a rollout makes; every failure an ``MLOpsError`` naming the model."""

    def __init__(self, url: str) -> None:
        from mlflow import MlflowClient

        self.url = url
        self.client = MlflowClient(tracking_uri=url, registry_uri=url)

    def version(self, model: str, version: str) -> Any:
        """The registered version; ModelNotFound when the registry has none such, BackendUnavailable
        when it does not answer."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(model, version)
        except MlflowException as exc:
            if mlflow_not_found(exc):
                raise ModelNotFound(
                    f"model '{model}' version {version} is not in the registry at {self.url}"
                ) from exc
            raise BackendUnavailable(f"MLflow at {self.url}: {exc.message}") from exc

    def alias(self, model: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(model, alias).version)
        except MlflowException as exc:
            if mlflow_not_found(exc):
                return None
            raise BackendUnavailable(f"MLflow at {self.url}: {exc.message}") from exc

    def signal(self, model: str, version: Any, approval: Approval) -> str | None:
        """Which approval signal the version carries (None: not approved)."""
        if approval.alias and self.alias(model, approval.alias) == str(version.version):
            return f"alias {approval.alias}"
        pair = approval.tag_pair
        if pair and version.tags.get(pair[0]) == pair[1]:
            return f"tag {approval.tag}"
        if approval.legacy_stage and version.current_stage == "Staging":
            return "stage Staging"
        return None

    def approved(self, model: str, approval: Approval) -> str | None:
        """The version to roll out: the alias's, else the newest tagged (or staged) one not handled."""
        if approval.alias and (version := self.alias(model, approval.alias)):
            return version
        candidates = []
        pair = approval.tag_pair
        if pair:
            found = self.client.search_model_versions(f"name = '{model}' and tags.`{pair[0]}` = '{pair[1]}'")
            candidates += list(found)
        if approval.legacy_stage:
            candidates += [
                v
                for v in self.client.search_model_versions(f"name = '{model}'")
                if v.current_stage == "Staging"
            ]
        fresh = [v for v in candidates if v.tags.get(ROLLOUT_TAG) not in HANDLED]
        return str(max(fresh, key=lambda v: int(v.version)).version) if fresh else None

    def tag(self, model: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(model, version, key, str(value))

    def drop_alias_if(self, model: str, alias: str, version: str) -> bool:
        """Remove ``alias`` when it still names ``version`` (it may have moved to a newer one)."""
        if alias and self.alias(model, alias) == version:
            self.client.delete_registered_model_alias(model, alias)
            return True
        return False
