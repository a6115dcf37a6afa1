"""Distances between distributions that monitoring and the canary analysis both use."""

from __future__ import annotations

import numpy as np


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """The Jensen-Shannon distance (base 2: 0 the same, 1 disjoint) between two histograms over
    the same bins (counts or shares); 0 when either is empty."""
    from scipy.spatial.distance import jensenshannon

    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(jensenshannon(p, q, base=2))
