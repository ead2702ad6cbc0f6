"""`detector evaluate`: detection quality on labeled public data, with the published protocols.

Every benchmark runs each labeled file through the real `detector replay` pipeline (same
config, same model, thresholds and alert policy as the daemon) and scores what comes out.
This module holds the shared part (`replay_series`: one file in, per-row scores and alert
events out) and one section per benchmark; NAB is the first.

NAB (Numenta Anomaly Benchmark), as published in numenta/NAB `nab/sweeper.py` and
`nab/runner.py` (v1.1):

- Each series has labeled anomaly windows; the first `probation_rows(n)` = min(⌊0.15·n⌋, 750)
  rows are the probation period: the detector learns there and nothing there is scored.
- The detector gives every row a value in [0, 1]; one threshold per cost profile, chosen over
  the whole corpus (the sweep), turns values ≥ threshold into detections.
- Inside a window only the earliest detection counts: A_TP·sig(y)/sig(-1) with
  y = -(right - i + 1)/width and sig(y) = 2/(1 + e^{5y}) - 1 (sig = -1 from y ≥ 3). A window
  with no detection costs A_FN. Every detection outside the windows costs A_FP·sig(y) with
  y = (i - previous_right)/(previous_width - 1), or A_FP·(-1) before the first window.
- Normalized score = 100·(S - S_null)/(S_perfect - S_null), S_null = -A_FN·windows (the null
  detector never fires), S_perfect = A_TP·windows.

What `detector` hands the sweep (`NabOutput`): `alerts`, the reported result, is the alert
policy's output: on each row where an alert starts, its confidence r/(1 + r) with
r = score/threshold of the window that fired, and 0 on every other row. `score`, scored too
for comparison, is r/(1 + r) on every scored row: the model and threshold without the alert
policy.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

import numpy as np
import yaml

from detector.config import Stream, load_config
from detector.errors import InputError

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

# --- NAB scoring ----------------------------------------------------------------------------

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750  # NAB: probationPercent · 5000
NO_DETECTION_THRESHOLD = 1.1  # NAB's first sweep threshold: above every value, so nothing fires
NabOutput = Literal["alerts", "score"]


@dataclass(frozen=True)
class CostProfile:
    """One NAB application profile: the weights of a true positive, false positive, false negative."""

    name: str
    tp: float
    fp: float
    fn: float


STANDARD = CostProfile("standard", 1.0, 0.11, 1.0)
REWARD_LOW_FP = CostProfile("reward_low_FP_rate", 1.0, 0.22, 1.0)
REWARD_LOW_FN = CostProfile("reward_low_FN_rate", 1.0, 0.11, 2.0)
NAB_PROFILES = (STANDARD, REWARD_LOW_FP, REWARD_LOW_FN)


def load_profiles(path: Path) -> tuple[CostProfile, ...]:
    """Profiles from NAB's `config/profiles.json` (`{"standard": {"CostMatrix": {"tpWeight": ...}}}`)."""
    data = json.loads(path.read_text())
    return tuple(
        CostProfile(name, float(p["CostMatrix"]["tpWeight"]), float(p["CostMatrix"]["fpWeight"]),
                    float(p["CostMatrix"]["fnWeight"]))
        for name, p in data.items()
    )  # fmt: skip


def probation_rows(n_rows: int) -> int:
    """Leading rows NAB never scores: min(⌊15% of the rows⌋, 750)."""
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(position: np.ndarray) -> np.ndarray:
    """NAB's sig(y) = 2/(1 + e^{5y}) - 1, and -1 from y ≥ 3 (an FP well past a window).

    Shape:
        position: (N,) float; returns (N,) float64 in (-1, 1]
    """
    y = np.asarray(position, np.float64)
    out = 2.0 / (1.0 + np.exp(np.minimum(5.0 * y, 700.0))) - 1.0
    return np.where(y >= 3.0, -1.0, out)


_MAX_TP = float(scaled_sigmoid(np.array([-1.0]))[0])  # sig(-1) = 0.98661: a detection on a window's first row


@dataclass(frozen=True)
class LabeledSeries:
    """One NAB file: its name (`category/file.csv`), row count and anomaly windows.

    `windows` are (first, last) row indices, 0-based and inclusive, in time order.
    """

    name: str
    n_rows: int
    windows: tuple[tuple[int, int], ...]

    @property
    def probation(self) -> int:
        return probation_rows(self.n_rows)

    @property
    def category(self) -> str:
        return self.name.split("/")[0]


@dataclass(frozen=True)
class SweepRows:
    """The scorable rows of one or more series, ready for the threshold sweep.

    `weight` is what a detection on the row is worth under one cost profile (NAB's sweep
    score); `window` is a corpus-wide window number, or -1 for a row outside every window.

    Shape:
        value, weight: (R,) float64; window: (R,) int64
    """

    value: np.ndarray
    weight: np.ndarray
    window: np.ndarray
    n_windows: int


def row_weights(series: LabeledSeries, profile: CostProfile) -> tuple[np.ndarray, np.ndarray]:
    """Per row: what a detection there is worth, and which window (0.. in this series, or -1) holds it.

    Shape:
        returns weight (n_rows,) float64, window (n_rows,) int64
    """
    i = np.arange(series.n_rows, dtype=np.float64)
    weight = np.full(series.n_rows, -profile.fp)  # before the first window: a plain -A_FP
    window = np.full(series.n_rows, -1, np.int64)
    for k, (first, last) in enumerate(series.windows):
        width = last - first + 1
        inside = slice(first, last + 1)
        weight[inside] = profile.tp * scaled_sigmoid(-(last - i[inside] + 1) / width) / _MAX_TP
        window[inside] = k
        end = series.windows[k + 1][0] if k + 1 < len(series.windows) else series.n_rows
        after = slice(last + 1, end)
        # NAB divides by (width - 1); a one-row window would divide by zero there.
        weight[after] = profile.fp * scaled_sigmoid((i[after] - last) / max(width - 1, 1))
    return weight, window


def sweep_rows(series: Sequence[LabeledSeries], values: Sequence[np.ndarray], profile: CostProfile) -> SweepRows:
    """Concatenate the scorable (post-probation) rows of a corpus for one profile."""
    parts_v, parts_w, parts_k = [], [], []
    offset = 0
    for s, v in zip(series, values, strict=True):
        if len(v) != s.n_rows:
            raise ValueError(f"{s.name}: {len(v)} detector values for {s.n_rows} rows")
        weight, window = row_weights(s, profile)
        keep = slice(s.probation, s.n_rows)
        k = window[keep]
        # Windows wholly inside probation are never scored, as in NAB (which asserts there are none).
        present = np.unique(k[k >= 0])
        renumber = np.full(max(len(s.windows), 1), -1, np.int64)
        renumber[present] = offset + np.arange(len(present))
        offset += len(present)
        parts_v.append(np.asarray(v, np.float64)[keep])
        parts_w.append(weight[keep])
        parts_k.append(np.where(k >= 0, renumber[np.maximum(k, 0)], -1))
    value = np.concatenate(parts_v) if parts_v else np.zeros(0)
    if len(value) and (np.isnan(value).any() or value.min() < 0 or value.max() > 1):
        raise ValueError("NAB detector values must be in [0, 1]")
    return SweepRows(
        value,
        np.concatenate(parts_w) if parts_w else np.zeros(0),
        np.concatenate(parts_k) if parts_k else np.zeros(0, np.int64),
        offset,
    )


@dataclass(frozen=True)
class ThresholdScore:
    """The raw NAB score of a corpus when values ≥ `threshold` are detections, with row counts."""

    threshold: float
    score: float
    tp: int
    fp: int
    fn: int
    tn: int


def threshold_sweep(rows: SweepRows, profile: CostProfile) -> list[ThresholdScore]:
    """The raw score at every distinct value as threshold, highest threshold first (NAB's sweeper).

    The first entry (threshold 1.1) detects nothing: every window is a false negative.
    """
    order = np.argsort(-rows.value, kind="stable")
    values = rows.value[order].tolist()
    weights = rows.weight[order].tolist()
    windows = rows.window[order].tolist()
    best = [-profile.fn] * rows.n_windows  # each window's current contribution
    in_window = int((rows.window >= 0).sum())
    tp, fp, fn, tn = 0, 0, in_window, len(values) - in_window
    fp_sum, window_sum = 0.0, -profile.fn * rows.n_windows
    out: list[ThresholdScore] = []
    current = NO_DETECTION_THRESHOLD
    for value, weight, k in zip(values, weights, windows, strict=True):
        if value != current:
            out.append(ThresholdScore(current, fp_sum + window_sum, tp, fp, fn, tn))
            current = value
        if k < 0:
            fp, tn = fp + 1, tn - 1
            fp_sum += weight
        else:
            tp, fn = tp + 1, fn - 1
            if weight > best[k]:  # an earlier row of the window: it replaces the later one
                window_sum += weight - best[k]
                best[k] = weight
    out.append(ThresholdScore(current, fp_sum + window_sum, tp, fp, fn, tn))
    return out


def best_threshold(sweep: list[ThresholdScore]) -> ThresholdScore:
    """The highest score; on a tie the highest threshold (NAB sorts the sweep stably)."""
    return max(sweep, key=lambda s: s.score)  # max keeps the first of equals


def normalized(score: float, n_windows: int, profile: CostProfile) -> float:
    """100·(S - S_null)/(S_perfect - S_null): null detector 0, perfect detector 100."""
    null, perfect = -profile.fn * n_windows, profile.tp * n_windows
    return 100.0 * (score - null) / (perfect - null) if perfect > null else math.nan


@dataclass(frozen=True)
class SeriesScore:
    """One series at a fixed threshold: raw score, windows found, detections outside windows."""

    name: str
    score: float
    windows: int
    detected: int
    false_positives: int
    first_detection_delay: tuple[int | None, ...]  # rows from each window's start to its first detection


def score_series(series: LabeledSeries, value: np.ndarray, threshold: float, profile: CostProfile) -> SeriesScore:
    """NAB's raw score of one series when its values ≥ `threshold` are detections."""
    weight, window = row_weights(series, profile)
    detect = np.asarray(value, np.float64) >= threshold
    detect[: series.probation] = False
    outside = detect & (window < 0)
    score = float(weight[outside].sum())
    delays: list[int | None] = []
    scored = 0
    for k, (first, last) in enumerate(series.windows):
        if last < series.probation:
            continue
        scored += 1
        hits = np.flatnonzero(detect & (window == k))
        if len(hits):
            score += float(weight[hits[0]])
            delays.append(int(hits[0]) - first)
        else:
            score -= profile.fn
            delays.append(None)
    detected = sum(d is not None for d in delays)
    return SeriesScore(series.name, score, scored, detected, int(outside.sum()), tuple(delays))


# --- NAB corpus ---------------------------------------------------------------------------


def _label_time(text: str) -> np.datetime64:
    return np.datetime64(text.strip().replace(" ", "T"), "ms")


def load_nab_series(data_dir: Path, pattern: str = "*") -> list[tuple[LabeledSeries, Path]]:
    """The NAB files under `data_dir/nab/data` whose `category/file.csv` matches `pattern`,
    with their windows from `labels/combined_windows.json` turned into row indices."""
    root = data_dir / "nab"
    labels_path = root / "labels" / "combined_windows.json"
    try:
        labels = json.loads(labels_path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read NAB labels {labels_path}: {exc.strerror}") from None
    files = sorted((root / "data").glob("*/*.csv"))
    out = []
    for path in files:
        name = f"{path.parent.name}/{path.name}"
        if not fnmatch.fnmatch(name, pattern):
            continue
        if name not in labels:
            raise InputError(f"{name}: no entry in {labels_path}")
        with path.open(newline="") as f:
            reader = csv.reader(f)
            next(reader)
            stamps = np.array([_label_time(r[0]) for r in reader if r])
        windows = []
        for start, end in labels[name]:
            first = int(np.searchsorted(stamps, _label_time(start), side="left"))
            last = int(np.searchsorted(stamps, _label_time(end), side="right")) - 1
            if first <= last:
                windows.append((first, last))
        out.append((LabeledSeries(name, len(stamps), tuple(windows)), path))
    if not out:
        raise InputError(f"no NAB series under {root / 'data'} match {pattern!r}")
    return out


# --- replaying one file through the pipeline (shared by every benchmark) --------------------


@dataclass
class ReplayedSeries:
    """Per-row outcome of `detector replay` on one file, in input row order.

    Shape:
        score, threshold: (N,) float64, NaN where no window was scored
        firing: (N,) bool, True where an alert started (the entity was not firing before the row)
    """

    score: np.ndarray
    threshold: np.ndarray
    firing: np.ndarray
    seconds: float


def read_scores(path: Path) -> ReplayedSeries:
    """Read a `detector replay` scores CSV back into arrays (row r → index r - 1)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    n = max((int(r["row"]) for r in rows), default=0)
    score, threshold = np.full(n, np.nan), np.full(n, np.nan)
    firing = np.zeros(n, bool)
    previous = ""
    for r in rows:
        i = int(r["row"]) - 1
        if r["score"]:
            score[i], threshold[i] = float(r["score"]), float(r["threshold"])
        alert = r["alert_id"]
        # An escalation (warning → critical) gets a new id too, but it is not a new detection.
        firing[i] = bool(alert) and not previous
        if not r["rejected"]:
            previous = alert
    return ReplayedSeries(score, threshold, firing, 0.0)


def warning_only(stream: Stream) -> Stream:
    """`stream` without its critical rule, for the benchmarks' r = score / warning threshold.

    The pipeline reports per window the threshold its score was judged by, the critical one
    for a critical window: r over that would rank a score just above the critical threshold
    below one just under it. The critical rule sets severity labels only (alerts start,
    resolve and cool down on warning), so dropping it changes no detection.
    """
    return stream.model_copy(update={"thresholds": stream.thresholds.model_copy(update={"critical": None})})


def replay_series(config_path: Path, data: Path, train_rows: int, scores_out: Path) -> ReplayedSeries:
    """Train on the first `train_rows` rows of `data`, score the rest, and read the scores back
    (the threshold column is the warning threshold: `warning_only`)."""
    from detector.replay import TrainSplit, replay_file

    started = time.monotonic()
    config = load_config(config_path)
    config = config.model_copy(update={"streams": {k: warning_only(v) for k, v in config.streams.items()}})
    replay_file(
        config,
        None,
        data,
        scores_out,
        alerts_path=scores_out.with_suffix(".alerts.jsonl"),
        split=TrainSplit(rows=train_rows),
        progress=False,
    )
    result = read_scores(scores_out)
    result.seconds = time.monotonic() - started
    return result


def confidence(score: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """r/(1 + r) with r = score/threshold: 0.5 at the threshold, towards 1 far above it, 0 unscored.

    Shape:
        score, threshold: (N,); returns (N,) float64 in [0, 1)
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(threshold > 0, score / threshold, np.where(score > 0, np.inf, 0.0))
        out = np.where(np.isinf(r), 1.0, r / (1.0 + r))
    return np.nan_to_num(out, nan=0.0)


def nab_values(replayed: ReplayedSeries, output: NabOutput) -> np.ndarray:
    """What the detector hands NAB's sweep for each row.

    `alerts`: the confidence of the window that fired, on rows where an alert fired; 0 elsewhere.
    `score`: the confidence of every scored window (the model and threshold without the alert policy).
    """
    conf = confidence(replayed.score, replayed.threshold)
    return np.where(replayed.firing, conf, 0.0) if output == "alerts" else conf


# --- NAB evaluation -----------------------------------------------------------------------


def _init_worker() -> None:
    # One core per worker: torch would otherwise start a thread per core in every process.
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, force=True)


def run_jobs(job: Callable[[T], R], tasks: Sequence[T], jobs: int) -> list[R]:
    """`job` over `tasks` in up to `jobs` worker processes (in this one when that is 1), in order.
    `job` must be a module-level function: workers are spawned and import it."""
    jobs = max(1, min(jobs, len(tasks)))
    if jobs == 1:
        _init_worker()
        return [job(t) for t in tasks]
    # spawn, not fork: a forked torch can deadlock on thread pools the parent started.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        return list(pool.map(job, tasks))


def _replay_job(args: tuple[Path, Path, int, Path]) -> ReplayedSeries:
    return replay_series(*args)


@dataclass
class ProfileResult:
    profile: str
    threshold: float
    raw: float
    normalized: float
    series: list[SeriesScore] = field(default_factory=list)


@dataclass
class NabReport:
    """Every number `detector evaluate nab` prints and writes."""

    config: str
    series: list[LabeledSeries]
    results: dict[str, dict[str, ProfileResult]]  # output → profile → result
    seconds: float
    replay_seconds: dict[str, float]
    jobs: int
    profiles: tuple[CostProfile, ...] = NAB_PROFILES

    def category_scores(self, output: str, profile: str) -> dict[str, tuple[float, int, int, int]]:
        """Per category: (normalized score or NaN, windows, detected, false positives)."""
        prof = next(p for p in self.profiles if p.name == profile)
        totals: dict[str, list[float]] = {}
        for s in self.results[output][profile].series:
            t = totals.setdefault(s.name.split("/")[0], [0.0, 0, 0, 0])
            t[0] += s.score
            t[1] += s.windows
            t[2] += s.detected
            t[3] += s.false_positives
        return {
            cat: (normalized(t[0], int(t[1]), prof), int(t[1]), int(t[2]), int(t[3]))
            for cat, t in sorted(totals.items())
        }


def evaluate_nab(
    data_dir: Path,
    config_path: Path,
    out: Path,
    pattern: str = "*",
    jobs: int = 2,
    profiles: Sequence[CostProfile] | None = None,
) -> NabReport:
    """Replay every matching NAB series (train on its probation rows, score the rest), sweep one
    threshold per profile over the corpus, and score each series at it.

    Profiles default to `data_dir/nab/profiles.json`, or NAB's three when that file is absent.
    """
    if profiles is None:
        profiles_path = data_dir / "nab" / "profiles.json"
        profiles = load_profiles(profiles_path) if profiles_path.exists() else NAB_PROFILES

    load_config(config_path)  # a bad config fails here, once, not in every worker
    corpus = load_nab_series(data_dir, pattern)
    started = time.monotonic()
    tasks = [
        (config_path, path, s.probation, out / "scores" / s.name.replace(".csv", ".scores.csv")) for s, path in corpus
    ]
    replayed = run_jobs(_replay_job, tasks, jobs)
    series = [s for s, _ in corpus]
    results: dict[str, dict[str, ProfileResult]] = {}
    for output in ("alerts", "score"):
        values = [nab_values(r, output) for r in replayed]
        for s, v in zip(series, values, strict=True):
            if len(v) < s.n_rows:  # trailing rows the scores file lacks (none unless the file changed)
                raise InputError(f"{s.name}: replay wrote {len(v)} rows, the file has {s.n_rows}")
        values = [v[: s.n_rows] for s, v in zip(series, values, strict=True)]
        results[output] = {}
        for profile in profiles:
            rows = sweep_rows(series, values, profile)
            best = best_threshold(threshold_sweep(rows, profile))
            per_series = [score_series(s, v, best.threshold, profile) for s, v in zip(series, values, strict=True)]
            results[output][profile.name] = ProfileResult(
                profile.name, best.threshold, best.score, normalized(best.score, rows.n_windows, profile), per_series
            )
    return NabReport(
        str(config_path),
        series,
        results,
        time.monotonic() - started,
        {s.name: r.seconds for s, r in zip(series, replayed, strict=True)},
        jobs,
        tuple(profiles),
    )


def write_nab_plots(data_dir: Path, config_path: Path, out: Path, report: NabReport) -> list[Path]:
    """Draw every series of `report` (its values, score, threshold, alerts and labeled windows)
    to `out/plots/<category>/<file>.png`, from the scores the run wrote under `out/scores/`. The
    labeled windows drawn are the rows the scorer counted (`s.windows`), at their timestamps."""
    from detector.replay import read_samples
    from detector.report import write_report

    name, stream = load_config(config_path).stream(None)
    written = []
    for s in report.series:
        batch, _ = read_samples(name, stream, data_dir / "nab" / "data" / s.name)
        png = out / "plots" / s.name.replace(".csv", ".png")
        write_report(
            out / "scores" / s.name.replace(".csv", ".scores.csv"),
            png,
            samples=(batch, [f.name for f in stream.mapping.features]),
            labeled=[(int(batch.timestamps[a]), int(batch.timestamps[b])) for a, b in s.windows],
        )
        written.append(png)
    return written


def seed_config(config_path: Path, seed: int, out: Path) -> Path:
    """A copy of the config at `out`, with every stream's `training.seed` set to `seed`.

    A single run moves by about ±2 NAB points with the training seed alone (docs/results.md,
    round 8), so comparing configs on one seed compares luck as much as settings.
    """
    data = yaml.safe_load(config_path.read_text())
    for stream in (data.get("streams") or {}).values():
        stream.setdefault("training", {})["seed"] = seed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    load_config(out)  # relative paths now resolve from `out`: fails here if the copy is not valid
    return out


def over_seeds(config_path: Path, out: Path, seeds: Sequence[int], run: Callable[[Path, Path], R]) -> list[R]:
    """`run(config, folder)` once per training seed: `config` a copy of `config_path` with that
    seed, `folder` = `out/seed-<n>/` (which holds the copy)."""
    results = []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        results.append(run(seed_config(config_path, seed, folder / "config.yaml"), folder))
    return results


def nab_seed_row(report: NabReport) -> dict[str, float]:
    """One run's normalized scores (alert events), windows found and false positives (at the
    first profile's threshold): its row in `seed_summary`."""
    alerts = report.results["alerts"]
    first = report.profiles[0].name
    row = {p.name: alerts[p.name].normalized for p in report.profiles}
    row["found"] = sum(s.detected for s in alerts[first].series)
    row["false_positives"] = sum(s.false_positives for s in alerts[first].series)
    return row


def seed_summary(config: str, rows: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """Each seed's row of numbers and their mean and sample standard deviation: what
    `seeds.json` holds."""
    columns = list(rows[0][1])
    table = np.array([[row[c] for c in columns] for _, row in rows])
    std = table.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(len(columns))
    return {
        "config": config,
        "seeds": [seed for seed, _ in rows],
        "columns": columns,
        "per_seed": [row for _, row in rows],
        "mean": dict(zip(columns, table.mean(axis=0).tolist(), strict=True)),
        "std": dict(zip(columns, std.tolist(), strict=True)),
    }


def print_seed_summary(summary: dict[str, Any], title: str, digits: int = 1, file: TextIO | None = None) -> None:
    """The seeds' table under `title`, a column per number, then the mean and standard deviation."""
    stream = file if file is not None else sys.stdout
    columns = summary["columns"]
    heads = [c.replace("reward_", "").replace("_rate", "").replace("false_positives", "FP") for c in columns]
    width = max(10, *(len(h) + 2 for h in heads))
    print(f"{title} over training seeds {', '.join(map(str, summary['seeds']))}:", file=stream)
    print(f"{'seed':<6}" + "".join(f"{h:>{width}}" for h in heads), file=stream)
    for seed, row in zip(summary["seeds"], summary["per_seed"], strict=True):
        print(f"{seed:<6}" + "".join(f"{row[c]:>{width}.{digits}f}" for c in columns), file=stream)
    for label in ("mean", "std"):
        print(f"{label:<6}" + "".join(f"{summary[label][c]:>{width}.{digits}f}" for c in columns), file=stream)


def print_nab_report(report: NabReport, file: TextIO | None = None) -> None:
    stream = file if file is not None else sys.stdout
    first = report.profiles[0].name  # `standard` in NAB's profiles.json
    std = report.results["alerts"][first]

    def say(line: str = "") -> None:
        print(line, file=stream)

    say(f"NAB: {len(report.series)} series, config {report.config}, {report.seconds:.0f} s with {report.jobs} job(s)")
    say("detector output: alert starts, each worth its confidence r/(1+r) with r = score/threshold")
    say()
    say(f"{'series':<58} {'windows':>7} {'found':>5} {'FP':>4} {'raw':>7}  ({first} profile)")
    for s in std.series:
        say(f"{s.name:<58} {s.windows:>7} {s.detected:>5} {s.false_positives:>4} {s.score:>7.3f}")
    say()
    names = " ".join(f"{p.name.replace('reward_', '').replace('_rate', ''):>9}" for p in report.profiles)
    say(f"{'category':<28} {names} {'windows':>8} {'found':>6} {'FP':>5}")
    cats = {p.name: report.category_scores("alerts", p.name) for p in report.profiles}
    for cat, (_, w, d, fp) in cats[first].items():
        cells = [cats[p.name][cat][0] for p in report.profiles]
        text = " ".join(f"{c:>9.1f}" if not math.isnan(c) else f"{'-':>9}" for c in cells)
        say(f"{cat:<28} {text} {w:>8} {d:>6} {fp:>5}")
    say()
    for output, label in (("alerts", "alert events"), ("score", "per-window score")):
        parts = [
            f"{p.name} {r.normalized:.1f} (threshold {r.threshold:.4g})" for p in report.profiles
            if (r := report.results[output].get(p.name)) is not None
        ]  # fmt: skip
        say(f"NAB score, {label}: " + ", ".join(parts))


def write_nab_report(report: NabReport, out: Path) -> tuple[Path, Path]:
    """results.json (everything) and results.csv (one row per output, profile and series)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "nab",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": report.config,
        "seconds": round(report.seconds, 1),
        "jobs": report.jobs,
        "cpu_count": os.cpu_count(),
        "series": [asdict(s) | {"probation": s.probation} for s in report.series],
        "replay_seconds": {k: round(v, 2) for k, v in report.replay_seconds.items()},
        "results": {
            output: {
                name: {
                    "threshold": r.threshold,
                    "raw": r.raw,
                    "normalized": r.normalized,
                    "categories": {
                        cat: {
                            "normalized": None if math.isnan(v[0]) else v[0],
                            "windows": v[1],
                            "detected": v[2],
                            "false_positives": v[3],
                        }
                        for cat, v in report.category_scores(output, name).items()
                    },
                    "series": [asdict(s) for s in r.series],
                }
                for name, r in by_profile.items()
            }
            for output, by_profile in report.results.items()
        },
    }
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["output", "profile", "threshold", "series", "windows", "detected", "false_positives", "raw"])
        for output, by_profile in report.results.items():
            for name, r in by_profile.items():
                for s in r.series:
                    writer.writerow(
                        [output, name, f"{r.threshold:.6g}", s.name, s.windows, s.detected, s.false_positives,
                         f"{s.score:.6f}"]
                    )  # fmt: skip
                writer.writerow([output, name, f"{r.threshold:.6g}", "ALL", "", "", "", f"{r.raw:.6f}"])
    return json_path, csv_path
