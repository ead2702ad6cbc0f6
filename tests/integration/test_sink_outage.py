"""A webhook receiver that goes away under load, behind a TCP proxy that refuses connections
while cut.

- `delivery: queued` (the default): consumption goes on during the outage, alerts raised
  meanwhile are delivered after it with the default retry policy, and a queue too small for
  the outage drops and counts the overflow.
- `delivery: confirmed`: no offset is committed past an alert the receiver has not
  acknowledged, and a restart after the outage delivers it.

The outage lasts `OUTAGE_S`: 20 s by default, the 2 minutes of the reliability issue with
DETECTOR_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Topics, daemon_config
from proxy import TcpProxy
from streams import (
    ANOMALOUS,
    ENTITIES,
    Receiver,
    committed,
    encode,
    iter_jsonl,
    produce,
    read_topic,
    records,
    row_of,
    sample,
    scrape,
    wait_for,
)

pytestmark = pytest.mark.integration

OUTAGE_S = 120.0 if os.environ.get("DETECTOR_SLOW_TESTS") == "1" else 20.0
ROWS = 300
FIRST = 40  # rows there before the daemon starts; the rest are produced while it runs
CUT_ROW, RESTORE_ROW = 80, 260  # the receiver is away while these rows are produced
# Bursts like streams.ANOMALY_ROWS for more entities, so that several alerts fall in the outage.
EXTRA_ANOMALIES = {"host-0": range(100, 112), "host-2": range(140, 152), "host-3": range(170, 182)}


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, TcpProxy]]:
    target = Receiver()
    proxy = TcpProxy("127.0.0.1", target.server.server_address[1]).start()
    yield target, proxy
    proxy.close()
    target.close()


def stream(seed: int) -> list[dict[str, Any]]:
    recs = records(ROWS, seed=seed)
    for rec in recs:
        rows = EXTRA_ANOMALIES.get(rec["host"])
        if rows is not None and row_of(rec["ts"]) in rows:
            rec["cpu"], rec["mem"] = rec["cpu"] + 60.0, rec["mem"] - 30.0
    return recs


@pytest.mark.slow
def test_a_receiver_outage_under_load_with_queued_delivery(
    kafka: str,
    checkpoint: Path,
    tmp_path: Path,
    topics: Topics,
    receiver: tuple[Receiver, TcpProxy],
    start_daemon: Callable[..., Daemon],
) -> None:
    target, proxy = receiver
    url = f"http://{proxy.address}"
    messages = encode(stream(seed=8))
    per_row = len(ENTITIES)
    ends = produce(kafka, topics.metrics, messages[: FIRST * per_row])
    # Default retries (about 3 minutes before giving up) for both; the second queue holds one delivery.
    config = daemon_config(
        kafka,
        topics,
        checkpoint,
        tmp_path,
        scoring={"batch_records": 60, "batch_wait_ms": 50},
        sinks={"webhooks": [{"url": url + "/hook"}, {"url": url + "/small", "queue_size": 1}]},
    )
    scores = tmp_path / "scores.jsonl"
    daemon = start_daemon(config)
    daemon.wait_ready()

    def newest_row_scored() -> int:
        return max((row_of(s["timestamp"]) for s in iter_jsonl(scores)), default=-1) if scores.exists() else -1

    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=5)
    row_s = OUTAGE_S / (RESTORE_ROW - CUT_ROW)
    lags = []
    futures = []
    try:
        for row in range(FIRST, ROWS):
            if row == CUT_ROW:
                wait_for(lambda: newest_row_scored() >= CUT_ROW - 5, 30, "the daemon to keep up before the cut")
                committed_at_cut = sum(committed(kafka, topics.group, topics.metrics).values())
                proxy.cut()
                cut_at = time.monotonic()
            if row == RESTORE_ROW:
                outage_metrics = scrape(daemon.url + "/metrics")
                committed_at_restore = sum(committed(kafka, topics.group, topics.metrics).values())
                proxy.restore()
                outage_s = time.monotonic() - cut_at
            for key, value in messages[row * per_row : (row + 1) * per_row]:
                futures.append(producer.send(topics.metrics, key=key.encode(), value=value))
            producer.flush()
            if CUT_ROW < row < RESTORE_ROW:
                lags.append(row - newest_row_scored())
                time.sleep(row_s)
        for future in futures:
            meta = future.get(timeout=30)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        producer.close()
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 60, "the daemon to drain")
    alerts = [json.loads(m.value) for m in read_topic(kafka, topics.alerts)]
    ids = sorted(a["id"] for a in alerts)

    def hooked(path: str) -> list[str]:
        return sorted(a["id"] for body in target.bodies(path) for a in body)

    # The first retry after the outage comes within one backoff (at most 30 s).
    wait_for(lambda: hooked("/hook") == ids, 60, "the alerts raised during the outage to be delivered")
    metrics = scrape(daemon.url + "/metrics")
    assert daemon.stop() == 0, daemon.log()
    print(f"outage {outage_s:.0f} s; newest row scored lagged production by at most {max(lags)} rows")

    firing = {a["entity"] for a in alerts if a["status"] == "firing"}
    assert firing == set(ANOMALOUS) | set(EXTRA_ANOMALIES)
    # Alerts were raised while the receiver was away (they waited in the queue).
    assert sample(outage_metrics, "detector_sink_failures_total", sink="webhook") > 0
    assert sample(outage_metrics, "detector_sink_queue_length", sink="webhook") >= 1
    # Consumption did not wait for the receiver: scoring kept up and offsets were committed.
    assert max(lags) <= 20, lags
    assert committed_at_restore - committed_at_cut >= (RESTORE_ROW - CUT_ROW - 20) * per_row
    # Nothing given up on; the small queue's overflow is counted, alert by alert.
    assert sample(metrics, "detector_sink_dropped_total", sink="webhook", cause="not_delivered") == 0
    overflow = sample(metrics, "detector_sink_dropped_total", sink="webhook", cause="queue_full")
    assert overflow > 0
    assert len(hooked("/small")) + overflow == len(ids)


def test_confirmed_delivery_commits_no_offset_past_an_undelivered_alert(
    kafka: str,
    checkpoint: Path,
    tmp_path: Path,
    topics: Topics,
    receiver: tuple[Receiver, TcpProxy],
    start_daemon: Callable[..., Daemon],
) -> None:
    target, proxy = receiver
    ends = produce(kafka, topics.metrics, encode(records(250, seed=9)))  # fires, and resolves by row 232
    hook = {"url": f"http://{proxy.address}/hook", "delivery": "confirmed", "retry": {"max_backoff_s": 1.0}}
    config = daemon_config(
        kafka, topics, checkpoint, tmp_path, sinks={"webhooks": [hook]}, service={"grace_period_s": 4}
    )
    scores = tmp_path / "scores.jsonl"
    proxy.cut()

    first = start_daemon(config, "first")
    first.wait_ready()
    everything = {(p, o) for p, end in ends.items() for o in range(end)}

    def all_scored() -> bool:
        return scores.exists() and {(s["partition"], s["offset"]) for s in iter_jsonl(scores)} == everything

    # Holding commits back does not hold consumption back.
    wait_for(all_scored, 60, "the daemon to score every record")
    lines = list(iter_jsonl(scores))
    raised = [s for s in lines if s["alert_id"]]
    first_alert: dict[int, int] = {}
    for s in raised:
        first_alert[s["partition"]] = min(first_alert.get(s["partition"], s["offset"]), s["offset"])

    def batches_done() -> bool:
        # A batch's duration is observed after its commit (or its hold): equal counts mean no batch
        # is half done, so any commit the daemon would make has been made.
        m = scrape(first.url + "/metrics")
        return sample(m, "detector_batch_records_count") == sample(m, "detector_batch_duration_seconds_count")

    wait_for(batches_done, 10, "the last batch to finish")
    stopped_at = committed(kafka, topics.group, topics.metrics)
    assert first.stop() == 0, first.log()
    assert first_alert, "no alert raised"
    for partition, offset in first_alert.items():
        assert stopped_at.get(partition, 0) <= offset, (stopped_at, first_alert)
    assert stopped_at != ends
    assert "not delivered before shutdown" in first.log()
    assert target.bodies("/hook") == []

    proxy.restore()
    second = start_daemon(config, "second")
    wait_for(lambda: committed(kafka, topics.group, topics.metrics) == ends, 60, "the second daemon to drain")
    wait_for(lambda: target.bodies("/hook"), 10, "the delivery")
    assert second.stop() == 0, second.log()
    delivered = {a["id"]: a for body in target.bodies("/hook") for a in body}
    firing = {s["alert_id"] for s in raised}  # a score line names the alert its window raised
    assert firing <= set(delivered)
    assert sorted(delivered[i]["entity"] for i in firing if delivered[i]["status"] == "firing") == sorted(ANOMALOUS)
