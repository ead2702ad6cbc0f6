"""The daemon's parts that need no broker: Kafka settings from YAML, config checks of
`detector run`, reload of thresholds and alert policy, and the health/metrics server."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from detector.cli import EXIT_USAGE, main
from detector.config import Config, Stream, load_config, load_config_with_secrets, masked_dump, parse_config
from detector.errors import ConfigError
from detector.metrics import HealthServer, Metrics
from detector.model import save_checkpoint
from detector.service import BrokerContact, Daemon, consumer_settings, kafka_streams, producer_settings
from detector.sinks import KafkaAlertSink
from detector.source import SampleBatch
from detector.train import fit

STREAM = {
    "input": {"kind": "kafka", "topic": "metrics"},
    "mapping": {"entity": "host", "features": ["cpu"]},
    "window": {"size": 4},
    "model": {"hidden_size": 4, "latent_size": 2},
    "training": {"epochs": 1, "early_stopping_patience": 0},
    "thresholds": {"warning": {"rule": "quantile", "q": 0.99}},
    "checkpoint": "model.pt",
}


def write(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_kafka_settings_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "s3cret")
    config = write(
        tmp_path / "c.yaml",
        {
            "streams": {"web": STREAM},
            "kafka": {
                "bootstrap_servers": "k1:9092, k2:9092",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "detector",
                "sasl_plain_password": "${KAFKA_PASSWORD}",
                "ssl_cafile": "ca.pem",
                "fetch_max_wait_ms": 10,
                "consumer_options": {"isolation_level": "read_committed"},
                "producer_options": {"compression_type": "gzip"},
            },
        },
    )
    cfg, secrets = load_config_with_secrets(config)
    consumer = consumer_settings(cfg)
    assert consumer["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert consumer["enable_auto_commit"] is False
    assert consumer["sasl_plain_password"] == "s3cret"
    assert consumer["ssl_cafile"] == str(tmp_path / "ca.pem")  # relative to the config file
    assert consumer["fetch_max_wait_ms"] == 10
    assert consumer["isolation_level"] == "read_committed"
    assert "compression_type" not in consumer
    producer = producer_settings(cfg)
    assert producer["compression_type"] == "gzip"
    assert producer["acks"] == "all"
    assert "group_id" not in producer
    assert "s3cret" not in masked_dump(cfg, secrets)


def test_new_sections_reject_bad_values(tmp_path: Path) -> None:
    bad = {
        "streams": {"web": STREAM},
        "kafka": {"session_timeout_ms": 3000, "heartbeat_interval_ms": 2000},
        "sinks": {"alertmanager": [{"url": "ftp://x"}], "webhooks": [{"url": "http://x", "queue_size": 0}]},
        "scoring": {"batch_records": 0},
        "server": {"port": 70000},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.yaml", bad))
    text = str(info.value)
    for path in (
        "kafka: Value error, heartbeat_interval_ms must be at most a third",
        "sinks.alertmanager[0].url",
        "sinks.webhooks[0].queue_size",
        "scoring.batch_records",
        "server.port",
    ):
        assert path in text


def test_run_needs_a_kafka_stream_with_a_checkpoint(tmp_path: Path) -> None:
    file_only = Config.model_validate({"streams": {"f": {**STREAM, "input": {"kind": "file", "path": "x.csv"}}}})
    with pytest.raises(ConfigError, match="no stream reads from Kafka"):
        kafka_streams(file_only)
    no_checkpoint = Config.model_validate({"streams": {"web": {**STREAM, "checkpoint": None}}})
    with pytest.raises(ConfigError, match=r"streams.web.checkpoint"):
        kafka_streams(no_checkpoint)


def test_run_exits_2_on_a_bad_config_or_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "c.yaml", {"streams": {"web": {**STREAM, "window": {"size": 1}}}})
    assert main(["run", "--config", str(config)]) == EXIT_USAGE
    assert "streams.web.window.size" in capsys.readouterr().err
    config = write(tmp_path / "c.yaml", {"streams": {"web": STREAM}})
    assert main(["run", "--config", str(config)]) == EXIT_USAGE
    assert "model.pt not found" in capsys.readouterr().err


def build_daemon(tmp_path: Path, **sections: Any) -> Daemon:
    """A daemon (not opened) over STREAM with a freshly trained checkpoint."""
    data: dict[str, Any] = {"streams": {"web": STREAM}, "server": {"enabled": False}, **sections}
    config_path = write(tmp_path / "c.yaml", data)
    config = load_config(config_path)
    stream: Stream = config.streams["web"]
    t = np.arange(200)
    samples = SampleBatch(["h"] * 200, t * 60_000, np.sin(t / 5)[:, None].astype(np.float32), t)
    assert stream.checkpoint is not None
    save_checkpoint(stream.checkpoint, fit("web", stream, samples, progress=False))
    return Daemon(config, config_path, CollectorRegistry())


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    return build_daemon(tmp_path)


def test_reload_applies_thresholds_and_keeps_windows(daemon: Daemon) -> None:
    assert daemon.config_path is not None
    pipeline = daemon.runtimes["web"].pipeline
    windows = pipeline.windows
    changed = yaml.safe_load(daemon.config_path.read_text())
    changed["streams"]["web"]["thresholds"] = {"warning": {"rule": "static", "value": 5.0}}
    changed["streams"]["web"]["alerts"] = {"n": 1, "m": 2}
    changed["streams"]["web"]["mapping"]["out_of_order"] = "accept"  # needs a restart: not applied
    write(daemon.config_path, changed)
    ok, message = daemon.reload()
    assert ok, message
    assert "web" in message
    assert daemon.runtimes["web"].pipeline.windows is windows
    assert daemon.runtimes["web"].pipeline.stream.mapping.out_of_order == "drop"
    assert daemon.runtimes["web"].stream.mapping.out_of_order == "drop"
    assert daemon.runtimes["web"].pipeline.policy.config.n == 1
    assert daemon.runtimes["web"].stream.thresholds.warning.rule == "static"
    registry = daemon.registry
    assert registry.get_sample_value("detector_config_reloads_total", {"result": "success"}) == 1


def test_an_invalid_reload_keeps_the_running_config(daemon: Daemon) -> None:
    assert daemon.config_path is not None
    before = daemon.runtimes["web"].stream
    daemon.config_path.write_text("streams: {web: {window: {size: 0}}}\n")
    ok, message = daemon.reload()
    assert not ok
    assert "rejected" in message
    assert daemon.runtimes["web"].stream is before
    registry = daemon.registry
    assert registry.get_sample_value("detector_config_reloads_total", {"result": "failure"}) == 1
    assert registry.get_sample_value("detector_config_last_reload_successful") == 0
    # Adding a stream needs a restart, not a reload.
    extra = {"streams": {"web": STREAM, "db": {**STREAM, "input": {"kind": "kafka", "topic": "db"}}}}
    write(daemon.config_path, extra)
    ok, message = daemon.reload()
    assert not ok and "add or remove" in message


class FakeConsumer:
    """Stands in for KafkaConsumer: hands out `batches` (one per poll), records commits."""

    def __init__(self, batches: list[list[Any]], daemon: Daemon) -> None:
        self.batches = batches
        self.daemon = daemon
        self.commits: list[dict[Any, int]] = []
        self.closed = False
        # What BrokerContact reads of kafka-python: heartbeat times and the member state.
        now = time.monotonic()
        self._coordinator = SimpleNamespace(heartbeat=SimpleNamespace(last_receive=now, last_reset=now))
        self.state = "<stable>"

    def group_metadata(self) -> SimpleNamespace:
        return SimpleNamespace(state=self.state)

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        if not self.batches:
            self.daemon.stop()
            return {}
        return {("metrics", 0): self.batches.pop(0)}

    def commit(self, offsets: dict[Any, Any]) -> None:
        self.commits.append({(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()})

    def close(self) -> None:
        self.closed = True


class UnacknowledgingProducer:
    """A KafkaProducer whose broker never acknowledges: each send's future fails."""

    def send(self, topic: str, **kwargs: Any) -> Any:
        def fail(timeout: float | None = None) -> None:
            raise TimeoutError("no acknowledgement from the broker")

        return SimpleNamespace(get=fail)

    def flush(self, timeout: float | None = None) -> None:
        pass


def alert_on_every_window(daemon: Daemon) -> None:
    """Reload the daemon with a static threshold of 0 and a 1-of-1 policy: every window fires."""
    assert daemon.config_path is not None
    config = yaml.safe_load(daemon.config_path.read_text())
    config["streams"]["web"]["thresholds"] = {"warning": {"rule": "static", "value": 0.0}}
    config["streams"]["web"]["alerts"] = {"n": 1, "m": 1}
    write(daemon.config_path, config)
    assert daemon.reload()[0]


def record(offset: int) -> SimpleNamespace:
    """A Kafka record of host `h`, one a minute."""
    value = json.dumps({"host": "h", "timestamp": 60 * offset, "cpu": 0.5}).encode()
    return SimpleNamespace(topic="metrics", partition=0, offset=offset, key=b"h", value=value, timestamp=0)


def test_a_failing_alerts_topic_stops_the_daemon_without_committing_the_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every window fires (static threshold 0, 1 of 1): the batch that completes the first
    # window (4 samples) has an alert, and the alerts topic fails to take it.
    daemon = build_daemon(tmp_path, scoring={"batch_records": 3, "batch_wait_ms": 1})
    alert_on_every_window(daemon)

    consumer = FakeConsumer([[record(0), record(1), record(2)], [record(3), record(4)]], daemon)
    daemon.consumer = consumer
    daemon.sinks = [KafkaAlertSink(UnacknowledgingProducer(), "alerts", daemon.metrics, timeout_s=0.1)]
    with caplog.at_level(logging.ERROR, logger="detector.service"):
        code = daemon.run()
    assert code == 1
    assert consumer.commits == [{("metrics", 0): 3}]  # the first batch only: it raised no alert
    assert consumer.closed
    assert daemon.registry.get_sample_value("detector_sink_failures_total", {"sink": "kafka"}) == 1
    assert (
        daemon.registry.get_sample_value(
            "detector_alerts_total", {"stream": "web", "severity": "warning", "status": "firing"}
        )
        == 1
    )
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "alerts topic alerts: delivery failed" in message
    assert "not committed" in message


def test_a_busy_daemon_closes_the_next_batch_at_once_an_idle_one_waits(tmp_path: Path) -> None:
    # Records a poll returns right after a batch may have arrived while that batch was being
    # processed: their wait counts from when processing began. Processing takes 0.25 s here (a
    # slow sink), longer than batch_wait_ms, so each such record is a batch of its own at once;
    # after an empty poll (idle), the next records wait batch_wait_ms as usual and go together.
    daemon = build_daemon(tmp_path, scoring={"batch_records": 3, "batch_wait_ms": 200})

    class SlowSink:
        kind = "log"

        def emit(self, alerts: list[Any]) -> None:
            time.sleep(0.25)

        def close(self) -> None:
            pass

    sizes: list[int] = []
    process = daemon.process

    def counted(records: list[Any]) -> None:
        sizes.append(len(records))
        process(records)

    daemon.process = counted  # type: ignore[method-assign]
    daemon.sinks = [SlowSink()]
    daemon.consumer = FakeConsumer(
        [[record(0), record(1), record(2)], [record(3)], [record(4)], [], [record(5)], [record(6)]], daemon
    )
    assert daemon.run() == 0
    assert sizes == [3, 1, 1, 2]


def get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_server_endpoints() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.records_consumed.labels("web", "live").inc(3)
    state = {"ready": False, "reload": (False, "rejected: bad")}
    server = HealthServer(
        registry,
        "127.0.0.1",
        0,
        lambda: True,
        lambda: state["ready"],
        lambda: state["reload"],  # type: ignore[arg-type,return-value]
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, text = get(base + "/metrics")
        assert status == 200
        assert 'detector_records_consumed_total{phase="live",stream="web"} 3.0' in text
        assert get(base + "/-/healthy")[0] == 200
        assert get(base + "/-/ready")[0] == 503
        state["ready"] = True
        assert get(base + "/-/ready")[0] == 200
        assert get(base + "/-/reload", "POST") == (500, "rejected: bad\n")
        state["reload"] = (True, "reloaded")
        assert get(base + "/-/reload", "POST") == (200, "reloaded\n")
        assert get(base + "/nothing")[0] == 404
    finally:
        server.stop()


def test_readme_daemon_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## The daemon") :]
    block = section[section.index("```yaml\n") + 8 : section.index("```\n", section.index("```yaml\n") + 8)]
    monkeypatch.setenv("KAFKA_PASSWORD", "pw")
    monkeypatch.setenv("HOOK_TOKEN", "token")
    config, secrets = parse_config(block, "README.md")
    assert config.kafka.bootstrap_servers == ["kafka-1:9092", "kafka-2:9092"]
    assert config.sinks.alertmanager[0].labels == {"team": "sre"}
    assert "kafka.sasl_plain_password" in secrets
    kafka_streams(config)


def test_a_member_with_no_partitions_is_a_ready_standby(tmp_path: Path) -> None:
    # More replicas than partitions: the group gives this one nothing. It is still ready, so
    # rollouts do not stall on it and it takes partitions over when another member leaves.
    daemon = build_daemon(tmp_path)
    daemon.consumer = FakeConsumer([], daemon)
    daemon._contact = BrokerContact(daemon.consumer, 3.0)
    assert not daemon.is_ready()
    daemon._assigned = set()
    daemon._on_rebalance([])
    assert daemon.is_ready()
    assert daemon.registry.get_sample_value("detector_ready") == 1
    daemon._revoked = True  # a rebalance starts: not ready until the next assignment
    daemon._on_rebalance([])
    assert not daemon.is_ready()


def test_a_lost_broker_makes_the_daemon_not_ready_until_the_coordinator_answers(tmp_path: Path) -> None:
    daemon = build_daemon(tmp_path)
    consumer = FakeConsumer([], daemon)
    daemon.consumer = consumer
    daemon._contact = BrokerContact(consumer, 3.0)
    daemon._assigned = set()
    daemon._on_rebalance([])
    heartbeat = consumer._coordinator.heartbeat
    assert daemon.is_ready() and daemon.kafka_reachable()
    heartbeat.last_receive = heartbeat.last_reset = time.monotonic() - 2.5  # two missed heartbeats
    assert daemon.is_ready()
    heartbeat.last_receive = heartbeat.last_reset = time.monotonic() - 3.5  # the third
    assert not daemon.is_ready()
    assert daemon.registry.get_sample_value("detector_ready") == 0
    assert daemon.registry.get_sample_value("detector_kafka_reachable") == 0
    # A new coordinator resets the timers, but only an answered heartbeat brings readiness back:
    # until then the member may have been evicted, and its assignment be stale.
    heartbeat.last_reset = time.monotonic()
    assert not daemon.is_ready()
    heartbeat.last_receive = time.monotonic()
    assert daemon.is_ready()
    assert daemon.registry.get_sample_value("detector_kafka_reachable") == 1


def test_a_member_that_is_not_joined_is_not_lost_only_not_ready(tmp_path: Path) -> None:
    # While (re)joining, heartbeats are off by design: readiness already follows the rebalance.
    daemon = build_daemon(tmp_path)
    consumer = FakeConsumer([], daemon)
    consumer.state = "<rebalancing>"
    consumer._coordinator.heartbeat.last_receive = consumer._coordinator.heartbeat.last_reset = 0.0
    contact = BrokerContact(consumer, 3.0)
    assert contact.reachable()


def test_broker_contact_reads_what_kafka_python_has() -> None:
    # BrokerContact reads kafka-python internals: an upgrade that moves them fails here.
    from kafka import KafkaConsumer
    from kafka.structs import MemberState

    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id="g", api_version=(2, 8))
    try:
        heartbeat = consumer._coordinator.heartbeat
        assert isinstance(heartbeat.last_receive, float) and isinstance(heartbeat.last_reset, float)
        assert consumer.group_metadata().state == MemberState.UNJOINED
        assert BrokerContact(consumer, 3.0).reachable()
    finally:
        consumer.close(timeout_ms=0)


def test_commits_wait_for_confirmed_sinks_and_a_failed_commit_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kafka.errors import KafkaConnectionError
    from kafka.structs import OffsetAndMetadata, TopicPartition

    import detector.service

    daemon = build_daemon(tmp_path)
    consumer = FakeConsumer([], daemon)
    daemon.consumer = consumer
    daemon._contact = BrokerContact(consumer, 3.0)

    class ConfirmedSink:
        acknowledged = 0  # deliveries the receiver answered

    sink = ConfirmedSink()
    tp = TopicPartition("metrics", 0)
    for mark, offset in ((1, 5), (1, 9), (2, 12)):  # the batches' marks: the sink's `queued` after each
        daemon._held.append(({sink: mark}, {tp: OffsetAndMetadata(offset, "", -1)}))  # type: ignore[dict-item]
    daemon._release_commits()
    assert consumer.commits == []
    sink.acknowledged = 1
    daemon._release_commits()
    assert consumer.commits == [{("metrics", 0): 9}]  # both batches behind the first delivery, at once

    # The broker is away: the commit fails, is kept, and is tried again a second later.
    monkeypatch.setattr(detector.service, "_COMMIT_RETRY_S", 0.2)
    committed = consumer.commits
    consumer.commit = lambda offsets: (_ for _ in ()).throw(KafkaConnectionError("refused"))  # type: ignore[method-assign]
    sink.acknowledged = 2
    daemon._release_commits()
    assert len(daemon._held) == 1
    consumer.commit = FakeConsumer.commit.__get__(consumer)  # type: ignore[method-assign]
    daemon._release_commits()
    assert committed == [{("metrics", 0): 9}]  # not before the retry delay
    time.sleep(0.25)
    daemon._release_commits()
    assert committed == [{("metrics", 0): 9}, {("metrics", 0): 12}]
    assert not daemon._held


def test_a_loop_blocked_on_a_sink_stays_healthy_a_stalled_loop_does_not(tmp_path: Path) -> None:
    # Liveness: restarting a daemon that waits for a down receiver would not bring the receiver
    # back, so a wait inside a sink's emit is alive; a loop that stopped turning is not.
    daemon = build_daemon(tmp_path, scoring={"batch_records": 1, "batch_wait_ms": 1})
    alert_on_every_window(daemon)
    seen: list[bool] = []

    class StalledSink:
        kind = "webhook"

        def emit(self, alerts: list[Any]) -> None:
            if alerts:
                daemon._last_loop -= 3600  # as if this emit had been waiting for an hour
                seen.append(daemon.is_healthy())

        def close(self) -> None:
            pass

    daemon.consumer = FakeConsumer([[record(i)] for i in range(5)], daemon)
    daemon.sinks = [StalledSink()]
    daemon.process([record(i) for i in range(5)])
    assert seen == [True]
    assert not daemon.is_healthy()  # the emit returned, and the loop has not turned for an hour


def test_a_partition_that_stops_moving_with_records_waiting_is_logged(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    # The soak's stall: Tansu answered every fetch without records while the lag grew; the
    # daemon stayed ready and said nothing. An idle partition (lag 0) is not stalled.
    from kafka.structs import TopicPartition

    tp = TopicPartition("metrics", 0)
    with caplog.at_level(logging.INFO, logger="detector.service"):
        daemon._watch_progress(tp, 100, 0, now=0.0)
        daemon._watch_progress(tp, 100, 0, now=500.0)  # idle: nothing to read
        daemon._watch_progress(tp, 100, 5, now=510.0)
        daemon._watch_progress(tp, 100, 900, now=559.0)
        assert not caplog.records
        daemon._watch_progress(tp, 100, 1000, now=561.0)  # 61 s since the last time it had nothing to read
        daemon._watch_progress(tp, 100, 1200, now=600.0)  # warned once
        daemon._watch_progress(tp, 150, 1100, now=601.0)
    warning, resumed = caplog.records
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "metrics[0]: no record consumed for 61 s although 1000 record(s) wait past offset 100" in message
    assert resumed.getMessage() == "metrics[0]: consuming again, from offset 150"
