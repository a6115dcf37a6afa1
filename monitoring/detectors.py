"""The drift and outlier detectors, behind one seam with two backends that make the same decisions.

- ``scipy`` (the default): scipy and numpy only, under permissive licences. The feature tests are
  scipy's two-sample Kolmogorov-Smirnov test (numeric) and chi-square test of a contingency
  table (categorical); the multivariate test is a kernel MMD with a permutation test; the outlier
  score is the squared Mahalanobis distance on the numeric features.
- ``alibi``: the same tests through alibi-detect (``KSDrift``, ``ChiSquareDrift``, ``MMDDrift``
  on PyTorch, ``od.Mahalanobis``). alibi-detect is under the Business Source License 1.1 since
  0.11.5: production use needs a commercial licence from Seldon. Choose it with
  ``MLOPS_MONITOR__BACKEND=alibi`` where you hold one.

Both take the same inputs (one feature's reference and window values, nulls already left out;
categorical values as integer codes) and return the same figures; the decisions made on them
(monitoring/checks.py) are the backend's only difference, and tests/unit/test_detectors.py runs
every case on both. The one figure that differs is the MMD permutation test's p-value (each
backend draws its own permutations); its decision also asks for an effect size that both compute
alike.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from common.errors import ConfigError

BACKENDS = ("scipy", "alibi")


class Detectors(Protocol):
    name: str

    def numeric_test(self, reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
        """(KS statistic, p-value) of one numeric feature."""
        ...

    def categorical_test(self, reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
        """(chi-square statistic, p-value) of one categorical feature's codes."""
        ...

    def mmd(
        self, reference: np.ndarray, window: np.ndarray, sigma: float, permutations: int, seed: int
    ) -> tuple[float, float]:
        """(MMD², permutation p-value) of two samples of rows, Gaussian kernel of bandwidth sigma."""
        ...

    def outlier_scores(self, reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outlier scores of the reference's rows and of the window's, the detector fitted on the
        reference (the threshold is a quantile of the first)."""
        ...


class ScipyDetectors:
    name = "scipy"

    def numeric_test(self, reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
        from scipy.stats import ks_2samp

        result = ks_2samp(reference, window, alternative="two-sided", method="asymp")
        return float(result.statistic), float(result.pvalue)

    def categorical_test(self, reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
        from scipy.stats import chi2_contingency

        table = _contingency(reference, window)
        if table.shape[1] < 2:
            return 0.0, 1.0
        statistic, p_value, _, _ = chi2_contingency(table)
        return float(statistic), float(p_value)

    def mmd(
        self, reference: np.ndarray, window: np.ndarray, sigma: float, permutations: int, seed: int
    ) -> tuple[float, float]:
        both = np.concatenate([reference, window])
        squared = (both**2).sum(axis=1)
        distances = np.maximum(squared[:, None] + squared[None, :] - 2 * both @ both.T, 0)
        kernel = np.exp(-distances / (2 * sigma**2))
        np.fill_diagonal(kernel, 0)
        m = len(window)
        statistic = _mmd2(kernel, m)
        rng = np.random.default_rng(seed)
        permuted = np.empty(permutations)
        for i in range(permutations):
            order = rng.permutation(len(both))
            permuted[i] = _mmd2(kernel[order][:, order], m)
        return float(statistic), float((statistic <= permuted).mean())

    def outlier_scores(self, reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = reference.mean(axis=0)
        centred = reference - mean
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / (len(reference) - 1))
        keep = eigenvalues > 1e-6
        components = vectors[:, keep] / np.sqrt(eigenvalues[keep])
        return ((centred @ components) ** 2).sum(axis=1), (((window - mean) @ components) ** 2).sum(axis=1)


def _mmd2(kernel: np.ndarray, m: int) -> float:
    """The unbiased MMD² of a kernel matrix (diagonal zeroed) whose last ``m`` rows are the window."""
    n = len(kernel) - m
    xx, yy, xy = kernel[:-m, :-m], kernel[-m:, -m:], kernel[-m:, :-m]
    return float(xx.sum() / (n * (n - 1)) + yy.sum() / (m * (m - 1)) - 2 * xy.mean())


def _contingency(reference: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Counts of each code present on either side: a 2 x codes table."""
    codes = np.union1d(np.unique(reference), np.unique(window))
    return np.vstack([[(reference == c).sum() for c in codes], [(window == c).sum() for c in codes]])


class AlibiDetectors:
    """alibi-detect's detectors (Business Source License 1.1: see the module's docstring)."""

    name = "alibi"

    def __init__(self) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        try:
            import alibi_detect  # noqa: F401
        except ImportError as exc:  # pragma: no cover - it is in requirements.txt
            raise ConfigError(f"MLOPS_MONITOR__BACKEND=alibi: alibi-detect is not installed ({exc})") from exc

    def numeric_test(self, reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
        from alibi_detect.cd import KSDrift

        detector = KSDrift(reference.reshape(-1, 1).astype(np.float64), p_val=0.05, alternative="two-sided")
        data = detector.predict(window.reshape(-1, 1).astype(np.float64), return_p_val=True)["data"]
        return float(data["distance"][0]), float(data["p_val"][0])

    def categorical_test(self, reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
        from alibi_detect.cd import ChiSquareDrift

        if len(np.union1d(np.unique(reference), np.unique(window))) < 2:
            return 0.0, 1.0
        # {0: None} ("infer them") fails in 0.13.0's ChiSquareDrift: the codes are given
        categories = {0: [int(code) for code in np.unique(reference)]}
        detector = ChiSquareDrift(reference.reshape(-1, 1), p_val=0.05, categories_per_feature=categories)
        data = detector.predict(window.reshape(-1, 1), return_p_val=True)["data"]
        return float(data["distance"][0]), float(data["p_val"][0])

    def mmd(
        self, reference: np.ndarray, window: np.ndarray, sigma: float, permutations: int, seed: int
    ) -> tuple[float, float]:
        import torch
        from alibi_detect.cd import MMDDrift

        torch.manual_seed(seed)
        detector = MMDDrift(
            reference.astype(np.float32),
            backend="pytorch",
            p_val=0.05,
            sigma=np.array([sigma], dtype=np.float32),
            configure_kernel_from_x_ref=False,
            n_permutations=permutations,
            device="cpu",
        )
        p_value, statistic, _ = detector.score(window.astype(np.float32))
        return float(statistic), float(p_value)

    def outlier_scores(self, reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from alibi_detect.od._mahalanobis import Mahalanobis  # the new API (od.Mahalanobis is the old one)

        detector = Mahalanobis(device="cpu")
        detector.fit(reference.astype(np.float64))
        return np.asarray(detector.score(reference.astype(np.float64))), np.asarray(
            detector.score(window.astype(np.float64))
        )


def get_detectors(name: str) -> Detectors:
    if name == "scipy":
        return ScipyDetectors()
    if name == "alibi":
        return AlibiDetectors()
    raise ConfigError(f"MLOPS_MONITOR__BACKEND: '{name}' is not one of {', '.join(BACKENDS)}")
