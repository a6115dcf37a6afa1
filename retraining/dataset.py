"""A retraining dataset: the version's training reference plus the labelled recent traffic.

``labelled_traffic`` reads a window of the inference log (monitoring's column reader: a logged
request's rows at a time, labels joined by request) and keeps the rows whose label came back;
``assemble`` puts the reference rows and those together, each row marked with its ``source``,
and records what it is made of: row counts by source and a content hash (SHA-256 of the
canonical CSV: columns sorted, rows in order), so a registered model names exactly the data it
was trained on, and the same trigger assembling the same rows gets the same hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidInput
from monitoring.logstore import LogStore
from monitoring.profile import column_kind
from monitoring.window import read_window

SOURCE = "source"  # the column saying where a row came from: reference | traffic


@dataclass(frozen=True)
class Dataset:
    frame: Any  # pandas DataFrame: the features, the label, and SOURCE
    label: str
    features: tuple[str, ...]
    sha256: str
    rows_by_source: dict[str, int]

    def save(self, path: Path) -> Path:
        """The rows as CSV (the bytes the hash is of)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(canonical_csv(self.frame))
        return path

    def summary(self) -> dict[str, Any]:
        return {
            "rows": len(self.frame),
            "rows_by_source": self.rows_by_source,
            "sha256": self.sha256,
            "label": self.label,
            "features": list(self.features),
        }


def labelled_traffic(
    store: LogStore,
    model: str,
    start_ms: int,
    end_ms: int,
    reference: Any,
    label: str,
    versions: Sequence[str] | None = None,
) -> Any:
    """The window's rows whose label came back, with the reference's feature columns (kinds as
    the reference's: numbers stay numbers) and the label, in time order."""
    import pandas as pd

    features = [c for c in reference.columns if c not in (label, SOURCE)]
    kinds = {name: column_kind(reference[name]) for name in features}
    window = read_window(store, model, start_ms, end_ms, lambda version: kinds, versions=versions)
    parts = []
    for rows in window.versions.values():
        if not rows.columns:  # a version counted but not read
            continue
        keep = np.asarray([value is not None for value in rows.labels], dtype=bool)
        if keep.any():
            part = pd.DataFrame({name: rows.columns[name][keep] for name in features})
            part[label] = rows.labels[keep]
            part["_ts"] = rows.ts_ms[keep]
            parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*features, label])
    return pd.concat(parts).sort_values("_ts", kind="stable").drop(columns="_ts").reset_index(drop=True)


def assemble(reference: Any, traffic: Any, label: str) -> Dataset:
    """The reference rows, then the traffic's, each marked with its source; the traffic must have
    the reference's columns (a missing one is named)."""
    import pandas as pd

    if label not in reference.columns:
        raise InvalidInput(
            f"the reference data has no label column '{label}' (it has {list(reference.columns)})"
        )
    features = tuple(c for c in reference.columns if c not in (label, SOURCE))
    missing = [c for c in (*features, label) if c not in traffic.columns]
    if missing:
        raise InvalidInput(f"the labelled traffic has no column(s) {missing}")
    frame = pd.concat(
        [
            reference[[*features, label]].assign(**{SOURCE: "reference"}),
            traffic[[*features, label]].assign(**{SOURCE: "traffic"}),
        ],
        ignore_index=True,
    )
    frame[label] = frame[label].astype(str)
    counts = {"reference": len(reference), "traffic": len(traffic)}
    return Dataset(frame, label, features, hashlib.sha256(canonical_csv(frame)).hexdigest(), counts)


def canonical_csv(frame: Any) -> bytes:
    """The rows as CSV with the columns sorted and floats written to 17 digits: equal data,
    equal bytes."""
    ordered = frame[sorted(frame.columns)]
    return ordered.to_csv(index=False, float_format="%.17g", lineterminator="\n").encode()
