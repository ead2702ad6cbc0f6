"""What the alert dedupe costs an assignment: reading the alerts topic's tail back.

Starts the local Tansu broker (`detector.broker.LocalBroker`), writes `--messages` alert
messages (the JSON `KafkaAlertSink` writes, keyed by 50 entities) to a topic of
`--partitions` partitions, then times what `Daemon._read_alert_tail` does on each partition
assignment, for each lookback: the producer's partition lookup, a fresh `KafkaConsumer` of
no group (`alert_reader_settings`), `read_alert_tail`, close. Checks that the ids found are
exactly those of the last `lookback` messages of each partition (from the producer's
acknowledged offsets), and that the broker's end-offset lookup is still wrong (the reason the
end comes from a fetch's high watermark). Best of `--repeat` runs.

Usage:
    python benchmarks/alert_tail.py                        # 3 partitions, 36,000 messages
    python benchmarks/alert_tail.py --messages 200000 --lookbacks 10000,100000
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from _common import footer, header, table

from detector.alerts import Alert, alert_id
from detector.broker import LocalBroker, create_topics
from detector.config import Config
from detector.service import alert_reader_settings
from detector.sinks import alert_json, read_alert_tail


def alert(i: int) -> Alert:
    entity = f"host-{i % 50}"
    return Alert(
        id=alert_id("hosts", entity, 60_000 * i),
        status="firing",
        stream="hosts",
        entity=entity,
        severity="warning",
        window_start_ms=60_000 * (i - 15),
        window_end_ms=60_000 * i,
        score=3.2,
        threshold=0.4,
        top_features=(("latency_ms", 2.5), ("cpu_pct", 0.1), ("mem_pct", 0.01)),
        model_version="hosts-20241124T221944Z-af71dc15",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--messages", type=int, default=36_000)
    parser.add_argument("--lookbacks", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lookbacks = [int(n) for n in args.lookbacks.split(",")]
    header(
        "alert dedupe: reading the alerts topic's tail back on assignment",
        {"broker": "Tansu (LocalBroker), in memory", "partitions": args.partitions, "messages": args.messages},
    )
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    with LocalBroker() as broker:
        create_topics(broker.bootstrap, ["alerts"], partitions=args.partitions)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20, batch_size=1 << 20)
        futures = []
        for i in range(args.messages):
            a = alert(i)
            futures.append((a.id, producer.send("alerts", key=a.entity.encode(), value=alert_json(a))))
        producer.flush()
        offsets: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for ident, future in futures:
            meta = future.get(timeout=30)
            offsets[meta.partition].append((meta.offset, ident))
        ends = {p: max(o for o, _ in found) + 1 for p, found in offsets.items()}

        config = Config.model_validate(
            {
                "streams": {"hosts": {"input": {"kind": "kafka", "topic": "m"}, "mapping": {"features": ["x"]}}},
                "kafka": {"bootstrap_servers": broker.bootstrap},
            }
        )
        probe = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        tps = [TopicPartition("alerts", p) for p in sorted(ends)]
        lookup = {tp.partition: offset for tp, offset in probe.end_offsets(tps).items()}
        probe.close()
        print(f"partition ends (acknowledged offsets): {dict(sorted(ends.items()))}")
        print(f"end_offsets() answer of the broker:    {dict(sorted(lookup.items()))}\n")

        rows = []
        for lookback in lookbacks:
            expected = {i for p, found in offsets.items() for o, i in found if o >= ends[p] - lookback}
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.monotonic()
                partitions = producer.partitions_for("alerts")
                reader = KafkaConsumer(**alert_reader_settings(config))
                tail = read_alert_tail(reader, "alerts", partitions, lookback, 15.0)
                reader.close()
                best = min(best, time.monotonic() - t0)
                assert tail.ids == expected and not tail.unfinished, (len(tail.ids), len(expected), tail.unfinished)
            rows.append([lookback, tail.messages, len(tail.ids), best * 1000, tail.messages / best])
        producer.close()
    table(["lookback", "messages read", "ids", "ms (best)", "messages/s"], rows)
    footer()


if __name__ == "__main__":
    main()
