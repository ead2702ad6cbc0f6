"""`detector report`: pictures of series, score, threshold and alerts per entity.

For people who would rather look than read a scores file. Input is what `detector replay`
writes (scores.csv, and alerts JSON lines when given); the raw feature values are not in
scores.csv, so they are read again from the data file when the caller passes them in
(`feature_traces`), aligned by row number (= `Sample.position`).

Labeled windows (a benchmark's ground truth, `read_windows`) can be drawn over every entity, so
a person can see why an alert fired, or why none did.

Output is a PNG (one figure, two panels per entity) or a self-contained HTML page (one inline
PNG per entity, an alert table per entity and summary counts; no scripts, nothing fetched).
matplotlib is an optional dependency (`pip install 'detector[report]'`); it is imported only
when drawing, and its absence is a `DetectorError` (exit 2), not a crash. Figures are drawn on
the Agg canvas directly, without pyplot, so no global backend state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detector.errors import DetectorError, InputError
from detector.source import SampleBatch, format_timestamp, parse_timestamp

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SCORE_COLUMNS = ("row", "entity", "timestamp", "score", "threshold", "is_anomaly", "alert_id", "phase", "rejected")
FIGURE_WIDTH_IN = 12.0
DPI = 100
SERIES_HEIGHT_IN = 2.4
SCORE_HEIGHT_IN = 2.2
MAX_FEATURES = 8  # more strips than this stop being readable; the ones named in alerts go first
SEVERITY_COLORS = {"critical": "#c0392b", "warning": "#e67e22"}
FIRING_COLOR = "#8e44ad"  # severity unknown (markers derived from scores.csv alone)
LABELED_COLOR = "#00838f"  # teal: apart from the series (blue), resolves (green) and training (grey)


@dataclass
class EntityTrace:
    """One entity's good rows from scores.csv, in file order.

    Shape:
        rows, times: (N,) int64: file row numbers, milliseconds since the epoch (UTC)
        score, threshold: (N,) float64, NaN where no window was scored at that row
        anomaly, train: (N,) bool
    """

    entity: str
    rows: np.ndarray
    times: np.ndarray
    score: np.ndarray
    threshold: np.ndarray
    anomaly: np.ndarray
    train: np.ndarray
    alert_starts: dict[str, int]  # alert id -> time (ms) of the first row that carries it

    @property
    def scored(self) -> np.ndarray:
        return np.asarray(~np.isnan(self.score))


@dataclass
class ScoreTable:
    """scores.csv read back: traces per entity plus the rejected rows' reasons."""

    entities: dict[str, EntityTrace]
    rows: int
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class AlertEvent:
    """One line of an alerts JSONL file (see README, Alerts); `time_ms` is its window end."""

    id: str
    status: str
    entity: str
    severity: str
    time_ms: int
    score: float | None = None
    threshold: float | None = None
    top_features: tuple[str, ...] = ()


@dataclass
class FeatureTrace:
    """An entity's raw feature values aligned with its `EntityTrace` rows.

    Shape:
        values: (N, D) float64, NaN where the data file has no good row with that number
    """

    names: list[str]
    values: np.ndarray


@dataclass
class ReportSummary:
    shown: list[str]
    left_out: list[str]
    firing: int
    resolved: int


def _float(text: str, row: int, column: str) -> float:
    if text == "":
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise InputError(f"scores row {row}: {column} {text!r} is not a number") from None


def read_scores(path: Path) -> ScoreTable:
    """Read a scores.csv written by `detector replay`; InputError when it is not one."""
    try:
        f = path.open(newline="")
    except OSError as exc:
        raise InputError(f"cannot read scores file {path}: {exc.strerror or exc}") from None
    columns: dict[str, dict[str, list[Any]]] = {}
    alert_starts: dict[str, dict[str, int]] = {}
    rejected: Counter[str] = Counter()
    total = 0
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in SCORE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path} is not a scores file from `detector replay`: missing column(s) {missing}")
        for line, rec in enumerate(reader, start=2):
            total += 1
            if rec["rejected"]:
                rejected[rec["rejected"]] += 1
                continue
            try:
                row = int(rec["row"])
            except (TypeError, ValueError):
                raise InputError(f"{path} line {line}: row {rec['row']!r} is not a row number") from None
            ms = parse_timestamp(rec["timestamp"], "iso")
            if ms is None:
                raise InputError(f"{path} row {row}: cannot parse timestamp {rec['timestamp']!r}")
            entity = rec["entity"]
            cols = columns.setdefault(entity, {k: [] for k in ("rows", "times", "score", "threshold", "anom", "train")})
            cols["rows"].append(row)
            cols["times"].append(ms)
            cols["score"].append(_float(rec["score"], row, "score"))
            cols["threshold"].append(_float(rec["threshold"], row, "threshold"))
            cols["anom"].append(rec["is_anomaly"] == "1")
            cols["train"].append(rec["phase"] == "train")
            if rec["alert_id"]:
                alert_starts.setdefault(entity, {}).setdefault(rec["alert_id"], ms)
    if not columns:
        raise InputError(f"{path} has no usable rows")
    traces = {
        entity: EntityTrace(
            entity=entity,
            rows=np.asarray(c["rows"], np.int64),
            times=np.asarray(c["times"], np.int64),
            score=np.asarray(c["score"], np.float64),
            threshold=np.asarray(c["threshold"], np.float64),
            anomaly=np.asarray(c["anom"], bool),
            train=np.asarray(c["train"], bool),
            alert_starts=alert_starts.get(entity, {}),
        )
        for entity, c in columns.items()
    }
    return ScoreTable(traces, total, rejected)


def read_alerts(path: Path) -> list[AlertEvent]:
    """Read alert events (JSON lines); InputError naming the line when one is malformed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read alerts file {path}: {exc.strerror or exc}") from None
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not all(k in obj for k in ("status", "entity", "window_end")):
            raise InputError(f"{path} line {number}: not an alert (needs status, entity, window_end)")
        ms = parse_timestamp(obj["window_end"])
        if ms is None:
            raise InputError(f"{path} line {number}: cannot parse window_end {obj['window_end']!r}")
        top = obj.get("top_features") or []
        events.append(
            AlertEvent(
                id=str(obj.get("id", "")),
                status=str(obj["status"]),
                entity=str(obj["entity"]),
                severity=str(obj.get("severity", "")),
                time_ms=ms,
                score=obj.get("score"),
                threshold=obj.get("threshold"),
                top_features=tuple(str(t.get("name", "")) for t in top if isinstance(t, dict)),
            )
        )
    return events


def read_windows(path: Path, key: str | None = None) -> list[tuple[int, int]]:
    """Labeled anomaly windows, as (start, end) milliseconds, from a JSON file: a list of
    [start, end] timestamps, or with `key` the list under that key of an object (NAB's
    `labels/combined_windows.json`, keyed by `category/file.csv`). InputError names what is wrong."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read windows file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    where = str(path)
    if key is not None:
        if not isinstance(data, dict):
            raise InputError(f"{path}: --windows-key needs a JSON object of window lists, got a {type(data).__name__}")
        if key not in data:
            raise InputError(f"{path}: no key {key!r} (it has {len(data)}, e.g. {', '.join(sorted(data)[:3])})")
        data, where = data[key], f"{path} [{key!r}]"
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list of [start, end] pairs, got a {type(data).__name__}")
    windows = []
    for i, pair in enumerate(data):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise InputError(f"{where} item {i}: expected [start, end], got {pair!r}")
        start, end = parse_timestamp(pair[0]), parse_timestamp(pair[1])
        if start is None or end is None:
            raise InputError(f"{where} item {i}: cannot parse the timestamps {pair!r}")
        if end < start:
            raise InputError(f"{where} item {i}: ends before it starts ({pair[0]} > {pair[1]})")
        windows.append((start, end))
    return windows


def alerts_from_scores(table: ScoreTable) -> list[AlertEvent]:
    """Firing events derived from scores.csv's alert_id column, for when no alerts file is given."""
    return [
        AlertEvent(id=alert_id, status="firing", entity=entity, severity="", time_ms=ms)
        for entity, trace in table.entities.items()
        for alert_id, ms in trace.alert_starts.items()
    ]


def feature_traces(table: ScoreTable, samples: SampleBatch, names: Sequence[str]) -> dict[str, FeatureTrace]:
    """Align decoded samples with the scores by row number; InputError when they disagree.

    A row present in both but with another entity means the data file is not the one the
    scores came from, and plotting it would mislead.
    """
    order = np.argsort(samples.positions, kind="stable")
    positions = samples.positions[order]
    values = samples.values[order].astype(np.float64)
    out: dict[str, FeatureTrace] = {}
    matched = 0
    for entity, trace in table.entities.items():
        idx = np.clip(np.searchsorted(positions, trace.rows), 0, max(len(positions) - 1, 0))
        found = positions[idx] == trace.rows if len(positions) else np.zeros(len(trace.rows), bool)
        for i in np.flatnonzero(found)[:1]:
            other = samples.entities[int(order[idx[i]])]
            if other != entity:
                raise InputError(
                    f"--input does not match --scores: row {trace.rows[i]} is entity {other!r} in the input, "
                    f"{entity!r} in the scores"
                )
        aligned = np.full((len(trace.rows), len(names)), np.nan)
        aligned[found] = values[idx[found]]
        matched += int(found.sum())
        out[entity] = FeatureTrace(list(names), aligned)
    if matched == 0:
        raise InputError("--input has no row that --scores has: is it the file that was replayed?")
    return out


def choose_entities(
    table: ScoreTable, alerts: Sequence[AlertEvent], wanted: Sequence[str] | None, max_entities: int
) -> tuple[list[str], list[str]]:
    """(shown, left out): the `wanted` ones, or all, with the most firing alerts first, at most `max_entities`."""
    if max_entities < 1:
        raise InputError("--max-entities must be at least 1")
    if wanted:
        unknown = [e for e in wanted if e not in table.entities]
        if unknown:
            known = ", ".join(sorted(table.entities)[:10])
            raise InputError(f"--entities: not in the scores file: {', '.join(unknown)} (it has: {known} ...)")
        candidates = list(dict.fromkeys(wanted))
    else:
        candidates = list(table.entities)
    firing = Counter(a.entity for a in alerts if a.status == "firing")
    ranked = sorted(candidates, key=lambda e: (-firing[e], -int(table.entities[e].anomaly.sum()), candidates.index(e)))
    return ranked[:max_entities], ranked[max_entities:]


def require_matplotlib() -> None:
    """DetectorError (exit 2) with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DetectorError(
            "detector report needs matplotlib, which is not installed: pip install 'detector[report]'"
        ) from None


def _pyplot_free_figure(height_in: float) -> Figure:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGURE_WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in `mask`."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _date_numbers(ms: np.ndarray) -> np.ndarray:
    """Milliseconds since the Unix epoch as matplotlib date numbers (float days since its epoch)."""
    from matplotlib import dates

    to_num: Callable[[Any], Any] = dates.date2num  # untyped in matplotlib
    return np.asarray(to_num(ms.astype("datetime64[ms]")), np.float64)


def _rank_features(names: list[str], alerts: Sequence[AlertEvent]) -> list[int]:
    named = Counter(f for a in alerts if a.status == "firing" for f in a.top_features)
    order = sorted(range(len(names)), key=lambda i: (-named[names[i]], i))
    return order[:MAX_FEATURES]


def draw_entity(
    series_ax: Axes | None,
    score_ax: Axes,
    trace: EntityTrace,
    features: FeatureTrace | None,
    alerts: list[AlertEvent],
    labeled: Sequence[tuple[int, int]] = (),
) -> None:
    """Draw one entity: features on `series_ax` (when given), score and threshold on `score_ax`.

    Both panels get the training phase (grey) and anomalous windows (red) shaded, labeled
    windows (`labeled`, (start, end) ms: the ground truth of a benchmark) hatched teal, and
    a line at each alert (firing: solid, by severity; resolved: dotted green).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    # Matplotlib date numbers (float days) throughout, so spans and markers are plain floats.
    times = _date_numbers(trace.times)
    step = max(float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / 86400, 1e-3 / 86400)
    panels = [ax for ax in (series_ax, score_ax) if ax is not None]
    handles: list[Any] = []

    train_runs = _runs(trace.train)
    scored_idx = np.flatnonzero(trace.scored)
    anomaly_runs = [(scored_idx[a], scored_idx[b]) for a, b in _runs(trace.anomaly[scored_idx])]
    for ax in panels:
        ax.xaxis_date()
        for a, b in train_runs:
            ax.axvspan(times[a], times[b] + step, color="0.6", alpha=0.2, lw=0)
        for a, b in anomaly_runs:
            ax.axvspan(times[a] - step / 2, times[b] + step / 2, color="#e74c3c", alpha=0.25, lw=0)
        for start, end in labeled:
            # Hatched, not filled: the detector's red shading must stay readable underneath.
            lo, hi = _date_numbers(np.asarray([start, end], np.int64))
            ax.axvspan(lo, hi, facecolor="none", edgecolor=LABELED_COLOR, hatch="//", lw=1.0, alpha=0.8)
        for alert in alerts:
            t = float(_date_numbers(np.asarray([alert.time_ms]))[0])
            if alert.status == "firing":
                ax.axvline(t, color=SEVERITY_COLORS.get(alert.severity, FIRING_COLOR), lw=1.2, alpha=0.9)
            else:
                ax.axvline(t, color="#27ae60", lw=1.0, ls=":")
    if train_runs:
        handles.append(Patch(color="0.6", alpha=0.2, label="training"))
    if anomaly_runs:
        handles.append(Patch(color="#e74c3c", alpha=0.25, label="anomalous"))
    if labeled:
        handles.append(Patch(facecolor="none", edgecolor=LABELED_COLOR, hatch="//", label="labeled window"))
    for severity in dict.fromkeys(a.severity for a in alerts if a.status == "firing"):
        color = SEVERITY_COLORS.get(severity, FIRING_COLOR)
        handles.append(Line2D([], [], color=color, lw=1.2, label=f"alert {severity}".rstrip()))
    if any(a.status == "resolved" for a in alerts):
        handles.append(Line2D([], [], color="#27ae60", lw=1.0, ls=":", label="resolved"))

    if series_ax is not None and features is not None:
        _draw_features(series_ax, times, features, alerts)

    score, threshold = trace.score[scored_idx], trace.threshold[scored_idx]
    if len(scored_idx):
        (line,) = score_ax.plot(times[scored_idx], score, color="#2c3e50", lw=0.8, label="score")
        (thr,) = score_ax.step(
            times[scored_idx], threshold, where="post", color="#c0392b", lw=1.0, ls="--", label="threshold"
        )
        handles[:0] = [line, thr]
        positive = score[score > 0]
        if len(positive) and positive.max() / positive.min() >= 100:
            score_ax.set_yscale("log")
    else:
        score_ax.text(0.5, 0.5, "no scored windows", transform=score_ax.transAxes, ha="center", va="center")
    score_ax.set_ylabel("score")
    score_ax.set_xlim(times[0], times[-1] + step)
    score_ax.grid(alpha=0.3)
    # Outside the plot, on the right: inside, it hides the spikes the picture is for.
    score_ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small", frameon=False)


def _draw_features(ax: Axes, times: np.ndarray, features: FeatureTrace, alerts: list[AlertEvent]) -> None:
    chosen = _rank_features(features.names, alerts)
    if len(features.names) == 1:
        ax.plot(times, features.values[:, 0], lw=0.8, color="#2980b9")
        ax.set_ylabel(features.names[0])
    else:
        # Features in their own units do not share an axis well: each gets a strip, scaled to
        # its own range, labelled with its name.
        for k, i in enumerate(chosen):
            v = features.values[:, i]
            lo, hi = (np.nanmin(v), np.nanmax(v)) if np.isfinite(v).any() else (0.0, 0.0)
            scaled = (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)
            base = len(chosen) - 1 - k
            ax.plot(times, base + 0.1 + 0.8 * scaled, lw=0.8, color=f"C{k % 10}")
        ax.set_yticks([len(chosen) - 1 - k + 0.5 for k in range(len(chosen))])
        ax.set_yticklabels([features.names[i] for i in chosen], fontsize="small")
        ax.set_ylim(0, len(chosen))
        shown = f"{len(chosen)} of {len(features.names)} features" if len(chosen) < len(features.names) else ""
        ax.set_ylabel("each scaled to its range" + (f"\n({shown})" if shown else ""), fontsize="small")
    ax.grid(alpha=0.3, axis="x")
    ax.tick_params(labelbottom=False)


def _entity_title(trace: EntityTrace, alerts: list[AlertEvent]) -> str:
    firing = sum(a.status == "firing" for a in alerts)
    scored = int(trace.scored.sum())
    anomalous = int((trace.anomaly & trace.scored).sum())
    return f"{trace.entity}: {firing} alert(s), {anomalous} anomalous of {scored} scored windows"


def _entity_height(with_features: bool) -> float:
    return SCORE_HEIGHT_IN + (SERIES_HEIGHT_IN if with_features else 0.0) + 0.4


def _draw_into(
    fig: Figure,
    slot: Any,
    trace: EntityTrace,
    features: FeatureTrace | None,
    alerts: list[AlertEvent],
    labeled: Sequence[tuple[int, int]] = (),
) -> None:
    if features is not None:
        inner = slot.subgridspec(2, 1, height_ratios=[SERIES_HEIGHT_IN, SCORE_HEIGHT_IN], hspace=0.02)
        series_ax = fig.add_subplot(inner[0])
        score_ax = fig.add_subplot(inner[1], sharex=series_ax)
        series_ax.set_title(_entity_title(trace, alerts), loc="left", fontsize="medium")
    else:
        series_ax = None
        score_ax = fig.add_subplot(slot)
        score_ax.set_title(_entity_title(trace, alerts), loc="left", fontsize="medium")
    draw_entity(series_ax, score_ax, trace, features, alerts, labeled)


def render_png(
    out: Path,
    table: ScoreTable,
    shown: list[str],
    left_out: list[str],
    alerts: dict[str, list[AlertEvent]],
    features: dict[str, FeatureTrace] | None,
    title: str,
    labeled: Sequence[tuple[int, int]] = (),
) -> None:
    """One figure, FIGURE_WIDTH_IN * DPI pixels wide, a block of panels per shown entity."""
    height = sum(_entity_height(features is not None) for _ in shown) + 0.5
    fig = _pyplot_free_figure(height)
    grid = fig.add_gridspec(len(shown), 1)
    for i, entity in enumerate(shown):
        slot = grid[i]
        trace = table.entities[entity]
        _draw_into(fig, slot, trace, features[entity] if features else None, alerts.get(entity, []), labeled)
    suffix = f"; {len(left_out)} left out (fewest alerts; see --max-entities)" if left_out else ""
    fig.suptitle(f"{title}: {len(shown)} of {len(shown) + len(left_out)} entities{suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")


def entity_png(
    trace: EntityTrace,
    features: FeatureTrace | None,
    alerts: list[AlertEvent],
    labeled: Sequence[tuple[int, int]] = (),
) -> bytes:
    """One entity's panels as PNG bytes."""
    fig = _pyplot_free_figure(_entity_height(features is not None))
    _draw_into(fig, fig.add_gridspec(1, 1)[0], trace, features, alerts, labeled)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return f"<td>{html.escape(str(value))}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
section { margin-bottom: 2em; }
"""


def render_html(
    out: Path,
    table: ScoreTable,
    shown: list[str],
    left_out: list[str],
    alerts: dict[str, list[AlertEvent]],
    features: dict[str, FeatureTrace] | None,
    title: str,
    labeled: Sequence[tuple[int, int]] = (),
) -> None:
    """A self-contained page: summary counts, then per entity an inline PNG and its alerts."""
    all_alerts = [a for events in alerts.values() for a in events]
    good = sum(len(t.rows) for t in table.entities.values())
    summary = [
        ("rows", table.rows),
        ("rejected rows", sum(table.rejected.values())),
        ("training rows", sum(int(t.train.sum()) for t in table.entities.values())),
        ("scored windows", sum(int(t.scored.sum()) for t in table.entities.values())),
        ("anomalous windows", sum(int((t.anomaly & t.scored).sum()) for t in table.entities.values())),
        ("alerts firing", sum(a.status == "firing" for a in all_alerts)),
        ("alerts resolved", sum(a.status == "resolved" for a in all_alerts)),
        ("entities", f"{len(table.entities)} ({len(shown)} shown)"),
        *([("labeled windows", len(labeled))] if labeled else []),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _table(["summary", "count"], summary),
    ]
    if table.rejected:
        parts.append(_table(["rejected reason", "rows"], sorted(table.rejected.items())))
    overview = []
    for i, entity in enumerate(shown):
        t = table.entities[entity]
        firing = sum(a.status == "firing" for a in alerts.get(entity, []))
        link = f'<a href="#e{i}">{html.escape(entity)}</a>'
        overview.append(
            f"<tr><td>{link}</td>{_cell(len(t.rows))}{_cell(int(t.scored.sum()))}"
            f"{_cell(int((t.anomaly & t.scored).sum()))}{_cell(firing)}</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("entity", "rows", "scored", "anomalous", "alerts"))
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(overview)}</tbody></table>")
    if left_out:
        names = ", ".join(left_out[:50]) + (", ..." if len(left_out) > 50 else "")
        parts.append(
            f"<p>{len(left_out)} entities left out (fewest alerts; see --max-entities): {html.escape(names)}</p>"
        )
    for i, entity in enumerate(shown):
        events = alerts.get(entity, [])
        png = entity_png(table.entities[entity], features[entity] if features else None, events, labeled)
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<section id="e{i}"><h2>{html.escape(entity)}</h2>')
        parts.append(f'<img alt="{html.escape(entity, quote=True)}" src="data:image/png;base64,{data}">')
        if events:
            rows = [
                (
                    format_timestamp(a.time_ms),
                    a.status,
                    a.severity,
                    "" if a.score is None else float(a.score),
                    "" if a.threshold is None else float(a.threshold),
                    ", ".join(a.top_features),
                    a.id,
                )
                for a in sorted(events, key=lambda a: a.time_ms)
            ]
            parts.append(_table(["window end", "status", "severity", "score", "threshold", "top features", "id"], rows))
        else:
            parts.append("<p>No alerts.</p>")
        parts.append("</section>")
    parts.append(f"<p><small>{good} good rows plotted from {html.escape(title)}.</small></p></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")


def write_report(
    scores: Path,
    out: Path,
    alerts_path: Path | None = None,
    samples: tuple[SampleBatch, Sequence[str]] | None = None,
    entities: Sequence[str] | None = None,
    max_entities: int = 12,
    labeled: Sequence[tuple[int, int]] = (),
) -> ReportSummary:
    """Read scores (and alerts, and decoded samples with their feature names) and write `out`,
    with `labeled` windows ((start, end) ms) drawn on every entity shown.

    The format follows the suffix of `out`: `.png`, or `.html` / `.htm`.
    """
    kind = out.suffix.lower()
    if kind not in (".png", ".html", ".htm"):
        raise InputError(f"--out must end in .png or .html, got {out.name!r}")
    require_matplotlib()
    table = read_scores(scores)
    events = read_alerts(alerts_path) if alerts_path is not None else alerts_from_scores(table)
    by_entity: dict[str, list[AlertEvent]] = {}
    for event in events:
        if event.entity in table.entities:
            by_entity.setdefault(event.entity, []).append(event)
    shown, left_out = choose_entities(table, events, entities, max_entities)
    features = feature_traces(table, samples[0], samples[1]) if samples is not None else None
    title = f"detector report: {scores.name}"
    render = render_png if kind == ".png" else render_html
    render(out, table, shown, left_out, by_entity, features, title, labeled)
    kept = [a for e in by_entity.values() for a in e]
    return ReportSummary(
        shown=shown,
        left_out=left_out,
        firing=sum(a.status == "firing" for a in kept),
        resolved=sum(a.status == "resolved" for a in kept),
    )
