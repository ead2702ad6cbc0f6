"""Time of day as model input, for streams with a daily rhythm.

A 32-sample window of a 5-minute metric sees under three hours: it cannot tell the night's
level from the afternoon's, so a daily pattern that skips a day, or a plateau at the wrong hour,
reconstructs as well as the normal one. Two more inputs, the sine and cosine of the time of day,
tell the model where in the day each sample sits (the phase is learned, so the time zone does
not matter; a daylight-saving shift moves it by an hour).

Whether a stream gets them is decided once, at training (`time_of_day.use: auto`): the lag-one-
day autocorrelation of each feature of each entity with `min_days` of training data, and their
median against `min_autocorrelation`. Given to every NAB series, the two inputs gain nothing
overall (58.4 against 58.1 over five seeds): the series without a daily rhythm lose what the daily
ones win (docs/results.md, round 8). The decision is stored in the checkpoint as two more feature
names, so the model is scored with the inputs it was trained on.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from detector.config import TimeOfDay
from detector.source import SampleBatch

TIME_OF_DAY = ("time_of_day_sin", "time_of_day_cos")
DAY_MS = 86_400_000


def time_of_day(timestamps: np.ndarray) -> np.ndarray:
    """Sine and cosine of each timestamp's time of day (UTC).

    Shape:
        timestamps: (N,) int64 ms since the epoch; returns (N, 2) float32
    """
    angle = (timestamps % DAY_MS).astype(np.float64) * (2 * math.pi / DAY_MS)
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def with_time_of_day(batch: SampleBatch) -> SampleBatch:
    """`batch` with the two time-of-day columns after its features (D → D + 2)."""
    values = np.concatenate([batch.values, time_of_day(batch.timestamps)], axis=1)
    return SampleBatch(batch.entities, batch.timestamps, values, batch.positions)


def daily_autocorrelation(samples: SampleBatch, min_days: float) -> tuple[float | None, int]:
    """The median lag-one-day autocorrelation over the (entity, feature) series that span at
    least `min_days` and are not constant, and how many there were (None, 0 when none).

    The lag is counted in rows, a day over the entity's median step, so gaps blur it a little;
    an irregularly sampled entity has no steady lag and correlates weakly, which is the answer
    wanted there too.
    """
    rows: defaultdict[str, list[int]] = defaultdict(list)
    for i, entity in enumerate(samples.entities):
        rows[entity].append(i)
    found: list[float] = []
    for index in rows.values():
        ms = samples.timestamps[index]
        if len(ms) < 3 or ms[-1] - ms[0] < min_days * DAY_MS:
            continue
        step = float(np.median(np.diff(ms)))
        lag = round(DAY_MS / step) if step > 0 else 0
        if lag < 1 or lag >= len(ms) - 1:
            continue
        values = samples.values[index].astype(np.float64)
        for column in values.T:
            head, tail = column[:-lag], column[lag:]
            if head.std() == 0 or tail.std() == 0:
                continue  # constant: no rhythm to speak of
            found.append(float(np.corrcoef(head, tail)[0, 1]))
    if not found:
        return None, 0
    return float(np.median(found)), len(found)


def wants_time_of_day(spec: TimeOfDay, samples: SampleBatch) -> tuple[bool, str]:
    """Whether a model trained on `samples` gets the time-of-day inputs, and why (for the log)."""
    if spec.use != "auto":
        return spec.use == "always", f"time_of_day.use is {spec.use}"
    value, n = daily_autocorrelation(samples, spec.min_days)
    if value is None:
        return False, f"no non-constant feature of any entity spans time_of_day.min_days ({spec.min_days:g} days)"
    verdict = ">=" if value >= spec.min_autocorrelation else "<"
    return value >= spec.min_autocorrelation, (
        f"median lag-one-day autocorrelation {value:.2f} over {n} entity feature{'s' if n != 1 else ''} {verdict} "
        f"time_of_day.min_autocorrelation {spec.min_autocorrelation:g}"
    )
