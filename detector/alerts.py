"""The alert policy (N anomalous windows out of M, cooldown, resolve) and alert sinks.

`AlertPolicy` turns per-window severities into firing and resolved events, with state per
entity slot. A sink is any object with `emit(alerts)` and `close()`; add one by adding a
class here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np

from detector.config import AlertPolicy as PolicyConfig
from detector.config import DailyRepeats as RepeatsConfig
from detector.config import RegimeChange
from detector.source import format_timestamp
from detector.threshold import CRITICAL, NONE, SEVERITY_NAMES, WARNING

log = logging.getLogger("detector.alerts")


def alert_id(stream: str, entity: str, window_end_ms: int, status: str = "firing") -> str:
    """Stable id from stream, entity and window end: a replayed window gets the same id."""
    key = f"{stream}\x00{entity}\x00{window_end_ms}\x00{status}".encode()
    return hashlib.sha256(key).hexdigest()[:24]


_DAY_MS = 86_400_000
_NO_BIN = np.iinfo(np.int64).min  # a bin slot that holds no bin yet


class DailyRepeats:
    """Which anomalous windows repeat the entity's own scores of a day earlier (see
    `detector.config.DailyRepeats`), with state per entity slot: the highest score of each
    `bin_s` bin of event time over the last max(`days`) days and a bit, in a ring of bins.

    Sequential on purpose, like the dynamic threshold: a window's verdict depends on the
    windows before it, even within one batch (a replay batch can span days).
    """

    def __init__(self, config: RepeatsConfig) -> None:
        self.ratio = config.ratio
        self.bin_ms = config.bin_s * 1000
        day = _DAY_MS // self.bin_ms  # bins in a day
        self.lags = [d * day for d in config.days]
        self.size = max(self.lags) + 2  # the oldest three bins looked at, up to today's
        self._best = np.zeros((0, self.size), np.float64)
        self._bin = np.full((0, self.size), _NO_BIN, np.int64)

    def apply(self, slots: np.ndarray, end_ms: np.ndarray, scores: np.ndarray, severity: np.ndarray) -> np.ndarray:
        """`severity` with the repeats set to NONE; every score updates its entity's bins.

        Shape:
            slots, end_ms, scores, severity: (R,) in arrival order; returns (R,) int8
        """
        need = int(slots.max()) + 1 if len(slots) else 0
        if need > len(self._best):
            grow = max(need, 2 * len(self._best)) - len(self._best)
            self._best = np.concatenate([self._best, np.zeros((grow, self.size))])
            self._bin = np.concatenate([self._bin, np.full((grow, self.size), _NO_BIN, np.int64)])
        out = severity.copy()
        size, lags, ratio = self.size, self.lags, self.ratio
        for i, (slot, ms, score, level) in enumerate(
            zip(slots.tolist(), end_ms.tolist(), scores.tolist(), severity.tolist(), strict=True)
        ):
            best, bins = self._best[slot], self._bin[slot]
            b = ms // self.bin_ms
            if level != NONE:
                near = [best[j % size] for lag in lags for j in range(b - lag - 1, b - lag + 2) if bins[j % size] == j]
                if near and max(near) >= ratio * score:
                    out[i] = NONE
            k = b % size
            if bins[k] != b:
                bins[k], best[k] = b, score
            elif score > best[k]:
                best[k] = score
        return out

    def forget(self, slot: int) -> None:
        """Clear an evicted entity's bins before its slot is reused."""
        if slot < len(self._bin):
            self._bin[slot] = _NO_BIN


@dataclass(frozen=True)
class Alert:
    """One alert event. `to_dict` is the JSON every sink receives.

    A `regime_change` event ends an incident like a resolve (`resolves`, `ends`): the entity
    was anomalous so long that its new behaviour became its baseline (see `AlertPolicy`).
    `cold_start` marks a firing event of an entity still judged by population thresholds.
    """

    id: str
    status: Literal["firing", "resolved", "regime_change"]
    stream: str
    entity: str
    severity: str
    window_start_ms: int
    window_end_ms: int
    score: float
    threshold: float
    top_features: tuple[tuple[str, float], ...]
    model_version: str
    resolves: str | None = None  # for a resolved event, the id of the latest firing event it ends
    ends: tuple[str, ...] = ()  # for a resolved event, every firing id of the incident, oldest first
    replaces: str | None = None  # for an escalation, the id of the firing event it supersedes
    cold_start: bool = False
    reason: str | None = None  # why a resolved event ended its incident when no window did: "idle"

    def to_dict(self) -> dict[str, Any]:
        """The alert as JSON-ready data. Non-finite numbers become None (JSON null), so the
        result always dumps with `allow_nan=False`."""
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "stream": self.stream,
            "entity": self.entity,
            "severity": self.severity,
            "window_start": format_timestamp(self.window_start_ms),
            "window_end": format_timestamp(self.window_end_ms),
            "score": _significant(self.score),
            "threshold": _significant(self.threshold),
            "top_features": [{"name": n, "error": _significant(e)} for n, e in self.top_features],
            "model_version": self.model_version,
            "cold_start": self.cold_start,
        }
        if self.replaces is not None:
            out["replaces"] = self.replaces
        if self.resolves is not None:
            out["resolves"] = self.resolves
            out["ends"] = list(self.ends)
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def _significant(value: float) -> float | None:
    """Six significant digits: rounding to decimal places would turn small reconstruction
    errors (1e-7 on a well-fitted model) into 0.0 and hide that the score beat the threshold.
    None for NaN and infinities, which JSON cannot carry."""
    if not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


@dataclass
class _EntityState:
    history: int = 0  # bit i set = the window i steps ago was anomalous (bit 0 = latest)
    critical_history: int = 0  # like `history`, for critical windows only
    normal_streak: int = 0
    incident: tuple[str, ...] = ()  # firing ids of the open incident, oldest first; () when not firing
    resolved_at_ms: int = -(2**62)  # event time of the last resolve; the cooldown runs from here
    critical_score: float = math.nan  # score and critical threshold of the latest critical window
    critical_threshold: float = math.nan
    incident_windows: int = 0  # windows since the incident fired
    fired_at_ms: int = 0  # event time the incident fired
    # Of the open incident, then of the last one resolved (what its cooldown holds back):
    peak: float = 0.0  # highest score among its anomalous windows
    peak_severity: int = NONE  # highest severity it reached

    @property
    def active_id(self) -> str | None:
        return self.incident[-1] if self.incident else None

    @property
    def active_severity(self) -> int:
        """The open incident's severity (it only ever escalates); NONE when not firing."""
        return self.peak_severity if self.incident else NONE


class AlertPolicy:
    """N-of-M firing, resolve after a run of normal windows, cooldown after a resolve.

    - An entity fires when at least `n` of its last `m` windows were anomalous and it is not
      already firing or cooling down. The event carries the worst severity among them, with
      the score and threshold of the latest window of that severity (window and top features
      are those of the window that fired).
    - While firing, an escalation from warning to critical fires again: a new id, and
      `replaces` names the id it supersedes.
    - After `resolve_after` normal windows in a row (default `m`), a `resolved` event ends the
      incident (`resolves`: its latest firing id; `ends`: all of them), and the entity cannot
      fire again until `cooldown_s` of event time has passed, unless it gets worse than that
      incident: a higher severity than it reached, or (with `cooldown_breakout` = b) a window
      scoring at least b times the incident's highest score.
    - With `regime` set, an incident open for `regime.after_windows` windows or
      `regime.after_s` seconds of event time ends with a `regime_change` event instead (ids
      as for a resolve, no cooldown), and its entity's N-of-M history is cleared. The
      positions of those windows are in `regime_changes` after `update`: the caller re-bases
      the entity (see `Pipeline`). The entity's later windows in the same call are ignored:
      they were scored against the old baseline.
    """

    def __init__(
        self,
        stream: str,
        config: PolicyConfig,
        features: Sequence[str],
        model_version: str,
        regime: RegimeChange | None = None,
    ) -> None:
        self.stream = stream
        self.config = config
        self.features = list(features)
        self.model_version = model_version
        self.regime = regime if regime is not None and regime.enabled else None
        self.regime_changes: list[int] = []
        self._mask = (1 << config.m) - 1
        self._state: dict[int, _EntityState] = {}

    def is_active(self, slot: int) -> bool:
        state = self._state.get(slot)
        return state is not None and state.active_id is not None

    def evict(self, slots: Sequence[int], entities: Sequence[str], last_ms: Sequence[int]) -> list[Alert]:
        """Forget evicted entities (idle, see `detector.window`), so their slots start afresh.

        An open incident ends with a `resolved` event, `reason` "idle", at the entity's newest
        timestamp (`window_start` = `window_end` = it; no score, threshold or top features), so a
        receiver does not keep it firing for ever. Its id depends on stream, entity and that
        timestamp only, like every alert id.
        """
        events: list[Alert] = []
        for slot, entity, last in zip(slots, entities, last_ms, strict=True):
            state = self._state.pop(int(slot), None)
            if state is None or not state.incident:
                continue
            events.append(
                Alert(
                    id=alert_id(self.stream, entity, int(last), "idle"),
                    status="resolved",
                    stream=self.stream,
                    entity=entity,
                    severity=SEVERITY_NAMES[state.active_severity],
                    window_start_ms=int(last),
                    window_end_ms=int(last),
                    score=math.nan,
                    threshold=math.nan,
                    top_features=(),
                    model_version=self.model_version,
                    resolves=state.incident[-1],
                    ends=state.incident,
                    reason="idle",
                )
            )
        return events

    def reconfigured(self, config: PolicyConfig) -> AlertPolicy:
        """A policy with `config` that carries every entity's state over, so a reload never
        strands an open incident: it keeps its ids and severity and resolves under the new
        rules. The N-of-M history keeps its latest min(old m, new m) windows (when `m` grows,
        the windows older than the old `m` count as normal); the normal streak carries over,
        and the cooldown runs from the last resolve with the new `cooldown_s`."""
        policy = AlertPolicy(self.stream, config, self.features, self.model_version, self.regime)
        for slot, state in self._state.items():
            policy._state[slot] = replace(
                state, history=state.history & policy._mask, critical_history=state.critical_history & policy._mask
            )
        return policy

    def update(
        self,
        slots: np.ndarray,
        entities: Sequence[str],
        severity: np.ndarray,
        scores: np.ndarray,
        thresholds: np.ndarray,
        per_feature: np.ndarray,
        start_ms: np.ndarray,
        end_ms: np.ndarray,
        cold: np.ndarray | None = None,
    ) -> tuple[list[Alert], list[str | None]]:
        """Advance each entity by one window per element, in order.

        Returns the alert events and, per window, the id of the firing event it belongs to
        (None when the entity is not firing after that window). `cold` marks windows judged
        by population thresholds; a firing event from one says `cold_start`.

        Shape:
            slots, severity, scores, thresholds, start_ms, end_ms, cold: (R,)
            per_feature: (R, D)
        """
        cfg = self.config
        events: list[Alert] = []
        ids: list[str | None] = []
        cooldown_ms = int(cfg.cooldown_s * 1000)
        breakout = cfg.cooldown_breakout
        regime = self.regime
        self.regime_changes = []
        rebased: set[int] = set()
        for i in range(len(slots)):
            slot = int(slots[i])
            if slot in rebased:
                ids.append(None)
                continue
            state = self._state.get(slot)
            if state is None:
                state = self._state[slot] = _EntityState()
            sev = int(severity[i])
            anomalous = sev != NONE
            # Bitmasks, not lists: O(1) per window however long `m` is (Python ints are unbounded).
            state.history = ((state.history << 1) | anomalous) & self._mask
            state.critical_history = ((state.critical_history << 1) | (sev == CRITICAL)) & self._mask
            state.normal_streak = 0 if anomalous else state.normal_streak + 1
            if sev == CRITICAL:
                state.critical_score, state.critical_threshold = float(scores[i]), float(thresholds[i])
            end = int(end_ms[i])
            score = float(scores[i])
            if state.incident and anomalous:
                state.peak = max(state.peak, score)
            if not state.incident:
                worst = CRITICAL if state.critical_history else WARNING
                # A cooldown holds back repeats of the incident that resolved, not something
                # worse: a higher severity, or a far higher score, fires.
                if (
                    anomalous
                    and state.history.bit_count() >= cfg.n
                    and (
                        end >= state.resolved_at_ms + cooldown_ms
                        or worst > state.peak_severity
                        or (breakout is not None and score >= breakout * state.peak)
                    )
                ):
                    alert = self._alert(i, entities[i], worst, scores, thresholds, per_feature, start_ms, end_ms)
                    if worst != sev:
                        # The critical window came earlier among the last m: report its score and
                        # threshold, so they match the severity.
                        alert = replace(alert, score=state.critical_score, threshold=state.critical_threshold)
                    if cold is not None and cold[i]:
                        alert = replace(alert, cold_start=True)
                    events.append(alert)
                    state.incident, state.incident_windows, state.fired_at_ms = (alert.id,), 0, end
                    state.peak, state.peak_severity = score, worst
            elif anomalous and sev > state.active_severity:
                alert = self._alert(i, entities[i], sev, scores, thresholds, per_feature, start_ms, end_ms)
                events.append(replace(alert, replaces=state.incident[-1]))
                state.incident, state.peak_severity = (*state.incident, alert.id), sev
            elif state.normal_streak >= cfg.resolve_windows:
                last = self._alert(
                    i, entities[i], state.active_severity, scores, thresholds, per_feature, start_ms, end_ms
                )
                resolved_id = alert_id(self.stream, entities[i], end, "resolved")
                events.append(
                    replace(last, id=resolved_id, status="resolved", resolves=state.incident[-1], ends=state.incident)
                )
                state.incident, state.resolved_at_ms = (), end
            elif regime is not None:
                state.incident_windows += 1
                if (regime.after_windows is not None and state.incident_windows >= regime.after_windows) or (
                    regime.after_s is not None and end - state.fired_at_ms >= regime.after_s * 1000
                ):
                    last = self._alert(
                        i, entities[i], state.active_severity, scores, thresholds, per_feature, start_ms, end_ms
                    )
                    event_id = alert_id(self.stream, entities[i], end, "regime_change")
                    events.append(
                        replace(
                            last, id=event_id, status="regime_change", resolves=state.incident[-1], ends=state.incident
                        )
                    )
                    # A clean slate: the new regime's first anomalies must not count old ones.
                    self._state[slot] = _EntityState(
                        resolved_at_ms=state.resolved_at_ms, peak=state.peak, peak_severity=state.peak_severity
                    )
                    self.regime_changes.append(i)
                    rebased.add(slot)
                    ids.append(None)
                    continue
            ids.append(state.active_id)
        return events, ids

    def _alert(
        self,
        i: int,
        entity: str,
        severity: int,
        scores: np.ndarray,
        thresholds: np.ndarray,
        per_feature: np.ndarray,
        start_ms: np.ndarray,
        end_ms: np.ndarray,
    ) -> Alert:
        errors = per_feature[i]
        top = np.argsort(-errors, kind="stable")[: self.config.top_features]
        end = int(end_ms[i])
        return Alert(
            id=alert_id(self.stream, entity, end),
            status="firing",
            stream=self.stream,
            entity=entity,
            severity=SEVERITY_NAMES[severity],
            window_start_ms=int(start_ms[i]),
            window_end_ms=end,
            score=float(scores[i]),
            threshold=float(thresholds[i]),
            top_features=tuple((self.features[j], float(errors[j])) for j in top),
            model_version=self.model_version,
        )


# --- sinks -------------------------------------------------------------------------------


class Sink(Protocol):
    def emit(self, alerts: Sequence[Alert]) -> None: ...

    def close(self) -> None: ...


class LogSink:
    """Each alert as one JSON line on the `detector.alerts` logger."""

    def emit(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            log.warning(json.dumps(alert.to_dict(), allow_nan=False))

    def close(self) -> None:
        pass


class JsonLinesSink:
    """Each alert as one JSON line in a file (flushed per batch)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("w")

    def emit(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            self._file.write(json.dumps(alert.to_dict(), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
