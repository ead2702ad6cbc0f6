from pathlib import Path

import numpy as np
import pytest

from detector.alerts import Alert
from detector.config import load_config
from detector.demo import DAY_MIN, HOSTS, MINUTE_MS, START_MS, Fault, evaluate, generate, match_fault, write_csv
from detector.replay import read_samples

WINDOW_MS = 30 * MINUTE_MS
Generated = tuple[list[dict[str, str]], list[Fault]]


@pytest.fixture(scope="module")
def generated() -> Generated:
    return generate(seed=3)


def test_generate_gives_every_host_every_minute_in_time_order(
    generated: Generated,
) -> None:
    rows, _ = generated
    assert len(rows) == 3 * DAY_MIN * len(HOSTS)
    assert [r["host"] for r in rows[: len(HOSTS)]] == HOSTS
    assert rows[0]["timestamp"] < rows[-1]["timestamp"]


def test_faults_stay_out_of_the_training_day(generated: Generated) -> None:
    _, faults = generated
    day_one_end = START_MS + DAY_MIN * MINUTE_MS
    assert len({f.kind for f in faults}) == len(faults) == 5
    assert all(day_one_end <= f.start_ms < f.end_ms for f in faults)
    assert all(f.host in HOSTS for f in faults)


def test_faults_change_the_metrics_they_claim_to(generated: Generated) -> None:
    rows, faults = generated

    def series(host: str, name: str, start_ms: int, end_ms: int) -> np.ndarray:
        first = (start_ms - START_MS) // MINUTE_MS
        last = (end_ms - START_MS) // MINUTE_MS
        host_rows = rows[first * len(HOSTS) : last * len(HOSTS)]
        return np.array([float(r[name]) for r in host_rows if r["host"] == host and r[name] not in ("n/a", "inf")])

    by_kind = {f.kind: f for f in faults}
    cpu = by_kind["cpu_saturation"]
    before = series(cpu.host, "cpu_pct", cpu.start_ms - 60 * MINUTE_MS, cpu.start_ms)
    during = series(cpu.host, "cpu_pct", cpu.start_ms, cpu.end_ms)
    assert during.mean() > 90 > before.mean() + 20
    drop = by_kind["traffic_drop"]
    before = series(drop.host, "requests", drop.start_ms - 60 * MINUTE_MS, drop.start_ms)
    during = series(drop.host, "requests", drop.start_ms, drop.end_ms)
    assert during.mean() < 0.1 * before.mean()


def test_generated_csv_decodes_with_the_demo_config_and_reports_the_glitches(
    tmp_path: Path, generated: Generated
) -> None:
    rows, _ = generated
    path = tmp_path / "metrics.csv"
    write_csv(path, rows)
    config = load_config(Path("configs/demo.yaml"))
    name, stream = config.stream(None)
    samples, rejections = read_samples(name, stream, path)
    assert len(samples) == len(rows) - 3
    assert sorted(r.reason for r in rejections) == ["bad_timestamp", "non_finite", "wrong_type"]
    assert all(r.position > DAY_MIN * len(HOSTS) for r in rejections)  # glitches only in scored days


def _alert(host: str, end_ms: int, status: str = "firing") -> Alert:
    return Alert(
        id=f"{host}-{end_ms}-{status}",
        status="firing" if status == "firing" else "resolved",
        stream="hosts",
        entity=host,
        severity="warning",
        window_start_ms=end_ms - WINDOW_MS,
        window_end_ms=end_ms,
        score=2.0,
        threshold=1.0,
        top_features=(("cpu_pct", 1.0),),
        model_version="v",
    )


def test_evaluate_counts_delays_misses_and_false_alarms() -> None:
    faults = [
        Fault("a", "web-01", START_MS + 100 * MINUTE_MS, START_MS + 130 * MINUTE_MS, ""),
        Fault("b", "web-02", START_MS + 500 * MINUTE_MS, START_MS + 520 * MINUTE_MS, ""),
    ]
    alerts = [
        _alert("web-01", START_MS + 104 * MINUTE_MS),  # fault a, 4 minutes in
        _alert("web-01", START_MS + 150 * MINUTE_MS),  # still fault a: its window holds faulty minutes
        _alert("web-01", START_MS + 161 * MINUTE_MS),  # past the window: false
        _alert("web-02", START_MS + 104 * MINUTE_MS),  # wrong host: false
        _alert("web-01", START_MS + 120 * MINUTE_MS, status="resolved"),  # not counted
    ]
    report = evaluate(alerts, faults, WINDOW_MS)
    assert report.detected == {"a": 4, "b": None}
    assert (report.true_alerts, report.false_alerts) == (2, 2)
    assert report.recall == 0.5
    assert report.precision == 0.5
    assert match_fault(alerts[3], faults, WINDOW_MS) is None
