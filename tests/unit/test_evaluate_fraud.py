"""`detector evaluate fraud`: metrics on hand-computed cases, features on a hand-built table,
and one end-to-end run on tiny synthetic transactions."""

from __future__ import annotations

import gzip
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from detector.cli import main
from detector.config import load_config
from detector.evaluate_fraud import (
    DAY_S,
    FEEDBACK_FEATURES,
    FraudSplit,
    Transactions,
    auc_roc,
    average_precision,
    card_precision_at_k,
    delayed_fraud_risk,
    evaluate_fraud,
    feedback_features,
    load_transactions,
    print_fraud_report,
    rolling_count_sum,
    score_stream,
    stream_entity,
    stream_samples,
    transaction_features,
    write_fraud_report,
)

ROOT = Path(__file__).resolve().parents[2]

# --- metrics ----------------------------------------------------------------------------


def test_auc_roc_hand_computed() -> None:
    # Pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>both yes: 3 of 4.
    assert auc_roc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc_roc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert auc_roc(np.array([1, 0]), np.array([0.2, 0.9])) == 0.0


def test_auc_roc_ties_count_half() -> None:
    assert auc_roc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    # pos 0.5 vs negs 0.5 (tie: 1/2) and 0.1 (win: 1) -> 1.5 / 2
    assert auc_roc(np.array([0, 0, 1]), np.array([0.5, 0.1, 0.5])) == pytest.approx(0.75)


def test_metrics_undefined_without_both_classes() -> None:
    assert math.isnan(auc_roc(np.array([0, 0]), np.array([0.1, 0.2])))
    assert math.isnan(average_precision(np.array([0, 0]), np.array([0.1, 0.2])))


def test_average_precision_hand_computed() -> None:
    # Highest first: 0.8 (fraud) P=1 R=.5; 0.4 (genuine); 0.35 (fraud) P=2/3 R=1.
    # AP = .5*1 + .5*2/3 = 5/6.
    ap = average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert ap == pytest.approx(5 / 6)
    assert average_precision(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == 1.0


def test_average_precision_ties_form_one_threshold() -> None:
    # One threshold takes both rows at once: P = 1/2, R = 1.
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    # 0.9 (fraud) P=1 R=1/2; then the tie {0.3 fraud, 0.3 genuine}: P=2/3 R=1 -> .5 + .5*2/3
    ap = average_precision(np.array([1, 1, 0]), np.array([0.9, 0.3, 0.3]))
    assert ap == pytest.approx(0.5 + 1 / 3)


def test_metrics_match_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.1).astype(int)
    s = np.round(rng.random(500) + 0.3 * y, 2)  # rounding makes ties
    assert auc_roc(y, s) == pytest.approx(metrics.roc_auc_score(y, s))
    assert average_precision(y, s) == pytest.approx(metrics.average_precision_score(y, s))


def test_card_precision_at_k_per_day() -> None:
    # Day 0: customer max scores 1: .9 (fraud), 2: .8, 3: .1 (fraud) -> top 2 = {1, 2}: 1/2.
    # Day 1: 1: .2, 3: .7 (fraud) -> top 2 = {3, 1}: 1/2 ... plus customer 2: .6 -> {3, 2}: 1/2.
    day = np.array([0, 0, 0, 0, 1, 1, 1])
    cust = np.array([1, 1, 2, 3, 1, 3, 2])
    label = np.array([0, 1, 0, 1, 0, 1, 0])
    score = np.array([0.9, 0.3, 0.8, 0.1, 0.2, 0.7, 0.6])
    mean, per_day = card_precision_at_k(day, cust, label, score, k=2)
    assert per_day == [0.5, 0.5]
    assert mean == 0.5
    # With k = 3 every customer of day 0 is taken: 2 fraudulent of 3.
    _, per_day = card_precision_at_k(day, cust, label, score, k=3)
    assert per_day[0] == pytest.approx(2 / 3)


# --- features ---------------------------------------------------------------------------


def _table() -> Transactions:
    # customer 1: t=0 ($10, terminal 7), 1 h ($20, terminal 8), 2 days ($30, terminal 7);
    # customer 2: 30 min ($40, terminal 7).
    return Transactions(
        timestamp_s=np.array([0, 1800, 3600, 2 * DAY_S]),
        customer=np.array([1, 2, 1, 1]),
        terminal=np.array([7, 7, 8, 7]),
        amount=np.array([10.0, 40.0, 20.0, 30.0]),
        is_fraud=np.zeros(4, np.int8),
        scenario=np.zeros(4, np.int8),
    )


def test_transaction_features_by_hand() -> None:
    f = transaction_features(_table())
    np.testing.assert_allclose(f["customer_nb_tx_1d"], [1, 1, 2, 1])
    np.testing.assert_allclose(f["customer_avg_amount_1d"], [10, 40, 15, 30])
    np.testing.assert_allclose(f["customer_nb_tx_7d"], [1, 1, 2, 3])
    np.testing.assert_allclose(f["customer_avg_amount_7d"], [10, 40, 15, 20])
    # Earlier 30-day mean: none (1), none (1), 10 -> 20/10, 15 -> 30/15.
    np.testing.assert_allclose(f["customer_amount_ratio"], [1, 1, 2, 2])
    hours = np.expm1(f["customer_log_hours_since_previous"])
    np.testing.assert_allclose(hours, [30 * 24, 30 * 24, 1, 47])
    np.testing.assert_allclose(f["terminal_nb_tx_1d"], [1, 2, 1, 1])
    np.testing.assert_allclose(f["terminal_avg_amount_1d"], [10, 25, 20, 30])
    np.testing.assert_allclose(f["terminal_nb_tx_30d"], [1, 2, 1, 3])
    np.testing.assert_allclose(f["log_amount"], np.log1p([10, 40, 20, 30]))


def test_rolling_window_excludes_its_left_edge() -> None:
    # (t - w, t]: the row exactly w earlier is out, one a second later is in.
    count, total = rolling_count_sum(np.array([5, 5, 5]), np.array([0, 1, 100]), np.array([1.0, 2.0, 4.0]), 100)
    np.testing.assert_array_equal(count, [1, 2, 2])
    np.testing.assert_allclose(total, [1, 3, 6])


def test_features_depend_only_on_the_past() -> None:
    # Appending a later transaction changes none of the earlier rows' features (online-computable).
    tx = _table()
    later = Transactions(*(np.append(getattr(tx, n), v) for n, v in
                           zip(("timestamp_s", "customer", "terminal", "amount", "is_fraud", "scenario"),
                               (2 * DAY_S + 60, 1, 7, 500.0, 1, 1), strict=True)))  # fmt: skip
    before, after = transaction_features(tx), transaction_features(later)
    for name in before:
        np.testing.assert_allclose(after[name][:4], before[name], err_msg=name)


def test_delayed_fraud_risk_by_hand() -> None:
    # Terminal 7 at days 0 (fraud), 0.5, 1 (fraud), 8, 8.5; terminal 9 at day 8 (no history).
    day = DAY_S // 2
    t = np.array([0, day, 2 * day, 16 * day, 16 * day, 17 * day])
    terminal = np.array([7, 7, 7, 7, 9, 7])
    fraud = np.array([1, 0, 1, 0, 0, 0])
    count, risk = delayed_fraud_risk(terminal, t, fraud, 7 * DAY_S, DAY_S)
    # Day 8: (day 0, day 1] holds 0.5 and 1 (day 0 is on the left edge): 1 fraud of 2.
    # Day 8.5: (0.5, 1.5] holds day 1 only. The first days and terminal 9 see nothing: 0, not NaN.
    np.testing.assert_array_equal(count, [0, 0, 0, 2, 0, 1])
    np.testing.assert_allclose(risk, [0, 0, 0, 0.5, 0, 1])
    count, risk = delayed_fraud_risk(terminal, t, fraud, 7 * DAY_S, 7 * DAY_S)
    np.testing.assert_array_equal(count, [0, 0, 0, 3, 0, 3])
    np.testing.assert_allclose(risk, [0, 0, 0, 2 / 3, 0, 2 / 3])


def test_feedback_features_use_only_labels_older_than_the_delay() -> None:
    # Relabel every transaction after a cut time T at random: a transaction at t <= T + 7 days
    # only sees labels at or before t - 7 days <= T, so none of its features may change.
    rng = np.random.default_rng(3)
    n = 4000
    tx = Transactions(
        timestamp_s=np.sort(rng.integers(0, 40 * DAY_S, n)),
        customer=rng.integers(0, 50, n),
        terminal=rng.integers(0, 20, n),
        amount=rng.uniform(1, 100, n),
        is_fraud=(rng.random(n) < 0.2).astype(np.int8),
        scenario=np.zeros(n, np.int8),
    )
    before = feedback_features(tx, delay_days=7)
    assert set(before) == FEEDBACK_FEATURES == {f"terminal_risk{k}_{w}d" for k in ("", "_nb_tx") for w in (1, 7, 30)}
    for cut_day in (5, 12.5, 20):
        cut = int(cut_day * DAY_S)
        relabeled = tx.take(np.arange(n))  # a copy
        late = tx.timestamp_s > cut
        relabeled.is_fraud[late] = 1 - relabeled.is_fraud[late]
        after = feedback_features(relabeled, delay_days=7)
        seen = tx.timestamp_s <= cut + 7 * DAY_S
        for name in before:
            np.testing.assert_array_equal(after[name][seen], before[name][seen], err_msg=name)
        # The relabeling is visible once it is 7 days old: the check above could fail.
        assert not np.array_equal(after["terminal_risk_7d"], before["terminal_risk_7d"])
    # The counts of the risk windows do not depend on labels at all.
    np.testing.assert_array_equal(after["terminal_risk_nb_tx_30d"], before["terminal_risk_nb_tx_30d"])


def test_transactions_config_uses_known_features() -> None:
    label_free, feedback = set(transaction_features(_table())), set(feedback_features(_table()))
    config = load_config(ROOT / "configs/transactions.yaml")
    for stream in config.streams.values():
        assert set(stream.mapping.feature_names) <= label_free | feedback
    assert feedback <= set(config.streams["terminals"].mapping.feature_names)
    config = load_config(ROOT / "configs/transactions-label-free.yaml")
    for stream in config.streams.values():
        assert set(stream.mapping.feature_names) <= label_free


# --- end to end -------------------------------------------------------------------------

TINY_CONFIG = """
scoring: {threads: 1}
streams:
  customers:
    input: {kind: kafka, topic: t}
    mapping:
      entity: [customer_id]
      features: [log_amount, customer_amount_ratio, customer_nb_tx_1d]
    window: {size: 2}
    model: {cell: gru, hidden_size: 4, latent_size: 2}
    training: {epochs: 3, batch_size: 32, seed: 0}
    thresholds: {warning: {rule: quantile, q: 0.99}}
  terminals:
    input: {kind: kafka, topic: t}
    mapping:
      entity: [terminal_id]
      features: [log_amount, terminal_nb_tx_1d]
    window: {size: 2}
    model: {cell: gru, hidden_size: 4, latent_size: 2}
    training: {epochs: 3, batch_size: 32, seed: 0}
    thresholds: {warning: {rule: quantile, q: 0.99}}
"""


def _write_synthetic(path: Path) -> None:
    """4 days, 20 customers with 6 transactions a day around their own mean amount; on the
    last day each of 5 customers has one fraud at 40x its mean."""
    rng = np.random.default_rng(1)
    rows = []
    tx_id = 0
    for day in range(4):
        for c in range(20):
            mean = 10 + 5 * c
            for k in range(6):
                t = day * DAY_S + k * 3600 + c * 60
                fraud = day == 3 and c % 4 == 0 and k == 3
                amount = mean * (40 if fraud else rng.uniform(0.8, 1.2))
                rows.append((t, tx_id, c, (c + k) % 7, round(amount, 2), int(fraud), 1 if fraud else 0))
                tx_id += 1
    rows.sort()
    with gzip.open(path, "wt") as f:
        f.write("timestamp,transaction_id,customer_id,terminal_id,amount,is_fraud,fraud_scenario\n")
        for t, i, c, term, amount, fraud, sc in rows:
            stamp = str(np.datetime64(1530403200 + t, "s")).replace("T", " ")
            f.write(f"{stamp},{i},{c},{term},{amount},{fraud},{sc}\n")


def test_end_to_end_on_tiny_synthetic_data(tmp_path: Path) -> None:
    data = tmp_path / "tx.csv.gz"
    _write_synthetic(data)
    assert len(load_transactions(data)) == 4 * 20 * 6
    config = tmp_path / "transactions.yaml"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "out"
    report = evaluate_fraud(tmp_path, config, out, split=FraudSplit(1, 1, 1, 1), data_file=data)
    assert report.test_transactions == 20 * 6
    assert report.test_frauds == 5
    assert set(report.results) == {"combined", "customers", "terminals"}
    assert not any(s["label_feedback"] for s in report.streams.values())
    customers = report.results["customers"]
    # A 40x amount against the card's own history is the easiest fraud there is.
    assert customers.auc_roc > 0.9
    assert 0 < customers.average_precision <= 1
    assert len(report.card_precision_per_day) == 1
    saved = json.loads(write_fraud_report(report, out).read_text())
    assert saved["results"]["combined"]["auc_roc"] == pytest.approx(report.results["combined"].auc_roc)
    with gzip.open(out / "scores.csv.gz", "rt") as f:
        assert sum(1 for _ in f) == 1 + 20 * 6


def test_feedback_features_reach_the_streams_that_map_them(tmp_path: Path) -> None:
    data = tmp_path / "tx.csv.gz"
    _write_synthetic(data)
    config = tmp_path / "transactions.yaml"
    config.write_text(TINY_CONFIG.replace("[log_amount, terminal_nb_tx_1d]", "[log_amount, terminal_risk_1d]"))
    report = evaluate_fraud(
        tmp_path, config, tmp_path / "out", split=FraudSplit(1, 1, 1, 1), data_file=data, feedback_delay_days=1
    )
    assert report.streams["terminals"]["label_feedback"] is True
    assert report.streams["customers"]["label_feedback"] is False
    out = io.StringIO()
    print_fraud_report(report, out)
    assert "label feedback (fraud labels known 1 d late): streams terminals" in out.getvalue()


def test_split_parses_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert FraudSplit.parse("7,7,0,7") == FraudSplit(7, 7, 0, 7)
    assert FraudSplit.parse(" 7, 7, 7, 7") == FraudSplit()
    for bad in ("7,7,7", "7,7,-1,7", "7,0,7,7", "7,7,7,0", "a,7,7,7"):
        with pytest.raises(ValueError):
            FraudSplit.parse(bad)
    code = main(["evaluate", "fraud", "--data-dir", str(tmp_path), "--split", "7,7", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--split" in capsys.readouterr().err


def cli_args(tmp_path: Path, out: Path) -> list[str]:
    """`detector evaluate fraud` on synthetic data and the tiny config written under `tmp_path`."""
    data = tmp_path / "fraud" / "transactions_2018-07.csv.gz"
    data.parent.mkdir()
    _write_synthetic(data)
    config = tmp_path / "transactions.yaml"
    config.write_text(TINY_CONFIG)
    return ["evaluate", "fraud", "--data-dir", str(tmp_path), "--config", str(config), "--out", str(out)]


def test_split_from_the_command_line_reaches_the_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = cli_args(tmp_path, out)
    assert main([*args, "--split", "1,1,0,2"]) == 0
    saved = json.loads((out / "results.json").read_text())
    # No delay: the test starts on day 3, right after training, and holds the last two days.
    assert saved["split"]["test"] == "2018-07-03 .. 2018-07-04"
    assert saved["test_transactions"] == 2 * 20 * 6


def test_evaluate_fraud_over_seeds_summarizes_each_seeds_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = cli_args(tmp_path, out)
    assert main([*args, "--split", "1,1,0,2", "--seeds", "0,5"]) == 0
    assert "Fraud (combined) over training seeds 0, 5:" in capsys.readouterr().out
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["columns"] == ["AUC-ROC", "AP", "CP@100"]
    for seed, row in zip((0, 5), summary["per_seed"], strict=True):
        saved = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert row["AUC-ROC"] == saved["results"]["combined"]["auc_roc"]
        for stream in yaml.safe_load((out / f"seed-{seed}" / "config.yaml").read_text())["streams"].values():
            assert stream["training"]["seed"] == seed
    assert summary["mean"]["AP"] == pytest.approx(sum(r["AP"] for r in summary["per_seed"]) / 2)
    assert main([*args, "--seeds", "4-2"]) == 2


def test_ratio_divides_by_the_warning_threshold_even_above_the_critical_one(tmp_path: Path) -> None:
    # The pipeline reports the critical threshold for a critical score; r must not use it, or
    # a score just above the critical threshold would rank below one just under it.
    data = tmp_path / "tx.csv.gz"
    _write_synthetic(data)
    tx = load_transactions(data)
    period = np.minimum(tx.timestamp_s // DAY_S - tx.timestamp_s.min() // DAY_S, 3).astype(np.int8)
    ratios = {}
    for critical in ("", "\n      critical: {rule: quantile, q: 0.5, factor: 1.5}"):
        path = tmp_path / "c.yaml"
        thresholds = "thresholds:\n      warning: {rule: quantile, q: 0.5}" + critical
        path.write_text(TINY_CONFIG.replace("thresholds: {warning: {rule: quantile, q: 0.99}}", thresholds, 1))
        config = load_config(path)
        stream = config.streams["customers"]
        samples = stream_samples(stream, tx, transaction_features(tx), stream_entity("customers", stream, tx))
        ratios[critical != ""] = score_stream("customers", stream, config, samples, period).ratio
    # The critical rule (1.5 x the warning threshold) was crossed, and changed no ratio.
    assert (ratios[True] > 1.5).any()
    np.testing.assert_allclose(ratios[True], ratios[False])
