"""The real Prometheus and Alertmanager against `detector run` (issue 7's end-to-end test).

Both run as subprocesses on free loopback ports with configs generated here: Prometheus
scrapes the daemon every second and evaluates the repo's `deploy/prometheus/rules` every
second; the daemon's Alertmanager sink posts to the test Alertmanager (null receiver). One
entity gets a burst of anomalous values, then normal traffic again. The test checks that
Prometheus scrapes every consumed record, that every health rule evaluates without error and
none fires, that the anomaly is an active alert in Alertmanager's API v2, and that the
daemon's resolve (not an expiry) removes it.

The binaries come from PATH (`prometheus`, `alertmanager` or Debian's
`prometheus-alertmanager`) or from `.venv/tools`, where `make deploy-tools` unpacks Debian's
packages; without them the test is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Daemon, Topics, daemon_config
from prometheus_client.parser import text_string_to_metric_families
from streams import ANOMALY_ROWS, encode, http_get, produce, read_topic, records, row_of, wait_for

from detector.broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "detector.rules.yml"
# Where `make deploy-tools` unpacks Debian's prometheus and prometheus-alertmanager packages.
LOCAL_TOOLS = ROOT / ".venv" / "tools" / "root" / "usr" / "bin"
# Debian's Alertmanager reads its built-in notification templates from this file at start (no
# flag moves it) and exits 1 without it; the unpacked copy has it under .venv/tools instead.
DEBIAN_TEMPLATE = Path("/usr/share/prometheus/alertmanager/default.tmpl")
ENTITY = "host-1"  # the one entity with an anomaly
JOB = "detector"
# Long enough that the firing alert's endsAt (now + 4 re-send intervals) lies far beyond the
# test: the alert can only leave Alertmanager's active list through the daemon's resolve.
RESEND_INTERVAL_S = 60.0


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (LOCAL_TOOLS / name if (LOCAL_TOOLS / name).is_file() else None)
        if found is not None and os.access(found, os.X_OK):
            return str(found)
    pytest.skip(
        f"{' / '.join(names)} not found on PATH or in .venv/tools: `make deploy-tools` unpacks Debian's "
        "prometheus and prometheus-alertmanager packages there"
    )


class Server:
    """A Prometheus or Alertmanager subprocess on 127.0.0.1, logging to a file in `workdir`."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str, **params: str) -> Any:
        """The JSON answer of a GET; asserts a 200."""
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        status, body = http_get(self.url + path + query)
        assert status == 200, f"{self.name} GET {path}{query}: {status} {body}"
        return json.loads(body)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"{self.name} exited with {self.process.returncode}:\n{self.log()}"
            try:
                return http_get(self.url + "/-/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout_s, f"{self.name} to become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_alertmanager(executable: str, workdir: Path) -> Server:
    config = {
        "route": {"receiver": "null", "group_by": ["alertname"], "group_wait": "1s", "group_interval": "1s"},
        "receivers": [{"name": "null"}],
    }
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        executable,
        f"--config.file={path}",
        f"--storage.path={workdir / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip port: a single instance
    ]
    return Server("alertmanager", argv, port, workdir)


def start_prometheus(executable: str, workdir: Path, target: str, alertmanager: str) -> Server:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        # The same glob as deploy/prometheus/prometheus.yml: it must not pick up the rule tests.
        "rule_files": [str(RULES.parent / "*.rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        executable,
        f"--config.file={path}",
        f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    return Server("prometheus", argv, port, workdir)


@pytest.fixture
def executables() -> tuple[str, str]:
    """Paths of prometheus and alertmanager (first among the fixtures, so a skip costs nothing)."""
    prometheus, alertmanager = binary("prometheus"), binary("alertmanager", "prometheus-alertmanager")
    if Path(alertmanager).is_relative_to(LOCAL_TOOLS) and not DEBIAN_TEMPLATE.exists():
        pytest.skip(
            f"the Alertmanager `make deploy-tools` unpacked (Debian's) needs {DEBIAN_TEMPLATE}, which only a "
            "system-wide install provides (`apt-get install prometheus-alertmanager`)"
        )
    return prometheus, alertmanager


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[Server], Server]]:
    """Stops every server the test registers and prints its log tail (pytest shows it on failure)."""
    started: list[Server] = []

    def register(server: Server) -> Server:
        started.append(server)
        return server

    yield register
    for server in started:
        server.stop()
        print(f"--- {server.name} log (tail) ---\n{server.log()}")


def traffic(first_row: int, rows: int) -> list[dict[str, Any]]:
    """Every entity's normal records for `rows` rows; ENTITY's rows in ANOMALY_ROWS are a burst."""
    out = records(rows, seed=1, anomalies=False, first_row=first_row)
    for record in out:
        if record["host"] == ENTITY and row_of(record["ts"]) in ANOMALY_ROWS:
            record["cpu"] += 60.0
            record["mem"] -= 30.0
    return out


def value(prometheus: Server, expr: str) -> float | None:
    """The value of a one-series instant query, or None when it has no series."""
    result = prometheus.get("/api/v1/query", query=expr)["data"]["result"]
    assert len(result) <= 1, f"{expr} gave {len(result)} series: {result}"
    return float(result[0]["value"][1]) if result else None


def anomaly_alerts(alertmanager: Server) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = alertmanager.get("/api/v2/alerts", filter='alertname="AnomalyDetected"')
    return alerts


def am_metric(alertmanager: Server, name: str, **labels: str) -> float:
    """A sample of Alertmanager's own /metrics (0 when absent)."""
    status, text = http_get(alertmanager.url + "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_prometheus_scrapes_and_alertmanager_shows_the_anomaly_then_its_resolve(
    executables: tuple[str, str],
    kafka: str,
    checkpoint: Path,
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    servers: Callable[[Server], Server],
) -> None:
    prometheus_executable, alertmanager_executable = executables
    alertmanager = servers(start_alertmanager(alertmanager_executable, tmp_path))
    topics = Topics(kafka)
    config = daemon_config(
        kafka,
        topics,
        checkpoint,
        tmp_path,
        sinks={
            "alertmanager": [
                {
                    "url": alertmanager.url,
                    "labels": {"team": "e2e"},
                    "resend_interval_s": RESEND_INTERVAL_S,
                    "retry": {"initial_backoff_s": 0.05},
                }
            ]
        },
    )
    target = f"127.0.0.1:{config['server']['port']}"
    prometheus = servers(
        start_prometheus(prometheus_executable, tmp_path, target, alertmanager.url.removeprefix("http://"))
    )

    # Normal traffic up to and through the anomaly; the rest comes once the alert is seen.
    before = traffic(0, ANOMALY_ROWS.stop)
    after = traffic(ANOMALY_ROWS.stop, 88)
    produce(kafka, topics.metrics, encode(before))
    daemon = start_daemon(config)
    alertmanager.wait_ready()
    prometheus.wait_ready()
    daemon.wait_ready()

    # (1) Prometheus scrapes the daemon, and what it scraped matches what was produced.
    up = f'up{{job="{JOB}",instance="{target}"}}'
    consumed = f'sum(detector_records_consumed_total{{job="{JOB}",stream="hosts",phase="live"}})'
    wait_for(lambda: value(prometheus, up) == 1, 30, "Prometheus to scrape the daemon")
    wait_for(lambda: value(prometheus, consumed) == len(before), 60, f"Prometheus to see {len(before)} records")

    # (2) The anomaly is an active alert in Alertmanager, with the labels the sink sets.
    wait_for(lambda: anomaly_alerts(alertmanager), 60, "the anomaly alert in Alertmanager")
    (alert,) = anomaly_alerts(alertmanager)
    assert alert["labels"] == {
        "alertname": "AnomalyDetected",
        "stream": "hosts",
        "entity": ENTITY,
        "severity": "warning",
        "team": "e2e",
    }
    assert alert["status"]["state"] == "active"
    assert row_of(alert["annotations"]["window_end"]) in ANOMALY_ROWS
    firing = json.loads(read_topic(kafka, topics.alerts, expect=1)[0].value)
    assert (firing["status"], firing["entity"]) == ("firing", ENTITY)
    assert alert["annotations"]["alert_id"] == firing["id"]
    expires = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00"))
    assert (expires - datetime.now(UTC)).total_seconds() > RESEND_INTERVAL_S

    # (3) Normal traffic again: the daemon resolves the alert, and Alertmanager drops it from
    # its active alerts long before it could have expired.
    produce(kafka, topics.metrics, encode(after))
    wait_for(lambda: not anomaly_alerts(alertmanager), 60, "the alert to resolve in Alertmanager")
    assert datetime.now(UTC) < expires
    assert am_metric(alertmanager, "alertmanager_alerts_received_total", status="resolved", version="v2") >= 1
    assert am_metric(alertmanager, "alertmanager_alerts_invalid_total", version="v2") == 0

    total = len(before) + len(after)
    wait_for(lambda: value(prometheus, consumed) == total, 60, f"Prometheus to see {total} records")
    alerts_by_status = f'sum by (status) (detector_alerts_total{{job="{JOB}",stream="hosts"}})'

    def alert_events() -> dict[str, float]:
        result = prometheus.get("/api/v1/query", query=alerts_by_status)["data"]["result"]
        return {r["metric"]["status"]: float(r["value"][1]) for r in result}

    wait_for(lambda: alert_events() == {"firing": 1.0, "resolved": 1.0}, 30, "one firing and one resolved event")

    # The repo's health rules are loaded, evaluate without error on the real series, and none
    # fires on a healthy daemon; Prometheus found the Alertmanager to send them to.
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule_names = [r.get("alert") or r["record"] for g in groups for r in g["rules"]]

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    wait_for(rules_evaluated, 20, "Prometheus to evaluate the rules")
    rules = rules_evaluated() or []
    assert sorted(r["name"] for r in rules) == sorted(rule_names)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    assert [r["name"] for r in rules if r.get("state") == "firing"] == []
    managers = prometheus.get("/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
    assert [m["url"] for m in managers] == [alertmanager.url + "/api/v2/alerts"]

    assert daemon.stop() == 0
    # The daemon's own record agrees: one firing and one resolve, of ENTITY only.
    events = [json.loads(m.value) for m in read_topic(kafka, topics.alerts, expect=2)]
    assert [(e["status"], e["entity"]) for e in events] == [("firing", ENTITY), ("resolved", ENTITY)]
