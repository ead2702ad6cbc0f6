"""Test data and helpers for the integration tests: a multi-entity metric stream with injected
anomalies and bad records, a tiny trained checkpoint, and Kafka/HTTP helpers."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from detector.alerts import Alert
from detector.config import Stream
from detector.model import Checkpoint, load_checkpoint
from detector.pipeline import Pipeline
from detector.source import RecordDecoder, SampleBatch
from detector.train import fit

START = datetime(2024, 3, 1, tzinfo=UTC)
STEP = timedelta(minutes=1)
WINDOW = 16
ENTITIES = tuple(f"host-{i}" for i in range(6))
ANOMALOUS = ("host-1", "host-4")
ANOMALY_ROWS = range(200, 212)  # of each anomalous entity: a burst far outside anything normal

STREAM_SPEC: dict[str, Any] = {
    "mapping": {"entity": "host", "timestamp": "ts", "features": ["cpu", "mem"]},
    "window": {"size": WINDOW},
    "normalization": {"method": "standard", "per_entity": True},
    "model": {"cell": "gru", "hidden_size": 12, "latent_size": 4},
    "training": {"epochs": 12, "batch_size": 64, "learning_rate": 0.01, "early_stopping_patience": 0, "stride": 2},
    "thresholds": {"warning": {"rule": "quantile", "q": 0.999, "factor": 3.0}},
    "alerts": {"n": 3, "m": 5, "cooldown_s": 0, "resolve_after": 5, "top_features": 2},
}


def stream_config(topic: str, checkpoint: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"input": {"kind": "kafka", "topic": topic}, **STREAM_SPEC}
    if checkpoint is not None:
        out["checkpoint"] = checkpoint
    return out


def values(entity: str, rows: np.ndarray, seed: int) -> np.ndarray:
    """Normal behaviour of one entity: periodic load with noise. Shape: (len(rows), 2)."""
    i = ENTITIES.index(entity)
    rng = np.random.default_rng(seed * 100 + i)
    phase = rows + 5 * i
    cpu = 40 + 10 * i + 15 * np.sin(2 * np.pi * phase / 24) + rng.normal(0, 1.0, len(rows))
    mem = 60 + 5 * np.cos(2 * np.pi * phase / 12) + rng.normal(0, 0.5, len(rows))
    return np.stack([cpu, mem], axis=1)


def records(
    rows: int,
    seed: int,
    anomalies: bool = True,
    first_row: int = 0,
    bursts: dict[str, list[range]] | None = None,
) -> list[dict[str, Any]]:
    """JSON records of every entity, interleaved row by row (one per entity per minute).

    The anomalies are `bursts` (entity -> row ranges) when given, else ANOMALY_ROWS of each
    ANOMALOUS entity."""
    if bursts is None:
        bursts = {e: [ANOMALY_ROWS] for e in ANOMALOUS}
    out = []
    index = np.arange(first_row, first_row + rows)
    series = {e: values(e, index, seed) for e in ENTITIES}
    for j, row in enumerate(index):
        for e in ENTITIES:
            cpu, mem = series[e][j]
            if anomalies and any(row in burst for burst in bursts.get(e, ())):
                cpu, mem = cpu + 60.0, mem - 30.0
            ts = START + int(row) * STEP
            out.append(
                {
                    "host": e,
                    "ts": ts.isoformat().replace("+00:00", "Z"),
                    "cpu": round(float(cpu), 4),
                    "mem": round(float(mem), 4),
                }
            )
    return out


def train_checkpoint(stream: Stream, rows: int = 400) -> Checkpoint:
    """A tiny model trained on normal traffic of every entity (a few seconds on one core)."""
    decoder = RecordDecoder(stream.mapping, default_entity="hosts")
    entities, stamps, vals = [], [], []
    for i, rec in enumerate(records(rows, seed=99, anomalies=False, first_row=-rows)):
        entity, ts, v = decoder.decode(rec, i, i)  # type: ignore[misc]
        entities.append(entity)
        stamps.append(ts)
        vals.append(v)
    samples = SampleBatch(entities, np.asarray(stamps, np.int64), np.asarray(vals, np.float32), np.arange(len(vals)))
    return fit("hosts", stream, samples, progress=False)


# --- Kafka -------------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, messages: list[tuple[str, bytes]], rate: float | None = None) -> dict[int, int]:
    """Send (key, value) messages in order, as fast as possible or at about `rate` a second (as
    a live stream would); returns each partition's end offset afterwards."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        futures = []
        started = time.monotonic()
        for i, (key, value) in enumerate(messages):
            futures.append(producer.send(topic, key=key.encode(), value=value))
            if rate is not None and i % 60 == 59:
                time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
        producer.flush()
        ends: dict[int, int] = {}
        for future in futures:
            meta = future.get(timeout=30)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
        return ends
    finally:
        producer.close()


def encode(recs: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    return [(r["host"], json.dumps(r).encode()) for r in recs]


@dataclass
class Message:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = -1


def read_topic(bootstrap: str, topic: str, expect: int | None = None, timeout_s: float = 20.0) -> list[Message]:
    """Every message on the topic: until `expect` were read, or until 1.5 s passes without one."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for tp_records in batch.values():
                for r in tp_records:
                    out.append(Message(r.partition, r.offset, r.key, r.value, dict(r.headers or []), r.timestamp))
                    quiet_since = time.monotonic()
            if expect is not None and len(out) >= expect:
                break
            if expect is None and time.monotonic() - quiet_since > 1.5:
                break
        return out
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition of `topic` that has one."""
    from kafka import KafkaConsumer, TopicPartition

    # A consumer with the group id that never subscribes does not join the group.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        found = {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    finally:
        consumer.close()
    return {p: offset for p, offset in found.items() if offset is not None}


def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- HTTP --------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=40) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a /metrics page, keyed by (name, labels)."""
    status, text = http_get(url)
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Receiver:
    """A tiny HTTP server that records every POST body (JSON) by path."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    failing = receiver.fail_first > 0
                    if failing:
                        receiver.fail_first -= 1
                    else:
                        receiver.posts.append((self.path, json.loads(body)))
                self.send_response(503 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str) -> list[Any]:
        with self.lock:
            return [body for p, body in self.posts if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def iter_jsonl(path: Any) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def row_of(timestamp: str) -> int:
    """The row number of a record from its timestamp (ISO 8601, as in scores)."""
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return round((moment - START) / STEP)


def unscored(scores: list[dict[str, Any]], rows: int) -> list[tuple[str, int]]:
    """(entity, row) of every record, from the first full window on, that no score line covers."""
    scored = {(s["entity"], row_of(s["timestamp"])) for s in scores if s["score"] is not None}
    return [(e, r) for e in ENTITIES for r in range(WINDOW - 1, rows) if (e, r) not in scored]


class PacedProducer:
    """Sends `recs` from a background thread, `per_tick` every `interval_s` (steady load), and
    records where each one landed. A record is encoded when it is sent: holding `lock`, a test
    may change the records from `sent` on (inject an anomaly a moment ahead). With
    `partitions`, an entity's records go to partition ENTITIES.index(entity) % partitions
    instead of the key hash, so the test knows which entities share a partition. `hold_at`
    (a record index) pauses the stream there until `release()`, so a test's disruptions all
    fall before the stream ends however slow the machine."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        recs: list[dict[str, Any]],
        per_tick: int,
        interval_s: float,
        partitions: int | None = None,
        hold_at: int | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.recs = recs
        self.hold_at = hold_at
        self.held = False  # whether the stream had to wait at `hold_at`
        self._released = threading.Event()
        self.per_tick = per_tick
        self.interval_s = interval_s
        self.partitions = partitions
        self.lock = threading.Lock()
        self.sent = 0  # records handed to the producer so far
        self.positions: list[tuple[int, int]] = []  # (partition, offset) of each message, once done
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        self._released.set()

    def _run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        try:
            futures = []
            tick = time.monotonic()
            for i in range(0, len(self.recs), self.per_tick):
                if i == self.hold_at and not self._released.is_set():
                    self.held = True
                    self._released.wait()
                    tick = time.monotonic()
                with self.lock:
                    for key, value in encode(self.recs[i : i + self.per_tick]):
                        partition = ENTITIES.index(key) % self.partitions if self.partitions else None
                        futures.append(producer.send(self.topic, key=key.encode(), value=value, partition=partition))
                    self.sent = len(futures)
                tick += self.interval_s
                time.sleep(max(0.0, tick - time.monotonic()))
            producer.flush()
            self.positions = [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
        except BaseException as exc:
            self.error = exc
        finally:
            producer.close()

    def join(self, timeout_s: float) -> dict[int, int]:
        """Wait until every message is acknowledged; returns each partition's end offset."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the producer did not finish within {timeout_s:.0f} s"
        if self.error is not None:
            raise AssertionError(f"the producer failed: {self.error!r}") from self.error
        ends: dict[int, int] = {}
        for partition, offset in self.positions:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        return ends


def clean_run_alerts(checkpoint_path: Path, recs: list[dict[str, Any]]) -> list[Alert]:
    """The alert events of one uninterrupted pass of `recs` through the daemon's pipeline (the
    `Pipeline` that `detector run` and `detector replay` share), in this process: the reference
    a crashed, restarted or rebalanced daemon must match. Records of one entity keep their
    order on Kafka (one partition per entity), and an entity's alerts depend on nothing else."""
    stream = Stream.model_validate(stream_config("unused", str(checkpoint_path)))
    checkpoint = load_checkpoint(checkpoint_path, stream)
    decoder = RecordDecoder(stream.mapping, default_entity="hosts")
    entities, stamps, vals = [], [], []
    for i, rec in enumerate(recs):
        entity, ts, v = decoder.decode(rec, i, i)  # type: ignore[misc]
        entities.append(entity)
        stamps.append(ts)
        vals.append(v)
    samples = SampleBatch(entities, np.asarray(stamps, np.int64), np.asarray(vals, np.float32), np.arange(len(vals)))
    return Pipeline("hosts", stream, checkpoint).process(samples, mode="alert").alerts
