"""`detector report`: PNG and HTML pictures of scores, thresholds and alerts per entity."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from matplotlib.dates import date2num
from matplotlib.figure import Figure
from matplotlib.image import imread

from detector.cli import EXIT_OK, EXIT_USAGE, main
from detector.errors import InputError
from detector.report import (
    DPI,
    FIGURE_WIDTH_IN,
    SCORE_COLUMNS,
    alerts_from_scores,
    draw_entity,
    feature_traces,
    read_scores,
    read_windows,
    write_report,
)
from detector.source import SampleBatch, format_timestamp

START = datetime(2024, 1, 1, tzinfo=UTC)
ENTITIES = ["a", "b", "c"]
PER_ENTITY = 120
TRAIN = 40
# (entity, first scored index, last) of each anomalous stretch, and the alerts they raise.
ANOMALIES = {"b": [(60, 64), (90, 92)], "c": [(80, 83)]}
ALERTS = [
    ("b", 61, "firing", "critical", "alert-b-1"),
    ("b", 70, "resolved", "", "alert-b-1r"),
    ("b", 91, "firing", "warning", "alert-b-2"),
    ("c", 81, "firing", "warning", "alert-c-1"),
]


def ms_of(i: int) -> int:
    return int((START + timedelta(minutes=i)).timestamp() * 1000)


def write_synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """scores.csv (entities interleaved, one rejected row) and alerts.jsonl, as replay writes them."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(PER_ENTITY):
        for k, entity in enumerate(ENTITIES):
            row = i * len(ENTITIES) + k + 1
            spans = ANOMALIES.get(entity, [])
            anomalous = any(a <= i <= b for a, b in spans)
            alert = next(
                (aid for e, at, st, _, aid in ALERTS if e == entity and st == "firing" and at <= i <= at + 8), ""
            )
            scored = i >= TRAIN + 8
            score = (80.0 if anomalous else 0.05 + 0.02 * rng.random()) if scored else math.nan
            rows.append(
                [
                    str(row),
                    entity,
                    format_timestamp(ms_of(i)),
                    "" if math.isnan(score) else f"{score:.6g}",
                    "0.5" if scored else "",
                    "1" if anomalous else "0",
                    alert,
                    "train" if i < TRAIN else "score",
                    "",
                ]
            )
    rows.append([str(len(rows) + 1), "", "", "", "", "0", "", "", "wrong_type"])
    scores = tmp_path / "scores.csv"
    with scores.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SCORE_COLUMNS)
        writer.writerows(rows)
    alerts = tmp_path / "alerts.jsonl"
    lines = [
        json.dumps(
            {
                "id": aid,
                "status": status,
                "stream": "web",
                "entity": entity,
                "severity": severity,
                "window_end": format_timestamp(ms_of(at)),
                "score": 80.0,
                "threshold": 0.5,
                "top_features": [{"name": "cpu", "error": 3.0}],
            }
        )
        for entity, at, status, severity, aid in ALERTS
    ]
    alerts.write_text("\n".join(lines) + "\n")
    return scores, alerts


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    return write_synthetic(tmp_path)


def non_white_fraction(image: np.ndarray) -> float:
    return float((image[..., :3] < 0.95).any(axis=-1).mean())


def html_images(page: str) -> list[np.ndarray]:
    return [
        imread(io.BytesIO(base64.b64decode(m)), format="png")
        for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    ]


def test_png_has_a_block_of_panels_per_entity(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    scores, alerts = synthetic
    summary = write_report(scores, tmp_path / "all.png", alerts)
    assert summary.shown == ["b", "c", "a"]  # most alerts first
    assert summary.left_out == []
    assert (summary.firing, summary.resolved) == (3, 1)
    image = imread(tmp_path / "all.png")
    assert image.shape[1] == int(FIGURE_WIDTH_IN * DPI)
    assert non_white_fraction(image) > 0.03
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50

    write_report(scores, tmp_path / "one.png", alerts, entities=["a"])
    one = imread(tmp_path / "one.png")
    assert one.shape[1] == image.shape[1]
    assert image.shape[0] > 2.5 * one.shape[0]


def test_max_entities_keeps_the_ones_with_most_alerts(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    scores, alerts = synthetic
    summary = write_report(scores, tmp_path / "r.png", alerts, max_entities=2)
    assert summary.shown == ["b", "c"]
    assert summary.left_out == ["a"]
    full = write_report(scores, tmp_path / "r.html", alerts, max_entities=1)
    assert full.shown == ["b"]
    page = (tmp_path / "r.html").read_text()
    assert "2 entities left out" in page


def test_html_is_self_contained_with_one_image_and_alert_table_per_entity(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    scores, alerts = synthetic
    write_report(scores, tmp_path / "r.html", alerts)
    page = (tmp_path / "r.html").read_text()
    images = html_images(page)
    assert len(images) == page.count("<img") == len(ENTITIES)
    for image in images:
        assert image.shape[1] == int(FIGURE_WIDTH_IN * DPI)
        assert non_white_fraction(image) > 0.03
    for *_, aid in ALERTS:
        assert aid in page
    assert "<script" not in page and 'src="http' not in page and "<link" not in page
    assert "<td>alerts firing</td><td>3</td>" in page
    assert "<td>rejected rows</td><td>1</td>" in page
    assert "<td>wrong_type</td><td>1</td>" in page
    assert page.count("No alerts.") == 1  # entity a


def test_entities_filter(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    scores, alerts = synthetic
    summary = write_report(scores, tmp_path / "r.html", alerts, entities=["c", "a"])
    assert summary.shown == ["c", "a"]
    page = (tmp_path / "r.html").read_text()
    assert len(html_images(page)) == 2
    assert "alert-c-1" in page and "alert-b-1" not in page
    with pytest.raises(InputError, match="not in the scores file: zz"):
        write_report(scores, tmp_path / "r2.html", alerts, entities=["a", "zz"])


def test_without_alerts_file_markers_come_from_the_alert_id_column(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    scores, _ = synthetic
    table = read_scores(scores)
    derived = {(a.entity, a.id, a.time_ms) for a in alerts_from_scores(table)}
    assert derived == {(e, aid, ms_of(at)) for e, at, st, _, aid in ALERTS if st == "firing"}
    summary = write_report(scores, tmp_path / "r.html")
    assert summary.shown == ["b", "c", "a"]
    assert "alert-b-2" in (tmp_path / "r.html").read_text()


def test_score_panel_goes_log_when_scores_span_decades(synthetic: tuple[Path, Path]) -> None:
    table = read_scores(synthetic[0])
    fig = Figure()
    spiky, flat = fig.add_subplot(211), fig.add_subplot(212)
    draw_entity(None, spiky, table.entities["b"], None, [])
    draw_entity(None, flat, table.entities["a"], None, [])
    assert spiky.get_yscale() == "log"
    assert flat.get_yscale() == "linear"
    # training shaded once; two anomalous stretches shaded
    assert len(spiky.patches) == 1 + len(ANOMALIES["b"])
    assert len(flat.patches) == 1
    labels = [t.get_text() for t in spiky.get_legend().get_texts()]
    assert labels[:2] == ["score", "threshold"]


def test_labeled_windows_are_outlined_on_both_panels_and_named_in_the_legend(synthetic: tuple[Path, Path]) -> None:
    table = read_scores(synthetic[0])
    trace = table.entities["b"]
    fig = Figure()
    series_ax, score_ax = fig.add_subplot(211), fig.add_subplot(212)
    labeled = [(ms_of(55), ms_of(66)), (ms_of(100), ms_of(110))]
    draw_entity(series_ax, score_ax, trace, None, [], labeled)
    hatched = [p for p in score_ax.patches if p.get_hatch() == "//"]
    assert len(hatched) == 2
    assert len([p for p in series_ax.patches if p.get_hatch() == "//"]) == 2
    # Each spans exactly its window, on the date axis the rest of the panel uses.
    starts = sorted(float(p.get_x()) for p in hatched)
    assert starts == pytest.approx([date2num(START + timedelta(minutes=m)) for m in (55, 100)], abs=1e-9)
    widths = sorted(round(float(p.get_width()) * 24 * 60, 6) for p in hatched)
    assert widths == [10, 11]
    assert "labeled window" in [t.get_text() for t in score_ax.get_legend().get_texts()]

    plain = Figure().add_subplot(111)
    draw_entity(None, plain, trace, None, [])
    assert not any(p.get_hatch() for p in plain.patches)
    assert "labeled window" not in [t.get_text() for t in plain.get_legend().get_texts()]


def test_labeled_windows_reach_the_png_and_the_html(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    scores, alerts = synthetic
    labeled = [(ms_of(55), ms_of(66))]
    write_report(scores, tmp_path / "plain.png", alerts, entities=["b"])
    write_report(scores, tmp_path / "labeled.png", alerts, entities=["b"], labeled=labeled)
    plain, drawn = imread(tmp_path / "plain.png"), imread(tmp_path / "labeled.png")
    assert plain.shape == drawn.shape
    assert not np.array_equal(plain, drawn)
    write_report(scores, tmp_path / "labeled.html", alerts, entities=["b"], labeled=labeled)
    assert "<td>labeled windows</td><td>1</td>" in (tmp_path / "labeled.html").read_text()


def test_windows_file_as_a_list_or_keyed_like_nab(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([["2024-01-01 00:55:00", "2024-01-01 01:06:00.000000"]]))
    assert read_windows(listed) == [(ms_of(55), ms_of(66))]
    keyed = tmp_path / "combined_windows.json"
    keyed.write_text(json.dumps({"realX/b.csv": [["2024-01-01 00:55:00.000000", "2024-01-01 01:06:00.000000"]],
                                 "realX/none.csv": []}))  # fmt: skip
    assert read_windows(keyed, "realX/b.csv") == [(ms_of(55), ms_of(66))]
    assert read_windows(keyed, "realX/none.csv") == []


@pytest.mark.parametrize(
    ("content", "key", "message"),
    [
        ("[[1, 2", None, "not JSON"),
        ('{"a.csv": []}', None, "expected a list of \\[start, end\\] pairs, got a dict"),
        ('[["2024-01-01", "2024-01-02"]]', "a.csv", "--windows-key needs a JSON object"),
        ('{"a.csv": []}', "b.csv", "no key 'b.csv'"),
        ('[["2024-01-01"]]', None, "item 0: expected \\[start, end\\]"),
        ('[["2024-01-01", "soon"]]', None, "item 0: cannot parse the timestamps"),
        ('[["2024-01-02", "2024-01-01"]]', None, "item 0: ends before it starts"),
    ],
)
def test_bad_windows_file_is_an_input_error(tmp_path: Path, content: str, key: str | None, message: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_windows(path, key)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("row,entity,score\n1,a,0.1\n", "missing column"),
        (
            ",".join(SCORE_COLUMNS) + "\n1,a,2024-01-01T00:00:00.000Z,high,0.5,0,,score,\n",
            "score 'high' is not a number",
        ),
        (",".join(SCORE_COLUMNS) + "\n1,a,yesterday,0.1,0.5,0,,score,\n", "cannot parse timestamp"),
        (",".join(SCORE_COLUMNS) + "\n", "no usable rows"),
    ],
)
def test_bad_scores_file_is_an_input_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "scores.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        write_report(path, tmp_path / "r.png")


def test_cli_bad_input_exits_2_with_a_message(
    synthetic: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores, _ = synthetic
    assert main(["report", "--scores", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r.png")]) == EXIT_USAGE
    assert "cannot read scores file" in capsys.readouterr().err
    assert main(["report", "--scores", str(scores), "--out", str(tmp_path / "r.pdf")]) == EXIT_USAGE
    assert "must end in .png or .html" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"status": "firing"}\n')
    args = [
        "report",
        "--scores",
        str(scores),
        "--alerts",
        str(tmp_path / "bad.jsonl"),
        "--out",
        str(tmp_path / "r.png"),
    ]
    assert main(args) == EXIT_USAGE
    assert "line 1: not an alert" in capsys.readouterr().err
    assert main(["report", "--scores", str(scores), "--input", str(scores), "--out", str(tmp_path / "r.png")]) == 2
    assert "--input needs --config" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def test_cli_draws_labeled_windows_and_refuses_a_key_without_a_file(
    synthetic: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores, alerts = synthetic
    windows = tmp_path / "combined_windows.json"
    windows.write_text(json.dumps({"b.csv": [[format_timestamp(ms_of(55)), format_timestamp(ms_of(66))]]}))
    common = ["report", "--scores", str(scores), "--alerts", str(alerts), "--out", str(tmp_path / "r.html")]
    assert main([*common, "--windows", str(windows), "--windows-key", "b.csv"]) == EXIT_OK
    assert "<td>labeled windows</td><td>1</td>" in (tmp_path / "r.html").read_text()
    assert main([*common, "--windows", str(windows), "--windows-key", "c.csv"]) == EXIT_USAGE
    assert "no key 'c.csv'" in capsys.readouterr().err
    assert main([*common[:-2], "--out", str(tmp_path / "k.png"), "--windows-key", "b.csv"]) == EXIT_USAGE
    assert "--windows-key needs --windows" in capsys.readouterr().err
    assert not (tmp_path / "k.png").exists()


def test_cli_without_matplotlib_exits_2(
    synthetic: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["report", "--scores", str(synthetic[0]), "--out", str(tmp_path / "r.png")]) == EXIT_USAGE
    assert "pip install 'detector[report]'" in capsys.readouterr().err


def test_feature_values_are_aligned_by_row_number(synthetic: tuple[Path, Path]) -> None:
    table = read_scores(synthetic[0])
    rows = np.arange(1, PER_ENTITY * len(ENTITIES) + 1)
    entities = [ENTITIES[(r - 1) % len(ENTITIES)] for r in rows]
    values = np.stack([rows * 1.0, -rows * 1.0], axis=1).astype(np.float32)
    keep = rows != 5  # a row the decoder rejected: no values for it
    samples = SampleBatch(
        [e for e, k in zip(entities, keep, strict=True) if k],
        np.zeros(int(keep.sum()), np.int64),
        values[keep],
        rows[keep],
    )
    traces = feature_traces(table, samples, ["x", "y"])
    b = traces["b"]
    expected = table.entities["b"].rows.astype(np.float64)
    expected[expected == 5] = np.nan
    np.testing.assert_array_equal(b.values[:, 0], expected)
    np.testing.assert_array_equal(b.values[:, 1], -expected)

    shifted = SampleBatch(samples.entities, samples.timestamps, samples.values, samples.positions + 1)
    with pytest.raises(InputError, match="does not match --scores"):
        feature_traces(table, shifted, ["x", "y"])


CONFIG = """
streams:
  web:
    input: {kind: file, path: data.csv}
    mapping: {entity: host, timestamp: timestamp, features: [cpu, mem]}
    window: {size: 8}
    model: {hidden_size: 8, latent_size: 4}
    training: {epochs: 2, batch_size: 64, early_stopping_patience: 0}
    thresholds:
      warning: {rule: quantile, q: 0.9}
    alerts: {n: 1, m: 2, cooldown_s: 0}
"""


def test_cli_replay_then_report_with_feature_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    lines = ["timestamp,host,cpu,mem"]
    for i in range(160):
        for host in ("h1", "h2"):
            cpu = math.sin(i / 5) + (6.0 if host == "h2" and 130 <= i < 134 else 0.0)
            lines.append(f"{format_timestamp(ms_of(i))},{host},{cpu:.4f},{math.cos(i / 7) * 10:.4f}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    cfg, data, scores, alerts = (str(tmp_path / n) for n in ("c.yaml", "data.csv", "scores.csv", "alerts.jsonl"))
    replay = ["replay", "--config", cfg, "--input", data, "--out", scores, "--alerts", alerts, "--train-rows", "50%"]
    assert main([*replay, "--quiet"]) == EXIT_OK
    fired = [json.loads(line) for line in Path(alerts).read_text().splitlines()]

    common = ["report", "--scores", scores, "--alerts", alerts, "--config", cfg, "--input", data]
    assert main([*common, "--out", str(tmp_path / "r.png")]) == EXIT_OK
    assert "wrote" in capsys.readouterr().err
    image = imread(tmp_path / "r.png")
    assert image.shape[1] == int(FIGURE_WIDTH_IN * DPI)
    assert non_white_fraction(image) > 0.03

    assert main([*common, "--out", str(tmp_path / "r.html"), "--entities", "h2"]) == EXIT_OK
    page = (tmp_path / "r.html").read_text()
    assert len(html_images(page)) == 1
    for alert in fired:
        assert (alert["id"] in page) == (alert["entity"] == "h2")
