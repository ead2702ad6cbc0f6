"""Drift of live scores against the training errors: PSI and the KS statistic."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from detector.drift import MIN_SAMPLE, ScoreDrift, ks_statistic, psi
from detector.metrics import Metrics


def reference(n: int = 20_000, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).gamma(2.0, 1.0, n))


def test_same_distribution_drifts_about_zero() -> None:
    live = np.random.default_rng(1).gamma(2.0, 1.0, 2048)
    assert psi(reference(), live) < 0.02
    # 1.36/sqrt(n) is the 5% critical value for samples of this size.
    assert ks_statistic(reference(), np.sort(live)) < 1.36 / np.sqrt(2048)


@pytest.mark.parametrize(("shift", "min_psi", "min_ks"), [(1.0, 0.2, 0.2), (5.0, 3.0, 0.9)])
def test_shifted_distribution_drifts_a_lot(shift: float, min_psi: float, min_ks: float) -> None:
    live = np.random.default_rng(1).gamma(2.0, 1.0, 2048) + shift
    assert psi(reference(), live) > min_psi
    assert ks_statistic(reference(), np.sort(live)) > min_ks


def test_drift_grows_with_the_shift() -> None:
    base = np.random.default_rng(1).gamma(2.0, 1.0, 2048)
    psis = [psi(reference(), base + s) for s in (0.0, 0.5, 1.0, 2.0)]
    kss = [ks_statistic(reference(), np.sort(base + s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert psis == sorted(psis) and kss == sorted(kss)


def test_ks_statistic_by_hand() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    assert ks_statistic(ref, np.array([3.0, 4.0, 5.0, 6.0])) == 0.5
    assert ks_statistic(ref, ref.copy()) == 0.0
    assert ks_statistic(ref, np.array([10.0, 11.0])) == 1.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40),
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40),
)
def test_ks_statistic_is_the_largest_cdf_gap(a: list[float], b: list[float]) -> None:
    ra, rb = np.sort(a), np.sort(b)
    grid = np.concatenate([ra, rb])
    gaps = [abs(np.mean(ra <= x) - np.mean(rb <= x)) for x in grid]
    assert ks_statistic(ra, rb) == pytest.approx(max(gaps))
    assert ks_statistic(ra, rb) == pytest.approx(ks_statistic(rb, ra))


def test_psi_copes_with_a_reference_full_of_ties() -> None:
    ref = np.sort(np.r_[np.zeros(900), np.linspace(1, 2, 100)])
    assert psi(ref, ref.copy()) == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(psi(ref, np.full(100, 5.0)))
    assert psi(ref, np.full(100, 5.0)) > 1.0


def test_score_drift_keeps_only_the_latest_scores() -> None:
    drift = ScoreDrift(reference(), capacity=100)
    drift.add(np.random.default_rng(2).gamma(2.0, 1.0, MIN_SAMPLE - 1))
    assert drift.size == MIN_SAMPLE - 1 and drift.statistics() is None
    drift.add(np.random.default_rng(3).gamma(2.0, 1.0, 200))
    assert drift.size == 100
    stats = drift.statistics()
    assert stats is not None and stats[1] < 0.2
    # A shift displaces the old scores once `capacity` new ones came in, in any batch sizes.
    for _ in range(10):
        drift.add(np.random.default_rng(4).gamma(2.0, 1.0, 10) + 10.0)
    assert drift.sample().min() >= 10.0
    stats = drift.statistics()
    assert stats is not None and stats[1] > 0.99 and stats[0] > 3.0


def test_score_drift_ignores_non_finite_scores() -> None:
    drift = ScoreDrift(reference(), capacity=100)
    drift.add(np.r_[np.full(60, np.inf), np.full(10, np.nan), np.ones(60)])
    assert len(drift.sample()) == 60 and np.isfinite(drift.sample()).all()


def test_drift_gauges_exist_per_stream() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.score_drift_psi.labels("hosts").set(0.3)
    metrics.score_drift_ks.labels("hosts").set(0.5)
    assert registry.get_sample_value("detector_score_drift_psi", {"stream": "hosts"}) == 0.3
    assert registry.get_sample_value("detector_score_drift_ks", {"stream": "hosts"}) == 0.5
