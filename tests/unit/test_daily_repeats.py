"""`alerts.daily_repeats`: an anomalous window that repeats the entity's own score of about the
same time a day earlier raises no alert (a nightly job), a bigger or new one still does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.alerts import DailyRepeats
from detector.config import DailyRepeats as RepeatsConfig
from detector.config import Stream
from detector.model import Checkpoint, ErrorStats, RecurrentAutoencoder
from detector.pipeline import Pipeline
from detector.source import SampleBatch
from detector.threshold import NONE, WARNING
from detector.window import Scaler

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def judge(repeats: DailyRepeats, rows: list[tuple[int, float, float, int]]) -> list[int]:
    """(slot, hours since the epoch, score, severity) in arrival order → severities after."""
    slots = np.array([r[0] for r in rows], np.int64)
    ms = np.array([round(r[1] * HOUR_MS) for r in rows], np.int64)
    scores = np.array([r[2] for r in rows])
    severity = np.array([r[3] for r in rows], np.int8)
    return repeats.apply(slots, ms, scores, severity).tolist()


def test_a_spike_at_the_same_time_as_yesterday_is_a_repeat() -> None:
    repeats = DailyRepeats(RepeatsConfig(ratio=0.8, bin_s=1800))
    assert judge(repeats, [(0, 3.0, 10.0, WARNING)]) == [WARNING]  # the first night: an incident
    assert judge(repeats, [(0, 24 + 3.2, 9.0, WARNING)]) == [NONE]  # 10 >= 0.8 x 9
    assert judge(repeats, [(0, 24 + 15.0, 10.0, WARNING)]) == [WARNING]  # nothing yesterday at 15:00
    assert judge(repeats, [(0, 48 + 3.0, 20.0, WARNING)]) == [WARNING]  # 9 < 0.8 x 20: worse than usual
    assert judge(repeats, [(1, 24 + 3.0, 10.0, WARNING)]) == [WARNING]  # another entity's night is its own


def test_only_the_three_bins_around_the_time_a_day_earlier_count() -> None:
    repeats = DailyRepeats(RepeatsConfig(ratio=0.8, bin_s=1800))
    judge(repeats, [(0, 1.0, 10.0, WARNING)])  # the 01:00-01:30 bin
    # Bins 00:30-01:00, 01:00-01:30 and 01:30-02:00 a day later see it; 02:30 does not.
    assert judge(repeats, [(0, 24 + 0.6, 10.0, WARNING), (0, 24 + 1.9, 10.0, WARNING)]) == [NONE, NONE]
    assert judge(repeats, [(0, 24 + 2.6, 10.0, WARNING)]) == [WARNING]
    assert judge(repeats, [(0, 48 + 1.0, 10.0, WARNING)]) == [NONE]  # the day before is day 1's 00:36
    fresh = DailyRepeats(RepeatsConfig(ratio=0.8, bin_s=1800))
    judge(fresh, [(0, 1.0, 10.0, WARNING)])
    assert judge(fresh, [(0, 49.0, 10.0, WARNING)]) == [WARNING]  # two days back is not yesterday


def test_normal_windows_count_too_and_normal_stays_normal() -> None:
    repeats = DailyRepeats(RepeatsConfig(ratio=1.0, bin_s=3600))
    # A high but normal score yesterday (a threshold that was higher then) still makes a repeat.
    assert judge(repeats, [(0, 5.5, 7.0, NONE), (0, 29.5, 7.0, WARNING), (0, 30.0, 1.0, NONE)]) == [NONE] * 3


def test_a_forgotten_entity_starts_without_a_yesterday() -> None:
    repeats = DailyRepeats(RepeatsConfig())
    judge(repeats, [(0, 3.0, 10.0, WARNING)])
    repeats.forget(0)
    assert judge(repeats, [(0, 27.0, 10.0, WARNING)]) == [WARNING]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.floats(0.0, 2.0), st.floats(0.1, 10.0), st.booleans()), min_size=1, max_size=80
    ),
    st.integers(1, 80),
)
def test_the_verdicts_do_not_depend_on_how_windows_are_split_into_calls(
    steps: list[tuple[int, float, float, bool]], cut: int
) -> None:
    # Each entity's windows arrive in time order (hours advance by up to 2 at each step).
    clock = [0.0, 0.0, 0.0]
    rows = []
    for slot, advance, score, anomalous in steps:
        clock[slot] += advance
        rows.append((slot, clock[slot], score, WARNING if anomalous else NONE))
    whole = judge(DailyRepeats(RepeatsConfig(bin_s=1800)), rows)
    split = DailyRepeats(RepeatsConfig(bin_s=1800))
    assert judge(split, rows[:cut]) + (judge(split, rows[cut:]) if rows[cut:] else []) == whole


@pytest.mark.parametrize(("bin_s", "ok"), [(1800, True), (60, True), (21_600, True), (700, False), (59, False)])
def test_the_bin_must_divide_a_day(bin_s: int, ok: bool) -> None:
    spec: dict[str, Any] = {
        "input": {"kind": "file", "path": "x.csv"},
        "mapping": {"features": ["value"]},
        "alerts": {"daily_repeats": {"bin_s": bin_s}},
    }
    if ok:
        assert Stream.model_validate(spec).alerts.daily_repeats is not None
    else:
        with pytest.raises(ValueError, match="bin_s"):
            Stream.model_validate(spec)


def _stream(repeats: dict[str, Any] | None) -> Stream:
    return Stream.model_validate(
        {
            "input": {"kind": "file", "path": "x.csv"},
            "mapping": {"features": ["value"]},
            "window": {"size": 4},
            "model": {"cell": "rnn", "hidden_size": 4, "latent_size": 2},
            "thresholds": {"warning": {"rule": "static", "value": 50.0}},
            "alerts": {"n": 1, "m": 1, "resolve_after": 1, "cooldown_s": 0, "daily_repeats": repeats},
        }
    )


def _checkpoint(stream: Stream) -> Checkpoint:
    model = RecurrentAutoencoder(1, stream.model).eval()
    scaler = Scaler(np.zeros(1, np.float32), np.ones(1, np.float32))
    errors = ErrorStats.from_errors(np.linspace(0.0, 1.0, 50).astype(np.float32))
    return Checkpoint(model, scaler, errors, ("value",), 4, "v1", stream.layout_hash(), "", {})


def test_the_pipeline_alerts_on_the_first_nightly_spike_only() -> None:
    # Ten-minute samples over four days; from 03:00 to 03:30 each night the value jumps by 100.
    ms = np.arange(4 * 144, dtype=np.int64) * 600_000
    values = np.where((ms % DAY_MS >= 3 * HOUR_MS) & (ms % DAY_MS < 3.5 * HOUR_MS), 100.0, 0.0)
    batch = SampleBatch(["a"] * len(ms), ms, values.astype(np.float32)[:, None], np.arange(len(ms)))
    fired = {}
    for repeats in (None, {"ratio": 0.8, "bin_s": 1800}):
        stream = _stream(repeats)
        result = Pipeline("s", stream, _checkpoint(stream)).process(batch)
        fired[repeats is None] = [a.window_end_ms // DAY_MS for a in result.alerts if a.status == "firing"]
        if repeats is not None:
            assert result.repeats > 0 and (result.severity[ms >= DAY_MS] == NONE).all()
    assert fired[True] == [0, 1, 2, 3]  # without: every night
    assert fired[False] == [0]  # with: the first night only


def test_a_reload_keeps_the_bins_unless_the_setting_changed() -> None:
    stream = _stream({"ratio": 0.8, "bin_s": 1800})
    pipeline = Pipeline("s", stream, _checkpoint(stream))
    kept = pipeline.repeats
    pipeline.reconfigure(_stream({"ratio": 0.8, "bin_s": 1800}))
    assert pipeline.repeats is kept
    pipeline.reconfigure(_stream({"ratio": 0.5, "bin_s": 1800}))
    assert pipeline.repeats is not kept and pipeline.repeats is not None and pipeline.repeats.ratio == 0.5
    pipeline.reconfigure(_stream(None))
    assert pipeline.repeats is None


def test_a_weekly_job_repeats_a_week_later_when_seven_days_back_are_compared() -> None:
    weekly = DailyRepeats(RepeatsConfig(ratio=0.8, bin_s=1800, days=[1, 7]))
    daily = DailyRepeats(RepeatsConfig(ratio=0.8, bin_s=1800))
    friday_night = [(0, 21.0, 10.0, WARNING), (0, 7 * 24 + 21.2, 10.0, WARNING)]
    assert judge(weekly, friday_night) == [WARNING, NONE]
    assert judge(daily, friday_night) == [WARNING, WARNING]
    assert judge(weekly, [(0, 8 * 24 + 21.0, 10.0, WARNING)]) == [NONE]  # yesterday counts too
    assert judge(weekly, [(0, 10 * 24 + 21.0, 10.0, WARNING)]) == [WARNING]  # 2 days back is neither


@pytest.mark.parametrize("days", [[], [0], [1, 1], [29]])
def test_days_back_are_distinct_whole_days(days: list[int]) -> None:
    with pytest.raises(ValueError, match="days"):
        RepeatsConfig(days=days)
