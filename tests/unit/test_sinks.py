"""Webhook and Alertmanager sinks against a tiny local HTTP receiver: payload format,
retries with backoff, the bounded queue, re-sending active alerts, and shutdown."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from detector.alerts import Alert
from detector.config import AlertmanagerSinkConfig, WebhookSinkConfig
from detector.metrics import Metrics
from detector.sinks import (
    AlertmanagerSink,
    DeadLetterWriter,
    KafkaAlertSink,
    SinkError,
    WebhookSink,
    retry_span_s,
)
from detector.source import Rejection

FAST_RETRY = {"initial_backoff_s": 0.01, "max_backoff_s": 0.02, "max_attempts": 4, "timeout_s": 2}


class Receiver:
    """Records POSTs; answers each with the next status from `statuses` (then 200)."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # of every POST, answered 200 or not
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(receiver.delay_s)
                with receiver.lock:
                    receiver.headers.append(dict(self.headers))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    if status == 200:
                        receiver.posts.append((self.path, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait(self, count: int, timeout_s: float = 5.0) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.posts) >= count:
                    return list(self.posts)
            time.sleep(0.01)
        raise AssertionError(f"got {len(self.posts)} POSTs, expected {count}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def alert(
    entity: str = "web-1",
    status: str = "firing",
    severity: str = "warning",
    end_ms: int = 1_700_000_060_000,
    resolves: str | None = None,
) -> Alert:
    return Alert(
        id=f"{entity}-{status}-{end_ms}",
        status=status,  # type: ignore[arg-type]
        stream="hosts",
        entity=entity,
        severity=severity,
        window_start_ms=end_ms - 60_000,
        window_end_ms=end_ms,
        score=3.2,
        threshold=0.4,
        top_features=(("latency", 2.5), ("cpu", 0.1)),
        model_version="hosts-v1",
        resolves=resolves,
    )


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_webhook_posts_alert_objects(receiver: Receiver, metrics: Metrics) -> None:
    sink = WebhookSink(WebhookSinkConfig(url=receiver.url + "/hook", headers={"X-Token": "t"}), metrics)
    sink.emit([alert("a"), alert("b")])
    sink.emit([])
    path, body = receiver.wait(1)[0]
    sink.close()
    assert path == "/hook"
    assert [a["entity"] for a in body] == ["a", "b"]
    assert body[0] == alert("a").to_dict()
    assert value(metrics, "detector_sink_deliveries_total", sink="webhook") == 1


def test_webhook_retries_with_backoff_then_delivers(metrics: Metrics) -> None:
    r = Receiver(statuses=[503, 500, 429])
    sink = WebhookSink(WebhookSinkConfig(url=r.url, retry=FAST_RETRY), metrics)  # type: ignore[arg-type]
    sink.emit([alert()])
    assert len(r.wait(1)) == 1
    sink.close()
    assert value(metrics, "detector_sink_failures_total", sink="webhook") == 3
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 0


def test_webhook_gives_up_on_a_client_error_and_counts_it(metrics: Metrics) -> None:
    r = Receiver(statuses=[400])
    sink = WebhookSink(WebhookSinkConfig(url=r.url, retry=FAST_RETRY), metrics)  # type: ignore[arg-type]
    sink.emit([alert(), alert("b")])
    sink.close()
    assert r.posts == []
    assert value(metrics, "detector_sink_failures_total", sink="webhook") == 1  # no retry on a 400
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 2


def test_a_full_queue_drops_and_counts_without_blocking(metrics: Metrics) -> None:
    r = Receiver(delay_s=0.5)  # a slow receiver: the first POST occupies the delivery thread
    sink = WebhookSink(WebhookSinkConfig(url=r.url, queue_size=1, retry=FAST_RETRY), metrics)  # type: ignore[arg-type]
    started = time.monotonic()
    for i in range(5):
        sink.emit([alert(f"e{i}")])
        time.sleep(0.02)
    assert time.monotonic() - started < 0.4  # emit never waited for the receiver
    sink.close()
    delivered = value(metrics, "detector_sink_deliveries_total", sink="webhook")
    dropped = value(metrics, "detector_sink_dropped_total", sink="webhook", cause="queue_full")
    assert dropped >= 3
    assert delivered + dropped == 5


def test_close_gives_up_after_its_timeout_and_counts_the_rest(metrics: Metrics) -> None:
    # Nothing listens on this port: every attempt fails and backs off.
    cfg = WebhookSinkConfig(url="http://127.0.0.1:9/", retry={"initial_backoff_s": 5, "max_attempts": 10})  # type: ignore[arg-type]
    sink = WebhookSink(cfg, metrics)
    sink.close_timeout_s = 0.2
    sink.emit([alert("a")])
    sink.emit([alert("b")])
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 3
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 2


def test_alertmanager_format_resend_and_resolve(receiver: Receiver, metrics: Metrics) -> None:
    cfg = AlertmanagerSinkConfig(
        url=receiver.url + "/", labels={"team": "sre"}, resend_interval_s=0.2, generator_url="http://detector/"
    )
    sink = AlertmanagerSink(cfg, metrics)
    firing = alert("web-1")
    sink.emit([firing])
    path, body = receiver.wait(1)[0]
    assert path == "/api/v2/alerts"
    (sent,) = body
    assert sent["labels"] == {
        "alertname": "AnomalyDetected",
        "team": "sre",
        "stream": "hosts",
        "entity": "web-1",
        "severity": "warning",
    }
    assert sent["annotations"]["alert_id"] == firing.id
    assert sent["annotations"]["top_features"] == "latency=2.5, cpu=0.1"
    assert sent["startsAt"] == "2023-11-14T22:14:20.000Z"
    assert sent["endsAt"] > "2025"  # wall clock + 4 re-send intervals: expires if we stop re-sending
    assert sent["generatorURL"] == "http://detector/"

    resent = receiver.wait(2)[1][1]
    assert [a["labels"]["entity"] for a in resent] == ["web-1"]

    sink.emit([alert("web-1", "resolved", end_ms=1_700_000_600_000, resolves=firing.id)])
    time.sleep(0.5)
    sink.close()
    ended = [a for _, body in receiver.posts for a in body if a["endsAt"] < "2025"]
    assert len(ended) == 1
    assert ended[0]["labels"]["entity"] == "web-1"
    assert ended[0]["endsAt"] == "2023-11-14T22:23:20.000Z"
    # Nothing is re-sent once the alert is resolved.
    count = len(receiver.posts)
    time.sleep(0.3)
    assert len(receiver.posts) == count


def test_alertmanager_escalation_ends_the_warning_alert(receiver: Receiver, metrics: Metrics) -> None:
    sink = AlertmanagerSink(AlertmanagerSinkConfig(url=receiver.url, resend_interval_s=60), metrics)
    sink.emit([alert("db", severity="warning", end_ms=1_700_000_060_000)])
    sink.emit([alert("db", severity="critical", end_ms=1_700_000_120_000)])
    posts = receiver.wait(2)
    sink.close()
    second = posts[1][1]
    assert [(a["labels"]["severity"], a["endsAt"] < "2025") for a in second] == [("warning", True), ("critical", False)]


def test_alertmanager_ends_both_alerts_of_an_escalated_incident(receiver: Receiver, metrics: Metrics) -> None:
    sink = AlertmanagerSink(AlertmanagerSinkConfig(url=receiver.url, resend_interval_s=60), metrics)
    warning = alert("db", severity="warning", end_ms=1_700_000_060_000)
    critical = replace(alert("db", severity="critical", end_ms=1_700_000_120_000), replaces=warning.id)
    resolved = replace(
        alert("db", "resolved", severity="critical", end_ms=1_700_000_600_000, resolves=critical.id),
        ends=(warning.id, critical.id),
    )
    sink.emit([warning, critical, resolved])
    receiver.wait(1)
    sink.close()
    sent = [a for _, body in receiver.posts for a in body]
    ended = {a["annotations"]["alert_id"]: a["endsAt"] for a in sent if a["endsAt"] < "2025"}
    assert ended == {warning.id: "2023-11-14T22:15:20.000Z", critical.id: "2023-11-14T22:23:20.000Z"}


def test_alertmanager_never_gets_event_times_in_the_future(receiver: Receiver, metrics: Metrics) -> None:
    # A producer clock an hour ahead: startsAt after endsAt would be refused with a 400 and lost.
    sink = AlertmanagerSink(AlertmanagerSinkConfig(url=receiver.url, resend_interval_s=60), metrics)
    ahead_ms = int(time.time() * 1000) + 3_600_000
    firing = alert("db", end_ms=ahead_ms)
    sink.emit([firing, alert("db", "resolved", end_ms=ahead_ms + 60_000, resolves=firing.id)])
    receiver.wait(1)
    sink.close()
    (first, ended) = [a for _, body in receiver.posts for a in body]
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1))
    assert first["startsAt"] <= now < first["endsAt"]
    assert ended["startsAt"] <= ended["endsAt"] <= now
    assert first["annotations"]["window_end"] > now  # the annotation keeps the real event time


def test_alertmanager_restore_resends_without_sending_at_once(receiver: Receiver, metrics: Metrics) -> None:
    sink = AlertmanagerSink(AlertmanagerSinkConfig(url=receiver.url, resend_interval_s=0.2), metrics)
    sink.restore([alert("a"), alert("b"), alert("b", "resolved", end_ms=1_700_000_600_000)])
    time.sleep(0.05)
    assert receiver.posts == []  # history is not sent again...
    _, body = receiver.wait(1)[0]  # ...but what is still active is re-sent
    sink.close()
    assert [a["labels"]["entity"] for a in body] == ["a"]


class FakeFuture:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> object:
        if self.error is not None:
            raise self.error
        return object()


class FakeProducer:
    """Stands in for KafkaProducer in these unit tests; the integration tests use a real broker."""

    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[tuple[str, Any, Any, Any]] = []
        self.error = error
        self.flushes = 0

    def send(self, topic: str, key: Any = None, value: Any = None, headers: Any = None) -> FakeFuture:
        self.sent.append((topic, key, value, headers))
        return FakeFuture(self.error)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


def test_kafka_sink_keys_by_entity_and_fails_loudly(metrics: Metrics) -> None:
    producer = FakeProducer()
    KafkaAlertSink(producer, "alerts", metrics).emit([alert("a"), alert("b")])
    assert [(t, k) for t, k, _, _ in producer.sent] == [("alerts", b"a"), ("alerts", b"b")]
    assert json.loads(producer.sent[0][2]) == alert("a").to_dict()
    assert producer.flushes == 1
    failing = KafkaAlertSink(FakeProducer(RuntimeError("no leader")), "alerts", metrics)
    with pytest.raises(SinkError, match="no leader"):
        failing.emit([alert()])
    assert value(metrics, "detector_sink_failures_total", sink="kafka") == 1


def test_kafka_sink_turns_a_failing_send_or_flush_into_a_sink_error(metrics: Metrics) -> None:
    # kafka-python raises from `send` (no metadata within max_block_ms, a record too large)
    # and from `flush` (timeout), not only through the futures.
    class Raising(FakeProducer):
        def __init__(self, where: str) -> None:
            super().__init__()
            self.where = where

        def send(self, topic: str, key: Any = None, value: Any = None, headers: Any = None) -> FakeFuture:
            if self.where == "send":
                raise TimeoutError("no metadata for topic")
            return super().send(topic, key, value, headers)

        def flush(self, timeout: float | None = None) -> None:
            if self.where == "flush":
                raise TimeoutError("flush timed out")

    for where in ("send", "flush"):
        with pytest.raises(SinkError, match="alerts topic alerts: delivery failed"):
            KafkaAlertSink(Raising(where), "alerts", metrics).emit([alert()])
    assert value(metrics, "detector_sink_failures_total", sink="kafka") == 2
    assert value(metrics, "detector_sink_deliveries_total", sink="kafka") == 0
    writer = DeadLetterWriter(Raising("send"), "dead", metrics)
    record = SimpleNamespace(topic="m", partition=0, offset=1, key=None, value=b"x", headers=None)
    with pytest.raises(SinkError, match="dead-letter topic dead"):
        writer.send(record, "hosts", Rejection(0, "invalid_json", "bad"))


def test_json_sinks_refuse_nan_and_infinity(receiver: Receiver, metrics: Metrics) -> None:
    bad = replace(alert(), score=float("inf"), threshold=float("nan"))
    producer = FakeProducer()
    KafkaAlertSink(producer, "alerts", metrics).emit([bad])
    sent = json.loads(producer.sent[0][2], parse_constant=lambda c: pytest.fail(f"{c} in alert JSON"))
    assert (sent["score"], sent["threshold"]) == (None, None)
    sink = WebhookSink(WebhookSinkConfig(url=receiver.url), metrics)
    sink.emit([bad])
    ((_, body),) = receiver.wait(1)
    sink.close()
    assert body == [sent]


def test_dead_letters_keep_the_record_and_add_headers(metrics: Metrics) -> None:
    producer = FakeProducer()
    writer = DeadLetterWriter(producer, "dead", metrics)
    record = SimpleNamespace(topic="m", partition=2, offset=41, key=b"h", value=b"{bad", headers=[("trace", b"1")])
    writer.send(record, "hosts", Rejection(0, "invalid_json", "unexpected end"))
    assert value(metrics, "detector_dead_letters_total", stream="hosts", reason="invalid_json") == 0
    writer.flush()
    ((topic, key, val, headers),) = producer.sent
    assert (topic, key, val) == ("dead", b"h", b"{bad")
    assert dict(headers) == {
        "trace": b"1",
        "detector.reason": b"invalid_json",
        "detector.detail": b"unexpected end",
        "detector.stream": b"hosts",
        "detector.source.topic": b"m",
        "detector.source.partition": b"2",
        "detector.source.offset": b"41",
    }
    assert value(metrics, "detector_dead_letters_total", stream="hosts", reason="invalid_json") == 1


def test_a_bearer_token_comes_from_the_environment_and_stays_out_of_the_logs(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ALERT_TOKEN", "s3cr3t-t0ken")
    r = Receiver(statuses=[503, 401])  # a retry, then a refusal: both are logged
    hook = WebhookSink(WebhookSinkConfig(url=r.url, bearer_token_env="ALERT_TOKEN", retry=FAST_RETRY), metrics)  # type: ignore[arg-type]
    am = AlertmanagerSink(AlertmanagerSinkConfig(url=r.url, bearer_token_env="ALERT_TOKEN", retry=FAST_RETRY), metrics)  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG):
        hook.emit([alert("a")])
        hook.close()
        am.emit([alert("b")])
        assert r.wait(1)[0][0] == "/api/v2/alerts"
        am.close()
    assert [h["Authorization"] for h in r.headers] == ["Bearer s3cr3t-t0ken"] * 3
    assert "giving up" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_default_retries_outlast_a_two_minute_outage() -> None:
    from detector.config import Retry

    assert 120 < retry_span_s(Retry()) < 300
    assert retry_span_s(Retry(max_attempts=None)) == float("inf")
    assert retry_span_s(Retry(initial_backoff_s=1, max_backoff_s=2, max_attempts=4)) == 1 + 2 + 2


def test_a_queued_delivery_gives_up_where_a_confirmed_one_keeps_trying(metrics: Metrics) -> None:
    retry = {**FAST_RETRY, "max_attempts": 2}
    r = Receiver(statuses=[503, 503, 503, 503, 503])
    queued = WebhookSink(WebhookSinkConfig(url=r.url + "/q", retry=retry), metrics)  # type: ignore[arg-type]
    queued.emit([alert("a")])
    queued.close()
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 1
    assert (queued.queued, queued.acknowledged) == (1, 0)
    confirmed = WebhookSink(WebhookSinkConfig(url=r.url + "/c", retry=retry, delivery="confirmed"), metrics)  # type: ignore[arg-type]
    confirmed.emit([alert("b")])
    assert confirmed.queued == 1
    assert r.wait(1)[0][0] == "/c"  # after the three 503s left
    confirmed.close()
    assert confirmed.acknowledged == 1
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 1


def test_a_confirmed_delivery_waits_for_room_instead_of_dropping(metrics: Metrics) -> None:
    r = Receiver(delay_s=0.3)  # the first POST occupies the delivery thread
    cfg = WebhookSinkConfig(url=r.url, queue_size=1, retry=FAST_RETRY, delivery="confirmed")  # type: ignore[arg-type]
    sink = WebhookSink(cfg, metrics)
    started = time.monotonic()
    for i in range(4):
        sink.emit([alert(f"e{i}")])
    assert time.monotonic() - started >= 0.5  # emit waited for the receiver
    sink.close()
    assert [body[0]["entity"] for _, body in r.posts] == ["e0", "e1", "e2", "e3"]
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="queue_full") == 0
    assert (sink.queued, sink.acknowledged) == (4, 4)


def test_a_confirmed_delivery_counts_a_refusal_as_an_answer(metrics: Metrics) -> None:
    # A 400 will not change with retries: dropped and counted, so commits move on.
    r = Receiver(statuses=[400])
    sink = WebhookSink(WebhookSinkConfig(url=r.url, retry=FAST_RETRY, delivery="confirmed"), metrics)  # type: ignore[arg-type]
    sink.emit([alert("a")])
    sink.emit([alert("b")])
    r.wait(1)
    sink.close()
    assert sink.acknowledged == 2
    assert value(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 1


def test_kafka_sinks_wait_as_long_as_the_producer_retries(metrics: Metrics) -> None:
    producer = SimpleNamespace(config={"delivery_timeout_ms": 60_000})
    assert KafkaAlertSink(producer, "alerts", metrics).timeout_s == 65.0
    assert DeadLetterWriter(producer, "dead", metrics).timeout_s == 65.0
    assert KafkaAlertSink(producer, "alerts", metrics, timeout_s=1.0).timeout_s == 1.0
