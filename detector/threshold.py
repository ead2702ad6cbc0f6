"""Threshold rules: from a score to a severity.

The model only scores; these objects decide. Each rule answers, for a sequence of
(entity slot, score) pairs in arrival order, the threshold that applied to each score.
Rules with state (`DynamicThreshold`) keep it per entity slot, so one noisy host does not
raise the bar for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.config import DynamicRule, QuantileRule, Rule, StaticRule, Thresholds
from detector.model import ErrorStats

NONE, WARNING, CRITICAL = 0, 1, 2
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its std
SEVERITY_NAMES = ("none", "warning", "critical")


class StaticThreshold:
    """The same value for every score."""

    def __init__(self, value: float) -> None:
        self.value = value

    def apply(self, slots: np.ndarray, scores: np.ndarray, update: bool = True) -> np.ndarray:
        return np.full(len(scores), self.value, np.float64)


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
    """

    def __init__(self, rule: DynamicRule, population: ErrorStats) -> None:
        self.rule = rule
        self.population = population.mean + rule.k * population.std
        self._n = np.zeros(0, np.int64)
        self._mean = np.zeros(0, np.float64)
        self._var = np.zeros(0, np.float64)
        self._ring = np.zeros((0, rule.window if rule.method in ("rolling", "median") else 0), np.float64)
        # Regime-change state: the current run of scores above the threshold, and whether the
        # statistics were restarted (then warm whatever `warmup` says).
        self._run = np.zeros(0, np.int64)
        self._pending = np.zeros((0, rule.regime_after or 0), np.float64)
        self._rebased = np.zeros(0, np.bool_)

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

    def apply(self, slots: np.ndarray, scores: np.ndarray, update: bool = True) -> np.ndarray:
        self._ensure(slots)
        out = np.empty(len(scores), np.float64)
        k, warmup, population = self.rule.k, self.rule.warmup, self.population
        regime_after, winsorize = self.rule.regime_after, self.rule.winsorize
        n_arr, mean_arr, var_arr = self._n, self._mean, self._var
        # Sequential on purpose: each score's threshold depends on the scores before it.
        for i in range(len(scores)):
            slot, x = int(slots[i]), float(scores[i])
            n = int(n_arr[slot])
            cold = n == 0 or (n < warmup and not self._rebased[slot])
            threshold = population if cold else mean_arr[slot] + k * var_arr[slot] ** 0.5
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
        return out


ThresholdRule = StaticThreshold | DynamicThreshold


def build_rule(rule: Rule, errors: ErrorStats) -> ThresholdRule:
    if isinstance(rule, StaticRule):
        return StaticThreshold(rule.value)
    if isinstance(rule, QuantileRule):
        return StaticThreshold(errors.quantile(rule.q) * rule.factor)
    if isinstance(rule, DynamicRule):
        return DynamicThreshold(rule, errors)
    raise TypeError(f"unknown threshold rule {rule!r}")


@dataclass
class Severities:
    """Severity of each score and the threshold it was compared with.

    Shape:
        severity: (R,) int8 in {NONE, WARNING, CRITICAL}
        threshold: (R,) float64, the critical threshold for critical scores, else the warning one
    """

    severity: np.ndarray
    threshold: np.ndarray


class SeverityRules:
    """The warning rule and the optional critical rule of one stream.

    With `previous` (the rules in use before a reload), a severity whose rule is unchanged
    keeps its rule object, and so a dynamic threshold keeps its per-entity statistics; a
    changed rule starts afresh.
    """

    def __init__(self, config: Thresholds, errors: ErrorStats, previous: SeverityRules | None = None) -> None:
        self.config = config
        self.warning: ThresholdRule
        if previous is not None and previous.config.warning == config.warning:
            self.warning = previous.warning
        else:
            self.warning = build_rule(config.warning, errors)
        self.critical: ThresholdRule | None
        if previous is not None and previous.config.critical == config.critical:
            self.critical = previous.critical
        else:
            self.critical = build_rule(config.critical, errors) if config.critical is not None else None

    def apply(self, slots: np.ndarray, scores: np.ndarray, update: bool = True) -> Severities:
        warn = self.warning.apply(slots, scores, update)
        severity = (scores > warn).astype(np.int8)
        threshold = warn
        if self.critical is not None:
            crit = self.critical.apply(slots, scores, update)
            is_critical = (scores > crit) & (severity == WARNING)
            severity[is_critical] = CRITICAL
            threshold = np.where(is_critical, crit, warn)
        return Severities(severity, threshold)
