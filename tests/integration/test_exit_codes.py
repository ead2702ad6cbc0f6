"""Exit code 1 of `detector run`: an alerts topic that does not take the alerts (the batch is
not committed, and the restarted daemon sends them), and a shutdown that outlasts the grace
period (the watchdog exits)."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Daemon, Topics, daemon_config
from streams import ANOMALOUS, committed, encode, produce, read_topic, records, wait_for

pytestmark = pytest.mark.integration

ROWS = 250  # the anomaly (rows 200-211) fires, and resolves by row 232


def test_an_alerts_topic_that_fails_exits_1_and_nothing_of_the_batch_is_committed(
    kafka: str, checkpoint: Path, tmp_path: Path, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    ends = produce(kafka, topics.metrics, encode(records(ROWS, seed=4)))
    good = daemon_config(kafka, topics, checkpoint, tmp_path)
    # The producer refuses any alert (a few hundred bytes): the alerts topic never gets one.
    failing = daemon_config(kafka, topics, checkpoint, tmp_path)
    failing["kafka"]["producer_options"] = {"max_request_size": 200}
    first = start_daemon(failing, "failing")
    code = first.process.wait(timeout=30)
    log = first.log()
    assert code == 1, log
    assert "alerts topic" in log and "delivery failed" in log and "not committed" in log
    stopped_at = committed(kafka, topics.group, topics.metrics)
    assert sum(stopped_at.values()) < sum(ends.values()), "the batch with the alert was committed"
    assert read_topic(kafka, topics.alerts, timeout_s=3) == []

    second = start_daemon(good, "second")
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 30, "the restarted daemon to drain")
    assert second.stop() == 0, second.log()
    alerts = [json.loads(m.value) for m in read_topic(kafka, topics.alerts)]
    assert sorted(a["entity"] for a in alerts if a["status"] == "firing") == sorted(ANOMALOUS)
    assert sorted(a["entity"] for a in alerts if a["status"] == "resolved") == sorted(ANOMALOUS)


@pytest.fixture
def unanswering_url() -> Iterator[str]:
    """A server that takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"


def test_a_shutdown_that_outlasts_the_grace_period_exits_1(
    kafka: str,
    checkpoint: Path,
    tmp_path: Path,
    topics: Topics,
    start_daemon: Callable[..., Daemon],
    unanswering_url: str,
) -> None:
    produce(kafka, topics.metrics, encode(records(ROWS, seed=5)))
    # A webhook delivery hangs for 60 s; shutdown waits for it longer than the grace period.
    config = daemon_config(
        kafka,
        topics,
        checkpoint,
        tmp_path,
        sinks={"webhooks": [{"url": unanswering_url, "retry": {"timeout_s": 60}}]},
        service={"grace_period_s": 2},
    )
    daemon = start_daemon(config)
    wait_for(lambda: len(read_topic(kafka, topics.alerts, timeout_s=2)) > 0, 30, "an alert (a webhook delivery)")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=20)
    elapsed = time.monotonic() - started
    log = daemon.log()
    assert code == 1, log
    assert "shutdown took longer than the grace period (2 s); exiting now" in log
    assert 2 <= elapsed < 8
