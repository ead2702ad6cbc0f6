"""Time of day and day of week as model inputs, for streams with a daily or weekly rhythm.

A 32-sample window of a 5-minute metric sees under three hours: it cannot tell the night's
level from the afternoon's, so a daily pattern that skips a day, or a plateau at the wrong hour,
reconstructs as well as the normal one. Two more inputs, the sine and cosine of the time of day,
tell the model where in the day each sample sits (the phase is learned, so the time zone does
not matter; a daylight-saving shift moves it by an hour). Two more, the sine and cosine of the
time of week, let it tell a Saturday from a Tuesday: a service whose weekends are quiet
otherwise alerts every weekend (NAB's `nyc_taxi`: almost every false alert fell on a Saturday
or Sunday, docs/results.md, round 9).

Whether a stream gets them is decided once, at training (`use: auto`). Time of day: the lag-one-
day autocorrelation of each feature of each entity with `min_days` of training data, and their
median against `min_autocorrelation`. Given to every NAB series, the two inputs gain nothing
overall (58.4 against 58.1 over five seeds): the series without a daily rhythm lose what the daily
ones win (docs/results.md, round 8). Time of week: how much of the day-to-day change the same
hour a week earlier accounts for, 1 - var(x[t] - x[t - week]) / var(x[t] - x[t - day]), over the
series with `min_weeks` of training data, its median against `min_gain`. A daily rhythm alone
gives about 0 (a week ago predicts no better than yesterday), a trend or random walk less. The
decision is stored in the checkpoint as more feature names, so the model is scored with the
inputs it was trained on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np

from detector.config import TimeOfDay, TimeOfWeek
from detector.source import SampleBatch

TIME_OF_DAY = ("time_of_day_sin", "time_of_day_cos")
TIME_OF_WEEK = ("time_of_week_sin", "time_of_week_cos")
DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
# The calendar inputs a checkpoint may add after the stream's features, in this order.
CALENDAR_INPUTS = ((), TIME_OF_DAY, TIME_OF_WEEK, TIME_OF_DAY + TIME_OF_WEEK)
_PERIOD_MS: dict[tuple[str, ...], int] = {TIME_OF_DAY: DAY_MS, TIME_OF_WEEK: WEEK_MS}


def phase(timestamps: np.ndarray, period_ms: int) -> np.ndarray:
    """Sine and cosine of each timestamp's position in a period counted from the epoch (UTC).

    Shape:
        timestamps: (N,) int64 ms since the epoch; returns (N, 2) float32
    """
    angle = (timestamps % period_ms).astype(np.float64) * (2 * math.pi / period_ms)
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def time_of_day(timestamps: np.ndarray) -> np.ndarray:
    """Sine and cosine of each timestamp's time of day (UTC); (N,) int64 ms → (N, 2) float32."""
    return phase(timestamps, DAY_MS)


def time_of_week(timestamps: np.ndarray) -> np.ndarray:
    """Sine and cosine of each timestamp's time of week; (N,) int64 ms → (N, 2) float32. The week
    is counted from the epoch (a Thursday): the model learns where the weekend falls."""
    return phase(timestamps, WEEK_MS)


def with_calendar(batch: SampleBatch, inputs: tuple[str, ...]) -> SampleBatch:
    """`batch` with the calendar columns `inputs` (one of `CALENDAR_INPUTS`) after its features."""
    if not inputs:
        return batch
    pairs = [inputs[i : i + 2] for i in range(0, len(inputs), 2)]
    columns = [phase(batch.timestamps, _PERIOD_MS[pair]) for pair in pairs]
    values = np.concatenate([batch.values, *columns], axis=1)
    return SampleBatch(batch.entities, batch.timestamps, values, batch.positions)


def _series(samples: SampleBatch, min_span_ms: float) -> Iterator[tuple[np.ndarray, float]]:
    """Each non-constant (entity, feature) column spanning at least `min_span_ms`, with the
    entity's median step in ms (0 when its rows share one timestamp)."""
    rows: defaultdict[str, list[int]] = defaultdict(list)
    for i, entity in enumerate(samples.entities):
        rows[entity].append(i)
    for index in rows.values():
        ms = samples.timestamps[index]
        if len(ms) < 3 or ms[-1] - ms[0] < min_span_ms:
            continue
        step = float(np.median(np.diff(ms)))
        for column in samples.values[index].astype(np.float64).T:
            if column.std() > 0:  # constant: no rhythm to speak of
                yield column, step


def _lag(step_ms: float, period_ms: int, n: int) -> int:
    """The period in rows at `step_ms`, or 0 when it is not a usable lag for `n` rows."""
    lag = round(period_ms / step_ms) if step_ms > 0 else 0
    return lag if 1 <= lag < n - 1 else 0


Measure = Callable[[np.ndarray, float], float | None]  # (column, median step in ms) → value or None


def _median(samples: SampleBatch, min_span_ms: float, measure: Measure) -> tuple[float | None, int]:
    """The median of `measure` over the columns `_series` yields, and how many gave a value."""
    found = [v for column, step in _series(samples, min_span_ms) if (v := measure(column, step)) is not None]
    return (float(np.median(found)), len(found)) if found else (None, 0)


def daily_autocorrelation(samples: SampleBatch, min_days: float) -> tuple[float | None, int]:
    """The median lag-one-day autocorrelation over the (entity, feature) series that span at
    least `min_days` and are not constant, and how many there were (None, 0 when none).

    The lag is counted in rows, a day over the entity's median step, so gaps blur it a little;
    an irregularly sampled entity has no steady lag and correlates weakly, which is the answer
    wanted there too.
    """

    def one(column: np.ndarray, step: float) -> float | None:
        lag = _lag(step, DAY_MS, len(column))
        if not lag:
            return None
        head, tail = column[:-lag], column[lag:]
        if head.std() == 0 or tail.std() == 0:
            return None
        return float(np.corrcoef(head, tail)[0, 1])

    return _median(samples, min_days * DAY_MS, one)


def weekly_gain(samples: SampleBatch, min_weeks: float) -> tuple[float | None, int]:
    """The median over the (entity, feature) series spanning at least `min_weeks` of
    1 - var(x[t] - x[t - week]) / var(x[t] - x[t - day]), and how many there were (None, 0 when
    none): how much better the same hour a week earlier predicts a value than the day before."""

    def one(column: np.ndarray, step: float) -> float | None:
        day, week = _lag(step, DAY_MS, len(column)), _lag(step, WEEK_MS, len(column))
        if not day or not week:
            return None
        day_change = float(np.var(column[day:] - column[:-day]))
        if day_change <= 1e-10 * float(np.var(column)):
            return None  # the same every day (to rounding): nothing left for the week to explain
        return 1.0 - float(np.var(column[week:] - column[:-week])) / day_change

    return _median(samples, min_weeks * WEEK_MS, one)


def _decide(
    setting: str,
    use: str,
    measured: Callable[[], tuple[float | None, int]],
    what: str,
    cutoff: tuple[str, float],
    span: tuple[str, str],
) -> tuple[bool, str]:
    """Whether `setting` (`use`: auto, always or never) adds its inputs, and why: with `auto`,
    whether the `measured` median reaches the cutoff (`cutoff`: its key and value; `span`:
    the key and value of the history each series needs)."""
    if use != "auto":
        return use == "always", f"{setting}.use is {use}"
    value, n = measured()
    if value is None:
        return False, f"no non-constant feature of any entity spans {setting}.{span[0]} ({span[1]})"
    key, least = cutoff
    verdict = ">=" if value >= least else "<"
    plural = "s" if n != 1 else ""
    return value >= least, f"{what} {value:.2f} over {n} entity feature{plural} {verdict} {setting}.{key} {least:g}"


def wants_time_of_day(spec: TimeOfDay, samples: SampleBatch) -> tuple[bool, str]:
    """Whether a model trained on `samples` gets the time-of-day inputs, and why (for the log)."""
    return _decide(
        "time_of_day", spec.use, lambda: daily_autocorrelation(samples, spec.min_days),
        "median lag-one-day autocorrelation", ("min_autocorrelation", spec.min_autocorrelation),
        ("min_days", f"{spec.min_days:g} days"),
    )  # fmt: skip


def wants_time_of_week(spec: TimeOfWeek, samples: SampleBatch) -> tuple[bool, str]:
    """Whether a model trained on `samples` gets the time-of-week inputs, and why (for the log)."""
    return _decide(
        "time_of_week", spec.use, lambda: weekly_gain(samples, spec.min_weeks),
        "median gain of a week back over a day back", ("min_gain", spec.min_gain),
        ("min_weeks", f"{spec.min_weeks:g} weeks"),
    )  # fmt: skip


def calendar_inputs(day: TimeOfDay, week: TimeOfWeek, samples: SampleBatch) -> tuple[tuple[str, ...], dict[str, str]]:
    """The calendar inputs (one of `CALENDAR_INPUTS`) a model trained on `samples` gets, and
    the verdict and why, by setting (for the log and the checkpoint)."""
    daily, why_day = wants_time_of_day(day, samples)
    weekly, why_week = wants_time_of_week(week, samples)
    inputs = (TIME_OF_DAY if daily else ()) + (TIME_OF_WEEK if weekly else ())
    return inputs, {
        "time_of_day": f"{'added' if daily else 'not added'} ({why_day})",
        "time_of_week": f"{'added' if weekly else 'not added'} ({why_week})",
    }
