"""Check `detector replay` alerts against NAB's labeled anomaly windows.

    .venv/bin/python scripts/nab_check.py --alerts build/alerts.jsonl \
        --series realKnownCause/machine_temperature_system_failure.csv

A labeled window counts as found when a firing alert's `window_end` falls inside it
(`start <= window_end <= end`, with `--slack` widening the end). A firing alert whose
`window_end` is inside no labeled window is a false positive. `--from` leaves out labeled
windows that end before a time (e.g. in the training part of the series, which is never
scored); by default every labeled window is counted.

Exit status: 0 always when the inputs are readable (this is a report, not a gate), 2 when
they are not.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def contains(self, t: datetime, slack: timedelta = timedelta(0)) -> bool:
        return self.start <= t <= self.end + slack


@dataclass(frozen=True)
class Report:
    windows: list[Window]
    found: list[bool]
    false_positives: list[datetime]
    firing: int

    def lines(self) -> list[str]:
        out = []
        for i, (w, hit) in enumerate(zip(self.windows, self.found, strict=True)):
            out.append(
                f"window {i}: {w.start:%Y-%m-%d %H:%M} -> {w.end:%Y-%m-%d %H:%M}  {'FOUND' if hit else 'missed'}"
            )
        out.append(
            f"found {sum(self.found)}/{len(self.windows)} windows; "
            f"{len(self.false_positives)} of {self.firing} firing alerts outside windows"
        )
        out.extend(f"  false positive at {t:%Y-%m-%d %H:%M}" for t in self.false_positives)
        return out


def parse_time(text: str) -> datetime:
    """NAB label times are naive UTC (`2013-12-10 06:25:00.000000`); alerts are ISO 8601 with `Z`."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def load_windows(data_dir: Path, series: str) -> list[Window]:
    labels = json.loads((data_dir / "nab" / "labels" / "combined_windows.json").read_text())
    if series not in labels:
        raise KeyError(f"no labels for {series!r} in {data_dir}/nab/labels/combined_windows.json")
    return [Window(parse_time(a), parse_time(b)) for a, b in labels[series]]


def load_firing_times(alerts: Path) -> list[datetime]:
    times = []
    for line in alerts.read_text().splitlines():
        if line.strip():
            event = json.loads(line)
            if event["status"] == "firing":
                times.append(parse_time(event["window_end"]))
    return times


def check(
    windows: list[Window], firing: list[datetime], slack: timedelta = timedelta(0), since: datetime | None = None
) -> Report:
    """Which windows have a firing alert inside them, and which alerts are in no window.

    Windows that end before `since` are left out (they were not scored).
    """
    kept = [w for w in windows if since is None or w.end >= since]
    found = [any(w.contains(t, slack) for t in firing) for w in kept]
    false_positives = [t for t in firing if not any(w.contains(t, slack) for w in windows)]
    return Report(kept, found, false_positives, len(firing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds nab/labels and nab/data")
    parser.add_argument("--alerts", type=Path, required=True, help="alerts.jsonl written by `detector replay`")
    parser.add_argument("--series", required=True, help="NAB series key, e.g. realKnownCause/nyc_taxi.csv")
    parser.add_argument("--slack-hours", type=float, default=0.0, help="also count alerts this long after a window")
    parser.add_argument("--from", dest="since", help="leave out windows that end before this time (ISO 8601)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line instead of text")
    args = parser.parse_args(argv)
    try:
        windows = load_windows(args.data_dir, args.series)
        firing = load_firing_times(args.alerts)
        since = parse_time(args.since) if args.since else None
    except (OSError, KeyError, ValueError) as exc:
        print(f"nab_check: {exc}", file=sys.stderr)
        return 2
    report = check(windows, firing, timedelta(hours=args.slack_hours), since)
    if args.json:
        print(
            json.dumps(
                {
                    "series": args.series,
                    "windows": len(report.windows),
                    "found": sum(report.found),
                    "false_positives": len(report.false_positives),
                    "firing": report.firing,
                }
            )
        )
    else:
        print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
