"""Shared helpers for the benchmark scripts: the machine header and plain-text tables."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def header(title: str, settings: dict[str, Any]) -> None:
    """Print what ran, on what machine, with which settings (every script starts with this)."""
    print(f"# {title}")
    print(f"command:    {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"cpu:        {cpu_model()} ({os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable)")
    print(f"python:     {platform.python_version()}  torch {torch.__version__}  numpy {_numpy_version()}")
    print(f"threads:    torch intra-op default {torch.get_num_threads()}")
    print(f"load avg:   {load_average()} (1/5/15 min, at start)")
    for key, value in settings.items():
        print(f"{key + ':':<11} {value}")
    print()


def footer() -> None:
    print(f"\nload avg:   {load_average()} (1/5/15 min, at end)")


def _numpy_version() -> str:
    import numpy

    return numpy.__version__


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table (pastes straight into docs/performance.md)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
