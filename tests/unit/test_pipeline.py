"""Pipeline.process with a tiny trained checkpoint: windows, scores, thresholds and alerts,
whatever the batch cut."""

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.alerts import Alert
from detector.config import Scoring, Stream
from detector.model import Checkpoint, load_checkpoint, save_checkpoint
from detector.pipeline import Mode, Pipeline
from detector.source import SampleBatch
from detector.threshold import CRITICAL, NONE
from detector.train import fit

WINDOW = 16
ENTITIES = ("h0", "h1", "h2")
SPIKE_ENTITY, SPIKE_FEATURE, SPIKE_AT = "h1", 1, 480  # feature "b" of h1 at t = 480, 481, 482

STREAM = Stream.model_validate(
    {
        "input": {"kind": "file", "path": "history.csv"},
        "mapping": {"entity": "host", "features": ["a", "b"]},
        "window": {"size": WINDOW},
        "normalization": {"method": "standard", "per_entity": True},
        "model": {"cell": "lstm", "hidden_size": 16, "latent_size": 4},
        "training": {
            "epochs": 30,
            "batch_size": 32,
            "learning_rate": 1e-2,
            "stride": 2,
            "early_stopping_patience": 0,
        },
        # A stateful warning rule, so batch-cut invariance covers threshold state too.
        "thresholds": {
            "warning": {"rule": "dynamic", "method": "ewma", "k": 4, "warmup": 20, "alpha": 0.05},
            "critical": {"rule": "quantile", "q": 0.99, "factor": 4},
        },
        "alerts": {"n": 3, "m": 5, "cooldown_s": 0, "top_features": 2},
    }
)


def signal(entity: str, t: np.ndarray) -> np.ndarray:
    """Each entity: the same periodic shapes at its own phase and level. Shape: (len(t), 2)."""
    i = ENTITIES.index(entity)
    phase = t + 3 * i
    return np.stack([np.sin(2 * np.pi * phase / 16), 0.5 * np.cos(2 * np.pi * phase / 8) + i], axis=1).astype(
        np.float32
    )


def interleaved(per_entity: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> SampleBatch:
    """Merge each entity's (times in s, values) in a random order that keeps each entity's own order."""
    labels = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(per_entity.values())])
    labels = np.random.default_rng(seed).permutation(labels)
    names = list(per_entity)
    entities, times, values = [], [], []
    taken = dict.fromkeys(names, 0)
    for label in labels:
        name = names[label]
        t, v = per_entity[name]
        k = taken[name]
        taken[name] += 1
        entities.append(name)
        times.append(int(t[k]) * 1000)
        values.append(v[k])
    n = len(entities)
    return SampleBatch(entities, np.asarray(times, np.int64), np.asarray(values, np.float32), np.arange(n) + 100)


def live_data(seed: int = 0, start: int = 400, stop: int = 520, spike: bool = True) -> SampleBatch:
    per_entity = {}
    for entity in ENTITIES:
        t = np.arange(start, stop)
        values = signal(entity, t)
        if spike and entity == SPIKE_ENTITY:
            values[(t >= SPIKE_AT) & (t < SPIKE_AT + 3), SPIKE_FEATURE] += 3.0
        per_entity[entity] = (t, values)
    return interleaved(per_entity, seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    torch.set_num_threads(1)
    history = interleaved({e: (np.arange(400), signal(e, np.arange(400))) for e in ENTITIES}, seed=1)
    path = tmp_path_factory.mktemp("models") / "web.pt"
    save_checkpoint(path, fit("web", STREAM, history, progress=False))
    return load_checkpoint(path, STREAM)


@dataclass
class Run:
    score: np.ndarray
    threshold: np.ndarray
    severity: np.ndarray
    alert_ids: list[str | None]
    alerts: list[Alert]
    rejected: list[tuple[int, str]]
    windows: int


def run(pipeline: Pipeline, batch: SampleBatch, cuts: list[int] | None = None, mode: Mode = "alert") -> Run:
    """Process `batch` cut at `cuts` and put the results back together."""
    bounds = [0, *(cuts or []), len(batch)]
    parts = [pipeline.process(batch.take(np.arange(lo, hi)), mode) for lo, hi in pairwise(bounds)]
    return Run(
        score=np.concatenate([p.score for p in parts]),
        threshold=np.concatenate([p.threshold for p in parts]),
        severity=np.concatenate([p.severity for p in parts]),
        alert_ids=[i for p in parts for i in p.alert_ids],
        alerts=[a for p in parts for a in p.alerts],
        rejected=[(r.position, r.reason) for p in parts for r in p.rejected],
        windows=sum(p.windows for p in parts),
    )


def rows_of(batch: SampleBatch, entity: str) -> np.ndarray:
    return np.flatnonzero(np.asarray(batch.entities) == entity)


# --- windows -------------------------------------------------------------------------------


def test_rows_without_a_full_window_have_no_score(checkpoint: Checkpoint) -> None:
    batch = live_data(seed=3, start=0, stop=40, spike=False)
    result = run(Pipeline("web", STREAM, checkpoint), batch)
    seen: dict[str, int] = {}
    for row, entity in enumerate(batch.entities):
        seen[entity] = seen.get(entity, 0) + 1
        if seen[entity] < WINDOW:
            assert np.isnan(result.score[row]) and np.isnan(result.threshold[row]), row
            assert result.severity[row] == NONE
            assert result.alert_ids[row] is None
        else:
            assert np.isfinite(result.score[row]) and np.isfinite(result.threshold[row]), row
    assert result.windows == 3 * (40 - WINDOW + 1)
    assert np.count_nonzero(np.isfinite(result.score)) == result.windows
    assert result.score.dtype == np.float64 and result.severity.dtype == np.int8


def test_clean_data_raises_no_alert(checkpoint: Checkpoint) -> None:
    result = run(Pipeline("web", STREAM, checkpoint), live_data(spike=False))
    assert result.alerts == []
    assert np.all(result.severity == NONE)
    assert result.windows == 3 * (120 - WINDOW + 1)


# --- the spike -----------------------------------------------------------------------------


def test_spike_alerts_for_its_entity_only_with_the_spiked_feature_on_top(checkpoint: Checkpoint) -> None:
    batch = live_data()
    result = run(Pipeline("web", STREAM, checkpoint), batch)
    assert {a.entity for a in result.alerts} == {SPIKE_ENTITY}
    firing = [a for a in result.alerts if a.status == "firing"]
    assert len(firing) == 1
    alert = firing[0]
    assert alert.severity == "critical"
    assert alert.top_features[0][0] == "b"
    assert alert.top_features[0][1] > alert.top_features[1][1]
    assert alert.model_version == checkpoint.version
    assert alert.stream == "web"
    assert alert.score > alert.threshold
    assert alert.threshold == pytest.approx(4 * checkpoint.errors.quantile(0.99))
    # The window that fired contains the spike (it ends at or after the spike's first sample)...
    assert SPIKE_AT * 1000 <= alert.window_end_ms < (SPIKE_AT + WINDOW + 3) * 1000
    assert alert.window_end_ms - alert.window_start_ms == (WINDOW - 1) * 1000
    # ...and every window of the spiked entity that contains the spike is critical.
    h1 = rows_of(batch, SPIKE_ENTITY)
    times = batch.timestamps[h1] // 1000
    covers = (times >= SPIKE_AT) & (times < SPIKE_AT + 3 + WINDOW - 1)
    assert np.all(result.severity[h1[covers]] == CRITICAL)
    assert np.all(result.severity[h1[~covers]] == NONE)
    # The rows of the spiked entity carry the alert id from the firing row until it resolves.
    fired_row = h1[np.flatnonzero(times * 1000 == alert.window_end_ms)[0]]
    assert result.alert_ids[fired_row] == alert.id
    for entity in ("h0", "h2"):
        assert all(result.alert_ids[r] is None for r in rows_of(batch, entity))
        assert np.all(result.severity[rows_of(batch, entity)] == NONE)
    resolved = [a for a in result.alerts if a.status == "resolved"]
    assert [a.resolves for a in resolved] == [alert.id]


# --- batch cuts ----------------------------------------------------------------------------


@st.composite
def cut_cases(draw: st.DrawFn) -> tuple[int, list[int], int]:
    seed = draw(st.integers(0, 2**16))
    n = len(ENTITIES) * 120
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=10)))
    batch_windows = draw(st.sampled_from([1, 3, 16, 50, 1024]))
    return seed, cuts, batch_windows


@settings(max_examples=40, deadline=None)
@given(cut_cases())
def test_results_do_not_depend_on_the_batch_cut(checkpoint: Checkpoint, case: tuple[int, list[int], int]) -> None:
    seed, cuts, batch_windows = case
    batch = live_data(seed)
    whole = run(Pipeline("web", STREAM, checkpoint), batch)
    cut = run(Pipeline("web", STREAM, checkpoint, Scoring(batch_windows=batch_windows)), batch, cuts)
    np.testing.assert_array_equal(cut.score, whole.score)  # NaN where no window, in both
    np.testing.assert_array_equal(cut.threshold, whole.threshold)
    np.testing.assert_array_equal(cut.severity, whole.severity)
    assert cut.alert_ids == whole.alert_ids
    assert cut.alerts == whole.alerts
    assert cut.windows == whole.windows == 3 * (120 - WINDOW + 1)
    assert [a.status for a in whole.alerts] == ["firing", "resolved"]


# The same stream with regime changes: the spike's run of anomalous windows restarts h1's statistics.
REGIME_STREAM = STREAM.model_copy(
    update={
        "thresholds": STREAM.thresholds.model_copy(
            update={"warning": STREAM.thresholds.warning.model_copy(update={"regime_after": 3})}
        )
    }
)


@settings(max_examples=20, deadline=None)
@given(cut_cases())
def test_regime_changes_do_not_depend_on_the_batch_cut(
    checkpoint: Checkpoint, case: tuple[int, list[int], int]
) -> None:
    seed, cuts, batch_windows = case
    batch = live_data(seed)
    whole = run(Pipeline("web", REGIME_STREAM, checkpoint), batch)
    cut = run(Pipeline("web", REGIME_STREAM, checkpoint, Scoring(batch_windows=batch_windows)), batch, cuts)
    np.testing.assert_array_equal(cut.threshold, whole.threshold)
    np.testing.assert_array_equal(cut.severity, whole.severity)
    assert cut.alert_ids == whole.alert_ids
    assert cut.alerts == whole.alerts
    # A regime change did happen: the thresholds after the spike differ from the plain rule's.
    plain = run(Pipeline("web", STREAM, checkpoint), batch)
    h1 = rows_of(batch, SPIKE_ENTITY)
    assert not np.array_equal(whole.threshold[h1], plain.threshold[h1], equal_nan=True)


def test_each_entity_scores_the_same_whatever_the_interleaving(checkpoint: Checkpoint) -> None:
    assert live_data(0).entities != live_data(1).entities
    results = {}
    for seed in (0, 1):
        batch = live_data(seed)
        result = run(Pipeline("web", STREAM, checkpoint), batch)
        results[seed] = {
            e: (
                result.score[rows_of(batch, e)],
                result.threshold[rows_of(batch, e)],
                result.severity[rows_of(batch, e)],
            )
            for e in ENTITIES
        }
    for entity in ENTITIES:
        for got, expected in zip(results[1][entity], results[0][entity], strict=True):
            np.testing.assert_array_equal(got, expected)


# --- modes ---------------------------------------------------------------------------------


def test_fill_mode_scores_nothing_but_fills_windows(checkpoint: Checkpoint) -> None:
    history = live_data(seed=2, start=300, stop=400, spike=False)
    live = live_data(seed=2)
    pipeline = Pipeline("web", STREAM, checkpoint)
    filled = run(pipeline, history, mode="fill")
    assert np.all(np.isnan(filled.score)) and np.all(np.isnan(filled.threshold))
    assert np.all(filled.severity == NONE)
    assert filled.alerts == [] and filled.windows == 0
    assert filled.alert_ids == [None] * len(history)
    after_fill = run(pipeline, live)
    # Windows were filled: every live row completes a window at once...
    assert np.all(np.isfinite(after_fill.score))
    # ...with the same values as if the history had been scored (thresholds start afresh).
    reference = Pipeline("web", STREAM, checkpoint)
    run(reference, history)
    np.testing.assert_array_equal(after_fill.score, run(reference, live).score)


def test_score_mode_updates_thresholds_but_raises_no_alerts(checkpoint: Checkpoint) -> None:
    live = live_data(stop=490)  # ends inside the spike's incident
    scored_pipeline = Pipeline("web", STREAM, checkpoint)
    scored = run(scored_pipeline, live, mode="score")
    alert_pipeline = Pipeline("web", STREAM, checkpoint)
    alerted = run(alert_pipeline, live)
    np.testing.assert_array_equal(scored.score, alerted.score)
    np.testing.assert_array_equal(scored.threshold, alerted.threshold)
    np.testing.assert_array_equal(scored.severity, alerted.severity)
    assert np.any(scored.severity == CRITICAL)
    assert scored.alerts == []
    assert scored.alert_ids == [None] * len(live)
    assert [a.status for a in alerted.alerts] == ["firing"]

    # Threshold state moved on in score mode just as in alert mode, and unlike after `fill`.
    following = live_data(seed=5, start=490, stop=530, spike=False)
    filled_pipeline = Pipeline("web", STREAM, checkpoint)
    run(filled_pipeline, live, mode="fill")
    after_score = run(scored_pipeline, following)
    after_alert = run(alert_pipeline, following)
    np.testing.assert_array_equal(after_score.threshold, after_alert.threshold)
    assert not np.array_equal(after_score.threshold, run(filled_pipeline, following).threshold)
    # Alert state was not built in score mode: the incident still in the windows fires afresh
    # there, while the alert-mode pipeline only resolves the one it already had.
    assert [a.status for a in after_alert.alerts] == ["resolved"]
    assert [(a.status, a.entity) for a in after_score.alerts] == [("firing", SPIKE_ENTITY), ("resolved", SPIKE_ENTITY)]


# --- rejected samples ----------------------------------------------------------------------


def test_out_of_order_samples_are_rejected_and_change_nothing_else(checkpoint: Checkpoint) -> None:
    batch = live_data(seed=4, spike=False)
    h0 = rows_of(batch, "h0")
    late_row = int(h0[40])
    late = SampleBatch(
        entities=[*batch.entities[:late_row], "h0", *batch.entities[late_row:]],
        timestamps=np.insert(batch.timestamps, late_row, batch.timestamps[h0[10]]),
        values=np.insert(batch.values, late_row, np.array([9.0, 9.0], np.float32), axis=0),
        positions=np.insert(batch.positions, late_row, 7),
    )
    pipeline = Pipeline("web", STREAM, checkpoint)
    result = run(pipeline, late, cuts=[late_row - 3, late_row + 5])
    assert result.rejected == [(7, "out_of_order")]
    assert np.isnan(result.score[late_row])
    assert result.alert_ids[late_row] is None
    clean = run(Pipeline("web", STREAM, checkpoint), batch)
    np.testing.assert_array_equal(np.delete(result.score, late_row), clean.score)
    assert result.alerts == clean.alerts == []

    # A late sample in a later batch is rejected too.
    again = pipeline.process(late.take(np.array([late_row])))
    assert [(r.position, r.reason) for r in again.rejected] == [(7, "out_of_order")]
    assert again.windows == 0


def test_out_of_order_accepted_when_configured(checkpoint: Checkpoint) -> None:
    stream = STREAM.model_copy(update={"mapping": STREAM.mapping.model_copy(update={"out_of_order": "accept"})})
    batch = live_data(seed=4, spike=False)
    swapped = batch.take(np.r_[np.arange(len(batch))[::-1]])  # every entity's samples backwards
    result = run(Pipeline("web", stream, checkpoint), swapped)
    assert result.rejected == []
    assert result.windows == 3 * (120 - WINDOW + 1)
    dropped = run(Pipeline("web", STREAM, checkpoint), swapped)
    assert len(dropped.rejected) == 3 * 119  # all but each entity's first (newest) sample
    assert dropped.windows == 0


# --- reconfigure (reload) --------------------------------------------------------------------


def test_reconfigure_mid_incident_keeps_alert_and_unchanged_threshold_state(checkpoint: Checkpoint) -> None:
    live = live_data(stop=490)  # ends inside the spike's incident
    following = live_data(seed=5, start=490, stop=530, spike=False)
    reference = Pipeline("web", STREAM, checkpoint)
    (firing,) = run(reference, live).alerts
    expected = run(reference, following)

    pipeline = Pipeline("web", STREAM, checkpoint)
    run(pipeline, live)
    # A new alert policy, the same thresholds: the open incident must still get its resolve,
    # and the dynamic warning threshold carries on from its statistics.
    pipeline.reconfigure(STREAM.model_copy(update={"alerts": STREAM.alerts.model_copy(update={"n": 2})}))
    after = run(pipeline, following)
    np.testing.assert_array_equal(after.threshold, expected.threshold)
    assert [(a.status, a.resolves, a.ends) for a in after.alerts] == [("resolved", firing.id, (firing.id,))]
    assert after.alerts == expected.alerts


def test_reconfigure_restarts_only_the_threshold_rule_that_changed(checkpoint: Checkpoint) -> None:
    live = live_data(stop=490)
    following = live_data(seed=5, start=490, stop=530, spike=False)
    reference = Pipeline("web", STREAM, checkpoint)
    run(reference, live)
    pipeline = Pipeline("web", STREAM, checkpoint)
    run(pipeline, live)
    warning = STREAM.thresholds.warning.model_copy(update={"k": 5})
    pipeline.reconfigure(
        STREAM.model_copy(update={"thresholds": STREAM.thresholds.model_copy(update={"warning": warning})})
    )
    expected = run(reference, following)
    after = run(pipeline, following)
    # The new warning rule starts afresh: the population threshold until its warmup...
    population = checkpoint.errors.mean + 5 * checkpoint.errors.std
    # (Not the spiked entity: its windows are still critical and report the critical threshold.)
    first = [rows_of(following, e)[0] for e in ENTITIES if e != SPIKE_ENTITY]
    np.testing.assert_allclose(after.threshold[first], population)
    assert not np.array_equal(after.threshold, expected.threshold)
    # ...while the unchanged critical rule (and its severities) are the same as before.
    np.testing.assert_array_equal(after.severity == CRITICAL, expected.severity == CRITICAL)
