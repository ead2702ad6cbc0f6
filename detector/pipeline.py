"""The source-agnostic core: samples → windows → batched scores → thresholds → alerts.

The daemon and `detector replay` both push batches through `Pipeline.process`, so a file
and a Kafka topic with the same records give the same scores and the same alerts. The
result does not depend on how the records are cut into batches, with two exceptions that
take effect at the next batch boundary: a retrained model (`retraining`) and an entity's
re-based normalization after a regime change (`regime`).

With `window.idle_evict_after_s`, an entity idle that long in event time is evicted (see
`detector.window`): its threshold and alert state are cleared with its window, an open
incident ends with a `resolved` event (reason `idle`) placed in the event order where the
eviction happened, and `BatchResult.evicted` counts evictions (the daemon's
`detector_entities_evicted_total`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from detector.alerts import Alert, AlertPolicy, DailyRepeats
from detector.config import Scoring, Stream
from detector.drift import ScoreDrift
from detector.engine import Scorer, make_scorer
from detector.errors import CheckpointError
from detector.metrics import Metrics
from detector.model import AutoencoderEnsemble, Checkpoint, check_layout, check_same_inputs
from detector.retrain import Retrainer, TrainingProcess
from detector.seasonality import with_calendar
from detector.source import Rejection, SampleBatch
from detector.store import CheckpointStore
from detector.threshold import EntityBaselines, SeverityRules
from detector.window import Evicted, ReadyWindows, WindowStore

log = logging.getLogger(__name__)

# fill: only fill windows (history before the scored part, e.g. a training period);
# score: also score and update threshold state, but raise no alerts (catching up on history);
# alert: everything.
Mode = Literal["fill", "score", "alert"]


@dataclass
class BatchResult:
    """What happened to each row of a batch, in batch order.

    Shape:
        score, threshold: (N,) float64, NaN where the row completed no window
        severity: (N,) int8, NONE where the row completed no window
        alert_ids: N entries, the firing alert the row's entity was in after the row
    """

    score: np.ndarray
    threshold: np.ndarray
    severity: np.ndarray
    alert_ids: list[str | None]
    rejected: list[Rejection]
    alerts: list[Alert]
    windows: int
    evicted: int = 0  # entities evicted as idle (see `detector.window`)
    repeats: int = 0  # anomalous windows that repeated yesterday's (see `detector.alerts.DailyRepeats`)


class Pipeline:
    """One stream's windows, model, thresholds and alert state. Not thread safe."""

    def __init__(
        self,
        name: str,
        stream: Stream,
        checkpoint: Checkpoint,
        scoring: Scoring | None = None,
        trainer: TrainingProcess | None = None,
        metrics: Metrics | None = None,
        model_store: CheckpointStore | None = None,
    ) -> None:
        """With `stream.retraining.enabled`, the pipeline retrains its model (see
        `detector.retrain`): in the background in `trainer` (the daemon's; it outlives the
        pipeline), else in line at batch boundaries (replay: reproducible). `metrics` counts
        retrainings; `model_store` receives and promotes the accepted models (the daemon
        passes the stream's; a replay leaves the store alone)."""
        self.name = name
        self.stream = stream
        self.checkpoint = checkpoint
        self.scoring = scoring or Scoring()
        if scoring is not None and scoring.threads is not None:
            torch.set_num_threads(scoring.threads)
        if checkpoint.layout_hash != stream.layout_hash():
            log.warning(
                "stream %s: checkpoint %s was trained with different normalization or model settings "
                "than the config now has; scoring with the checkpoint's",
                name,
                checkpoint.version,
            )
        idle_s = stream.window.idle_evict_after_s
        self.windows = WindowStore(
            stream.window.size,
            stream.window.stride,
            len(checkpoint.features),
            checkpoint.scaler,
            idle_evict_ms=None if idle_s is None else round(idle_s * 1000),
        )
        # The model may take calendar inputs (time of day, of week) after the stream's features
        # (decided at training); they are appended to each batch here, and left out of alerts'
        # top features.
        self.n_features = len(stream.mapping.feature_names)
        self.calendar = checkpoint.features[self.n_features :]
        self.rules = SeverityRules(stream.thresholds, checkpoint.errors)
        features = checkpoint.features[: self.n_features]
        self.policy = AlertPolicy(name, stream.alerts, features, checkpoint.version, stream.regime)
        repeats = stream.alerts.daily_repeats
        self.repeats = DailyRepeats(repeats) if repeats is not None else None
        self.baselines = EntityBaselines(
            stream.cold_start.warmup_windows, stream.regime.calibration_windows, checkpoint.errors
        )
        self.retrainer: Retrainer | None = None
        if stream.retraining.enabled and isinstance(checkpoint.model, AutoencoderEnsemble):
            raise CheckpointError(
                f"stream {name}: retraining.enabled fine-tunes one model, but checkpoint {checkpoint.version} is an "
                f"ensemble of {checkpoint.model.spec.ensemble}; disable retraining or train with model.ensemble: 1"
            )
        if stream.retraining.enabled:
            self.retrainer = Retrainer(
                name, stream, len(checkpoint.features), trainer, metrics, model_store, prepare=self._warm_scorer
            )
        self.drift = ScoreDrift(checkpoint.errors.sorted_errors)
        self.scorer = self._warm_scorer(checkpoint)

    def _warm_scorer(self, checkpoint: Checkpoint) -> Scorer:
        """A scorer for `checkpoint` that has scored once already: an ONNX Runtime session
        costs ≈ 4 ms to build and its first pass twice a later one, which a live batch would
        otherwise pay. The retrainer calls this in its worker, off the scoring path."""
        scorer = make_scorer(checkpoint.model, self.stream.window.size, self.scoring)
        scorer.score(np.zeros((1, self.stream.window.size, len(checkpoint.features)), np.float32))
        return scorer

    def reconfigure(self, stream: Stream) -> None:
        """Take new thresholds and alert policy. Windows are kept; so is the alert state (an
        open incident still gets its resolve, see `AlertPolicy.reconfigured`) and the state
        of each dynamic threshold whose rule did not change, and of `alerts.daily_repeats` if
        unchanged. A changed rule starts afresh."""
        repeats = stream.alerts.daily_repeats
        if repeats != self.stream.alerts.daily_repeats:  # a changed setting starts afresh, like a rule
            self.repeats = DailyRepeats(repeats) if repeats is not None else None
        self.stream = stream
        self.rules = SeverityRules(stream.thresholds, self.checkpoint.errors, previous=self.rules)
        self.policy = self.policy.reconfigured(stream.alerts)

    def swap_checkpoint(
        self, checkpoint: Checkpoint, scorer: Scorer | None = None, score_scale: float | None = None
    ) -> None:
        """Score with `checkpoint` from the next batch on (call it between batches).

        Windows are kept (they hold raw values and are normalized with the new scaler), and
        so is the alert state: an open incident keeps its id and resolves under the new model;
        new events carry the new version. Thresholds are refit from the new checkpoint's error
        statistics. Dynamic ones learned the old model's score scale: with `score_scale`, the
        ratio of the new model's scores to the old one's on the same windows (a retraining
        measures it on its held-out windows), each entity keeps its statistics scaled by it;
        without it (a model from elsewhere) they start afresh. The drift sample restarts.
        Raises CheckpointError, changing nothing, when the checkpoint's features or window
        size do not fit the stream. `scorer`: one already built for `checkpoint` (see
        `_warm_scorer`).
        """
        check_layout(checkpoint, self.stream, f"version {checkpoint.version}")
        check_same_inputs(checkpoint, self.checkpoint)
        if scorer is None:
            scorer = self._warm_scorer(checkpoint)
        self.checkpoint = checkpoint
        self.scorer = scorer
        self.windows.rescale(checkpoint.scaler)
        if score_scale is not None and math.isfinite(score_scale) and score_scale > 0:
            self.rules = SeverityRules.carried(self.rules, checkpoint.errors, score_scale)
        else:
            self.rules = SeverityRules(self.stream.thresholds, checkpoint.errors)
        self.baselines.refit(checkpoint.errors)
        self.policy = self.policy.reconfigured(self.stream.alerts)
        self.policy.model_version = checkpoint.version
        self.drift = ScoreDrift(checkpoint.errors.sorted_errors)

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait at most `timeout_s` for a retraining in progress (its result is dropped); the
        pipeline is not used afterwards."""
        if self.retrainer is not None:
            self.retrainer.close(timeout_s)

    def process(self, batch: SampleBatch, mode: Mode = "alert") -> BatchResult:
        if self.retrainer is not None:
            # A batch boundary: the only place the model may change.
            finished = self.retrainer.step(self.checkpoint)
            if finished is not None and finished.checkpoint is not None:
                scale = finished.candidate_error / finished.current_error if finished.current_error > 0 else None
                self.swap_checkpoint(finished.checkpoint, finished.prepared, scale)
        batch = self.model_inputs(batch)
        n = len(batch)
        score = np.full(n, np.nan)
        threshold = np.full(n, np.nan)
        severity = np.zeros(n, np.int8)
        alert_ids: list[str | None] = [None] * n
        ready, late = self.windows.append(batch, drop_out_of_order=self.stream.mapping.out_of_order == "drop")
        rejected = [
            Rejection(int(batch.positions[i]), "out_of_order", "timestamp older than the entity's newest sample")
            for i in late
        ]
        alerts: list[Alert] = []
        evicted = self.windows.evicted
        if mode == "fill" or len(ready) == 0:
            alerts = self._forget(evicted, ready, alerts, mode)
            return BatchResult(score, threshold, severity, alert_ids, rejected, alerts, 0, len(evicted))

        scores, per_feature = self.scorer.score(ready.values)
        self.drift.add(scores)
        sev = self.baselines.apply(self.rules, ready.slots, scores)
        repeats = 0
        if self.repeats is not None:
            judged = sev.severity
            sev.severity = self.repeats.apply(ready.slots, ready.end_ms, scores, judged)
            repeats = int(np.count_nonzero(judged != sev.severity))
        rows = ready.rows
        score[rows] = scores
        threshold[rows] = sev.threshold
        severity[rows] = sev.severity
        if mode == "alert":
            entities = [self.windows.entity_of[s] for s in ready.slots]
            alerts, ids = self.policy.update(
                ready.slots,
                entities,
                sev.severity,
                scores,
                sev.threshold,
                per_feature[:, : self.n_features],
                ready.start_ms,
                ready.end_ms,
                sev.cold,
            )
            for row, alert in zip(rows, ids, strict=True):
                alert_ids[row] = alert
            if self.policy.regime is not None:
                self._follow_regimes(ready.slots, ready.values, ids)
        if self.retrainer is not None:
            self.retrainer.observe(ready.slots, ready.values, sev.severity != 0, ready.end_ms)
        alerts = self._forget(evicted, ready, alerts, mode)
        return BatchResult(score, threshold, severity, alert_ids, rejected, alerts, len(ready), len(evicted), repeats)

    def model_inputs(self, batch: SampleBatch) -> SampleBatch:
        """`batch` with the columns the model takes: the stream's features, then the calendar
        inputs the model was trained with."""
        return with_calendar(batch, self.calendar)

    def _forget(self, evicted: Evicted, ready: ReadyWindows, alerts: list[Alert], mode: Mode) -> list[Alert]:
        """Clear the threshold and alert state of the slots `WindowStore.append` just evicted
        (idle entities), before the store reuses them. In alert mode, return `alerts` with the
        resolve of each evicted open incident (`AlertPolicy.evict`) placed where its entity was
        evicted: after the events of the batch rows before, so an entity that came back within
        the batch has its old incident resolved before its new events, whatever the batch cut.
        """
        placed: list[tuple[int, Alert]] = []
        for slot, entity, last, row in zip(
            evicted.slots.tolist(), evicted.entities, evicted.last_ms.tolist(), evicted.rows.tolist(), strict=True
        ):
            self.rules.restart(slot)
            self.baselines.forget(slot)
            if self.repeats is not None:
                self.repeats.forget(slot)
            placed += [(row, alert) for alert in self.policy.evict([slot], [entity], [last])]
        if mode != "alert" or not placed:
            return alerts
        # Events come in window order and each names its window's entity and end: match them
        # to the windows to learn the batch row each came from (a rare path: evictions of open
        # incidents only).
        entity_of = self.windows.entity_of
        event_rows, j = [], 0
        for alert in alerts:
            while j < len(ready) - 1 and not (
                entity_of[int(ready.slots[j])] == alert.entity and int(ready.end_ms[j]) == alert.window_end_ms
            ):
                j += 1
            event_rows.append(int(ready.rows[j]))
        # Evictions at the same place in entity order: slots, and so the order of `evicted`,
        # depend on the batch cut.
        merged = [(row, 0, alert.entity, k, alert) for k, (row, alert) in enumerate(placed)]
        merged += [(row, 1, "", k, alert) for k, (row, alert) in enumerate(zip(event_rows, alerts, strict=True))]
        return [alert for *_, alert in sorted(merged, key=lambda item: item[:4])]

    def _follow_regimes(self, slots: np.ndarray, values: np.ndarray, ids: list[str | None]) -> None:
        """Re-base each entity whose incident the policy just ended as a regime change: its
        windows are centred on its level during the incident from the next batch on, and its
        thresholds restart and calibrate (`EntityBaselines.start_regime`).

        Shape:
            slots: (R,); values: (R, W, D) normalized windows
        """
        center, scale = self.windows.params(slots)
        means = values.mean(axis=1) * scale + center
        firing = np.fromiter((i is not None for i in ids), np.bool_, len(ids))
        skip = -(-self.stream.window.size // self.stream.window.stride)
        levels = self.baselines.incident_levels(slots, means, firing, self.policy.regime_changes, skip)
        for row, level in levels.items():
            slot = int(slots[row])
            level[self.n_features :] = center[row, self.n_features :]  # the calendar has no level to shift
            self.windows.recentre(slot, level)
            self.baselines.start_regime(slot, self.rules)
            log.info("stream %s: entity %s changed regime; re-based", self.name, self.windows.entity_of[slot])
