"""`detector evaluate smd`: the Server Machine Dataset (multivariate system metrics).

For each machine, a model is trained on `train/<machine>.txt` and `test/<machine>.txt` is
scored through the daemon's `Pipeline` (windows → model → thresholds → alert policy), then
compared with `test_label/` (one 0/1 per row) and `interpretation_label/` (the dims that
caused each anomaly).

The stream: SMD has no config of its own. The config's single stream (by default
`configs/system-metrics.yaml`) is used with its mapping replaced by 38 features named
`dim1`..`dim38`; window, normalization, model, training, thresholds and alert policy are the
config's, unchanged. Rows are one minute apart (timestamps = row index in minutes, the test
rows continuing after the training rows), and the entity is the machine name.

Two outputs are scored, each as a 0/1 flag per test row:

- `windows`: the row's window is anomalous, i.e. its score is above the pipeline's warning
  threshold (the config's rule; for a dynamic rule the population threshold from the
  training split's held-out windows, then each entity's own online statistics; no label is
  ever seen). This is what `is_anomaly` says in `detector replay`'s scores.
- `alerts`: an alert is active on the row (from the alert that fires to its resolve).

Metrics, for either flag:

- point-wise precision/recall/F1 over rows;
- point-adjusted F1 (as in OmniAnomaly and its successors): every row of a labeled segment
  counts as flagged when any row in it is; it flatters every detector;
- event-wise: a detection is the first row of a run of flagged rows (for `alerts`, an alert
  start); a labeled segment is found when a detection lies inside it; precision is the
  share of detections that lie inside a segment;
- top-3 hit: for each found segment, whether a true cause dim (`interpretation_label`) is
  among the 3 features with the highest reconstruction error in the window of the segment's
  first detection (for `alerts`, exactly the alert's `top_features`).

The oracle: the static threshold on the raw window score with the best point-wise (and,
separately, point-adjusted) F1 on the test labels, per machine. It peeks at the labels and
is only an upper bound for any threshold rule on these scores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np

from detector.config import Feature, Mapping, Stream, load_config
from detector.errors import InputError
from detector.evaluate import run_jobs

log = logging.getLogger(__name__)

SMD_MACHINES = ("machine-1-6", "machine-2-1", "machine-2-7", "machine-3-3")
SMD_FEATURES = 38
ROW_MS = 60_000  # one row per minute
TOP_K = 3
OUTPUTS = ("windows", "alerts")  # what is flagged per row: see the module docstring


# --- metrics --------------------------------------------------------------------------------


def segments(labels: np.ndarray) -> np.ndarray:
    """The labeled anomaly segments: maximal runs of 1s, as (first, last) rows, inclusive.

    Shape:
        labels: (N,) bool or 0/1; returns (S, 2) int64
    """
    padded = np.concatenate([[0], np.asarray(labels, np.int8), [0]])
    edges = np.diff(padded)
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1], axis=1).astype(np.int64)


def detection_rows(flagged: np.ndarray) -> np.ndarray:
    """The first row of each run of flagged rows (a detection event).

    Shape:
        flagged: (N,) bool; returns (K,) int64
    """
    return segments(flagged)[:, 0]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@dataclass(frozen=True)
class PointScores:
    """Row counts and precision/recall/F1 (0 where undefined: nothing flagged or nothing labeled)."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        return _f1(self.precision, self.recall)

    def __add__(self, other: PointScores) -> PointScores:
        return PointScores(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def as_dict(self) -> dict[str, float]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision, "recall": self.recall,
                "f1": self.f1}  # fmt: skip


def point_scores(labels: np.ndarray, flagged: np.ndarray) -> PointScores:
    """Point-wise: each row is one prediction.

    Shape:
        labels, flagged: (N,) bool
    """
    y, p = np.asarray(labels, bool), np.asarray(flagged, bool)
    return PointScores(int((y & p).sum()), int((~y & p).sum()), int((y & ~p).sum()))


def point_adjust(labels: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """Flag every row of each labeled segment that has at least one flagged row.

    Shape:
        labels, flagged: (N,) bool; returns (N,) bool
    """
    out = np.asarray(flagged, bool).copy()
    for first, last in segments(labels):
        if out[first : last + 1].any():
            out[first : last + 1] = True
    return out


def point_adjusted_scores(labels: np.ndarray, flagged: np.ndarray) -> PointScores:
    """Point-adjusted counts: `point_scores` after `point_adjust`."""
    return point_scores(labels, point_adjust(labels, flagged))


@dataclass(frozen=True)
class EventScores:
    """Segments found among those labeled; detections inside a segment among all detections."""

    segments: int
    found: int
    detections: int
    true_detections: int

    @property
    def recall(self) -> float:
        return self.found / self.segments if self.segments else 0.0

    @property
    def precision(self) -> float:
        return self.true_detections / self.detections if self.detections else 0.0

    @property
    def f1(self) -> float:
        return _f1(self.precision, self.recall)

    def __add__(self, other: EventScores) -> EventScores:
        return EventScores(
            self.segments + other.segments,
            self.found + other.found,
            self.detections + other.detections,
            self.true_detections + other.true_detections,
        )

    def as_dict(self) -> dict[str, float]:
        return {"segments": self.segments, "found": self.found, "detections": self.detections,
                "true_detections": self.true_detections, "recall": self.recall, "precision": self.precision,
                "f1": self.f1}  # fmt: skip


def segment_of_rows(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row, the index of the labeled segment holding it, or -1.

    Shape:
        labels: (N,); rows: (K,) int; returns (K,) int64
    """
    segs = segments(labels)
    rows = np.asarray(rows, np.int64)
    k = np.searchsorted(segs[:, 0], rows, side="right") - 1
    inside = (k >= 0) & (rows <= segs[np.maximum(k, 0), 1]) if len(segs) else np.zeros(len(rows), bool)
    return np.where(inside, k, -1)


def event_scores(labels: np.ndarray, detections: np.ndarray) -> EventScores:
    """Event-wise: a segment is found when a detection row lies inside it.

    Shape:
        labels: (N,); detections: (K,) int rows of the detections (e.g. `detection_rows(flagged)`)
    """
    seg = segment_of_rows(labels, detections)
    return EventScores(len(segments(labels)), len(np.unique(seg[seg >= 0])), len(seg), int((seg >= 0).sum()))


@dataclass(frozen=True)
class CauseHits:
    """Found segments with cause labels, and those whose top features hold a true cause."""

    segments: int
    hits: int

    @property
    def rate(self) -> float:
        return self.hits / self.segments if self.segments else 0.0

    def __add__(self, other: CauseHits) -> CauseHits:
        return CauseHits(self.segments + other.segments, self.hits + other.hits)

    def as_dict(self) -> dict[str, float]:
        return {"segments": self.segments, "hits": self.hits, "rate": self.rate}


def top_feature_hits(
    labels: np.ndarray,
    detections: np.ndarray,
    top_features: Sequence[Sequence[int]],
    causes: Sequence[tuple[int, int, frozenset[int]]],
) -> CauseHits:
    """For each segment with a detection, whether the top features of its first detection
    include a cause dim of a cause entry overlapping the segment.

    `top_features[i]` are the 0-based feature indices reported for `detections[i]`; `causes`
    are (first, last, 0-based dims) with inclusive rows. A found segment no cause entry
    overlaps is left out.
    """
    seg = segment_of_rows(labels, detections)
    bounds = segments(labels)
    hits, counted = 0, 0
    for k in np.unique(seg[seg >= 0]):
        first_detection = int(np.flatnonzero(seg == k)[0])
        lo, hi = bounds[k]
        true = frozenset().union(*(dims for a, b, dims in causes if a <= hi and b >= lo))
        if not true:
            continue
        counted += 1
        hits += bool(true & set(top_features[first_detection]))
    return CauseHits(counted, hits)


@dataclass(frozen=True)
class OracleF1:
    """The best static threshold on the score for F1, found by looking at the labels."""

    threshold: float
    scores: PointScores


def best_f1_threshold(labels: np.ndarray, score: np.ndarray, adjusted: bool = False) -> OracleF1:
    """The threshold t (flag rows with score ≥ t) with the best point-wise F1, or with the best
    point-adjusted F1 when `adjusted`. Every distinct score is tried; NaN scores never flag.

    Shape:
        labels, score: (N,)
    """
    y = np.asarray(labels, bool)
    s = np.where(np.isnan(score), -np.inf, np.asarray(score, np.float64))
    candidates = np.unique(s[np.isfinite(s)])[::-1]  # descending
    if len(candidates) == 0:
        return OracleF1(np.inf, PointScores(0, 0, int(y.sum())))
    normal = np.sort(s[~y])
    # Rows with score ≥ t: len - searchsorted(left).
    fp = len(normal) - np.searchsorted(normal, candidates, side="left")
    if adjusted:
        segs = segments(y)
        seg_max = np.array([s[a : b + 1].max() for a, b in segs]) if len(segs) else np.zeros(0)
        seg_len = (segs[:, 1] - segs[:, 0] + 1) if len(segs) else np.zeros(0, np.int64)
        order = np.argsort(seg_max)
        cum = np.concatenate([[0], np.cumsum(seg_len[order][::-1])])  # lengths of the highest-max segments
        found = len(seg_max) - np.searchsorted(seg_max[order], candidates, side="left")
        tp = cum[found]
    else:
        anomalous = np.sort(s[y])
        tp = len(anomalous) - np.searchsorted(anomalous, candidates, side="left")
    fn = int(y.sum()) - tp
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = int(np.argmax(f1))  # the first (highest) threshold among equals
    return OracleF1(float(candidates[best]), PointScores(int(tp[best]), int(fp[best]), int(fn[best])))


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmdMachine:
    """One machine's files.

    Shape:
        train: (N, 38) float32; test: (M, 38) float32; labels: (M,) bool
        causes: (first, last, 0-based dims) per `interpretation_label` line, rows inclusive
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    causes: tuple[tuple[int, int, frozenset[int]], ...]


def _read_matrix(path: Path) -> np.ndarray:
    try:
        values = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise InputError(f"{path}: not rows of comma-separated numbers ({exc})") from None
    if values.shape[1] != SMD_FEATURES:
        raise InputError(f"{path}: {values.shape[1]} columns, expected {SMD_FEATURES}")
    return values


def read_causes(path: Path) -> tuple[tuple[int, int, frozenset[int]], ...]:
    """`interpretation_label` lines `start-end:d1,d2,...`: rows start..end-1 (0-based; the same
    rows as the 1-based inclusive reading start+1..end, which is how they line up with
    `test_label`), dims 1-based in the file, 0-based here."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            span, dims = line.split(":")
            start, end = (int(x) for x in span.split("-"))
            out.append((start, end - 1, frozenset(int(d) - 1 for d in dims.split(",") if d.strip())))
        except ValueError:
            raise InputError(f"{path} line {number}: expected start-end:d1,d2,..., got {line!r}") from None
    return tuple(out)


def load_machine(data_dir: Path, name: str) -> SmdMachine:
    root = data_dir / "smd"
    train = _read_matrix(root / "train" / f"{name}.txt")
    test = _read_matrix(root / "test" / f"{name}.txt")
    label_path = root / "test_label" / f"{name}.txt"
    try:
        labels = np.loadtxt(label_path, dtype=np.int64, ndmin=1).astype(bool)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {label_path}: {exc}") from None
    if len(labels) != len(test):
        raise InputError(f"{label_path}: {len(labels)} labels for {len(test)} test rows")
    cause_path = root / "interpretation_label" / f"{name}.txt"
    causes = read_causes(cause_path) if cause_path.exists() else ()
    return SmdMachine(name, train, test, labels, causes)


# --- one machine through the pipeline ----------------------------------------------------------


def smd_stream(config_path: Path) -> tuple[str, Stream]:
    """The config's single stream with its mapping replaced by `dim1`..`dim38` (no timestamp
    field: the evaluation builds the samples itself). Everything else is the config's."""
    name, stream = load_config(config_path).stream(None)
    features = [Feature(name=f"dim{i}") for i in range(1, SMD_FEATURES + 1)]
    return name, stream.model_copy(update={"mapping": Mapping(entity=[], timestamp=None, features=features)})


@dataclass
class MachineRun:
    """What the pipeline did on one machine's test rows.

    Shape:
        score, threshold: (M,) float64 (NaN where no window was scored)
        anomalous, active: (M,) bool: window above threshold; an alert active after the row
        alert_rows: (A,) int64 rows where an alert started; alert_top: A lists of 0-based dims
        top: (M, 3) int64 the 3 features with the highest error in each row's window (-1 unscored)
    """

    name: str
    score: np.ndarray
    threshold: np.ndarray
    anomalous: np.ndarray
    active: np.ndarray
    alert_rows: np.ndarray
    alert_top: list[list[int]]
    top: np.ndarray
    train_seconds: float
    seconds: float
    epochs: int


def run_machine(config_path: Path, data_dir: Path, name: str, batch_rows: int = 4096) -> MachineRun:
    """Train on the machine's train rows, fill the windows with them, and score the test rows."""
    from detector.pipeline import Pipeline
    from detector.source import SampleBatch
    from detector.train import fit
    from detector.window import WindowStore

    started = time.monotonic()
    machine = load_machine(data_dir, name)
    stream_name, stream = smd_stream(config_path)
    n_train, n_test = len(machine.train), len(machine.test)

    def batch(values: np.ndarray, first_row: int) -> SampleBatch:
        rows = np.arange(first_row, first_row + len(values), dtype=np.int64)
        return SampleBatch([name] * len(values), rows * ROW_MS, values, rows + 1)

    train = batch(machine.train, 0)
    ckpt = fit(stream_name, stream, train, progress=False)
    train_seconds = time.monotonic() - started
    pipeline = Pipeline(stream_name, stream, ckpt)
    pipeline.process(train, mode="fill")
    # A second store over the same rows, for per-feature errors (the pipeline reports them only
    # in alerts): the same windows and model, so the same scores.
    store = WindowStore(stream.window.size, stream.window.stride, len(ckpt.features), ckpt.scaler)
    store.append(pipeline.model_inputs(train))

    score = np.full(n_test, np.nan)
    threshold = np.full(n_test, np.nan)
    anomalous = np.zeros(n_test, bool)
    active = np.zeros(n_test, bool)
    top = np.full((n_test, TOP_K), -1, np.int64)
    alert_rows: list[int] = []
    alert_top: list[list[int]] = []
    index = {f: i for i, f in enumerate(ckpt.features)}
    for start in range(0, n_test, batch_rows):
        chunk = batch(machine.test[start : start + batch_rows], n_train + start)
        result = pipeline.process(chunk, mode="alert")
        rows = slice(start, start + len(chunk))
        score[rows], threshold[rows] = result.score, result.threshold
        anomalous[rows] = result.severity != 0
        active[rows] = [a is not None for a in result.alert_ids]
        for alert in result.alerts:
            if alert.status == "firing" and alert.replaces is None:  # an escalation is no new detection
                alert_rows.append(alert.window_end_ms // ROW_MS - n_train)
                alert_top.append([index[f] for f, _ in alert.top_features])
        ready, _ = store.append(pipeline.model_inputs(chunk))
        if len(ready):
            check, per_feature = pipeline.scorer.score(ready.values)
            if not np.allclose(check, result.score[ready.rows], rtol=1e-5, atol=1e-9):
                raise AssertionError(f"{name}: per-feature pass disagrees with the pipeline's scores")
            per_metric = per_feature[:, :SMD_FEATURES]  # not the time-of-day inputs, if any
            top[start + ready.rows] = np.argsort(-per_metric, axis=1, kind="stable")[:, :TOP_K]
    return MachineRun(
        name,
        score,
        threshold,
        anomalous,
        active,
        np.asarray(alert_rows, np.int64),
        alert_top,
        top,
        train_seconds,
        time.monotonic() - started,
        int(ckpt.training["epochs"]),
    )


# --- evaluation -----------------------------------------------------------------------------


@dataclass
class MachineResult:
    """Every metric of one machine (or of all machines pooled: name `ALL`)."""

    name: str
    rows: int
    point: dict[str, PointScores]
    adjusted: dict[str, PointScores]
    events: dict[str, EventScores]
    causes: dict[str, CauseHits]
    oracle_point: PointScores
    oracle_adjusted: PointScores
    oracle_threshold: tuple[float, float] = (float("nan"), float("nan"))


def score_machine(machine: SmdMachine, run: MachineRun) -> MachineResult:
    y = machine.labels
    point: dict[str, PointScores] = {}
    adjusted: dict[str, PointScores] = {}
    events: dict[str, EventScores] = {}
    causes: dict[str, CauseHits] = {}
    for output in OUTPUTS:
        if output == "windows":
            flagged = run.anomalous
            detections = detection_rows(flagged)
            tops: list[list[int]] = [list(run.top[r]) for r in detections]
        else:
            flagged, detections, tops = run.active, run.alert_rows, run.alert_top
        point[output] = point_scores(y, flagged)
        adjusted[output] = point_adjusted_scores(y, flagged)
        events[output] = event_scores(y, detections)
        causes[output] = top_feature_hits(y, detections, tops, machine.causes)
    best_point = best_f1_threshold(y, run.score)
    best_adjusted = best_f1_threshold(y, run.score, adjusted=True)
    return MachineResult(
        machine.name, len(y), point, adjusted, events, causes, best_point.scores, best_adjusted.scores,
        (best_point.threshold, best_adjusted.threshold),
    )  # fmt: skip


def pooled(results: Sequence[MachineResult]) -> MachineResult:
    """All machines' counts added up (micro-averaged); oracle thresholds stay per machine."""

    def total(items: Sequence[PointScores]) -> PointScores:
        return sum(items[1:], items[0])

    return MachineResult(
        "ALL",
        sum(r.rows for r in results),
        {o: total([r.point[o] for r in results]) for o in OUTPUTS},
        {o: total([r.adjusted[o] for r in results]) for o in OUTPUTS},
        {o: sum((r.events[o] for r in results), EventScores(0, 0, 0, 0)) for o in OUTPUTS},
        {o: sum((r.causes[o] for r in results), CauseHits(0, 0)) for o in OUTPUTS},
        total([r.oracle_point for r in results]),
        total([r.oracle_adjusted for r in results]),
    )


@dataclass
class SmdReport:
    config: str
    machines: list[MachineResult]
    overall: MachineResult
    seconds: float
    machine_seconds: dict[str, float]
    train_seconds: dict[str, float]
    epochs: dict[str, int]
    jobs: int


def _smd_job(args: tuple[Path, Path, str]) -> MachineRun:
    return run_machine(*args)


def evaluate_smd(
    data_dir: Path,
    config_path: Path,
    out: Path,
    machines: Sequence[str] = SMD_MACHINES,
    jobs: int = 2,
    plots: bool = False,
) -> SmdReport:
    """Train and score every machine (in `jobs` processes), score the outputs against the
    labels, and write each machine's per-row scores to `out/scores/<machine>.csv` (and with
    `plots`, its picture to `out/plots/<machine>.png`)."""
    if not machines:
        raise InputError("no SMD machines given")
    smd_stream(config_path)  # a bad config fails here, once, not in every worker
    loaded = [load_machine(data_dir, m) for m in machines]  # a missing file fails before training
    started = time.monotonic()
    tasks = [(config_path, data_dir, m) for m in machines]
    runs = run_jobs(_smd_job, tasks, jobs)
    results = [score_machine(m, r) for m, r in zip(loaded, runs, strict=True)]
    for m, r in zip(loaded, runs, strict=True):
        write_machine_scores(out / "scores" / f"{m.name}.csv", m, r)
        if plots:
            write_machine_plot(out / "plots" / f"{m.name}.png", m, r)
    return SmdReport(
        str(config_path),
        results,
        pooled(results),
        time.monotonic() - started,
        {r.name: r.seconds for r in runs},
        {r.name: r.train_seconds for r in runs},
        {r.name: r.epochs for r in runs},
        jobs,
    )


def write_machine_plot(path: Path, machine: SmdMachine, run: MachineRun) -> None:
    """The machine's test rows as `detector report` draws a replay: the dims named most in its
    alerts, score, threshold, alerts (with their top dims) and the labeled segments."""
    from detector.report import AlertEvent, EntityTrace, FeatureTrace, ScoreTable, render_png

    rows = np.arange(len(machine.test))
    times = (len(machine.train) + rows) * 60_000  # the evaluation's clock: a minute a row, test after train
    trace = EntityTrace(
        machine.name, rows, times, run.score, run.threshold, run.anomalous, np.zeros(len(rows), bool), {}
    )
    names = [f"dim{d + 1}" for d in range(machine.test.shape[1])]
    alerts = [
        AlertEvent(f"{machine.name}-{k}", "firing", machine.name, "", int(times[row]),
                   top_features=tuple(names[d] for d in top))
        for k, (row, top) in enumerate(zip(run.alert_rows.tolist(), run.alert_top, strict=True))
    ]  # fmt: skip
    render_png(
        path,
        ScoreTable({machine.name: trace}, len(rows)),
        [machine.name],
        [],
        {machine.name: alerts},
        {machine.name: FeatureTrace(names, machine.test.astype(np.float64))},
        f"SMD {machine.name}, test rows",
        [(int(times[a]), int(times[b])) for a, b in segments(machine.labels)],
    )


def write_machine_scores(path: Path, machine: SmdMachine, run: MachineRun) -> None:
    """One row per test row: label, score, threshold, window anomalous, alert active/started, top dims (1-based)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = np.zeros(len(machine.labels), bool)
    started[run.alert_rows] = True
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "label", "score", "threshold", "is_anomaly", "alert_active", "alert_start", "top3"])
        for i in range(len(machine.labels)):
            has = not np.isnan(run.score[i])
            writer.writerow(
                [i, int(machine.labels[i]), f"{run.score[i]:.6g}" if has else "",
                 f"{run.threshold[i]:.6g}" if has else "", int(run.anomalous[i]), int(run.active[i]), int(started[i]),
                 " ".join(str(d + 1) for d in run.top[i] if d >= 0)]
            )  # fmt: skip


def print_smd_report(report: SmdReport, file: TextIO | None = None) -> None:
    stream = file if file is not None else sys.stdout

    def say(line: str = "") -> None:
        print(line, file=stream)

    say(f"SMD: {len(report.machines)} machine(s), config {report.config}, {report.seconds:.0f} s with "
        f"{report.jobs} job(s)")  # fmt: skip
    say("windows = window score above the pipeline's threshold; alerts = alert active (events: alert starts)")
    say("PA = point-adjusted (a segment counts as found, all its rows, if any row in it is flagged)")
    say()
    head = (f"{'machine':<12} {'output':<8} {'P':>6} {'R':>6} {'F1':>6} {'PA-F1':>6} {'ev-R':>6} {'ev-P':>6} "
            f"{'found':>7} {'det':>5} {'top3':>7}")  # fmt: skip
    say(head)
    for r in [*report.machines, report.overall]:
        for o in OUTPUTS:
            p, a, e, c = r.point[o], r.adjusted[o], r.events[o], r.causes[o]
            say(f"{r.name:<12} {o:<8} {p.precision:>6.3f} {p.recall:>6.3f} {p.f1:>6.3f} {a.f1:>6.3f} "
                f"{e.recall:>6.3f} {e.precision:>6.3f} {e.found:>3}/{e.segments:<3} {e.detections:>5} "
                f"{c.hits:>3}/{c.segments:<3}")  # fmt: skip
    say()
    say("ORACLE (threshold chosen on the test labels, per machine; an upper bound, not a result):")
    for r in [*report.machines, report.overall]:
        say(f"{r.name:<12} best point-wise F1 {r.oracle_point.f1:.3f}   best point-adjusted F1 "
            f"{r.oracle_adjusted.f1:.3f}")  # fmt: skip


def smd_seed_row(report: SmdReport) -> dict[str, float]:
    """The pooled numbers one run gives per output: point-adjusted and point-wise F1, event
    recall and precision, and the top-3 cause hit rate (a row of `detector evaluate smd --seeds`)."""
    r = report.overall
    row: dict[str, float] = {}
    for o in OUTPUTS:
        row |= {f"{o}_PA-F1": r.adjusted[o].f1, f"{o}_F1": r.point[o].f1, f"{o}_ev-R": r.events[o].recall,
                f"{o}_ev-P": r.events[o].precision, f"{o}_top3": r.causes[o].rate}  # fmt: skip
    return row


def report_dict(report: SmdReport) -> dict[str, object]:
    def machine(r: MachineResult) -> dict[str, object]:
        return {
            "name": r.name,
            "rows": r.rows,
            **{
                o: {
                    "point": r.point[o].as_dict(),
                    "point_adjusted": r.adjusted[o].as_dict(),
                    "events": r.events[o].as_dict(),
                    "top3_cause_hits": r.causes[o].as_dict(),
                }
                for o in OUTPUTS
            },
            "oracle": {
                "point": r.oracle_point.as_dict() | {"threshold": r.oracle_threshold[0]},
                "point_adjusted": r.oracle_adjusted.as_dict() | {"threshold": r.oracle_threshold[1]},
            },
        }

    return {
        "benchmark": "smd",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": report.config,
        "config_sha256": _sha256(Path(report.config)),
        "seconds": round(report.seconds, 1),
        "jobs": report.jobs,
        "cpu_count": os.cpu_count(),
        "machine_seconds": {k: round(v, 1) for k, v in report.machine_seconds.items()},
        "train_seconds": {k: round(v, 1) for k, v in report.train_seconds.items()},
        "epochs": report.epochs,
        "machines": [machine(r) for r in report.machines],
        "overall": machine(report.overall),
    }


def _sha256(path: Path) -> str | None:
    """The config file's hash, so a result can be matched to the exact settings that made it."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def write_smd_report(report: SmdReport, out: Path) -> tuple[Path, Path]:
    """results.json (everything) and results.csv (one row per machine and output)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = report_dict(report)
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["machine", "output", "precision", "recall", "f1", "pa_f1", "event_recall", "event_precision",
                         "segments", "found", "detections", "top3_hits", "top3_segments", "oracle_f1",
                         "oracle_pa_f1"])  # fmt: skip
        for r in [*report.machines, report.overall]:
            for o in OUTPUTS:
                p, a, e, c = r.point[o], r.adjusted[o], r.events[o], r.causes[o]
                writer.writerow(
                    [r.name, o, f"{p.precision:.4f}", f"{p.recall:.4f}", f"{p.f1:.4f}", f"{a.f1:.4f}",
                     f"{e.recall:.4f}", f"{e.precision:.4f}", e.segments, e.found, e.detections, c.hits, c.segments,
                     f"{r.oracle_point.f1:.4f}", f"{r.oracle_adjusted.f1:.4f}"]
                )  # fmt: skip
    return json_path, csv_path
