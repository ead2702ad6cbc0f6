"""Crash recovery: `kill -9` under steady load, five times, each time restarted.

A producer thread writes a six-entity stream with twelve injected anomaly bursts at a steady
rate while the daemon is killed (SIGKILL: no batch finished, no commit, no flush) at five
seeded random moments and started again. Afterwards:

- every record was scored at least once, by position (topic partition and offset in the
  scores file, which every incarnation appends to);
- the firing and resolved alerts are exactly those of an uninterrupted run of the same input
  (same ids, that is same entity, window end and status): no entity missed an alert, none
  got one it should not have;
- no alert id, firing or resolved, reaches the alerts topic (two partitions) twice.

Offsets are committed after every sink took the batch's alerts, so a kill between the two
makes the next incarnation process the batch again and raise the same alerts with the same
ids. On assignment the daemon reads the alerts topic's tail back (`kafka.alert_dedup_lookback`
messages per partition) and its Kafka sink skips the ids found there. Three of the kill
moments are aimed at the few milliseconds between a batch's alert delivery and its commit
(see `kill_mid_delivery`), and at least one must land there; the other two fall at seeded
random times, anywhere in the batch cycle. For each kill, the alerts it caught (on the topic
before the kill, their record not committed) must be exactly the ones the next incarnation
logs as not sent again: the dedupe, not luck, kept them single.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
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

from detector.broker import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = 540
ROWS_PER_S = 10  # 60 records/s; the stream lasts about 54 s, the five kill cycles about as long
# One burst every 40 rows, entity after entity; each fires and resolves before the next
# burst of the same entity.
BURSTS = {e: [range(start, start + 12) for start in range(80 + 40 * i, ROWS - 18, 240)] for i, e in enumerate(ENTITIES)}
STARTS = sorted(burst.start for bursts in BURSTS.values() for burst in bursts)
KILLS = 5
AIMED = (1, 2, 3)  # the kills aimed between a delivery and its commit; the others are random
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

    def drain(self) -> set[str]:
        """The ids on the topic so far: polls until a poll brings none."""
        while True:
            before = len(self.ids)
            if len(self.poll(100)) == before:
                return set(self.ids)


def suppressed(log: str) -> list[str]:
    """The alert ids a daemon's log says its Kafka sink did not send again."""
    marker = "already on the topic: "
    return [i for line in log.splitlines() if marker in line for i in line.split(marker, 1)[1].split()]


def tail_read_s(log: str) -> list[float]:
    """How long each assignment of a daemon's log took to read the alerts topic back, in seconds."""
    return [
        float(line.rsplit(" in ", 1)[1].split()[0]) for line in log.splitlines() if "read back alerts topic" in line
    ]


def kill_mid_delivery(daemon: Daemon, watch: AlertsWatch, rng: random.Random, timeout_s: float) -> None:
    """Let the daemon run in steps of under a millisecond (SIGCONT, SIGSTOP) until the alerts
    topic has its next alert, then SIGKILL it: mostly after the delivery and before the
    batch's commit, which follow each other within a few milliseconds. (Its log sink writes
    an alert just before the Kafka sink sends it.) Without an alert in `timeout_s` (the
    stream ran out), the kill is merely random. An alert already on the topic before the
    stepping began (a re-send the daemon skips) is no aim."""
    logged = daemon.log().count('"status": ')
    known = watch.drain()
    deadline = time.monotonic() + timeout_s
    daemon.signal(signal.SIGSTOP)
    while time.monotonic() < deadline:
        text = daemon.log()
        if text.count('"status": ') > logged:
            alert = json.loads(text.rsplit("detector.alerts: ", 1)[1].split("\n", 1)[0])["id"]
            if alert not in known and alert in watch.poll(20):
                break
        daemon.signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.0001, 0.0008))
        daemon.signal(signal.SIGSTOP)
    daemon.process.kill()


def test_kill_9_at_random_moments_loses_nothing_and_sends_no_alert_twice(
    kafka: str, checkpoint: Path, tmp_path: Path, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    rng = random.Random(SEED)
    recs = records(ROWS, seed=6, bursts=BURSTS)
    expected = clean_run_alerts(checkpoint, recs)
    assert len([a for a in expected if a.status == "firing"]) == sum(len(b) for b in BURSTS.values())

    # Two alerts-topic partitions: the tail is read back from each.
    alerts_topic = f"{topics.alerts}-p2"
    create_topics(kafka, [alerts_topic], partitions=2)
    config = daemon_config(
        kafka,
        topics,
        checkpoint,
        tmp_path,
        scoring={"batch_records": 60, "batch_wait_ms": 50},
        sinks={"kafka": {"topic": alerts_topic}},
    )
    # The last rows wait for the last restart: every kill comes while records are still coming.
    hold_at = (ROWS - 10) * len(ENTITIES)
    producer = PacedProducer(kafka, topics.metrics, recs, len(ENTITIES), 1 / ROWS_PER_S, partitions=3, hold_at=hold_at)
    daemon = start_daemon(config, "run-0")
    daemons = [daemon]
    daemon.wait_ready()
    producer.start()
    watch = AlertsWatch(kafka, alerts_topic)

    kills: list[tuple[float, dict[int, int]]] = []  # (wall time in ms, committed offsets after it)
    for k in range(KILLS):
        assert daemon.process.poll() is None, daemon.log()
        if k in AIMED:
            # Start stepping as an upcoming burst begins: its alert follows within a few rows.
            row = next((r for r in STARTS if r * len(ENTITIES) > producer.sent), 0)
            wait_for(lambda: producer.sent >= row * len(ENTITIES), 20, "the next burst")  # noqa: B023
            kill_mid_delivery(daemon, watch, rng, timeout_s=20)
        else:
            time.sleep(rng.uniform(0.5, 4.0))
            daemon.process.kill()
        killed_at = time.time() * 1000
        daemon.process.wait()
        kills.append((killed_at, committed(kafka, topics.group, topics.metrics)))
        daemon = start_daemon(config, f"run-{k + 1}")
        daemons.append(daemon)
        daemon.wait_ready()

    watch.consumer.close()
    producer.release()
    ends = producer.join(120)
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 90, "the last daemon to drain")
    assert daemon.stop() == 0, daemon.log()

    # Every record was scored at least once.
    lines, torn = scores_lines(tmp_path / "scores.jsonl")
    assert torn <= KILLS
    assert {(s["partition"], s["offset"]) for s in lines} == set(producer.positions)
    assert unscored(lines, ROWS) == []

    # The alerts of an uninterrupted run, each id once.
    messages = read_topic(kafka, alerts_topic)
    assert {m.partition for m in messages} == {0, 1}
    index = {(r["host"], row_of(r["ts"])): i for i, r in enumerate(recs)}
    copies: dict[str, list[int]] = defaultdict(list)  # id -> when each copy was sent (ms)
    source: dict[str, tuple[int, int]] = {}  # id -> the record that completed its window
    for m in messages:
        a = json.loads(m.value)
        copies[a["id"]].append(m.timestamp_ms)
        source[a["id"]] = producer.positions[index[(a["entity"], row_of(a["window_end"]))]]
    assert sorted(copies) == sorted(a.id for a in expected)
    twice = {alert_id: len(sent) for alert_id, sent in copies.items() if len(sent) > 1}
    assert not twice, f"alert ids on the alerts topic more than once: {twice}"

    # Each kill caught the alerts that were on the topic before it and whose record it left
    # uncommitted; the next incarnation raised exactly those again and did not send them.
    def caught(kill: tuple[float, dict[int, int]]) -> set[str]:
        killed_at, offsets = kill
        return {
            i for i, (sent,) in copies.items() if sent <= killed_at and source[i][1] >= offsets.get(source[i][0], 0)
        }

    assert suppressed(daemons[0].log()) == []
    for k, kill in enumerate(kills):
        skipped = suppressed(daemons[k + 1].log())
        assert set(skipped) == caught(kill), f"kill {k}: caught {caught(kill)}, not re-sent {skipped}"
    mid_delivery = sum(bool(caught(kill)) for kill in kills)
    assert mid_delivery >= 1, "no kill fell between a delivery and its commit: the aim missed"
    deduplicated = sum(len(caught(kill)) for kill in kills)
    reads = [s for d in daemons for s in tail_read_s(d.log())]
    assert len(reads) >= len(daemons)  # each incarnation read the tail back on its assignment
    n = len(producer.positions)
    held = "; the stream waited for the last kill" if producer.held else ""
    print(
        f"{n} records, {KILLS} kills ({mid_delivery} mid-delivery), {len(copies)} alerts, each once; "
        f"{deduplicated} re-sends skipped; tail read back in {min(reads):.3f}-{max(reads):.3f} s{held}"
    )
