"""How far live scores have moved from the scores the model had on its validation windows.

A model trained on last month's behaviour scores today's: when the distribution of its live
reconstruction errors drifts away from the held-out training errors (`ErrorStats`), its
thresholds mean something else than they did, and it is time to retrain. Two statistics,
both against the sorted training errors:

- the population stability index over the training errors' deciles: Σ (a - e)·ln(a / e) over
  bins, e and a the training and live shares (< 0.1 usually read as stable, > 0.25 as shifted);
- the two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs
  (0 = same, 1 = disjoint).

`ScoreDrift` keeps the latest `capacity` live scores in a ring (one vectorized write per batch);
the statistics are computed on demand, so the caller decides how often (the daemon: every few
seconds), off the per-record path.
"""

from __future__ import annotations

import numpy as np

# Live scores to compare: enough for a KS gap of ~0.04 to be noise-level (1.36/√n at 5%),
# few enough that a shift shows within minutes of traffic.
DEFAULT_CAPACITY = 2048
# Fewer live scores than this say nothing about a distribution.
MIN_SAMPLE = 50
PSI_BINS = 10
# Share floor in the PSI: an empty bin would make ln(a/e) infinite.
_PSI_FLOOR = 1e-4


def psi(reference_sorted: np.ndarray, sample: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of `sample` against `reference_sorted`, over the reference's
    quantile bins (ties merged, so a reference with repeated values still gives valid bins).

    Shape:
        reference_sorted: (K,) ascending; sample: (n,) any order
    """
    inner = np.unique(np.quantile(reference_sorted, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(inner, reference_sorted, side="right"), minlength=len(inner) + 1)
    actual = np.bincount(np.searchsorted(inner, sample, side="right"), minlength=len(inner) + 1)
    e = np.maximum(expected / len(reference_sorted), _PSI_FLOOR)
    a = np.maximum(actual / len(sample), _PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(reference_sorted: np.ndarray, sample_sorted: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: sup |F_ref(x) - F_sample(x)|.

    Both CDFs are step functions that change only at data points, so the supremum is reached
    at one of them.

    Shape:
        reference_sorted: (K,) ascending; sample_sorted: (n,) ascending
    """
    points = np.concatenate([reference_sorted, sample_sorted])
    f_ref = np.searchsorted(reference_sorted, points, side="right") / len(reference_sorted)
    f_sample = np.searchsorted(sample_sorted, points, side="right") / len(sample_sorted)
    return float(np.max(np.abs(f_ref - f_sample)))


class ScoreDrift:
    """The latest live scores of one stream, and their drift from the training errors.

    Not thread safe: the pipeline that owns it adds scores; read it from the same thread.
    """

    def __init__(self, reference_sorted: np.ndarray, capacity: int = DEFAULT_CAPACITY) -> None:
        self.reference = np.asarray(reference_sorted, np.float64)
        self._ring = np.zeros(capacity, np.float64)
        self._seen = 0

    def add(self, scores: np.ndarray) -> None:
        """Remember `scores` (newest last); only the latest `capacity` are kept.

        Shape:
            scores: (R,)
        """
        capacity = len(self._ring)
        scores = np.asarray(scores, np.float64)[-capacity:]
        cells = (self._seen + np.arange(len(scores))) % capacity
        self._ring[cells] = scores
        self._seen += len(scores)

    @property
    def size(self) -> int:
        """Live scores held (at most `capacity`)."""
        return min(self._seen, len(self._ring))

    def sample(self) -> np.ndarray:
        """The held live scores, ascending (non-finite ones dropped). Shape: (≤ capacity,)."""
        held = self._ring[: self.size]
        return np.sort(held[np.isfinite(held)])

    def statistics(self) -> tuple[float, float] | None:
        """(PSI, KS) of the held scores against the training errors; None below `MIN_SAMPLE`."""
        sample = self.sample()
        if len(sample) < MIN_SAMPLE or len(self.reference) == 0:
            return None
        return psi(self.reference, sample), ks_statistic(self.reference, sample)
