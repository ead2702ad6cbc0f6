"""SIGTERM in the middle of a stream (and of an anomaly), then a restart: every record is
scored at least once, no alert id reaches the alerts topic twice, and the refill from
history carries the alert state over (the anomaly fires once and resolves once)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, Topics, daemon_config
from streams import (
    ANOMALOUS,
    ANOMALY_ROWS,
    ENTITIES,
    committed,
    encode,
    iter_jsonl,
    produce,
    read_topic,
    records,
    unscored,
    wait_for,
)

pytestmark = pytest.mark.integration

ROWS = 300
FIRST = 120  # rows produced before the daemon starts; the rest arrive while it runs


def test_sigterm_mid_stream_then_restart(kafka: str, checkpoint: Path, tmp_path: Path) -> None:
    topics = Topics(kafka)
    good = records(ROWS, seed=2)
    messages = encode(good)
    per_row = len(ENTITIES)
    ends = produce(kafka, topics.metrics, messages[: FIRST * per_row])
    config = daemon_config(kafka, topics, checkpoint, tmp_path, scoring={"batch_records": 60, "batch_wait_ms": 50})
    scores = tmp_path / "scores.jsonl"

    def produce_rest() -> None:
        for row in range(FIRST, ROWS, 5):  # five rows of every entity at a time, paced
            part = produce(kafka, topics.metrics, messages[row * per_row : (row + 5) * per_row])
            for p, end in part.items():
                ends[p] = max(ends.get(p, 0), end)
            time.sleep(0.05)

    first = Daemon(config, tmp_path, "first")
    first.wait_ready()
    producer = threading.Thread(target=produce_rest)
    producer.start()

    def inside_the_anomaly() -> bool:
        if not scores.exists():
            return False
        rows = [s for s in iter_jsonl(scores) if s["entity"] in ANOMALOUS]
        return any(s["alert_id"] for s in rows) and len(rows) >= 2 * (ANOMALY_ROWS.start + 8)

    wait_for(inside_the_anomaly, 60, "the first daemon to be inside the anomaly", interval_s=0.05)
    assert first.stop() == 0, first.log()
    stopped_at = committed(kafka, topics.group, topics.metrics)
    producer.join()
    assert sum(stopped_at.values()) < sum(ends.values()), "stopped after the end: not mid-stream"

    second = Daemon(config, tmp_path, "second")
    second.wait_ready()
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 60, "the second daemon to drain")
    assert second.stop() == 0, second.log()
    assert "refilling windows" in second.log()

    # Every record was scored (or found too early in its entity's history to complete a window) at least once.
    lines = list(iter_jsonl(scores))
    assert {(s["partition"], s["offset"]) for s in lines} == {(p, o) for p, end in ends.items() for o in range(end)}
    # No blind spot: from each entity's first full window on, every record got a score.
    assert unscored(lines, ROWS) == []

    alerts = [(m.key, json.loads(m.value)) for m in read_topic(kafka, topics.alerts)]
    ids = [a["id"] for _, a in alerts]
    assert len(ids) == len(set(ids)), "an alert id reached the alerts topic twice"
    firing = sorted(a["entity"] for _, a in alerts if a["status"] == "firing")
    resolved = sorted(a["entity"] for _, a in alerts if a["status"] == "resolved")
    assert firing == sorted(ANOMALOUS)
    assert resolved == sorted(ANOMALOUS)
    # The anomaly fired before the SIGTERM; the restarted daemon rebuilt the alert state from
    # history instead of firing it again.
    assert first.log().count('"status": "firing"') == len(ANOMALOUS)
    assert '"status": "firing"' not in second.log()


def test_a_second_member_takes_partitions_over_without_a_blind_spot(
    kafka: str, checkpoint: Path, tmp_path: Path
) -> None:
    topics = Topics(kafka)
    messages = encode(records(ROWS, seed=3))
    per_row = len(ENTITIES)
    half = 150 * per_row  # before the anomaly
    ends = produce(kafka, topics.metrics, messages[:half])
    config_a = daemon_config(kafka, topics, checkpoint, tmp_path, sinks={"scores_file": str(tmp_path / "a.jsonl")})
    config_b = daemon_config(kafka, topics, checkpoint, tmp_path, sinks={"scores_file": str(tmp_path / "b.jsonl")})
    a = Daemon(config_a, tmp_path, "a")
    a.wait_ready()
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 60, "the first member to drain")

    b = Daemon(config_b, tmp_path, "b")
    b.wait_ready()  # the group rebalanced: b owns at least one partition, a the others
    a.wait_ready()
    for p, end in produce(kafka, topics.metrics, messages[half:]).items():
        ends[p] = max(ends[p], end)
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 60, "both members to drain")
    assert a.stop() == 0, a.log()
    assert b.stop() == 0, b.log()

    assert "refilling windows" in b.log()
    lines = list(iter_jsonl(tmp_path / "a.jsonl")) + list(iter_jsonl(tmp_path / "b.jsonl"))
    assert {(s["partition"], s["offset"]) for s in lines} == {(p, o) for p, end in ends.items() for o in range(end)}
    assert unscored(lines, ROWS) == []
    assert {s["partition"] for s in iter_jsonl(tmp_path / "b.jsonl")}, "the second member scored nothing"

    alerts = [json.loads(m.value) for m in read_topic(kafka, topics.alerts)]
    ids = [a["id"] for a in alerts]
    assert len(ids) == len(set(ids))
    assert sorted(a["entity"] for a in alerts if a["status"] == "firing") == sorted(ANOMALOUS)
    assert sorted(a["entity"] for a in alerts if a["status"] == "resolved") == sorted(ANOMALOUS)
