"""Peers: detector against River's HalfSpaceTrees and a naive per-event LSTM loop, same stream.

One stream, generated once and handed to every contender in the same run: `entities` series
interleaved (one record per entity per minute of event time), N(0, 1) values from
`numpy.random.default_rng(0)`, row by row, exactly as `end_to_end.py`'s producer makes them.
Each contender gets the records as (entity, timestamp ms, value) Python tuples, in order.

The first W-1 rows per entity only fill windows. Every contender processes them untimed
(River learns on them, the windows fill), then is timed on the rows after them, where every
record completes a window at stride 1. Contenders:

- River HST: `river.anomaly.HalfSpaceTrees` (default 10 trees, height 8, window 250), one
  model for the stream, `score_one` then `learn_one` per record, features `{"value": x}`.
  HST assumes features in [0, 1]: the plain row passes `limits` for N(0, 1) values (no
  scaling cost); the second row is River's documented pipeline, `MinMaxScaler | HST`.
- naive loop: what most tutorials do. A `deque(maxlen=W)` per entity; once it is full, one
  forward pass per record (`torch.tensor(list(deque))`, batch of 1, `torch.no_grad()`) and
  the mean squared error. Same weights and scaling as detector's. It is slow, so it is
  timed on the first `--naive-events` records of the timed part only.
- detector Pipeline: `BatchBuilder.add` per record, then `Pipeline.process` per
  `--batch-records` records (windows, batched scores, thresholds, alert policy), as the
  daemon does after decoding. Stride 1 and 8.
- detector daemon (`--daemon`, on by default): `end_to_end.throughput` (broker, producer
  process, `detector run` subprocess, JSON over Kafka, one partition). Its rate is over all
  records of the topic, the window fill included (see end_to_end.py), not only the timed rows.

Model: seeded random LSTM autoencoder weights (from `end_to_end.write_setup`), W=64, D=1,
H=32, latent 16; scaler center 0, scale 1. Threads: `torch.set_num_threads(--threads)` for
this process (naive loop and Pipeline) and `scoring.threads` of the daemon; River runs in one
Python thread. The naive loop's scores are checked against the Pipeline's for the same records.

Usage:
    python benchmarks/peers.py                       # 1,000 entities, 200 rows each
    python benchmarks/peers.py --no-daemon --naive-events 5000
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import footer, header, table
from end_to_end import BASE_MS, run_producer, throughput, write_setup

from detector.broker import LocalBroker, create_topics
from detector.config import load_config
from detector.model import Checkpoint, load_checkpoint
from detector.pipeline import Pipeline
from detector.source import BatchBuilder

Record = tuple[str, int, float]


def make_stream(entities: int, rows: int) -> list[Record]:
    """The records of end_to_end.py's producer, in its order (entities interleaved per row)."""
    rng = np.random.default_rng(0)
    names = [f"e{i}" for i in range(entities)]
    out: list[Record] = []
    for row in range(rows):
        values = rng.standard_normal(entities).tolist()
        ts = BASE_MS + row * 60_000
        out.extend(zip(names, [ts] * entities, values, strict=True))
    return out


class Timer:
    """Wall and CPU seconds of this process over a block."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def run_river(fill: list[Record], timed: list[Record], scaled: bool) -> tuple[Timer, int]:
    from river import anomaly, compose, preprocessing

    model: Any
    if scaled:
        model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=42))
    else:
        model = anomaly.HalfSpaceTrees(seed=42, limits={"value": (-4.0, 4.0)})
    for _, _, value in fill:
        x = {"value": value}
        model.score_one(x)
        model.learn_one(x)
    with Timer() as t:
        for _, _, value in timed:
            x = {"value": value}
            model.score_one(x)
            model.learn_one(x)
    return t, len(timed)


def run_naive(
    ckpt: Checkpoint, window: int, fill: list[Record], timed: list[Record]
) -> tuple[Timer, int, dict[int, float]]:
    """Per-entity deques, one forward pass per record once the entity's window is full.

    Returns the timer, the windows scored and the score of each timed record (by index).
    """
    model = ckpt.model
    center, scale = float(ckpt.scaler.center[0]), float(ckpt.scaler.scale[0])
    buffers: dict[str, collections.deque[float]] = {}
    scores: dict[int, float] = {}

    def step(i: int, entity: str, value: float) -> None:
        buf = buffers.get(entity)
        if buf is None:
            buf = buffers[entity] = collections.deque(maxlen=window)
        buf.append((value - center) / scale)
        if len(buf) == window:
            x = torch.tensor(list(buf), dtype=torch.float32).view(1, window, 1)
            with torch.no_grad():
                recon = model(x)
            scores[i] = torch.mean((recon - x) ** 2).item()

    for entity, _, value in fill:
        step(-1, entity, value)
    scores.clear()
    with Timer() as t:
        for i, (entity, _, value) in enumerate(timed):
            step(i, entity, value)
    return t, len(scores), scores


def run_pipeline(
    config: Path, batch_records: int, fill: list[Record], timed: list[Record]
) -> tuple[Timer, int, np.ndarray]:
    """detector's Pipeline, fed `batch_records` records at a time. Returns the scores of the timed records."""
    cfg = load_config(config)
    stream = cfg.streams["bench"]
    assert stream.checkpoint is not None
    pipeline = Pipeline("bench", stream, load_checkpoint(stream.checkpoint, stream), cfg.scoring)

    def feed(records: list[Record], scores: list[np.ndarray]) -> int:
        windows = 0
        builder = BatchBuilder(1)
        for start in range(0, len(records), batch_records):
            for i, (entity, ts, value) in enumerate(records[start : start + batch_records], start):
                builder.add((entity, ts, [value]), i)
            samples, _ = builder.build()
            result = pipeline.process(samples)
            windows += result.windows
            scores.append(result.score)
        return windows

    feed(fill, [])
    scores: list[np.ndarray] = []
    with Timer() as t:
        windows = feed(timed, scores)
    return t, windows, np.concatenate(scores)


def setup(workdir: Path, args: argparse.Namespace, stride: int) -> Path:
    """Config and checkpoint for one stride (the stride is part of the checkpoint's layout hash;
    the weights are the same seeded ones for every stride)."""
    return write_setup(
        workdir,
        bootstrap="127.0.0.1:9",  # Pipeline only: the Kafka settings are not used
        topic="unused",
        group=f"peers-s{stride}",
        stride=stride,
        window=args.window,
        hidden=args.hidden,
        port=0,
        batch_records=args.batch_records,
        batch_wait_ms=args.batch_wait_ms,
        scores=False,
        threads=args.threads,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=200, help="records per entity (the first W-1 are untimed fill)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and scoring.threads of the daemon")
    parser.add_argument("--batch-records", type=int, default=5000, help="records per Pipeline.process call")
    parser.add_argument("--naive-events", type=int, default=20_000, help="timed records of the naive loop")
    parser.add_argument("--strides", default="1,8", help="detector's strides")
    parser.add_argument("--daemon", action=argparse.BooleanOptionalAction, default=True, help="also run end to end")
    parser.add_argument("--batch-wait-ms", type=int, default=200, help="daemon: scoring.batch_wait_ms")
    parser.add_argument("--timeout", type=float, default=300, help="daemon: seconds to read the topic")
    args = parser.parse_args()
    if args.rows < args.window:
        parser.error("--rows must be at least --window (the first W-1 rows only fill windows)")
    try:
        import river  # noqa: F401
    except ImportError:
        parser.error("River is not installed: pip install -e '.[bench]'")

    torch.set_num_threads(args.threads)
    strides = [int(s) for s in args.strides.split(",") if s]
    fill_rows = args.window - 1
    header(
        "peers: River HalfSpaceTrees, a naive per-event LSTM loop and detector, on the same stream",
        {
            "stream": f"{args.entities:,} entities x {args.rows} rows, W={args.window}, D=1, N(0,1) values (seed 0)",
            "timed": f"rows {fill_rows}..{args.rows - 1} ({args.entities * (args.rows - fill_rows):,} records; "
            f"the first {fill_rows} rows fill windows, untimed); naive loop: first {args.naive_events:,} of them",
            "model": f"LSTM autoencoder H={args.hidden}, latent 16, seeded random weights, same for naive and detector",
            "river": "HalfSpaceTrees(seed=42): 10 trees, height 8, window 250; one model; score_one + learn_one",
            "detector": f"Pipeline, {args.batch_records} records per process(), strides {strides}"
            + (
                f"; daemon end to end (end_to_end.throughput, batch_records {args.batch_records})"
                if args.daemon
                else ""
            ),
            "threads": f"torch.set_num_threads({args.threads}) here, scoring.threads={args.threads} in the daemon; "
            "River is single-threaded Python",
        },
    )

    stream = make_stream(args.entities, args.rows)
    split = args.entities * fill_rows
    fill, timed = stream[:split], stream[split:]

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="detector-peers-") as tmp:
        workdir = Path(tmp)
        configs = {stride: setup(workdir, args, stride) for stride in {1, *strides}}
        ckpt = load_checkpoint(workdir / "peers-s1.pt")

        for scaled in (False, True):
            t, n = run_river(fill, timed, scaled)
            name = "River MinMaxScaler | HST" if scaled else "River HST (limits given)"
            rows.append([name, 1, n, t.wall, n / t.wall, "", t.cpu / t.wall])
            print(f"{name}: {n / t.wall:,.0f} events/s", flush=True)
        river_rate = rows[0][4]

        t, windows, naive_scores = run_naive(ckpt, args.window, fill, timed[: args.naive_events])
        naive_rate = args.naive_events / t.wall
        rows.append(["naive loop (1 forward per event)", 1, args.naive_events, t.wall, naive_rate, windows / t.wall])
        rows[-1].append(t.cpu / t.wall)
        print(f"naive loop: {naive_rate:,.0f} events/s", flush=True)

        detector_rows = []
        for stride in strides:
            t, windows, scores = run_pipeline(configs[stride], args.batch_records, fill, timed)
            rows.append([f"detector Pipeline, stride {stride}", stride, len(timed), t.wall, len(timed) / t.wall])
            rows[-1] += [windows / t.wall, t.cpu / t.wall]
            detector_rows.append(rows[-1])
            print(f"detector Pipeline stride {stride}: {len(timed) / t.wall:,.0f} events/s", flush=True)
            if stride == 1:
                idx = np.fromiter(naive_scores, np.int64)
                ref = np.fromiter(naive_scores.values(), np.float64)
                rel = np.abs(scores[idx] - ref) / np.maximum(np.abs(ref), 1e-12)
                agreement = (
                    f"naive vs Pipeline scores, same {len(idx):,} records: max relative difference {rel.max():.1e}"
                )

        if args.daemon:
            e2e = argparse.Namespace(
                entities=args.entities,
                window=args.window,
                hidden=args.hidden,
                batch_records=args.batch_records,
                batch_wait_ms=args.batch_wait_ms,
                threads=args.threads,
                batch_windows=None,
                timeout=args.timeout,
            )
            with LocalBroker(log_path=f"{tmp}/broker.log") as broker:
                create_topics(broker.bootstrap, ["bench.peers"])
                run_producer(broker.bootstrap, "bench.peers", args.entities, args.rows)
                total = args.entities * args.rows
                for stride in strides:
                    r = throughput(e2e, workdir, broker.bootstrap, "bench.peers", total, stride)
                    # r: entities, stride, records, measured, seconds, events/s, windows/s, CPU, RSS, peak RSS
                    rows.append([f"detector daemon via Kafka, stride {stride} (all rows)", stride, r[3], r[4], r[5]])
                    rows[-1] += [r[6], r[7]]
                    detector_rows.append(rows[-1])
                    print(f"detector daemon stride {stride}: {r[5]:,.0f} events/s", flush=True)

    # Events per CPU-second of the process doing the work: on a shared machine it moves less than the
    # wall-clock rate when a neighbour takes part of a core.
    per_cpu = [row[4] / row[6] for row in rows]
    for row, cpu_rate in zip(rows, per_cpu, strict=True):
        row += [row[4] / river_rate, row[4] / naive_rate, cpu_rate, cpu_rate / per_cpu[0], cpu_rate / per_cpu[2]]
    print()
    table(
        [
            "contender",
            "stride",
            "records timed",
            "seconds",
            "events/s",
            "windows/s",
            "CPU (cores)",
            "x River HST",
            "x naive",
            "events/CPU-s",
            "x River HST (CPU)",
            "x naive (CPU)",
        ],
        rows,
    )
    print(f"\n{agreement}" if 1 in strides else "")
    print("targets (stride 1): detector >= 1.5x River HST, >= 20x the naive loop")
    for row in detector_rows:
        if row[1] == 1:
            x_river, x_naive = row[7], row[8]
            verdict = "met" if x_river >= 1.5 and x_naive >= 20 else "NOT met"
            print(
                f"  {row[0]}: {x_river:.2f}x River HST, {x_naive:.1f}x naive -> {verdict} "
                f"(per CPU-second: {row[10]:.2f}x, {row[11]:.1f}x)"
            )
    footer()


if __name__ == "__main__":
    main()
