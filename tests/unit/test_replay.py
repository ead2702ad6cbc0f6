"""`detector replay` and `detector train` on files: every rejected row is counted and reported,
in the training part too."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from detector.config import Config, load_config
from detector.replay import TrainSplit, replay_file, train_file

CONFIG = """
streams:
  web:
    input: {kind: file, path: data.csv}
    mapping: {entity: host, timestamp: ts, timestamp_format: unix_s, features: [cpu]}
    window: {size: 4}
    model: {hidden_size: 4, latent_size: 2}
    training: {epochs: 1, early_stopping_patience: 0}
    alerts: {n: 1, m: 2, cooldown_s: 0}
"""
ROWS = 40
LATE_ROW = 11  # data row stamped before its predecessors, inside the first half (the training part)


def write_data(path: Path) -> None:
    lines = ["ts,host,cpu"]
    for i in range(1, ROWS + 1):
        ts = 5 if i == LATE_ROW else 100 + i
        lines.append(f"{ts},a,{math.sin(i / 3):.4f}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "c.yaml").write_text(CONFIG)
    write_data(tmp_path / "data.csv")
    return load_config(tmp_path / "c.yaml")


def scores(path: Path) -> dict[int, dict[str, str]]:
    with path.open(newline="") as f:
        return {int(r["row"]): r for r in csv.DictReader(f)}


def test_out_of_order_training_rows_are_counted_and_written(config: Config, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    summary, _ = replay_file(config, None, None, out, split=TrainSplit(fraction=0.5), progress=False)
    assert summary.rejected == {"out_of_order": 1}
    assert summary.rejected_rows == {"out_of_order": [LATE_ROW]}
    assert summary.train_rows == ROWS // 2 - 1
    assert f"rejected out_of_order: 1 (rows {LATE_ROW})" in summary.lines()
    rows = scores(out)
    assert sorted(rows) == list(range(1, ROWS + 1))
    assert rows[LATE_ROW]["rejected"] == "out_of_order"
    assert rows[LATE_ROW]["phase"] == ""
    assert sum(r["phase"] == "train" for r in rows.values()) == ROWS // 2 - 1


def test_out_of_order_warm_up_rows_are_counted_with_a_checkpoint(config: Config, tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    train_file(config, None, None, model, progress=False)
    out = tmp_path / "scores.csv"
    split = TrainSplit(fraction=0.5)
    summary, _ = replay_file(config, None, None, out, checkpoint=model, split=split, progress=False)
    assert summary.rejected_rows == {"out_of_order": [LATE_ROW]}
    assert scores(out)[LATE_ROW]["rejected"] == "out_of_order"


def test_train_reports_the_out_of_order_rows_it_skipped(config: Config, tmp_path: Path) -> None:
    ckpt, summary = train_file(config, None, None, tmp_path / "m.pt", progress=False)
    assert summary.rows == ROWS
    assert summary.rejected_rows == {"out_of_order": [LATE_ROW]}
    assert summary.train_rows == ROWS - 1
    assert ckpt.training["rows"] == ROWS - 1
    assert "rows read: 40 (training: 39, rejected: 1)" in summary.lines()
