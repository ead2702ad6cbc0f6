"""The compose stack's demo data: `train` makes the checkpoints, `produce` feeds Kafka.

Runs inside the detector image (docker-compose.yml mounts this file). It reuses the
generator of `detector demo`: three days of host metrics and card payments with labeled
incidents, the first day clean.

- `train`: generate the data, train one model per stream on day 1 and save the checkpoints
  where the config says (skipped when they exist, so `docker compose up` is idempotent).
- `produce`: send the records to the streams' topics in event-time order, day 1 at full
  speed (it only fills the windows), then `--speed` simulated hours per second. Timestamps
  are shifted so that the last record is stamped with the time it is sent: no event time is
  ever in the future (Alertmanager refuses an alert that starts after it ends), and the
  daemon's "no data" alerts fire only once the feed has ended.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from detector.config import KafkaInput, load_config
from detector.demo import TRAIN_UNTIL_MS, generate, prepare, train_models
from detector.source import format_timestamp, parse_timestamp


def train(config_path: Path, workdir: Path, seed: int) -> int:
    config = load_config(config_path)
    missing = [s.checkpoint for s in config.streams.values() if s.checkpoint is not None and not s.checkpoint.exists()]
    if not missing:
        print("checkpoints exist; nothing to train", flush=True)
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    train_models(config, workdir, prepare(workdir, seed))
    return 0


def produce(config_path: Path, seed: int, speed: float) -> int:
    from kafka import KafkaProducer

    config = load_config(config_path)
    topics = {name: s.input.topic for name, s in config.streams.items() if isinstance(s.input, KafkaInput)}
    datasets = [d for d in generate(seed) if d.stream in topics]
    timeline = sorted(
        ((parse_timestamp(r["ts"]) or 0, d.stream, d.entity_field, r) for d in datasets for r in d.rows),
        key=lambda item: item[0],
    )
    last_ms = timeline[-1][0]
    feed_ms = (last_ms - TRAIN_UNTIL_MS) / speed / 3600
    shift = int(time.time() * 1000 + feed_ms) - last_ms
    producer = KafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers, linger_ms=20)
    t0 = time.monotonic()
    for sent, (ms, stream, entity_field, row) in enumerate(timeline, 1):
        if ms > TRAIN_UNTIL_MS:
            delay = t0 + (ms - TRAIN_UNTIL_MS) / 3_600_000 / speed - time.monotonic()
            if delay > 0.05:
                producer.flush()
                time.sleep(delay)
        else:
            t0 = time.monotonic()
        stamp = parse_timestamp(row["ts"])
        # A glitched timestamp ("yesterday") goes out unchanged: the daemon dead-letters it.
        value = dict(row, ts=format_timestamp(stamp + shift)) if stamp is not None else row
        producer.send(topics[stream], key=str(row.get(entity_field, "")).encode(), value=json.dumps(value).encode())
        if sent % 50_000 == 0:
            print(f"produced {sent} of {len(timeline)} records", flush=True)
    producer.flush()
    producer.close()
    print(f"produced {len(timeline)} records to {', '.join(sorted(topics.values()))}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "produce"])
    parser.add_argument("--config", type=Path, default=Path("/etc/detector/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/lib/detector/demo"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--speed", type=float, default=0.1, help="simulated hours per second after day 1")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args.config, args.workdir, args.seed)
    return produce(args.config, args.seed, args.speed)


if __name__ == "__main__":
    sys.exit(main())
