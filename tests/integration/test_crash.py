"""Crash recovery: `kill -9` under steady load, five times, each time restarted.

A producer thread writes a six-entity stream with twelve injected anomaly bursts at a steady
rate while the daemon is killed (SIGKILL: no batch finished, no commit, no flush) at five
seeded random moments and started again. Afterwards:

- every record was scored at least once, by position (topic partition and offset in the
  scores file, which every incarnation appends to);
- no alert id reaches the alerts topic twice, firing or resolved. A kill between a batch's
  alert delivery and its offset commit makes the next incarnation process that batch again
  and raise the same alerts (same ids); the daemon reads back what the alerts topic got
  since the commit (its commit metadata says from where) and does not send those again;
- the firing and resolved alerts are exactly those of an uninterrupted run of the same input
  (same ids, that is same entity, window end and status): no entity missed an alert, none
  got one it should not have.

Two of the kill moments are aimed at the few milliseconds between a batch's alert delivery
and its commit (at the next alert the daemon raises, see `stop_after_delivery`); the others
fall at seeded random times, anywhere in the batch cycle.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Topics, daemon_config
from streams import (
    ENTITIES,
    PacedProducer,
    clean_run_alerts,
    committed,
    read_topic,
    records,
    row_of,
    unscored,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = 540
ROWS_PER_S = 10  # 60 records/s; the stream lasts about 54 s, the five kill cycles about as long
# One burst every 40 rows, entity after entity; each fires and resolves before the next
# burst of the same entity.
BURSTS = {e: [range(start, start + 12) for start in range(80 + 40 * i, ROWS - 18, 240)] for i, e in enumerate(ENTITIES)}
KILLS = 5
SEED = 20240301


def scores_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The scores file's lines, and how many were torn: a SIGKILL in the middle of a write
    leaves a partial line, which the next incarnation starts a new line after."""
    lines, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return lines, torn


class AlertsWatch:
    """The ids on the alerts topic, read as they arrive."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or ())]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.ids: set[str] = set()

    def poll(self, timeout_ms: int) -> set[str]:
        for batch in self.consumer.poll(timeout_ms=timeout_ms).values():
            self.ids.update(json.loads(r.value)["id"] for r in batch)
        return self.ids


def stop_after_delivery(daemon: Daemon, watch: AlertsWatch, rng: random.Random, timeout_s: float) -> None:
    """Freeze the daemon (SIGSTOP) right after its next alert reached the alerts topic, which is
    before the batch's commit unless the daemon outran us. Its log sink writes the alert before
    the Kafka sink sends it: from there the daemon runs in steps of a millisecond or two until
    the topic has the alert. Returns after `timeout_s` when no alert comes (the stream ran out)."""
    log = daemon.log_path
    seen = daemon.log().count('"status": ')
    deadline = time.monotonic() + timeout_s
    size = log.stat().st_size
    while True:
        if time.monotonic() > deadline:
            return
        if log.stat().st_size != size:
            size = log.stat().st_size
            if daemon.log().count('"status": ') > seen:
                break
        time.sleep(0.0005)
    daemon.signal(signal.SIGSTOP)
    alert = json.loads(daemon.log().rsplit("detector.alerts: ", 1)[1].split("\n", 1)[0])["id"]
    while alert not in watch.poll(100) and time.monotonic() < deadline:
        daemon.signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.0, 0.002))
        daemon.signal(signal.SIGSTOP)


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    kafka: str, checkpoint: Path, tmp_path: Path, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    rng = random.Random(SEED)
    recs = records(ROWS, seed=6, bursts=BURSTS)
    expected = clean_run_alerts(checkpoint, recs)
    assert len([a for a in expected if a.status == "firing"]) == sum(len(b) for b in BURSTS.values())

    config = daemon_config(kafka, topics, checkpoint, tmp_path, scoring={"batch_records": 60, "batch_wait_ms": 50})
    producer = PacedProducer(kafka, topics.metrics, recs, len(ENTITIES), 1 / ROWS_PER_S, partitions=3)
    daemon = start_daemon(config, "run-0")
    daemon.wait_ready()
    producer.start()
    watch = AlertsWatch(kafka, topics.alerts)

    kills: list[tuple[float, dict[int, int]]] = []  # (wall time in ms, committed offsets after it)
    for k in range(KILLS):
        if k % 2:
            stop_after_delivery(daemon, watch, rng, timeout_s=20)
        else:
            time.sleep(rng.uniform(0.5, 4.0))
        assert daemon.process.poll() is None, daemon.log()
        daemon.process.kill()
        killed_at = time.time() * 1000
        daemon.process.wait()
        kills.append((killed_at, committed(kafka, topics.group, topics.metrics)))
        daemon = start_daemon(config, f"run-{k + 1}")
        daemon.wait_ready()

    ends = producer.join(120)
    assert all(sum(at.values()) < sum(ends.values()) for _, at in kills), "a kill came after the stream was done"
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 90, "the last daemon to drain")
    assert daemon.stop() == 0, daemon.log()

    # Every record was scored at least once.
    lines, torn = scores_lines(tmp_path / "scores.jsonl")
    assert torn <= KILLS
    assert {(s["partition"], s["offset"]) for s in lines} == set(producer.positions)
    assert unscored(lines, ROWS) == []

    # No alert id twice on the alerts topic, and the same alerts as an uninterrupted run.
    messages = read_topic(kafka, topics.alerts)
    alerts = [json.loads(m.value) for m in messages]
    ids = [a["id"] for a in alerts]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert duplicated == [], f"alert ids on the alerts topic twice: {duplicated}"
    assert sorted(ids) == sorted(a.id for a in expected)

    # How many kills landed after an alert reached the topic and before its batch was
    # committed: each such kill made the next incarnation raise that alert again.
    index = {(e, r): i for i, (e, r) in enumerate((r["host"], row_of(r["ts"])) for r in recs)}
    in_window = 0
    for killed_at, at in kills:
        for m, a in zip(messages, alerts, strict=True):
            partition, offset = producer.positions[index[(a["entity"], row_of(a["window_end"]))]]
            if m.timestamp_ms <= killed_at and offset >= at.get(partition, 0):
                in_window += 1
                break
    n = len(producer.positions)
    print(f"{n} records, {KILLS} kills, {in_window} between delivery and commit, {len(ids)} alerts")
