"""Alert dedupe without a broker: reading the alerts topic's tail back (`read_alert_tail`,
against a stand-in consumer that behaves as kafka-python's does towards it), the Kafka sink
skipping the ids found there, and the daemon wiring the two on assignment.
`tests/integration/test_crash.py` proves the same against a real broker and real kills."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from test_service import build_daemon
from test_sinks import FakeProducer, alert

from detector.metrics import Metrics
from detector.sinks import AlertTail, KafkaAlertSink, alert_id_of, alert_json, read_alert_tail


class TailConsumer:
    """Stands in for a KafkaConsumer of no group: `logs[p]` holds partition p's values, the
    first at offset `begin[p]` (older ones deleted). Each poll fetches up to `fetch` records
    per partition from its position and, as kafka-python does, keeps the high watermark the
    fetch response reports (none when `report_highwater` is False). `grow` is appended to the
    logs after the first poll. Asking for the end offsets fails the test: on Tansu they are
    wrong."""

    def __init__(
        self,
        logs: dict[int, list[bytes]],
        begin: dict[int, int] | None = None,
        fetch: int = 3,
        grow: dict[int, list[bytes]] | None = None,
        report_highwater: bool = True,
    ) -> None:
        self.logs = logs
        self.begin = begin or {}
        self.fetch = fetch
        self.grow = grow or {}
        self.report_highwater = report_highwater
        self.positions: dict[Any, int] = {}
        self.highwaters: dict[Any, int] = {}
        self.paused: set[Any] = set()
        self.read: dict[int, list[int]] = {p: [] for p in logs}  # offsets handed out, per partition
        self.polls = 0

    def assign(self, tps: list[Any]) -> None:
        self.assigned = list(tps)

    def seek_to_beginning(self, *tps: Any) -> None:
        for tp in tps:
            self.positions[tp] = self.begin.get(tp.partition, 0)

    def seek(self, tp: Any, offset: int) -> None:
        self.positions[tp] = offset

    def position(self, tp: Any) -> int:
        return self.positions[tp]

    def highwater(self, tp: Any) -> int | None:
        return self.highwaters.get(tp)

    def pause(self, *tps: Any) -> None:
        self.paused.update(tps)

    def end_offsets(self, tps: Any) -> None:
        raise AssertionError("the end offsets lookup is wrong on Tansu; the tail must not use it")

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        out = {}
        for tp in self.assigned:
            if tp in self.paused:
                continue
            first = self.begin.get(tp.partition, 0)
            log = self.logs[tp.partition]
            end = first + len(log)
            if self.report_highwater:
                self.highwaters[tp] = end
            pos = self.positions[tp]
            batch = [SimpleNamespace(offset=o, value=log[o - first]) for o in range(pos, min(end, pos + self.fetch))]
            if batch:
                out[tp] = batch
                self.positions[tp] = batch[-1].offset + 1
                self.read[tp.partition] += [r.offset for r in batch]
        self.polls += 1
        if self.polls == 1:
            for p, values in self.grow.items():
                self.logs[p] += values
        return out


def alerts_log(*entities: str) -> list[bytes]:
    return [alert_json(alert(e)) for e in entities]


def ids(*entities: str) -> set[str]:
    return {alert(e).id for e in entities}


def test_the_tail_is_the_last_messages_of_each_partition_up_to_the_fetched_end() -> None:
    names = [f"e{i}" for i in range(10)]
    consumer = TailConsumer(
        {
            0: [*alerts_log(*names), b"\xff junk", b'{"id": 7}', b"[]"],  # offsets 0-12
            1: alerts_log("x", "y"),  # offsets 100-101: the older ones were deleted
            2: [],
        },
        begin={1: 100},
    )
    tail = read_alert_tail(consumer, "alerts", [0, 1, 2], 6, timeout_s=5)
    # Partition 0 ends at 13: its last 6 messages are offsets 7-12, three of them alerts.
    assert tail.ids == ids("e7", "e8", "e9", "x", "y")
    assert (tail.messages, tail.partitions, tail.unfinished) == (6 + 2, 3, [])
    # One fetch from the beginning gives the end, then the read jumps to the tail.
    assert consumer.read[0] == [0, 1, 2, *range(7, 13)]
    assert consumer.assigned == [TopicPartition("alerts", p) for p in (0, 1, 2)]


def test_a_lookback_beyond_the_beginning_reads_the_whole_partition() -> None:
    consumer = TailConsumer({0: alerts_log("a", "b", "c", "d")}, fetch=1)
    tail = read_alert_tail(consumer, "alerts", [0], 10_000, timeout_s=5)
    assert tail.ids == ids("a", "b", "c", "d")
    assert consumer.read[0] == [0, 1, 2, 3]


def test_messages_written_after_the_first_fetch_are_not_waited_for() -> None:
    consumer = TailConsumer({0: alerts_log("a", "b", "c", "d")}, fetch=2, grow={0: alerts_log("late")})
    tail = read_alert_tail(consumer, "alerts", [0], 3, timeout_s=5)
    assert tail.ids == ids("b", "c", "d")
    assert tail.unfinished == []


def test_a_partition_without_a_high_watermark_is_unfinished_after_the_timeout() -> None:
    consumer = TailConsumer({0: alerts_log("a"), 1: []}, report_highwater=False)
    tail = read_alert_tail(consumer, "alerts", [0, 1], 10, timeout_s=0.1)
    assert tail.unfinished == [0, 1]
    assert tail.ids == set()


def test_no_partitions_reads_nothing() -> None:
    consumer = TailConsumer({})
    assert read_alert_tail(consumer, "alerts", set(), 10, timeout_s=5) == AlertTail(set(), 0, 0, [])
    assert consumer.polls == 0


def test_alert_ids_are_read_from_alert_messages_and_nothing_else() -> None:
    a = alert("web-1")
    assert alert_id_of(alert_json(a)) == a.id
    assert alert_id_of(json.dumps({"status": "firing", "id": "abc"}).encode()) == "abc"  # another writer's order
    assert alert_id_of(b'{"id":"a\\"b"}') == 'a"b'
    for junk in (
        None,
        b"",
        b"{",
        b'{"id":"abc',
        b'{"id": 1}',
        b'["id"]',
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"id":"\xff"}',
    ):
        assert alert_id_of(junk) is None, junk


@given(st.binary(max_size=200))
def test_any_bytes_give_an_id_or_none(value: bytes) -> None:
    for candidate in (value, b'{"id":"' + value):
        result = alert_id_of(candidate)
        assert result is None or isinstance(result, str)


def test_the_kafka_sink_skips_ids_already_on_the_topic_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(CollectorRegistry())
    producer = FakeProducer()
    sink = KafkaAlertSink(producer, "alerts", metrics)
    sink.on_topic = ids("a", "c")
    with caplog.at_level(logging.INFO, logger="detector.sinks"):
        sink.emit([alert("a"), alert("b"), alert("c")])
        sink.emit([alert("c")])
    assert [json.loads(value)["id"] for _, _, value, _ in producer.sent] == [alert("b").id]
    assert producer.flushes == 1  # an emit with nothing left to send does not wait on the producer
    registry = metrics.registry
    assert registry.get_sample_value("detector_alerts_deduplicated_total", {"sink": "kafka"}) == 3
    assert registry.get_sample_value("detector_sink_deliveries_total", {"sink": "kafka"}) == 1
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(messages) == 2
    assert f"not sending 2 alert(s) again, already on the topic: {alert('a').id} {alert('c').id}" in messages[0]
    sink.on_topic = frozenset()
    sink.emit([alert("a")])
    assert len(producer.sent) == 2


class PartitionsProducer(FakeProducer):
    def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}


def test_an_assignment_gives_the_kafka_sink_the_ids_on_the_topic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import kafka

    daemon = build_daemon(tmp_path, kafka={"alert_dedup_lookback": 2})
    daemon.producer = PartitionsProducer()
    sink = KafkaAlertSink(daemon.producer, "alerts", daemon.metrics)
    daemon.sinks = [sink]
    readers: list[dict[str, Any]] = []

    def reader(**settings: Any) -> TailConsumer:
        readers.append(settings)
        consumer = TailConsumer({0: alerts_log("a", "b", "c"), 1: alerts_log("d")})
        consumer.close = lambda: None  # type: ignore[attr-defined]
        return consumer

    monkeypatch.setattr(kafka, "KafkaConsumer", reader)
    with caplog.at_level(logging.INFO, logger="detector.service"):
        daemon._read_alert_tail(any_assigned=True)
    assert sink.on_topic == ids("b", "c", "d")
    assert readers[0]["group_id"] is None and readers[0]["enable_auto_commit"] is False
    assert any("read back alerts topic alerts: 3 alert id(s) in the last 3 message(s)" in m for m in caplog.messages)

    daemon._read_alert_tail(any_assigned=False)  # no partitions: no alerts to come, nothing read
    assert sink.on_topic == frozenset() and len(readers) == 1

    def unreachable(**settings: Any) -> None:
        raise KafkaTimeoutError()

    monkeypatch.setattr(kafka, "KafkaConsumer", unreachable)
    with caplog.at_level(logging.WARNING, logger="detector.service"):
        daemon._read_alert_tail(any_assigned=True)
    assert sink.on_topic == frozenset()
    assert "sent again (at least once)" in caplog.records[-1].getMessage()


def test_a_lookback_of_zero_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka

    daemon = build_daemon(tmp_path, kafka={"alert_dedup_lookback": 0})
    daemon.producer = PartitionsProducer()
    sink = KafkaAlertSink(daemon.producer, "alerts", daemon.metrics)
    sink.on_topic = {"stale"}
    daemon.sinks = [sink]
    monkeypatch.setattr(kafka, "KafkaConsumer", lambda **settings: pytest.fail("no reader wanted"))
    daemon._read_alert_tail(any_assigned=True)
    assert sink.on_topic == frozenset()
