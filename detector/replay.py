"""`detector replay` and `detector train`: pushing a file through the daemon's pipeline.

Replay reads the whole file, optionally trains on the first rows of every entity (the
unsupervised online protocol of benchmarks such as NAB), then scores the rest with exactly
the `Pipeline` the daemon uses, and writes one output row per input row.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.alerts import Alert, JsonLinesSink, LogSink, Sink
from detector.config import Config, FileInput, Stream
from detector.errors import InputError
from detector.model import Checkpoint, load_checkpoint, save_checkpoint
from detector.pipeline import Pipeline
from detector.source import RecordDecoder, Rejection, SampleBatch, format_timestamps, parse_timestamp, read_file
from detector.store import stream_checkpoint
from detector.train import fit

log = logging.getLogger(__name__)


@dataclass
class TrainSplit:
    """Which leading rows of each entity train the model: a count, a fraction, or a time."""

    rows: int | None = None
    fraction: float | None = None
    until_ms: int | None = None

    @staticmethod
    def parse(train_rows: str | None, train_until: str | None) -> TrainSplit | None:
        if train_rows is None and train_until is None:
            return None
        if train_rows is not None and train_until is not None:
            raise InputError("give --train-rows or --train-until, not both")
        if train_until is not None:
            until = parse_timestamp(train_until)
            if until is None:
                raise InputError(f"--train-until: cannot parse {train_until!r} as a timestamp")
            return TrainSplit(until_ms=until)
        assert train_rows is not None
        text = train_rows.strip()
        try:
            if text.endswith("%"):
                fraction = float(text[:-1]) / 100.0
                if not 0 < fraction < 1:
                    raise ValueError
                return TrainSplit(fraction=fraction)
            rows = int(text)
            if rows < 1:
                raise ValueError
            return TrainSplit(rows=rows)
        except ValueError:
            raise InputError(
                f"--train-rows: expected a positive row count or a percentage, got {train_rows!r}"
            ) from None

    def mask(self, samples: SampleBatch) -> np.ndarray:
        """True for the rows that train: the leading rows of each entity."""
        if self.until_ms is not None:
            return np.asarray(samples.timestamps < self.until_ms)
        _, codes, counts = np.unique(
            np.asarray(samples.entities, dtype=object), return_inverse=True, return_counts=True
        )
        order = np.argsort(codes, kind="stable")
        rank = np.empty(len(codes), np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank[order] = np.arange(len(codes)) - np.repeat(starts, counts)
        limit = counts[codes] * self.fraction if self.fraction is not None else np.full(len(codes), self.rows)
        return np.asarray(rank < np.floor(limit))


@dataclass
class Summary:
    rows: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejected_rows: dict[str, list[int]] = field(default_factory=dict)
    train_rows: int = 0
    windows: int = 0
    anomalous_windows: int = 0
    firing: int = 0
    resolved: int = 0
    regime_changes: int = 0
    retrainings: Counter[str] = field(default_factory=Counter)  # by outcome
    checkpoint_version: str = ""

    def reject(self, rejections: Sequence[Rejection]) -> None:
        for r in rejections:
            self.rejected[r.reason] += 1
            self.rejected_rows.setdefault(r.reason, []).append(r.position)

    def lines(self) -> list[str]:
        out = [
            f"rows read: {self.rows} (training: {self.train_rows}, rejected: {sum(self.rejected.values())})",
            f"windows scored: {self.windows}, anomalous: {self.anomalous_windows}",
            f"alerts: {self.firing} firing, {self.resolved} resolved"
            + (f", {self.regime_changes} regime change(s)" if self.regime_changes else "")
            + f" (model {self.checkpoint_version})",
        ]
        if self.retrainings:
            out.append("retrainings: " + ", ".join(f"{n} {o}" for o, n in sorted(self.retrainings.items())))
        for reason, count in sorted(self.rejected.items()):
            rows = self.rejected_rows[reason]
            shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            out.append(f"rejected {reason}: {count} (rows {shown})")
        return out


def read_samples(
    stream_name: str, stream: Stream, path: Path, summary: Summary | None = None
) -> tuple[SampleBatch, list[Rejection]]:
    """Decode a whole file with the stream's mapping."""
    fmt = stream.input.format if isinstance(stream.input, FileInput) else "auto"
    decoder = RecordDecoder(stream.mapping, default_entity=stream_name)
    n_features = len(stream.mapping.features)
    batches, rejections = [], []
    for batch, rejected in read_file(path, decoder, n_features, fmt):
        batches.append(batch)
        rejections.extend(rejected)
    samples = SampleBatch.concat(batches, n_features)
    if summary is not None:
        summary.rows += len(samples) + len(rejections)
        summary.reject(rejections)
    for r in rejections[:5]:
        log.warning("%s row %d rejected (%s): %s", path, r.position, r.reason, r.detail)
    if len(rejections) > 5:
        log.warning("%s: %d rows rejected in all; the summary lists them by reason", path, len(rejections))
    return samples, rejections


def input_path(stream: Stream, given: Path | None) -> Path:
    if given is not None:
        return given
    if isinstance(stream.input, FileInput):
        return stream.input.path
    raise InputError("the stream reads from Kafka; give --input FILE")


def train_file(
    config: Config, stream_name: str | None, data: Path | None, out: Path | None, progress: bool = True
) -> tuple[Checkpoint, Summary]:
    """`detector train`: fit on a whole file and save the checkpoint (to `out` when given)."""
    name, stream = config.stream(stream_name)
    summary = Summary()
    samples, _ = read_samples(name, stream, input_path(stream, data), summary)
    skipped: list[Rejection] = []
    ckpt = fit(name, stream, samples, progress=progress, rejected=skipped)
    if out is not None:
        save_checkpoint(out, ckpt)
    summary.reject(skipped)
    summary.train_rows = len(samples) - len(skipped)
    summary.checkpoint_version = ckpt.version
    return ckpt, summary


def replay_file(
    config: Config,
    stream_name: str | None,
    data: Path | None,
    out: Path,
    alerts_path: Path | None = None,
    checkpoint: Path | None = None,
    split: TrainSplit | None = None,
    save_to: Path | None = None,
    batch_rows: int = 1024,
    progress: bool = True,
    log_alerts: bool = False,
) -> tuple[Summary, list[Alert]]:
    """`detector replay`: score a file (training first on its leading rows when `split`)."""
    name, stream = config.stream(stream_name)
    summary = Summary()
    samples, rejections = read_samples(name, stream, input_path(stream, data), summary)
    train_mask = np.zeros(len(samples), bool)
    if split is not None:
        train_mask = split.mask(samples)
        summary.train_rows = int(train_mask.sum())
    if split is not None and checkpoint is None:
        ckpt = fit(name, stream, samples.take(train_mask), progress=progress)
        if save_to is not None:
            save_checkpoint(save_to, ckpt)
    else:
        # With both a checkpoint and a split, the split rows only warm the windows up.
        if checkpoint is None and stream.checkpoint is None and stream.model_store is None:
            raise InputError(f"stream {name} has no checkpoint or model_store; give --checkpoint or --train-rows")
        ckpt = load_checkpoint(checkpoint, stream) if checkpoint is not None else stream_checkpoint(stream)
    summary.checkpoint_version = ckpt.version

    pipeline = Pipeline(name, stream, ckpt, config.scoring)
    if pipeline.retrainer is not None and stream.retraining.every_windows is not None:
        # Retraining is due at batch boundaries only: batches of at most `every_windows` rows keep
        # it within one batch of the setting (with 1,024-row batches, 500 and 1,000 were the same).
        batch_rows = min(batch_rows, stream.retraining.every_windows)
    sinks: list[Sink] = [JsonLinesSink(alerts_path)] if alerts_path is not None else []
    if log_alerts:
        sinks.append(LogSink())
    n = len(samples)
    score = np.full(n, np.nan)
    threshold = np.full(n, np.nan)
    anomaly = np.zeros(n, bool)
    alert_ids: list[str | None] = [None] * n
    all_alerts: list[Alert] = []
    late: list[Rejection] = []
    try:
        # Entities are independent, so all training rows first, then the rest, both in file
        # order, gives the same result as interleaving them. The fill pass rejects the same
        # out-of-order training rows that `fit` skipped, so they are reported from here.
        filled = pipeline.process(samples.take(train_mask), mode="fill")
        late.extend(filled.rejected)
        summary.train_rows -= len(filled.rejected)
        scored = np.flatnonzero(~train_mask)
        for start in range(0, len(scored), batch_rows):
            rows = scored[start : start + batch_rows]
            result = pipeline.process(samples.take(rows), mode="alert")
            score[rows] = result.score
            threshold[rows] = result.threshold
            anomaly[rows] = result.severity != 0
            for i, row in enumerate(rows):
                alert_ids[row] = result.alert_ids[i]
            late.extend(result.rejected)
            summary.windows += result.windows
            summary.anomalous_windows += int((result.severity != 0).sum())
            for sink in sinks:
                sink.emit(result.alerts)
            all_alerts.extend(result.alerts)
    finally:
        for sink in sinks:
            sink.close()
    late.sort(key=lambda r: r.position)
    summary.reject(late)
    summary.firing = sum(a.status == "firing" for a in all_alerts)
    summary.resolved = sum(a.status == "resolved" for a in all_alerts)
    summary.regime_changes = sum(a.status == "regime_change" for a in all_alerts)
    if pipeline.retrainer is not None:
        # Retrained in line at batch boundaries: the summary names the model that finished.
        summary.retrainings.update(pipeline.retrainer.outcomes)
        summary.checkpoint_version = pipeline.checkpoint.version
    write_scores(out, samples, score, threshold, anomaly, alert_ids, rejections + late, train_mask)
    return summary, all_alerts


def write_scores(
    out: Path,
    samples: SampleBatch,
    score: np.ndarray,
    threshold: np.ndarray,
    anomaly: np.ndarray,
    alert_ids: list[str | None],
    rejections: list[Rejection],
    train_mask: np.ndarray,
) -> None:
    """One row per input row, in input order; rejected rows carry their reason."""
    rows: list[tuple[int, list[str]]] = []
    late = {r.position: r.reason for r in rejections}
    stamps = format_timestamps(samples.timestamps)
    for i in range(len(samples)):
        pos = int(samples.positions[i])
        if pos in late:
            continue
        has_score = not np.isnan(score[i])
        rows.append(
            (
                pos,
                [
                    str(pos),
                    samples.entities[i],
                    stamps[i],
                    f"{score[i]:.6g}" if has_score else "",
                    f"{threshold[i]:.6g}" if has_score else "",
                    "1" if anomaly[i] else "0",
                    alert_ids[i] or "",
                    "train" if train_mask[i] else "score",
                    "",
                ],
            )
        )
    for r in rejections:
        rows.append((r.position, [str(r.position), "", "", "", "", "0", "", "", r.reason]))
    rows.sort(key=lambda item: item[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["row", "entity", "timestamp", "score", "threshold", "is_anomaly", "alert_id", "phase", "rejected"]
        )
        writer.writerows(r for _, r in rows)


def print_summary(summary: Summary) -> None:
    for line in summary.lines():
        print(line, file=sys.stderr)
