"""Fixtures for the integration tests: a real Kafka-protocol broker (Tansu, started here, or
the Kafka named by DETECTOR_TEST_BOOTSTRAP), a tiny trained checkpoint, and the daemon as a
subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from streams import STREAM_SPEC, http_get, train_checkpoint, wait_for

from detector.broker import LocalBroker, create_topics, external_bootstrap, free_port
from detector.config import Stream
from detector.model import save_checkpoint


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a Kafka broker for this test session."""
    external = external_bootstrap()
    if external is not None:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with LocalBroker(log_path=str(log)) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    stream = Stream.model_validate({"input": {"kind": "kafka", "topic": "unused"}, **STREAM_SPEC})
    path = tmp_path_factory.mktemp("model") / "hosts.pt"
    save_checkpoint(path, train_checkpoint(stream))
    return path


class Topics:
    """Fresh topic names and a consumer group for one test, so tests can share the broker."""

    def __init__(self, kafka: str, partitions: int = 3) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.metrics = f"metrics-{suffix}"
        self.alerts = f"alerts-{suffix}"
        self.dead = f"dead-{suffix}"
        self.group = f"detector-{suffix}"
        create_topics(kafka, [self.metrics], partitions=partitions)
        create_topics(kafka, [self.alerts, self.dead], partitions=1)


@pytest.fixture
def topics(kafka: str) -> Topics:
    return Topics(kafka)


def daemon_config(kafka: str, topics: Topics, checkpoint: Path, tmp: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "streams": {
            "hosts": {"input": {"kind": "kafka", "topic": topics.metrics}, **STREAM_SPEC, "checkpoint": str(checkpoint)}
        },
        "scoring": {"threads": 1, "batch_records": 150, "batch_wait_ms": 100},
        "kafka": {
            "bootstrap_servers": kafka,
            "group_id": topics.group,
            "fetch_max_wait_ms": 10,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "dead_letter_topic": topics.dead,
            "refill_records": 2000,
        },
        "sinks": {"log": True, "kafka": {"topic": topics.alerts}, "scores_file": str(tmp / "scores.jsonl")},
        "server": {"host": "127.0.0.1", "port": free_port()},
        "service": {"grace_period_s": 20},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value}
    return config


class Daemon:
    """`detector run` as a subprocess."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "daemon") -> None:
        self.config = config
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.url = f"http://127.0.0.1:{config['server']['port']}"
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "detector", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"daemon exited with {self.process.returncode}:\n{self.log()}"
            try:
                return http_get(self.url + "/-/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout_s, "the daemon to become ready")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon did not stop within {timeout_s} s:\n{self.log()}") from None


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: dict[str, Any], name: str = "daemon") -> Daemon:
        daemon = Daemon(config, tmp_path, name)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
