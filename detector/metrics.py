"""Every Prometheus metric of `detector run`, on one injected registry, and its HTTP endpoints.

`Metrics(registry)` creates the metrics; tests build a fresh `CollectorRegistry` and read
values back with `registry.get_sample_value(...)`. Label values come only from bounded sets:
stream names, severities, rejection reasons, sink kinds, topics and partition numbers;
never entity ids.

`HealthServer` serves, from a background thread:
- `GET /metrics`: the registry in the Prometheus text format;
- `GET /-/healthy`: 200 while the daemon's loop runs;
- `GET /-/ready`: 200 once the models are loaded and the group gave this member its share (maybe none), else 503;
- `POST /-/reload`: asks the daemon to reload thresholds and alert policy, and to switch to a
  newly promoted model version; 200 when the new config was applied, 500 (with the reason)
  when it was rejected and the old one kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

# Reconstruction errors span orders of magnitude between models: log-spaced buckets.
SCORE_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
# A micro-batch takes milliseconds: finer steps there, or a p99 between 10 and 25 ms reads as
# anything in that range on a dashboard.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
END_TO_END_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
RETRAIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """The daemon's metrics. Thread safe (prometheus_client metrics are)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.records_consumed = Counter(
            "detector_records_consumed_total",
            "Records read from Kafka (including refill).",
            ["stream", "phase"],
            registry=r,
        )
        self.messages_dropped = Counter(
            "detector_messages_dropped_total",
            "Records not scored because they could not be decoded or validated.",
            ["stream", "reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "detector_dead_letters_total", "Records written to the dead-letter topic.", ["stream", "reason"], registry=r
        )
        self.windows_scored = Counter(
            "detector_windows_scored_total", "Windows scored by the model.", ["stream", "phase"], registry=r
        )
        self.anomalies = Counter(
            "detector_anomalous_windows_total", "Scored windows above a threshold.", ["stream", "severity"], registry=r
        )
        self.alerts = Counter(
            "detector_alerts_total", "Alert events handed to the sinks.", ["stream", "severity", "status"], registry=r
        )
        self.score = Histogram(
            "detector_score", "Anomaly scores (reconstruction error).", ["stream"], buckets=SCORE_BUCKETS, registry=r
        )
        self.batch_records = Histogram(
            "detector_batch_records", "Records per micro-batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.scoring_seconds = Histogram(
            "detector_scoring_duration_seconds",
            "Time to window and score one stream's part of a micro-batch.",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "detector_batch_duration_seconds",
            "Time to process a micro-batch: decode, score, emit, commit.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "detector_end_to_end_latency_seconds",
            "From the Kafka timestamp of the record that completed a window to its alert reaching the sinks.",
            ["stream"],
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "detector_consumer_lag_records",
            "High watermark minus position, per partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.model_info = Gauge(
            "detector_model_info",
            "The checkpoint each stream scores with (value 1).",
            ["stream", "version"],
            registry=r,
        )
        self.model_swaps = Counter(
            "detector_model_swaps_total",
            "Times a running stream switched to another checkpoint (a newly promoted version).",
            ["stream"],
            registry=r,
        )
        self.retrain_total = Counter(
            "detector_retrain_total",
            "Finished retrainings by outcome: accepted (swapped in), rejected (not better on held-out "
            "windows), failed.",
            ["stream", "outcome"],
            registry=r,
        )
        self.retrain_seconds = Histogram(
            "detector_retrain_seconds",
            "Time to fine-tune and validate one retraining candidate.",
            ["stream"],
            buckets=RETRAIN_BUCKETS,
            registry=r,
        )
        self.score_drift_psi = Gauge(
            "detector_score_drift_psi",
            "Population stability index of recent live scores against the model's validation errors "
            "(NaN until enough scores).",
            ["stream"],
            registry=r,
        )
        self.score_drift_ks = Gauge(
            "detector_score_drift_ks",
            "Kolmogorov-Smirnov statistic of recent live scores against the model's validation errors "
            "(NaN until enough scores).",
            ["stream"],
            registry=r,
        )
        self.last_event = Gauge(
            "detector_last_event_timestamp_seconds", "Event time of the newest record scored.", ["stream"], registry=r
        )
        self.entities = Gauge(
            "detector_entities", "Entities with window state (not evicted as idle).", ["stream"], registry=r
        )
        self.entities_evicted = Counter(
            "detector_entities_evicted_total",
            "Entities evicted after `window.idle_evict_after_s` of event time without a record.",
            ["stream"],
            registry=r,
        )
        self.daily_repeats = Counter(
            "detector_daily_repeats_total",
            "Anomalous windows that raised no alert: the entity scored as high at this time of day yesterday.",
            ["stream"],
            registry=r,
        )
        self.commits = Counter("detector_offset_commits_total", "Successful offset commits.", registry=r)
        self.rebalances = Counter("detector_rebalances_total", "Partition assignments received.", registry=r)
        self.reloads = Counter("detector_config_reloads_total", "Config reload attempts.", ["result"], registry=r)
        self.reload_success = Gauge(
            "detector_config_last_reload_successful", "1 if the last config reload succeeded.", registry=r
        )
        self.sink_deliveries = Counter(
            "detector_sink_deliveries_total", "Successful deliveries (requests or messages).", ["sink"], registry=r
        )
        self.sink_failures = Counter(
            "detector_sink_failures_total", "Failed delivery attempts (each retry counts).", ["sink"], registry=r
        )
        self.sink_dropped = Counter(
            "detector_sink_dropped_total",
            "Alerts a sink gave up on: queue full, or retries exhausted.",
            ["sink", "cause"],
            registry=r,
        )
        self.alerts_deduplicated = Counter(
            "detector_alerts_deduplicated_total",
            "Alert events a sink did not send because their id was already there (the Kafka sink: found on "
            "the alerts topic when the partitions were assigned, a re-send after a crash).",
            ["sink"],
            registry=r,
        )
        self.sink_queue = Gauge(
            "detector_sink_queue_length", "Deliveries waiting in a sink's queue.", ["sink"], registry=r
        )
        self.ready = Gauge(
            "detector_ready", "1 when models are loaded and the consumer has joined its group.", registry=r
        )
        self.kafka_reachable = Gauge(
            "detector_kafka_reachable",
            "1 while the group coordinator answers heartbeats; 0 before the first broker answered and while "
            "the broker is lost.",
            registry=r,
        )
        self.reload_success.set(1)


class HealthServer:
    """The /metrics and health endpoints on a background thread (stdlib `ThreadingHTTPServer`)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        is_healthy: Callable[[], bool],
        is_ready: Callable[[], bool],
        reload: Callable[[], tuple[bool, str]],
    ) -> None:
        handler = _handler(registry, is_healthy, is_ready, reload)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-server", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when the config asked for port 0)."""
        port: int = self._server.server_address[1]
        return port

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    registry: CollectorRegistry,
    is_healthy: Callable[[], bool],
    is_ready: Callable[[], bool],
    reload: Callable[[], tuple[bool, str]],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/-/healthy":
                ok = is_healthy()
                self._reply(200 if ok else 503, b"OK\n" if ok else b"unhealthy\n")
            elif path == "/-/ready":
                ok = is_ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/-/reload":
                self._reply(404, b"not found\n")
                return
            ok, message = reload()
            self._reply(200 if ok else 500, (message + "\n").encode())

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler
