"""Bad input fuzz: 100,000 malformed records mixed with good ones, through a real broker into
the real daemon (a subprocess), checked record by record.

What counts as bad (each bad record is built to get exactly one reason):
- `invalid_json`: truncated records, binary garbage, invalid UTF-8, `NaN` literals, trailing
  content, single quotes, a float literal beyond the double range, 1 MB of garbage;
- `not_an_object`: arrays, numbers, strings, `null`, booleans;
- `empty`: a zero-length value, whitespace, a Kafka tombstone (null value);
- `missing_field`: entity, timestamp or a feature absent, null or "";
- `wrong_type`: a feature that is a non-numeric string, a boolean, a list or an object; an
  entity that is a float, a boolean, a list or an object;
- `non_finite`: a feature that is "NaN", "inf", or beyond float32 (1e39, -1e300);
- `bad_timestamp`: unparseable strings, impossible dates, booleans, lists, objects, "1e400";
- `future_timestamp`: more than `mapping.max_future_s` (default a day) ahead of the clock:
  one such sample would otherwise make every later sample of its entity `out_of_order`;
- `out_of_order`: older than the newest sample already accepted for its entity.

What is fine (good records, each must be scored): extra fields (nested, or 1 MB of padding),
unknown entities (they start their own windows), integer entities, numeric strings, Unix
seconds or milliseconds or ISO timestamps with offsets, huge but finite float32 values
(3e38), a timestamp equal to the entity's newest, null or binary keys, arbitrary headers.

Each entity's records go to one partition (chosen explicitly, so a null key does not scatter
an entity), which keeps "out of order" well defined.
"""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Topics, daemon_config
from kafka.serializer import Serializer
from streams import (
    START,
    STEP,
    WINDOW,
    Receiver,
    committed,
    http_get,
    iter_jsonl,
    read_topic,
    sample,
    scrape,
    wait_for,
)

from detector.source import REJECT_REASONS, format_timestamp

pytestmark = pytest.mark.integration

SEED = 20_261_128
N_BAD = 100_000
N_GOOD = 12_000
PARTITIONS = 3
BIG = 1_000_000  # a "1 MB" message: under the consumer's 1 MiB max_partition_fetch_bytes
OVERSIZED = 1_200_000  # above the daemon producer's 1 MiB max_request_size: its dead letter must be cut
SECRETS = {
    "FUZZ_SASL_PASSWORD": "sasl-pw-5f1e0c7a",
    "FUZZ_SSL_PASSWORD": "ssl-pw-93b2d4e8",
    "FUZZ_WEBHOOK_TOKEN": "hook-token-0d6a71c2",
}


@dataclass
class Sent:
    """One produced record and what the daemon must do with it."""

    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    expect: str  # "good", or the rejection reason
    entity: str | None = None
    ts_ms: int | None = None


@functools.lru_cache(maxsize=65_536)  # entities walk the same minutes: most calls repeat one
def iso(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")


class Generator:
    """Good and bad records from a seeded `random.Random`: the same seed, the same stream."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        trained = [f"host-{i}" for i in range(6)]
        unknown = [f"new-{i}" for i in range(14)] + ["nöde-ü", "a/b", "x" * 200]
        self.entities: list[str | int] = [*trained, *unknown, 1007, 1008]
        self.partition = {str(e): i % PARTITIONS for i, e in enumerate(self.entities)}
        self.newest: dict[str, int] = {}  # newest timestamp sent in a good record, per entity
        self.start_ms = int(START.timestamp() * 1000)

    def next_ts(self, entity: str) -> int:
        previous = self.newest.get(entity)
        if previous is not None and self.rng.random() < 0.02:
            return previous  # equal to the newest is not out of order
        ts = self.start_ms if previous is None else previous + int(STEP.total_seconds() * 1000)
        return ts

    def good(self) -> Sent:
        rng = self.rng
        raw_entity = rng.choice(self.entities)
        entity = str(raw_entity)
        ts = self.next_ts(entity)
        self.newest[entity] = ts
        cpu, mem = 40 + 15 * rng.random(), 60 + 5 * rng.random()
        stamp: Any = rng.choice([iso(ts), ts, ts / 1000, iso(ts).replace("Z", "+00:00")])
        record: dict[str, Any] = {"host": raw_entity, "ts": stamp, "cpu": cpu, "mem": mem}
        variant = rng.random()
        if variant < 0.1:
            record["cpu"] = f" {cpu!r} "  # a numeric string, spaces and all
        elif variant < 0.2:
            record["extra"] = {"nested": [1, None, {"deep": "x" * rng.randrange(50)}], "flag": True}
        elif variant < 0.22:
            record["mem"] = rng.choice([3e38, -3e38, 1e-30, 0])  # huge or tiny, but finite float32
        elif variant < 0.3:
            record = dict(rng.sample(sorted(record.items()), len(record)))
        return self.sent(record, entity, ts, "good")

    def bad(self, reason: str) -> Sent:
        if reason == "out_of_order" and not self.newest:
            reason = "missing_field"
        build = getattr(self, f"_bad_{reason}")
        sent: Sent = build()
        assert sent.expect == reason
        return sent

    def base(self) -> tuple[dict[str, Any], str, int]:
        """A record that would be good, for an entity, at a timestamp that is not out of order."""
        raw_entity = self.rng.choice(self.entities)
        entity = str(raw_entity)
        ts = self.newest.get(entity, self.start_ms)
        return {"host": raw_entity, "ts": iso(ts), "cpu": 1.0, "mem": 2.0}, entity, ts

    def sent(self, record: dict[str, Any] | None, entity: str | None, ts: int | None, expect: str) -> Sent:
        rng = self.rng
        value = None if record is None else orjson.dumps(record)
        part = self.partition[entity] if entity is not None else rng.randrange(PARTITIONS)
        pick = rng.randrange(4)
        key = rng.randbytes(8) if pick == 3 else (None, b"", (entity or "k").encode())[pick]
        headers = [] if rng.random() < 0.9 else [("trace", rng.randbytes(4)), ("empty", b"")]
        return Sent(part, key, value, headers, expect, entity, ts)

    def raw(self, value: bytes | None, expect: str) -> Sent:
        sent = self.sent(None, None, None, expect)
        sent.value = value
        return sent

    def _bad_empty(self) -> Sent:
        return self.raw(self.rng.choice([b"", b" ", b"\n\t ", None]), "empty")

    def _bad_invalid_json(self) -> Sent:
        rng = self.rng
        record, _, _ = self.base()
        text = orjson.dumps(record)
        choice = rng.randrange(8)
        if choice == 0:
            value = text[: rng.randrange(1, len(text) - 1)]
        elif choice == 1:
            value = b"\xfe" + rng.randbytes(rng.randrange(0, 64))
        elif choice == 2:
            value = text.replace(b'"host"', b'"h\xff\xfeost"')
        elif choice == 3:
            value = text.replace(b"1.0", b"NaN")
        elif choice == 4:
            value = text + b"}"
        elif choice == 5:
            value = text.replace(b'"', b"'")
        elif choice == 6:
            value = text.replace(b"2.0", b"1e400")
        else:
            value = rng.choice([b"{", b"nul", b"tru", b"[1,", b'{"a": }', b"\x00"])
        return self.raw(value, "invalid_json")

    def _bad_not_an_object(self) -> Sent:
        value = self.rng.choice([b"[1, 2]", b"[]", b"3", b"-1.5e3", b'"text"', b"null", b"true", b"false", b"[{}]"])
        return self.raw(value, "not_an_object")

    def _bad_missing_field(self) -> Sent:
        record, entity, ts = self.base()
        field = self.rng.choice(["host", "ts", "cpu", "mem"])
        if self.rng.random() < 0.5:
            del record[field]
        else:
            record[field] = self.rng.choice([None, ""])
        return self.sent(record, None if field == "host" else entity, ts, "missing_field")

    def _bad_wrong_type(self) -> Sent:
        record, entity, ts = self.base()
        if self.rng.random() < 0.5:
            record[self.rng.choice(["cpu", "mem"])] = self.rng.choice(["high", "0x10", True, False, [1.0], {"v": 1}])
            return self.sent(record, entity, ts, "wrong_type")
        record["host"] = self.rng.choice([1.5, True, ["a"], {"name": "a"}])
        return self.sent(record, None, ts, "wrong_type")

    def _bad_non_finite(self) -> Sent:
        record, entity, ts = self.base()
        record[self.rng.choice(["cpu", "mem"])] = self.rng.choice(["NaN", "nan", "inf", "-Infinity", 1e39, -1e300])
        return self.sent(record, entity, ts, "non_finite")

    def _bad_bad_timestamp(self) -> Sent:
        record, entity, _ = self.base()
        record["ts"] = self.rng.choice(["yesterday", "2024-13-01T00:00:00", True, [1], {"t": 1}, "nan", "1e400"])
        return self.sent(record, entity, None, "bad_timestamp")

    def _bad_future_timestamp(self) -> Sent:
        record, entity, _ = self.base()
        future_ms = int((time.time() + 10 * 86_400) * 1000)
        record["ts"] = self.rng.choice(["3000-01-01T00:00:00Z", future_ms, iso(future_ms)])
        return self.sent(record, entity, None, "future_timestamp")

    def _bad_out_of_order(self) -> Sent:
        entity = self.rng.choice(sorted(self.newest))
        raw_entity: str | int = int(entity) if entity.isdigit() else entity
        ts = self.newest[entity] - int(STEP.total_seconds() * 1000) * self.rng.randrange(1, 50)
        record = {"host": raw_entity, "ts": iso(ts), "cpu": 1.0, "mem": 2.0}
        return self.sent(record, entity, ts, "out_of_order")

    def stream(self, n_good: int, n_bad: int) -> list[Sent]:
        """`n_good` + `n_bad` records in random order, and the big ones halfway through (so that
        later records of their entities must still be scored)."""
        out: list[Sent] = []
        good_left, bad_left = n_good, n_bad
        reasons = self.rng.choices(list(REJECT_REASONS), weights=[3, 20, 8, 15, 15, 10, 10, 4, 15], k=n_bad)
        while good_left or bad_left:
            if len(out) == (n_good + n_bad) // 2:
                out.extend(self.big_ones())
            if self.rng.random() * (good_left + bad_left) < good_left:
                out.append(self.good())
                good_left -= 1
            else:
                out.append(self.bad(reasons[bad_left - 1]))
                bad_left -= 1
        return out

    def big_ones(self) -> list[Sent]:
        """A few 1 MB records: good (padding is an extra field), garbage, and one too big to
        dead-letter unchanged."""
        record, entity, _ = self.base()
        ts = self.newest.get(entity, self.start_ms)
        self.newest[entity] = ts
        record["padding"] = "p" * BIG
        good = self.sent(record, entity, ts, "good")
        garbage = self.raw(b"\xfe" + b"g" * BIG, "invalid_json")
        oversized = self.raw(b"[" + b"0," * (OVERSIZED // 2) + b"0]", "not_an_object")
        return [good, garbage, oversized]


# kafka-python refuses `send(key=None, value=None)`, which other clients (the Java one) send
# happily; a key that serializes to None gets such a record onto the topic anyway.
NULL_KEY = object()


class NullableKey(Serializer):  # type: ignore[misc]
    def serialize(self, topic: str, headers: Any, data: Any) -> bytes | None:
        return None if data is NULL_KEY else data


def produce_all(bootstrap: str, topic: str, messages: list[Sent]) -> list[tuple[int, int]]:
    """Send in order, batched; returns each message's (partition, offset)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
        key_serializer=NullableKey(),
    )
    try:
        futures = [
            producer.send(
                topic, key=NULL_KEY if m.key is None else m.key, value=m.value, headers=m.headers, partition=m.partition
            )
            for m in messages
        ]
        producer.flush(timeout=120)
        out = []
        for future in futures:
            meta = future.get(timeout=60)
            out.append((meta.partition, meta.offset))
        return out
    finally:
        producer.close()


def create_input_topic(bootstrap: str, name: str) -> None:
    """Three partitions taking records up to 4 MiB, as a producer with a raised limit can write
    them (Kafka's default `max.message.bytes` stops at 1 MiB; Tansu has no limit)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        limit = {"max.message.bytes": str(4 * 1024 * 1024)}
        admin.create_topics([NewTopic(name, PARTITIONS, 1, topic_configs=limit)])
    finally:
        admin.close()


def listen_address(port: int) -> str:
    """The local address of the socket listening on `port` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
            return ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.slow
def test_the_daemon_survives_100k_bad_records_and_accounts_for_every_one(
    kafka: str,
    checkpoint: Path,
    tmp_path: Path,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    for name, secret in SECRETS.items():
        monkeypatch.setenv(name, secret)
    topics = Topics(kafka)
    input_topic = "fuzz-" + topics.metrics
    create_input_topic(kafka, input_topic)
    receiver = Receiver()
    config = daemon_config(
        kafka,
        topics,
        checkpoint,
        tmp_path,
        scoring={"batch_records": 5000, "batch_wait_ms": 200},
        sinks={
            "kafka": None,  # alerts on random-ish data say nothing here; the log sink stays
            "webhooks": [{"url": receiver.url + "/hook", "headers": {"X-Token": "${FUZZ_WEBHOOK_TOKEN}"}}],
        },
    )
    config["streams"]["hosts"]["input"]["topic"] = input_topic
    # `daemon_config`'s first parameter is named `kafka`, so this section is set here.
    config["kafka"].update(
        # A rebalance would redeliver a batch and break the exact counts; on a box this loaded,
        # a 6 s session can lapse. One member, so nothing waits on the longer timeout.
        session_timeout_ms=30_000,
        max_poll_records=5000,
        sasl_plain_username="detector",
        sasl_plain_password="${FUZZ_SASL_PASSWORD}",
        ssl_password="${FUZZ_SSL_PASSWORD}",
    )
    del config["server"]["host"]  # the default bind address is under test too
    daemon = start_daemon(config)

    gen = Generator(SEED)
    messages = gen.stream(N_GOOD, N_BAD)
    generated_s = time.monotonic() - started
    expected = Counter(m.expect for m in messages)
    assert expected["good"] == N_GOOD + 1
    assert sum(expected.values()) - expected["good"] >= N_BAD
    assert set(expected) == {"good", *REJECT_REASONS}

    positions = produce_all(kafka, input_topic, messages)
    produced_s = time.monotonic() - started
    ends = Counter(p for p, _ in positions)
    by_position = dict(zip(positions, messages, strict=True))

    def done() -> bool:
        assert daemon.process.poll() is None, f"daemon exited with {daemon.process.returncode}:\n{daemon.log()[-5000:]}"
        assert http_get(daemon.url + "/-/healthy")[0] == 200
        return committed(kafka, topics.group, input_topic) == dict(ends)

    wait_for(done, 240, "the daemon to commit every record", interval_s=1.0)
    consumed_s = time.monotonic() - started

    assert listen_address(config["server"]["port"]) == "127.0.0.1"
    status, page = http_get(daemon.url + "/metrics")
    assert status == 200
    for secret in SECRETS.values():
        assert secret not in page
    samples = scrape(daemon.url + "/metrics")
    assert sample(samples, "detector_records_consumed_total", stream="hosts", phase="live") == len(messages)
    assert sample(samples, "detector_records_consumed_total", stream="hosts", phase="refill") == 0
    for reason in REJECT_REASONS:
        dropped = sample(samples, "detector_messages_dropped_total", stream="hosts", reason=reason)
        dead = sample(samples, "detector_dead_letters_total", stream="hosts", reason=reason)
        assert (reason, dropped, dead) == (reason, expected[reason], expected[reason])

    assert daemon.stop(timeout_s=60) == 0
    receiver.close()
    log = daemon.log()
    assert "Traceback" not in log
    for secret in SECRETS.values():
        assert secret not in log

    # Every bad record is in the dead-letter topic exactly once, unchanged, with its reason.
    n_bad = len(messages) - expected["good"]
    letters = read_topic(kafka, topics.dead, expect=n_bad, timeout_s=120)
    assert len(letters) == n_bad
    seen: set[tuple[int, int]] = set()
    for letter in letters:
        h = letter.headers
        assert h["detector.source.topic"] == input_topic.encode()
        source = (int(h["detector.source.partition"]), int(h["detector.source.offset"]))
        assert source not in seen
        seen.add(source)
        original = by_position[source]
        assert h["detector.reason"].decode() == original.expect, (source, original)
        assert h["detector.detail"]
        assert h["detector.stream"] == b"hosts"
        assert letter.key == original.key
        for name, value in original.headers:
            assert h[name] == value
        if original.value is not None and len(original.value) >= OVERSIZED:
            # Too big to forward whole: cut, and the cut says so.
            assert int(h["detector.truncated_from"]) == len(original.value)
            assert original.value.startswith(letter.value)
        else:
            assert (letter.value or b"") == (original.value or b"")
    assert seen == {p for p, m in by_position.items() if m.expect != "good"}

    # Every good record is scored, at its own position, as its own entity and time; and once
    # an entity has a full window, every one of its records gets a score.
    scores = {(s["partition"], s["offset"]): s for s in iter_jsonl(tmp_path / "scores.jsonl")}
    good = {p: m for p, m in by_position.items() if m.expect == "good"}
    assert set(scores) == set(good)
    count: Counter[str] = Counter()
    for pos in sorted(good, key=lambda p: (good[p].entity or "", p[1])):
        line, m = scores[pos], good[pos]
        assert m.ts_ms is not None
        assert (line["entity"], line["timestamp"]) == (m.entity, format_timestamp(m.ts_ms))
        count[line["entity"]] += 1
        assert (line["score"] is not None) == (count[line["entity"]] >= WINDOW), (pos, line)

    elapsed = time.monotonic() - started
    print(
        f"\nfuzz: {len(messages)} records ({n_bad} bad, {expected['good']} good) generated by {generated_s:.1f} s, "
        f"produced by {produced_s:.1f} s, "
        f"consumed by {consumed_s:.1f} s, all checks done in {elapsed:.1f} s; by reason: "
        + ", ".join(f"{r}={expected[r]}" for r in REJECT_REASONS)
    )
