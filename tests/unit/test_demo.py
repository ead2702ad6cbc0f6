from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.config import load_config
from detector.demo import (
    CARDS,
    DAY_MIN,
    HOSTS,
    MINUTE_MS,
    START_MS,
    TRAIN_UNTIL_MS,
    Dataset,
    Incident,
    evaluate,
    generate,
    match_incident,
    write_csv,
)
from detector.replay import read_samples
from detector.source import format_timestamp


@pytest.fixture(scope="module")
def datasets() -> dict[str, Dataset]:
    return {d.stream: d for d in generate(seed=3)}


def test_hosts_report_every_minute_in_time_order(datasets: dict[str, Dataset]) -> None:
    rows = datasets["hosts"].rows
    assert len(rows) == 3 * DAY_MIN * len(HOSTS)
    assert [r["host"] for r in rows[: len(HOSTS)]] == HOSTS
    assert rows[0]["ts"] < rows[-1]["ts"]


def test_payments_come_in_time_order_from_many_cards(datasets: dict[str, Dataset]) -> None:
    rows = datasets["payments"].rows
    stamps = [r["ts"] for r in rows]
    assert stamps == sorted(stamps)
    assert len({r["card"] for r in rows}) > 0.9 * len(CARDS)


def test_incidents_stay_out_of_the_training_day(datasets: dict[str, Dataset]) -> None:
    for data in datasets.values():
        assert data.incidents
        entities = {r[data.entity_field] for r in data.rows}
        for f in data.incidents:
            assert TRAIN_UNTIL_MS <= f.start_ms < f.end_ms
            assert f.entity in entities
            assert f.stream == data.stream


def _series(data: Dataset, entity: str, name: str, start_ms: int, end_ms: int) -> np.ndarray:
    lo, hi = format_timestamp(start_ms), format_timestamp(end_ms)
    values = [
        r[name]
        for r in data.rows
        if r[data.entity_field] == entity and lo <= r["ts"] < hi and isinstance(r.get(name), float)
    ]
    return np.array(values)


def test_faults_change_the_metrics_they_claim_to(datasets: dict[str, Dataset]) -> None:
    hosts = datasets["hosts"]
    by_kind = {f.kind: f for f in hosts.incidents}
    cpu = by_kind["cpu_saturation"]
    before = _series(hosts, cpu.entity, "cpu_pct", cpu.start_ms - 60 * MINUTE_MS, cpu.start_ms)
    during = _series(hosts, cpu.entity, "cpu_pct", cpu.start_ms, cpu.end_ms)
    assert during.mean() > 90 > before.mean() + 20
    drop = by_kind["traffic_drop"]
    before = _series(hosts, drop.entity, "requests", drop.start_ms - 60 * MINUTE_MS, drop.start_ms)
    during = _series(hosts, drop.entity, "requests", drop.start_ms, drop.end_ms)
    assert during.mean() < 0.1 * before.mean()


def test_fraud_looks_like_its_kind(datasets: dict[str, Dataset]) -> None:
    payments = datasets["payments"]
    for f in payments.incidents:
        amounts = _series(payments, f.entity, "amount", f.start_ms, f.end_ms)
        distances = _series(payments, f.entity, "distance_km", f.start_ms, f.end_ms)
        if f.kind == "card_testing":
            assert len(amounts) >= 12
            assert amounts.max() <= 3.0
        elif f.kind == "account_takeover":
            assert (amounts >= 700).sum() == 5
        assert np.median(distances) > 500


def test_generated_csv_decodes_with_the_demo_config_and_reports_the_glitches(
    tmp_path: Path, datasets: dict[str, Dataset]
) -> None:
    config = load_config(Path("configs/demo.yaml"))
    reasons = {}
    for name, data in datasets.items():
        path = tmp_path / f"{name}.csv"
        write_csv(path, data)
        samples, rejections = read_samples(name, config.streams[name], path)
        assert len(samples) + len(rejections) == len(data.rows)
        reasons[name] = sorted(r.reason for r in rejections)
    assert reasons == {"hosts": ["bad_timestamp", "missing_field", "wrong_type"], "payments": []}


def _alert(stream: str, entity: str, end_minute: int, window_min: int = 30, status: str = "firing") -> dict[str, Any]:
    end_ms = START_MS + end_minute * MINUTE_MS
    return {
        "status": status,
        "stream": stream,
        "entity": entity,
        "window_start": format_timestamp(end_ms - window_min * MINUTE_MS),
        "window_end": format_timestamp(end_ms),
    }


def test_evaluate_counts_delays_misses_and_false_alarms() -> None:
    incidents = [
        Incident("hosts", "a", "web-01", START_MS + 100 * MINUTE_MS, START_MS + 130 * MINUTE_MS, ""),
        Incident("hosts", "b", "web-02", START_MS + 500 * MINUTE_MS, START_MS + 520 * MINUTE_MS, ""),
        Incident("payments", "c", "card-1", START_MS + 100 * MINUTE_MS, START_MS + 110 * MINUTE_MS, ""),
    ]
    alerts = [
        _alert("hosts", "web-01", 104),  # incident a, 4 minutes in
        _alert("hosts", "web-01", 150),  # still a: its window holds incident minutes
        _alert("hosts", "web-01", 161),  # window starts after the incident: false
        _alert("hosts", "web-02", 104),  # wrong entity: false
        _alert("payments", "web-01", 104),  # wrong stream: false
        _alert("hosts", "web-01", 120, status="resolved"),  # not counted
        _alert("payments", "card-1", 140, window_min=60),  # a long window reaching back into c
    ]
    report = evaluate(alerts, incidents)
    assert report.detected == {"a web-01": 4, "b web-02": None, "c card-1": 40}
    assert (report.true_alerts, report.false_alerts) == (3, 3)
    assert report.false_by_stream == {"hosts": 2, "payments": 1}
    assert report.recall == pytest.approx(2 / 3)
    assert report.precision == 0.5
    assert match_incident(alerts[3], incidents) is None
