"""`detector run` end to end against a real broker: alerts, dead letters, metrics, commits,
Alertmanager and webhook delivery, reload, and equivalence with `detector replay`."""

from __future__ import annotations

import csv
import json
import math
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import Daemon, Topics, daemon_config
from streams import (
    ANOMALOUS,
    ENTITIES,
    Receiver,
    committed,
    encode,
    http_get,
    http_post,
    iter_jsonl,
    produce,
    read_topic,
    records,
    sample,
    scrape,
    wait_for,
)

from detector.cli import main

pytestmark = pytest.mark.integration

ROWS = 300
# Records the decoder must reject, with the reason each gets; keyed like good records.
BAD: list[tuple[str, bytes, str]] = [
    ("host-0", b"{not json", "invalid_json"),
    ("host-2", b'{"host": "host-2", "ts": "2024-03-01T01:00:00Z", "cpu": 50}', "missing_field"),
    ("host-3", b'{"host": "host-3", "ts": "2024-03-01T01:00:00Z", "cpu": "high", "mem": 1}', "wrong_type"),
    ("host-5", b"[1, 2, 3]", "not_an_object"),
    ("host-0", b'{"host": "host-0", "ts": "yesterday", "cpu": 1, "mem": 2}', "bad_timestamp"),
    ("host-1", b'{"host": "host-1", "ts": "2024-03-01T01:00:00Z", "cpu": 1}', "missing_field"),
]


class Run:
    """One daemon run over the test stream; the tests below check what it left behind."""

    def __init__(self, kafka: str, checkpoint: Path, tmp: Path) -> None:
        self.kafka = kafka
        self.tmp = tmp
        self.topics = Topics(kafka)
        self.receiver = Receiver(fail_first=2)  # the first two POSTs fail: delivery must retry
        self.good = records(ROWS, seed=1)
        messages = encode(self.good)
        # Bad records spread through the stream.
        for k, (key, value, _) in enumerate(BAD):
            messages.insert(200 + 250 * k, (key, value))
        self.messages = messages
        self.ends = produce(kafka, self.topics.metrics, messages)
        self.config = daemon_config(
            kafka,
            self.topics,
            checkpoint,
            tmp,
            sinks={
                "alertmanager": [
                    {
                        "url": self.receiver.url + "/am",
                        "resend_interval_s": 1.0,
                        "labels": {"team": "sre"},
                        "retry": {"initial_backoff_s": 0.05},
                    }
                ],
                "webhooks": [{"url": self.receiver.url + "/hook", "retry": {"initial_backoff_s": 0.05}}],
            },
        )
        self.daemon = Daemon(self.config, tmp)
        try:
            self._drive()
        finally:
            if self.daemon.process.poll() is None:
                self.daemon.process.kill()
            self.receiver.close()

    def _drive(self) -> None:
        d = self.daemon
        d.wait_ready()
        wait_for(lambda: committed(self.kafka, self.topics.group, self.topics.metrics) == self.ends, 60, "a drain")
        self.alerts = [json.loads(m.value) for m in read_topic(self.kafka, self.topics.alerts)]
        expected_alert_ids = {a["id"] for a in self.alerts}

        def webhooks_done() -> bool:
            hooked = {a["id"] for body in self.receiver.bodies("/hook") for a in body}
            am = self.receiver.bodies("/am/api/v2/alerts")
            resolved = sum(1 for body in am for a in body if a["endsAt"] < "2025")
            return hooked == expected_alert_ids and resolved >= len(ANOMALOUS)

        wait_for(webhooks_done, 30, "webhook and Alertmanager deliveries")
        self.metrics = scrape(d.url + "/metrics")
        self.healthy = http_get(d.url + "/-/healthy")[0]
        self.ready = http_get(d.url + "/-/ready")[0]
        self.not_found = http_get(d.url + "/nope")[0]

        # Reload: a valid change over HTTP, then an invalid file on SIGHUP (rejected, old kept).
        changed = json.loads(json.dumps(self.config))
        changed["streams"]["hosts"]["alerts"]["n"] = 4
        d.config_path.write_text(yaml.safe_dump(changed))
        self.reload_ok = http_post(d.url + "/-/reload")
        d.config_path.write_text("streams: {hosts: {window: {size: -1}}}\n")
        d.signal(signal.SIGHUP)
        wait_for(
            lambda: sample(scrape(d.url + "/metrics"), "detector_config_reloads_total", result="failure") == 1,
            10,
            "the rejected reload",
        )
        self.after_reload = scrape(d.url + "/metrics")
        self.am_bodies = self.receiver.bodies("/am/api/v2/alerts")
        self.hook_bodies = self.receiver.bodies("/hook")
        self.returncode = d.stop()
        self.log = d.log()
        self.dead = read_topic(self.kafka, self.topics.dead, expect=len(BAD))
        self.scores = list(iter_jsonl(self.tmp / "scores.jsonl"))
        source = read_topic(self.kafka, self.topics.metrics, expect=len(self.messages))
        self.source = {(m.partition, m.offset): m.value for m in source}


@pytest.fixture(scope="module")
def run(kafka: str, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return Run(kafka, checkpoint, tmp_path_factory.mktemp("daemon"))


def test_alerts_for_exactly_the_anomalous_entities(run: Run) -> None:
    firing = [a for a in run.alerts if a["status"] == "firing"]
    resolved = [a for a in run.alerts if a["status"] == "resolved"]
    assert sorted(a["entity"] for a in firing) == sorted(ANOMALOUS)
    assert sorted(a["entity"] for a in resolved) == sorted(ANOMALOUS)
    assert {a["resolves"] for a in resolved} == {a["id"] for a in firing}
    assert len({a["id"] for a in run.alerts}) == len(run.alerts)


def test_alerts_topic_is_keyed_by_entity(run: Run) -> None:
    messages = read_topic(run.kafka, run.topics.alerts)
    assert [m.key.decode() for m in messages if m.key] == [json.loads(m.value)["entity"] for m in messages]


def test_dead_letters_keep_the_record_and_say_why(run: Run) -> None:
    assert len(run.dead) == len(BAD)
    by_value = {m.value: m for m in run.dead}
    for key, value, reason in BAD:
        letter = by_value[value]
        assert letter.key == key.encode()
        assert letter.headers["detector.reason"] == reason.encode()
        assert letter.headers["detector.source.topic"] == run.topics.metrics.encode()
        assert letter.headers["detector.stream"] == b"hosts"
        partition = int(letter.headers["detector.source.partition"])
        assert run.source[(partition, int(letter.headers["detector.source.offset"]))] == value
        assert letter.headers["detector.detail"]


def test_metrics_match_the_counts(run: Run) -> None:
    m = run.metrics
    assert sample(m, "detector_records_consumed_total", stream="hosts", phase="live") == len(run.messages)
    reasons = Counter(reason for _, _, reason in BAD)
    for reason, count in reasons.items():
        assert sample(m, "detector_messages_dropped_total", stream="hosts", reason=reason) == count
        assert sample(m, "detector_dead_letters_total", stream="hosts", reason=reason) == count
    scored = [s for s in run.scores if s["score"] is not None]
    assert sample(m, "detector_windows_scored_total", stream="hosts", phase="live") == len(scored)
    assert sample(m, "detector_score_count", stream="hosts") == len(scored)
    anomalous = sum(1 for s in scored if s["severity"] != "none")
    assert sample(m, "detector_anomalous_windows_total", stream="hosts", severity="warning") == anomalous
    for status in ("firing", "resolved"):
        expected = sum(1 for a in run.alerts if a["status"] == status)
        assert sample(m, "detector_alerts_total", stream="hosts", severity="warning", status=status) == expected
    assert sample(m, "detector_end_to_end_latency_seconds_count", stream="hosts") == len(run.alerts)
    assert sample(m, "detector_sink_deliveries_total", sink="kafka") == len(run.alerts)
    assert (
        sample(m, "detector_sink_failures_total", sink="webhook")
        + sample(m, "detector_sink_failures_total", sink="alertmanager")
        == 2
    )
    versions = [labels for (name, labels), v in m.items() if name == "detector_model_info" and v == 1]
    assert len(versions) == 1 and dict(versions[0])["version"].startswith("hosts-")
    last_ts = max(r["ts"] for r in run.good)
    assert sample(m, "detector_last_event_timestamp_seconds", stream="hosts") == pytest.approx(_epoch(last_ts), abs=1)
    for partition in run.ends:
        assert sample(m, "detector_consumer_lag_records", topic=run.topics.metrics, partition=str(partition)) == 0
    assert sample(m, "detector_ready") == 1
    # Only bounded label values: no entity name appears in any label.
    labels = {value for (_, label_set) in m for _, value in label_set}
    assert not labels & set(ENTITIES)


def test_committed_offsets_equal_end_offsets_after_a_drain(run: Run) -> None:
    assert committed(run.kafka, run.topics.group, run.topics.metrics) == run.ends


def test_health_endpoints(run: Run) -> None:
    assert (run.healthy, run.ready, run.not_found) == (200, 200, 404)


def test_alertmanager_gets_firing_and_resolved_alerts(run: Run) -> None:
    alerts = [a for body in run.am_bodies for a in body]
    firing_ids = {a["id"] for a in run.alerts if a["status"] == "firing"}
    assert {a["annotations"]["alert_id"] for a in alerts} == firing_ids
    for a in alerts:
        assert set(a) >= {"labels", "annotations", "startsAt", "endsAt"}
        assert a["labels"]["alertname"] == "AnomalyDetected"
        assert a["labels"]["team"] == "sre"
        assert a["labels"]["entity"] in ANOMALOUS
        assert a["labels"]["severity"] == "warning"
    ended = [a for a in alerts if a["endsAt"] < "2025"]  # event-time endsAt: the resolve
    assert sorted(a["labels"]["entity"] for a in ended) == sorted(ANOMALOUS)
    for a in ended:
        assert a["startsAt"] < a["endsAt"]
    # While firing, the alert was sent with an endsAt in the future (wall clock), and re-sent.
    assert sum(1 for a in alerts if a["endsAt"] > "2025") >= len(ANOMALOUS)


def test_webhook_gets_every_alert_after_retrying(run: Run) -> None:
    delivered = [a for body in run.hook_bodies for a in body]
    assert sorted(a["id"] for a in delivered) == sorted(a["id"] for a in run.alerts)
    assert delivered[0].keys() >= {"id", "status", "stream", "entity", "severity", "score", "top_features"}


def test_reload_applies_a_valid_config_and_keeps_the_old_on_an_invalid_one(run: Run) -> None:
    assert run.reload_ok[0] == 200, run.reload_ok
    assert "hosts" in run.reload_ok[1]
    m = run.after_reload
    assert sample(m, "detector_config_reloads_total", result="success") == 1
    assert sample(m, "detector_config_reloads_total", result="failure") == 1
    assert sample(m, "detector_config_last_reload_successful") == 0
    assert "config reload rejected" in run.log


def test_sigterm_exits_cleanly(run: Run) -> None:
    assert run.returncode == 0, run.log


def test_same_scores_and_alerts_as_replay(run: Run, checkpoint: Path) -> None:
    data = run.tmp / "stream.jsonl"
    data.write_bytes(b"".join(value + b"\n" for _, value in run.messages))
    config = run.tmp / "replay.yaml"
    config.write_text(yaml.safe_dump(run.config))
    out, alerts = run.tmp / "replay.csv", run.tmp / "replay-alerts.jsonl"
    code = main(
        [
            "replay",
            "--config",
            str(config),
            "--input",
            str(data),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--alerts",
            str(alerts),
            "--quiet",
        ]
    )
    assert code == 0
    with out.open() as f:
        replayed = {(r["entity"], r["timestamp"]): r for r in csv.DictReader(f) if r["entity"]}
    daemon = {(s["entity"], s["timestamp"]): s for s in run.scores}
    assert daemon.keys() == replayed.keys()
    for key, s in daemon.items():
        r = replayed[key]
        if s["score"] is None:
            assert r["score"] == ""
        else:
            assert math.isclose(s["score"], float(r["score"]), rel_tol=1e-5, abs_tol=1e-7), key
            assert (s["severity"] != "none") == (r["is_anomaly"] == "1")
        assert (s["alert_id"] or "") == r["alert_id"]
    # Across entities the order depends on how partitions interleave; per entity it is the same.
    assert sorted(a["id"] for a in iter_jsonl(alerts)) == sorted(a["id"] for a in run.alerts)
    for entity in ANOMALOUS:
        replay_ids = [a["id"] for a in iter_jsonl(alerts) if a["entity"] == entity]
        assert replay_ids == [a["id"] for a in run.alerts if a["entity"] == entity]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
