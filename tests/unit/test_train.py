"""Training edge cases: too few windows to train, and the rows training skips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.cli import EXIT_USAGE, main
from detector.config import Stream
from detector.errors import InputError
from detector.source import Rejection, SampleBatch
from detector.train import MIN_TRAIN_WINDOWS, fit, split_validation

WINDOW = 4


def make_stream(**training: Any) -> Stream:
    return Stream.model_validate(
        {
            "input": {"kind": "file", "path": "x.csv"},
            "mapping": {"entity": "host", "features": ["a"]},
            "window": {"size": WINDOW},
            "model": {"hidden_size": 4, "latent_size": 2},
            "training": {"epochs": 1, "batch_size": 8} | training,
        }
    )


def samples(rows_per_entity: int, n_entities: int) -> SampleBatch:
    """Entities one after the other, each with its own increasing timestamps."""
    entities = [f"e{k}" for k in range(n_entities) for _ in range(rows_per_entity)]
    ts = np.tile(np.arange(rows_per_entity, dtype=np.int64) * 1000, n_entities)
    values = np.random.default_rng(0).normal(size=(len(entities), 1)).astype(np.float32)
    return SampleBatch(entities, ts, values, np.arange(1, len(entities) + 1, dtype=np.int64))


@pytest.mark.parametrize(
    ("rows_per_entity", "n_entities", "got"),
    [
        (WINDOW, 10, 0),  # one window per entity: every window validates, none trains
        (WINDOW - 1, 3, 0),  # no window at all
        (WINDOW + 3, 1, 3),  # four windows, one held out
    ],
)
def test_too_few_training_windows_is_an_input_error(rows_per_entity: int, n_entities: int, got: int) -> None:
    with pytest.raises(InputError, match=f"need at least {MIN_TRAIN_WINDOWS} training windows, got {got}") as info:
        fit("web", make_stream(), samples(rows_per_entity, n_entities), progress=False)
    assert "window.size=4" in str(info.value)


def test_enough_windows_train() -> None:
    ckpt = fit("web", make_stream(), samples(WINDOW + 4, 1), progress=False)
    assert ckpt.training["train_windows"] == MIN_TRAIN_WINDOWS
    assert ckpt.training["validation_windows"] == 1


@pytest.mark.parametrize("gap", [0, 3, 63])
def test_more_windows_never_mean_fewer_training_windows(gap: int) -> None:
    # The gap between training and validation windows is kept only when it leaves enough
    # training windows, so adding windows never makes a trainable entity untrainable.
    counts = []
    for n in range(1, 200):
        train, val = split_validation(np.zeros(n, np.int64), 0.2, gap)
        assert len(val) >= 1
        assert not set(train) & set(val)
        counts.append(len(train))
    trainable = [c >= MIN_TRAIN_WINDOWS for c in counts]
    assert trainable == sorted(trainable)


def test_split_validation_of_no_windows() -> None:
    train, val = split_validation(np.empty(0, np.int64), 0.2, 3)
    assert train.tolist() == val.tolist() == []


def test_single_window_entities_exit_2_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "streams:\n  web:\n    input: {kind: file, path: data.csv}\n"
        "    mapping: {entity: host, timestamp: null, features: [a]}\n    window: {size: 4}\n"
    )
    # Twenty hosts with exactly window.size rows each: twenty windows, all held out.
    lines = ["host,a"] + [f"h{k},{i * 0.1}" for k in range(20) for i in range(WINDOW)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "m.pt"), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"need at least {MIN_TRAIN_WINDOWS} training windows, got 0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()


def test_fit_reports_the_out_of_order_rows_it_skips() -> None:
    batch = samples(20, 1)
    batch.timestamps[[5, 12]] = [0, 1000]  # older than the entity's newest sample by then
    rejected: list[Rejection] = []
    ckpt = fit("web", make_stream(), batch, progress=False, rejected=rejected)
    assert [(r.position, r.reason) for r in rejected] == [(6, "out_of_order"), (13, "out_of_order")]
    assert ckpt.training["rows"] == 18
