"""Window memory: RSS and bytes of window state per entity for many entities.

Each entity count runs in a fresh child process so its RSS is its own. The child imports
everything, notes its RSS, creates a `WindowStore` (W=64, D=1, stride 1, global scaler),
pushes one record per entity (in batches of `--batch` records), then `--rounds` more
rounds of one record per entity, each entity's timestamps stepping by its own draws from a
`--cadences` entry:

- `fixed:S`: every step S ms (all entities in lockstep);
- `jitter:S:J`: steps S ± J ms, uniform (a regular scrape with jitter);
- `exp:M`: exponential steps with mean M ms (irregular: card transactions, events),

and measures:

- numpy bytes: `nbytes` of every array the store holds (allocated capacity, not only used slots;
  never-touched capacity is zero pages mapped lazily, so it costs address space, not RSS), and
  the same per slot (what one more entity costs);
- python bytes: the part of the state numpy does not hold: the entity → slot dict, the slot →
  entity list, the entity strings, the slot ints (one int object per entity above 256), the
  free lists (with their ints) and the side dicts (re-fitted centres, timestamp steps beyond
  int32, and those steps), by `sys.getsizeof`, each object rounded up to the allocator's 8 bytes;
- RSS growth: RSS after the pushes minus RSS after the imports, and the peak RSS
  (VmHWM, which includes the transient copies while the arrays grow).

All are divided by the entity count and compared with the raw window bytes W·D·4.

Usage:
    python benchmarks/window_memory.py                      # 10k, 100k, 1M entities, every cadence
    python benchmarks/window_memory.py --entities 10000     # one count
    python benchmarks/window_memory.py --cadences exp:3600000 --rounds 130
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from _common import footer, header, table

if TYPE_CHECKING:
    import numpy as np

DEFAULT_CADENCES = "fixed:60000,jitter:60000:30000,jitter:1000:500,jitter:300000:30000,exp:3600000"


def steps_ms(cadence: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """One step per entity (int64 ms) drawn from `cadence` (see the module docstring)."""
    import numpy as np

    kind, *args = cadence.split(":")
    if kind == "fixed":
        return np.full(n, int(args[0]), np.int64)
    if kind == "jitter":
        step, jitter = int(args[0]), int(args[1])
        return step + rng.integers(-jitter, jitter, n, endpoint=True)
    if kind == "exp":
        return np.rint(rng.exponential(float(args[0]), n)).astype(np.int64)
    raise SystemExit(f"unknown cadence {cadence!r} (fixed:S, jitter:S:J or exp:M)")


def child(n: int, w: int, d: int, batch: int, rounds: int, cadence: str) -> dict[str, float]:
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
    times = np.full(n, 1_700_000_000_000, np.int64)
    t0 = time.perf_counter()
    pushed = 0
    for r in range(1 + rounds):
        if r:
            times += steps_ms(cadence, rng, n)
        for start in range(0, n, batch):
            ents = names[start : start + batch]
            k = len(ents)
            ts = times[start : start + k]
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

    wide_steps = store._wide_steps
    python_bytes = (
        sys.getsizeof(store.slot_of)
        + sys.getsizeof(store.entity_of)
        + sum(size(e) for e in store.entity_of)
        # Ints up to 256 are shared singletons; every other slot number is its own object.
        + sum(size(slot) for slot in store.slot_of.values() if slot > 256)
        + sys.getsizeof(store._free)
        + sum(size(x) for x in store._free if x > 256)
        + sum(size(d) for d in (store._recentred, wide_steps, *wide_steps.values()))
        # The steps (ints beyond int32, one object each) in the side dicts.
        + sum(size(step) for cells in wide_steps.values() for step in cells.values())
    )
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    per_array = {name: v.nbytes / n for name, v in vars(store).items() if isinstance(v, np.ndarray)}
    return {
        "cadence": cadence,  # type: ignore[dict-item]
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
    parser.add_argument("--cadences", default=DEFAULT_CADENCES, help="comma-separated timestamp cadences")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.window, args.features, args.batch, args.rounds, args.cadences)))
        return

    w, d = args.window, args.features
    raw = w * d * 4
    header(
        "window memory: WindowStore state per entity",
        {
            "window": f"W={w}, D={d}, stride 1, global scaler; entity keys 'entity-0000000' (14 chars)",
            "pushes": f"1 + {args.rounds} records per entity, in appends of {args.batch:,} records",
            "cadences": "fixed:S steps S ms; jitter:S:J steps S +- J ms uniform; exp:M exponential, mean M ms",
            "raw bytes": f"W*D*4 = {raw} B per entity",
            "process": "one fresh child process per entity count",
        },
    )
    rows, arrays = [], []
    runs = [(c, int(n)) for c in args.cadences.split(",") for n in args.entities.split(",")]
    for cadence, n in runs:
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
                "--cadences",
                cadence,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            [
                cadence,
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
        arrays.append([cadence, n, *(f"{v:.1f}" for v in r["per_array"].values())])
        names = list(r["per_array"])
    table(
        [
            "cadence",
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
    table(["cadence", "entities", *names], arrays)
    footer()


if __name__ == "__main__":
    main()
