"""Continuous retraining, regime changes and cold starts, with a tiny seeded model: the
reservoir's exclusions, acceptance and rejection of candidates (and the model store), a
level shift end to end, a constant series, calibration, cold-start flags, the sinks'
view of a regime change, and retraining on a background thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from detector.alerts import Alert
from detector.config import AlertmanagerSinkConfig, Config, Stream, load_config
from detector.metrics import Metrics
from detector.model import Checkpoint, ErrorStats, save_checkpoint
from detector.pipeline import Pipeline
from detector.replay import replay_file
from detector.retrain import Reservoir, Retrainer, TrainingProcess
from detector.sinks import AlertmanagerSink
from detector.source import SampleBatch
from detector.store import CheckpointStore
from detector.threshold import EntityBaselines, SeverityRules
from detector.train import fit

ENTITIES = ("h0", "h1", "h2")
SHIFT_AT, SPIKE_AT, END = 300, 480, 600  # seconds; h0's level shifts, then h0 spikes
BATCH_ROWS = 60

SPEC: dict[str, Any] = {
    "input": {"kind": "file", "path": "unused.csv"},
    "mapping": {"entity": "host", "features": ["a", "b"]},
    "window": {"size": 16},
    "normalization": {"method": "standard", "per_entity": True},
    "model": {"cell": "gru", "hidden_size": 12, "latent_size": 4},
    "training": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-2, "stride": 2, "early_stopping_patience": 0},
    "thresholds": {"warning": {"rule": "quantile", "q": 0.995, "factor": 2.0}},
    "alerts": {"n": 3, "m": 5, "cooldown_s": 0, "resolve_after": 5},
}
RETRAINING: dict[str, Any] = {
    "enabled": True,
    "every_windows": 300,
    "min_windows": 128,
    "reservoir_size": 1024,
    "epochs": 2,
}
REGIME: dict[str, Any] = {"after_windows": 40, "calibration_windows": 16}


def stream(**sections: Any) -> Stream:
    return Stream.model_validate({**SPEC, **sections})


def signal(i: int, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Entity i: periodic shapes at its own phase and level, a little noise. Shape: (len(t), 2)."""
    phase = t + 5 * i
    a = np.sin(2 * np.pi * phase / 16) + rng.normal(0, 0.05, len(t))
    b = 0.5 * np.cos(2 * np.pi * phase / 8) + i + rng.normal(0, 0.05, len(t))
    return np.stack([a, b], axis=1).astype(np.float32)


def samples(
    start: int,
    stop: int,
    seed: int,
    shift: float = 0.0,
    spike: bool = False,
    constant_from: int | None = None,
    entities: tuple[str, ...] = ENTITIES,
) -> SampleBatch:
    """One sample per entity per second, interleaved; h0 optionally shifted by `shift` from
    SHIFT_AT, spiked for 3 s at SPIKE_AT, or frozen at a constant from `constant_from`."""
    rng = np.random.default_rng(seed)
    t = np.arange(start, stop)
    series = {}
    for e in entities:
        v = signal(int(e[1:]), t, rng)
        if e == "h0":
            v[t >= SHIFT_AT] += np.float32(shift) * np.array([1.0, 0.5], np.float32)
            if spike:
                v[(t >= SPIKE_AT) & (t < SPIKE_AT + 3), 1] += 4.0
            if constant_from is not None:
                v[t >= constant_from] = np.array([3.0, 7.0], np.float32)
        series[e] = v
    names = [e for _ in t for e in entities]
    times = np.repeat(t * 1000, len(entities)).astype(np.int64)
    values = np.stack([series[e][j] for j in range(len(t)) for e in entities])
    return SampleBatch(names, times, values, np.arange(len(names)))


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return fit("hosts", stream(), samples(-300, 0, seed=1), progress=False)


def run(pipeline: Pipeline, data: SampleBatch) -> tuple[list[Alert], dict[str, list[tuple[int, int]]]]:
    """Replay `data` in batches; returns the alert events and, per entity, (second, severity)
    of every scored window."""
    events: list[Alert] = []
    windows: dict[str, list[tuple[int, int]]] = {e: [] for e in ENTITIES}
    for start in range(0, len(data), BATCH_ROWS):
        rows = np.arange(start, min(start + BATCH_ROWS, len(data)))
        result = pipeline.process(data.take(rows))
        events += result.alerts
        for k in np.flatnonzero(~np.isnan(result.score)):
            row = rows[k]
            windows[data.entities[row]].append((int(data.timestamps[row]) // 1000, int(result.severity[k])))
    return events, windows


def anomalous_rate(windows: list[tuple[int, int]], start: int, stop: int) -> float:
    sev = [s for t, s in windows if start <= t < stop]
    return float(np.mean(np.asarray(sev) > 0))


# --- the reservoir ---------------------------------------------------------------------------


def tagged(seqs: np.ndarray) -> np.ndarray:
    """Windows whose every value is their sequence number, so kept ones can be identified."""
    return np.repeat(seqs.astype(np.float32), 4).reshape(len(seqs), 2, 2)


def kept(reservoir: Reservoir) -> list[int]:
    windows, _ = reservoir.snapshot()
    return sorted(int(w[0, 0]) for w in windows)


def test_reservoir_leaves_out_anomalies_and_their_neighbours_across_batches() -> None:
    reservoir = Reservoir(capacity=200, window=2, n_features=2, exclude_neighbours=3)
    seqs = np.arange(60)
    anomalous = np.isin(seqs, [30, 52])
    # Two entities interleaved; only slot 0 has anomalies. Batches cut between 30's onset and 30.
    for lo, hi in ((0, 29), (29, 45), (45, 60)):
        part = slice(lo, hi)
        slots = np.zeros(hi - lo, np.int64)
        reservoir.add(slots, tagged(seqs[part]), anomalous[part], seqs[part] * 1000)
        reservoir.add(slots + 1, tagged(seqs[part] + 1000), np.zeros(hi - lo, bool), seqs[part] * 1000)
    got = kept(reservoir)
    excluded = set(range(27, 34)) | set(range(49, 56))
    assert [s for s in got if s < 1000] == [s for s in range(60) if s not in excluded]
    assert [s - 1000 for s in got if s >= 1000] == list(range(60))  # the other entity keeps everything


def test_reservoir_is_bounded_and_favours_recent_windows() -> None:
    reservoir = Reservoir(capacity=200, window=2, n_features=2, seed=3)
    for start in range(0, 5000, 250):
        seqs = np.arange(start, start + 250)
        reservoir.add(np.zeros(250, np.int64), tagged(seqs), np.zeros(250, bool), seqs)
    got = np.asarray(kept(reservoir))
    assert len(got) == 200
    # Random replacement: an entry survives ~capacity insertions, so most are recent.
    assert np.mean(got >= 4600) > 0.8
    assert got.max() == 4999
    _, end_ms = reservoir.snapshot()
    assert np.all(np.diff(end_ms) > 0)  # oldest first: the validation split takes the latest


def test_retraining_is_due_by_window_count_or_by_event_time() -> None:
    by_time = Retrainer("hosts", stream(retraining={**RETRAINING, "every_windows": None, "interval_s": 60}), 2)
    by_count = Retrainer("hosts", stream(retraining={**RETRAINING, "every_windows": 400}), 2)
    windows = np.zeros((100, 16, 2), np.float32)
    normal = np.zeros(100, bool)
    for second in range(0, 300, 100):  # 300 windows over 30 s of event time
        ms = (np.arange(100) + second) * 100
        by_time.observe(np.arange(100) % 3, windows, normal, ms)
        by_count.observe(np.arange(100) % 3, windows, normal, ms)
    assert not by_time.due() and not by_count.due()  # 29.9 s, 300 windows: neither yet
    by_time.observe(np.zeros(1, np.int64), windows[:1], normal[:1], np.array([60_000]))
    assert by_time.due()
    by_count.observe(np.arange(100) % 3, windows, normal, (np.arange(100) + 300) * 100)
    assert by_count.due()
    # Too few windows in the reservoir: not yet, however long ago the last one was.
    few = Retrainer("hosts", stream(retraining={**RETRAINING, "min_windows": 500}), 2)
    few.observe(np.arange(100) % 3, windows, normal, np.arange(100) * 10_000)
    assert not few.due()


# --- accepting and rejecting candidates ------------------------------------------------------


def test_a_worse_candidate_is_rejected_counted_and_not_stored(checkpoint: Checkpoint, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "models")
    store.add(checkpoint, parent=None, source="train", trained_on={}, validation_error=None)
    store.promote(checkpoint.version, "initial")
    registry = CollectorRegistry()
    # A learning rate this large throws the weights far off: the copy must lose to the model.
    s = stream(retraining={**RETRAINING, "learning_rate": 5.0, "every_windows": 200})
    pipeline = Pipeline("hosts", s, checkpoint, metrics=Metrics(registry), model_store=store)
    events, _ = run(pipeline, samples(0, 300, seed=2))
    assert pipeline.retrainer is not None
    results = pipeline.retrainer.results
    assert results and all(r.outcome == "rejected" for r in results)
    assert all(r.candidate_error > r.current_error * 1.05 for r in results)
    assert pipeline.checkpoint is checkpoint
    assert store.promoted() == checkpoint.version
    assert [v.version for v in store.versions()] == [checkpoint.version]
    assert registry.get_sample_value("detector_retrain_total", {"stream": "hosts", "outcome": "rejected"}) == len(
        results
    )
    assert registry.get_sample_value("detector_retrain_total", {"stream": "hosts", "outcome": "accepted"}) is None
    assert registry.get_sample_value("detector_retrain_seconds_count", {"stream": "hosts"}) == len(results)
    assert not events  # normal traffic: nothing to alert on either way


def test_an_accepted_candidate_is_stored_promoted_and_swapped_in(checkpoint: Checkpoint, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "models")
    store.add(checkpoint, parent=None, source="train", trained_on={}, validation_error=None)
    store.promote(checkpoint.version, "initial")
    s = stream(retraining={**RETRAINING, "every_windows": 200})
    pipeline = Pipeline("hosts", s, checkpoint, model_store=store)
    run(pipeline, samples(0, 300, seed=2))
    assert pipeline.retrainer is not None
    results = pipeline.retrainer.results
    accepted = [r for r in results if r.outcome == "accepted"]
    assert results[0].outcome == "accepted"
    assert all(r.candidate_error <= r.current_error * 1.05 for r in accepted)
    new = pipeline.checkpoint
    assert new.version != checkpoint.version
    # Each accepted candidate is stored as a child of the model it replaced, and promoted.
    versions = store.versions()
    assert len(versions) == 1 + len(accepted)
    assert [v.parent for v in versions[1:]] == [v.version for v in versions[:-1]]
    assert {v.source for v in versions[1:]} == {"retrain"}
    assert store.promoted() == versions[-1].version == new.version
    assert versions[-1].validation_error == pytest.approx(accepted[-1].candidate_error)
    # Thresholds refit from the candidate's held-out errors.
    assert pipeline.rules.warning.apply(np.zeros(1, np.int64), np.zeros(1))[0] == pytest.approx(
        new.errors.quantile(0.995) * 2.0
    )
    assert pipeline.policy.model_version == new.version


def test_a_retrained_model_keeps_each_entitys_dynamic_threshold_warm(checkpoint: Checkpoint) -> None:
    # warmup 100: a restart at the swap could not warm up again within the swapping batch (20
    # windows per entity), so a warm entity afterwards means its statistics were carried over
    # (scaled by the held-out ratio; the exact scaling is test_threshold's property).
    rule = {"rule": "dynamic", "method": "ewma", "k": 4.0, "alpha": 0.05, "warmup": 100}
    s = stream(thresholds={"warning": rule}, retraining={**RETRAINING, "every_windows": 400})
    pipeline = Pipeline("hosts", s, checkpoint)
    data = samples(0, 400, seed=2)
    slots = np.arange(len(ENTITIES), dtype=np.int64)
    probe = np.zeros(len(slots))
    for start in range(0, len(data), BATCH_ROWS):
        before = pipeline.rules
        before.warning.apply(slots, probe, update=False)
        warm_before = not before.warning.cold_rows.any()
        pipeline.process(data.take(np.arange(start, min(start + BATCH_ROWS, len(data)))))
        if pipeline.rules is not before:
            break
    assert pipeline.retrainer is not None
    swapped = pipeline.retrainer.results[-1]
    assert swapped.outcome == "accepted" and pipeline.checkpoint is swapped.checkpoint
    assert warm_before
    after = pipeline.rules.warning.apply(slots, probe, update=False)
    assert not pipeline.rules.warning.cold_rows.any()
    population = swapped.checkpoint.errors.mean + 4.0 * swapped.checkpoint.errors.std
    assert not np.allclose(after, population)
    # A model from elsewhere (no measured ratio) restarts them: cold, on the population threshold.
    pipeline.swap_checkpoint(swapped.checkpoint)
    np.testing.assert_allclose(pipeline.rules.warning.apply(slots, probe, update=False), population)
    assert pipeline.rules.warning.cold_rows.all()


def test_a_replay_with_retraining_is_reproducible(checkpoint: Checkpoint) -> None:
    s = stream(retraining={**RETRAINING, "every_windows": 200})
    data = samples(0, 300, seed=4, shift=3.0)
    first, second = Pipeline("hosts", s, checkpoint), Pipeline("hosts", s, checkpoint)
    scores = []
    for pipeline in (first, second):
        out = [
            pipeline.process(data.take(np.arange(i, min(i + BATCH_ROWS, len(data))))).score
            for i in range(0, len(data), BATCH_ROWS)
        ]
        scores.append(np.concatenate(out))
    np.testing.assert_array_equal(scores[0], scores[1])
    assert first.retrainer is not None and len(first.retrainer.results) >= 2


def replay_setup(tmp_path: Path, checkpoint: Checkpoint, data: SampleBatch, **sections: Any) -> Config:
    """`data` as a CSV file, `checkpoint` saved beside it, and a config that replays one with the other."""
    lines = ["host,timestamp,a,b"] + [
        f"{e},{t // 1000},{v[0]:.6f},{v[1]:.6f}"
        for e, t, v in zip(data.entities, data.timestamps.tolist(), data.values, strict=True)
    ]
    (tmp_path / "live.csv").write_text("\n".join(lines) + "\n")
    save_checkpoint(tmp_path / "model.pt", checkpoint)
    spec = {
        **SPEC,
        "input": {"kind": "file", "path": "live.csv"},
        "mapping": {**SPEC["mapping"], "timestamp_format": "unix_s"},
        "checkpoint": "model.pt",
        **sections,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"streams": {"hosts": spec}}))
    return load_config(tmp_path / "config.yaml")


def test_detector_replay_retrains_in_line_and_reproducibly(checkpoint: Checkpoint, tmp_path: Path) -> None:
    data = samples(0, END, seed=2, shift=5.0, spike=True)
    config = replay_setup(tmp_path, checkpoint, data, retraining=RETRAINING, regime=REGIME)
    runs = [
        replay_file(config, None, None, tmp_path / f"scores{i}.csv", batch_rows=BATCH_ROWS, progress=False)
        for i in range(2)
    ]
    (summary, alerts), (_, again) = runs
    assert (tmp_path / "scores0.csv").read_text() == (tmp_path / "scores1.csv").read_text()
    assert [a.id for a in alerts] == [a.id for a in again]
    assert summary.regime_changes == 1 and summary.retrainings["accepted"] >= 1
    assert summary.checkpoint_version != checkpoint.version  # the model it finished with
    assert any(line.startswith("retrainings: ") for line in summary.lines())


def test_replay_retrains_every_every_windows_whatever_its_batch_rows(checkpoint: Checkpoint, tmp_path: Path) -> None:
    # Retraining starts at batch boundaries; replay's default 1,024-row batches used to make any
    # `every_windows` below 1,024 retrain once per batch (here: once instead of about 5 times).
    config = replay_setup(tmp_path, checkpoint, samples(0, END, seed=2), retraining=RETRAINING)
    summary, _ = replay_file(config, None, None, tmp_path / "s.csv", progress=False)
    every = RETRAINING["every_windows"]
    assert summary.windows > 5 * every
    # The last one falls due after the last batch, with no boundary left to start it at.
    assert sum(summary.retrainings.values()) >= summary.windows // every - 1


# --- level shifts and regime changes -----------------------------------------------------------


def test_a_level_shift_alerts_for_ever_without_retraining_or_regime_policy(checkpoint: Checkpoint) -> None:
    events, windows = run(Pipeline("hosts", stream(), checkpoint), samples(0, END, seed=2, shift=5.0, spike=True))
    assert [(a.status, a.entity) for a in events] == [("firing", "h0")]  # and it never resolves
    assert anomalous_rate(windows["h0"], SHIFT_AT + 16, END) > 0.95


def test_a_level_shift_becomes_one_regime_change_and_a_later_spike_still_alerts(checkpoint: Checkpoint) -> None:
    s = stream(retraining=RETRAINING, regime=REGIME)
    pipeline = Pipeline("hosts", s, checkpoint)
    events, windows = run(pipeline, samples(0, END, seed=2, shift=5.0, spike=True))
    h0 = [a for a in events if a.entity == "h0"]
    changes = [a for a in h0 if a.status == "regime_change"]
    assert len(changes) == 1
    (change,) = changes
    fired = h0[0]
    assert fired.status == "firing" and SHIFT_AT <= fired.window_end_ms // 1000 < SHIFT_AT + 10
    assert change.resolves == fired.id and change.ends == (fired.id,)
    # Back to a normal alert rate within a bounded number of windows after the regime change...
    settled = change.window_end_ms // 1000 + REGIME["calibration_windows"] + 16
    assert settled < SPIKE_AT
    assert anomalous_rate(windows["h0"], settled, SPIKE_AT) <= 0.02
    assert anomalous_rate(windows["h0"], SPIKE_AT + 20, END) <= 0.02
    # ...while the spike after the shift is still caught, and resolves.
    after = [a for a in h0 if a.window_end_ms // 1000 > change.window_end_ms // 1000]
    assert [a.status for a in after] == ["firing", "resolved"]
    assert SPIKE_AT <= after[0].window_end_ms // 1000 < SPIKE_AT + 16
    # The other entities never alerted; retraining ran and swapped models in on the way.
    assert all(a.entity == "h0" for a in events)
    assert pipeline.retrainer is not None
    assert any(r.outcome == "accepted" for r in pipeline.retrainer.results)


def test_a_constant_series_never_alerts_for_ever(checkpoint: Checkpoint) -> None:
    s = stream(regime={"after_windows": 30, "calibration_windows": 16})
    events, windows = run(Pipeline("hosts", s, checkpoint), samples(0, END, seed=5, constant_from=200))
    h0 = [(a.status, a.window_end_ms // 1000) for a in events if a.entity == "h0"]
    assert [status for status, _ in h0] == ["firing", "regime_change"]
    assert anomalous_rate(windows["h0"], h0[1][1] + 16 + 16, END) == 0.0


def test_calibration_scales_an_entitys_thresholds_to_its_new_regime() -> None:
    config = stream().thresholds
    errors = ErrorStats.from_errors(np.linspace(0.5, 1.5, 101))  # median 1.0
    rules = SeverityRules(config, errors)
    baselines = EntityBaselines(0, calibration_windows=8, errors=errors)
    base = rules.apply(np.zeros(1, np.int64), np.zeros(1)).threshold[0]
    baselines.start_regime(0, rules)
    slots = np.zeros(12, np.int64)
    # The new regime reconstructs three times worse; calibration windows never alert.
    scores = np.array([3.0, 2.9, 3.1, 3.0, 100.0, 3.0, 2.8, 3.2, 3.1, 2.9, 3.0 * base + 0.1, 3.0])
    sev = baselines.apply(rules, slots, scores)
    assert sev.severity[:8].tolist() == [0] * 8
    assert baselines.scale(0) == pytest.approx(3.0, rel=0.05)  # the median shrugs off the 100
    np.testing.assert_allclose(sev.threshold[8:], base * baselines.scale(0))
    assert sev.severity[8:].tolist() == [0, 0, 1, 0]  # above the scaled threshold: still anomalous
    assert sev.cold[:8].all() and not sev.cold[8:].any()


def test_cold_start_uses_population_thresholds_and_flags_the_alerts(checkpoint: Checkpoint) -> None:
    rule = {"rule": "dynamic", "method": "ewma", "k": 4, "warmup": 5, "alpha": 0.1}
    s = stream(thresholds={"warning": rule}, cold_start={"warmup_windows": 50})
    pipeline = Pipeline("hosts", s, checkpoint)
    population = checkpoint.errors.mean + 4 * checkpoint.errors.std
    data = samples(0, 120, seed=6, entities=("h0",))
    result = pipeline.process(data.take(np.arange(0, 80)))
    scored = np.flatnonzero(~np.isnan(result.threshold))
    assert len(scored) == 65
    np.testing.assert_allclose(result.threshold[scored[:50]], population)
    assert not np.allclose(result.threshold[scored[50:]], population)  # its own statistics now
    # A spike while cold alerts with `cold_start: true`; a warm one without.
    fresh = Pipeline("hosts", s, checkpoint)
    spiked = samples(0, 200, seed=6, entities=("h0",))
    spiked.values[40:43, 1] += 6.0
    spiked.values[150:153, 1] += 6.0
    events = fresh.process(spiked).alerts
    firing = [a for a in events if a.status == "firing"]
    assert [a.to_dict()["cold_start"] for a in firing] == [True, False]


def test_cold_start_results_do_not_depend_on_the_batch_cut(checkpoint: Checkpoint) -> None:
    rule = {"rule": "dynamic", "method": "ewma", "k": 3, "warmup": 10, "alpha": 0.1}
    s = stream(thresholds={"warning": rule}, cold_start={"warmup_windows": 30})
    data = samples(0, 120, seed=8)
    data.values[75:84, 1] += 5.0  # a spike of every entity while cold
    whole = Pipeline("hosts", s, checkpoint).process(data)
    cut = Pipeline("hosts", s, checkpoint)
    parts = [cut.process(data.take(np.arange(i, min(i + 37, len(data))))) for i in range(0, len(data), 37)]
    np.testing.assert_array_equal(np.concatenate([p.threshold for p in parts]), whole.threshold)
    np.testing.assert_array_equal(np.concatenate([p.severity for p in parts]), whole.severity)
    assert [a.id for p in parts for a in p.alerts] == [a.id for a in whole.alerts]
    assert any(a.cold_start for a in whole.alerts)


def test_sinks_see_a_regime_change_as_the_end_of_the_incident() -> None:
    posts: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sink = AlertmanagerSink(
            AlertmanagerSinkConfig(url=f"http://127.0.0.1:{server.server_address[1]}", resend_interval_s=0.2),
            Metrics(CollectorRegistry()),
        )
        firing = Alert("f1", "firing", "hosts", "h0", "warning", 0, 1_700_000_000_000, 9.0, 1.0, (), "v1")
        change = Alert(
            "r1", "regime_change", "hosts", "h0", "warning", 0, 1_700_000_600_000, 9.0, 1.0, (), "v1", "f1", ("f1",)
        )
        sink.emit([firing])
        sink.emit([change])
        time.sleep(0.6)
        sink.close()
    finally:
        server.shutdown()
        server.server_close()
    ended = [a for body in posts for a in body if a["endsAt"] < "2025"]
    assert len(ended) == 1 and ended[0]["annotations"]["alert_id"] == "f1"
    assert ended[0]["endsAt"] == "2023-11-14T22:23:20.000Z"
    assert posts[-1] == [ended[0]]  # and no re-send of the ended alert afterwards
    data = change.to_dict()
    assert (data["status"], data["resolves"], data["ends"]) == ("regime_change", "f1", ["f1"])


# --- background retraining -------------------------------------------------------------------


@pytest.fixture
def trainer() -> Iterator[TrainingProcess]:
    process = TrainingProcess("test-retrain")
    yield process
    process.close()


@pytest.fixture
def slow_retraining(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every background retraining until the test releases it."""
    release = threading.Event()
    import detector.retrain as retrain_module

    real = retrain_module.retrain

    def held(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "retrain", held)
    yield release
    release.set()


def test_background_retraining_never_blocks_scoring_and_swaps_at_a_batch_boundary(
    checkpoint: Checkpoint, slow_retraining: threading.Event, trainer: TrainingProcess
) -> None:
    s = stream(retraining={**RETRAINING, "every_windows": 200})
    pipeline = Pipeline("hosts", s, checkpoint, trainer=trainer)
    retrainer = pipeline.retrainer
    assert isinstance(retrainer, Retrainer)
    data = samples(0, 600, seed=7)
    batches = [data.take(np.arange(i, i + BATCH_ROWS)) for i in range(0, len(data), BATCH_ROWS)]
    for batch in batches[:6]:
        pipeline.process(batch)
    assert retrainer.busy  # started, and held by the fixture
    started = time.monotonic()
    for batch in batches[6:8]:
        pipeline.process(batch)  # scoring goes on while the worker waits
    assert time.monotonic() - started < 5
    assert pipeline.checkpoint is checkpoint
    slow_retraining.set()
    assert retrainer.wait(120)  # the training process starts (importing torch) on first use
    assert pipeline.checkpoint is checkpoint  # finished, but only a batch boundary swaps it in
    pipeline.process(batches[8])
    assert pipeline.checkpoint is not checkpoint
    first = retrainer.results[0]
    assert first.outcome == "accepted"
    # The worker built (and warmed) the new model's scorer; the swapping batch only took it over.
    assert first.prepared is not None and pipeline.scorer is first.prepared
    # The training process fits exactly what fine-tuning in line fits (same seed, same windows).
    inline = Pipeline("hosts", s, checkpoint)
    for batch in batches[:6]:
        inline.process(batch)
    assert inline.retrainer is not None
    assert inline.retrainer.results[0].candidate_error == first.candidate_error
    pipeline.close()
