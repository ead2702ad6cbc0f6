"""`detector demo`: a fleet of web hosts with injected faults, trained on and replayed end to end.

The generator writes three days of per-minute metrics for eight hosts: daily traffic
seasonality, CPU and latency that follow load, a garbage-collector sawtooth in memory,
Poisson errors. The second and third days carry five labeled faults of the kinds SREs page
on. The demo trains on the first (fault-free) day, replays the rest through the same
pipeline the daemon runs, and scores the alerts against the labels.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from detector.alerts import Alert
from detector.config import load_config
from detector.replay import TrainSplit, replay_file
from detector.source import format_timestamp

MINUTE_MS = 60_000
DAY_MIN = 24 * 60
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOSTS = [f"web-{i:02d}" for i in range(1, 9)]
FEATURES = ["requests", "cpu_pct", "mem_pct", "latency_ms", "errors"]


@dataclass(frozen=True)
class Fault:
    kind: str
    host: str
    start_ms: int
    end_ms: int
    description: str


@dataclass
class Report:
    detected: dict[str, int | None]  # fault kind -> first alert delay in minutes, None if missed
    true_alerts: int
    false_alerts: int

    @property
    def recall(self) -> float:
        return sum(d is not None for d in self.detected.values()) / max(1, len(self.detected))

    @property
    def precision(self) -> float:
        return self.true_alerts / max(1, self.true_alerts + self.false_alerts)


# (kind, host, day, minute of day, duration in minutes, description)
_FAULTS = [
    ("cpu_saturation", "web-03", 1, 3 * 60 + 10, 45, "a runaway process pins the CPU; latency triples"),
    ("memory_leak", "web-05", 1, 11 * 60 + 30, 240, "memory climbs 40 points over four hours, then a restart"),
    ("error_burst", "web-01", 1, 19 * 60 + 45, 25, "a bad deploy: errors jump twenty-fold, latency doubles"),
    ("latency_jitter", "web-07", 2, 8 * 60 + 20, 60, "a noisy neighbour: p99 latency swings wildly"),
    ("traffic_drop", "web-02", 2, 14 * 60 + 5, 30, "the load balancer drains the host: traffic and CPU fall"),
]


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """Autocorrelated noise: real load wanders rather than jumping independently each minute."""
    shocks = rng.normal(0.0, sigma, n)
    out = np.empty(n)
    level = 0.0
    for i in range(n):
        level = phi * level + shocks[i]
        out[i] = level
    return out


def generate(seed: int, days: int = 3) -> tuple[list[dict[str, str]], list[Fault]]:
    """Rows in time order (all hosts interleaved, as an exporter would send them) and the faults."""
    rng = np.random.default_rng(seed)
    n = days * DAY_MIN
    minutes = np.arange(n)
    hour = (minutes / 60.0) % 24.0
    diurnal = 1.0 + 0.6 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)  # peak at 15:00, trough at 03:00
    faults = []
    for kind, host, day, at, duration, text in _FAULTS:
        start = START_MS + (day * DAY_MIN + at) * MINUTE_MS
        faults.append(Fault(kind, host, start, start + duration * MINUTE_MS, text))
    columns: dict[str, dict[str, np.ndarray]] = {}
    for h, host in enumerate(HOSTS):
        base = 200.0 + 80.0 * h
        load = diurnal * (1.0 + _ar1(rng, n, 0.95, 0.015))
        requests = base * load
        cpu = 6.0 + 38.0 * load + rng.normal(0.0, 1.2, n)
        period = 25 + 3 * h  # minutes between garbage collections
        mem = 42.0 + 2.0 * h + 9.0 * ((minutes + 7 * h) % period) / period + rng.normal(0.0, 0.4, n)
        latency = 55.0 + 30.0 * (cpu / 60.0) ** 3 + rng.gamma(2.0, 3.0, n)
        errors = rng.poisson(requests * 0.002).astype(float)
        for f in faults:
            if f.host != host:
                continue
            a = (f.start_ms - START_MS) // MINUTE_MS
            b = (f.end_ms - START_MS) // MINUTE_MS
            span = slice(a, b)
            if f.kind == "cpu_saturation":
                cpu[span] = 96.0 + rng.normal(0.0, 1.0, b - a)
                latency[span] *= 3.5
                errors[span] += rng.poisson(requests[span] * 0.01)
            elif f.kind == "memory_leak":
                mem[span] += np.linspace(0.0, 40.0, b - a)
            elif f.kind == "error_burst":
                errors[span] += rng.poisson(requests[span] * 0.04)
                latency[span] *= 1.8
            elif f.kind == "latency_jitter":
                latency[span] += rng.gamma(1.0, 60.0, b - a)
            elif f.kind == "traffic_drop":
                requests[span] *= 0.05
                cpu[span] = 6.0 + rng.normal(0.0, 1.0, b - a)
                errors[span] = rng.poisson(requests[span] * 0.002)
        columns[host] = {
            "requests": requests,
            "cpu_pct": np.clip(cpu, 0.0, 100.0),
            "mem_pct": np.clip(mem, 0.0, 100.0),
            "latency_ms": latency,
            "errors": errors,
        }
    rows: list[dict[str, str]] = []
    for i in range(n):
        stamp = format_timestamp(START_MS + i * MINUTE_MS)
        for host in HOSTS:
            row = {"timestamp": stamp, "host": host}
            row.update({name: f"{columns[host][name][i]:.2f}" for name in FEATURES})
            rows.append(row)
    # An exporter glitch or two: the replay must count and report these rows, not crash.
    glitch = rng.choice(np.arange(DAY_MIN * len(HOSTS), len(rows)), size=3, replace=False)
    rows[glitch[0]]["cpu_pct"] = "n/a"
    rows[glitch[1]]["timestamp"] = "yesterday"
    rows[glitch[2]]["latency_ms"] = "inf"
    return rows, faults


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["timestamp", "host", *FEATURES])
        writer.writeheader()
        writer.writerows(rows)


def match_fault(alert: Alert, faults: list[Fault], window_ms: int) -> Fault | None:
    """The fault an alert belongs to: same host, window ending during the fault or while its
    windows still contain faulty minutes."""
    for f in faults:
        if f.host == alert.entity and f.start_ms < alert.window_end_ms <= f.end_ms + window_ms:
            return f
    return None


def evaluate(alerts: list[Alert], faults: list[Fault], window_ms: int) -> Report:
    detected: dict[str, int | None] = {f.kind: None for f in faults}
    true_alerts = false_alerts = 0
    for a in alerts:
        if a.status != "firing":
            continue
        f = match_fault(a, faults, window_ms)
        if f is None:
            false_alerts += 1
            continue
        true_alerts += 1
        delay = (a.window_end_ms - f.start_ms) // MINUTE_MS
        if detected[f.kind] is None:
            detected[f.kind] = int(delay)
    return Report(detected, true_alerts, false_alerts)


def print_alerts(alerts: list[Alert], faults: list[Fault], window_ms: int) -> None:
    print(f"\n{'time (UTC)':<20} {'host':<7} {'event':<17} {'score/thr':>9}  top features          verdict")
    for a in alerts:
        f = match_fault(a, faults, window_ms)
        event = f"{a.status} {a.severity}" if a.status == "firing" else "resolved"
        ratio = a.score / a.threshold if a.threshold > 0 else float("inf")
        top = ", ".join(name for name, _ in a.top_features)
        verdict = "" if a.status != "firing" else (f.kind if f is not None else "FALSE ALARM")
        print(
            f"{format_timestamp(a.window_end_ms)[:16]:<20} {a.entity:<7} {event:<17} {ratio:>9.1f}  {top:<21} {verdict}"
        )


def run_demo(workdir: Path, seed: int, config_path: Path) -> int:
    config = load_config(config_path)
    name, stream = config.stream(None)
    rows, faults = generate(seed)
    data = workdir / "metrics.csv"
    write_csv(data, rows)
    (workdir / "faults.json").write_text(json.dumps([asdict(f) for f in faults], indent=2) + "\n")
    print(f"generated {len(rows)} rows for {len(HOSTS)} hosts over 3 days: {data}")
    for f in faults:
        print(f"  fault {f.kind:<15} {f.host}  {format_timestamp(f.start_ms)[:16]}  {f.description}")
    print("training on day 1 (no faults), then replaying days 2 and 3 through the daemon's pipeline")

    summary, alerts = replay_file(
        config,
        name,
        data,
        workdir / "scores.csv",
        alerts_path=workdir / "alerts.jsonl",
        split=TrainSplit(until_ms=START_MS + DAY_MIN * MINUTE_MS),
        save_to=workdir / "model.pt",
        progress=sys.stderr.isatty(),
    )
    window_ms = stream.window.size * MINUTE_MS
    print_alerts(alerts, faults, window_ms)
    report = evaluate(alerts, faults, window_ms)
    print()
    for line in summary.lines():
        print(line)
    print("\nfault             host    detected after")
    for f in faults:
        delay = report.detected[f.kind]
        print(f"{f.kind:<17} {f.host}  {'MISSED' if delay is None else f'{delay} min'}")
    found = sum(d is not None for d in report.detected.values())
    fired = report.true_alerts + report.false_alerts
    print(f"\nrecall {report.recall:.0%} ({found} of {len(faults)} faults), ", end="")
    print(f"precision {report.precision:.0%} ({report.true_alerts} of {fired} firing alerts)")
    print(f"outputs in {workdir}/: metrics.csv, faults.json, scores.csv, alerts.jsonl, model.pt")
    return 0
