"""Alert sinks of `detector run`: a Kafka topic, Alertmanager, a generic JSON webhook; and the
dead-letter topic for records that cannot be used.

A sink has `emit(alerts)` and `close()` (see `detector.alerts.Sink`). `emit` returns once
the alerts are *handed over*: written to Kafka and acknowledged (Kafka sink), or queued for
delivery (webhooks). The daemon commits offsets only after every sink's `emit` returned, so
delivery is at least once; alert ids are stable, so receivers can deduplicate. The Kafka sink
deduplicates itself: it skips the ids the daemon read back from the end of the alerts topic
when its partitions were assigned (`read_alert_tail`, `kafka.alert_dedup_lookback`), so a
crash between delivery and commit puts no alert on the topic twice. The other sinks re-send:
a webhook's queue dies with the process, and the re-send is what delivers what it held.

The Kafka sink and the dead-letter writer wait for the broker as long as the producer retries
(its `delivery_timeout_ms`, plus a margin), so a broker outage shorter than that is ridden out.

Webhooks deliver from a background thread with exponential backoff, in order. Their queue is
bounded, and what happens while the receiver is down depends on the sink's `delivery` policy:

- `queued`: when the queue is full, new alerts are dropped, counted in
  `detector_sink_dropped_total` and logged, so a dead receiver never stops consumption.
- `confirmed`: the daemon commits a batch's offsets only once the receiver acknowledged every
  delivery up to that batch (`acknowledged` reaching the `queued` count it read after `emit`);
  a retryable failure is retried until it succeeds or the daemon shuts down, and a full queue
  makes `emit` wait. A restart therefore re-sends whatever was not acknowledged.

A bearer token (`bearer_token_env`) is read from the environment when the sink is built and
sent as an `Authorization` header; it is never logged.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from detector.alerts import Alert
from detector.config import AlertmanagerSinkConfig, Retry, WebhookSinkConfig
from detector.errors import ConfigError
from detector.metrics import Metrics
from detector.source import Rejection, format_timestamp

log = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """A sink could not hand alerts over (e.g. Kafka did not acknowledge them).

    Not a `DetectorError`: nothing the user configured is wrong, so the daemon crashes
    (exit 1) without committing the batch, and its supervisor restarts it.
    """


def delivery_timeout_s(producer: Any) -> float:
    """How long to wait for the broker to acknowledge a send: the producer's own
    `delivery_timeout_ms` (it retries until then), plus a margin. Waiting less would turn a
    short broker outage, which the producer rides out, into a failed delivery (exit 1)."""
    config = getattr(producer, "config", None)
    timeout_ms = config.get("delivery_timeout_ms", 120_000) if isinstance(config, dict) else 120_000
    return float(timeout_ms) / 1000 + 5.0


def bearer_headers(headers: dict[str, str], token_env: str | None) -> dict[str, str]:
    """`headers`, plus `Authorization: Bearer <token>` when `token_env` names a variable."""
    if token_env is None:
        return dict(headers)
    token = os.environ.get(token_env)
    if token is None:  # checked when the config was loaded, and unset since
        raise ConfigError("sinks", [f"bearer_token_env: environment variable {token_env} is not set"])
    return {**headers, "Authorization": f"Bearer {token}"}


def retry_span_s(retry: Retry) -> float:
    """Seconds of backoff between a delivery's first and last try (request time not counted):
    how long a receiver may be down before a `queued` delivery is given up. Infinite when
    `max_attempts` is null."""
    if retry.max_attempts is None:
        return float("inf")
    total, backoff = 0.0, retry.initial_backoff_s
    for _ in range(retry.max_attempts - 1):
        total += backoff
        backoff = min(backoff * 2, retry.max_backoff_s)
    return total


def alert_json(alert: Alert) -> bytes:
    return json.dumps(alert.to_dict(), separators=(",", ":"), allow_nan=False).encode()


# --- Kafka -------------------------------------------------------------------------------


class KafkaAlertSink:
    """Alert events as JSON messages on `topic`, keyed by entity (so one entity's events stay
    in order on one partition). `emit` blocks until the broker acknowledged every message.

    `on_topic` holds alert ids already on the topic (the daemon reads them back on each
    partition assignment, `read_alert_tail`); `emit` does not send those again, and counts
    them in `detector_alerts_deduplicated_total{sink="kafka"}`. Alert ids are unique per
    event, so a match is a re-send of the same event, never a new one."""

    kind = "kafka"

    def __init__(self, producer: Any, topic: str, metrics: Metrics, timeout_s: float | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.metrics = metrics
        self.timeout_s = delivery_timeout_s(producer) if timeout_s is None else timeout_s
        self.on_topic: Collection[str] = frozenset()

    def emit(self, alerts: Sequence[Alert]) -> None:
        """Raises SinkError unless the broker acknowledged every alert not in `on_topic`."""
        if self.on_topic and alerts:
            again = [a.id for a in alerts if a.id in self.on_topic]
            if again:
                alerts = [a for a in alerts if a.id not in self.on_topic]
                self.metrics.alerts_deduplicated.labels(self.kind).inc(len(again))
                log.info(
                    "alerts topic %s: not sending %d alert(s) again, already on the topic: %s",
                    self.topic,
                    len(again),
                    " ".join(again),
                )
        if not alerts:
            return
        # `send` itself can raise too (no metadata within max_block_ms, a record too large).
        try:
            futures = [
                self.producer.send(
                    self.topic,
                    key=alert.entity.encode(),
                    value=alert_json(alert),
                    headers=[("detector.alert_id", alert.id.encode()), ("detector.status", alert.status.encode())],
                )
                for alert in alerts
            ]
            self.producer.flush(timeout=self.timeout_s)
            for future in futures:
                future.get(timeout=self.timeout_s)
        except Exception as exc:
            self.metrics.sink_failures.labels(self.kind).inc()
            raise SinkError(f"alerts topic {self.topic}: delivery failed: {exc!r}") from exc
        self.metrics.sink_deliveries.labels(self.kind).inc(len(futures))

    def close(self) -> None:
        self.producer.flush(timeout=self.timeout_s)


# Each poll of `read_alert_tail` waits at most this long, in milliseconds.
_TAIL_POLL_MS = 20


def alert_id_of(value: bytes | None) -> str | None:
    """The `id` of an alert message (a JSON object), or None for anything else.

    Cheap on what `KafkaAlertSink` writes (`{"id":"...` comes first: the id is sliced out,
    the rest not parsed); any other JSON object with a string `id` is parsed whole; junk
    gives None, never an exception."""
    if not value:
        return None
    if value.startswith(b'{"id":"'):
        end = value.find(b'"', 7)
        if end > 7 and b"\\" not in value[7:end]:
            try:
                return value[7:end].decode()
            except UnicodeDecodeError:
                return None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    ident = data.get("id") if isinstance(data, dict) else None
    return ident if isinstance(ident, str) else None


@dataclass
class AlertTail:
    """What `read_alert_tail` found: the alert ids, how many messages it read, and the
    partitions it could not read to their end in time (their ids read so far are in `ids`)."""

    ids: set[str]
    messages: int
    partitions: int
    unfinished: list[int]


def read_alert_tail(
    consumer: Any, topic: str, partitions: Collection[int], lookback: int, timeout_s: float
) -> AlertTail:
    """The alert ids among the last `lookback` messages of each of `partitions` of `topic`.

    `consumer` is a kafka-python `KafkaConsumer` of no group that nothing else uses: this
    assigns it the partitions. Where a partition ends is its high watermark as the first
    fetch response reports it, not an offset lookup: Tansu, the local broker, answers the
    latest-offset lookup wrongly (1 for a partition ending at 24). So each partition is
    fetched from its beginning once, then read from `lookback` messages before that end up
    to it; messages written after that first fetch are not read. A partition not read to its
    end within `timeout_s` (seconds) is listed in `unfinished`.
    """
    from kafka.structs import TopicPartition

    deadline = time.monotonic() + timeout_s
    pending = {TopicPartition(topic, p) for p in partitions}
    tail = AlertTail(set(), 0, len(pending), [])
    if not pending:
        return tail
    consumer.assign(sorted(pending))
    consumer.seek_to_beginning(*pending)
    end: dict[Any, int] = {}
    while pending and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=_TAIL_POLL_MS)
        for tp in pending - end.keys():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                end[tp] = highwater
                if consumer.position(tp) < highwater - lookback:
                    consumer.seek(tp, highwater - lookback)
        for tp, batch in polled.items():
            if tp not in end:
                continue  # no high watermark came with them: they cannot be placed in the tail
            first = end[tp] - lookback
            for record in batch:
                if first <= record.offset < end[tp]:
                    tail.messages += 1
                    ident = alert_id_of(record.value)
                    if ident is not None:
                        tail.ids.add(ident)
        done = [tp for tp in pending & end.keys() if consumer.position(tp) >= end[tp]]
        if done:
            consumer.pause(*done)
            pending.difference_update(done)
    tail.unfinished = sorted(tp.partition for tp in pending)
    return tail


class DeadLetterWriter:
    """Writes records that could not be used to the dead-letter topic, unchanged (key, value,
    headers), with headers added: `detector.reason`, `detector.detail`, `detector.stream`,
    `detector.source.topic`, `detector.source.partition`, `detector.source.offset`.

    Two records cannot be forwarded unchanged, and would otherwise fail the daemon on every
    restart: one with neither key nor value (other clients send them; kafka-python does not)
    gets an empty value; one that the added headers push over the producer's
    `max_request_size` has its value cut to fit, with `detector.truncated_from` (the
    original length) added."""

    def __init__(self, producer: Any, topic: str, metrics: Metrics, timeout_s: float | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.metrics = metrics
        self.timeout_s = delivery_timeout_s(producer) if timeout_s is None else timeout_s
        self._pending: list[tuple[Any, str, str]] = []

    def send(self, record: Any, stream: str, rejection: Rejection) -> None:
        headers = list(record.headers or [])
        headers += [
            ("detector.reason", rejection.reason.encode()),
            ("detector.detail", rejection.detail.encode()),
            ("detector.stream", stream.encode()),
            ("detector.source.topic", record.topic.encode()),
            ("detector.source.partition", str(record.partition).encode()),
            ("detector.source.offset", str(record.offset).encode()),
        ]
        key, value = record.key, record.value
        if key is None and value is None:
            value = b""
        try:
            try:
                future = self.producer.send(self.topic, key=key, value=value, headers=headers)
            except Exception as exc:
                from kafka.errors import MessageSizeTooLargeError

                if not isinstance(exc, MessageSizeTooLargeError) or not value:
                    raise
                future = self._send_cut(key, value, headers)
        except Exception as exc:
            raise SinkError(f"dead-letter topic {self.topic}: delivery failed: {exc!r}") from exc
        self._pending.append((future, stream, rejection.reason))

    def _send_cut(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        # 1 KiB covers the record batch framing, which the producer counts too.
        room = int(self.producer.config["max_request_size"]) - 1024
        room -= len(key or b"") + sum(len(k) + len(v) for k, v in headers) + 32
        headers = [*headers, ("detector.truncated_from", str(len(value)).encode())]
        return self.producer.send(self.topic, key=key, value=value[: max(0, room)], headers=headers)

    def flush(self) -> None:
        """Block until every record sent since the last flush is acknowledged."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self.producer.flush(timeout=self.timeout_s)
            for future, _, _ in pending:
                future.get(timeout=self.timeout_s)
        except Exception as exc:
            raise SinkError(f"dead-letter topic {self.topic}: delivery failed: {exc!r}") from exc
        for _, stream, reason in pending:
            self.metrics.dead_letters.labels(stream, reason).inc()


# --- webhooks ----------------------------------------------------------------------------


def post_json(url: str, body: Any, headers: dict[str, str], timeout_s: float) -> None:
    """POST `body` as JSON; raises on a connection error or an HTTP status >= 400."""
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def _retryable(exc: Exception) -> bool:
    """Connection problems, timeouts, 429 and 5xx are worth retrying; other 4xx are not."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return True


class _QueuedDelivery:
    """A bounded queue of JSON payloads POSTed in order by one background thread, with retries.

    `queued` counts the payloads `emit` accepted, `acknowledged` those the receiver answered
    (a 2xx; or a 4xx other than 429, which no retry would change: dropped and counted). Both
    only grow; with `delivery: confirmed` no payload is skipped, so `acknowledged >= n` means
    the first `n` were answered.
    """

    kind = "webhook"

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        queue_size: int,
        retry: Retry,
        metrics: Metrics,
        confirmed: bool = False,
    ) -> None:
        self.url = url
        self.headers = headers
        self.retry = retry
        self.metrics = metrics
        self.confirmed = confirmed
        # Seconds `close` waits for the queue to drain; the daemon sets it from its grace period.
        self.close_timeout_s = 10.0
        self.queued = 0
        self.acknowledged = 0
        self._queue: queue.Queue[tuple[Any, int]] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{self.kind}-delivery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _enqueue(self, payload: Any, alerts: int) -> None:
        if self.confirmed:
            self._put_waiting(payload, alerts)
        else:
            try:
                self._queue.put_nowait((payload, alerts))
            except queue.Full:
                self.metrics.sink_dropped.labels(self.kind, "queue_full").inc(alerts)
                log.error(
                    "%s %s: delivery queue full (%d); dropped %d alert(s)",
                    self.kind,
                    self.url,
                    self._queue.maxsize,
                    alerts,
                )
                self.metrics.sink_queue.labels(self.kind).set(self._queue.qsize())
                return
        self.queued += 1
        self.metrics.sink_queue.labels(self.kind).set(self._queue.qsize())

    def _put_waiting(self, payload: Any, alerts: int) -> None:
        """Wait for room in the queue: with confirmed delivery, a receiver that is down holds the
        daemon back (its lag grows) rather than losing alerts."""
        waited = 0.0
        while True:
            try:
                self._queue.put((payload, alerts), timeout=1.0)
                return
            except queue.Full:
                waited += 1.0
                if waited % 30 == 1:
                    log.warning(
                        "%s %s: delivery queue full (%d) and delivery is confirmed: waiting for the receiver "
                        "(%.0f s so far)",
                        self.kind,
                        self.url,
                        self._queue.maxsize,
                        waited,
                    )

    def _next_timeout(self) -> float:
        return 0.2

    def _tick(self) -> None:
        """Called by the delivery thread at least every `_next_timeout()` seconds."""

    def _run(self) -> None:
        while True:
            try:
                payload, alerts = self._queue.get(timeout=self._next_timeout())
            except queue.Empty:
                if self._closing.is_set():
                    return
            else:
                self.metrics.sink_queue.labels(self.kind).set(self._queue.qsize())
                if self._deliver(payload, alerts, queued=True):
                    self.acknowledged += 1
            if not self._closing.is_set():
                self._tick()

    def _deliver(self, payload: Any, alerts: int, queued: bool = False) -> bool:
        """POST with retries. True once the receiver answered: delivered, or refused for good
        (dropped, counted). A queued payload of a confirmed sink is retried until the sink is
        aborted, however many `max_attempts` say."""
        backoff = self.retry.initial_backoff_s
        limit = None if self.confirmed and queued else self.retry.max_attempts
        attempt = 0
        while not self._abort.is_set():
            attempt += 1
            try:
                post_json(self.url, payload, self.headers, self.retry.timeout_s)
            except Exception as exc:
                self.metrics.sink_failures.labels(self.kind).inc()
                if not _retryable(exc):
                    # An answer all the same: confirmed delivery does not wait on it forever.
                    log.error("%s %s: giving up after %d attempt(s): %s", self.kind, self.url, attempt, exc)
                    self.metrics.sink_dropped.labels(self.kind, "not_delivered").inc(alerts)
                    return True
                if limit is not None and attempt >= limit:
                    log.error("%s %s: giving up after %d attempt(s): %s", self.kind, self.url, attempt, exc)
                    break
                log.warning(
                    "%s %s: attempt %d failed (%s); retrying in %.1f s", self.kind, self.url, attempt, exc, backoff
                )
                if self._abort.wait(backoff):
                    break
                backoff = min(backoff * 2, self.retry.max_backoff_s)
            else:
                self.metrics.sink_deliveries.labels(self.kind).inc()
                return True
        if self._abort.is_set():
            log.error("%s %s: %d alert(s) not delivered before shutdown", self.kind, self.url, alerts)
        self.metrics.sink_dropped.labels(self.kind, "not_delivered").inc(alerts)
        return False

    def close(self) -> None:
        """Deliver what is queued, waiting at most `close_timeout_s`; then drop the rest."""
        self._closing.set()
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(5.0)
        left = 0
        while True:
            try:
                left += self._queue.get_nowait()[1]
            except queue.Empty:
                break
        if left:
            self.metrics.sink_dropped.labels(self.kind, "not_delivered").inc(left)
            log.error("%s %s: %d alert(s) not delivered before shutdown", self.kind, self.url, left)


class WebhookSink(_QueuedDelivery):
    """POSTs each batch's alert events to `url` as a JSON array of alert objects."""

    kind = "webhook"

    def __init__(self, config: WebhookSinkConfig, metrics: Metrics) -> None:
        super().__init__(
            config.url,
            bearer_headers(config.headers, config.bearer_token_env),
            config.queue_size,
            config.retry,
            metrics,
            confirmed=config.delivery == "confirmed",
        )
        self.start()

    def emit(self, alerts: Sequence[Alert]) -> None:
        if alerts:
            self._enqueue([a.to_dict() for a in alerts], len(alerts))


def _iso(ms: int) -> str:
    return format_timestamp(ms)


def _iso_past(ms: int) -> str:
    """An event time for Alertmanager, never in the future: a producer clock running ahead of
    ours would otherwise give startsAt after endsAt, which Alertmanager refuses with a 400."""
    return format_timestamp(min(ms, int(time.time() * 1000)))


class AlertmanagerSink(_QueuedDelivery):
    """Alertmanager API v2 (`POST <url>/api/v2/alerts`).

    Each firing event becomes an alert with labels `alertname`, `stream`, `entity`,
    `severity` (plus configured ones), annotations (summary, score, threshold, top features,
    alert id, model version, window), `startsAt` = the window end that fired, and `endsAt` =
    now + 4 re-send intervals, so Alertmanager expires it if the daemon stops re-sending.
    Active alerts are re-sent every `resend_interval_s`. A resolve (or an escalation, which
    replaces the warning alert with a critical one) sends the old alert with `endsAt` = the
    event time of the resolving window.
    """

    kind = "alertmanager"

    def __init__(self, config: AlertmanagerSinkConfig, metrics: Metrics) -> None:
        super().__init__(
            config.url.rstrip("/") + "/api/v2/alerts",
            bearer_headers(config.headers, config.bearer_token_env),
            config.queue_size,
            config.retry,
            metrics,
            confirmed=config.delivery == "confirmed",
        )
        self.config = config
        self._active: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._next_resend = time.monotonic() + config.resend_interval_s
        self.start()

    def _labels(self, alert: Alert) -> dict[str, str]:
        return {
            **self.config.labels,
            "alertname": self.config.alertname,
            "stream": alert.stream,
            "entity": alert.entity,
            "severity": alert.severity,
        }

    def _firing(self, alert: Alert) -> dict[str, Any]:
        features = ", ".join(f"{name}={error:.4g}" for name, error in alert.top_features)
        out: dict[str, Any] = {
            "labels": self._labels(alert),
            "annotations": {
                "summary": f"{alert.stream}/{alert.entity}: score {alert.score:.4g} above {alert.threshold:.4g}",
                "score": f"{alert.score:.6g}",
                "threshold": f"{alert.threshold:.6g}",
                "top_features": features,
                "alert_id": alert.id,
                "model_version": alert.model_version,
                "window_start": _iso(alert.window_start_ms),
                "window_end": _iso(alert.window_end_ms),
            },
            "startsAt": _iso_past(alert.window_end_ms),
        }
        if self.config.generator_url:
            out["generatorURL"] = self.config.generator_url
        return out

    def _expiry(self) -> str:
        return datetime.fromtimestamp(time.time() + 4 * self.config.resend_interval_s, tz=UTC).isoformat()

    def emit(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        payload: list[dict[str, Any]] = []
        with self._lock:
            for alert in alerts:
                key = (alert.stream, alert.entity)
                old = self._active.pop(key, None)
                if old is not None:
                    # Resolved, or replaced by a new firing event (an escalation): end the old one.
                    payload.append({**old, "endsAt": _iso_past(max(alert.window_end_ms, 0))})
                if alert.status == "firing":
                    self._active[key] = self._firing(alert)
                    payload.append({**self._active[key], "endsAt": self._expiry()})
                elif old is None:
                    # A resolve for an alert this process never saw fire (it fired before a restart).
                    ended = self._firing(alert)
                    ended["annotations"]["alert_id"] = alert.resolves or alert.id
                    payload.append({**ended, "endsAt": _iso_past(alert.window_end_ms)})
        self._enqueue(payload, len(alerts))

    def restore(self, alerts: Sequence[Alert]) -> None:
        """Track alerts replayed from history (the refill after a restart) without sending them,
        so an alert that fired before the restart is re-sent while it stays active."""
        with self._lock:
            for alert in alerts:
                key = (alert.stream, alert.entity)
                if alert.status == "firing":
                    self._active[key] = self._firing(alert)
                else:
                    self._active.pop(key, None)

    def _next_timeout(self) -> float:
        return max(0.0, min(0.2, self._next_resend - time.monotonic()))

    def _tick(self) -> None:
        if time.monotonic() < self._next_resend:
            return
        self._next_resend = time.monotonic() + self.config.resend_interval_s
        with self._lock:
            active = [{**a, "endsAt": self._expiry()} for a in self._active.values()]
        if active:
            self._deliver(active, len(active))
