"""Broker outages, through a TCP proxy in front of a broker of this module's own, whose
advertised listener is the proxy: cutting the proxy cuts every client from the broker.

- Cut for `CUT_S` under load: the daemon reports not ready while cut, is ready again and
  consuming within `RECOVER_S` of the restore, and every record is scored, no firing alert
  reaching the alerts topic twice.
- No broker at start: the daemon waits (healthy, not ready), exits 0 promptly on SIGTERM, and
  joins once the broker answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Daemon, Topics, daemon_config
from proxy import TcpProxy
from streams import (
    ANOMALOUS,
    ENTITIES,
    committed,
    encode,
    http_get,
    iter_jsonl,
    produce,
    read_topic,
    records,
    sample,
    scrape,
    unscored,
    wait_for,
)

from detector.broker import LocalBroker, external_bootstrap, free_port

pytestmark = pytest.mark.integration

CUT_S = 30.0
RECOVER_S = 10.0
ROWS = 400
FIRST = 60  # rows there before the daemon starts; the rest are produced, paced, through the cut


class ProxiedBroker:
    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    @property
    def bootstrap(self) -> str:
        return self.proxy.address


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedBroker]:
    if external_bootstrap() is not None:
        pytest.skip(
            "DETECTOR_TEST_BOOTSTRAP names an external Kafka: its advertised listener cannot be pointed at "
            "the test's proxy, so cutting the proxy would not cut the daemon from the broker"
        )
    port = free_port()
    proxy = TcpProxy("127.0.0.1", port).start()
    log = tmp_path_factory.mktemp("proxied-broker") / "tansu.log"
    try:
        with LocalBroker(port=port, log_path=str(log), advertised_port=proxy.port):
            yield ProxiedBroker(proxy)
    finally:
        proxy.close()


@pytest.fixture
def proxy(proxied: ProxiedBroker) -> Iterator[TcpProxy]:
    yield proxied.proxy
    proxied.proxy.restore()  # a failed test leaves the broker reachable for the next


def ready_status(daemon: Daemon) -> int:
    try:
        return http_get(daemon.url + "/-/ready")[0]
    except OSError:
        return 0


class PacedProducer(threading.Thread):
    """Produces rows `first`.. of `messages` a few at a time, through outages: one producer
    that buffers and retries while the broker is away (delivery within 120 s)."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[str, bytes]], rows_per_s: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.messages = bootstrap, topic, messages
        self.interval_s = 1 / (rows_per_s * len(ENTITIES))  # between messages
        self.ends: dict[int, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, reconnect_backoff_max_ms=500)
        try:
            futures = []
            for key, value in self.messages:
                futures.append(producer.send(self.topic, key=key.encode(), value=value))
                time.sleep(self.interval_s)
            producer.flush(timeout=120)
            for future in futures:
                meta = future.get(timeout=120)
                self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)
        except BaseException as exc:
            self.error = exc
        finally:
            producer.close(timeout=5)


@pytest.mark.slow
def test_a_broker_outage_under_load(
    proxied: ProxiedBroker, proxy: TcpProxy, checkpoint: Path, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    kafka = proxied.bootstrap
    topics = Topics(kafka)
    messages = encode(records(ROWS, seed=6))
    per_row = len(ENTITIES)
    ends = produce(kafka, topics.metrics, messages[: FIRST * per_row])
    # daemon_config heartbeats every second (6 s sessions): the broker is lost after about 3 s.
    config = daemon_config(kafka, topics, checkpoint, tmp_path, scoring={"batch_records": 60, "batch_wait_ms": 50})
    scores = tmp_path / "scores.jsonl"
    daemon = start_daemon(config)
    daemon.wait_ready()
    connections_before = proxy.connections
    # About 8 rows a second: the stream runs before, through and after the cut.
    producer = PacedProducer(kafka, topics.metrics, messages[FIRST * per_row :], rows_per_s=8)
    producer.start()

    def scored() -> int:
        return sum(1 for _ in iter_jsonl(scores)) if scores.exists() else 0

    wait_for(lambda: scored() > (FIRST + 20) * per_row, 60, "the daemon to score records produced while it runs")

    proxy.cut()
    cut_at = time.monotonic()
    # Not ready once three heartbeats (1 s apart) went unanswered, and not ready again until restored.
    wait_for(lambda: ready_status(daemon) == 503, 15, "the daemon to report not ready after the cut")
    detected_s = time.monotonic() - cut_at
    metrics_during = scrape(daemon.url + "/metrics")
    statuses = []
    while time.monotonic() - cut_at < CUT_S:
        statuses.append(ready_status(daemon))
        time.sleep(0.25)
    assert set(statuses) == {503}, f"ready during the cut: {statuses}"
    assert http_get(daemon.url + "/-/healthy")[0] == 200
    scored_at_restore = scored()

    proxy.restore()
    restored_at = time.monotonic()
    wait_for(lambda: ready_status(daemon) == 200, RECOVER_S, "the daemon to be ready again after the restore")
    ready_s = time.monotonic() - restored_at
    wait_for(lambda: scored() > scored_at_restore, RECOVER_S - ready_s, "the daemon to score records again")
    resumed_s = time.monotonic() - restored_at

    producer.join(180)
    assert producer.error is None, repr(producer.error)
    for p, end in producer.ends.items():
        ends[p] = max(ends.get(p, 0), end)
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 120, "the daemon to drain")
    metrics_after = scrape(daemon.url + "/metrics")
    assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    print(f"not ready {detected_s:.1f} s after the cut; ready {ready_s:.1f} s, scoring {resumed_s:.1f} s after restore")

    assert proxy.connections > connections_before, "the daemon reconnected elsewhere than through the proxy"
    assert sample(metrics_during, "detector_ready") == 0
    assert sample(metrics_during, "detector_kafka_reachable") == 0
    assert sample(metrics_after, "detector_ready") == 1
    assert sample(metrics_after, "detector_kafka_reachable") == 1
    assert "lost the Kafka broker" in log and "Kafka broker reachable again" in log

    # Nothing lost: every record was scored (by position), and no entity has a blind spot.
    lines = list(iter_jsonl(scores))
    assert {(s["partition"], s["offset"]) for s in lines} == {(p, o) for p, end in ends.items() for o in range(end)}
    assert unscored(lines, ROWS) == []
    # Nothing duplicated beyond at least once: no alert id reached the alerts topic twice.
    alerts = [json.loads(m.value) for m in read_topic(kafka, topics.alerts)]
    ids = [a["id"] for a in alerts]
    assert len(ids) == len(set(ids)), "an alert id reached the alerts topic twice"
    assert sorted(a["entity"] for a in alerts if a["status"] == "firing") == sorted(ANOMALOUS)


@pytest.mark.slow
def test_a_daemon_started_before_its_broker_waits_then_joins(
    proxied: ProxiedBroker, proxy: TcpProxy, checkpoint: Path, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    kafka = proxied.bootstrap
    topics = Topics(kafka)
    ends = produce(kafka, topics.metrics, encode(records(60, seed=7, anomalies=False)))
    config = daemon_config(kafka, topics, checkpoint, tmp_path)
    proxy.cut()

    # Stopped while waiting: exits 0 promptly.
    waiting = start_daemon(config, "waiting")
    wait_for(lambda: "waiting for Kafka at" in waiting.log(), 60, "the daemon to say it waits for Kafka")
    assert http_get(waiting.url + "/-/healthy")[0] == 200
    assert ready_status(waiting) == 503
    assert sample(scrape(waiting.url + "/metrics"), "detector_kafka_reachable") == 0
    stopped = time.monotonic()
    assert waiting.stop(timeout_s=15) == 0, waiting.log()
    stop_s = time.monotonic() - stopped
    assert stop_s < 5, f"took {stop_s:.1f} s to stop"
    assert "stopped while waiting for Kafka" in waiting.log()

    # The broker comes up: the daemon joins and consumes.
    daemon = start_daemon(config)
    wait_for(lambda: daemon.log().count("waiting for Kafka at") >= 2, 60, "a few attempts to reach Kafka")
    assert ready_status(daemon) == 503
    proxy.restore()
    restored = time.monotonic()
    daemon.wait_ready(30)
    joined_s = time.monotonic() - restored
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 60, "the daemon to drain")
    assert daemon.stop() == 0, daemon.log()
    print(f"stopped {stop_s:.1f} s after SIGTERM while waiting; ready {joined_s:.1f} s after the broker came up")
    assert "answered after" in daemon.log()
    # The backoff is capped: the daemon notices a broker that comes up within a few seconds.
    assert joined_s < 20
