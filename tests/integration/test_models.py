"""A running daemon switches to a newly promoted model version on SIGHUP, against a real broker."""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Topics, daemon_config
from streams import (
    STREAM_SPEC,
    committed,
    encode,
    produce,
    read_topic,
    records,
    sample,
    scrape,
    train_checkpoint,
    wait_for,
)

from detector.config import Stream
from detector.model import load_checkpoint
from detector.store import CheckpointStore

pytestmark = pytest.mark.integration


def drained(kafka: str, topics: Topics, ends: dict[int, int]) -> Callable[[], bool]:
    def check() -> bool:
        done = committed(kafka, topics.group, topics.metrics)
        return all(done.get(p) == offset for p, offset in ends.items())

    return check


def test_daemon_picks_up_a_promoted_version_on_sighup(
    kafka: str, topics: Topics, checkpoint: Path, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    stream = Stream.model_validate({"input": {"kind": "kafka", "topic": topics.metrics}, **STREAM_SPEC})
    store = CheckpointStore(tmp_path / "models")
    v1 = load_checkpoint(checkpoint, stream)
    store.add(v1, parent=None, source="import", trained_on={"file": str(checkpoint)}, validation_error=v1.errors.mean)
    store.promote(v1.version)
    # Another seed: the same data and layout, other weights, so another version.
    other = stream.model_copy(update={"training": stream.training.model_copy(update={"seed": 7})})
    v2 = train_checkpoint(other)
    store.add(v2, parent=v1.version, source="train", trained_on={"rows": 2400}, validation_error=v2.errors.mean)
    assert v2.version != v1.version

    config: dict[str, Any] = daemon_config(kafka, topics, checkpoint, tmp_path)
    del config["streams"]["hosts"]["checkpoint"]
    config["streams"]["hosts"]["model_store"] = str(store.root)
    d = start_daemon(config)
    d.wait_ready()

    def model_info() -> dict[str, float]:
        return {
            dict(labels)["version"]: value
            for (name, labels), value in scrape(d.url + "/metrics").items()
            if name == "detector_model_info"
        }

    assert model_info() == {v1.version: 1.0}

    # Before: the default bursts (host-1 and host-4, rows 200-211) alert under v1.
    ends = produce(kafka, topics.metrics, encode(records(300, seed=1)))
    wait_for(drained(kafka, topics, ends), 60, "the first part to be committed")
    before = [json.loads(m.value) for m in read_topic(kafka, topics.alerts)]
    assert {a["entity"] for a in before if a["status"] == "firing"} == {"host-1", "host-4"}
    assert {a["model_version"] for a in before} == {v1.version}

    store.promote(v2.version, "integration test")
    d.signal(signal.SIGHUP)
    wait_for(lambda: model_info() == {v2.version: 1.0}, 20, "the daemon to switch to v2")
    assert f"now scoring with model {v2.version} (was {v1.version})" in d.log()

    # After: a burst on host-2 (rows 400-411) alerts under v2; no restart, so no refill either.
    ends = produce(
        kafka, topics.metrics, encode(records(200, seed=1, first_row=300, bursts={"host-2": [range(400, 412)]}))
    )
    wait_for(drained(kafka, topics, ends), 60, "the second part to be committed")
    seen = {a["id"] for a in before}
    after = [a for a in (json.loads(m.value) for m in read_topic(kafka, topics.alerts)) if a["id"] not in seen]
    assert any(a["entity"] == "host-2" and a["status"] == "firing" for a in after), after
    assert {a["model_version"] for a in after} == {v2.version}

    def drift_known() -> bool:
        metrics = scrape(d.url + "/metrics")
        keys = [
            (name, frozenset({("stream", "hosts")})) for name in ("detector_score_drift_psi", "detector_score_drift_ks")
        ]
        return all(key in metrics and math.isfinite(metrics[key]) for key in keys)

    wait_for(drift_known, 20, "the drift gauges of v2's scores")
    metrics = scrape(d.url + "/metrics")
    assert sample(metrics, "detector_model_swaps_total", stream="hosts") == 1
    assert 0 <= sample(metrics, "detector_score_drift_ks", stream="hosts") <= 1
    assert sample(metrics, "detector_config_reloads_total", result="success") == 1
    assert d.stop() == 0
