"""Broken configs and tampered checkpoints through the real command line.

`tests/unit/test_config.py` checks `parse_config`'s messages problem by problem and
`tests/unit/test_model.py` checks `load_checkpoint`; here each broken file goes through
`detector check-config` and `detector run` (`cli.main` in process: it returns the exit code),
which must exit 2 with a message naming the cause and where it is (the YAML path, or the
file), never a traceback. A config whose only problem is one `run` cares about (no Kafka
stream, no checkpoint) passes `check-config` and fails `run`. Also: secrets stay out of
every message, YAML is loaded safely, and the HTTP server binds to loopback by default.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from detector.cli import EXIT_OK, EXIT_USAGE, main
from detector.config import Config, Server, Stream, load_config, load_config_with_secrets, masked_dump
from detector.metrics import HealthServer
from detector.model import load_checkpoint, save_checkpoint
from detector.service import consumer_settings, producer_settings
from detector.source import SampleBatch
from detector.train import fit

STREAM: dict[str, Any] = {
    "input": {"kind": "kafka", "topic": "metrics"},
    "mapping": {"entity": "host", "timestamp": "ts", "features": ["cpu", "mem"]},
    "window": {"size": 8},
    "model": {"cell": "gru", "hidden_size": 4, "latent_size": 2},
    "training": {"epochs": 1, "batch_size": 32, "early_stopping_patience": 0},
    "checkpoint": "model.pt",
}
# Valid as it stands (see test_the_base_config_is_valid); every case below breaks one thing.
# Nothing listens on port 1 and the HTTP server is off, so a `run` that got past loading
# could not quietly start a daemon inside the test.
BASE: dict[str, Any] = {
    "streams": {"web": STREAM},
    "kafka": {"bootstrap_servers": "127.0.0.1:1", "request_timeout_ms": 1000},
    "server": {"enabled": False},
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint that fits BASE's stream."""
    stream = Stream.model_validate(STREAM)
    n = 120
    t = np.arange(n)
    values = np.stack([np.sin(t / 4), np.cos(t / 7)], axis=1).astype(np.float32)
    samples = SampleBatch(["a"] * n, (t * 60_000).astype(np.int64), values, t.astype(np.int64))
    threads = torch.get_num_threads()
    try:
        ckpt = fit("web", stream, samples, progress=False)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture
def folder(tmp_path: Path, good_checkpoint: Path) -> Path:
    (tmp_path / "model.pt").write_bytes(good_checkpoint.read_bytes())
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edited(edit: Callable[[dict[str, Any]], None]) -> str:
    config = copy.deepcopy(BASE)
    edit(config)
    return yaml.safe_dump(config, sort_keys=False)


def stream_edit(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["streams"]["web"].setdefault(section, {}).update(values)

    return edit


def top_edit(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config.setdefault(section, {}).update(values)

    return edit


@dataclass
class Broken:
    """A config file (text, or bytes as written) and the fragments its error message must hold."""

    content: str | bytes
    expect: list[str]
    env: dict[str, str] = field(default_factory=dict)


BASE_TEXT = yaml.safe_dump(BASE, sort_keys=False)
SERVER_LINE = BASE_TEXT.splitlines().index("server:") + 1
SERVER_LINE_AGAIN = len(BASE_TEXT.splitlines()) + 1

BROKEN: dict[str, Broken] = {
    # --- the file itself
    "yaml-syntax": Broken("streams: {web: [\n", ["not valid YAML", "line 2"]),
    "yaml-tab-indent": Broken("streams:\n\tweb: {}\n", ["not valid YAML", "line 2"]),
    "yaml-duplicate-key": Broken(
        BASE_TEXT + "server: {port: 1}\n",
        ["not valid YAML", f"duplicate key 'server' (first at line {SERVER_LINE})", f"line {SERVER_LINE_AGAIN}"],
    ),
    "yaml-duplicate-key-inline": Broken(
        BASE_TEXT.replace("size: 8", "size: 8\n    stride: 1\n    stride: 2"), ["duplicate key 'stride'"]
    ),
    "empty-file": Broken("", ["<root>: expected a mapping with a `streams` key"]),
    "only-a-comment": Broken("# nothing here\n", ["<root>: expected a mapping"]),
    "top-level-list": Broken("- streams\n- kafka\n", ["<root>: expected a mapping"]),
    "top-level-string": Broken("streams\n", ["<root>: expected a mapping"]),
    "binary-file": Broken(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + os.urandom(64), ["cannot read: not UTF-8 text"]),
    "python-tag": Broken(
        "streams: !!python/object/apply:os.system ['echo pwned']\n",
        ["not valid YAML", "could not determine a constructor", "python/object/apply:os.system"],
    ),
    # --- structure and types
    "no-streams": Broken("kafka: {group_id: x}\n", ["streams: Field required"]),
    "streams-empty": Broken(edited(lambda c: c.update(streams={})), ["streams: Dictionary should have at least 1"]),
    "stream-name-invalid": Broken(
        edited(lambda c: c.update(streams={"web prod": STREAM})), ["streams.web prod", "should match pattern"]
    ),
    "unknown-top-key": Broken(edited(lambda c: c.update(kafak={})), ["kafak: Extra inputs are not permitted"]),
    "unknown-stream-key": Broken(
        edited(stream_edit("windw", size=8)), ["streams.web.windw: Extra inputs are not permitted"]
    ),
    "unknown-sink-key": Broken(
        edited(lambda c: c.update(sinks={"webhooks": [{"url": "http://x", "header": {}}]})),
        ["sinks.webhooks[0].header: Extra inputs are not permitted"],
    ),
    "missing-input": Broken(edited(lambda c: c["streams"]["web"].pop("input")), ["streams.web.input: Field required"]),
    "missing-features": Broken(
        edited(lambda c: c["streams"]["web"]["mapping"].pop("features")),
        ["streams.web.mapping.features: Field required"],
    ),
    "features-empty": Broken(
        edited(stream_edit("mapping", features=[])), ["streams.web.mapping.features: List should have at least 1"]
    ),
    "features-duplicate": Broken(
        edited(stream_edit("mapping", features=["cpu", "cpu"])), ["streams.web.mapping.features", "duplicate"]
    ),
    "window-size-string": Broken(
        edited(stream_edit("window", size="big")), ["streams.web.window.size: Input should be a valid integer"]
    ),
    "window-size-zero": Broken(
        edited(stream_edit("window", size=0)), ["streams.web.window.size: Input should be greater than or equal to 2"]
    ),
    "window-stride-above-size": Broken(
        edited(stream_edit("window", size=8, stride=9)), ["streams.web.window", "stride (9) must be <= size (8)"]
    ),
    "hidden-size-negative": Broken(
        edited(stream_edit("model", hidden_size=-4)), ["streams.web.model.hidden_size: Input should be greater"]
    ),
    "batch-records-zero": Broken(
        edited(top_edit("scoring", batch_records=0)), ["scoring.batch_records: Input should be greater"]
    ),
    "max-future-negative": Broken(
        edited(stream_edit("mapping", max_future_s=-1)), ["streams.web.mapping.max_future_s: Input should be greater"]
    ),
    # --- enums, tags and patterns
    "cell-unknown": Broken(
        edited(stream_edit("model", cell="transformer")), ["streams.web.model.cell: Input should be 'lstm', 'gru'"]
    ),
    "input-kind-unknown": Broken(
        edited(stream_edit("input", kind="s3")), ["streams.web.input.kind: Input tag 's3' found using 'kind'"]
    ),
    "threshold-rule-unknown": Broken(
        edited(lambda c: c["streams"]["web"].update(thresholds={"warning": {"rule": "magic"}})),
        ["streams.web.thresholds.warning.rule: Input tag 'magic'"],
    ),
    "timestamp-format-unknown": Broken(
        edited(stream_edit("mapping", timestamp_format="epoch")), ["streams.web.mapping.timestamp_format: Input"]
    ),
    "security-protocol-unknown": Broken(
        edited(top_edit("kafka", security_protocol="TLS")), ["kafka.security_protocol: Input should be 'PLAINTEXT'"]
    ),
    "webhook-url-not-http": Broken(
        edited(lambda c: c.update(sinks={"webhooks": [{"url": "ftp://host/x"}]})),
        ["sinks.webhooks[0].url: String should match pattern '^https?://'"],
    ),
    "server-port-out-of-range": Broken(
        edited(top_edit("server", port=70000)), ["server.port: Input should be less than or equal to 65535"]
    ),
    # --- settings that contradict each other
    "quantile-above-one": Broken(
        edited(lambda c: c["streams"]["web"].update(thresholds={"warning": {"rule": "quantile", "q": 1.5}})),
        ["streams.web.thresholds.warning.q: Input should be less than 1"],
    ),
    "critical-below-warning": Broken(
        edited(
            lambda c: c["streams"]["web"].update(
                thresholds={"warning": {"rule": "static", "value": 5}, "critical": {"rule": "static", "value": 3}}
            )
        ),
        ["streams.web.thresholds.critical", "critical value 3 must be above the warning value 5"],
    ),
    "alerts-n-above-m": Broken(
        edited(stream_edit("alerts", n=5, m=3)), ["streams.web.alerts", "n (5) must be <= m (3)"]
    ),
    "score-steps-beyond-window": Broken(
        edited(stream_edit("model", score_last_steps=9)),
        ["streams.web", "model.score_last_steps (9) must be <= window.size (8)"],
    ),
    "heartbeat-above-session-third": Broken(
        edited(top_edit("kafka", session_timeout_ms=6000, heartbeat_interval_ms=3000)),
        ["kafka: Value error, heartbeat_interval_ms must be at most a third of session_timeout_ms"],
    ),
    # --- the environment
    "env-var-missing": Broken(
        edited(top_edit("kafka", sasl_plain_password="${DETECTOR_TEST_NO_SUCH_VAR}")),
        ["kafka.sasl_plain_password: environment variable DETECTOR_TEST_NO_SUCH_VAR is not set"],
    ),
    "env-var-not-a-number": Broken(
        edited(stream_edit("window", size="${DETECTOR_TEST_WINDOW}")),
        ["streams.web.window.size: Input should be a valid integer"],
        env={"DETECTOR_TEST_WINDOW": "eight"},
    ),
}


def write_config(folder: Path, content: str | bytes) -> Path:
    path = folder / "config.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_the_base_config_is_valid(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The control for every case below: unbroken, the file passes and its checkpoint loads.
    path = write_config(folder, BASE_TEXT)
    assert cli(capsys, "check-config", str(path))[0] == EXIT_OK
    config = load_config(path)
    assert load_checkpoint(folder / "model.pt", config.streams["web"]).features == ("cpu", "mem")


def test_there_are_thirty_broken_configs() -> None:
    assert len(BROKEN) >= 30
    assert len({b.content for b in BROKEN.values()}) == len(BROKEN)


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_config_exits_2_naming_the_cause(
    name: str, command: str, folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = BROKEN[name]
    monkeypatch.delenv("DETECTOR_TEST_NO_SUCH_VAR", raising=False)
    for key, value in broken.env.items():
        monkeypatch.setenv(key, value)
    path = write_config(folder, broken.content)
    argv = ["check-config", str(path)] if command == "check-config" else ["run", "--config", str(path)]
    code, out = cli(capsys, *argv)
    assert code == EXIT_USAGE, out
    assert f"detector: invalid config {path}" in out
    for fragment in broken.expect:
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert "Traceback" not in out


# --- problems only `detector run` has ------------------------------------------------------

RUN_ONLY: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "no-kafka-stream": (
        lambda c: c["streams"]["web"].update(input={"kind": "file", "path": "data.csv"}),
        ["- streams: no stream reads from Kafka"],
    ),
    "no-checkpoint-key": (
        lambda c: c["streams"]["web"].pop("checkpoint"),
        ["streams.web.checkpoint: required by `detector run`"],
    ),
    "checkpoint-file-missing": (
        lambda c: c["streams"]["web"].update(checkpoint="absent.pt"),
        ["absent.pt not found (train one with `detector train`)"],
    ),
}


@pytest.mark.parametrize("name", sorted(RUN_ONLY))
def test_a_config_that_only_run_refuses(name: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, expect = RUN_ONLY[name]
    path = write_config(folder, edited(edit))
    assert cli(capsys, "check-config", str(path))[0] == EXIT_OK
    code, out = cli(capsys, "run", "--config", str(path))
    assert code == EXIT_USAGE, out
    assert f"detector: invalid config {path}: " in out or f"detector: checkpoint {folder}" in out
    for fragment in expect:
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert "Traceback" not in out


# --- tampered or mismatched checkpoints ----------------------------------------------------


class RunsShell:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _payload(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, weights_only=True)
    return payload


def _truncate(path: Path, marker: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path, marker: Path) -> None:
    path.write_bytes(b"\x13\x37" + os.urandom(8192))


def _empty(path: Path, marker: Path) -> None:
    path.write_bytes(b"")


def _directory(path: Path, marker: Path) -> None:
    path.unlink()
    path.mkdir()


def _malicious(path: Path, marker: Path) -> None:
    torch.save(RunsShell(marker), path)


def _malicious_inside(path: Path, marker: Path) -> None:
    payload = _payload(path)
    payload["training"]["note"] = RunsShell(marker)
    torch.save(payload, path)


def _wrong_format(path: Path, marker: Path) -> None:
    payload = _payload(path)
    payload["format"] = 99
    torch.save(payload, path)


def _zip_missing_entry(path: Path, marker: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    dropped = next(name for name in entries if "/data/" in name and not name.endswith(".pkl"))
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            if name != dropped:
                archive.writestr(name, data)


def _wrong_features(path: Path, marker: Path) -> None:
    payload = _payload(path)
    payload["features"] = ["cpu", "disk"]
    torch.save(payload, path)


def _wrong_window(path: Path, marker: Path) -> None:
    payload = _payload(path)
    payload["window_size"] = 12
    torch.save(payload, path)


TAMPERED: dict[str, tuple[Callable[[Path, Path], None], list[str]]] = {
    "truncated": (_truncate, ["is not a readable torch file"]),
    "random-bytes": (_random_bytes, ["is not a detector checkpoint: the file is unreadable or corrupt"]),
    "empty-file": (_empty, ["is not a readable torch file"]),
    "a-directory": (_directory, ["is not a readable torch file"]),
    "malicious-pickle": (_malicious, ["refused: it holds something other than tensors and plain data"]),
    "malicious-object-inside": (_malicious_inside, ["refused: it holds something other than tensors and plain data"]),
    "wrong-format-number": (_wrong_format, ["has format 99, this detector reads"]),
    "zip-missing-entry": (_zip_missing_entry, ["is not a readable torch file"]),
    "wrong-feature-layout": (
        _wrong_features,
        ["trained on features ['cpu', 'disk'] but the stream maps ['cpu', 'mem']"],
    ),
    "wrong-window-size": (_wrong_window, ["trained on windows of 12 samples but the stream uses window.size 8"]),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_a_tampered_checkpoint_exits_2_and_runs_nothing(
    name: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, expect = TAMPERED[name]
    checkpoint, marker = folder / "model.pt", tmp_path / "pwned"
    damage(checkpoint, marker)
    path = write_config(folder, BASE_TEXT)
    code, out = cli(capsys, "run", "--config", str(path))
    assert code == EXIT_USAGE, out
    assert f"detector: checkpoint {checkpoint} " in out
    for fragment in expect:
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert "weights_only" not in out  # no advice to bypass the safe loader
    assert "Traceback" not in out
    assert not marker.exists()


def test_a_malicious_checkpoint_runs_nothing_in_a_real_daemon_process(folder: Path, tmp_path: Path) -> None:
    # In a fresh process, as deployed: nothing from the test process's imports can mask a load.
    marker = tmp_path / "pwned"
    _malicious_inside(folder / "model.pt", marker)
    path = write_config(folder, BASE_TEXT)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "detector", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "refused: it holds something other than tensors and plain data" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


def test_the_marker_payload_does_run_when_loaded_unsafely(good_checkpoint: Path, tmp_path: Path) -> None:
    # The control for the two tests above: the same file really runs the command on a plain load.
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    path.write_bytes(good_checkpoint.read_bytes())
    _malicious_inside(path, marker)
    torch.load(path, weights_only=False)  # deliberately unsafe, on our own file
    assert marker.exists()


# --- security ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_python_yaml_tags_are_not_executed(
    command: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    text = BASE_TEXT + f"extra: !!python/object/apply:os.system ['touch {marker}']\n"
    path = write_config(folder, text)
    argv = ["check-config", str(path)] if command == "check-config" else ["run", "--config", str(path)]
    code, out = cli(capsys, *argv)
    assert code == EXIT_USAGE
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'" in out
    assert not marker.exists()


SECRETS = {
    "DETECTOR_TEST_SASL": "sasl-5e5a1d0b",
    "DETECTOR_TEST_SSL": "ssl-0a7f39c4",
    "DETECTOR_TEST_HOOK": "Bearer hook-81d2e6aa",
    "DETECTOR_TEST_AM": "am-4c90b7e3",
}


def secret_config(folder: Path) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    config["kafka"].update(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="detector",
        sasl_plain_password="${DETECTOR_TEST_SASL}",
        ssl_cafile="ca.pem",
        ssl_certfile="client.pem",
        ssl_keyfile="client.key",
        ssl_password="${DETECTOR_TEST_SSL}",
    )
    config["sinks"] = {
        "webhooks": [{"url": "https://hooks.example/x", "headers": {"Authorization": "${DETECTOR_TEST_HOOK}"}}],
        "alertmanager": [{"url": "https://am.example", "headers": {"X-Token": "${DETECTOR_TEST_AM}"}}],
    }
    return config


def test_secrets_are_masked_in_check_config_output(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    path = write_config(folder, yaml.safe_dump(secret_config(folder)))
    code, out = cli(capsys, "--log-level", "debug", "check-config", "--show", str(path))
    assert code == EXIT_OK
    for value in SECRETS.values():
        assert value not in out
    shown = yaml.safe_load(out.split(f"{path}: ok")[0])
    assert shown["kafka"]["sasl_plain_password"] == shown["kafka"]["ssl_password"] == "***"
    assert shown["sinks"]["webhooks"][0]["headers"]["Authorization"] == "***"
    assert shown["sinks"]["alertmanager"][0]["headers"]["X-Token"] == "***"
    assert shown["kafka"]["sasl_plain_username"] == "detector"  # not from the environment: shown


def test_a_secret_in_an_invalid_setting_is_not_echoed(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A secret pasted into the wrong variable must not end up in a log aggregator via the error.
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    config = copy.deepcopy(BASE)
    config["kafka"]["security_protocol"] = "${DETECTOR_TEST_SASL}"
    config["streams"]["web"]["window"]["size"] = "${DETECTOR_TEST_SSL}"
    config["sinks"] = {"webhooks": [{"url": "${DETECTOR_TEST_HOOK}"}]}
    path = write_config(folder, yaml.safe_dump(config))
    for argv in (["check-config", str(path)], ["run", "--config", str(path)]):
        code, out = cli(capsys, *argv)
        assert code == EXIT_USAGE
        for where in ("kafka.security_protocol", "streams.web.window.size", "sinks.webhooks[0].url"):
            assert where in out
        for value in SECRETS.values():
            assert value not in out


def test_tls_and_sasl_settings_reach_the_consumer_and_the_producer(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    config, secrets = load_config_with_secrets(write_config(folder, yaml.safe_dump(secret_config(folder))))
    expected = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "detector",
        "sasl_plain_password": SECRETS["DETECTOR_TEST_SASL"],
        "ssl_cafile": str(folder / "ca.pem"),
        "ssl_certfile": str(folder / "client.pem"),
        "ssl_keyfile": str(folder / "client.key"),
        "ssl_password": SECRETS["DETECTOR_TEST_SSL"],
    }
    for settings in (consumer_settings(config), producer_settings(config)):
        assert {key: settings.get(key) for key in expected} == expected
    dump = masked_dump(config, secrets)
    for value in SECRETS.values():
        assert value not in dump


def test_the_http_server_binds_to_loopback_by_default() -> None:
    assert Server().host == "127.0.0.1"
    config = Config.model_validate({"streams": {"web": STREAM}})
    server = HealthServer(
        CollectorRegistry(), config.server.host, 0, lambda: True, lambda: True, lambda: (True, "")
    ).start()
    try:
        assert server._server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()
