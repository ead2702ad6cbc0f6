"""Rebalance and scale-out: three daemons in one consumer group share a six-partition topic
(one entity per partition) under steady load; one member stops (SIGTERM), its partitions
move to the other two, and later it comes back and the group spreads out again.

Right after each move, every entity gets an anomaly burst a few rows past the point where its
new owner took over: a new owner that started its windows empty would be blind for the first
window's worth of records and miss or delay those alerts. Afterwards:

- every record was scored at least once, by position (the union of the members' scores files);
- no alert id reached the alerts topic twice;
- the alerts are exactly those of an uninterrupted single-process run of the same input, in
  particular the bursts of the entities whose partition changed owner.
"""

from __future__ import annotations

import json
import signal
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
    iter_jsonl,
    read_topic,
    records,
    row_of,
    unscored,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 6
ROWS = 400
ROWS_PER_S = 10
BURST = 12  # rows
LEAD = 4  # rows between the moment a move is seen done and the bursts


class Group:
    """The consumer group as the broker describes it."""

    def __init__(self, bootstrap: str, group: str) -> None:
        from kafka import KafkaAdminClient

        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        self.group = group

    def state(self) -> str:
        return str(self.admin.describe_groups([self.group])[self.group]["group_state"])

    def owners(self) -> dict[str, set[int]]:
        """Each member's partitions, by member name (client id `detector-<name>`), once the group
        is stable; {} while it rebalances."""
        info = self.admin.describe_groups([self.group])[self.group]
        if info["group_state"] != "Stable":
            return {}
        out: dict[str, set[int]] = {}
        for member in info["members"]:
            assigned = member["member_assignment"]["assigned_partitions"]
            out[member["client_id"].removeprefix("detector-")] = {p for t in assigned for p in t["partitions"]}
        return out

    def settle(self, names: str) -> dict[str, set[int]]:
        """Wait until exactly `names` own partitions, each some, together all of them."""
        found: dict[str, set[int]] = {}

        def settled() -> bool:
            found.clear()
            found.update(self.owners())
            return sorted(found) == sorted(names) and all(found.values())

        wait_for(settled, 60, f"the group to settle on members {', '.join(names)}", interval_s=0.2)
        assert set().union(*found.values()) == set(range(PARTITIONS))
        return dict(found)

    def close(self) -> None:
        self.admin.close()


def inject_burst(producer: PacedProducer, lead_rows: int) -> int:
    """Make every entity anomalous for BURST rows from `lead_rows` rows past what the producer
    has sent; returns the first row of the burst."""
    per_row = len(ENTITIES)
    with producer.lock:
        first = producer.sent // per_row + lead_rows
        assert first + BURST < ROWS, "the stream is too short for this burst"
        for rec in producer.recs[first * per_row : (first + BURST) * per_row]:
            rec["cpu"] = round(rec["cpu"] + 60.0, 4)
            rec["mem"] = round(rec["mem"] - 30.0, 4)
    return first


def test_members_leave_and_join_under_load_without_loss_duplicates_or_blind_spots(
    kafka: str, checkpoint: Path, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    topics = Topics(kafka, partitions=PARTITIONS)
    recs = records(ROWS, seed=8, anomalies=False)
    producer = PacedProducer(kafka, topics.metrics, recs, len(ENTITIES), 1 / ROWS_PER_S, partitions=PARTITIONS)

    def config(name: str) -> dict[str, Any]:
        return daemon_config(
            kafka,
            topics,
            checkpoint,
            tmp_path,
            scoring={"batch_records": 60, "batch_wait_ms": 50},
            kafka={"client_id": f"detector-{name}"},
            sinks={"scores_file": str(tmp_path / f"{name}.jsonl")},
        )

    configs = {name: config(name) for name in "abc"}
    group = Group(kafka, topics.group)
    producer.start()
    members = {name: start_daemon(configs[name], name) for name in "abc"}
    for daemon in members.values():
        daemon.wait_ready(90)
    before = group.settle("abc")
    wait_for(lambda: producer.sent >= 80 * len(ENTITIES), 60, "some history on every partition")

    # c leaves: it finishes its batch and commits before the burst arrives, and a and b take
    # its partitions over, refilling their windows from history.
    bursts = [inject_burst(producer, LEAD)]
    members["c"].signal(signal.SIGTERM)
    assert members["c"].process.wait(timeout=30) == 0, members["c"].log()
    after_leave = group.settle("ab")
    moved_out = before["c"]

    # c comes back: the group stops consuming while it rebalances, so a burst injected as the
    # rebalance starts arrives right where every partition's new owner starts.
    wait_for(lambda: producer.sent >= (bursts[0] + 40) * len(ENTITIES), 60, "the first burst to resolve")
    members["c"] = start_daemon(configs["c"], "c-again")
    wait_for(lambda: group.state() != "Stable", 60, "c to join the group", interval_s=0.05)
    bursts.append(inject_burst(producer, LEAD))
    members["c"].wait_ready(90)
    after_join = group.settle("abc")
    group.close()
    owner = {p: n for n, parts in after_leave.items() for p in parts}
    moved_back = {p for n, parts in after_join.items() for p in parts if owner[p] != n}

    ends = producer.join(120)
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 90, "the group to drain")
    for daemon in members.values():
        assert daemon.stop() == 0, daemon.log()

    # Every record scored at least once, whoever owned it.
    lines = [s for name in "abc" for s in iter_jsonl(tmp_path / f"{name}.jsonl")]
    assert {(s["partition"], s["offset"]) for s in lines} == set(producer.positions)
    assert unscored(lines, ROWS) == []

    # No alert twice, and the alerts of an uninterrupted run: both bursts of every entity.
    alerts = [json.loads(m.value) for m in read_topic(kafka, topics.alerts)]
    ids = [a["id"] for a in alerts]
    assert len(ids) == len(set(ids)), "an alert id reached the alerts topic twice"
    expected = clean_run_alerts(checkpoint, recs)
    assert sorted(ids) == sorted(a.id for a in expected)

    # In particular the entities that changed owner caught the burst right after the move.
    assert moved_out and moved_back, (before, after_leave, after_join)
    for partitions, first in ((moved_out, bursts[0]), (moved_back, bursts[1])):
        for p in partitions:
            fired = [row_of(a["window_end"]) for a in alerts if a["entity"] == ENTITIES[p] and a["status"] == "firing"]
            assert any(first <= row < first + BURST for row in fired), (ENTITIES[p], first, fired)
