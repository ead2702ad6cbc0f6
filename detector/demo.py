"""`detector demo`: two generated streams with labeled incidents, live through Kafka.

Three days of data, the first without incidents:

- `hosts`: per-minute metrics of eight web hosts (daily traffic seasonality, CPU and latency
  that follow load, a garbage-collector sawtooth in memory, Poisson errors), with five faults
  SREs page on;
- `payments`: card payments enriched upstream with velocity and distance, with six fraud
  incidents of three kinds.

The demo trains a model per stream on day 1, starts a local Kafka-protocol broker, runs the
real daemon (`detector run`, a subprocess) on configs/demo.yaml, produces the data at an
accelerated clock, prints alerts from the alerts topic as they fire, and ends with what was
caught, what was missed and what was a false alarm. `--offline` replays the same data
through `detector replay` instead, with no broker.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.config import Config, FileInput, KafkaInput, Stream, load_config
from detector.errors import DetectorError
from detector.model import save_checkpoint
from detector.replay import Summary, TrainSplit, read_samples, replay_file
from detector.source import format_timestamp, parse_timestamp
from detector.train import fit

MINUTE_MS = 60_000
DAY_MIN = 24 * 60
DAYS = 3
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TRAIN_UNTIL_MS = START_MS + DAY_MIN * MINUTE_MS
HOSTS = [f"web-{i:02d}" for i in range(1, 9)]
HOST_FEATURES = ["requests", "cpu_pct", "mem_pct", "latency_ms", "errors"]
CARDS = [f"card-{i:04d}" for i in range(1, 241)]
PAYMENT_FEATURES = ["amount", "minutes_since_last", "distance_km", "merchant_risk"]


@dataclass(frozen=True)
class Incident:
    stream: str
    kind: str
    entity: str
    start_ms: int
    end_ms: int
    description: str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.entity}"


@dataclass
class Dataset:
    """One stream's generated records in time order, as the producer would send them."""

    stream: str
    entity_field: str
    features: list[str]
    rows: list[dict[str, Any]]
    incidents: list[Incident]


@dataclass
class Report:
    detected: dict[str, int | None]  # incident label -> minutes from start to first alert, None if missed
    true_alerts: int = 0
    false_alerts: int = 0
    false_by_stream: Counter[str] = field(default_factory=Counter)

    @property
    def recall(self) -> float:
        return sum(d is not None for d in self.detected.values()) / max(1, len(self.detected))

    @property
    def precision(self) -> float:
        return self.true_alerts / max(1, self.true_alerts + self.false_alerts)


# --- hosts ---------------------------------------------------------------------------------

# (kind, host, day, minute of day, duration in minutes, description)
_HOST_FAULTS = [
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


def generate_hosts(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    n = DAYS * DAY_MIN
    minutes = np.arange(n)
    hour = (minutes / 60.0) % 24.0
    diurnal = 1.0 + 0.6 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)  # peak at 15:00, trough at 03:00
    incidents = []
    for kind, host, day, at, duration, text in _HOST_FAULTS:
        start = START_MS + (day * DAY_MIN + at) * MINUTE_MS
        incidents.append(Incident("hosts", kind, host, start, start + duration * MINUTE_MS, text))
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
        for f in incidents:
            if f.entity != host:
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
    rows: list[dict[str, Any]] = []
    for i in range(n):
        stamp = format_timestamp(START_MS + i * MINUTE_MS)
        for host in HOSTS:
            row: dict[str, Any] = {"ts": stamp, "host": host}
            row.update({name: round(float(columns[host][name][i]), 2) for name in HOST_FEATURES})
            rows.append(row)
    # An exporter glitch or two: these must be counted and reported (dead-lettered), not crash anything.
    glitch = rng.choice(np.arange(DAY_MIN * len(HOSTS), len(rows)), size=3, replace=False)
    rows[glitch[0]]["cpu_pct"] = "n/a"
    rows[glitch[1]]["ts"] = "yesterday"
    del rows[glitch[2]]["latency_ms"]
    return Dataset("hosts", "host", HOST_FEATURES, rows, incidents)


# --- payments ------------------------------------------------------------------------------

# (kind, card index, day, minute of day, description)
_FRAUD = [
    ("card_testing", 17, 1, 2 * 60 + 40, "a dozen tiny online charges in six minutes, risky merchants"),
    ("account_takeover", 58, 1, 10 * 60 + 5, "five purchases of $700-2500 from far away, minutes apart"),
    ("skimmed_card", 103, 1, 16 * 60 + 30, "ordinary amounts, but 6000+ km from home for two hours"),
    ("card_testing", 141, 2, 4 * 60 + 15, "a dozen tiny online charges in six minutes, risky merchants"),
    ("account_takeover", 187, 2, 12 * 60 + 50, "five purchases of $700-2500 from far away, minutes apart"),
    ("skimmed_card", 222, 2, 20 * 60 + 10, "ordinary amounts, but 6000+ km from home for two hours"),
]


def generate_payments(seed: int) -> Dataset:
    rng = np.random.default_rng(seed + 1)
    payments: list[tuple[int, str, float, float, float]] = []  # (ms, card, amount, distance, risk)
    for card in CARDS:
        typical = float(np.exp(rng.uniform(np.log(12.0), np.log(90.0))))
        count = int(rng.poisson(rng.uniform(10.0, 24.0) * DAYS))
        days = rng.integers(0, DAYS, count)
        hours = np.clip(rng.normal(14.0, 4.0, count), 0.0, 23.99)
        stamps = START_MS + ((days * 24 + hours) * 3_600_000).astype(np.int64)
        amounts = typical * rng.lognormal(0.0, 0.5, count)
        distances = rng.exponential(4.0, count)
        travel = rng.random(count) < 0.02
        distances[travel] = rng.uniform(50.0, 400.0, int(travel.sum()))
        risks = rng.beta(2.0, 12.0, count)
        for i in range(count):
            payments.append((int(stamps[i]), card, float(amounts[i]), float(distances[i]), float(risks[i])))
    incidents = []
    for kind, index, day, at, text in _FRAUD:
        card = CARDS[index]
        start = START_MS + (day * DAY_MIN + at) * MINUTE_MS
        if kind == "card_testing":
            times = start + np.sort(rng.uniform(0, 6, 12)) * MINUTE_MS
            fraud = [(t, rng.uniform(0.5, 3.0), rng.uniform(800, 9000), rng.uniform(0.7, 0.95)) for t in times]
        elif kind == "account_takeover":
            times = start + np.cumsum(rng.uniform(2, 8, 5)) * MINUTE_MS
            fraud = [(t, rng.uniform(700, 2500), rng.uniform(1000, 6000), rng.uniform(0.4, 0.8)) for t in times]
        else:
            times = start + np.sort(rng.uniform(0, 120, 6)) * MINUTE_MS
            fraud = [(t, rng.uniform(10, 90), rng.uniform(6000, 9000), rng.uniform(0.3, 0.6)) for t in times]
        payments.extend((int(t), card, float(a), float(d), float(r)) for t, a, d, r in fraud)
        incidents.append(Incident("payments", kind, card, int(times[0]), int(times[-1]) + MINUTE_MS, text))
    payments.sort()
    last_seen: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for ms, card, amount, distance, risk in payments:
        gap = (ms - last_seen[card]) / MINUTE_MS if card in last_seen else 24 * 60.0
        last_seen[card] = ms
        rows.append(
            {
                "ts": format_timestamp(ms),
                "card": card,
                "amount": round(amount, 2),
                "minutes_since_last": round(min(gap, 3 * DAY_MIN), 1),
                "distance_km": round(distance, 1),
                "merchant_risk": round(risk, 3),
            }
        )
    return Dataset("payments", "card", PAYMENT_FEATURES, rows, incidents)


def generate(seed: int) -> list[Dataset]:
    return [generate_hosts(seed), generate_payments(seed)]


def write_csv(path: Path, data: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ts", data.entity_field, *data.features], restval="")
        writer.writeheader()
        writer.writerows(data.rows)


# --- scoring the alerts against the labels -------------------------------------------------


def match_incident(alert: dict[str, Any], incidents: list[Incident]) -> Incident | None:
    """The incident an alert belongs to: same stream and entity, and its window overlaps the
    incident (the window that fired held incident data)."""
    start, end = _ms(alert["window_start"]), _ms(alert["window_end"])
    for f in incidents:
        if f.stream == alert["stream"] and f.entity == alert["entity"] and start <= f.end_ms and end >= f.start_ms:
            return f
    return None


def evaluate(alerts: list[dict[str, Any]], incidents: list[Incident]) -> Report:
    report = Report({f.label: None for f in incidents})
    for a in alerts:
        if a["status"] != "firing":
            continue
        f = match_incident(a, incidents)
        if f is None:
            report.false_alerts += 1
            report.false_by_stream[a["stream"]] += 1
            continue
        report.true_alerts += 1
        if report.detected[f.label] is None:
            report.detected[f.label] = max(0, (_ms(a["window_end"]) - f.start_ms) // MINUTE_MS)
    return report


def _ms(stamp: str) -> int:
    ms = parse_timestamp(stamp)
    if ms is None:
        raise ValueError(f"alert timestamp {stamp!r} does not parse")
    return ms


def alert_line(alert: dict[str, Any], incidents: list[Incident]) -> str:
    f = match_incident(alert, incidents)
    if alert["status"] == "firing":
        event = f"firing {alert['severity']}"
        verdict = f"<- {f.label}" if f is not None else "<- FALSE ALARM"
    else:
        event, verdict = "resolved", ""
    ratio = alert["score"] / alert["threshold"] if alert["threshold"] > 0 else float("inf")
    top = ", ".join(t["name"] for t in alert["top_features"])
    when = alert["window_end"][:16]
    return f"{when:<17} {alert['stream']:<9} {alert['entity']:<10} {event:<17} {ratio:>5.1f}x  {top:<32} {verdict}"


def print_report(alerts: list[dict[str, Any]], incidents: list[Incident]) -> Report:
    report = evaluate(alerts, incidents)
    print(f"\n{'incident':<28} {'stream':<9} detected after")
    for f in incidents:
        delay = report.detected[f.label]
        print(f"{f.label:<28} {f.stream:<9} {'MISSED' if delay is None else f'{delay} min'}")
    found = sum(d is not None for d in report.detected.values())
    fired = report.true_alerts + report.false_alerts
    false_alarms = ", ".join(f"{n} {s}" for s, n in sorted(report.false_by_stream.items())) or "none"
    print(f"\nrecall {report.recall:.0%} ({found} of {len(incidents)} incidents), ", end="")
    print(f"precision {report.precision:.0%} ({report.true_alerts} of {fired} firing alerts; ", end="")
    print(f"false alarms: {false_alarms})")
    return report


# --- running it ----------------------------------------------------------------------------


def prepare(workdir: Path, seed: int) -> list[Dataset]:
    datasets = generate(seed)
    for data in datasets:
        write_csv(workdir / f"{data.stream}.csv", data)
    incidents = [asdict(f) for d in datasets for f in d.incidents]
    (workdir / "incidents.json").write_text(json.dumps(incidents, indent=2) + "\n")
    print(f"generated 3 days of data in {workdir}/ (day 1 is clean, days 2-3 hold the incidents):")
    for data in datasets:
        entities = len({r[data.entity_field] for r in data.rows})
        print(f"  {data.stream}: {len(data.rows)} records from {entities} entities, {len(data.incidents)} incidents")
        for f in data.incidents:
            print(f"    {format_timestamp(f.start_ms)[:16]}  {f.label:<26} {f.description}")
    return datasets


def train_models(config: Config, workdir: Path, datasets: list[Dataset]) -> None:
    for data in datasets:
        stream = config.streams[data.stream]
        assert stream.checkpoint is not None
        samples, _ = read_samples(data.stream, stream, workdir / f"{data.stream}.csv")
        day_one = samples.take(TrainSplit(until_ms=TRAIN_UNTIL_MS).mask(samples))
        print(f"training {data.stream} ({stream.model.cell.upper()} autoencoder) on {len(day_one)} day-1 records")
        ckpt = fit(data.stream, stream, day_one, progress=sys.stderr.isatty())
        save_checkpoint(stream.checkpoint, ckpt)
        info = ckpt.training
        print(f"  {info['epochs']} epochs, validation loss {info['best_validation_loss']:.3g} -> {stream.checkpoint}")


def run_offline(config: Config, workdir: Path, datasets: list[Dataset]) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    incidents = [f for d in datasets for f in d.incidents]
    for data in datasets:
        stream = _as_file(config.streams[data.stream], workdir / f"{data.stream}.csv")
        summary, fired = replay_file(
            config.model_copy(update={"streams": {data.stream: stream}}),
            data.stream,
            None,
            workdir / f"{data.stream}-scores.csv",
            alerts_path=workdir / f"{data.stream}-alerts.jsonl",
            split=TrainSplit(until_ms=TRAIN_UNTIL_MS),
            progress=sys.stderr.isatty(),
        )
        _print_summary(data.stream, summary)
        alerts.extend(a.to_dict() for a in fired)
    alerts.sort(key=lambda a: a["window_end"])
    print(f"\n{'event time':<17} {'stream':<9} {'entity':<10} {'event':<17} {'score':>6}  top features")
    for a in alerts:
        print(alert_line(a, incidents))
    return alerts


def _as_file(stream: Stream, path: Path) -> Stream:
    return stream.model_copy(update={"input": FileInput(kind="file", path=path, format="csv")})


def _print_summary(name: str, summary: Summary) -> None:
    for line in summary.lines():
        print(f"  {name}: {line}")


def run_live(
    config_path: Path, config: Config, workdir: Path, datasets: list[Dataset], speed: float
) -> list[dict[str, Any]]:
    """Broker, daemon subprocess, paced producer, alert printer; returns the alerts seen."""
    from kafka import KafkaProducer

    # The producer warns when a burst of sends holds its event loop a moment; not news here.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    from detector.broker import LocalBroker, create_topics, free_port

    incidents = [f for d in datasets for f in d.incidents]
    topics = {d.stream: _topic(config.streams[d.stream]) for d in datasets}
    alerts_topic = config.sinks.kafka.topic if config.sinks.kafka else None
    if alerts_topic is None:
        raise DetectorError("the demo config needs sinks.kafka: the demo prints alerts from that topic")
    port = free_port()
    with LocalBroker(log_path=str(workdir / "broker.log")) as broker:
        print(f"\nlocal Kafka-protocol broker (Tansu) on {broker.bootstrap}")
        create_topics(broker.bootstrap, topics.values(), partitions=2)
        create_topics(broker.bootstrap, [alerts_topic, config.kafka.dead_letter_topic or "demo.dead-letters"])
        env = dict(os.environ, DETECTOR_BOOTSTRAP=broker.bootstrap, DETECTOR_METRICS_PORT=str(port))
        env["DETECTOR_DEMO_DIR"] = str(workdir.resolve())
        log_path = workdir / "daemon.log"
        with log_path.open("wb") as daemon_log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "detector", "run", "--config", str(config_path)],
                env=env,
                stdout=daemon_log,
                stderr=subprocess.STDOUT,
            )
        try:
            print(f"started `detector run --config {config_path}` (pid {daemon.pid}, log {log_path})")
            _wait_ready(port, daemon, log_path)
            print(f"ready; metrics at http://127.0.0.1:{port}/metrics, health at /-/healthy and /-/ready")
            printer = _AlertPrinter(broker.bootstrap, alerts_topic, incidents)
            printer.start()
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
            end_offsets = _produce(producer, datasets, topics, speed)
            producer.close()
            _wait_drained(broker.bootstrap, config.kafka.group_id, end_offsets, daemon)
            time.sleep(1.0)  # the last batch's alerts are on the topic before the commit; let the printer see them
            printer.stop()
            _print_metrics(port)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=config.service.grace_period_s + 5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
        print(f"daemon stopped on SIGTERM with exit code {code}")
    with (workdir / "alerts.jsonl").open("w") as f:
        f.writelines(json.dumps(a) + "\n" for a in printer.alerts)
    return printer.alerts


def _topic(stream: Stream) -> str:
    if not isinstance(stream.input, KafkaInput):
        raise DetectorError("the demo streams must read from Kafka (input.kind: kafka)")
    return stream.input.topic


def _wait_ready(port: int, daemon: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise DetectorError("the daemon exited while starting:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise DetectorError(f"the daemon was not ready within {timeout_s:.0f} s; see {log_path}")


def _timeline(datasets: list[Dataset]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    merged = [(_ms_or(r["ts"]), d.stream, r) for d in datasets for r in d.rows]
    merged.sort(key=lambda item: item[0])
    yield from merged


def _ms_or(stamp: str) -> int:
    # A glitched row ("yesterday") goes out where it stood; it only needs some place in time.
    return parse_timestamp(stamp) or 0


# Messages that are not even records, sent once the clock passes their hour of day 2-3.
_GARBAGE = [(6, b"\x00\xff\xfe not json at all"), (18, b'{"host": "web-04", "ts": '), (30, b"[1, 2, 3]")]


def _produce(producer: Any, datasets: list[Dataset], topics: dict[str, str], speed: float) -> dict[Any, int]:
    """Send every record in event-time order: day 1 at full speed (it only fills the windows),
    then `speed` simulated hours per wall-clock second. Returns the end offset per partition."""
    fields = {d.stream: d.entity_field for d in datasets}
    futures = []
    t0 = time.monotonic()
    garbage = [(TRAIN_UNTIL_MS + hour * 3_600_000, payload) for hour, payload in _GARBAGE]
    sent = 0
    for ms, stream, row in _timeline(datasets):
        if ms > TRAIN_UNTIL_MS:
            due = t0 + (ms - TRAIN_UNTIL_MS) / 3_600_000 / speed
            delay = due - time.monotonic()
            if delay > 0.05:
                producer.flush()
                time.sleep(delay)
            if garbage and ms >= garbage[0][0]:
                futures.append(producer.send(topics["hosts"], value=garbage.pop(0)[1]))
        else:
            t0 = time.monotonic()
        key = str(row.get(fields[stream], "")).encode()
        value = json.dumps(row).encode()
        futures.append(producer.send(topics[stream], key=key, value=value))
        sent += 1
    producer.flush()
    ends: dict[Any, int] = {}
    for fut in futures:
        meta = fut.get(timeout=30)
        tp = (meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    print(f"\nproduced {sent} records and {len(_GARBAGE)} garbage messages", flush=True)
    return ends


def _wait_drained(bootstrap: str, group: str, ends: dict[Any, int], daemon: subprocess.Popen[bytes]) -> None:
    """Until the daemon's committed offsets reach the end of every partition."""
    from kafka import KafkaConsumer, TopicPartition

    # A consumer with the group id that never subscribes reads the group's commits without joining it.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and daemon.poll() is None:
            if all((consumer.committed(TopicPartition(*tp)) or 0) >= end for tp, end in ends.items()):
                print("the daemon has committed every record")
                return
            time.sleep(0.5)
        print("the daemon did not commit every record in time; see daemon.log", file=sys.stderr)
    finally:
        consumer.close()


class _AlertPrinter:
    """Reads the alerts topic from the start and prints each event as it arrives."""

    def __init__(self, bootstrap: str, topic: str, incidents: list[Incident]) -> None:
        self.bootstrap, self.topic, self.incidents = bootstrap, topic, incidents
        self.alerts: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-printer", daemon=True)

    def start(self) -> None:
        print(f"\nalerts as they arrive on topic {self.topic}:")
        print(f"{'event time':<17} {'stream':<9} {'entity':<10} {'event':<17} {'score':>6}  top features")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
        )
        try:
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=100).values():
                    for record in records:
                        alert = json.loads(record.value)
                        self.alerts.append(alert)
                        print(alert_line(alert, self.incidents), flush=True)
        finally:
            consumer.close()


def _print_metrics(port: int) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "detector_records_consumed_total" and labels.get("phase") == "live":
                totals[f"records consumed ({labels['stream']})"] += int(sample.value)
            elif sample.name == "detector_windows_scored_total":
                totals[f"windows scored ({labels['stream']})"] += int(sample.value)
            elif sample.name == "detector_dead_letters_total":
                totals[f"dead letters ({labels['reason']})"] += int(sample.value)
            elif sample.name == "detector_alerts_total" and labels.get("status") == "firing":
                totals[f"alerts firing ({labels['stream']}, {labels['severity']})"] += int(sample.value)
    print(f"\nfrom http://127.0.0.1:{port}/metrics:")
    for name, value in sorted(totals.items()):
        print(f"  {name}: {value}")


def run_demo(workdir: Path, seed: int, config_path: Path, offline: bool = False, speed: float = 2.0) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    # The config names checkpoints under ${DETECTOR_DEMO_DIR}; point it at this run's workdir.
    os.environ["DETECTOR_DEMO_DIR"] = str(workdir.resolve())
    config = load_config(config_path)
    datasets = prepare(workdir, seed)
    incidents = [f for d in datasets for f in d.incidents]
    if offline:
        print("\nreplaying days 2-3 through `detector replay` (training on day 1 first)")
        alerts = run_offline(config, workdir, datasets)
    else:
        train_models(config, workdir, datasets)
        alerts = run_live(config_path, config, workdir, datasets, speed)
    print_report(alerts, incidents)
    print(f"outputs in {workdir}/")
    return 0
