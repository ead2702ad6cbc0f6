"""`detector run` retraining in the background while it consumes from a real broker: the
models it swaps in, and the scoring latency it costs (p99 within 2x of a run without)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Topics, daemon_config
from streams import committed, encode, produce, records, sample, scrape, wait_for

pytestmark = pytest.mark.integration

ROWS = 1500  # of each of the 6 entities: 9000 records, about 180 batches of 50
RETRAINING = {
    "enabled": True,
    "every_windows": 600,
    "min_windows": 256,
    "reservoir_size": 1024,
    "epochs": 2,
    "threads": 1,
}


def histogram_quantile(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, q: float) -> float:
    """The q-quantile of a Prometheus histogram, interpolated in its bucket as Prometheus's
    `histogram_quantile` does: what an operator's dashboard would show."""
    buckets = sorted(
        (float(dict(labels)["le"]), value) for (metric, labels), value in samples.items() if metric == name + "_bucket"
    )
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def drain(
    kafka: str,
    topics: Topics,
    ends: dict[int, int],
    group: str,
    config: dict[str, Any],
    start: Callable[..., Daemon],
    name: str,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Run a daemon with `config` in consumer group `group` until it committed `ends`; its metrics."""
    config["kafka"]["group_id"] = group
    daemon = start(config, name)
    daemon.wait_ready()
    wait_for(lambda: committed(kafka, group, topics.metrics) == ends, 120, f"the {name} daemon to drain")
    metrics = scrape(daemon.url + "/metrics")
    assert daemon.stop() == 0, daemon.log()
    return metrics


def test_background_retraining_keeps_scoring_latency_within_twice_a_run_without(
    kafka: str, checkpoint: Path, tmp_path: Path, topics: Topics, start_daemon: Callable[..., Daemon]
) -> None:
    ends = produce(kafka, topics.metrics, encode(records(ROWS, seed=6)))
    base = daemon_config(kafka, topics, checkpoint, tmp_path, scoring={"batch_records": 50, "batch_wait_ms": 50})
    base["sinks"] = {"log": False, "kafka": {"topic": topics.alerts}}
    plain = drain(kafka, topics, ends, topics.group + "-plain", base, start_daemon, "plain")

    retraining = daemon_config(kafka, topics, checkpoint, tmp_path, scoring={"batch_records": 50, "batch_wait_ms": 50})
    retraining["sinks"] = base["sinks"]
    retraining["streams"]["hosts"]["retraining"] = RETRAINING
    retrained = drain(kafka, topics, ends, topics.group + "-retrain", retraining, start_daemon, "retraining")

    name = "detector_scoring_duration_seconds"
    p99_plain = histogram_quantile(plain, name, 0.99)
    p99_retrain = histogram_quantile(retrained, name, 0.99)
    batches = sample(retrained, name + "_count", stream="hosts")
    runs = sum(sample(retrained, "detector_retrain_total", stream="hosts", outcome=o) for o in ("accepted", "rejected"))
    print(
        f"\nscoring p99 over {batches:.0f} batches of <= 50 records: {p99_plain * 1000:.2f} ms without retraining, "
        f"{p99_retrain * 1000:.2f} ms while retraining in the background ({runs:.0f} retrainings, "
        f"{sample(retrained, 'detector_retrain_seconds_sum', stream='hosts'):.1f} s of fine-tuning)"
    )
    # The daemon went on consuming while the worker trained: a second retraining starts only at
    # a batch boundary after the first finished, so at least the first overlapped scoring.
    assert runs >= 2
    assert sample(retrained, "detector_retrain_total", stream="hosts", outcome="failed") == 0
    assert sample(retrained, "detector_model_swaps_total", stream="hosts") >= 1
    assert sample(plain, "detector_retrain_total", stream="hosts", outcome="accepted") == 0
    assert p99_retrain <= 2 * p99_plain
