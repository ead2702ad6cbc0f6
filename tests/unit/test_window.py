"""WindowStore against a plain per-entity reference, for any batch cut."""

import itertools
from collections import defaultdict, deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.source import SampleBatch
from detector.window import NORMALIZED_LIMIT, Scaler, WindowStore

IDENTITY = Scaler(np.zeros(2, np.float32), np.ones(2, np.float32))


def make_batch(entities: list[str], times: list[int], values: np.ndarray) -> SampleBatch:
    return SampleBatch(
        entities=list(entities),
        timestamps=np.asarray(times, np.int64),
        values=np.asarray(values, np.float32).reshape(len(entities), -1),
        positions=np.arange(len(entities), dtype=np.int64),
    )


def reference_windows(entities, times, values, size, stride):
    """(row, start_ms, window) for every due window, with deques: the obvious implementation."""
    buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=size))
    seen: dict[str, int] = defaultdict(int)
    out = []
    for row, (entity, t, value) in enumerate(zip(entities, times, values, strict=True)):
        buffers[entity].append((t, value))
        seen[entity] += 1
        if seen[entity] >= size and (seen[entity] - size) % stride == 0:
            out.append((row, buffers[entity][0][0], np.array([v for _, v in buffers[entity]])))
    return out


DAY_MS = 86_400_000
# Steps between timestamps beyond what ordinary cadences make: the edges of the int32 steps the
# store keeps (±24.8 days), silences of weeks and years, steps back as large.
HUGE_STEPS = [2**31 - 1, 2**31, 40 * DAY_MS, 2**40, -(2**31) + 1, -(2**31), -(2**31) - 1, -(2**40)]


@st.composite
def streams(draw):
    n = draw(st.integers(1, 120))
    n_entities = draw(st.integers(1, 5))
    entities = [f"e{draw(st.integers(0, n_entities - 1))}" for _ in range(n)]
    # The stream's timestamps: mostly ordinary steps (ms to a week, some steps back), some huge.
    ordinary = st.one_of(st.integers(-5, 120_000), st.sampled_from([60_000, DAY_MS, 7 * DAY_MS]))
    steps = draw(st.lists(st.one_of(ordinary, ordinary, st.sampled_from(HUGE_STEPS)), min_size=n, max_size=n))
    start = draw(st.one_of(st.just(1_700_000_000_000), st.integers(-(2**50), 2**50)))
    times = (start + np.cumsum(steps)).tolist()
    return entities, times, *draw_layout(draw, n, max_stride=5)


def draw_layout(draw, n: int, max_stride: int):
    """Values for `n` samples, a window size and stride, and where the stream is cut into batches."""
    values = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    size = draw(st.integers(2, 12))
    stride = draw(st.integers(1, max_stride))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return values, size, stride, cuts


def test_a_silence_beyond_int32_milliseconds_is_exact_and_forgotten_once_out_of_the_ring() -> None:
    # 30 days between two samples does not fit the int32 step ring: it is kept exactly on the
    # side, while a window spans it, and dropped once the ring has moved past it.
    store = WindowStore(3, 1, 2, IDENTITY)
    t0, gap = 1_700_000_000_000, 30 * DAY_MS
    times = [t0, t0 + 1, t0 + 1 + gap, t0 + 2 + gap, t0 + 3 + gap, t0 + 4 + gap]
    starts = []
    for t in times:
        ready, _ = store.append(make_batch(["a"], [t], np.zeros((1, 2))))
        starts.extend(ready.start_ms.tolist())
        if t == times[0]:
            assert not store._wide_steps  # a first sample has no step (not one from time 0)
        if t == times[2]:
            assert store._wide_steps  # the 30-day step, kept exactly
    assert starts == times[:4]
    assert not store._wide_steps


def test_window_state_is_at_most_about_twice_the_raw_window() -> None:
    # Per slot: the float32 values (W*D*4 bytes), int32 timestamp steps (W*4) and a few scalars.
    # An int64 timestamp ring (W*8) would fail this.
    w, d = 64, 1
    store = WindowStore(w, 1, d, Scaler(np.zeros(d, np.float32), np.ones(d, np.float32)), capacity=100)
    arrays = [a for a in vars(store).values() if isinstance(a, np.ndarray)]
    per_slot = sum(a.nbytes for a in arrays) / 100
    assert per_slot <= 2 * w * d * 4 + 40


def test_out_of_order_samples_are_rejected_per_entity() -> None:
    store = WindowStore(2, 1, 2, IDENTITY)
    batch = make_batch(["a", "a", "b", "a", "b"], [10, 20, 5, 15, 6], np.zeros((5, 2)))
    ready, late = store.append(batch)
    assert late.tolist() == [3]  # a@15 after a@20; b's own clock is separate
    assert ready.rows.tolist() == [1, 4]
    # The rejection holds across batches too.
    _, late = store.append(make_batch(["b", "a"], [4, 21], np.zeros((2, 2))))
    assert late.tolist() == [0]


def test_normalization_uses_entity_parameters_and_population_fallback() -> None:
    scaler = Scaler(
        np.zeros(2, np.float32),
        np.ones(2, np.float32),
        ("a",),
        np.full((1, 2), 10.0, np.float32),
        np.full((1, 2), 2.0, np.float32),
    )
    store = WindowStore(2, 1, 2, scaler)
    ready, _ = store.append(make_batch(["a", "a", "z", "z"], [1, 2, 1, 2], np.full((4, 2), 12.0)))
    np.testing.assert_allclose(ready.values[0], 1.0)  # (12 - 10) / 2
    np.testing.assert_allclose(ready.values[1], 12.0)  # unseen entity: population scaling


@pytest.mark.parametrize("method", ["robust", "standard"])
def test_scaler_survives_constant_series(method: str) -> None:
    from detector.config import Normalization

    scaler = Scaler.fit(np.full((50, 2), 3.0, np.float32), ["a"] * 50, Normalization(method=method))
    assert np.all(np.isfinite(scaler.scale)) and np.all(scaler.scale > 0)


def test_absurd_readings_are_clipped_so_scores_stay_finite() -> None:
    # float32 holds 1e20, but its square does not: the window must stay finite so the score does.
    store = WindowStore(2, 1, 2, IDENTITY)
    values = np.array([[0.0, 0.0], [1e20, 1.0], [-3e38, 2.0]], np.float32)
    ready, _ = store.append(make_batch(["a", "a", "a"], [1, 2, 3], values))
    assert np.isfinite(ready.values).all()
    assert ready.values[:, :, 0].tolist() == [[0.0, NORMALIZED_LIMIT], [NORMALIZED_LIMIT, -NORMALIZED_LIMIT]]
    assert ready.values[:, :, 1].tolist() == [[0.0, 1.0], [1.0, 2.0]]
    assert np.isfinite((ready.values.astype(np.float32) ** 2).mean())


def _sparse_training(rows: int = 10_000) -> np.ndarray:
    """Column 0 is 0 but for one spike to 1 (IQR 0, std 0.01); column 1 moves every row."""
    values = np.zeros((rows, 2), np.float32)
    values[rows // 2, 0] = 1.0
    values[:, 1] = np.arange(rows) % 7
    return values


def test_relative_min_scale_floors_a_feature_flat_in_training_but_for_spikes() -> None:
    from detector.config import Normalization

    values = _sparse_training()
    off = Scaler.fit(values, ["a"] * len(values), Normalization())
    on = Scaler.fit(values, ["a"] * len(values), Normalization(relative_min_scale=0.05))
    # Off: IQR 0 falls back to the std, 0.01, so a later reading of 1 (the size of the spike seen in
    # training) would be 100 scales. On: the floor is 5% of the training range.
    assert off.scale[0] == pytest.approx(0.01, rel=1e-3)
    assert on.scale[0] == pytest.approx(0.05)
    assert on.scale[1] == off.scale[1]  # a feature with a real spread keeps its IQR
    store = WindowStore(2, 1, 2, on)
    ready, _ = store.append(make_batch(["a", "a"], [1, 2], np.array([[0.0, 3.0], [1.0, 3.0]])))
    assert ready.values[0, 1, 0] == pytest.approx(20.0)  # 1 / 0.05


def test_relative_min_scale_measures_a_constant_series_in_relative_change() -> None:
    from detector.config import Normalization

    values = np.full((100, 1), 250.0, np.float32)
    scaler = Scaler.fit(values, ["a"] * 100, Normalization(relative_min_scale=0.01))
    assert scaler.scale[0] == pytest.approx(2.5)  # 1% of the level: a 10% change is 10 scales
    # Exactly 0 in training: no magnitude to be relative to, so `min_scale` is the floor.
    zero = Scaler.fit(np.zeros((100, 1), np.float32), ["a"] * 100, Normalization(relative_min_scale=0.01))
    assert zero.scale[0] == pytest.approx(1e-6)


@settings(max_examples=200, deadline=None)
@given(
    column=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=60),
    constant=st.booleans(),
    rel=st.floats(0.001, 1.0),
    method=st.sampled_from(["robust", "standard"]),
    position=st.floats(0.0, 1.0),
)
def test_values_within_the_training_magnitude_stay_within_one_over_relative_min_scale(
    column: list[float], constant: bool, rel: float, method: str, position: float
) -> None:
    # Any training series, constant or not: a later value inside the training range, or off the
    # centre by at most its level, normalizes to at most 1 / relative_min_scale, never ~1/min_scale.
    from detector.config import Normalization

    train = np.array(column[:1] * len(column) if constant else column, np.float32)[:, None]
    scaler = Scaler.fit(train, ["a"] * len(train), Normalization(method=method, relative_min_scale=rel))
    center = float(scaler.center[0])
    reach = max(float(train.max() - train.min()), abs(center))
    lo, hi = min(float(train.min()), center - reach), max(float(train.max()), center + reach)
    x = np.float32(lo + position * (hi - lo))
    store = WindowStore(1, 1, 1, scaler)
    ready, _ = store.append(make_batch(["a"], [1], np.array([[x]], np.float32)))
    assert abs(float(ready.values[0, 0, 0])) <= (1.0 / rel) * (1 + 1e-3) + 1e-3


# --- timestamps: regular, jittered and irregular steps, escapes, growth -----------------------


def windows_of(store: WindowStore, entities, times, values, cuts):
    """(rows, starts, ends, windows) of `store` fed the stream cut at `cuts`, in arrival order."""
    rows, starts, ends, windows = [], [], [], []
    for lo, hi in itertools.pairwise([0, *cuts, len(entities)]):
        if lo == hi:
            continue
        ready, late = store.append(make_batch(entities[lo:hi], times[lo:hi], values[lo:hi]), drop_out_of_order=False)
        assert len(late) == 0
        rows.extend((ready.rows + lo).tolist())
        starts.extend(ready.start_ms.tolist())
        ends.extend(ready.end_ms.tolist())
        windows.extend(ready.values)
    return rows, starts, ends, windows


def assert_matches_reference(store: WindowStore, entities, times, values, size, stride, cuts) -> None:
    rows, starts, ends, windows = windows_of(store, entities, times, values, cuts)
    expected = reference_windows(entities, times, values, size, stride)
    assert rows == [row for row, _, _ in expected]
    assert starts == [start for _, start, _ in expected]
    assert ends == [times[row] for row, _, _ in expected]
    for got, (_, _, want) in zip(windows, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def assert_index_consistent(store: WindowStore) -> None:
    # Every live entity is found at its slot, and no other name is.
    live = np.flatnonzero(store._live[: len(store.entity_of)]).tolist()
    assert dict(store.slot_of) == {store.entity_of[s]: s for s in live}
    assert len(store) == len(live)
    assert store.slots([store.entity_of[s] for s in live]).tolist() == live


CADENCES = [1, 1_000, 60_000, 300_000, DAY_MS]


@st.composite
def cadence_streams(draw):
    """Entities each with a cadence and a jitter (some beyond int16), rare escapes (missed
    samples, steps back, huge silences), interleaved in any order."""
    n_entities = draw(st.integers(1, 8))
    per_entity = []
    for e in range(n_entities):
        cadence = draw(st.sampled_from(CADENCES))
        jitter = draw(st.sampled_from([0, 7, 500, 30_000, 32_767, 40_000]))
        k = draw(st.integers(1, 40))
        steps = [
            draw(
                st.one_of(
                    st.integers(cadence - jitter, cadence + jitter),
                    st.integers(cadence - jitter, cadence + jitter),
                    st.integers(cadence - jitter, cadence + jitter),
                    st.sampled_from([2 * cadence, -cadence, 0, *HUGE_STEPS]),
                )
            )
            for _ in range(k - 1)
        ]
        start = draw(st.integers(-(2**45), 2**45))
        per_entity.append([(f"e{e}", t) for t in (start + np.cumsum([0, *steps])).tolist()])
    # Interleave the entities' samples in any order, each entity's in its own order.
    order = draw(st.permutations([e for e, samples in enumerate(per_entity) for _ in samples]))
    taken = [0] * n_entities
    entities, times = [], []
    for e in order:
        name, t = per_entity[e][taken[e]]
        taken[e] += 1
        entities.append(name)
        times.append(t)
    return entities, times, *draw_layout(draw, len(entities), max_stride=4)


@settings(max_examples=700, deadline=None)
@given(st.one_of(streams(), cadence_streams()))
def test_windows_match_reference_for_any_batching(case) -> None:
    # Samples are kept in arrival order (`drop_out_of_order=False`), so steps back stay in the
    # windows; window values and start/end timestamps are exact whatever the steps: random ones,
    # or regular ones with jitter up to and beyond int16, missed samples, steps back and
    # silences beyond int32.
    entities, times, values, size, stride, cuts = case
    store = WindowStore(size, stride, 2, IDENTITY, capacity=1)
    assert_matches_reference(store, entities, times, values, size, stride, cuts)
    assert_index_consistent(store)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 40 * DAY_MS), min_size=1, max_size=150),
    st.integers(1, 30),
    st.integers(2, 12),
    st.lists(st.integers(0, 150), max_size=6),
)
def test_irregular_steps_match_reference(steps, n_entities, size, cuts) -> None:
    # Random steps from ms to weeks (card transactions).
    n = len(steps)
    entities = [f"card-{i % n_entities}" for i in range(n)]
    times = (1_700_000_000_000 + np.cumsum(steps)).tolist()
    values = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    store = WindowStore(size, 1, 2, IDENTITY, capacity=1)
    assert_matches_reference(store, entities, times, values, size, 1, sorted(min(c, n) for c in cuts))
    assert_index_consistent(store)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32), st.lists(st.integers(0, 3000), max_size=5))
def test_growth_keeps_every_slot(n_entities, seed, cuts) -> None:
    # From capacity 1, many entities, some regular and some irregular, arrive in any batching: the
    # store and its index grow, and windows stay exact.
    rng = np.random.default_rng(seed)
    per = 8
    regular = rng.random(n_entities) < 0.5
    steps = np.where(
        regular[:, None],
        60_000 + rng.integers(-30_000, 30_000, (n_entities, per), endpoint=True),
        rng.exponential(3_600_000, (n_entities, per)).astype(np.int64),
    )
    times = 1_700_000_000_000 + np.cumsum(steps, axis=1)
    # The entities' samples interleaved at random, each entity's in its own order.
    ent = rng.permutation(np.repeat(np.arange(n_entities), per))
    rank = np.empty(len(ent), np.int64)
    rank[np.argsort(ent, kind="stable")] = np.arange(len(ent)) % per
    entities = [f"host-{e}" for e in ent.tolist()]
    flat = times[ent, rank]
    n = len(entities)
    values = rng.standard_normal((n, 2)).astype(np.float32)
    store = WindowStore(4, 1, 2, IDENTITY, capacity=1)
    assert_matches_reference(store, entities, flat.tolist(), values, 4, 1, sorted(min(c, n) for c in cuts))
    assert len(store) == n_entities
    assert_index_consistent(store)
