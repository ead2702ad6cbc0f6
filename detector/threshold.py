"""Threshold rules: from a score to a severity.

The model only scores; these objects decide. Each rule answers, for a sequence of
(entity slot, score) pairs in arrival order, the threshold that applied to each score.
Rules with state (`DynamicThreshold`) keep it per entity slot, so one noisy host does not
raise the bar for the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from detector.config import DynamicRule, PotRule, QuantileRule, Rule, SigmaRule, StaticRule, Thresholds
from detector.model import ErrorStats

log = logging.getLogger(__name__)

NONE, WARNING, CRITICAL = 0, 1, 2
# Fewer peaks than this above the `pot` rule's level quantile give no usable tail fit.
POT_MIN_PEAKS = 10
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its std
SEVERITY_NAMES = ("none", "warning", "critical")


class StaticThreshold:
    """The same value for every score."""

    def __init__(self, value: float) -> None:
        self.value = value

    def apply(
        self, slots: np.ndarray, scores: np.ndarray, update: bool = True, population: np.ndarray | None = None
    ) -> np.ndarray:
        """The threshold of each score. `population` (rows to judge by the population
        threshold) changes nothing: this threshold is the same for every entity.

        Shape:
            slots, scores, population: (R,); returns (R,) float64
        """
        return np.full(len(scores), self.value, np.float64)

    def restart(self, slot: int) -> None:
        """Nothing to forget: this rule keeps no per-entity state."""


class DynamicThreshold:
    """mean + k·std of each entity's own recent normal scores.

    `ewma` keeps an exponentially weighted mean and variance (the first 1/alpha scores are
    averaged plainly, so the start is not biased towards the first score); `rolling` keeps
    the last `window` normal scores; `median` uses the median and 1.4826·MAD of the last
    `window` normal scores instead of mean and std. With `winsorize` = c, a warm entity's
    normal score updates the statistics as at most mean + c·std (not during a regime
    restart). Until an entity has `warmup` normal scores, the population threshold
    (validation mean + k·std) applies. A score above its threshold does not update the
    statistics.

    With `regime_after` = R, R scores in a row above the threshold are a regime change: the
    entity's statistics restart from exactly those R scores (as if they were its first
    normal scores, and warm from then on), so a persistent new level stops being anomalous
    instead of keeping an alert open for ever.

    With `min_ratio` = f, a threshold is never below f times the centre it sits above (the
    population's too): an entity whose scores barely vary (a quantized, near-idle metric)
    would otherwise alert on a rise of a few percent.
    """

    def __init__(self, rule: DynamicRule, population: ErrorStats) -> None:
        self.rule = rule
        self.population = population.mean + rule.k * population.std
        if rule.min_ratio is not None:
            self.population = max(self.population, rule.min_ratio * population.mean)
        self._n = np.zeros(0, np.int64)
        self._mean = np.zeros(0, np.float64)
        self._var = np.zeros(0, np.float64)
        self._ring = np.zeros((0, rule.window if rule.method in ("rolling", "median") else 0), np.float64)
        # Regime-change state: the current run of scores above the threshold, and whether the
        # statistics were restarted (then warm whatever `warmup` says).
        self._run = np.zeros(0, np.int64)
        self._pending = np.zeros((0, rule.regime_after or 0), np.float64)
        self._rebased = np.zeros(0, np.bool_)
        self.cold_rows = np.zeros(0, np.bool_)  # of the latest `apply`: rows judged by `population`

    def carry(self, previous: DynamicThreshold, factor: float) -> None:
        """Take over `previous`'s per-entity state with every score it learned multiplied by
        `factor` (a model swap that changed the score scale by that factor): each warm
        entity's threshold becomes exactly `factor` times what it was, and stays warm."""
        for name in ("_n", "_run", "_rebased"):
            setattr(self, name, getattr(previous, name).copy())
        for name, power in (("_mean", 1), ("_var", 2), ("_pending", 1), ("_ring", 1)):
            setattr(self, name, getattr(previous, name) * factor**power)

    def restart(self, slot: int) -> None:
        """Forget the slot's statistics: it starts cold, as a new entity (a regime change)."""
        if slot < len(self._n):
            self._n[slot], self._mean[slot], self._var[slot] = 0, 0.0, 0.0
            self._run[slot], self._rebased[slot] = 0, False

    def _ensure(self, slots: np.ndarray) -> None:
        need = int(slots.max()) + 1 if len(slots) else 0
        if need <= len(self._n):
            return
        size = max(need, 2 * len(self._n))
        for name in ("_n", "_mean", "_var", "_ring", "_run", "_pending", "_rebased"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _accept(self, slot: int, x: float, clip: float | None = None) -> None:
        """Update one slot's statistics with one normal score (first lowered to `clip`)."""
        if clip is not None and x > clip:
            x = clip
        n = int(self._n[slot])
        mean, var = float(self._mean[slot]), float(self._var[slot])
        if self.rule.method == "median":
            # Centre and spread are the median and 1.4826·MAD of the last `window` scores
            # (`_var` holds the spread squared, so `apply` reads every method alike).
            window = self.rule.window
            self._ring[slot, n % window] = x
            recent = self._ring[slot, : min(n + 1, window)]
            mean = float(np.median(recent))
            var = (MAD_TO_STD * float(np.median(np.abs(recent - mean)))) ** 2
        elif self.rule.method == "rolling":
            window, ring = self.rule.window, self._ring
            count = min(n, window)
            if n >= window:
                old = ring[slot, n % window]
                new_mean = mean + (x - old) / window
                var = max(var + ((x - old) * (x - new_mean + old - mean)) / window, 0.0)
            else:
                new_mean = mean + (x - mean) / (count + 1)
                var = (var * count + (x - mean) * (x - new_mean)) / (count + 1)
            ring[slot, n % window] = x
            mean = new_mean
        else:
            a = max(self.rule.alpha, 1.0 / (n + 1))
            delta = x - mean
            mean += a * delta
            var = (1.0 - a) * (var + a * delta * delta)
        self._n[slot], self._mean[slot], self._var[slot] = n + 1, mean, var

    def apply(
        self, slots: np.ndarray, scores: np.ndarray, update: bool = True, population: np.ndarray | None = None
    ) -> np.ndarray:
        """The threshold of each score, updating the per-entity statistics when `update`.

        Rows where `population` is True are judged by the population threshold even if
        their entity is warm (a cold start). Afterwards `cold_rows` says which rows were.

        Shape:
            slots, scores, population: (R,); returns (R,) float64
        """
        self._ensure(slots)
        out = np.empty(len(scores), np.float64)
        cold_rows = np.zeros(len(scores), np.bool_) if population is None else population.astype(np.bool_)
        k, warmup, population_value = self.rule.k, self.rule.warmup, self.population
        regime_after, winsorize, min_ratio = self.rule.regime_after, self.rule.winsorize, self.rule.min_ratio
        n_arr, mean_arr, var_arr = self._n, self._mean, self._var
        # Sequential on purpose: each score's threshold depends on the scores before it.
        for i in range(len(scores)):
            slot, x = int(slots[i]), float(scores[i])
            n = int(n_arr[slot])
            cold = n == 0 or (n < warmup and not self._rebased[slot])
            cold_rows[i] |= cold
            if cold_rows[i]:
                threshold = population_value
            else:
                threshold = mean_arr[slot] + k * var_arr[slot] ** 0.5
                if min_ratio is not None:
                    threshold = max(threshold, min_ratio * mean_arr[slot])
            out[i] = threshold
            if not update:
                continue
            if x <= threshold:
                self._run[slot] = 0
                clip = None
                if winsorize is not None and not cold:
                    clip = mean_arr[slot] + winsorize * var_arr[slot] ** 0.5
                self._accept(slot, x, clip)
            elif regime_after is not None:
                run = int(self._run[slot])
                self._pending[slot, run] = x
                run += 1
                if run == regime_after:
                    # A new regime: forget the old statistics, learn the run, oldest first.
                    n_arr[slot], mean_arr[slot], var_arr[slot] = 0, 0.0, 0.0
                    for pending in self._pending[slot].tolist():
                        self._accept(slot, pending)
                    self._rebased[slot] = True
                    run = 0
                self._run[slot] = run
        self.cold_rows = cold_rows
        return out


ThresholdRule = StaticThreshold | DynamicThreshold


def build_rule(rule: Rule, errors: ErrorStats) -> ThresholdRule:
    if isinstance(rule, StaticRule):
        return StaticThreshold(rule.value)
    if isinstance(rule, QuantileRule):
        return StaticThreshold(errors.quantile(rule.q) * rule.factor)
    if isinstance(rule, SigmaRule):
        return StaticThreshold(errors.mean + rule.k * errors.std)
    if isinstance(rule, PotRule):
        value = pot_threshold(errors.sorted_errors, rule.q, rule.level)
        if value is None:
            value = float(errors.sorted_errors.max()) if len(errors.sorted_errors) else 0.0
            log.warning(
                "pot threshold: fewer than %d validation errors above their %g quantile, no tail to fit; "
                "using the largest validation error, %g",
                POT_MIN_PEAKS,
                rule.level,
                value,
            )
        return StaticThreshold(value)
    if isinstance(rule, DynamicRule):
        return DynamicThreshold(rule, errors)
    raise TypeError(f"unknown threshold rule {rule!r}")


def pot_threshold(errors: np.ndarray, q: float, level: float) -> float | None:
    """The score a normal window exceeds with probability `q`, by peaks over threshold: the
    errors above their `level` quantile t, less t, are fitted with a generalized Pareto
    distribution (maximum likelihood, scipy), whose tail gives
    t + scale/shape · ((q·n/peaks)^-shape - 1), or t - scale · log(q·n/peaks) at shape 0.
    None with fewer than `POT_MIN_PEAKS` errors above t: no tail to fit (a model that
    reconstructs its held-out windows almost equally well, say a constant series).

    Shape:
        errors: (K,) validation errors
    """
    from scipy.stats import genpareto

    errors = np.asarray(errors, np.float64)
    start = float(np.quantile(errors, level)) if len(errors) else 0.0
    peaks = errors[errors > start] - start
    if len(peaks) < POT_MIN_PEAKS:
        return None
    fitted = genpareto.fit(peaks, floc=0.0)
    shape, scale = float(fitted[0]), float(fitted[2])
    ratio = q * len(errors) / len(peaks)
    if abs(shape) < 1e-9:
        return start - scale * math.log(ratio)
    return start + scale / shape * (math.pow(ratio, -shape) - 1.0)


@dataclass
class Severities:
    """Severity of each score and the threshold it was compared with.

    Shape:
        severity: (R,) int8 in {NONE, WARNING, CRITICAL}
        threshold: (R,) float64, the critical threshold for critical scores, else the warning one
        cold: (R,) bool, the entity was judged by population thresholds (a cold start)
    """

    severity: np.ndarray
    threshold: np.ndarray
    cold: np.ndarray


def _built(rule: Rule, errors: ErrorStats, old: ThresholdRule | None, factor: float) -> ThresholdRule:
    """`build_rule`, or with `old` (see `SeverityRules.carried`) the rule refit from a
    retrained model's errors keeping what `old` learned, scaled by `factor`."""
    if old is None:
        return build_rule(rule, errors)
    if isinstance(rule, PotRule) and isinstance(old, StaticThreshold):
        value = pot_threshold(errors.sorted_errors, rule.q, rule.level)
        return StaticThreshold(value if value is not None else old.value * factor)
    new = build_rule(rule, errors)
    if isinstance(new, DynamicThreshold) and isinstance(old, DynamicThreshold):
        new.carry(old, factor)
    return new


class SeverityRules:
    """The warning rule and the optional critical rule of one stream.

    With `previous` (the rules in use before a reload), a severity whose rule is unchanged
    keeps its rule object, and so a dynamic threshold keeps its per-entity statistics; a
    changed rule starts afresh. `carry` is for `carried`.
    """

    def __init__(
        self,
        config: Thresholds,
        errors: ErrorStats,
        previous: SeverityRules | None = None,
        carry: tuple[SeverityRules, float] | None = None,
    ) -> None:
        self.config = config
        factor = carry[1] if carry else 1.0
        self.warning: ThresholdRule
        if previous is not None and previous.config.warning == config.warning:
            self.warning = previous.warning
        else:
            self.warning = _built(config.warning, errors, carry[0].warning if carry else None, factor)
        self.critical: ThresholdRule | None
        if previous is not None and previous.config.critical == config.critical:
            self.critical = previous.critical
        elif config.critical is None:
            self.critical = None
        else:
            self.critical = _built(config.critical, errors, carry[0].critical if carry else None, factor)

    def apply(
        self, slots: np.ndarray, scores: np.ndarray, update: bool = True, population: np.ndarray | None = None
    ) -> Severities:
        """Severities of scores in arrival order; `population` marks rows whose entity is still
        judged by the population thresholds (see `DynamicThreshold.apply`).

        Shape:
            slots, scores, population: (R,)
        """
        cold = np.zeros(len(scores), np.bool_) if population is None else population.astype(np.bool_)
        warn = self.warning.apply(slots, scores, update, population)
        if isinstance(self.warning, DynamicThreshold):
            cold |= self.warning.cold_rows
        severity = (scores > warn).astype(np.int8)
        threshold = warn
        if self.critical is not None:
            crit = self.critical.apply(slots, scores, update, population)
            if isinstance(self.critical, DynamicThreshold):
                cold |= self.critical.cold_rows
            is_critical = (scores > crit) & (severity == WARNING)
            severity[is_critical] = CRITICAL
            threshold = np.where(is_critical, crit, warn)
        return Severities(severity, threshold, cold)

    @classmethod
    def carried(cls, previous: SeverityRules, errors: ErrorStats, factor: float) -> SeverityRules:
        """The same rules refit from a new model's `errors`, each dynamic rule keeping
        `previous`'s per-entity statistics scaled by `factor`, the ratio of the new model's
        scores to the old one's (a retrained model, compared on the same held-out windows).
        Without it every entity would fall back to the population threshold until `warmup`
        normal scores, and alert on its ordinary tail meanwhile. A pot rule whose new errors
        hold too few peaks to fit keeps its old threshold times `factor`: the retrainer's
        held-out sample (a fifth of its reservoir) is often that small, and the old fit, scaled
        as the scores were, is then the better estimate."""
        return cls(previous.config, errors, carry=(previous, factor))

    def restart(self, slot: int) -> None:
        """Forget what the rules learned about `slot` (its regime changed)."""
        self.warning.restart(slot)
        if self.critical is not None:
            self.critical.restart(slot)


class EntityBaselines:
    """Per-entity adjustments around `SeverityRules`: cold starts and regime calibration.

    - Cold start: an entity's first `warmup_windows` windows are judged by the population
      thresholds (and flagged `cold`), whatever its dynamic statistics say.
    - Regime change (`start_regime`): the entity's rule statistics restart, and its next
      `calibration_windows` windows are calibration, not alerts (severity NONE, flagged
      cold): their median score over the median held-out error of the model, when above 1,
      becomes the entity's *scale*. From then on its scores are divided by the scale before
      the rules see them and its thresholds multiplied by it, so a new regime that the model
      reconstructs, say, three times worse than training alerts on what is anomalous *for
      that regime*, while a spike far above it still alerts.

    An entity's state is kept by slot. Not thread safe: one pipeline owns it.
    """

    def __init__(self, warmup_windows: int, calibration_windows: int, errors: ErrorStats) -> None:
        self.warmup_windows = warmup_windows
        self.calibration_windows = calibration_windows
        self.reference = max(errors.quantile(0.5), 1e-12)
        self._seen = np.zeros(0, np.int64)
        self._calibrating = np.zeros(0, np.int64)  # calibration windows left
        self._scale = np.ones(0, np.float64)
        self._samples: dict[int, list[float]] = {}
        self._level_sum = np.zeros((0, 0), np.float64)  # per slot: sum of window means in the incident
        self._level_n = np.zeros(0, np.int64)
        self._level_windows = np.zeros(0, np.int64)

    def refit(self, errors: ErrorStats) -> None:
        """A new model: its held-out errors are the reference of the calibration from now on.
        Scales already fitted stay: they are ratios, not scores."""
        self.reference = max(errors.quantile(0.5), 1e-12)

    def scale(self, slot: int) -> float:
        return float(self._scale[slot]) if slot < len(self._scale) else 1.0

    def calibrating(self, slot: int) -> bool:
        return slot < len(self._calibrating) and bool(self._calibrating[slot] > 0)

    def _ensure(self, slots: np.ndarray) -> None:
        need = int(slots.max()) + 1 if len(slots) else 0
        if need <= len(self._seen):
            return
        size = max(need, 2 * len(self._seen))
        for name, fill in (("_seen", 0), ("_calibrating", 0), ("_scale", 1.0)):
            old = getattr(self, name)
            new = np.full(size, fill, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def forget(self, slot: int) -> None:
        """The slot's entity was evicted (idle, see `detector.window`): the slot's next entity
        starts cold and uncalibrated, with no incident level."""
        if slot < len(self._seen):
            self._seen[slot], self._calibrating[slot], self._scale[slot] = 0, 0, 1.0
        if slot < len(self._level_n):
            self._level_sum[slot], self._level_n[slot], self._level_windows[slot] = 0.0, 0, 0
        self._samples.pop(slot, None)

    def start_regime(self, slot: int, rules: SeverityRules) -> None:
        """The entity's regime changed: forget its statistics and calibrate it afresh."""
        self._ensure(np.array([slot]))
        rules.restart(slot)
        self._seen[slot] = 0
        self._scale[slot] = 1.0
        self._calibrating[slot] = self.calibration_windows
        self._samples[slot] = []

    def incident_levels(
        self, slots: np.ndarray, means: np.ndarray, firing: np.ndarray, changed: list[int], skip: int
    ) -> dict[int, np.ndarray]:
        """Follow each entity's level through its incidents; return, for each row in `changed`
        (a regime change), the entity's mean level over that incident.

        The level of an incident is the mean of its windows' means, leaving out its first `skip`
        windows, which straddle the onset and still hold old values (the latest window's mean
        when the incident was shorter). Averaging many windows keeps a periodic series from
        being centred on the phase its last window happened to cover.

        Shape:
            slots, firing: (R,); means: (R, D) raw window means; returns {row: (D,) float32}
        """
        n = len(slots)
        self._ensure(slots)
        size = len(self._seen)
        if len(self._level_n) < size:
            level_sum = np.zeros((size, means.shape[1]), np.float64)
            if len(self._level_n):
                level_sum[: len(self._level_n)] = self._level_sum
            level_n, level_windows = np.zeros(size, np.int64), np.zeros(size, np.int64)
            level_n[: len(self._level_n)] = self._level_n
            level_windows[: len(self._level_n)] = self._level_windows
            self._level_sum, self._level_n, self._level_windows = level_sum, level_n, level_windows
        out: dict[int, np.ndarray] = {}
        wanted = set(changed)
        level_sum, level_n, level_windows = self._level_sum, self._level_n, self._level_windows
        # Sequential: an incident's rows accumulate until the entity stops firing.
        for i in range(n):
            slot = int(slots[i])
            if firing[i] or i in wanted:
                level_windows[slot] += 1
                if level_windows[slot] > skip:
                    level_sum[slot] += means[i]
                    level_n[slot] += 1
                if i not in wanted:
                    continue
                level = level_sum[slot] / level_n[slot] if level_n[slot] else means[i]
                out[i] = np.asarray(level, np.float32)
            level_sum[slot], level_n[slot], level_windows[slot] = 0.0, 0, 0
        return out

    def apply(self, rules: SeverityRules, slots: np.ndarray, scores: np.ndarray, update: bool = True) -> Severities:
        """Severities of `scores` (in arrival order) through `rules`, with cold starts and
        regime calibration applied.

        Shape:
            slots, scores: (R,)
        """
        self._ensure(slots)
        n = len(slots)
        # Rank of each row among its entity's rows in this batch: vectorized bookkeeping.
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        first = np.ones(n, np.bool_)
        first[1:] = sorted_slots[1:] != sorted_slots[:-1]
        starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - starts
        left = self._calibrating[slots]
        calibrating = rank < left
        if calibrating.any() and update:
            for slot in np.unique(slots[calibrating]).tolist():
                taken = scores[calibrating & (slots == slot)]
                samples = self._samples.setdefault(slot, [])
                samples.extend(taken.tolist())
                self._calibrating[slot] -= len(taken)
                if self._calibrating[slot] == 0:
                    self._scale[slot] = max(1.0, float(np.median(samples)) / self.reference)
                    del self._samples[slot]
        scale = self._scale[slots]
        judged = ~calibrating
        # Calibration windows come first in an entity's batch and do not count as its own.
        population = (self._seen[slots] + np.maximum(rank - left, 0)) < self.warmup_windows
        severity = np.zeros(n, np.int8)
        threshold = np.empty(n, np.float64)
        cold = np.ones(n, np.bool_)
        if judged.all():
            sev = rules.apply(slots, scores / scale, update, population)
            severity, threshold, cold = sev.severity, sev.threshold * scale, sev.cold
        else:
            sev = rules.apply(slots[judged], scores[judged] / scale[judged], update, population[judged])
            severity[judged], threshold[judged], cold[judged] = sev.severity, sev.threshold * scale[judged], sev.cold
            # Calibration windows show the threshold they would have met; they change nothing.
            shown = rules.apply(slots[calibrating], scores[calibrating], False, np.ones(int(calibrating.sum()), bool))
            threshold[calibrating] = shown.threshold
        if update:
            np.add.at(self._seen, slots[judged], 1)
        return Severities(severity, threshold, cold)
