"""The source-agnostic core: samples → windows → batched scores → thresholds → alerts.

The daemon and `detector replay` both push batches through `Pipeline.process`, so a file
and a Kafka topic with the same records give the same scores and the same alerts. The
result does not depend on how the records are cut into batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from detector.alerts import Alert, AlertPolicy
from detector.config import Scoring, Stream
from detector.model import Checkpoint, score_windows
from detector.source import Rejection, SampleBatch
from detector.threshold import SeverityRules
from detector.window import WindowStore

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


class Pipeline:
    """One stream's windows, model, thresholds and alert state. Not thread safe."""

    def __init__(self, name: str, stream: Stream, checkpoint: Checkpoint, scoring: Scoring | None = None) -> None:
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
        self.windows = WindowStore(
            stream.window.size, stream.window.stride, len(checkpoint.features), checkpoint.scaler
        )
        self.rules = SeverityRules(stream.thresholds, checkpoint.errors)
        self.policy = AlertPolicy(name, stream.alerts, checkpoint.features, checkpoint.version)

    def reconfigure(self, stream: Stream) -> None:
        """Take new thresholds and alert policy. Windows are kept; so is the alert state (an
        open incident still gets its resolve, see `AlertPolicy.reconfigured`) and the state
        of each dynamic threshold whose rule did not change. A changed rule starts afresh."""
        self.stream = stream
        self.rules = SeverityRules(stream.thresholds, self.checkpoint.errors, previous=self.rules)
        self.policy = self.policy.reconfigured(stream.alerts)

    def process(self, batch: SampleBatch, mode: Mode = "alert") -> BatchResult:
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
        if mode == "fill" or len(ready) == 0:
            return BatchResult(score, threshold, severity, alert_ids, rejected, alerts, 0)

        model = self.checkpoint.model
        scores, per_feature = score_windows(
            model, ready.values, self.scoring.batch_windows, model.spec.score_last_steps
        )
        sev = self.rules.apply(ready.slots, scores)
        rows = ready.rows
        score[rows] = scores
        threshold[rows] = sev.threshold
        severity[rows] = sev.severity
        if mode == "alert":
            entities = [self.windows.entity_of[s] for s in ready.slots]
            alerts, ids = self.policy.update(
                ready.slots, entities, sev.severity, scores, sev.threshold, per_feature, ready.start_ms, ready.end_ms
            )
            for row, alert in zip(rows, ids, strict=True):
                alert_ids[row] = alert
        return BatchResult(score, threshold, severity, alert_ids, rejected, alerts, len(ready))
