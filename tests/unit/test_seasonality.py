"""Time of day and of week as model inputs: the columns, the daily- and weekly-rhythm tests
that decide them at training, and a model that takes them (checkpoint, pipeline, swaps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.config import Stream, TimeOfDay, TimeOfWeek
from detector.errors import CheckpointError
from detector.model import Checkpoint, load_checkpoint, save_checkpoint
from detector.pipeline import Pipeline
from detector.seasonality import (
    DAY_MS,
    TIME_OF_DAY,
    TIME_OF_WEEK,
    WEEK_MS,
    calendar_inputs,
    daily_autocorrelation,
    time_of_day,
    time_of_week,
    wants_time_of_day,
    wants_time_of_week,
    weekly_gain,
    with_calendar,
)
from detector.source import SampleBatch
from detector.train import fit

STEP_MS = 10 * 60_000  # 144 samples a day


def series(entity: str, days: float, seed: int, rhythm: float = 1.0, noise: float = 0.1) -> SampleBatch:
    """A 10-minute metric: `rhythm` times a daily sine, plus noise."""
    n = round(days * DAY_MS / STEP_MS)
    ms = np.arange(n, dtype=np.int64) * STEP_MS
    rng = np.random.default_rng(seed)
    value = rhythm * np.sin(2 * np.pi * ms / DAY_MS) + noise * rng.standard_normal(n)
    return SampleBatch([entity] * n, ms, value.astype(np.float32)[:, None], np.arange(n, dtype=np.int64))


def weekly(entity: str, days: float, seed: int, weekend: float = 0.3, noise: float = 0.1) -> SampleBatch:
    """A 10-minute metric with a daily sine whose swing is `weekend` times as large on Saturdays
    and Sundays (the epoch, day 0, was a Thursday)."""
    batch = series(entity, days, seed, noise=0.0)
    saturday_or_sunday = (batch.timestamps // DAY_MS + 3) % 7 >= 5
    value = batch.values[:, 0] * np.where(saturday_or_sunday, weekend, 1.0)
    value += noise * np.random.default_rng(seed).standard_normal(len(batch))
    return SampleBatch(batch.entities, batch.timestamps, value.astype(np.float32)[:, None], batch.positions)


def merged(*batches: SampleBatch) -> SampleBatch:
    out = SampleBatch.concat(list(batches), 1)
    order = np.argsort(out.timestamps, kind="stable")  # interleaved, as a stream delivers them
    return out.take(order)


def stream(time_of_week: dict[str, Any] | None = None, **time_of_day: Any) -> Stream:
    return Stream.model_validate(
        {
            "input": {"kind": "file", "path": "unused.csv"},
            "mapping": {"entity": "host", "features": ["value"]},
            "window": {"size": 12},
            "time_of_day": time_of_day,
            "time_of_week": time_of_week or {},
            "model": {"cell": "gru", "hidden_size": 8, "latent_size": 3},
            "training": {"epochs": 3, "batch_size": 32, "early_stopping_patience": 0},
            "thresholds": {"warning": {"rule": "quantile", "q": 0.99, "factor": 1.5}},
            "alerts": {"n": 1, "m": 1, "cooldown_s": 0, "resolve_after": 2},
        }
    )


# --- the columns -------------------------------------------------------------------------------


def test_time_of_day_at_known_hours() -> None:
    hours = np.array([0, 6, 12, 18 + 24], dtype=np.int64) * 3_600_000
    tod = time_of_day(hours)
    assert tod.dtype == np.float32 and tod.shape == (4, 2)
    np.testing.assert_allclose(tod, [[0, 1], [1, 0], [0, -1], [-1, 0]], atol=1e-6)


@given(st.integers(-(2**41), 2**41), st.integers(-3000, 3000))
def test_time_of_day_is_a_point_on_the_unit_circle_that_repeats_every_day(ms: int, days: int) -> None:
    here, later = time_of_day(np.array([ms, ms + days * DAY_MS], dtype=np.int64))
    np.testing.assert_allclose(here, later, atol=1e-6)
    assert abs(float((here.astype(np.float64) ** 2).sum()) - 1) < 1e-6


def test_with_time_of_day_appends_two_columns_and_keeps_the_rest() -> None:
    batch = series("a", 1, seed=0)
    out = with_calendar(batch, TIME_OF_DAY)
    assert out.values.shape == (len(batch), 3)
    np.testing.assert_array_equal(out.values[:, :1], batch.values)
    np.testing.assert_array_equal(out.values[:, 1:], time_of_day(batch.timestamps))
    assert out.entities == batch.entities and out.positions is batch.positions


def test_time_of_week_at_known_times() -> None:
    # The epoch was a Thursday at 00:00; a quarter of a week later is Friday 18:00.
    quarters = np.array([0, 42, 84, 126, 168 * 5], dtype=np.int64) * 3_600_000
    tow = time_of_week(quarters)
    assert tow.dtype == np.float32 and tow.shape == (5, 2)
    np.testing.assert_allclose(tow, [[0, 1], [1, 0], [0, -1], [-1, 0], [0, 1]], atol=1e-6)


@given(st.integers(-(2**41), 2**41), st.integers(-400, 400), st.integers(1, 6))
def test_time_of_week_repeats_every_week_and_only_then(ms: int, weeks: int, days: int) -> None:
    here, later, other_day = time_of_week(np.array([ms, ms + weeks * WEEK_MS, ms + days * DAY_MS], dtype=np.int64))
    np.testing.assert_allclose(here, later, atol=1e-6)
    assert abs(float((here.astype(np.float64) ** 2).sum()) - 1) < 1e-6
    assert float(np.abs(here - other_day).max()) > 0.4  # a different weekday is a different point


def test_with_calendar_appends_the_clocks_in_order() -> None:
    batch = series("a", 1, seed=0)
    assert with_calendar(batch, ()) is batch
    out = with_calendar(batch, TIME_OF_DAY + TIME_OF_WEEK)
    assert out.values.shape == (len(batch), 5)
    np.testing.assert_array_equal(out.values[:, 1:3], time_of_day(batch.timestamps))
    np.testing.assert_array_equal(out.values[:, 3:], time_of_week(batch.timestamps))
    week_only = with_calendar(batch, TIME_OF_WEEK)
    np.testing.assert_array_equal(week_only.values[:, 1:], time_of_week(batch.timestamps))


# --- the daily-rhythm test -----------------------------------------------------------------------


def test_a_daily_rhythm_is_found_and_noise_is_not() -> None:
    found, n = daily_autocorrelation(series("a", 3, seed=1), min_days=2)
    assert found is not None and found > 0.9 and n == 1
    found, n = daily_autocorrelation(series("a", 3, seed=1, rhythm=0.0), min_days=2)
    assert found is not None and abs(found) < 0.2 and n == 1


def test_the_rhythm_needs_min_days_of_data_that_moves() -> None:
    assert daily_autocorrelation(series("a", 1.5, seed=2), min_days=2) == (None, 0)
    flat = series("a", 3, seed=2, rhythm=0.0, noise=0.0)
    assert daily_autocorrelation(flat, min_days=2) == (None, 0)
    spec = TimeOfDay(use="auto")
    wanted, why = wants_time_of_day(spec, flat)
    assert not wanted and "min_days" in why


def test_the_median_over_entities_decides() -> None:
    spec = TimeOfDay(use="auto", min_autocorrelation=0.5)
    mostly_daily = merged(series("a", 3, 1), series("b", 3, 2), series("c", 3, 3, rhythm=0.0))
    wanted, why = wants_time_of_day(spec, mostly_daily)
    assert wanted and "over 3 entity features >= time_of_day.min_autocorrelation 0.5" in why
    mostly_noise = merged(series("a", 3, 1), series("b", 3, 2, rhythm=0.0), series("c", 3, 3, rhythm=0.0))
    wanted, why = wants_time_of_day(spec, mostly_noise)
    assert not wanted and "<" in why
    # An entity too short to measure does not vote.
    wanted, _ = wants_time_of_day(spec, merged(series("a", 3, 1), series("b", 1, 2, rhythm=0.0)))
    assert wanted


def test_always_and_never_skip_the_test() -> None:
    assert wants_time_of_day(TimeOfDay(use="always"), series("a", 0.5, 1, rhythm=0.0))[0]
    assert not wants_time_of_day(TimeOfDay(use="never"), series("a", 3, 1))[0]


# --- the weekly-rhythm test ----------------------------------------------------------------------


def test_a_weekly_rhythm_is_found_and_a_daily_one_alone_is_not() -> None:
    found, n = weekly_gain(weekly("a", 21, seed=1), min_weeks=2)
    assert found is not None and found > 0.5 and n == 1
    found, _ = weekly_gain(series("a", 21, seed=1), min_weeks=2)  # every day alike: a week back is no better
    assert found is not None and abs(found) < 0.1
    rng = np.random.default_rng(3)
    walk = series("a", 21, seed=3, rhythm=0.0)
    walk.values[:, 0] = np.cumsum(rng.standard_normal(len(walk)))  # drift: a week back is worse
    found, _ = weekly_gain(walk, min_weeks=2)
    assert found is not None and found < 0


def test_the_weekly_rhythm_needs_min_weeks_and_a_day_to_day_change() -> None:
    assert weekly_gain(weekly("a", 10, seed=2), min_weeks=2) == (None, 0)
    assert weekly_gain(series("a", 21, seed=2, noise=0.0), min_weeks=2) == (None, 0)  # each day the same
    wanted, why = wants_time_of_week(TimeOfWeek(use="auto"), weekly("a", 10, seed=2))
    assert not wanted and "min_weeks" in why


def test_the_weekly_median_over_entities_decides() -> None:
    spec = TimeOfWeek(use="auto", min_gain=0.2)
    wanted, why = wants_time_of_week(spec, merged(weekly("a", 15, 1), weekly("b", 15, 2), series("c", 15, 3)))
    assert wanted and "over 3 entity features >= time_of_week.min_gain 0.2" in why and "a week back" in why
    wanted, why = wants_time_of_week(spec, merged(weekly("a", 15, 1), series("b", 15, 2), series("c", 15, 3)))
    assert not wanted and "<" in why
    assert wants_time_of_week(TimeOfWeek(use="always"), series("a", 1, 1))[0]
    assert not wants_time_of_week(TimeOfWeek(use="never"), weekly("a", 21, 1))[0]


def test_calendar_inputs_combine_the_two_decisions() -> None:
    auto_day, auto_week = TimeOfDay(use="auto"), TimeOfWeek(use="auto")
    inputs, why = calendar_inputs(auto_day, auto_week, weekly("a", 15, 1))
    assert inputs == TIME_OF_DAY + TIME_OF_WEEK and why["time_of_week"].startswith("added (")
    inputs, why = calendar_inputs(auto_day, auto_week, series("a", 15, 1))
    assert inputs == TIME_OF_DAY and why["time_of_week"].startswith("not added (")
    inputs, _ = calendar_inputs(TimeOfDay(use="never"), TimeOfWeek(use="always"), series("a", 1, 1))
    assert inputs == TIME_OF_WEEK


# --- a model that takes them ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def daily_model() -> Checkpoint:
    return fit("hosts", stream(use="auto"), merged(series("a", 3, 1), series("b", 3, 2)), progress=False)


@pytest.fixture(scope="module")
def plain_model() -> Checkpoint:
    return fit("hosts", stream(use="auto"), merged(series("a", 3, 1, rhythm=0.0)), progress=False)


def test_training_decides_and_names_the_inputs_in_the_checkpoint(
    daily_model: Checkpoint, plain_model: Checkpoint, tmp_path: Path
) -> None:
    assert daily_model.features == ("value", *TIME_OF_DAY)
    assert daily_model.model.encoder.input_size == 3 and daily_model.scaler.center.shape == (3,)
    assert "autocorrelation" in daily_model.training["time_of_day"]
    assert plain_model.features == ("value",) and plain_model.model.encoder.input_size == 1
    save_checkpoint(tmp_path / "m.pt", daily_model)
    loaded = load_checkpoint(tmp_path / "m.pt", stream(use="never"))  # the checkpoint decides, not the config
    assert loaded.features == daily_model.features


def test_a_checkpoint_with_other_inputs_is_refused(daily_model: Checkpoint, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.pt", daily_model)
    other = Stream.model_validate({**stream().model_dump(), "mapping": {"entity": ["host"], "features": ["load"]}})
    with pytest.raises(CheckpointError, match="trained on features"):
        load_checkpoint(tmp_path / "m.pt", other)


def test_the_pipeline_adds_the_inputs_whatever_the_batches(daily_model: Checkpoint) -> None:
    live = merged(series("a", 1, 5), series("b", 1, 6))
    live = SampleBatch(live.entities, live.timestamps + 3 * DAY_MS, live.values, live.positions)
    whole = Pipeline("hosts", stream(use="auto"), daily_model).process(live).score
    pieces = Pipeline("hosts", stream(use="auto"), daily_model)
    parts = [pieces.process(live.take(np.arange(i, min(i + 37, len(live))))).score for i in range(0, len(live), 37)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert np.isfinite(whole).sum() == len(live) - 2 * 11  # every row once each window is full


def test_alerts_name_only_the_streams_features(daily_model: Checkpoint) -> None:
    pipeline = Pipeline("hosts", stream(use="auto"), daily_model)
    live = series("a", 1, 7)
    live = SampleBatch(live.entities, live.timestamps + 3 * DAY_MS, live.values, live.positions)
    live.values[100:110] += 50.0  # far outside anything normal
    alerts = pipeline.process(live).alerts
    assert alerts and all([name for name, _ in a.top_features] == ["value"] for a in alerts if a.status == "firing")


def test_a_model_with_other_inputs_is_not_swapped_in(daily_model: Checkpoint, plain_model: Checkpoint) -> None:
    pipeline = Pipeline("hosts", stream(use="auto"), plain_model)
    with pytest.raises(CheckpointError, match="restart to switch"):
        pipeline.swap_checkpoint(daily_model)
    assert pipeline.checkpoint is plain_model
    assert np.isfinite(pipeline.process(series("a", 0.5, 8)).score).any()


def test_a_regime_change_moves_the_features_level_but_not_the_clocks(daily_model: Checkpoint) -> None:
    spec = stream(use="auto").model_dump()
    spec["regime"] = {"after_windows": 6, "calibration_windows": 4}
    pipeline = Pipeline("hosts", Stream.model_validate(spec), daily_model)
    live = series("a", 1, 9)
    live = SampleBatch(live.entities, live.timestamps + 3 * DAY_MS, live.values, live.positions)
    live.values[60:] += 40.0  # a level shift that stays
    alerts = pipeline.process(live).alerts
    assert any(a.status == "regime_change" for a in alerts)
    center, _ = pipeline.windows.params(np.array([pipeline.windows.slot_of["a"]]))
    trained, _ = daily_model.scaler.params_for("a")
    assert center[0, 0] > trained[0] + 15  # the value is re-centred towards its new level
    np.testing.assert_array_equal(center[0, 1:], trained[1:])  # time of day has no level


def weekly_stream() -> Stream:
    return stream(time_of_week={"use": "auto"}, use="auto")


@pytest.fixture(scope="module")
def weekly_model() -> Checkpoint:
    return fit("hosts", weekly_stream(), merged(weekly("a", 15, 1), weekly("b", 15, 2)), progress=False)


def test_a_weekly_model_takes_both_clocks_and_scores_like_any_batching(
    weekly_model: Checkpoint, tmp_path: Path
) -> None:
    assert weekly_model.features == ("value", *TIME_OF_DAY, *TIME_OF_WEEK)
    assert weekly_model.model.encoder.input_size == 5
    assert weekly_model.training["time_of_week"].startswith("added (median gain of a week back")
    save_checkpoint(tmp_path / "m.pt", weekly_model)
    assert load_checkpoint(tmp_path / "m.pt", stream()).features == weekly_model.features
    live = merged(weekly("a", 2, 5), weekly("b", 2, 6))
    live = SampleBatch(live.entities, live.timestamps + 15 * DAY_MS, live.values, live.positions)
    whole = Pipeline("hosts", weekly_stream(), weekly_model).process(live).score
    pieces = Pipeline("hosts", weekly_stream(), weekly_model)
    parts = [pieces.process(live.take(np.arange(i, min(i + 53, len(live))))).score for i in range(0, len(live), 53)]
    # Equal to float rounding: the matrix kernels differ with the batch's size.
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5)
    assert np.isfinite(whole).sum() == len(live) - 2 * 11


def test_calendar_inputs_in_another_order_or_unknown_are_refused(weekly_model: Checkpoint, tmp_path: Path) -> None:
    for features in [
        ("value", *TIME_OF_WEEK, *TIME_OF_DAY),
        ("value", *TIME_OF_DAY, "time_of_year_sin", "time_of_year_cos"),
    ]:
        odd = Checkpoint(**{**weekly_model.__dict__, "features": features})
        save_checkpoint(tmp_path / "odd.pt", odd)
        with pytest.raises(CheckpointError, match="trained on features"):
            load_checkpoint(tmp_path / "odd.pt", stream())


def test_a_weekly_model_is_not_swapped_in_for_a_daily_one(daily_model: Checkpoint, weekly_model: Checkpoint) -> None:
    pipeline = Pipeline("hosts", stream(use="auto"), daily_model)
    with pytest.raises(CheckpointError, match="time_of_week decided differently"):
        pipeline.swap_checkpoint(weekly_model)
