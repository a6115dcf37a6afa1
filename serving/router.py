"""Which version answers: the stable/canary split policy, and each model's routing snapshot.

The policy is a pure function. A model's routing is an immutable snapshot replaced in one
assignment: a request reads it once and keeps the versions it read, so loading, re-splitting,
promoting and rolling back never leave a request with a half-changed state or a half-loaded model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Generic, Literal, TypeVar

from common.errors import InvalidInput, ModelNotReady

Role = Literal["stable", "canary"]
Mode = Literal["split", "shadow"]
MODES: tuple[Mode, ...] = ("split", "shadow")
_BUCKETS = 10_000  # split resolution: 0.01 %


def choose_role(canary_percent: float, sticky_key: str | None, draw: float) -> Role:
    """``canary`` for ``canary_percent`` % of traffic, else ``stable``.

    With a sticky key (a user key or request id) the same key always lands on the same side for
    a given percentage, and raising the percentage only moves keys from stable to canary. Without
    one, ``draw`` (uniform in [0, 1)) decides.
    """
    if canary_percent <= 0:
        return "stable"
    if canary_percent >= 100:
        return "canary"
    if sticky_key is not None:
        bucket = zlib.crc32(sticky_key.encode()) % _BUCKETS
        return "canary" if bucket < canary_percent * (_BUCKETS // 100) else "stable"
    return "canary" if draw * 100 < canary_percent else "stable"


V = TypeVar("V")


@dataclass(frozen=True)
class Routing(Generic[V]):
    """One model's versions and split, as one value."""

    stable: V | None = None
    canary: V | None = None
    canary_percent: float = 0.0
    mode: Mode = "split"

    def pick(self, sticky_key: str | None, draw: float) -> tuple[V, Role, V | None]:
        """(version that answers, its role, version to mirror the request to in shadow mode)."""
        if self.stable is None:
            if self.canary is None:
                raise ModelNotReady("no version is loaded")
            return self.canary, "canary", None
        if self.canary is None:
            return self.stable, "stable", None
        if self.mode == "shadow":
            return self.stable, "stable", self.canary
        role = choose_role(self.canary_percent, sticky_key, draw)
        return (self.canary if role == "canary" else self.stable), role, None

    # Transitions: each returns the next snapshot; the caller assigns it.

    def with_version(self, version: V, role: Role) -> Routing[V]:
        if role == "stable" or self.stable is None:
            return replace(self, stable=version)
        return replace(self, canary=version)

    def with_traffic(self, canary_percent: float, mode: Mode) -> Routing[V]:
        if not 0 <= canary_percent <= 100:
            raise InvalidInput(f"canary_percent must be between 0 and 100, got {canary_percent}")
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        return replace(self, canary_percent=canary_percent, mode=mode)

    def promoted(self) -> Routing[V]:
        if self.canary is None:
            raise InvalidInput("there is no canary to promote")
        return Routing(stable=self.canary, canary=None, canary_percent=0.0, mode="split")

    def rolled_back(self) -> Routing[V]:
        if self.canary is None:
            raise InvalidInput("there is no canary to roll back")
        return Routing(stable=self.stable, canary=None, canary_percent=0.0, mode="split")
