"""`detector evaluate fraud`: card-fraud detection on the Fraud Detection Handbook simulator.

Data: `fraud/transactions_2018-07.csv.gz` (see ../shared/data/README.md), one row per card
transaction with `timestamp, transaction_id, customer_id, terminal_id, amount, is_fraud,
fraud_scenario`. The detector is unsupervised: its models never train on labels. Labels
enter in one place only, and only with the config that asks for them: the *feedback*
features below, which are built from `is_fraud` known `FEEDBACK_DELAY_DAYS` (7) late, as a
card system learns of confirmed frauds. `fraud_scenario` is read only to score the output.

Two configs, one choice (`detector evaluate fraud --config ...`):

- `configs/transactions.yaml` (the default): with delayed fraud feedback. Its terminals
  stream maps the `terminal_risk_*` features;
- `configs/transactions-label-free.yaml`: the same detector without them; no label is used
  anywhere.

The report says which streams use feedback (`streams[...]["label_feedback"]`). Settings were
chosen on a shifted split (`FraudSplit(7, 7, 0, 7)`, `--split 7,7,0,7` on the command line:
evaluate days 15-21), not on the test week; docs/results.md lists the variants.

Protocol (the handbook's train / delay / test split, adapted to one month and to a detector
that needs no labels):

- days 1-7 (`warmup_days`): history only; the rolling feature windows and the per-entity
  model windows fill, nothing is trained or scored;
- days 8-14 (`train_days`): the autoencoders train on these transactions, with no label as
  a target (with feedback, the inputs of these days carry the risk of days 1-7);
- days 15-21 (`delay_days`): the handbook's delay period (labels of the last week are not
  known yet); here nothing trains on it either, it is scored but not evaluated, so the test
  starts from a warm detector;
- days 22-28 (`test_days`): every transaction is scored and evaluated.

Label-free features (`transaction_features`): per customer, the amount, its log, the time
since the customer's previous transaction, the number and mean amount of the customer's
transactions over the last 1, 7 and 30 days, and the amount relative to the customer's
earlier mean; per terminal, the number and mean amount of its transactions over 1, 7 and 30
days. Every one depends only on transactions at or before it.

Feedback features (`feedback_features`): the handbook's terminal risk, exactly as its
`get_count_risk_rolling_window` defines it: for w in 1, 7, 30 days and delay d = 7 days,
`terminal_risk_nb_tx_{w}d` counts the terminal's transactions in (t - d - w, t - d] and
`terminal_risk_{w}d` is the share of them that are frauds (0 when there are none). Every
value depends only on labels of transactions at least d older. They are what lets a
detector see scenario 2 (a compromised terminal), which changes nothing else in the data.

An upstream enrichment step computes all of these online (per-customer and per-terminal
30-day histories, plus the confirmed frauds for the risk); the daemon expects them in the
records. This evaluation precomputes them for the whole file in one vectorized pass.

Scoring: every stream of the config runs through the daemon's `Pipeline`; both configs have
`customers` (entity = customer, the last few transactions of the card) and `terminals`
(entity = terminal). Each gives a ratio r = score / warning threshold per transaction; the
transaction's score is the max over the streams, i.e. "either stream would alert". A
transaction whose entity has not filled a window yet gets r = 0 from that stream.

Metrics, as in the handbook: AUC-ROC and average precision over the test transactions, and
card precision@100 per day (for each test day, the 100 customers with the highest maximum
score that day; the fraction of them with a fraudulent transaction that day; mean over days).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from detector.config import Config, Stream, load_config
from detector.errors import InputError
from detector.evaluate import warning_only
from detector.pipeline import Pipeline
from detector.source import SampleBatch
from detector.train import fit

log = logging.getLogger(__name__)

DAY_S = 86_400
FEATURE_WINDOWS_DAYS = (1, 7, 30)
CUSTOMER_STREAM = "customers"
TERMINAL_STREAM = "terminals"
DATA_FILE = Path("fraud/transactions_2018-07.csv.gz")
CARD_PRECISION_K = 100
# The handbook's delay before a fraud label is known (chargebacks, investigations).
FEEDBACK_DELAY_DAYS = 7
# The features built from fraud labels (`feedback_features`); a stream that maps none is label-free.
FEEDBACK_FEATURES = frozenset(
    f"terminal_risk{kind}_{days}d" for kind in ("", "_nb_tx") for days in FEATURE_WINDOWS_DAYS
)

# Published on this simulator (AUC-ROC, average precision, card precision@100), from the data README.
PUBLISHED = {
    "unsupervised autoencoder": (0.836, 0.18, 0.217),
    "isolation forest": (0.808, 0.164, 0.19),
    "supervised LSTM": (0.876, 0.665, 0.297),
    "XGBoost (supervised)": (0.869, 0.687, 0.303),
}


@dataclass(frozen=True)
class FraudSplit:
    """Consecutive periods in whole days from the first day of the file (see the module doc)."""

    warmup_days: int = 7
    train_days: int = 7
    delay_days: int = 7
    test_days: int = 7

    @staticmethod
    def parse(text: str) -> FraudSplit:
        """`"7,7,0,7"` (warmup, train, delay, test days) -> FraudSplit(7, 7, 0, 7); the choice
        week of docs/results.md is that one. Raises ValueError on anything else.

        >>> FraudSplit.parse("7,7,0,7")
        FraudSplit(warmup_days=7, train_days=7, delay_days=0, test_days=7)
        """
        parts = text.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"expected four whole numbers of days WARMUP,TRAIN,DELAY,TEST, got {text!r}")
        split = FraudSplit(*(int(p) for p in parts))
        if split.train_days < 1 or split.test_days < 1:
            raise ValueError(f"train and test need at least one day each, got {text!r}")
        return split


# --- data --------------------------------------------------------------------------------


@dataclass
class Transactions:
    """A transaction table in time order.

    Shape:
        every field: (N,); timestamp_s int64 seconds since the Unix epoch (UTC), amount
        float64, customer/terminal int64 ids, is_fraud int8 (0/1), scenario int8 (0-3)
    """

    timestamp_s: np.ndarray
    customer: np.ndarray
    terminal: np.ndarray
    amount: np.ndarray
    is_fraud: np.ndarray
    scenario: np.ndarray

    def __len__(self) -> int:
        return len(self.timestamp_s)

    def take(self, index: np.ndarray) -> Transactions:
        return Transactions(*(np.asarray(getattr(self, f))[index] for f in _TX_FIELDS))


_TX_FIELDS = ("timestamp_s", "customer", "terminal", "amount", "is_fraud", "scenario")


def load_transactions(path: Path) -> Transactions:
    """Read the handbook's CSV (plain or .gz), sorted by time (stable)."""
    if not path.exists():
        raise InputError(f"{path}: no such file (see ../shared/data/README.md, fraud/)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        cols = {name: i for i, name in enumerate(header)}
        need = ["timestamp", "customer_id", "terminal_id", "amount", "is_fraud", "fraud_scenario"]
        missing = [c for c in need if c not in cols]
        if missing:
            raise InputError(f"{path}: missing columns {missing}")
        rows = list(reader)
    if not rows:
        raise InputError(f"{path}: no transactions")
    table = np.array(rows, dtype=object)

    def col(name: str) -> np.ndarray:
        return table[:, cols[name]]

    try:
        ts = np.array(col("timestamp").astype(str), dtype="datetime64[s]").astype(np.int64)
        tx = Transactions(
            timestamp_s=ts,
            customer=col("customer_id").astype(np.int64),
            terminal=col("terminal_id").astype(np.int64),
            amount=col("amount").astype(np.float64),
            is_fraud=col("is_fraud").astype(np.int8),
            scenario=col("fraud_scenario").astype(np.int8),
        )
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    return tx.take(np.argsort(tx.timestamp_s, kind="stable"))


# --- feature engineering -----------------------------------------------------------------


def rolling_count_sum(
    entity: np.ndarray, timestamp_s: np.ndarray, value: np.ndarray, window_s: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the count and sum of `value` over the rows of the same entity with a
    timestamp in (t - window_s, t], the row itself included (the handbook's windows).

    Rows must be in time order within each entity (ties keep input order; a tie counts the
    earlier rows and the row itself, as a stream would see it).

    Shape:
        entity, timestamp_s, value: (N,); returns count (N,) int64, sum (N,) float64
    """
    n = len(entity)
    order = np.lexsort((np.arange(n), timestamp_s, entity))
    e, t, v = entity[order], timestamp_s[order], value[order].astype(np.float64)
    # Sorted by (entity, time): the window start is a searchsorted on a combined key.
    span = int(t.max() - t.min()) + window_s + 1 if n else 1
    key = (e - e.min()) * span + (t - t.min()) if n else t
    start = np.searchsorted(key, key - window_s, side="right")
    csum = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(n)
    count = np.empty(n, np.int64)
    total = np.empty(n, np.float64)
    count[order] = idx - start + 1
    total[order] = csum[idx + 1] - csum[start]
    return count, total


def previous_gap_s(entity: np.ndarray, timestamp_s: np.ndarray, default_s: float) -> np.ndarray:
    """Seconds since the entity's previous row (`default_s` for its first).

    Shape:
        entity, timestamp_s: (N,); returns (N,) float64
    """
    n = len(entity)
    order = np.lexsort((np.arange(n), timestamp_s, entity))
    e, t = entity[order], timestamp_s[order]
    gap = np.full(n, float(default_s))
    if n > 1:
        same = e[1:] == e[:-1]
        gap[1:][same] = (t[1:] - t[:-1])[same]
    out = np.empty(n, np.float64)
    out[order] = gap
    return out


def delayed_fraud_risk(
    entity: np.ndarray, timestamp_s: np.ndarray, is_fraud: np.ndarray, delay_s: int, window_s: int
) -> tuple[np.ndarray, np.ndarray]:
    """The handbook's delayed risk (`get_count_risk_rolling_window`): for each row at time t,
    the number of the entity's rows in (t - delay_s - window_s, t - delay_s] and the fraction
    of them that are fraudulent (0 when there are none).

    Every value depends only on labels of rows at least `delay_s` older than the row: confirmed
    frauds (chargebacks) arrive with that delay. Two rolling windows, (t - delay - window, t]
    and (t - delay, t], share their right edge, so their difference is the delayed window.

    Shape:
        entity, timestamp_s, is_fraud: (N,); returns count (N,) int64, risk (N,) float64
    """
    recent_count, recent_frauds = rolling_count_sum(entity, timestamp_s, is_fraud, delay_s)
    all_count, all_frauds = rolling_count_sum(entity, timestamp_s, is_fraud, delay_s + window_s)
    count = all_count - recent_count
    frauds = all_frauds - recent_frauds
    risk = np.divide(frauds, count, out=np.zeros(len(count)), where=count > 0)
    return count, risk


def feedback_features(tx: Transactions, delay_days: int = FEEDBACK_DELAY_DAYS) -> dict[str, np.ndarray]:
    """The handbook's terminal risk features, built from fraud labels known `delay_days` late.

    Per window w of `FEATURE_WINDOWS_DAYS`: `terminal_risk_nb_tx_{w}d`, the terminal's
    transactions in (t - delay - w, t - delay], and `terminal_risk_{w}d`, the fraction of them
    that are confirmed frauds (see `delayed_fraud_risk`). They need label feedback, so they
    are kept apart from the label-free `transaction_features`.

    Shape:
        returns: name -> (N,) float64, in `tx` order
    """
    out: dict[str, np.ndarray] = {}
    for days in FEATURE_WINDOWS_DAYS:
        count, risk = delayed_fraud_risk(tx.terminal, tx.timestamp_s, tx.is_fraud, delay_days * DAY_S, days * DAY_S)
        out[f"terminal_risk_nb_tx_{days}d"] = count.astype(np.float64)
        out[f"terminal_risk_{days}d"] = risk
    return out


def transaction_features(tx: Transactions) -> dict[str, np.ndarray]:
    """Label-free per-transaction features (see the module doc), by name.

    `customer_amount_ratio` is the amount over the mean of the customer's earlier
    transactions in the last 30 days (1 for a customer's first transaction there).

    Shape:
        returns: name -> (N,) float64, in `tx` order
    """
    out: dict[str, np.ndarray] = {
        "amount": tx.amount.astype(np.float64),
        "log_amount": np.log1p(np.maximum(tx.amount, 0.0)),
    }
    max_window = max(FEATURE_WINDOWS_DAYS) * DAY_S
    gap = previous_gap_s(tx.customer, tx.timestamp_s, max_window)
    out["customer_log_hours_since_previous"] = np.log1p(gap / 3600.0)
    for days in FEATURE_WINDOWS_DAYS:
        count, total = rolling_count_sum(tx.customer, tx.timestamp_s, tx.amount, days * DAY_S)
        out[f"customer_nb_tx_{days}d"] = count.astype(np.float64)
        out[f"customer_avg_amount_{days}d"] = total / count
        if days == max(FEATURE_WINDOWS_DAYS):
            earlier = count - 1
            earlier_mean = np.divide(total - tx.amount, earlier, out=np.zeros(len(tx)), where=earlier > 0)
            out["customer_amount_ratio"] = np.where(
                (earlier > 0) & (earlier_mean > 0), tx.amount / np.where(earlier_mean > 0, earlier_mean, 1.0), 1.0
            )
    for days in FEATURE_WINDOWS_DAYS:
        count, total = rolling_count_sum(tx.terminal, tx.timestamp_s, tx.amount, days * DAY_S)
        out[f"terminal_nb_tx_{days}d"] = count.astype(np.float64)
        out[f"terminal_avg_amount_{days}d"] = total / count
    return out


def stream_samples(
    stream: Stream, tx: Transactions, features: dict[str, np.ndarray], entity: np.ndarray
) -> SampleBatch:
    """The stream's samples: its mapped feature names picked from `features`, one per row.

    Shape:
        entity: (N,) ids; returns a SampleBatch of N rows, positions = row indices
    """
    names = stream.mapping.feature_names
    unknown = [n for n in names if n not in features]
    if unknown:
        raise InputError(f"unknown transaction features {unknown}; available: {sorted(features)}")
    values = np.stack([features[n] for n in names], axis=1).astype(np.float32)
    return SampleBatch(
        entities=[str(x) for x in entity.tolist()],
        timestamps=tx.timestamp_s * 1000,
        values=values,
        positions=np.arange(len(tx), dtype=np.int64),
    )


# --- metrics -----------------------------------------------------------------------------


def _sklearn_metrics() -> Any:
    try:
        from sklearn import metrics
    except ImportError:
        raise InputError("detector evaluate fraud needs scikit-learn: pip install -e '.[eval]'") from None
    return metrics


def auc_roc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), NaN without both classes.

    >>> auc_roc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(_sklearn_metrics().roc_auc_score(y, np.asarray(scores, np.float64)))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise average precision (scikit-learn's `average_precision_score`); NaN without positives.

    >>> round(average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])), 6)
    0.833333
    """
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    return float(_sklearn_metrics().average_precision_score(y, np.asarray(scores, np.float64)))


def card_precision_at_k(
    day: np.ndarray, customer: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = CARD_PRECISION_K
) -> tuple[float, list[float]]:
    """Mean over days of: among the k customers with the highest maximum score that day
    (ties: lower customer id first), the fraction with a fraudulent transaction that day.

    Shape:
        day, customer, labels, scores: (N,); returns (mean, per-day list in day order)
    """
    per_day: list[float] = []
    for d in np.unique(day):
        rows = day == d
        cust, inverse = np.unique(customer[rows], return_inverse=True)
        best = np.full(len(cust), -np.inf)
        np.maximum.at(best, inverse, scores[rows])
        fraud = np.zeros(len(cust), bool)
        np.logical_or.at(fraud, inverse, np.asarray(labels[rows]).astype(bool))
        top = np.lexsort((cust, -best))[:k]
        per_day.append(float(fraud[top].sum()) / k)
    return (float(np.mean(per_day)) if per_day else float("nan")), per_day


# --- the evaluation ----------------------------------------------------------------------


@dataclass
class StreamScores:
    """One stream's r = score / threshold for every transaction (0 where no window)."""

    name: str
    ratio: np.ndarray
    train_rows: int
    train_windows: int
    epochs: int
    seconds: float


@dataclass
class MetricSet:
    auc_roc: float
    average_precision: float
    card_precision_at_100: float
    auc_roc_by_scenario: dict[str, float] = field(default_factory=dict)


@dataclass
class FraudReport:
    data: str
    config: str
    split: dict[str, str]
    test_transactions: int
    test_frauds: int
    frauds_by_scenario: dict[str, int]
    results: dict[str, MetricSet]
    card_precision_per_day: list[float]
    streams: dict[str, dict[str, float | bool]]
    seconds: float
    feedback_delay_days: int = FEEDBACK_DELAY_DAYS


def period_bounds(tx: Transactions, split: FraudSplit) -> dict[str, tuple[int, int]]:
    """[start, end) seconds of each period, from midnight UTC of the first transaction's day."""
    day0 = int(tx.timestamp_s.min()) // DAY_S * DAY_S
    bounds, start = {}, day0
    for name, days in (("warmup", split.warmup_days), ("train", split.train_days),
                       ("delay", split.delay_days), ("test", split.test_days)):  # fmt: skip
        bounds[name] = (start, start + days * DAY_S)
        start += days * DAY_S
    return bounds


def score_stream(name: str, stream: Stream, config: Config, samples: SampleBatch, period: np.ndarray) -> StreamScores:
    """Train on the `train` rows, fill windows with `warmup`, score `delay` and `test`; r is the
    score over the stream's warning threshold (its critical rule plays no part).

    `period` codes each row: 0 warmup, 1 train, 2 delay, 3 test, 4 after the test.

    Shape:
        period: (N,) int; returns ratio (N,), 0 outside delay/test or where no window
    """
    started = time.monotonic()
    stream = warning_only(stream)
    ckpt = fit(name, stream, samples.take(period == 1), progress=False)
    pipeline = Pipeline(name, stream, ckpt, config.scoring)
    ratio = np.zeros(len(samples))
    pipeline.process(samples.take(period <= 1), mode="fill")
    scored = np.flatnonzero((period == 2) | (period == 3))
    for start in range(0, len(scored), 20_000):
        rows = scored[start : start + 20_000]
        result = pipeline.process(samples.take(rows), mode="score")
        r = result.score / np.maximum(result.threshold, 1e-12)
        ratio[rows] = np.nan_to_num(r, nan=0.0)
    return StreamScores(
        name,
        ratio,
        int(ckpt.training["rows"]),
        int(ckpt.training["train_windows"]),
        int(ckpt.training["epochs"]),
        time.monotonic() - started,
    )


def metric_set(tx: Transactions, day: np.ndarray, scores: np.ndarray) -> tuple[MetricSet, list[float]]:
    cp, per_day = card_precision_at_k(day, tx.customer, tx.is_fraud, scores)
    by_scenario = {}
    for s in (1, 2, 3):
        keep = (tx.scenario == s) | (tx.is_fraud == 0)
        if (tx.scenario[keep] == s).any():
            by_scenario[str(s)] = auc_roc(tx.is_fraud[keep], scores[keep])
    return MetricSet(auc_roc(tx.is_fraud, scores), average_precision(tx.is_fraud, scores), cp, by_scenario), per_day


def stream_entity(name: str, stream: Stream, tx: Transactions) -> np.ndarray:
    """The entity column of a stream: `customer_id` or `terminal_id` (one of them, alone)."""
    columns = {"customer_id": tx.customer, "terminal_id": tx.terminal}
    if len(stream.mapping.entity) != 1 or stream.mapping.entity[0] not in columns:
        raise InputError(f"stream {name!r}: mapping.entity must be [customer_id] or [terminal_id]")
    return columns[stream.mapping.entity[0]]


def evaluate_fraud(
    data_dir: Path,
    config_path: Path,
    out: Path,
    split: FraudSplit | None = None,
    data_file: Path | None = None,
    feedback_delay_days: int = FEEDBACK_DELAY_DAYS,
) -> FraudReport:
    """Run the whole protocol and return the report (see the module doc).

    Every stream of the config is scored; `combined` is the max over all of them. A stream
    may map the feedback features (`feedback_features`, fraud labels known
    `feedback_delay_days` late); the report marks which streams do (`label_feedback`).
    """
    started = time.monotonic()
    if feedback_delay_days < 1:
        # With no delay a transaction's risk would count its own label.
        raise InputError(f"feedback_delay_days must be at least 1, got {feedback_delay_days}")
    split = split or FraudSplit()
    config = load_config(config_path)
    missing = [s for s in (CUSTOMER_STREAM, TERMINAL_STREAM) if s not in config.streams]
    if missing:
        raise InputError(f"{config_path}: needs streams {CUSTOMER_STREAM!r} and {TERMINAL_STREAM!r}, missing {missing}")
    path = data_file or data_dir / DATA_FILE
    tx = load_transactions(path)
    features = transaction_features(tx)
    # Labels are read for features only when some stream asks for feedback.
    mapped = {n for stream in config.streams.values() for n in stream.mapping.feature_names}
    feedback = feedback_features(tx, feedback_delay_days) if mapped & FEEDBACK_FEATURES else {}
    bounds = period_bounds(tx, split)
    period = np.full(len(tx), 4, np.int8)
    for code, name in reversed(list(enumerate(("warmup", "train", "delay", "test")))):
        period[tx.timestamp_s < bounds[name][1]] = code
    if not (period == 3).any() or not (period == 1).any():
        raise InputError(f"{path}: the data covers no train or no test days for split {split}")
    log.info("fraud: %d transactions; features: %s", len(tx), ", ".join([*features, *feedback]))

    if config.scoring.threads is not None:
        torch.set_num_threads(config.scoring.threads)
    streams: dict[str, StreamScores] = {}
    for name, stream in config.streams.items():
        samples = stream_samples(stream, tx, features | feedback, stream_entity(name, stream, tx))
        streams[name] = score_stream(name, stream, config, samples, period)
        log.info("fraud: stream %s trained and scored in %.1f s", name, streams[name].seconds)

    test = period == 3
    t = tx.take(test)
    day = (t.timestamp_s // DAY_S).astype(np.int64)
    candidates = {"combined": np.max([s.ratio for s in streams.values()], axis=0)[test]}
    candidates |= {name: s.ratio[test] for name, s in streams.items()}
    results, per_day = {}, []
    for name, scores in candidates.items():
        results[name], days = metric_set(t, day, scores)
        if name == "combined":
            per_day = days
    out.mkdir(parents=True, exist_ok=True)
    _write_scores(out / "scores.csv.gz", t, candidates)

    def iso(s: int) -> str:
        return str(np.datetime64(s, "s"))[:10]

    return FraudReport(
        data=str(path),
        config=str(config_path),
        split={name: f"{iso(a)} .. {iso(b - 1)}" for name, (a, b) in bounds.items()},
        test_transactions=int(test.sum()),
        test_frauds=int(t.is_fraud.sum()),
        frauds_by_scenario={str(s): int((t.scenario == s).sum()) for s in (1, 2, 3)},
        results=results,
        card_precision_per_day=per_day,
        streams={
            n: {
                "train_rows": s.train_rows,
                "train_windows": s.train_windows,
                "epochs": s.epochs,
                "seconds": round(s.seconds, 1),
                "label_feedback": bool(set(config.streams[n].mapping.feature_names) & FEEDBACK_FEATURES),
            }
            for n, s in streams.items()
        },
        seconds=time.monotonic() - started,
        feedback_delay_days=feedback_delay_days,
    )


def _write_scores(path: Path, tx: Transactions, scores: dict[str, np.ndarray]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp_s", "customer_id", "terminal_id", "amount", "is_fraud", "fraud_scenario", *scores])
        cols = [tx.timestamp_s, tx.customer, tx.terminal, tx.amount, tx.is_fraud, tx.scenario]
        for i in range(len(tx)):
            writer.writerow([*(c[i] for c in cols), *(f"{s[i]:.6g}" for s in scores.values())])


def fraud_seed_row(report: FraudReport) -> dict[str, float]:
    """The combined score's AUC-ROC, average precision and card precision@100 (a row of
    `detector evaluate fraud --seeds`)."""
    combined = report.results["combined"]
    return {"AUC-ROC": combined.auc_roc, "AP": combined.average_precision, "CP@100": combined.card_precision_at_100}


def print_fraud_report(report: FraudReport, file: TextIO | None = None) -> None:
    out = file or sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"fraud: {report.data}, config {report.config}")
    for name, span in report.split.items():
        say(f"  {name:6s} {span}")
    say(f"test: {report.test_transactions} transactions, {report.test_frauds} frauds "
        f"(by scenario {report.frauds_by_scenario})")  # fmt: skip
    feedback = [n for n, s in report.streams.items() if s["label_feedback"]]
    say(f"label feedback (fraud labels known {report.feedback_delay_days} d late): "
        + (f"streams {', '.join(feedback)}" if feedback else "none, label-free"))  # fmt: skip
    say()
    say(f"{'detector':34s} {'AUC-ROC':>8s} {'AP':>7s} {'CP@100':>7s}  AUC by scenario 1/2/3")
    for name, m in report.results.items():
        sc = "/".join(f"{v:.3f}" for v in m.auc_roc_by_scenario.values())
        cp = m.card_precision_at_100
        say(f"{'detector ' + name:34s} {m.auc_roc:8.3f} {m.average_precision:7.3f} {cp:7.3f}  {sc}")
    for name, (auc, ap, cp) in PUBLISHED.items():
        say(f"{name + ' (published)':34s} {auc:8.3f} {ap:7.3f} {cp:7.3f}")
    say()
    say(f"wall time {report.seconds:.1f} s; streams: {report.streams}")


def write_fraud_report(report: FraudReport, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return path
