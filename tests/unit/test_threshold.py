"""Threshold rules on hand-built score sequences, against hand-computed numbers and a plain
numpy reference."""

from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from detector.config import DynamicRule, PotRule, QuantileRule, SigmaRule, StaticRule, Thresholds
from detector.model import ErrorStats
from detector.threshold import (
    CRITICAL,
    NONE,
    WARNING,
    DynamicThreshold,
    SeverityRules,
    StaticThreshold,
    build_rule,
    pot_threshold,
)

# Population: validation mean 1.0, std 0.5.
POPULATION = ErrorStats(np.array([0.5, 1.0, 1.5], np.float32), mean=1.0, std=0.5)


def dynamic(**kwargs: object) -> DynamicThreshold:
    """The rule's bare statistics, without the defaults' regime change and floor, unless asked for."""
    rule = {"rule": "dynamic", "regime_after": None, "min_ratio": None, **kwargs}
    return DynamicThreshold(DynamicRule.model_validate(rule), POPULATION)


def one_slot(scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(scores), np.int64), np.asarray(scores, np.float64)


def rolling_reference(
    slots: np.ndarray,
    scores: np.ndarray,
    k: float,
    window: int,
    warmup: int,
    population: float,
    regime_after: int | None = None,
) -> np.ndarray:
    """The obvious implementation: keep every accepted score per slot in a list; with
    `regime_after`, a run of that many rejected scores replaces the list (and is warm)."""
    accepted: dict[int, list[float]] = defaultdict(list)
    runs: dict[int, list[float]] = defaultdict(list)
    rebased: set[int] = set()
    out = []
    for slot, x in zip(slots.tolist(), scores.tolist(), strict=True):
        history = accepted[slot]
        if not history or (len(history) < warmup and slot not in rebased):
            threshold = population
        else:
            recent = np.asarray(history[-window:])
            threshold = recent.mean() + k * recent.std()
        out.append(threshold)
        if x <= threshold:
            history.append(x)
            runs[slot] = []
        elif regime_after is not None:
            runs[slot].append(x)
            if len(runs[slot]) == regime_after:
                accepted[slot], runs[slot] = runs[slot], []
                rebased.add(slot)
    return np.asarray(out)


# --- static and quantile -------------------------------------------------------------------


def test_static_threshold_is_the_value_for_every_score() -> None:
    rule = StaticThreshold(2.5)
    got = rule.apply(np.array([0, 1, 0, 7]), np.array([0.1, 9.0, 2.5, 3.0]))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [2.5, 2.5, 2.5, 2.5])
    assert len(rule.apply(np.zeros(0, np.int64), np.zeros(0))) == 0


def test_quantile_rule_is_validation_quantile_times_factor() -> None:
    # 0, 1, ..., 100: the 0.9 quantile is exactly 90.
    errors = ErrorStats.from_errors(np.arange(101, dtype=np.float32))
    assert errors.quantile(0.9) == pytest.approx(90.0)
    assert errors.mean == pytest.approx(50.0)
    assert errors.std == pytest.approx(850**0.5)  # population variance of 0..100 is (101² - 1) / 12
    rule = build_rule(QuantileRule(rule="quantile", q=0.9, factor=1.5), errors)
    assert isinstance(rule, StaticThreshold)
    assert rule.value == pytest.approx(135.0)
    assert build_rule(QuantileRule(rule="quantile", q=0.5), errors).value == pytest.approx(50.0)


def test_error_stats_subsample_keeps_range_order_and_exact_moments() -> None:
    errors = np.arange(100_000, dtype=np.float32)[::-1].copy()
    stats = ErrorStats.from_errors(errors, keep=1000)
    assert len(stats.sorted_errors) == 1000
    assert stats.sorted_errors[0] == 0.0
    assert stats.sorted_errors[-1] == 99_999.0
    assert np.all(np.diff(stats.sorted_errors) > 0)
    assert stats.mean == pytest.approx(49_999.5)
    assert stats.quantile(0.5) == pytest.approx(49_999.5, rel=1e-3)


def test_sigma_rule_is_validation_mean_plus_k_std_the_population_threshold_of_a_dynamic_rule() -> None:
    errors = ErrorStats.from_errors(np.arange(101, dtype=np.float32))  # mean 50, std sqrt(850)
    rule = build_rule(SigmaRule(rule="sigma", k=8.0), errors)
    assert isinstance(rule, StaticThreshold)
    assert rule.value == pytest.approx(50.0 + 8.0 * 850**0.5)
    # The same number a cold entity of a dynamic rule with that k is judged by.
    dynamic_rule = DynamicThreshold(DynamicRule(rule="dynamic", k=8.0), errors)
    assert dynamic_rule.apply(*one_slot([0.0]))[0] == pytest.approx(rule.value)


@pytest.mark.parametrize(
    ("name", "draw", "true_quantile"),
    [
        # Exponential errors: a generalized Pareto tail of shape 0, P(X > x) = exp(-x).
        ("exponential", lambda rng, n: rng.exponential(1.0, n), lambda q: -np.log(q)),
        # Pareto-type errors of shape 0.3: P(X > x) = (1 + 0.3 x)^(-1/0.3).
        ("heavy tail", lambda rng, n: (rng.random(n) ** -0.3 - 1) / 0.3, lambda q: (q**-0.3 - 1) / 0.3),
    ],
)
def test_pot_threshold_finds_the_true_tail_quantile_beyond_the_largest_error(
    name: str, draw: Callable[[np.random.Generator, int], np.ndarray], true_quantile: Callable[[float], float]
) -> None:
    rng = np.random.default_rng(0)
    errors = draw(rng, 20_000)
    q = 1e-5  # one in 100,000: five times rarer than the rarest of the 20,000 errors
    expected = true_quantile(q)
    assert errors.max() < expected
    assert pot_threshold(errors, q, level=0.98) == pytest.approx(expected, rel=0.2), name
    # The rule reads the checkpoint's (subsampled, sorted) validation errors.
    rule = build_rule(PotRule(rule="pot", q=q), ErrorStats.from_errors(errors.astype(np.float32)))
    assert isinstance(rule, StaticThreshold)
    assert rule.value == pytest.approx(expected, rel=0.2)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=200, max_size=2_000, unique=True),
    st.floats(0.5, 0.99),
    st.floats(1e-6, 1e-3),
    st.floats(1e-6, 1e-3),
)
def test_pot_threshold_starts_at_the_level_quantile_and_grows_as_the_risk_shrinks(
    errors: list[float], level: float, q1: float, q2: float
) -> None:
    values = np.asarray(errors)
    low, high = sorted((q1, q2))
    start = np.quantile(values, level)
    rarer, commoner = pot_threshold(values, low, level), pot_threshold(values, high, level)
    assume(rarer is not None and commoner is not None)  # at least 10 errors above the level quantile
    assert rarer is not None and commoner is not None
    assert np.isfinite(rarer) and np.isfinite(commoner)
    assert commoner >= start - 1e-9 * max(1.0, abs(start))
    assert rarer >= commoner - 1e-9 * max(1.0, abs(commoner))


def test_pot_rule_without_a_tail_to_fit_is_the_largest_error_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # A constant series' model reconstructs every held-out window equally well: nothing lies
    # above the level quantile.
    errors = ErrorStats.from_errors(np.full(500, 0.25, np.float32))
    assert pot_threshold(errors.sorted_errors, 1e-4, level=0.98) is None
    with caplog.at_level("WARNING", logger="detector.threshold"):
        rule = build_rule(PotRule(rule="pot", q=1e-4), errors)
    assert isinstance(rule, StaticThreshold)
    assert rule.value == 0.25
    assert "fewer than 10 validation errors above their 0.98 quantile" in caplog.text


def test_a_carried_pot_rule_refits_when_it_can_and_else_scales_its_threshold() -> None:
    # A retraining's held-out sample is a fifth of its reservoir: often too few peaks to fit a
    # tail. The old fit, scaled as the new model's scores are, is then kept.
    rng = np.random.default_rng(1)
    config = thresholds({"rule": "pot", "q": 1e-4}, {"rule": "pot", "q": 1e-5})
    rules = SeverityRules(config, ErrorStats.from_errors(rng.exponential(1.0, 20_000).astype(np.float32)))
    assert isinstance(rules.warning, StaticThreshold) and isinstance(rules.critical, StaticThreshold)
    assert rules.warning.value == pytest.approx(-np.log(1e-4), rel=0.2)
    small = ErrorStats.from_errors(rng.exponential(2.0, 400).astype(np.float32))  # 8 above the 0.98 quantile
    carried = SeverityRules.carried(rules, small, factor=2.0)
    assert isinstance(carried.warning, StaticThreshold) and isinstance(carried.critical, StaticThreshold)
    assert carried.warning.value == pytest.approx(2.0 * rules.warning.value)
    assert carried.critical.value == pytest.approx(2.0 * rules.critical.value)
    # Enough held-out windows: the new model's own tail.
    large = ErrorStats.from_errors(rng.exponential(2.0, 20_000).astype(np.float32))
    refit = SeverityRules.carried(rules, large, factor=1.0)
    assert isinstance(refit.warning, StaticThreshold)
    assert refit.warning.value == pytest.approx(-2.0 * np.log(1e-4), rel=0.2)


def test_build_rule_static() -> None:
    rule = build_rule(StaticRule(rule="static", value=0.7), POPULATION)
    np.testing.assert_array_equal(rule.apply(*one_slot([1.0, 0.0])), [0.7, 0.7])


# --- dynamic: ewma -------------------------------------------------------------------------


def test_ewma_hand_computed_sequence() -> None:
    # k=2, alpha=0.25 (the first 4 accepted scores are averaged plainly), warm-up 2;
    # population threshold = 1.0 + 2 * 0.5 = 2.0.
    rule = dynamic(method="ewma", k=2.0, alpha=0.25, warmup=2)
    got = rule.apply(*one_slot([1.0, 2.0, 1.5, 0.5, 9.0, 1.0, 0.0]))
    expected = [
        2.0,  # no history: population
        2.0,  # 1 accepted < warm-up: population; 2.0 is not above 2.0, so accepted
        1.5 + 2 * 0.5,  # [1, 2]: mean 1.5, var 0.25
        1.5 + 2 * (1 / 6) ** 0.5,  # [1, 2, 1.5]: mean 1.5, var 1/6
        1.25 + 2 * 0.3125**0.5,  # [1, 2, 1.5, 0.5]: mean 1.25, var 0.3125
        1.25 + 2 * 0.3125**0.5,  # 9.0 was above its threshold: no update
        # weight 0.25 from now on: delta = -0.25, mean = 1.1875, var = 0.75 * (0.3125 + 0.25 * 0.0625)
        1.1875 + 2 * 0.24609375**0.5,
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_ewma_averages_plainly_until_one_over_alpha_scores() -> None:
    # Every score stays below the threshold it meets (k=3), so all are accepted.
    scores = [2.0, 1.0, 2.5, 1.5, 3.0, 2.0, 1.0, 2.2]
    rule = dynamic(method="ewma", k=3.0, alpha=0.1, warmup=1)
    got = rule.apply(*one_slot([*scores, 0.0]))
    assert np.all(np.asarray(scores) <= got[:-1])
    for n in range(1, len(scores) + 1):
        plain = np.asarray(scores[:n])
        assert got[n] == pytest.approx(plain.mean() + 3.0 * plain.std(), rel=1e-12)


def test_ewma_weights_recent_scores_after_the_plain_start() -> None:
    # alpha=0.5, warm-up 3 (population threshold 100 accepts the first three scores).
    # After [1, 1] the mean is 1; with weight max(0.5, 1/3) = 0.5 a score of 3 moves it halfway:
    # mean 2, var = 0.5 * (0 + 0.5 * 2²) = 1 (a plain average would give 5/3).
    rule = dynamic(method="ewma", k=1.0, alpha=0.5, warmup=3)
    rule.population = 100.0
    got = rule.apply(*one_slot([1.0, 1.0, 3.0, 0.0]))
    np.testing.assert_array_equal(got[:3], [100.0, 100.0, 100.0])
    assert got[3] == pytest.approx(2.0 + 1.0)


# --- dynamic: rolling ----------------------------------------------------------------------


def test_rolling_hand_computed_sequence() -> None:
    # window 3, k=1, warm-up 2; population threshold 1.0 + 1 * 0.5 = 1.5.
    rule = dynamic(method="rolling", k=1.0, window=3, warmup=2)
    got = rule.apply(*one_slot([1.0, 2.0, 1.4, 0.8, 5.0, 1.1, 0.9, 1.2, 0.0]))

    def bar(values: list[float]) -> float:
        return float(np.mean(values) + np.std(values))

    expected = [
        1.5,  # population
        1.5,  # 2.0 > 1.5: rejected, still 1 accepted
        1.5,  # 1.4 accepted: 2 accepted, warm-up done
        bar([1.0, 1.4]),  # = 1.2 + 0.2 = 1.4
        bar([1.0, 1.4, 0.8]),  # 5.0 rejected
        bar([1.0, 1.4, 0.8]),
        bar([1.4, 0.8, 1.1]),  # 1.0 left the window
        bar([0.8, 1.1, 0.9]),  # 1.2 > this (≈ 1.058): rejected
        bar([0.8, 1.1, 0.9]),
    ]
    assert expected[3] == pytest.approx(1.4)
    assert expected[7] == pytest.approx(1.0581, abs=1e-4)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


@pytest.mark.parametrize(("window", "warmup", "k"), [(5, 3, 2.0), (2, 0, 1.0), (50, 10, 3.0), (4, 40, 2.5)])
def test_rolling_matches_numpy_reference(window: int, warmup: int, k: float) -> None:
    rng = np.random.default_rng(window + warmup)
    n = 400
    slots = rng.integers(0, 3, n)
    scores = rng.gamma(4.0, 0.25, n) + slots * 0.5  # each slot has its own level
    scores[rng.random(n) < 0.05] += 20.0  # some anomalies
    rule = dynamic(method="rolling", k=k, window=window, warmup=warmup)
    expected = rolling_reference(slots, scores, k, window, warmup, rule.population)
    got = rule.apply(slots, scores)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # The rule did leave the population threshold for at least one slot.
    assert np.any(got != rule.population)


def test_rolling_variance_stays_accurate_over_a_long_run() -> None:
    # Thousands of window replacements at a large offset: the running update must not drift
    # from the mean and std of the last `window` accepted scores.
    rng = np.random.default_rng(3)
    scores = 1000.0 + rng.random(20_000)
    slots = np.zeros(len(scores), np.int64)
    rule = dynamic(method="rolling", k=4.0, window=10, warmup=5)
    rule.population = 2000.0  # accept the warm-up scores
    got = rule.apply(slots, scores)
    expected = rolling_reference(slots, scores, 4.0, 10, 5, rule.population)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.mean(scores <= got) > 0.9  # most scores were accepted, so the window kept moving


# --- dynamic: robust statistics ------------------------------------------------------------


def test_median_hand_computed_sequence() -> None:
    # k=2, window 3, warm-up 2 (population 1.0 + 2 * 0.5 = 2.0): median + 2·1.4826·MAD.
    rule = dynamic(method="median", k=2.0, window=3, warmup=2)
    got = rule.apply(*one_slot([1.0, 1.5, 0.5, 1.9, 5.0, 0.0]))
    expected = [
        2.0,  # cold
        2.0,  # one score, still cold
        1.25 + 2 * 1.4826 * 0.25,  # [1, 1.5]: median 1.25, MAD 0.25
        1.0 + 2 * 1.4826 * 0.5,  # [1, 1.5, 0.5]: median 1, MAD 0.5
        1.5 + 2 * 1.4826 * 0.4,  # [1.9, 1.5, 0.5] (1.0 left the window): median 1.5, MAD 0.4
        1.5 + 2 * 1.4826 * 0.4,  # 5.0 was above its threshold: no update
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_median_ignores_one_huge_normal_score() -> None:
    # A score far above the others but below a loose threshold moves mean + k·std a lot and
    # median + k·MAD not at all.
    scores = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 40.0, 1.0, 1.1, 0.9, 0.0]
    calm = [*scores[:6], 1.0, *scores[7:]]
    for method, most in (("rolling", None), ("median", 1.5)):
        spiked = dynamic(method=method, k=1000.0, window=50, warmup=5).apply(*one_slot(scores))
        plain = dynamic(method=method, k=1000.0, window=50, warmup=5).apply(*one_slot(calm))
        ratio = spiked[-1] / plain[-1]
        assert ratio > 50.0 if most is None else ratio < most, (method, ratio)


def test_winsorized_ewma_hand_computed_sequence() -> None:
    # alpha 0.5, k 10 (population 6.0), warm-up 2, winsorize 1: once warm, an accepted score
    # updates the statistics as at most mean + 1·std.
    rule = dynamic(method="ewma", k=10.0, alpha=0.5, warmup=2, winsorize=1.0)
    got = rule.apply(*one_slot([1.0, 3.0, 5.0, 0.0]))
    # 1.0: mean 1, var 0 (cold, not clipped); 3.0: a 0.5, mean 2, var 0.5·(0 + 0.5·4) = 1
    # (still cold); 5.0 <= 2 + 10·1 is clipped to 2 + 1·1 = 3: mean 2.5, var 0.5·(1 + 0.5·1) = 0.75.
    np.testing.assert_allclose(got, [6.0, 6.0, 12.0, 2.5 + 10.0 * 0.75**0.5], rtol=1e-12)
    plain = dynamic(method="ewma", k=10.0, alpha=0.5, warmup=2).apply(*one_slot([1.0, 3.0, 5.0, 0.0]))
    assert plain[3] == pytest.approx(3.5 + 10.0 * 2.75**0.5, rel=1e-12)  # 5.0 unclipped: mean 3.5, var 2.75


def test_winsorize_at_or_above_k_changes_nothing() -> None:
    rng = np.random.default_rng(3)
    slots, scores = one_slot(list(rng.gamma(1.0, 1.0, 300)))
    plain = dynamic(method="ewma", k=3.0, alpha=0.05, warmup=10).apply(slots, scores)
    clipped = dynamic(method="ewma", k=3.0, alpha=0.05, warmup=10, winsorize=3.0).apply(slots, scores)
    np.testing.assert_array_equal(clipped, plain)


def test_min_ratio_floors_the_threshold_at_a_multiple_of_the_centre() -> None:
    # Near-constant scores: mean + 3·std hugs the mean, so a 10% rise would alert; with
    # min_ratio 1.5 the threshold is 1.5 times the mean instead. The population threshold
    # (1.0 + 3 · 0.5 = 2.5) is already above 1.5 · 1.0.
    scores = [1.0, 1.01, 0.99, 1.0, 1.1]
    plain = dynamic(method="ewma", k=3.0, alpha=0.5, warmup=1).apply(*one_slot(scores))
    floored = dynamic(method="ewma", k=3.0, alpha=0.5, warmup=1, min_ratio=1.5).apply(*one_slot(scores))
    assert plain[4] < 1.1  # the rise alerts without the floor
    assert floored[0] == plain[0] == 2.5
    # After [1.0]: mean 1, std 0; after [1.0, 1.01]: mean 1.005.
    np.testing.assert_allclose(floored[1:3], [1.5, 1.5 * 1.005], rtol=1e-12)
    assert floored[4] > 1.1


def test_min_ratio_floors_the_population_threshold_too() -> None:
    # Population: mean 1.0 + k 0.5 · std 0.5 = 1.25, below 2 · 1.0.
    assert dynamic(k=0.5, min_ratio=2.0).apply(*one_slot([0.0]))[0] == 2.0


@settings(max_examples=100, deadline=None)
@given(
    scores=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=60),
    method=st.sampled_from(["ewma", "rolling", "median"]),
    ratio=st.floats(1.01, 5.0),
)
def test_min_ratio_only_ever_raises_a_threshold(scores: list[float], method: str, ratio: float) -> None:
    """Until the first score the floor turns from anomalous into normal, the floored
    thresholds are the plain ones raised to at least ratio x the plain rule's centre."""
    slots, values = one_slot(scores)
    plain_rule = dynamic(method=method, k=2.0, window=5, warmup=2, alpha=0.3)
    plain = plain_rule.apply(slots, values)
    floored = dynamic(method=method, k=2.0, window=5, warmup=2, alpha=0.3, min_ratio=ratio).apply(slots, values)
    differs = np.flatnonzero((values > plain) != (values > floored))
    same_until = int(differs[0]) + 1 if len(differs) else len(scores)
    assert np.all(floored[:same_until] >= plain[:same_until])


# --- dynamic: regime change ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["ewma", "rolling"])
def test_regime_change_restarts_the_statistics_from_the_run(method: str) -> None:
    # k=1, warm-up 3 (population 1.5). Normal level ~1, then a persistent shift to ~10.
    rule = dynamic(method=method, k=1.0, warmup=3, window=50, alpha=0.01, regime_after=3)
    normal = [1.0, 1.2, 0.8, 1.0]
    shifted = [10.0, 11.0, 12.0, 11.0, 10.5]
    got = rule.apply(*one_slot([*normal, *shifted]))
    before = float(np.mean(normal) + np.std(normal))
    # The first three shifted scores meet the old threshold and are anomalous ...
    np.testing.assert_allclose(got[4:7], before, rtol=1e-12)
    assert np.all(np.asarray(shifted[:3]) > got[4:7])
    # ... then the statistics are exactly those three scores: mean 11, std sqrt(2/3).
    assert got[7] == pytest.approx(11.0 + (2 / 3) ** 0.5, rel=1e-12)
    assert shifted[3] <= got[7]  # the new level is normal now
    # Without `regime_after` the old threshold stays for ever.
    stuck = dynamic(method=method, k=1.0, warmup=3, window=50, alpha=0.01).apply(*one_slot([*normal, *shifted]))
    np.testing.assert_allclose(stuck[4:], before, rtol=1e-12)


@pytest.mark.parametrize("method", ["ewma", "rolling"])
def test_regime_change_needs_an_unbroken_run(method: str) -> None:
    # A normal score between spikes restarts the count: 2 + 2 spikes never make a run of 3.
    rule = dynamic(method=method, k=1.0, warmup=3, window=50, alpha=0.01, regime_after=3)
    got = rule.apply(*one_slot([1.0, 1.2, 0.8, 1.0, 9.0, 9.0, 1.0, 9.0, 9.0, 1.1, 0.0]))
    accepted = [1.0, 1.2, 0.8, 1.0, 1.0]
    assert got[9] == pytest.approx(np.mean(accepted) + np.std(accepted), rel=1e-9)
    assert got[9] < 2.0


def test_regime_change_before_warmup_is_warm() -> None:
    # The run replaces the population threshold even when it is shorter than the warm-up.
    rule = dynamic(method="ewma", k=2.0, warmup=100, alpha=0.01, regime_after=2)
    got = rule.apply(*one_slot([5.0, 7.0, 0.0]))
    np.testing.assert_array_equal(got[:2], [2.0, 2.0])  # population 1.0 + 2 * 0.5
    assert got[2] == pytest.approx(6.0 + 2.0 * 1.0)


@pytest.mark.parametrize(("window", "warmup", "regime_after"), [(5, 3, 4), (20, 10, 2), (4, 0, 1)])
def test_rolling_regime_change_matches_reference(window: int, warmup: int, regime_after: int) -> None:
    rng = np.random.default_rng(window * regime_after)
    n = 500
    slots = rng.integers(0, 2, n)
    scores = rng.gamma(4.0, 0.25, n) + np.where(np.arange(n) > 250, 6.0, 0.0)  # a level shift
    rule = dynamic(method="rolling", k=2.0, window=window, warmup=warmup, regime_after=regime_after)
    expected = rolling_reference(slots, scores, 2.0, window, warmup, rule.population, regime_after)
    got = rule.apply(slots, scores)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # The shifted level became mostly normal; without regime changes it stays anomalous.
    stuck = dynamic(method="rolling", k=2.0, window=window, warmup=warmup).apply(slots, scores)
    assert np.mean(scores[-100:] > got[-100:]) < 0.5
    assert np.mean(scores[-100:] > stuck[-100:]) == 1.0


# --- dynamic: shared behaviour ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["ewma", "rolling", "median"])
def test_warmup_uses_population_threshold(method: str) -> None:
    rule = dynamic(method=method, k=3.0, warmup=5, window=10, alpha=0.1)
    got = rule.apply(*one_slot([0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))
    np.testing.assert_array_equal(got[:5], [2.5] * 5)  # 1.0 + 3 * 0.5
    assert got[5] == pytest.approx(0.1)  # five equal scores: mean 0.1, std 0


@pytest.mark.parametrize("method", ["ewma", "rolling", "median"])
def test_scores_above_threshold_do_not_update(method: str) -> None:
    base = [1.0, 1.2, 0.8, 1.1, 0.9]
    with_spikes = dynamic(method=method, k=2.0, warmup=2, window=4, alpha=0.3)
    without = dynamic(method=method, k=2.0, warmup=2, window=4, alpha=0.3)
    spiked_seq = [1.0, 1.2, 50.0, 0.8, 1.1, 60.0, 0.9, 0.0]
    got = with_spikes.apply(*one_slot(spiked_seq))
    ref = without.apply(*one_slot([*base, 0.0]))
    # Dropping the spikes from the sequence changes no threshold.
    np.testing.assert_array_equal(got, ref[[0, 1, 2, 2, 3, 4, 4, 5]])
    assert got[2] < 50.0 and got[5] < 60.0


@pytest.mark.parametrize("method", ["ewma", "rolling", "median"])
def test_entities_are_independent(method: str) -> None:
    rng = np.random.default_rng(7)
    a = rng.random(60) + 1.0
    b = rng.random(60) * 5.0  # a noisier entity
    alone = dynamic(method=method, k=2.0, warmup=5, window=8, alpha=0.2).apply(np.zeros(60, np.int64), a)
    slots = np.tile([0, 1], 60)
    scores = np.empty(120)
    scores[0::2], scores[1::2] = a, b
    together = dynamic(method=method, k=2.0, warmup=5, window=8, alpha=0.2).apply(slots, scores)
    np.testing.assert_array_equal(together[0::2], alone)
    assert not np.array_equal(together[1::2], alone)


@pytest.mark.parametrize("method", ["ewma", "rolling", "median"])
def test_update_false_changes_nothing(method: str) -> None:
    history = [1.0, 1.3, 0.9, 1.1, 1.0, 1.2]
    probe = np.array([0.5, 1.0, 1.4, 0.2])
    touched = dynamic(method=method, k=2.0, warmup=2, window=4, alpha=0.3)
    untouched = dynamic(method=method, k=2.0, warmup=2, window=4, alpha=0.3)
    touched.apply(*one_slot(history))
    untouched.apply(*one_slot(history))
    first = touched.apply(np.zeros(4, np.int64), probe, update=False)
    second = touched.apply(np.zeros(4, np.int64), probe, update=False)
    np.testing.assert_array_equal(first, second)
    assert np.all(first == first[0])  # no score inside the call moved the threshold
    # A slot never seen before, probed without update, stays at the population threshold.
    np.testing.assert_array_equal(touched.apply(np.array([5, 5]), np.array([0.1, 0.1]), update=False), [2.0, 2.0])
    np.testing.assert_array_equal(
        touched.apply(*one_slot([1.0, 1.0, 1.0])), untouched.apply(*one_slot([1.0, 1.0, 1.0]))
    )


@st.composite
def dynamic_cases(draw: st.DrawFn) -> tuple[DynamicRule, np.ndarray, np.ndarray, list[int]]:
    rule = DynamicRule(
        rule="dynamic",
        method=draw(st.sampled_from(["ewma", "rolling", "median"])),
        k=draw(st.floats(0.5, 4.0)),
        alpha=draw(st.floats(0.01, 1.0)),
        window=draw(st.integers(2, 8)),
        warmup=draw(st.integers(0, 6)),
        regime_after=draw(st.none() | st.integers(1, 5)),
        winsorize=draw(st.none() | st.floats(0.1, 5.0)),
        min_ratio=draw(st.none() | st.floats(1.01, 5.0)),
    )
    n = draw(st.integers(0, 80))
    slots = np.asarray(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.int64)
    scores = np.asarray(draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n)), np.float64)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return rule, slots, scores, cuts


@settings(max_examples=200, deadline=None)
@given(dynamic_cases())
def test_dynamic_threshold_is_the_same_for_any_chunking(
    case: tuple[DynamicRule, np.ndarray, np.ndarray, list[int]],
) -> None:
    rule, slots, scores, cuts = case
    whole = DynamicThreshold(rule, POPULATION).apply(slots, scores)
    chunked_rule = DynamicThreshold(rule, POPULATION)
    bounds = [0, *cuts, len(scores)]
    chunked = np.concatenate([chunked_rule.apply(slots[lo:hi], scores[lo:hi]) for lo, hi in pairwise(bounds)])
    np.testing.assert_array_equal(chunked, whole)


# --- severities ----------------------------------------------------------------------------


def thresholds(warning: dict[str, object], critical: dict[str, object] | None = None) -> Thresholds:
    return Thresholds.model_validate({"warning": warning, "critical": critical})


def test_severity_warning_and_critical() -> None:
    rules = SeverityRules(thresholds({"rule": "static", "value": 1.0}, {"rule": "static", "value": 2.0}), POPULATION)
    got = rules.apply(*one_slot([0.5, 1.5, 2.5, 1.0, 2.0, 100.0]))
    assert got.severity.dtype == np.int8
    np.testing.assert_array_equal(got.severity, [NONE, WARNING, CRITICAL, NONE, WARNING, CRITICAL])
    # Critical scores report the critical threshold, the rest the warning one.
    np.testing.assert_array_equal(got.threshold, [1.0, 1.0, 2.0, 1.0, 1.0, 2.0])


def test_severity_without_critical_rule_is_never_critical() -> None:
    rules = SeverityRules(thresholds({"rule": "static", "value": 1.0}), POPULATION)
    got = rules.apply(*one_slot([0.5, 1.5, 1e9]))
    np.testing.assert_array_equal(got.severity, [NONE, WARNING, WARNING])
    np.testing.assert_array_equal(got.threshold, [1.0, 1.0, 1.0])


def test_severity_quantile_warning_static_critical() -> None:
    errors = ErrorStats.from_errors(np.arange(101, dtype=np.float32))  # 0.9 quantile = 90
    rules = SeverityRules(
        thresholds({"rule": "quantile", "q": 0.9, "factor": 1.0}, {"rule": "static", "value": 200.0}), errors
    )
    got = rules.apply(*one_slot([89.0, 91.0, 201.0]))
    np.testing.assert_array_equal(got.severity, [NONE, WARNING, CRITICAL])
    np.testing.assert_allclose(got.threshold, [90.0, 90.0, 200.0])


def test_critical_needs_the_warning_threshold_too() -> None:
    # Rules of different kinds are not cross-checked by the config: here critical (the median
    # of 0..100 = 50) is below warning (60). A score between them is not anomalous at all.
    errors = ErrorStats.from_errors(np.arange(101, dtype=np.float32))
    rules = SeverityRules(thresholds({"rule": "static", "value": 60.0}, {"rule": "quantile", "q": 0.5}), errors)
    got = rules.apply(*one_slot([40.0, 55.0, 70.0]))
    np.testing.assert_array_equal(got.severity, [NONE, NONE, CRITICAL])
    np.testing.assert_allclose(got.threshold, [60.0, 60.0, 50.0])


def test_severity_with_dynamic_warning_follows_each_entity() -> None:
    rules = SeverityRules(
        thresholds({"rule": "dynamic", "method": "rolling", "k": 1.0, "window": 3, "warmup": 2}), POPULATION
    )
    # Entity 0 runs at ~1.0, entity 1 at ~0.1: a 1.0 is normal for the first, anomalous for the second.
    slots = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    scores = np.array([1.0, 0.1, 1.1, 0.12, 0.9, 0.11, 1.0, 1.0])
    got = rules.apply(slots, scores)
    np.testing.assert_array_equal(got.severity, [NONE] * 7 + [WARNING])


# --- carrying statistics over a model swap ---------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(dynamic_cases(), st.floats(0.05, 20.0))
def test_carried_statistics_scale_every_threshold_by_the_factor(
    case: tuple[DynamicRule, np.ndarray, np.ndarray, list[int]], factor: float
) -> None:
    # A swap to a model whose scores are `factor` times the old one's: the carried rule, fed
    # the scaled scores, gives `factor` times the thresholds the old rule gives the old scores,
    # warm entities stay warm, and cold ones keep the new population threshold.
    rule, slots, scores, cuts = case
    cut = cuts[0] if cuts else len(scores) // 2
    old = DynamicThreshold(rule, POPULATION)
    old.apply(slots[:cut], scores[:cut])
    scaled_population = ErrorStats(POPULATION.sorted_errors * factor, POPULATION.mean * factor, POPULATION.std * factor)
    new = DynamicThreshold(rule, scaled_population)
    new.carry(old, factor)
    expected = old.apply(slots[cut:], scores[cut:])
    # A score within rounding of its threshold (a 0 score against a threshold of exactly 0) may
    # fall on either side once the statistics are scaled, which then changes what they learn:
    # the property is about scores that are decided, which real ones almost always are.
    assume(bool(np.all(np.abs(scores[cut:] - expected) > 1e-6)))
    expected = expected * factor
    # atol: a rolling variance that should be 0 keeps rounding residue (scores up to 10, so
    # sqrt(1e-14) ≈ 1e-7 before scaling).
    np.testing.assert_allclose(new.apply(slots[cut:], scores[cut:] * factor), expected, rtol=1e-9, atol=1e-6 * factor)
    np.testing.assert_array_equal(new.cold_rows, old.cold_rows)


def test_carried_rules_keep_warm_entities_off_the_population_threshold() -> None:
    rule = {"rule": "dynamic", "method": "ewma", "k": 2.0, "alpha": 0.1, "warmup": 3}
    config = thresholds(rule, {**rule, "k": 4.0})
    rules = SeverityRules(config, POPULATION)
    slots, scores = one_slot([0.1, 0.12, 0.08, 0.11])
    before = rules.apply(slots, scores)
    assert not before.cold[-1]
    # The new model's held-out errors are twice the old one's: population 2 + 2·1 = 4.
    new_errors = ErrorStats(POPULATION.sorted_errors * 2, 2.0, 1.0)
    carried = SeverityRules.carried(rules, new_errors, 2.0)
    after = carried.apply(np.zeros(1, np.int64), np.array([0.2]))
    assert not after.cold[0]
    assert after.threshold[0] == pytest.approx(2 * rules.apply(np.zeros(1, np.int64), np.array([0.1])).threshold[0])
    # Rebuilt without carrying, the entity is cold again and judged by the population threshold.
    fresh = SeverityRules(config, new_errors).apply(np.zeros(1, np.int64), np.array([0.2]))
    assert fresh.cold[0] and fresh.threshold[0] == pytest.approx(4.0)
