"""Window memory: RSS and bytes of window state per entity for many entities.

Each entity count runs in a fresh child process so its RSS is its own. The child imports
everything, notes its RSS, creates a `WindowStore` (W=64, D=1, stride 1, global scaler),
pushes one record per entity (in batches of `--batch` records), then `--rounds` more
rounds of one record per entity, and measures:

- numpy bytes: `nbytes` of every array the store holds (allocated capacity, not only used slots;
  never-touched capacity is zero pages mapped lazily, so it costs address space, not RSS), and
  the same per slot (what one more entity costs);
- python bytes: the part of the state numpy does not hold: the entity → slot dict, the slot →
  entity list, the entity strings, the slot ints (one int object per entity above 256), the
  free list and the side dicts (re-fitted centres, timestamp steps beyond int32), by
  `sys.getsizeof`, each object rounded up to the allocator's 8 bytes;
- RSS growth: RSS after the pushes minus RSS after the imports, and the peak RSS
  (VmHWM, which includes the transient copies while the arrays grow).

All are divided by the entity count and compared with the raw window bytes W·D·4.

Usage:
    python benchmarks/window_memory.py                      # 10k, 100k, 1M entities
    python benchmarks/window_memory.py --entities 10000     # one count
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import footer, header, table


def child(n: int, w: int, d: int, batch: int, rounds: int) -> dict[str, float]:
    import gc

    import numpy as np
    from _common import rss_bytes

    from detector.source import SampleBatch
    from detector.window import Scaler, WindowStore

    gc.collect()
    rss0 = rss_bytes()
    store = WindowStore(w, 1, d, Scaler(np.zeros(d, np.float32), np.ones(d, np.float32)))
    names = [f"entity-{i:07d}" for i in range(n)]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    pushed = 0
    for r in range(1 + rounds):
        for start in range(0, n, batch):
            ents = names[start : start + batch]
            k = len(ents)
            ts = np.full(k, 1_700_000_000_000 + r * 60_000, np.int64)
            values = rng.standard_normal((k, d), dtype=np.float32)
            store.append(SampleBatch(ents, ts, values, np.arange(k)))
            pushed += k
    seconds = time.perf_counter() - t0
    del names  # the store keeps its own references to the strings
    gc.collect()
    rss1 = rss_bytes()
    arrays = [v for v in vars(store).values() if isinstance(v, np.ndarray)]
    numpy_bytes = sum(a.nbytes for a in arrays)
    capacity = len(store._count)

    def size(obj: object) -> int:  # what the allocator hands out for a small object
        return -(-sys.getsizeof(obj) // 8) * 8

    python_bytes = (
        sys.getsizeof(store.slot_of)
        + sys.getsizeof(store.entity_of)
        + sum(size(e) for e in store.entity_of)
        # Ints up to 256 are shared singletons; every other slot number is its own object.
        + sum(size(slot) for slot in store.slot_of.values() if slot > 256)
        + sys.getsizeof(store._free)
        + sum(size(d) for d in (store._recentred, store._wide_steps, *store._wide_steps.values()))
    )
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    per_array = {name: v.nbytes / n for name, v in vars(store).items() if isinstance(v, np.ndarray)}
    return {
        "n": n,
        "capacity": capacity,
        "numpy": numpy_bytes,
        "numpy_per_slot": numpy_bytes / capacity,
        "python": python_bytes,
        "rss_growth": rss1 - rss0,
        "rss": rss1,
        "hwm": hwm,
        "records_per_s": pushed / seconds,
        "per_array": per_array,  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", default="10000,100000,1000000", help="comma-separated entity counts")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--features", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100_000, help="records per append")
    parser.add_argument("--rounds", type=int, default=3, help="extra records per entity after the first")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.window, args.features, args.batch, args.rounds)))
        return

    w, d = args.window, args.features
    raw = w * d * 4
    header(
        "window memory: WindowStore state per entity",
        {
            "window": f"W={w}, D={d}, stride 1, global scaler; entity keys 'entity-0000000' (14 chars)",
            "pushes": f"1 + {args.rounds} records per entity, in appends of {args.batch:,} records",
            "raw bytes": f"W*D*4 = {raw} B per entity",
            "process": "one fresh child process per entity count",
        },
    )
    rows, arrays = [], []
    for n in (int(x) for x in args.entities.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                *sys.argv[:1],
                "--child",
                str(n),
                "--window",
                str(w),
                "--features",
                str(d),
                "--batch",
                str(args.batch),
                "--rounds",
                str(args.rounds),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            [
                n,
                r["capacity"],
                r["numpy"] / n,
                r["numpy_per_slot"],
                r["python"] / n,
                (r["numpy"] + r["python"]) / n,
                (r["numpy"] + r["python"]) / n / raw,
                r["rss_growth"] / n,
                r["rss"] / 2**20,
                r["hwm"] / 2**20,
                r["records_per_s"],
            ]
        )
        arrays.append([n, *(f"{v:.1f}" for v in r["per_array"].values())])
        names = list(r["per_array"])
    table(
        [
            "entities",
            "slots allocated",
            "numpy B/entity",
            "numpy B/slot",
            "python B/entity",
            "state B/entity",
            "x raw",
            "RSS growth B/entity",
            "RSS MiB",
            "peak RSS MiB",
            "append records/s",
        ],
        rows,
    )
    print("\nnumpy bytes per entity, by array:")
    table(["entities", *names], arrays)
    footer()


if __name__ == "__main__":
    main()
