"""The versioned checkpoint store, and swapping a running pipeline's checkpoint."""

import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from detector.config import Stream, load_config
from detector.errors import CheckpointError
from detector.model import Checkpoint, ErrorStats, RecurrentAutoencoder, save_checkpoint
from detector.pipeline import Pipeline
from detector.service import Daemon
from detector.source import SampleBatch
from detector.store import CheckpointStore, VersionInfo, _sha256, stream_checkpoint
from detector.window import Scaler

WINDOW = 8
FEATURES = ("cpu", "mem")


def make_stream(**overrides: Any) -> Stream:
    spec: dict[str, Any] = {
        "input": {"kind": "file", "path": "x.csv"},
        "mapping": {"entity": "host", "features": list(FEATURES)},
        "window": {"size": WINDOW},
        "model": {"cell": "gru", "hidden_size": 6, "latent_size": 2},
        "thresholds": {"warning": {"rule": "quantile", "q": 0.9}},
        "alerts": {"n": 1, "m": 1, "resolve_after": 2, "cooldown_s": 0},
    }
    spec.update(overrides)
    return Stream.model_validate(spec)


def make_checkpoint(
    seed: int, stream: Stream | None = None, center: float = 0.0, error_scale: float = 1.0
) -> Checkpoint:
    """An untrained but complete checkpoint: distinct weights per seed, no training time."""
    stream = stream or make_stream()
    torch.manual_seed(seed)
    model = RecurrentAutoencoder(len(FEATURES), stream.model).eval()
    errors = np.random.default_rng(seed).gamma(2.0, error_scale, 500).astype(np.float32)
    return Checkpoint(
        model=model,
        scaler=Scaler(np.full(2, center, np.float32), np.ones(2, np.float32)),
        errors=ErrorStats.from_errors(errors),
        features=FEATURES,
        window_size=WINDOW,
        version=f"hosts-v{seed}",
        layout_hash=stream.layout_hash(),
        created=f"2026-01-0{seed % 9 + 1}T00:00:00+00:00",
        training={"rows": 100 * seed, "best_validation_loss": float(seed)},
    )


def add(store: CheckpointStore, seed: int, parent: str | None = None, **kwargs: Any) -> VersionInfo:
    return store.add(
        make_checkpoint(seed, **kwargs),
        parent=parent,
        source="train",
        trained_on={"rows": 100 * seed, "from": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z"},
        validation_error=0.5 * seed,
    )


def same_weights(a: Checkpoint, b: Checkpoint) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "models")


# --- versions ------------------------------------------------------------------------------


def test_add_writes_checkpoint_and_metadata_and_round_trips(store: CheckpointStore) -> None:
    info = store.add(
        make_checkpoint(1),
        parent=None,
        source="import",
        trained_on={"offsets": {"metrics[0]": 42}, "np": np.float32(1.5), "nan": float("nan")},
        validation_error=np.float64(0.25),  # type: ignore[arg-type]
    )
    assert info == VersionInfo(
        version="hosts-v1",
        created="2026-01-02T00:00:00+00:00",
        parent=None,
        source="import",
        trained_on={"offsets": {"metrics[0]": 42}, "np": 1.5, "nan": None},
        validation_error=0.25,
        layout_hash=make_stream().layout_hash(),
        path=store.root / "hosts-v1.pt",
    )
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == [
        "hosts-v1.json",
        "hosts-v1.pt",
    ]
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    # A fresh store object reads the same from disk.
    assert CheckpointStore(store.root).info("hosts-v1") == info
    loaded = store.load("hosts-v1", make_stream())
    assert same_weights(loaded, make_checkpoint(1))
    np.testing.assert_array_equal(loaded.errors.sorted_errors, make_checkpoint(1).errors.sorted_errors)
    assert store.metadata("hosts-v1")["training"] == {"rows": 100, "best_validation_loss": 1.0}


def test_versions_are_listed_in_the_order_added(store: CheckpointStore) -> None:
    assert store.versions() == []
    # Created timestamps out of order (seed 8 → day 9, seed 2 → day 3): the order added wins.
    for seed in (8, 2, 5):
        add(store, seed)
    assert [v.version for v in store.versions()] == ["hosts-v8", "hosts-v2", "hosts-v5"]


def test_add_refuses_duplicates_unknown_parents_and_bad_names(store: CheckpointStore) -> None:
    add(store, 1)
    with pytest.raises(CheckpointError, match="already holds version hosts-v1"):
        add(store, 1)
    with pytest.raises(CheckpointError, match="no version 'hosts-v9'"):
        add(store, 2, parent="hosts-v9")
    assert [v.version for v in store.versions()] == ["hosts-v1"]
    with pytest.raises(CheckpointError, match="source 'manual'"):
        store.add(make_checkpoint(3), parent=None, source="manual", trained_on={}, validation_error=None)
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(CheckpointError, match="cannot name a version"):
            store.add(
                replace(make_checkpoint(3), version=bad),
                parent=None,
                source="train",
                trained_on={},
                validation_error=None,
            )
    assert add(store, 2, parent="hosts-v1").parent == "hosts-v1"


def test_unknown_version_names_the_store_and_what_it_holds(store: CheckpointStore) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        store.info("hosts-v1")
    assert str(store.root) in str(info.value)
    add(store, 1)
    add(store, 2)
    with pytest.raises(CheckpointError) as info:
        store.info("nope")
    assert str(info.value) == f"model store {store.root} has no version 'nope'; it holds: hosts-v1, hosts-v2"
    with pytest.raises(CheckpointError, match="no version"):
        store.load("nope")


def test_interrupted_add_leaves_no_version(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    add(store, 1)

    def crash(path: Path, data: dict[str, Any]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("detector.store._write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        add(store, 2)
    monkeypatch.undo()
    # The .pt landed but its metadata did not: the version does not exist, and adding it again works.
    assert (store.root / "hosts-v2.pt").exists()
    assert [v.version for v in store.versions()] == ["hosts-v1"]
    assert add(store, 2).version == "hosts-v2"
    assert [v.version for v in store.versions()] == ["hosts-v1", "hosts-v2"]


# --- promotion -----------------------------------------------------------------------------


def test_promote_and_rollback_walk_the_promotion_stack(store: CheckpointStore) -> None:
    for seed in (1, 2, 3):
        add(store, seed)
    assert store.promoted() is None
    with pytest.raises(CheckpointError, match="nothing was promoted yet"):
        store.rollback()
    store.promote("hosts-v1", "first")
    with pytest.raises(CheckpointError, match="only hosts-v1 was ever promoted"):
        store.rollback()
    store.promote("hosts-v2")
    store.promote("hosts-v2")  # again: history only, rollback still goes to v1
    store.promote("hosts-v3", "better")
    assert store.promoted() == "hosts-v3"
    assert store.rollback() == "hosts-v2"
    assert store.rollback() == "hosts-v1"
    assert store.promoted() == "hosts-v1"
    with pytest.raises(CheckpointError, match="nothing to roll back to"):
        store.rollback()
    # A promotion after rollbacks branches from where the rollback left off.
    store.promote("hosts-v3")
    assert store.rollback() == "hosts-v1"
    history = store.history()
    assert [(h["action"], h["version"]) for h in history] == [
        ("promote", "hosts-v1"),
        ("promote", "hosts-v2"),
        ("promote", "hosts-v2"),
        ("promote", "hosts-v3"),
        ("rollback", "hosts-v2"),
        ("rollback", "hosts-v1"),
        ("promote", "hosts-v3"),
        ("rollback", "hosts-v1"),
    ]
    assert history[0]["reason"] == "first" and history[3]["reason"] == "better"
    assert CheckpointStore(store.root).promoted() == "hosts-v1"


def test_promote_refuses_unknown_versions_and_changes_nothing(store: CheckpointStore) -> None:
    add(store, 1)
    store.promote("hosts-v1")
    with pytest.raises(CheckpointError, match="no version 'hosts-v7'"):
        store.promote("hosts-v7")
    assert store.promoted() == "hosts-v1"
    assert len(store.history()) == 1


def test_load_defaults_to_the_promoted_version(store: CheckpointStore) -> None:
    add(store, 1)
    add(store, 2)
    with pytest.raises(CheckpointError, match="has no promoted version"):
        store.load()
    store.promote("hosts-v2")
    assert same_weights(store.load(), make_checkpoint(2))
    assert not same_weights(store.load(), make_checkpoint(1))
    assert store.load().version == "hosts-v2"


def test_load_checks_the_layout_against_the_stream(store: CheckpointStore) -> None:
    add(store, 1)
    store.promote("hosts-v1")
    with pytest.raises(CheckpointError, match=r"window\.size 12"):
        store.load(stream=make_stream(window={"size": 12}))


def test_failed_promotion_write_keeps_the_old_state(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    add(store, 1)
    add(store, 2)
    store.promote("hosts-v1")
    before = (store.root / "promoted.json").read_bytes()

    def fail(src: Any, dst: Any) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        store.promote("hosts-v2")
    monkeypatch.undo()
    assert (store.root / "promoted.json").read_bytes() == before
    assert store.promoted() == "hosts-v1"
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


def test_readers_never_see_a_half_written_promotion(store: CheckpointStore) -> None:
    add(store, 1)
    add(store, 2)
    store.promote("hosts-v1")
    seen: set[Any] = set()
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(CheckpointStore(store.root).promoted())
            except Exception as exc:  # a torn read would be a JSON error
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(150):
            store.promote("hosts-v2" if i % 2 == 0 else "hosts-v1")
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen <= {"hosts-v1", "hosts-v2"} and "hosts-v1" in seen


def test_concurrent_writers_lose_no_promotion(store: CheckpointStore) -> None:
    add(store, 1)
    add(store, 2)

    def promote(version: str) -> None:
        writer = CheckpointStore(store.root)  # as separate processes would: own file handles
        for _ in range(40):
            writer.promote(version)

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("hosts-v1", "hosts-v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.history()) == 80


# --- tampering -----------------------------------------------------------------------------


def test_altered_checkpoint_file_is_refused(store: CheckpointStore) -> None:
    add(store, 1)
    add(store, 2)
    store.promote("hosts-v1")
    # Swap in another valid checkpoint under the same name: loadable, but not what was stored.
    save_checkpoint(store.root / "hosts-v2.pt", make_checkpoint(3))
    with pytest.raises(CheckpointError, match=r"hosts-v2\.pt was altered after it was stored"):
        store.load("hosts-v2")
    with pytest.raises(CheckpointError, match="altered"):
        store.promote("hosts-v2")
    assert store.promoted() == "hosts-v1"


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def test_checkpoint_smuggling_code_is_refused_even_with_matching_digest(store: CheckpointStore, tmp_path: Path) -> None:
    info = add(store, 1)
    # Whoever can rewrite the .pt can rewrite its recorded digest too: the weights-only load
    # is the line that holds.
    payload = torch.load(info.path, weights_only=True)
    marker = tmp_path / "marker"
    payload["training"]["note"] = RunsCode(marker)
    torch.save(payload, info.path)
    meta = json.loads((store.root / "hosts-v1.json").read_text())
    meta["sha256"] = _sha256(info.path)
    (store.root / "hosts-v1.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refused: it holds something other than tensors"):
        store.load("hosts-v1")
    assert not marker.exists()


def test_checkpoint_whose_inner_version_differs_is_refused(store: CheckpointStore) -> None:
    info = add(store, 1)
    save_checkpoint(info.path, replace(make_checkpoint(1), version="hosts-other"))
    meta = json.loads((store.root / "hosts-v1.json").read_text())
    meta["sha256"] = _sha256(info.path)
    (store.root / "hosts-v1.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="holds version hosts-other, not hosts-v1"):
        store.load("hosts-v1")


# --- the stream's model --------------------------------------------------------------------


def test_stream_checkpoint_reads_the_store_or_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "models")
    add(store, 1)
    add(store, 2)
    store.promote("hosts-v2")
    assert stream_checkpoint(make_stream(model_store=str(store.root))).version == "hosts-v2"
    save_checkpoint(tmp_path / "one.pt", make_checkpoint(4))
    assert stream_checkpoint(make_stream(checkpoint=str(tmp_path / "one.pt"))).version == "hosts-v4"
    with pytest.raises(CheckpointError, match="neither"):
        stream_checkpoint(make_stream())


def test_stream_takes_checkpoint_or_model_store_not_both() -> None:
    with pytest.raises(ValueError, match="give `checkpoint` or `model_store`, not both"):
        make_stream(checkpoint="a.pt", model_store="models")


# --- swapping a pipeline's checkpoint ------------------------------------------------------


def rows(start: int, n: int, entities: tuple[str, ...] = ("a", "b"), spike_at: int | None = None) -> SampleBatch:
    t = np.repeat(np.arange(start, start + n), len(entities))
    names = [entities[i % len(entities)] for i in range(len(t))]
    values = np.stack([np.sin(t / 3.0), np.cos(t / 5.0)], axis=1).astype(np.float32)
    if spike_at is not None:
        values[t >= spike_at] += 50.0
    return SampleBatch(names, t.astype(np.int64) * 1000, values, np.arange(len(t), dtype=np.int64))


def test_swap_keeps_windows_and_scores_like_the_new_model_would() -> None:
    stream = make_stream()
    v1, v2 = make_checkpoint(1, stream), make_checkpoint(2, stream, center=0.5, error_scale=3.0)
    history, after = rows(0, 20), rows(20, 6)
    swapped = Pipeline("hosts", stream, v1)
    swapped.process(history)
    swapped.swap_checkpoint(v2)
    fresh = Pipeline("hosts", stream, v2)
    fresh.process(history)
    got, want = swapped.process(after), fresh.process(after)
    # Right after the swap, every row completes a window: the windows were kept, not refilled.
    assert got.windows == len(after) == want.windows
    np.testing.assert_array_equal(got.score, want.score)
    np.testing.assert_array_equal(got.threshold, want.threshold)
    assert float(np.nanmax(got.threshold)) == pytest.approx(v2.errors.quantile(0.9))
    assert swapped.checkpoint is v2 and swapped.drift.size == len(after)


def test_swap_keeps_open_alerts_and_new_events_carry_the_new_version() -> None:
    stream = make_stream()
    v1, v2 = make_checkpoint(1, stream), make_checkpoint(2, stream)
    pipeline = Pipeline("hosts", stream, v1)
    pipeline.process(rows(0, 20))
    fired = pipeline.process(rows(20, 2, spike_at=20)).alerts
    assert fired and {a.status for a in fired} == {"firing"} and {a.model_version for a in fired} == {"hosts-v1"}
    pipeline.swap_checkpoint(v2)
    # Back to normal: the incidents opened under v1 resolve under v2 (windows clear of the spike).
    resolved = pipeline.process(rows(22, WINDOW + 2)).alerts
    assert {a.status for a in resolved} == {"resolved"}
    assert {a.resolves for a in resolved} == {a.id for a in fired}
    assert {a.model_version for a in resolved} == {"hosts-v2"}


def test_swap_refuses_a_checkpoint_of_another_layout_and_changes_nothing() -> None:
    stream = make_stream()
    v1 = make_checkpoint(1, stream)
    pipeline = Pipeline("hosts", stream, v1)
    wrong = replace(make_checkpoint(2, stream), window_size=WINDOW + 1)
    with pytest.raises(CheckpointError, match=r"window\.size"):
        pipeline.swap_checkpoint(wrong)
    assert pipeline.checkpoint is v1 and pipeline.policy.model_version == "hosts-v1"


# --- the daemon picks up promotions on reload ----------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    """A daemon (not opened: no broker needed) whose stream scores with the store's hosts-v1."""
    store = CheckpointStore(tmp_path / "models")
    add(store, 1)
    add(store, 2, parent="hosts-v1")
    store.promote("hosts-v1")
    stream = {
        "input": {"kind": "kafka", "topic": "metrics"},
        "mapping": {"entity": "host", "features": list(FEATURES)},
        "window": {"size": WINDOW},
        "model": {"cell": "gru", "hidden_size": 6, "latent_size": 2},
        "model_store": "models",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"streams": {"hosts": stream}, "server": {"enabled": False}}))
    return Daemon(load_config(path), path, CollectorRegistry())


def model_info(daemon: Daemon, version: str) -> float | None:
    return daemon.registry.get_sample_value("detector_model_info", {"stream": "hosts", "version": version})


def test_daemon_switches_to_a_newly_promoted_version_on_reload(daemon: Daemon) -> None:
    rt = daemon.runtimes["hosts"]
    assert rt.checkpoint.version == "hosts-v1" and model_info(daemon, "hosts-v1") == 1
    rt.pipeline.process(rows(0, 20))
    windows = rt.pipeline.windows
    ok, message = daemon.reload()
    assert ok and "new model" not in message  # nothing promoted since start: no swap
    CheckpointStore(rt.stream.model_store).promote("hosts-v2")  # type: ignore[arg-type]
    ok, message = daemon.reload()
    assert ok, message
    assert message.endswith("new model for: hosts (hosts-v2)")
    assert rt.checkpoint.version == rt.pipeline.checkpoint.version == rt.pipeline.policy.model_version == "hosts-v2"
    assert rt.pipeline.windows is windows and rt.pipeline.process(rows(20, 1)).windows == 2
    # The old version's info series is gone, not left at 1 beside the new one.
    assert model_info(daemon, "hosts-v1") is None and model_info(daemon, "hosts-v2") == 1
    assert daemon.registry.get_sample_value("detector_model_swaps_total", {"stream": "hosts"}) == 1


def test_daemon_keeps_its_model_when_the_promoted_one_cannot_be_loaded(daemon: Daemon) -> None:
    rt = daemon.runtimes["hosts"]
    store = CheckpointStore(rt.stream.model_store)  # type: ignore[arg-type]
    store.promote("hosts-v2")
    save_checkpoint(store.info("hosts-v2").path, make_checkpoint(3))
    ok, message = daemon.reload()
    assert not ok and "altered" in message
    assert rt.checkpoint.version == rt.pipeline.checkpoint.version == "hosts-v1"
    assert model_info(daemon, "hosts-v1") == 1 and model_info(daemon, "hosts-v2") is None
    assert daemon.registry.get_sample_value("detector_config_reloads_total", {"result": "failure"}) == 1


def test_daemon_publishes_drift_gauges(daemon: Daemon) -> None:
    def gauges() -> tuple[float | None, float | None]:
        daemon._last_drift = 0.0
        daemon._update_drift()
        labels = {"stream": "hosts"}
        return (
            daemon.registry.get_sample_value("detector_score_drift_psi", labels),
            daemon.registry.get_sample_value("detector_score_drift_ks", labels),
        )

    psi_value, ks_value = gauges()
    assert psi_value is not None and ks_value is not None and np.isnan(psi_value) and np.isnan(ks_value)
    drift = daemon.runtimes["hosts"].pipeline.drift
    drift.add(np.random.default_rng(5).choice(drift.reference, 1000))
    psi_value, ks_value = gauges()
    assert psi_value is not None and ks_value is not None and psi_value < 0.05 and ks_value < 0.06
    drift.add(drift.reference.max() * 3 + np.random.default_rng(6).random(2048))
    psi_value, ks_value = gauges()
    assert psi_value is not None and ks_value is not None and psi_value > 3 and ks_value == 1.0
