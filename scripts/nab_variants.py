"""NAB scores of threshold and alert-policy variants without retraining.

Thresholds and the alert policy do not change the model's scores, so one replay per series
(cached under --cache: scores, timestamps and the validation errors) serves every variant.
Each variant is a JSON object merged into the stream's config (`{"thresholds": {"warning":
{"k": 5}}}`, `{"alerts": {"cooldown_s": 3600}}`); the scores it prints are the ones
`detector evaluate nab` gives with that config (same pipeline code, same sweep). The cache
holds the model's scores: delete it when the window, normalization, model or training
settings change.

    .venv/bin/python scripts/nab_variants.py --config configs/system-metrics.yaml \\
        --cache build/nab-variants '{}' '{"alerts": {"cooldown_s": 86400}}'

With `--seeds 0-4` each training seed gets its own cache (`CACHE/seed-N/`, built from a copy
of the config with that seed, as `detector evaluate nab --seeds` does), and each variant's
line gives the mean over the seeds and each seed's standard score: one seed's luck moves NAB
by about ±2 points (docs/results.md, round 8).

With `--per-series`, each variant after the first also lists the series where it differs from
the first (standard profile, at each variant's own corpus threshold; means over the seeds):
windows found, false alerts and raw score, which is where a change's points come from. Raw
differences under 0.005 with the same windows and false alerts (a detection a row later) are
left out.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from detector import evaluate as ev
from detector.alerts import AlertPolicy, DailyRepeats
from detector.cli import parse_seeds
from detector.config import Stream, load_config
from detector.model import ErrorStats, load_checkpoint
from detector.threshold import SeverityRules


def cache_one(args: tuple[Path, Path, int, Path]) -> None:
    """Replay one series (train on its probation rows) and store what the variants need."""
    config_path, data, probation, dst = args
    import torch

    from detector.replay import TrainSplit, replay_file

    torch.set_num_threads(1)
    config = load_config(config_path)
    _, stream = config.stream(None)
    scores_csv = dst.with_suffix(".scores.csv")
    replay_file(
        config, None, data, scores_csv, split=TrainSplit(rows=probation), save_to=dst.with_suffix(".pt"), progress=False
    )
    replayed = ev.read_scores(scores_csv)
    errors = load_checkpoint(dst.with_suffix(".pt"), stream).errors
    with scores_csv.open() as f:
        next(f)
        stamps = [line.split(",")[2] for line in f]
    ms = np.array([np.datetime64(t.rstrip("Z"), "ms").astype(np.int64) for t in stamps])
    np.savez(dst.with_suffix(".npz"), score=replayed.score, ms=ms, errors=errors.sorted_errors,
             mean=errors.mean, std=errors.std)  # fmt: skip


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def alert_values(stream: Stream, cached: Any, n_rows: int) -> np.ndarray:
    """What `nab_values(..., "alerts")` gives for one series under `stream`'s thresholds and alerts
    (its warning rule only, as `detector evaluate nab` replays it: `ev.warning_only`)."""
    stream = ev.warning_only(stream)
    score, ms = cached["score"], cached["ms"]
    rows = np.flatnonzero(~np.isnan(score))
    scores, slots = score[rows], np.zeros(len(rows), np.int64)
    errors = ErrorStats(cached["errors"], float(cached["mean"]), float(cached["std"]))
    severities = SeverityRules(stream.thresholds, errors).apply(slots, scores)
    if stream.alerts.daily_repeats is not None:
        severities.severity = DailyRepeats(stream.alerts.daily_repeats).apply(
            slots, ms[rows], scores, severities.severity
        )
    policy = AlertPolicy("nab", stream.alerts, ["value"], "cached")
    _, ids = policy.update(
        slots, ["nab"] * len(rows), severities.severity, scores, severities.threshold,
        np.zeros((len(rows), 1)), ms[rows], ms[rows],
    )  # fmt: skip
    firing = np.zeros(n_rows, bool)
    previous = None
    for row, alert in zip(rows, ids, strict=True):
        firing[row] = alert is not None and previous is None
        previous = alert
    full_score, full_threshold = np.full(n_rows, np.nan), np.full(n_rows, np.nan)
    full_score[rows], full_threshold[rows] = scores, severities.threshold
    return np.where(firing, ev.confidence(full_score, full_threshold), 0.0)


# Per series, at the standard profile's corpus threshold: windows found, false alerts, raw score.
SeriesRow = tuple[float, float, float]


def series_rows(
    series: list[ev.LabeledSeries], values: list[np.ndarray], profile: ev.CostProfile
) -> dict[str, SeriesRow]:
    """Each series' windows found, false alerts and raw score at the corpus's best threshold."""
    best = ev.best_threshold(ev.threshold_sweep(ev.sweep_rows(series, values, profile), profile))
    out = {}
    for s, v in zip(series, values, strict=True):
        scored = ev.score_series(s, v, best.threshold, profile)
        out[s.name] = (float(scored.detected), float(scored.false_positives), scored.score)
    return out


def variant_scores(
    config: Path, cache: Path, corpus: list[tuple[ev.LabeledSeries, Path]], variants: list[str], jobs: int
) -> list[tuple[list[float], dict[str, SeriesRow]]]:
    """Each variant's normalized NAB scores, one per profile, and its per-series rows (standard
    profile), from the scores cached under `cache` (replayed with `config` first where missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    path_of = {s.name: cache / s.name.replace("/", "__").replace(".csv", "") for s, _ in corpus}
    todo = [
        (config, p, s.probation, path_of[s.name]) for s, p in corpus if not path_of[s.name].with_suffix(".npz").exists()
    ]
    if todo:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            list(pool.map(cache_one, todo))
    _, base = load_config(config).stream(None)
    series = [s for s, _ in corpus]
    out = []
    for text in variants:
        stream = Stream.model_validate(merged(base.model_dump(), json.loads(text)))
        values = [alert_values(stream, np.load(path_of[s.name].with_suffix(".npz")), s.n_rows) for s in series]
        cells = []
        for profile in ev.NAB_PROFILES:
            rows = ev.sweep_rows(series, values, profile)
            best = ev.best_threshold(ev.threshold_sweep(rows, profile))
            cells.append(ev.normalized(best.score, rows.n_windows, profile))
        out.append((cells, series_rows(series, values, ev.NAB_PROFILES[0])))
    return out


def print_series_differences(variants: list[str], per_series: list[dict[str, SeriesRow]]) -> None:
    """For each variant after the first: the series where it differs from the first."""
    first = per_series[0]
    for text, rows in zip(variants[1:], per_series[1:], strict=True):
        print(f"\n{text}: series that differ from {variants[0]} (found, false alerts, raw: first -> this)")
        for name in sorted(rows):
            a, b = first[name], rows[name]
            # A detection a row or two later moves the raw score by under 0.005: not listed.
            if a[0] != b[0] or a[1] != b[1] or abs(b[2] - a[2]) >= 0.005:
                print(
                    f"  {name:<58} {a[0]:4.1f} -> {b[0]:4.1f}  {a[1]:5.1f} -> {b[1]:5.1f}"
                    f"  {a[2]:+6.2f} -> {b[2]:+6.2f} ({b[2] - a[2]:+.2f})"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/system-metrics.yaml"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("build/nab-variants"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=parse_seeds, help="one cache per training seed (`0-4` or `0,3,7`); print means")
    parser.add_argument(
        "--per-series", action="store_true", help="list the series where each variant differs from the first"
    )
    parser.add_argument("variants", nargs="*", default=["{}"], help="JSON overrides of the stream config")
    args = parser.parse_args()

    corpus = ev.load_nab_series(args.data_dir)
    if args.seeds is None:
        results = variant_scores(args.config, args.cache, corpus, args.variants, args.jobs)
        print(f"{'variant':<70} {'standard':>8} {'low_FP':>7} {'low_FN':>7}")
        for text, (cells, _) in zip(args.variants, results, strict=True):
            print(f"{text:<70} {cells[0]:>8.1f} {cells[1]:>7.1f} {cells[2]:>7.1f}", flush=True)
        if args.per_series:
            print_series_differences(args.variants, [rows for _, rows in results])
        return
    per_seed = ev.over_seeds(
        args.config,
        args.cache,
        args.seeds,
        lambda config, folder: variant_scores(config, folder, corpus, args.variants, args.jobs),
    )
    print(f"{'variant':<70} {'standard':>8} {'low_FP':>7} {'low_FN':>7}  standard by seed {args.seeds}")
    for i, text in enumerate(args.variants):
        runs = np.array([results[i][0] for results in per_seed])
        mean = runs.mean(axis=0)
        by_seed = " ".join(f"{run[0]:.1f}" for run in runs)
        print(f"{text:<70} {mean[0]:>8.2f} {mean[1]:>7.2f} {mean[2]:>7.2f}  {by_seed}", flush=True)
    if args.per_series:
        mean_rows = []
        for i in range(len(args.variants)):
            by_name: dict[str, SeriesRow] = {}
            for name in per_seed[0][i][1]:
                found, false_alerts, raw = np.mean([results[i][1][name] for results in per_seed], axis=0)
                by_name[name] = (float(found), float(false_alerts), float(raw))
            mean_rows.append(by_name)
        print_series_differences(args.variants, mean_rows)


if __name__ == "__main__":
    main()
