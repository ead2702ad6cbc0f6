"""`detector train` into a model store, `detector models`, and rollback restoring scores exactly."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from detector.cli import EXIT_BUG, EXIT_OK, EXIT_USAGE, main
from detector.config import load_config
from detector.pipeline import Pipeline
from detector.replay import read_samples
from detector.store import CheckpointStore

START = datetime(2024, 1, 1, tzinfo=UTC)
ROWS_PER_ENTITY = 200

CONFIG = """
streams:
  web:
    input: {{kind: file, path: data.csv}}
    mapping: {{entity: host, timestamp: timestamp, features: [cpu, mem]}}
    window: {{size: {window}}}
    model: {{hidden_size: 8, latent_size: 4}}
    training: {{epochs: 2, batch_size: 64, early_stopping_patience: 0, seed: {seed}}}
    thresholds:
      warning: {{rule: quantile, q: 0.99}}
    alerts: {{n: 1, m: 2, cooldown_s: 0}}
    model_store: models
server: {{port: {port}}}
"""


def config_text(seed: int = 0, window: int = 8, port: int = 9108) -> str:
    return CONFIG.format(seed=seed, window=window, port=port)


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "host", "cpu", "mem"])
        for i in range(ROWS_PER_ENTITY):
            for k, host in enumerate(("a", "b")):
                cpu = math.sin(2 * math.pi * i / 25 + k) + 0.05 * rng.normal()
                mem = 0.5 * math.cos(2 * math.pi * i / 40) + 0.05 * rng.normal()
                if host == "b" and 150 <= i < 155:
                    cpu, mem = 30.0, -30.0
                stamp = (START + i * timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
                writer.writerow([stamp, host, f"{cpu:.5f}", f"{mem:.5f}"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.yaml and v2.yaml (another training seed) on one store, each trained once by
    `detector train`: the first version is promoted, the second only stored."""
    folder = tmp_path_factory.mktemp("store")
    (folder / "config.yaml").write_text(config_text(seed=0))
    (folder / "v2.yaml").write_text(config_text(seed=1))
    write_data(folder / "data.csv")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for name in ("config.yaml", "v2.yaml"):
            assert main(["train", "--config", str(folder / name), "--quiet"]) == EXIT_OK
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return folder


@pytest.fixture
def folder(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained folder, for tests that promote."""
    return Path(shutil.copytree(trained, tmp_path / "copy"))


def models(folder: Path, *argv: str, config: str = "config.yaml") -> int:
    action, *rest = argv
    return main(["models", action, "--config", str(folder / config), *rest])


def versions(folder: Path) -> list[str]:
    return [v.version for v in CheckpointStore(folder / "models").versions()]


# --- train into a store -----------------------------------------------------------------


def test_train_stores_versions_and_promotes_only_the_first(trained: Path) -> None:
    store = CheckpointStore(trained / "models")
    first, second = store.versions()
    assert store.promoted() == first.version
    assert first.source == second.source == "train"
    assert first.parent is None and second.parent == first.version
    assert first.trained_on == {
        "rows": 2 * ROWS_PER_ENTITY,
        "from": "2024-01-01T00:00:00.000Z",
        "until": (START + (ROWS_PER_ENTITY - 1) * timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "input": str(trained / "data.csv"),
    }
    ckpt = store.load(first.version)
    assert first.validation_error == pytest.approx(ckpt.errors.mean)
    assert first.layout_hash == second.layout_hash == load_config(trained / "config.yaml").streams["web"].layout_hash()
    assert not list(trained.glob("*.pt"))  # nothing written beside the store


def test_train_promote_flag_promotes_the_new_version(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = versions(folder)
    (folder / "v3.yaml").write_text(config_text(seed=2))
    assert main(["train", "--config", str(folder / "v3.yaml"), "--quiet", "--promote"]) == EXIT_OK
    new = versions(folder)[-1]
    assert new not in before and CheckpointStore(folder / "models").promoted() == new
    assert "stored and promoted" in capsys.readouterr().err


def test_train_promote_needs_a_store(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--config", str(folder / "config.yaml"), "--out", str(folder / "x.pt"), "--promote"])
    assert code == EXIT_USAGE
    assert "--promote needs a stream with a model_store" in capsys.readouterr().err
    assert not (folder / "x.pt").exists()


# --- list and show ----------------------------------------------------------------------


def test_list_marks_the_promoted_version(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models(trained, "list") == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    v1, v2 = versions(trained)
    assert lines[0].split() == ["VERSION", "CREATED", "SOURCE", "PARENT", "VALIDATION_ERROR"]
    assert lines[1].startswith("* ") and lines[1].split()[1] == v1
    assert lines[2].split()[0] == v2 and lines[2].split()[2:4] == ["train", v1]
    assert len(lines) == 3


def test_show_prints_the_metadata_as_json(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1, v2 = versions(trained)
    assert models(trained, "show") == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == v1 and shown["promoted"] is True
    assert shown["path"] == str(trained / "models" / f"{v1}.pt")
    assert models(trained, "show", v2) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == v2 and shown["promoted"] is False and shown["parent"] == v1
    assert shown["training"]["epochs"] == 2


# --- promote and rollback ---------------------------------------------------------------


def test_promote_and_rollback(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1, v2 = versions(folder)
    store = CheckpointStore(folder / "models")
    assert models(folder, "promote", v2, "--reason", "fresher data") == EXIT_OK
    err = capsys.readouterr().err
    assert f"promoted {v2} (was {v1})" in err
    assert "SIGHUP" in err and "http://127.0.0.1:9108/-/reload" in err
    assert store.promoted() == v2 and store.history()[-1]["reason"] == "fresher data"
    assert models(folder, "rollback") == EXIT_OK
    assert f"rolled back to {v1} (was {v2})" in capsys.readouterr().err
    assert store.promoted() == v1


def test_acceptance_rollback_restores_the_previous_versions_scores_exactly(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Score the same input with v1, promote v2 and score, roll back and score again: the
    same scores as v1's, bit for bit, through `detector replay` and through the Pipeline."""
    v1, v2 = versions(folder)
    config = load_config(folder / "config.yaml")
    name, stream = config.stream(None)
    samples, _ = read_samples(name, stream, folder / "data.csv")

    def scores() -> tuple[bytes, np.ndarray]:
        out = folder / "scores.csv"
        assert main(["replay", "--config", str(folder / "config.yaml"), "--out", str(out), "--quiet"]) == EXIT_OK
        pipeline = Pipeline(name, stream, CheckpointStore(folder / "models").load(stream=stream), config.scoring)
        return out.read_bytes(), pipeline.process(samples).score

    csv_1, raw_1 = scores()
    assert f"(model {v1})" in capsys.readouterr().err
    assert models(folder, "promote", v2) == EXIT_OK
    csv_2, raw_2 = scores()
    assert f"(model {v2})" in capsys.readouterr().err
    assert csv_2 != csv_1 and not np.array_equal(raw_2, raw_1, equal_nan=True)
    assert models(folder, "rollback") == EXIT_OK
    csv_3, raw_3 = scores()
    assert csv_3 == csv_1
    scored = ~np.isnan(raw_1)
    assert scored.sum() > 300
    np.testing.assert_array_equal(np.isnan(raw_3), ~scored)
    assert raw_3[scored].tobytes() == raw_1[scored].tobytes()


def test_promote_unknown_version_exits_2(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = CheckpointStore(folder / "models").promoted()
    assert models(folder, "promote", "web-nope") == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"model store {folder / 'models'} has no version 'web-nope'; it holds: " in err
    assert CheckpointStore(folder / "models").promoted() == before
    assert models(folder, "show", "web-nope") == EXIT_USAGE


def test_rollback_with_nothing_before_exits_2(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models(folder, "rollback") == EXIT_USAGE
    assert "nothing to roll back to" in capsys.readouterr().err


def test_promote_refuses_a_version_the_stream_cannot_use(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1, v2 = versions(folder)
    (folder / "wide.yaml").write_text(config_text(window=12))
    assert models(folder, "promote", v2, config="wide.yaml") == EXIT_USAGE
    assert "window.size 12" in capsys.readouterr().err
    assert CheckpointStore(folder / "models").promoted() == v1


def test_stream_without_a_store_exits_2(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "plain.yaml").write_text(config_text().replace("model_store: models", "checkpoint: model.pt"))
    assert models(folder, "list", config="plain.yaml") == EXIT_USAGE
    assert "streams.web.model_store: not set" in capsys.readouterr().err


def test_missing_store_directory_exits_2(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(folder / "models")
    assert models(folder, "list") == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_checkpoint_and_store_together_are_a_config_error(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = config_text().replace("model_store: models", "model_store: models\n    checkpoint: model.pt")
    (folder / "both.yaml").write_text(text)
    assert main(["check-config", str(folder / "both.yaml")]) == EXIT_USAGE
    assert "streams.web: Value error, give `checkpoint` or `model_store`, not both" in capsys.readouterr().err


class _ReloadServer:
    """A stand-in for the daemon's HTTP endpoint that records reload requests."""

    def __init__(self, status: int, body: str) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("status", "code"), [(200, EXIT_OK), (500, EXIT_BUG)])
def test_reload_asks_the_daemon_to_switch(
    folder: Path, capsys: pytest.CaptureFixture[str], status: int, code: int
) -> None:
    _v1, v2 = versions(folder)
    server = _ReloadServer(status, "reloaded; new model for: web" if status == 200 else "rejected: broken")
    try:
        (folder / "config.yaml").write_text(config_text(port=server.port))
        assert models(folder, "promote", v2, "--reload") == code
        assert server.paths == ["/-/reload"]
        err = capsys.readouterr().err
        if status == 200:
            assert "daemon: reloaded; new model for: web" in err
        else:
            assert "the promotion is saved, but the daemon" in err and "rejected: broken" in err
        # Either way the promotion itself stands.
        assert CheckpointStore(folder / "models").promoted() == v2
        assert models(folder, "rollback", "--reload", f"http://127.0.0.1:{server.port}/-/reload?x=1") == code
        assert server.paths == ["/-/reload", "/-/reload?x=1"]
    finally:
        server.close()


def test_reload_to_an_absent_daemon_says_so(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from detector.broker import free_port

    _v1, v2 = versions(folder)
    assert models(folder, "promote", v2, "--reload", f"http://127.0.0.1:{free_port()}/-/reload") == EXIT_BUG
    assert "did not reload" in capsys.readouterr().err
