"""The command line, in process: exit codes, messages, and train + replay on a tiny model."""

from __future__ import annotations

import csv
import json
import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from detector.cli import EXIT_OK, EXIT_USAGE, main, package_version
from detector.model import load_checkpoint

START = datetime(2024, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=1)
ROWS_PER_ENTITY = 300
SPIKE_ROWS = range(250, 256)  # entity b, scored part: a burst far outside anything seen in training

CONFIG = """
streams:
  web:
    input: {kind: file, path: data.csv}
    mapping: {entity: host, timestamp: timestamp, features: [cpu, mem]}
    window: {size: 8}
    model: {hidden_size: 8, latent_size: 4}
    training: {epochs: 2, batch_size: 64, early_stopping_patience: 0}
    thresholds:
      warning: {rule: quantile, q: 0.99}
    alerts: {n: 1, m: 2, cooldown_s: 0}
    checkpoint: model.pt
"""

# Malformed rows appended to the clean data: (line, rejection reason).
BAD_ROWS = [
    (["2024-01-01T03:00:30Z", "a", "oops", "1"], "wrong_type"),
    (["2024-01-01T03:01:30Z", "", "1", "1"], "missing_field"),
    (["yesterday", "b", "1", "1"], "bad_timestamp"),
    (["2024-01-01T03:02:30Z", "b", "inf", "1"], "non_finite"),
    (["2024-01-01T00:00:30Z", "a", "0.1", "0.2"], "out_of_order"),  # older than a's newest sample
]


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_rows(seed: int = 0, spike: bool = True) -> list[list[str]]:
    """Two hosts, a sine + noise each, interleaved in time; a spike on host b late on."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(ROWS_PER_ENTITY):
        for k, host in enumerate(("a", "b")):
            cpu = math.sin(2 * math.pi * i / 25 + k) + 0.05 * rng.normal()
            mem = 0.5 * math.cos(2 * math.pi * i / 40) + 0.05 * rng.normal()
            if spike and host == "b" and i in SPIKE_ROWS:
                cpu, mem = 40.0, -40.0
            rows.append([iso(START + i * STEP), host, f"{cpu:.5f}", f"{mem:.5f}"])
    return rows


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("timestamp", "host", "cpu", "mem")) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_scores(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with config.yaml, data.csv (with a spike and bad rows) and model.pt, trained by
    `detector train` on the same rows without the spike (history.csv)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "config.yaml").write_text(CONFIG)
    write_csv(folder / "data.csv", make_rows() + [row for row, _ in BAD_ROWS])
    write_csv(folder / "history.csv", make_rows(spike=False) + [row for row, _ in BAD_ROWS])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    try:
        code = main(
            ["train", "--config", str(folder / "config.yaml"), "--input", str(folder / "history.csv"), "--quiet"]
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    assert code == EXIT_OK
    return folder


# --- version and usage ----------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == f"detector {package_version()}"
    assert package_version() != ""


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["train"], ["replay", "--config", "x.yaml"], ["--log-level", "loud", "demo"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: detector" in capsys.readouterr().err


# --- check-config -------------------------------------------------------------------------


def test_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(CONFIG)
    assert main(["check-config", str(path)]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}: ok (1 stream(s): web)" in captured.err


def test_check_config_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG.replace("window: {size: 8}", "window: {size: 1}").replace("q: 0.99", "q: 7"))
    assert main(["check-config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"invalid config {path}: 2 problem(s)" in err
    assert "streams.web.window.size: Input should be greater than or equal to 2" in err
    assert "streams.web.thresholds.warning.q: " in err
    assert "Traceback" not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    assert main(["check-config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(path) in err
    assert "cannot read" in err


def test_check_config_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("streams: {web: [\n")
    assert main(["check-config", str(path)]) == EXIT_USAGE
    assert "not valid YAML" in capsys.readouterr().err


def test_check_config_show_masks_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETECTOR_TOPIC", "s3cr3t-topic")
    path = tmp_path / "kafka.yaml"
    path.write_text(
        "streams:\n"
        "  web.prod:\n"
        "    input: {kind: kafka, topic: '${DETECTOR_TOPIC}'}\n"
        "    mapping: {features: [cpu]}\n"
        "    window: {size: '${DETECTOR_WINDOW:-16}'}\n"
    )
    assert main(["check-config", "--show", str(path)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "s3cr3t" not in captured.out
    assert "s3cr3t" not in captured.err
    shown = yaml.safe_load(captured.out)
    assert shown["streams"]["web.prod"]["input"] == {"kind": "kafka", "topic": "***"}
    assert shown["streams"]["web.prod"]["window"]["size"] == "***"
    assert shown["streams"]["web.prod"]["mapping"]["features"][0]["name"] == "cpu"
    assert "ok (1 stream(s): web.prod)" in captured.err


def test_check_config_missing_env_var(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DETECTOR_NO_SUCH_VAR", raising=False)
    path = tmp_path / "env.yaml"
    path.write_text(CONFIG.replace("path: data.csv", "path: '${DETECTOR_NO_SUCH_VAR}'"))
    assert main(["check-config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "streams.web.input.path: environment variable DETECTOR_NO_SUCH_VAR is not set" in err


# --- train ------------------------------------------------------------------------------


def test_train_writes_a_checkpoint_for_the_config(trained: Path) -> None:
    from detector.config import load_config

    stream = load_config(trained / "config.yaml").streams["web"]
    ckpt = load_checkpoint(trained / "model.pt", stream)
    assert ckpt.features == ("cpu", "mem")
    assert ckpt.window_size == 8
    assert ckpt.layout_hash == stream.layout_hash()
    # Rejected rows are not trained on, nor is the out-of-order one (it decodes, then training skips it).
    assert ckpt.training["rows"] == 2 * ROWS_PER_ENTITY
    assert ckpt.training["entities"] == 2
    assert ckpt.training["epochs"] == 2
    assert math.isfinite(ckpt.training["best_validation_loss"])


def test_train_prints_a_summary(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "again.pt"
    assert main(["train", "--config", str(trained / "config.yaml"), "--out", str(out), "--quiet"]) == EXIT_OK
    assert out.exists()
    err = capsys.readouterr().err
    assert f"saved {out}: version web-" in err
    assert "rejected wrong_type: 1 (rows 601)" in err
    assert "rejected out_of_order: 1 (rows 605)" in err


def test_train_without_output_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.replace("    checkpoint: model.pt\n", ""))
    write_csv(tmp_path / "data.csv", make_rows()[:40])
    assert main(["train", "--config", str(config), "--quiet"]) == EXIT_USAGE
    assert "give --out" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))


def test_train_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    assert main(["train", "--config", str(config), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(tmp_path / "data.csv") in err
    assert "no such file" in err
    assert not (tmp_path / "model.pt").exists()


def test_train_too_few_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    write_csv(tmp_path / "data.csv", make_rows()[:10])
    assert main(["train", "--config", str(config), "--quiet"]) == EXIT_USAGE
    assert "training windows" in capsys.readouterr().err


def test_train_unknown_stream(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(trained / "config.yaml"), "--stream", "api", "--quiet"]) == EXIT_USAGE
    assert "no stream named 'api'" in capsys.readouterr().err


# --- replay -----------------------------------------------------------------------------


def replay(trained: Path, out: Path, *extra: str) -> int:
    return main(["replay", "--config", str(trained / "config.yaml"), "--out", str(out), "--quiet", *extra])


def test_replay_writes_one_row_per_input_row(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.csv"
    alerts = tmp_path / "alerts.jsonl"
    assert replay(trained, out, "--alerts", str(alerts)) == EXIT_OK
    rows = read_scores(out)
    n_input = 2 * ROWS_PER_ENTITY + len(BAD_ROWS)
    assert len(rows) == n_input
    assert [int(r["row"]) for r in rows] == list(range(1, n_input + 1))
    assert list(rows[0]) == [
        "row",
        "entity",
        "timestamp",
        "score",
        "threshold",
        "is_anomaly",
        "alert_id",
        "phase",
        "rejected",
    ]

    bad = {int(r["row"]): r["rejected"] for r in rows if r["rejected"]}
    assert bad == {2 * ROWS_PER_ENTITY + 1 + i: reason for i, (_, reason) in enumerate(BAD_ROWS)}
    for r in rows:
        if r["rejected"]:
            assert r["score"] == ""
            assert r["is_anomaly"] == "0"

    good = [r for r in rows if not r["rejected"]]
    assert {r["phase"] for r in good} == {"score"}
    assert good[0]["timestamp"] == "2024-01-01T00:00:00.000Z"
    assert [r["entity"] for r in good[:4]] == ["a", "b", "a", "b"]
    for host in ("a", "b"):
        mine = [r for r in good if r["entity"] == host]
        # The first window.size - 1 samples of each entity only fill the window.
        assert all(r["score"] == "" for r in mine[:7])
        assert all(r["score"] != "" for r in mine[7:])
        for r in mine[7:]:
            assert float(r["score"]) >= 0
            assert float(r["threshold"]) > 0
            assert r["is_anomaly"] == str(int(float(r["score"]) > float(r["threshold"])))

    # The spike on host b is anomalous and alerted on; host a (no spike) is quiet there.
    spike = [r for r in good if r["entity"] == "b"][SPIKE_ROWS.start : SPIKE_ROWS.stop]
    assert all(r["is_anomaly"] == "1" for r in spike)
    assert any(r["alert_id"] for r in spike)
    events = [json.loads(line) for line in alerts.read_text().splitlines()]
    firing = [e for e in events if e["status"] == "firing" and e["entity"] == "b"]
    assert firing
    assert any(e["id"] in {r["alert_id"] for r in spike} for e in firing)

    err = capsys.readouterr().err
    assert f"rows read: {n_input} (training: 0, rejected: {len(BAD_ROWS)})" in err
    assert "rejected out_of_order: 1 (rows 605)" in err


def test_replay_does_not_depend_on_batch_rows(trained: Path, tmp_path: Path) -> None:
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    assert replay(trained, big) == EXIT_OK
    assert replay(trained, small, "--batch-rows", "7") == EXIT_OK
    assert big.read_text() == small.read_text()


def test_replay_train_rows_percent(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    saved = tmp_path / "kept.pt"
    assert replay(trained, out, "--train-rows", "50%", "--save-checkpoint", str(saved)) == EXIT_OK
    rows = read_scores(out)
    assert len(rows) == 2 * ROWS_PER_ENTITY + len(BAD_ROWS)
    good = [r for r in rows if not r["rejected"]]
    # The out-of-order row is decoded fine, so it counts for a's share but is dropped later.
    for host in ("a", "b"):
        phases = [r["phase"] for r in good if r["entity"] == host]
        n_decoded = ROWS_PER_ENTITY + (1 if host == "a" else 0)
        assert phases[: n_decoded // 2] == ["train"] * (n_decoded // 2)
        assert set(phases[n_decoded // 2 :]) == {"score"}
    train_rows = [r for r in good if r["phase"] == "train"]
    assert all(r["score"] == "" and r["is_anomaly"] == "0" for r in train_rows)
    # Windows are already warm when scoring starts, so the first scored row has a score.
    first_scored = next(r for r in good if r["phase"] == "score")
    assert first_scored["score"] != ""
    assert saved.exists()
    assert load_checkpoint(saved).training["rows"] == len(train_rows)


def test_replay_train_rows_count(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    assert replay(trained, out, "--train-rows", "100") == EXIT_OK
    good = [r for r in read_scores(out) if not r["rejected"]]
    for host in ("a", "b"):
        phases = [r["phase"] for r in good if r["entity"] == host]
        assert phases.count("train") == 100
        assert phases[:100] == ["train"] * 100


def test_replay_train_until(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    cut = START + 120 * STEP
    assert replay(trained, out, "--train-until", iso(cut)) == EXIT_OK
    rows = read_scores(out)
    assert len(rows) == 2 * ROWS_PER_ENTITY + len(BAD_ROWS)
    late_row = 2 * ROWS_PER_ENTITY + len(BAD_ROWS)  # stamped 00:00:30, so it falls in the training part
    on_time = [r for r in rows if not r["rejected"] and int(r["row"]) != late_row]
    for r in on_time:
        before = datetime.fromisoformat(r["timestamp"]) < cut
        assert r["phase"] == ("train" if before else "score"), r
    assert sum(r["phase"] == "train" for r in on_time) == 2 * 120


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-rows", "abc"], "--train-rows: expected a positive row count or a percentage"),
        (["--train-rows", "0"], "--train-rows"),
        (["--train-rows", "150%"], "--train-rows"),
        (["--train-until", "soon"], "--train-until: cannot parse 'soon'"),
        (["--train-rows", "10", "--train-until", "2024-01-01"], "not both"),
        (["--stream", "nope"], "no stream named 'nope'"),
    ],
)
def test_replay_bad_arguments(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "scores.csv"
    assert replay(trained, out, *args) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_replay_missing_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.pt"
    assert replay(trained, tmp_path / "s.csv", "--checkpoint", str(missing)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "not found" in err
    assert "Traceback" not in err


def test_replay_checkpoint_for_other_features(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint trained on (cpu, disk) does not fit a stream that maps (cpu, mem).
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text(CONFIG.replace("[cpu, mem]", "[cpu, disk]"))
    write_csv(other / "data.csv", make_rows()[:200], header=("timestamp", "host", "cpu", "disk"))
    assert main(["train", "--config", str(other / "config.yaml"), "--quiet"]) == EXIT_OK
    capsys.readouterr()
    out = tmp_path / "s.csv"
    assert replay(trained, out, "--checkpoint", str(other / "model.pt")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(other / "model.pt") in err
    assert "trained on features ['cpu', 'disk'] but the stream maps ['cpu', 'mem']" in err
    assert not out.exists()


def test_replay_checkpoint_for_another_window_size(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.replace("window: {size: 8}", "window: {size: 12}"))
    out = tmp_path / "s.csv"
    argv = ["replay", "--config", str(config), "--input", str(trained / "data.csv"), "--out", str(out)]
    code = main([*argv, "--checkpoint", str(trained / "model.pt"), "--quiet"])
    assert code == EXIT_USAGE
    assert "windows of 8 samples but the stream uses window.size 12" in capsys.readouterr().err


def test_replay_garbage_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file")
    assert replay(trained, tmp_path / "s.csv", "--checkpoint", str(junk)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"detector: checkpoint {junk} " in err
    assert "Traceback" not in err


def test_replay_invalid_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.replace("alerts: {n: 1, m: 2", "alerts: {n: 3, m: 2"))
    assert main(["replay", "--config", str(config), "--out", str(tmp_path / "s.csv")]) == EXIT_USAGE
    assert "streams.web.alerts: Value error, n (3) must be <= m (2)" in capsys.readouterr().err


def test_replay_json_logs(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--log-format", "json", "--log-level", "warning"]
    argv += ["replay", "--config", str(trained / "config.yaml"), "--out", str(tmp_path / "s.csv"), "--quiet"]
    assert main(argv) == EXIT_OK
    err = capsys.readouterr().err
    entries: list[dict[str, Any]] = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert entries
    assert all(e["level"] == "warning" for e in entries)
    assert any("rejected (wrong_type)" in e["msg"] for e in entries)
    assert all(e["ts"].endswith("Z") for e in entries)


def test_kafka_error_repeats_are_held_back_and_counted() -> None:
    from detector.cli import RepeatFilter

    repeat = RepeatFilter(interval_s=30)

    def record(name: str, msg: str, created: float, level: int = logging.ERROR) -> logging.LogRecord:
        r = logging.LogRecord(name, level, __file__, 1, msg, ("x",), None)
        r.created = created
        return r

    conn = "kafka.conn"
    assert repeat.filter(record(conn, "connect to %s failed", 0.0))
    assert not any(repeat.filter(record(conn, "connect to %s failed", t)) for t in (0.1, 5.0, 29.0))
    assert repeat.filter(record(conn, "another error %s", 1.0))  # another message passes
    assert repeat.filter(record("detector.service", "lost the broker %s", 1.0))  # ours always pass
    assert repeat.filter(record(conn, "connecting %s", 2.0, logging.INFO))  # below warning: not ours to hold
    later = record(conn, "connect to %s failed", 31.0)
    assert repeat.filter(later)
    assert later.getMessage() == "connect to x failed (3 more like it in the last 30 s)"
