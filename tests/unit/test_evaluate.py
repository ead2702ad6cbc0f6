"""The NAB scorer on hand-built cases whose scores are computed by hand, the corpus threshold
sweep, and `detector evaluate nab` end to end on a tiny generated corpus.

Hand arithmetic, with sig(y) = 2/(1 + e^{5y}) - 1:
    sig(-1)   = 2/(1 + e^-5) - 1   = 0.986614   (a detection on a window's first row)
    sig(-0.1) = 2/(1 + e^-0.5) - 1 = 0.244919   → TP worth 0.244919/0.986614 = 0.248242
    sig(-0.8) = 2/(1 + e^-4) - 1   = 0.964028   → TP worth 0.977107
    sig(1/9)  = 2/(1 + e^{5/9}) - 1 = -0.270847 → FP one row after a 10-row window: 0.11·sig = -0.029793
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from detector.cli import main, parse_seeds
from detector.evaluate import (
    NAB_PROFILES,
    REWARD_LOW_FN,
    REWARD_LOW_FP,
    STANDARD,
    LabeledSeries,
    ReplayedSeries,
    confidence,
    load_nab_series,
    load_profiles,
    nab_values,
    normalized,
    probation_rows,
    read_scores,
    replay_series,
    scaled_sigmoid,
    score_series,
    sweep_rows,
    threshold_sweep,
)
from detector.report import LABELED_COLOR

# 100 rows: probation is rows 0-14; one window on rows 40-49 (width 10).
SERIES = LabeledSeries("cat/one.csv", 100, ((40, 49),))


def detections(*rows: int, n: int = 100) -> np.ndarray:
    value = np.zeros(n)
    value[list(rows)] = 1.0
    return value


def raw(value: np.ndarray, series: LabeledSeries = SERIES, profile: object = STANDARD) -> float:
    return score_series(series, value, 0.5, profile).score  # type: ignore[arg-type]


def test_probation_is_fifteen_percent_capped_at_750() -> None:
    assert probation_rows(100) == 15
    assert probation_rows(4032) == 604
    assert probation_rows(22695) == 750
    assert SERIES.probation == 15


def test_scaled_sigmoid_matches_nab_anchor_points() -> None:
    # The values NAB's own docstring gives: -1 → 0.98661, -0.5 → 0.84828, 0 → 0, 1 → -0.98661, ≥ 3 → -1.
    got = scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.0, 10.0]))
    assert got == pytest.approx([0.986614, 0.848284, 0.0, -0.986614, -1.0, -1.0], abs=1e-6)


def test_perfect_detector_scores_100_and_null_detector_0() -> None:
    assert raw(detections(40)) == pytest.approx(1.0)
    assert raw(np.zeros(100)) == pytest.approx(-1.0)
    for profile in NAB_PROFILES:
        assert normalized(raw(detections(40), profile=profile), 1, profile) == pytest.approx(100.0)
        assert normalized(raw(np.zeros(100), profile=profile), 1, profile) == pytest.approx(0.0)
    # reward_low_FN: a missed window costs 2, so the null detector's raw score is -2.
    assert raw(np.zeros(100), profile=REWARD_LOW_FN) == pytest.approx(-2.0)


def test_detection_on_the_last_row_of_a_window_is_worth_a_quarter() -> None:
    s = score_series(SERIES, detections(49), 0.5, STANDARD)
    assert s.score == pytest.approx(0.248242, abs=1e-6)
    assert (s.windows, s.detected, s.false_positives, s.first_detection_delay) == (1, 1, 0, (9,))
    # (0.248242 + 1) / 2
    assert normalized(s.score, 1, STANDARD) == pytest.approx(62.4121, abs=1e-4)


def test_false_positive_far_from_any_window_costs_a_fp() -> None:
    # Row 20: after probation, before the window → -0.11; the window is missed → -1.
    assert raw(detections(20)) == pytest.approx(-1.11)
    assert raw(detections(20), profile=REWARD_LOW_FP) == pytest.approx(-1.22)
    # Three windows' lengths past the window the sigmoid is flat at -1 as well: row 49 + 27.
    assert raw(detections(76)) == pytest.approx(-1.11)


def test_false_positive_right_after_a_window_costs_little() -> None:
    # Row 50: y = (50 - 49)/(10 - 1) = 1/9 → 0.11·sig(1/9) = -0.029793, plus the missed window.
    assert raw(detections(50)) == pytest.approx(-1.029793, abs=1e-6)
    # With the window found on its first row the FP only trims the perfect score.
    assert raw(detections(40, 50)) == pytest.approx(1 - 0.029793, abs=1e-6)


def test_only_the_earliest_detection_in_a_window_counts() -> None:
    # Rows 42 and 45: only 42 counts, y = -(49 - 42 + 1)/10 = -0.8 → 0.977107; no FP either.
    s = score_series(SERIES, detections(42, 45), 0.5, STANDARD)
    assert s.score == pytest.approx(0.977107, abs=1e-6)
    assert s.false_positives == 0
    assert raw(detections(42, 45)) == raw(detections(42))


def test_probation_rows_are_never_scored() -> None:
    # A detection in probation is no false positive; a window in probation is never counted.
    assert raw(detections(3, 14)) == pytest.approx(-1.0)
    early = LabeledSeries("cat/early.csv", 100, ((2, 8), (40, 49)))
    s = score_series(early, detections(5, 40), 0.5, STANDARD)
    assert (s.windows, s.detected, s.score) == (1, 1, pytest.approx(1.0))


def test_fp_weight_is_relative_to_the_previous_window() -> None:
    # Two windows; the FP on row 60 is weighed by its distance from the first window's end:
    # y = (60 - 49)/(10 - 1) = 11/9, sig(11/9) = -0.991, so it costs nearly a full A_FP.
    two = LabeledSeries("cat/two.csv", 100, ((40, 49), (70, 79)))
    y = 11 / 9
    expected = 0.11 * (2 / (1 + math.exp(5 * y)) - 1)
    assert raw(detections(40, 60, 70), two) == pytest.approx(2 + expected, abs=1e-9)


def test_sweep_is_nab_sweeper_and_agrees_with_per_series_scores() -> None:
    a = LabeledSeries("x/a.csv", 100, ((40, 49),))
    b = LabeledSeries("y/b.csv", 100, ((60, 69),))
    quiet = LabeledSeries("x/quiet.csv", 100, ())  # no windows: every detection is an FP
    va, vb = np.zeros(100), np.zeros(100)
    va[[20, 40]] = [0.9, 0.7]  # a strong FP and a perfect TP
    vb[[62, 80]] = [0.7, 0.6]
    rows = sweep_rows([a, quiet, b], [va, np.zeros(100), vb], STANDARD)
    assert rows.n_windows == 2 and len(rows.value) == 255
    sweep = threshold_sweep(rows, STANDARD)
    # First entry detects nothing (NAB starts at 1.1): both windows missed.
    assert (sweep[0].threshold, sweep[0].score) == (1.1, pytest.approx(-2.0))
    assert [s.threshold for s in sweep] == [1.1, 0.9, 0.7, 0.6, 0.0]
    assert sweep[-1].fp == 255 - 20
    for s in sweep[:4]:
        total = sum(score_series(x, v, s.threshold, STANDARD).score for x, v in ((a, va), (b, vb)))
        assert s.score == pytest.approx(total)
    best = max(sweep, key=lambda s: s.score)
    # At 0.7: FP -0.11, TP 1, TP at row 62 of [60, 69]: y = -0.8 → 0.977107.
    assert best.threshold == 0.7
    assert best.score == pytest.approx(-0.11 + 1 + 0.977107, abs=1e-6)
    assert (best.tp, best.fp) == (2, 1)


def test_sweep_keeps_the_highest_threshold_on_a_tie() -> None:
    # Values 0.8 and 0.4 both on rows of one window: both thresholds give the same score.
    v = np.zeros(100)
    v[[40, 45]] = [0.8, 0.4]
    sweep = threshold_sweep(sweep_rows([SERIES], [v], STANDARD), STANDARD)
    assert max(sweep, key=lambda s: s.score).threshold == 0.8


def test_sweep_rejects_values_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep_rows([SERIES], [np.full(100, 2.0)], STANDARD)


def test_profiles_file_is_read_as_nab_writes_it(tmp_path: Path) -> None:
    doc = {p.name: {"CostMatrix": {"tpWeight": p.tp, "fnWeight": p.fn, "fpWeight": p.fp, "tnWeight": 1.0}}
           for p in NAB_PROFILES}  # fmt: skip
    (tmp_path / "profiles.json").write_text(json.dumps(doc))
    assert load_profiles(tmp_path / "profiles.json") == NAB_PROFILES


def test_confidence_is_half_at_the_threshold_and_zero_unscored() -> None:
    got = confidence(np.array([1.0, 3.0, np.nan, 0.0, 1.0]), np.array([1.0, 1.0, np.nan, 1.0, 0.0]))
    assert got == pytest.approx([0.5, 0.75, 0.0, 0.0, 1.0])


def test_alert_output_is_nonzero_only_where_an_alert_fired() -> None:
    replayed = ReplayedSeries(np.array([np.nan, 2.0, 3.0, 0.5]), np.ones(4), np.array([False, False, True, False]), 0.0)
    assert nab_values(replayed, "alerts") == pytest.approx([0, 0, 0.75, 0])
    assert nab_values(replayed, "score") == pytest.approx([0, 2 / 3, 0.75, 1 / 3])


def test_read_scores_marks_the_rows_where_an_alert_starts(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "row,entity,timestamp,score,threshold,is_anomaly,alert_id,phase,rejected\n"
        "1,e,2020-01-01T00:00:00.000Z,,,0,,train,\n"
        "2,e,2020-01-01T00:05:00.000Z,0.5,1,0,,score,\n"
        "3,e,2020-01-01T00:10:00.000Z,2,1,1,aaa,score,\n"
        "4,,,,,0,,,non_finite\n"
        "5,e,2020-01-01T00:20:00.000Z,2,1,1,aaa,score,\n"
        "6,e,2020-01-01T00:25:00.000Z,3,1,1,bbb,score,\n"
        "7,e,2020-01-01T00:30:00.000Z,0.1,1,0,,score,\n"
        "8,e,2020-01-01T00:35:00.000Z,4,1,1,ccc,score,\n"
    )
    r = read_scores(path)
    # Row 6 escalates the running alert (new id, no new detection); row 8 starts a new one.
    assert r.firing.tolist() == [False, False, True, False, False, False, False, True]
    assert np.isnan(r.score[[0, 3]]).all() and r.score[5] == 3.0


def write_corpus(root: Path) -> None:
    """Two NAB-like series (a sine with a spike), labels as NAB writes them."""
    labels = {}
    for name, spike in (("artificialWithAnomaly/a.csv", 500), ("realX/b.csv", 450)):
        path = root / "nab" / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["timestamp,value"]
        for i in range(600):
            t = np.datetime64("2020-01-01T00:00") + np.timedelta64(5 * i, "m")
            value = math.sin(i / 8) + (6.0 if spike <= i < spike + 5 else 0.0)
            lines.append(f"{str(t).replace('T', ' ')}:00,{value:.4f}")
        path.write_text("\n".join(lines) + "\n")
        start = np.datetime64("2020-01-01T00:00") + np.timedelta64(5 * (spike - 20), "m")
        end = start + np.timedelta64(5 * 40, "m")
        labels[name] = [[f"{str(start).replace('T', ' ')}:00.000000", f"{str(end).replace('T', ' ')}:00.000000"]]
    (root / "nab" / "labels").mkdir(parents=True)
    (root / "nab" / "labels" / "combined_windows.json").write_text(json.dumps(labels))


def test_labels_become_row_ranges_and_the_glob_filters(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    corpus = load_nab_series(tmp_path)
    assert [(s.name, s.n_rows, s.windows) for s, _ in corpus] == [
        ("artificialWithAnomaly/a.csv", 600, ((480, 520),)),
        ("realX/b.csv", 600, ((430, 470),)),
    ]
    assert [s.name for s, _ in load_nab_series(tmp_path, "real*")] == ["realX/b.csv"]


CONFIG = """
streams:
  nab:
    input: {kind: file, path: unused.csv}
    mapping: {timestamp: timestamp, features: [value]}
    window: {size: 8}
    model: {hidden_size: 8, latent_size: 4}
    training: {epochs: 3, early_stopping_patience: 0, seed: 0}
    thresholds: {warning: {rule: quantile, q: 0.99, factor: 1.5}}
    alerts: {n: 1, m: 1, cooldown_s: 3600}
"""


@pytest.mark.slow
def test_evaluate_nab_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_corpus(tmp_path)
    (tmp_path / "c.yaml").write_text(CONFIG)
    out = tmp_path / "out"
    args = ["evaluate", "nab", "--data-dir", str(tmp_path), "--config", str(tmp_path / "c.yaml"),
            "--out", str(out), "--jobs", "1", "--plots"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "NAB score, alert events: standard" in printed
    # One picture per series, with its labeled window drawn (so a person can see why it fired).
    assert f"drew 2 series under {out / 'plots'}" in captured.err
    for name in ("artificialWithAnomaly/a.png", "realX/b.png"):
        image = imread(out / "plots" / name)
        hatching = (np.abs(image[..., :3] - np.array(to_rgb(LABELED_COLOR))) < 0.12).all(axis=-1)
        assert hatching.sum() > 50, name  # none of that colour without a labeled window
    doc = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in doc["series"]] == ["artificialWithAnomaly/a.csv", "realX/b.csv"]
    std = doc["results"]["alerts"]["standard"]
    # A 6-sigma spike right in the window is found in both series: the sweep keeps those alerts.
    assert [s["detected"] for s in std["series"]] == [1, 1]
    assert std["normalized"] > 50
    assert (out / "results.csv").read_text().count("\n") == 2 * 3 * 3 + 1
    assert (out / "scores" / "realX" / "b.scores.csv").exists()


@pytest.mark.parametrize("benchmark", ["nab", "smd"])
def test_plots_without_matplotlib_exit_2_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, benchmark: str
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "out"
    args = ["evaluate", benchmark, "--data-dir", str(tmp_path / "none"), "--out", str(out), "--plots"]
    assert main(args) == 2
    assert "pip install 'detector[report]'" in capsys.readouterr().err
    assert not out.exists()  # refused before any series was replayed


@pytest.mark.slow
def test_evaluate_nab_over_seeds_runs_each_seed_and_summarizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_corpus(tmp_path)
    (tmp_path / "c.yaml").write_text(CONFIG)
    out = tmp_path / "out"
    args = ["evaluate", "nab", "--data-dir", str(tmp_path), "--config", str(tmp_path / "c.yaml"),
            "--out", str(out), "--jobs", "1", "--seeds", "3-4"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NAB (alert events) over training seeds 3, 4:" in printed
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [3, 4]
    for seed, row in zip((3, 4), summary["per_seed"], strict=True):
        config = yaml.safe_load((out / f"seed-{seed}" / "config.yaml").read_text())
        assert config["streams"]["nab"]["training"]["seed"] == seed
        doc = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert row["standard"] == doc["results"]["alerts"]["standard"]["normalized"]
    per_seed = [row["standard"] for row in summary["per_seed"]]
    assert summary["mean"]["standard"] == pytest.approx(sum(per_seed) / 2)
    assert summary["std"]["standard"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))


@pytest.mark.parametrize(("text", "seeds"), [("0-4", [0, 1, 2, 3, 4]), ("7", [7]), ("0,3,7", [0, 3, 7])])
def test_seed_lists(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "4-2", "a", "1,1", "-1"])
def test_bad_seed_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_seeds(text)


@pytest.mark.slow
def test_replayed_threshold_is_the_warning_one_even_in_critical_windows(tmp_path: Path) -> None:
    # NAB's confidence is r = score / threshold: with the critical threshold for critical
    # windows, the 6-sigma spike would rank below a window just under the critical threshold.
    write_corpus(tmp_path)
    data = tmp_path / "nab" / "data" / "realX" / "b.csv"
    critical = CONFIG.replace("factor: 1.5}}", "factor: 1.5}, critical: {rule: quantile, q: 0.99, factor: 3.0}}")
    runs = []
    for name, text in (("warning", CONFIG), ("critical", critical)):
        (tmp_path / f"{name}.yaml").write_text(text)
        runs.append(replay_series(tmp_path / f"{name}.yaml", data, 90, tmp_path / f"{name}.scores.csv"))
    plain, with_critical = runs
    assert with_critical.firing.any()
    np.testing.assert_array_equal(with_critical.firing, plain.firing)
    np.testing.assert_array_equal(with_critical.score, plain.score)
    np.testing.assert_array_equal(with_critical.threshold, plain.threshold)
    # The spike crossed the critical rule (3x the warning threshold, both from the same errors).
    scored = ~np.isnan(plain.score)
    assert (plain.score[scored] > 3 * plain.threshold[scored]).any()
