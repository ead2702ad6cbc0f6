"""SMD metrics on hand-built label/flag arrays (counts worked out by hand in each test), and
`detector evaluate smd` end to end on a tiny generated SMD-like directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from detector.cli import main
from detector.evaluate_smd import (
    SMD_FEATURES,
    best_f1_threshold,
    detection_rows,
    event_scores,
    point_adjust,
    point_adjusted_scores,
    point_scores,
    read_causes,
    segments,
    top_feature_hits,
)
from detector.report import LABELED_COLOR

# Two segments: rows 1-2 and 5-7. Flagged runs: 0-1, 7, 9.
LABELS = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0, 0], bool)
FLAGGED = np.array([1, 1, 0, 0, 0, 0, 0, 1, 0, 1], bool)


def test_segments_and_detections() -> None:
    assert segments(LABELS).tolist() == [[1, 2], [5, 7]]
    assert detection_rows(FLAGGED).tolist() == [0, 7, 9]
    assert segments(np.zeros(4, bool)).shape == (0, 2)
    assert segments(np.ones(3, bool)).tolist() == [[0, 2]]


def test_point_wise() -> None:
    s = point_scores(LABELS, FLAGGED)
    # TP rows 1, 7; FP rows 0, 9; FN rows 2, 5, 6.
    assert (s.tp, s.fp, s.fn) == (2, 2, 3)
    assert s.precision == pytest.approx(0.5)
    assert s.recall == pytest.approx(0.4)
    assert s.f1 == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert point_scores(LABELS, np.zeros(10, bool)).f1 == 0.0  # nothing flagged: 0, not NaN


def test_point_adjusted() -> None:
    # Both segments hold a flagged row, so all five labeled rows count; FPs stay rows 0 and 9.
    assert point_adjust(LABELS, FLAGGED).tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 0, 1]
    s = point_adjusted_scores(LABELS, FLAGGED)
    assert (s.tp, s.fp, s.fn) == (5, 2, 0)
    assert s.f1 == pytest.approx(2 * (5 / 7) / (5 / 7 + 1))
    # A segment with no flagged row stays missed.
    only_second = np.zeros(10, bool)
    only_second[6] = True
    assert point_adjusted_scores(LABELS, only_second).tp == 3


def test_event_wise() -> None:
    # Detections at 0, 7, 9: the run starting at row 0 began before segment 1-2, so that segment
    # is not found (strict: the detection must lie inside); 7 finds 5-7; 0 and 9 are false.
    e = event_scores(LABELS, detection_rows(FLAGGED))
    assert (e.segments, e.found, e.detections, e.true_detections) == (2, 1, 3, 1)
    assert e.recall == pytest.approx(0.5)
    assert e.precision == pytest.approx(1 / 3)
    # Two detections in one segment: found once, both true.
    e = event_scores(LABELS, np.array([5, 6]))
    assert (e.found, e.true_detections, e.recall, e.precision) == (1, 2, 0.5, 1.0)
    assert event_scores(LABELS, np.array([], np.int64)).precision == 0.0


def test_top_feature_hits() -> None:
    detections = np.array([1, 2, 6, 9])
    tops = [[0, 1, 2], [5, 6, 7], [3, 4, 9], [8, 8, 8]]
    causes = [(1, 2, frozenset({2})), (5, 7, frozenset({8}))]
    # Segment 1-2: first detection row 1, top {0, 1, 2} holds cause 2 (row 2's top is ignored).
    # Segment 5-7: row 6's top {3, 4, 9} misses cause 8. Row 9 is outside every segment.
    hits = top_feature_hits(LABELS, detections, tops, causes)
    assert (hits.segments, hits.hits, hits.rate) == (2, 1, 0.5)
    # A cause entry that only overlaps a segment still counts; a found segment without causes is left out.
    hits = top_feature_hits(LABELS, detections, tops, [(7, 12, frozenset({4}))])
    assert (hits.segments, hits.hits) == (1, 1)


def test_best_f1_threshold_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1], bool)
    score = np.array([0.1, 0.5, 0.9, 0.2, 0.3, 0.8])
    # Point-wise: t 0.9 → F1 0.5; t 0.8 → TP 2, FP 0, FN 1 → 0.8 (best); t 0.2 → 6/8.
    best = best_f1_threshold(labels, score)
    assert best.threshold == 0.8
    assert (best.scores.tp, best.scores.fp, best.scores.fn) == (2, 0, 1)
    # Point-adjusted: segment 2-3 (max 0.9) and 5 (0.8): t 0.8 finds both, no FP → F1 1.
    best = best_f1_threshold(labels, score, adjusted=True)
    assert best.threshold == 0.8
    assert best.scores.f1 == 1.0
    # NaN scores never flag; no finite score at all gives an empty result.
    assert best_f1_threshold(labels, np.full(6, np.nan)).scores.f1 == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=1, max_size=30), st.booleans())
def test_best_f1_threshold_matches_brute_force(rows: list[tuple[bool, int]], adjusted: bool) -> None:
    labels = np.array([r[0] for r in rows], bool)
    score = np.array([r[1] for r in rows], np.float64)
    best = best_f1_threshold(labels, score, adjusted)
    metric = point_adjusted_scores if adjusted else point_scores
    brute = max(metric(labels, score >= t).f1 for t in np.unique(score))
    assert best.scores.f1 == pytest.approx(brute)
    assert metric(labels, score >= best.threshold).f1 == pytest.approx(brute)


def test_read_causes(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_text("246-252:1,2,3\n\n4647-5045:38\n")
    # 246-252 are the 0-based rows 246..251, the rows test_label marks.
    assert read_causes(path) == ((246, 251, frozenset({0, 1, 2})), (4647, 5044, frozenset({37})))


# --- end to end ---------------------------------------------------------------------------

CONFIG = """\
streams:
  metrics:
    input: {kind: file, path: unused.csv}
    mapping: {features: [value]}
    window: {size: 8, stride: 1}
    normalization: {method: robust}
    model: {cell: gru, hidden_size: 8, latent_size: 4}
    training: {epochs: 3, batch_size: 64, seed: 0}
    thresholds:
      warning: {rule: quantile, q: 0.999, factor: 2.0}
    alerts: {n: 1, m: 1, resolve_after: 5, cooldown_s: 0}
"""


def _write_machine(root: Path, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def rows(n: int, offset: int) -> np.ndarray:
        t = np.arange(offset, offset + n)[:, None]
        phase = np.linspace(0, 3, SMD_FEATURES)[None, :]
        return 0.5 + 0.2 * np.sin(2 * np.pi * t / 40 + phase) + rng.normal(0, 0.01, (n, SMD_FEATURES))

    train, test = rows(400, 0), rows(300, 400)
    test[150:160, [2, 3]] += 3.0  # dims 3 and 4 (1-based) jump for ten rows
    labels = np.zeros(300, int)
    labels[150:160] = 1
    for sub, data in (("train", train), ("test", test)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        np.savetxt(root / sub / f"{name}.txt", data, delimiter=",", fmt="%.6f")
    (root / "test_label").mkdir(exist_ok=True)
    np.savetxt(root / "test_label" / f"{name}.txt", labels, fmt="%d")
    (root / "interpretation_label").mkdir(exist_ok=True)
    (root / "interpretation_label" / f"{name}.txt").write_text("150-160:3,4\n")


@pytest.mark.parametrize("time_of_day", ["never", "always"])
def test_evaluate_smd_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], time_of_day: str) -> None:
    # With time of day the per-feature pass must add the same two inputs the pipeline does (it
    # checks its scores against the pipeline's), and the top-3 causes must still be metrics.
    _write_machine(tmp_path / "data" / "smd", "machine-x", 1)
    config = tmp_path / "smd.yaml"
    config.write_text(CONFIG.replace("    window:", f"    time_of_day: {{use: {time_of_day}}}\n    window:"))
    out = tmp_path / "out"
    args = ["evaluate", "smd", "--data-dir", str(tmp_path / "data"), "--config", str(config)]
    code = main([*args, "--machines", "machine-x", "--out", str(out), "--jobs", "1", "--plots"])
    assert code == 0
    # The picture has the labeled segment hatched (no pixel of that colour otherwise).
    image = imread(out / "plots" / "machine-x.png")
    assert ((np.abs(image[..., :3] - np.array(to_rgb(LABELED_COLOR))) < 0.12).all(axis=-1)).sum() > 50
    printed = capsys.readouterr().out
    assert "machine-x" in printed and "ORACLE" in printed
    doc = json.loads((out / "results.json").read_text())
    machine = doc["machines"][0]
    assert machine["name"] == "machine-x" and machine["rows"] == 300
    for output in ("windows", "alerts"):
        assert machine[output]["events"]["segments"] == 1
        assert machine[output]["events"]["found"] == 1  # a +3 jump on scaled [0, 1] data cannot be missed
        assert machine[output]["point_adjusted"]["recall"] == 1.0
        assert machine[output]["top3_cause_hits"] == {"segments": 1, "hits": 1, "rate": 1.0}
    assert machine["oracle"]["point_adjusted"]["f1"] >= machine["windows"]["point_adjusted"]["f1"]
    assert doc["overall"]["windows"]["events"]["found"] == 1
    scores = (out / "scores" / "machine-x.csv").read_text().splitlines()
    assert len(scores) == 301 and scores[0].startswith("row,label,score")
    # A machine without files is a bad input: exit 2.
    assert main([*args, "--machines", "machine-nope", "--out", str(out), "--jobs", "1"]) == 2


def test_evaluate_smd_over_seeds_summarizes_each_seeds_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_machine(tmp_path / "data" / "smd", "machine-x", 1)
    config = tmp_path / "smd.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    args = ["evaluate", "smd", "--data-dir", str(tmp_path / "data"), "--config", str(config), "--out", str(out)]
    assert main([*args, "--machines", "machine-x", "--jobs", "1", "--seeds", "1-2"]) == 0
    assert "SMD (machine-x) over training seeds 1, 2:" in capsys.readouterr().out
    summary = json.loads((out / "seeds.json").read_text())
    for seed, row in zip((1, 2), summary["per_seed"], strict=True):
        doc = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert row["windows_PA-F1"] == doc["overall"]["windows"]["point_adjusted"]["f1"]
        assert row["alerts_top3"] == doc["overall"]["alerts"]["top3_cause_hits"]["rate"]
