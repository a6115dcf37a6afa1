"""A monitoring window: the events a model answered in ``[start_ms, end_ms)``, read once, as columns.

The log store's events stream through (``read_window``) into one column per profiled feature per
version, filled a chunk at a time: a window of a million events holds a million floats per
numeric feature, never a million Python objects. A record the store cannot parse is counted and
skipped (the store's ``ReadStats``); a request the model failed carries no inputs and is counted.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitoring.events import RowBlock, prediction
from monitoring.logstore import LogStore, ReadStats
from monitoring.profile import Kind, column_values

CHUNK = 16_384  # rows gathered as Python values before they become arrays
PAGE_BLOCKS = 500  # blocks (requests) whose labels are looked up at once


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

    def add(self, block: RowBlock, predictions: list[Any], labels: list[Any]) -> None:
        """A block's rows: its columns extended onto the chunk's."""
        inputs = flatten(block.inputs)
        for name in self.kinds:
            column = inputs.get(name)
            self.rows[name].extend(column if column is not None else [None] * block.rows)
        self.predictions.extend(predictions)
        self.labels.extend(labels)
        self.ts.extend([block.ts_ms] * block.rows)
        self.roles[block.role] = self.roles.get(block.role, 0) + block.rows
        if len(self.ts) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.ts:
            return
        for name, kind in self.kinds.items():
            values = self.rows[name]
            column = column_values(values, kind)
            if kind == "numeric":
                nulls = int(np.isnan(column).sum())
                if nulls:  # a NaN is a null or a value that was not a number: which, counted here
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


def flatten(inputs: Mapping[str, list[Any]]) -> Mapping[str, list[Any]]:
    """Named input columns as features: a vector input ``x`` gives the columns ``x[0]``, ``x[1]``, ..."""
    if not any(column and isinstance(column[0], list) for column in inputs.values()):
        return inputs
    flat: dict[str, list[Any]] = {}
    for name, column in inputs.items():
        if column and isinstance(column[0], list):
            for index in range(len(column[0])):
                flat[f"{name}[{index}]"] = [row[index] if index < len(row) else None for row in column]
        else:
            flat[name] = column
    return flat


def predictions(outputs: Mapping[str, list[Any]], rows: int, output: str | None = None) -> list[Any]:
    """The prediction of each row of a block's output columns (``prediction`` of each)."""
    if not outputs:
        return [None] * rows
    name = output or ("label" if "label" in outputs else next(iter(outputs)))
    column = outputs.get(name)
    if column is None:
        return [None] * rows
    if column and isinstance(column[0], str):
        return column
    return [prediction({name: value}, name) for value in column]


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
    began = time.monotonic()
    stats = ReadStats()
    builders: dict[str, _Columns | None] = {}
    counts: dict[str, int] = {}
    failed = seen = 0
    blocks = store.blocks(model, start_ms, end_ms, stats=stats)
    while page := list(itertools.islice(blocks, PAGE_BLOCKS)):
        before = seen
        wanted = {b.request_id for b in page if b.status == "ok" and (not versions or b.version in versions)}
        labels = store.request_labels(sorted(wanted)) if wanted else {}
        for block in page:
            seen += block.rows
            if versions and block.version not in versions:
                continue
            if block.status != "ok":
                failed += block.rows
                continue
            builder = builders.get(block.version, False)
            if builder is False:
                found = kinds(block.version)
                builder = builders[block.version] = (
                    _Columns(block.version, found) if found is not None else None
                )
            if builder is None:
                counts[block.version] = counts.get(block.version, 0) + block.rows
                continue
            rows = range(block.first_row, block.first_row + block.rows)
            builder.add(
                block,
                predictions(block.outputs, block.rows, output),
                [labels.get((block.request_id, row)) for row in rows] if labels else [None] * block.rows,
            )
        if progress is not None and seen // 100_000 != before // 100_000:
            progress(seen)
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
