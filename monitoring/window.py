"""A monitoring window: the events a model answered in ``[start_ms, end_ms)``, read once, as columns.

The log store's events stream through (``read_window``) into one column per profiled feature per
version, filled a chunk at a time: a window of a million events holds a million floats per
numeric feature, never a million Python objects. A record the store cannot parse is counted and
skipped (the store's ``ReadStats``); a request the model failed carries no inputs and is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitoring.events import Labelled
from monitoring.logstore import LogStore, ReadStats
from monitoring.profile import Kind, column_values

CHUNK = 16_384  # rows gathered as Python values before they become arrays


@dataclass
class VersionWindow:
    """One version's rows of a window."""

    version: str
    columns: dict[str, np.ndarray]  # numeric float64 (NaN: null or not a number), categorical str/None
    predictions: np.ndarray  # object: the predicted label (or value) of each row, None if none
    labels: np.ndarray  # object: the label that came back for the row, None while none has
    ts_ms: np.ndarray  # int64
    wrong_type: dict[str, int]  # numeric features' values that were not numbers
    roles: dict[str, int]

    @property
    def count(self) -> int:
        return len(self.ts_ms)


@dataclass
class Window:
    model: str
    start_ms: int
    end_ms: int
    versions: dict[str, VersionWindow]
    malformed: int = 0  # stored records that are not events: skipped
    failed: int = 0  # events of requests the model failed (no inputs)
    read_s: float = 0.0

    @property
    def events(self) -> int:
        return sum(v.count for v in self.versions.values())


class _Columns:
    """One version's rows as they stream in: Python values a chunk at a time, then arrays."""

    def __init__(self, version: str, kinds: Mapping[str, Kind]) -> None:
        self.version = version
        self.kinds = dict(kinds)
        self.rows: dict[str, list[Any]] = {name: [] for name in kinds}
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in kinds}
        self.predictions: list[Any] = []
        self.labels: list[Any] = []
        self.ts: list[int] = []
        self.done: dict[str, list[np.ndarray]] = {"predictions": [], "labels": [], "ts": []}
        self.wrong_type = dict.fromkeys(kinds, 0)
        self.roles: dict[str, int] = {}

    def add(self, inputs: Mapping[str, Any], prediction: Any, label: Any, ts_ms: int, role: str) -> None:
        rows = self.rows
        for name in self.kinds:
            rows[name].append(inputs.get(name))
        self.predictions.append(prediction)
        self.labels.append(label)
        self.ts.append(ts_ms)
        self.roles[role] = self.roles.get(role, 0) + 1
        if len(self.ts) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.ts:
            return
        for name, kind in self.kinds.items():
            values = self.rows[name]
            column = column_values(values, kind)
            if kind == "numeric":
                self.wrong_type[name] += sum(
                    1 for v in values if v is not None and type(v) not in (float, int)
                    and not (isinstance(v, str) and _is_number(v))
                )  # fmt: skip
            self.chunks[name].append(column)
            self.rows[name] = []
        self.done["predictions"].append(np.asarray(self.predictions + [None], dtype=object)[:-1])
        self.done["labels"].append(np.asarray(self.labels + [None], dtype=object)[:-1])
        self.done["ts"].append(np.asarray(self.ts, dtype=np.int64))
        self.predictions, self.labels, self.ts = [], [], []

    def finish(self) -> VersionWindow:
        self.flush()

        def joined(chunks: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)

        columns = {
            name: joined(self.chunks[name], float if kind == "numeric" else object)
            for name, kind in self.kinds.items()
        }
        return VersionWindow(
            self.version,
            columns,
            joined(self.done["predictions"], object),
            joined(self.done["labels"], object),
            joined(self.done["ts"], np.int64),
            self.wrong_type,
            self.roles,
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def flatten(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """Named inputs as features: a vector input ``x`` gives ``x[0]``, ``x[1]``, ..."""
    if not any(isinstance(value, list) for value in inputs.values()):
        return inputs
    flat: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, list):
            for index, item in enumerate(value):
                flat[f"{name}[{index}]"] = item
        else:
            flat[name] = value
    return flat


def prediction(outputs: Mapping[str, Any], output: str | None = None) -> Any:
    """The prediction of a row: its ``label`` output (or ``output``), the best key of a mapping of
    scores, the position of the largest of a vector of scores, or the value itself."""
    if not outputs:
        return None
    name = output or ("label" if "label" in outputs else next(iter(outputs)))
    value = outputs.get(name)
    if isinstance(value, dict) and value:
        return str(max(value, key=value.get))
    if isinstance(value, list):
        if value and all(isinstance(v, int | float) for v in value):
            return f"#{int(np.argmax(value))}"
        return None
    if isinstance(value, bool):
        return str(value)
    return value


def read_window(
    store: LogStore,
    model: str,
    start_ms: int,
    end_ms: int,
    kinds: Callable[[str], Mapping[str, Kind] | None],
    versions: Sequence[str] | None = None,
    output: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Window:
    """The window's events, by version, as columns of the features ``kinds(version)`` names (a
    version it returns None for is counted, not read: it has no profile)."""
    import time

    began = time.monotonic()
    stats = ReadStats()
    builders: dict[str, _Columns | None] = {}
    counts: dict[str, int] = {}
    failed = 0
    seen = 0
    items: Iterable[Labelled] = store.labelled(model, start_ms, end_ms, stats=stats)
    for item in items:
        event = item.event
        seen += 1
        if progress is not None and seen % 100_000 == 0:
            progress(seen)
        if versions and event.version not in versions:
            continue
        if event.status != "ok":
            failed += 1
            continue
        builder = builders.get(event.version, False)
        if builder is False:
            found = kinds(event.version)
            builder = builders[event.version] = _Columns(event.version, found) if found is not None else None
        if builder is None:
            counts[event.version] = counts.get(event.version, 0) + 1
            continue
        builder.add(
            flatten(event.inputs), prediction(event.outputs, output), item.label, event.ts_ms, event.role
        )
    result = {version: b.finish() for version, b in builders.items() if b is not None}
    for version, count in counts.items():  # versions without a profile: their count only
        result[version] = VersionWindow(
            version, {}, np.empty(count, dtype=object), np.empty(count, dtype=object),
            np.zeros(count, dtype=np.int64), {}, {},
        )  # fmt: skip
    return Window(
        model, start_ms, end_ms, result, stats.malformed, failed, round(time.monotonic() - began, 3)
    )


@dataclass
class ArrayWindow:
    """A window made of arrays directly (the benchmark's floor and the tests' cases)."""

    columns: dict[str, np.ndarray]
    predictions: np.ndarray | None = None
    labels: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_version(self, version: str) -> VersionWindow:
        count = len(next(iter(self.columns.values())))
        empty = np.full(count, None, dtype=object)
        return VersionWindow(
            version,
            self.columns,
            self.predictions if self.predictions is not None else empty,
            self.labels if self.labels is not None else empty.copy(),
            np.zeros(count, dtype=np.int64),
            dict.fromkeys(self.columns, 0),
            {"stable": count},
        )
