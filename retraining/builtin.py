"""Datasets that ship inside an installed package: the demo's and the tests' real data, read from
disk, never downloaded.

``digits``: the UCI optical recognition of handwritten digits test set as scikit-learn ships it
(``sklearn/datasets/data/digits.csv.gz``, 1,797 images from 43 writers): 64 features, each the
ink count (0-16) of one cell of an 8x8 grid, named ``pixel_<row>_<col>``, and the digit as the
label. ``shift_right`` is the demo's drift: a scanner that places every image one cell to the right.
"""

from __future__ import annotations

from typing import Any

DATASETS = ("digits",)
LABEL = "label"


def load(name: str) -> Any:
    """The dataset as a DataFrame: the features, then ``label`` (strings)."""
    if name != "digits":
        from common.errors import InvalidInput

        raise InvalidInput(f"--dataset: unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    from sklearn.datasets import load_digits

    bunch = load_digits(as_frame=True)
    frame = bunch.frame.drop(columns="target").astype("float64")
    frame[LABEL] = bunch.target.astype(str).to_numpy()
    return frame


def shift_right(frame: Any, cells: int = 1) -> Any:
    """The images moved ``cells`` to the right on their 8x8 grid (the left columns blank)."""
    shifted = frame.copy()
    for row in range(8):
        for col in range(7, -1, -1):
            source = col - cells
            shifted[f"pixel_{row}_{col}"] = frame[f"pixel_{row}_{source}"] if source >= 0 else 0.0
    return shifted
