"""Idle entity eviction (`window.idle_evict_after_s`): the window store against a plain
sample-by-sample reference, the pipeline's threshold and alert state (an evicted entity comes
back as a new one; an open incident is resolved), both for any batch cut, and the daemon's
`detector_entities` / `detector_entities_evicted_total`."""

import itertools
import json
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

# The pipeline tests share test_pipeline's tiny trained model and data.
from test_pipeline import (  # noqa: F401 (checkpoint is a fixture)
    ENTITIES,
    SPIKE_AT,
    SPIKE_ENTITY,
    SPIKE_FEATURE,
    STREAM,
    WINDOW,
    checkpoint,
    cut_cases,
    rows_of,
    run,
    signal,
)
from test_service import STREAM as SERVICE_STREAM
from test_service import FakeConsumer, write
from test_window import IDENTITY, assert_index_consistent, make_batch

from detector.config import Scoring, load_config
from detector.model import Checkpoint, save_checkpoint
from detector.pipeline import Pipeline
from detector.service import Daemon
from detector.source import SampleBatch
from detector.train import fit
from detector.window import WindowStore


def reference(entities, times, values, size, stride, idle, drop):
    """Sample by sample: an entity whose newest sample is more than `idle` behind the newest
    timestamp seen so far is forgotten, and comes back as new. Each eviction is placed after
    the row that moved the clock past the entity's deadline and after the entity's last row."""
    buffers: dict[str, deque] = {}
    stamps: dict[str, deque] = {}  # the timestamps of the samples in `buffers`
    seen: dict[str, int] = {}
    newest: dict[str, int] = {}
    last_row: dict[str, int] = {}
    clock_after = np.maximum.accumulate(np.asarray(times))
    clock = None
    windows, rejected, evictions = [], [], []

    def evict(entity):
        last = newest.pop(entity)
        passed = int(np.searchsorted(clock_after, last + idle, side="right"))
        evictions.append((entity, last, max(passed, last_row.pop(entity)) + 1))
        del buffers[entity], seen[entity], stamps[entity]

    for row, (entity, t, value) in enumerate(zip(entities, times, values, strict=True)):
        if entity in newest and clock - newest[entity] > idle:
            evict(entity)
        last_row[entity] = row
        if drop and entity in newest and t < newest[entity]:
            rejected.append(row)
        else:
            buffers.setdefault(entity, deque(maxlen=size)).append(value)
            stamps.setdefault(entity, deque(maxlen=size)).append(t)
            seen[entity] = seen.get(entity, 0) + 1
            newest[entity] = max(newest.get(entity, t), t)
            if seen[entity] >= size and (seen[entity] - size) % stride == 0:
                windows.append((row, stamps[entity][0], np.array(buffers[entity])))
        clock = t if clock is None else max(clock, t)
    for entity in [e for e, last in newest.items() if clock - last > idle]:
        evict(entity)
    return windows, rejected, sorted(evictions), len(newest)


@st.composite
def churning_streams(draw):
    n = draw(st.integers(1, 150))
    n_entities = draw(st.integers(1, 6))
    entities = [f"e{draw(st.integers(0, n_entities - 1))}" for _ in range(n)]
    # Mostly small steps, some long silences, some steps back (late samples), and silences
    # beyond int32 milliseconds (with the longest idle setting, an entity survives them).
    steps = draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 40, -4, 2**31, 2**33, -(2**32)]), min_size=n, max_size=n))
    times = np.maximum(np.cumsum(steps), 0).tolist()
    values = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    size = draw(st.integers(2, 6))
    stride = draw(st.integers(1, 3))
    idle = draw(st.sampled_from([0, 5, 20, 60, 2**40]))
    drop = draw(st.booleans())
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return entities, times, values, size, stride, idle, drop, cuts


@settings(max_examples=400, deadline=None)
@given(churning_streams())
def test_eviction_matches_reference_for_any_batching(case) -> None:
    entities, times, values, size, stride, idle, drop, cuts = case
    store = WindowStore(size, stride, 2, IDENTITY, capacity=1, idle_evict_ms=idle)
    got_rows, got_starts, got_ends, got_windows, got_rejected, got_evictions = [], [], [], [], [], []
    for lo, hi in itertools.pairwise([0, *cuts, len(entities)]):
        if lo == hi:
            continue
        ready, late = store.append(make_batch(entities[lo:hi], times[lo:hi], values[lo:hi]), drop)
        got_rows.extend((ready.rows + lo).tolist())
        got_starts.extend(ready.start_ms.tolist())
        got_ends.extend(ready.end_ms.tolist())
        got_windows.extend(ready.values)
        got_rejected.extend((late + lo).tolist())
        got_evictions.extend(
            zip(store.evicted.entities, store.evicted.last_ms.tolist(), (store.evicted.rows + lo).tolist(), strict=True)
        )
    windows, rejected, evictions, live = reference(entities, times, values, size, stride, idle, drop)
    assert got_rows == [row for row, _, _ in windows]
    # A reused slot's timestamps start afresh: the windows' start and end times are exact.
    assert got_starts == [start for _, start, _ in windows]
    assert got_ends == [times[row] for row, _, _ in windows]
    for got, (_, _, want) in zip(got_windows, windows, strict=True):
        np.testing.assert_array_equal(got, want)
    assert got_rejected == rejected
    assert sorted(got_evictions) == evictions
    assert len(store) == live


def test_evicted_slots_are_reused_so_memory_stays_bounded() -> None:
    store = WindowStore(4, 1, 2, IDENTITY, capacity=8, idle_evict_ms=1000)
    # 50 cohorts of 8 entities, one batch each: a cohort is idle once the next one arrives, and
    # its slots are free for the one after.
    capacity = []
    for generation in range(50):
        names = [f"g{generation}-{i}" for i in range(8)]
        store.append(make_batch(names, [generation * 2000] * 8, np.zeros((8, 2))))
        assert len(store.evicted) == (8 if generation else 0)
        capacity.append(len(store._count))
    assert len(store.entity_of) == 16  # two cohorts' worth of slots, never more
    assert len(store) == 8
    assert capacity[1] >= 16 and set(capacity[1:]) == {capacity[1]}  # grown once, then never again


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 400), st.integers(0, 2**32), st.sampled_from([1, 3, 50]), st.lists(st.integers(0, 2000), max_size=5)
)
def test_many_entities_churning_keep_the_index_and_windows_exact(n_entities, seed, idle_steps, cuts) -> None:
    # Entities come and go by the hundred: the index deletes, reuses and rebuilds its entries,
    # slots are reused, and windows and evictions match the reference.
    rng = np.random.default_rng(seed)
    n = 4 * n_entities
    names = rng.integers(0, n_entities, n)
    entities = [f"e{i}" for i in names.tolist()]
    times = np.cumsum(rng.choice([0, 1, 1, 2, 90, 2**31], n)).tolist()
    values = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    idle = idle_steps * 2
    store = WindowStore(3, 1, 2, IDENTITY, capacity=1, idle_evict_ms=idle)
    got_starts, got_evictions = [], []
    for lo, hi in itertools.pairwise([0, *sorted(min(c, n) for c in cuts), n]):
        if lo == hi:
            continue
        ready, _ = store.append(make_batch(entities[lo:hi], times[lo:hi], values[lo:hi]), False)
        got_starts.extend(zip((ready.rows + lo).tolist(), ready.start_ms.tolist(), strict=True))
        got_evictions.extend(zip(store.evicted.entities, (store.evicted.rows + lo).tolist(), strict=True))
        assert_index_consistent(store)
    windows, _, evictions, live = reference(entities, times, values, 3, 1, idle, False)
    assert got_starts == [(row, start) for row, start, _ in windows]
    assert sorted(got_evictions) == [(e, row) for e, _, row in evictions]
    assert len(store) == live


def test_no_eviction_without_idle_setting() -> None:
    store = WindowStore(2, 1, 2, IDENTITY)
    store.append(make_batch(["a", "b"], [0, 10**12], np.zeros((2, 2))))
    assert len(store) == 2 and len(store.evicted) == 0


# --- the pipeline: threshold and alert state, resolves, batch cuts --------------------------

IDLE_S = 30.0
EVICTING = STREAM.model_copy(update={"window": STREAM.window.model_copy(update={"idle_evict_after_s": IDLE_S})})
H1_STOPS, H1_RETURNS, END = 486, 560, 640  # h1 falls silent while its spike incident is open
H0_SPIKE_AT = 590  # and h0 has an incident after h1's eviction: events of two entities to order


def churn_data(seed: int, returns: int = H1_RETURNS) -> SampleBatch:
    """h0 (spiking at H0_SPIKE_AT) and h2 throughout; h1 with its spike, silent from H1_STOPS,
    back at `returns`. In
    time order (the entities at one second in a random order): the stream clock is the newest
    timestamp, so an entity whose records lagged the others' by IDLE_S would look idle."""
    entities, times, values = [], [], []
    for entity in ENTITIES:
        t = np.arange(400, END)
        if entity == SPIKE_ENTITY:
            t = t[(t < H1_STOPS) | (t >= returns)]
        v = signal(entity, t)
        if entity == SPIKE_ENTITY:
            v[(t >= SPIKE_AT) & (t < SPIKE_AT + 3), SPIKE_FEATURE] += 3.0
        if entity == "h0":
            v[(t >= H0_SPIKE_AT) & (t < H0_SPIKE_AT + 3), SPIKE_FEATURE] += 3.0
        entities += [entity] * len(t)
        times.append(t * 1000)
        values.append(v)
    ms = np.concatenate(times)
    order = np.lexsort((np.random.default_rng(seed).random(len(ms)), ms))
    return SampleBatch([entities[i] for i in order], ms[order], np.concatenate(values)[order], np.arange(len(ms)) + 100)


def test_an_idle_entity_s_open_incident_is_resolved_and_it_returns_as_new(checkpoint: Checkpoint) -> None:  # noqa: F811
    batch = churn_data(seed=0)
    result = run(Pipeline("web", EVICTING, checkpoint), batch)
    h1 = rows_of(batch, SPIKE_ENTITY)
    assert [(a.entity, a.status, a.reason) for a in result.alerts] == [
        (SPIKE_ENTITY, "firing", None),
        (SPIKE_ENTITY, "resolved", "idle"),
        ("h0", "firing", None),
        ("h0", "resolved", None),
    ]
    firing = [a for a in result.alerts if a.status == "firing" and a.entity == SPIKE_ENTITY]
    (resolved,) = [a for a in result.alerts if a.status == "resolved" and a.entity == SPIKE_ENTITY]
    assert resolved.entity == SPIKE_ENTITY and resolved.reason == "idle"
    assert resolved.resolves == firing[-1].id and resolved.ends == tuple(a.id for a in firing)
    assert resolved.window_end_ms == (H1_STOPS - 1) * 1000  # h1's newest sample
    assert resolved.to_dict()["reason"] == "idle" and resolved.to_dict()["score"] is None
    assert result.alerts.index(resolved) > result.alerts.index(firing[-1])
    # Back after the silence, h1 is a new entity: an empty window, no incident, and exactly the
    # scores and thresholds of a pipeline that never saw it before.
    back = h1[batch.timestamps[h1] >= H1_RETURNS * 1000]
    assert np.isnan(result.score[back[: WINDOW - 1]]).all() and np.isfinite(result.score[back[WINDOW - 1 :]]).all()
    assert all(result.alert_ids[r] is None for r in back)
    fresh = run(Pipeline("web", EVICTING, checkpoint), batch.take(back))
    np.testing.assert_array_equal(result.score[back], fresh.score)
    np.testing.assert_array_equal(result.threshold[back], fresh.threshold)
    # Without eviction the same data keeps h1's window and incident.
    kept = run(Pipeline("web", STREAM, checkpoint), batch)
    assert np.isfinite(kept.score[back]).all()
    assert [(a.entity, a.status, a.reason) for a in kept.alerts if a.entity == SPIKE_ENTITY] == [
        (SPIKE_ENTITY, "firing", None),
        (SPIKE_ENTITY, "resolved", None),
    ]


def test_an_idle_entity_without_an_incident_leaves_quietly(checkpoint: Checkpoint) -> None:  # noqa: F811
    batch = churn_data(seed=1)
    pipeline = Pipeline("web", EVICTING, checkpoint)
    quiet = batch.take(np.flatnonzero(np.asarray(batch.entities) != SPIKE_ENTITY))
    part = pipeline.process(quiet.take(np.flatnonzero(quiet.timestamps < 500_000)))
    assert part.evicted == 0 and len(pipeline.windows) == 2
    # h2 falls silent: once h0 is IDLE_S past h2's newest sample, h2 is gone.
    h0 = quiet.take(np.flatnonzero((np.asarray(quiet.entities) == "h0") & (quiet.timestamps >= 500_000)))
    evicted = [pipeline.process(h0.take(np.array([i]))).evicted for i in range(len(h0))]
    assert sum(evicted) == 1 and evicted.index(1) == 30  # h0 at t = 530: more than IDLE_S past h2's 499
    assert len(pipeline.windows) == 1 and "h2" not in pipeline.windows.slot_of


@settings(max_examples=25, deadline=None)
@given(cut_cases(), st.sampled_from([505, 520, 560, 600]))
def test_eviction_results_do_not_depend_on_the_batch_cut(
    checkpoint: Checkpoint,  # noqa: F811
    case: tuple[int, list[int], int],
    returns: int,
) -> None:
    seed, cuts, batch_windows = case
    batch = churn_data(seed, returns)
    cuts = [min(c, len(batch)) for c in cuts]
    whole = run(Pipeline("web", EVICTING, checkpoint), batch)
    cut = run(Pipeline("web", EVICTING, checkpoint, Scoring(batch_windows=batch_windows)), batch, cuts)
    np.testing.assert_array_equal(cut.score, whole.score)
    np.testing.assert_array_equal(cut.threshold, whole.threshold)
    np.testing.assert_array_equal(cut.severity, whole.severity)
    assert cut.alert_ids == whole.alert_ids
    assert cut.alerts == whole.alerts
    h1 = rows_of(batch, SPIKE_ENTITY)
    back = h1[batch.timestamps[h1] >= returns * 1000]
    if returns - (H1_STOPS - 1) > IDLE_S:
        # Evicted: the open incident ends as idle, and h1 comes back exactly as a new entity.
        assert [(a.entity, a.reason) for a in whole.alerts] == [(SPIKE_ENTITY, None), (SPIKE_ENTITY, "idle")] + [
            ("h0", None)
        ] * 2
        fresh = run(Pipeline("web", EVICTING, checkpoint), batch.take(back))
        np.testing.assert_array_equal(whole.score[back], fresh.score)
        np.testing.assert_array_equal(whole.threshold[back], fresh.threshold)
    else:
        # Back within IDLE_S: the same entity, its window and incident carry on.
        assert [a.reason for a in whole.alerts] == [None] * 4
        assert np.isfinite(whole.score[back]).all()


# --- the daemon's metrics ------------------------------------------------------------------


def build_daemon(tmp_path: Path, stream: dict[str, Any]) -> Daemon:
    """A daemon (not opened) over `stream` with a freshly trained checkpoint."""
    config_path = write(tmp_path / "c.yaml", {"streams": {"web": stream}, "server": {"enabled": False}})
    config = load_config(config_path)
    t = np.arange(200)
    samples = SampleBatch(["h"] * 200, t * 60_000, np.sin(t / 5)[:, None].astype(np.float32), t)
    checkpoint_path = config.streams["web"].checkpoint
    assert checkpoint_path is not None
    save_checkpoint(checkpoint_path, fit("web", config.streams["web"], samples, progress=False))
    return Daemon(config, config_path, CollectorRegistry())


def test_daemon_counts_evictions_and_live_entities(tmp_path: Path) -> None:
    stream = {**SERVICE_STREAM, "window": {"size": 4, "idle_evict_after_s": 600}}
    daemon = build_daemon(tmp_path, stream)
    consumer = FakeConsumer([], daemon)
    daemon.consumer = consumer

    def record(offset: int, host: str, minute: int) -> SimpleNamespace:
        value = json.dumps({"host": host, "timestamp": 60 * minute, "cpu": 0.5}).encode()
        return SimpleNamespace(topic="metrics", partition=0, offset=offset, key=None, value=value, timestamp=0)

    def value(name: str) -> float | None:
        return daemon.registry.get_sample_value(name, {"stream": "web"})

    daemon.process([record(0, "a", 0), record(1, "b", 0), record(2, "c", 5)])
    assert value("detector_entities") == 3 and value("detector_entities_evicted_total") == 0
    # Minute 15: a and b (newest at minute 0) are more than 10 minutes behind; c is not.
    daemon.process([record(3, "c", 15)])
    assert value("detector_entities") == 1 and value("detector_entities_evicted_total") == 2
    daemon.process([record(4, "a", 16), record(5, "d", 16)])  # a is back, as a new entity
    assert value("detector_entities") == 3 and value("detector_entities_evicted_total") == 2
    assert len(daemon.runtimes["web"].pipeline.windows.entity_of) == 3  # the evicted slots were reused
    assert [c[("metrics", 0)] for c in consumer.commits] == [3, 4, 6]
