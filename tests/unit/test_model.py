"""The recurrent autoencoder, its reconstruction error, training, and checkpoints."""

import os
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from detector.config import ModelSpec, Stream
from detector.errors import CheckpointError
from detector.model import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    RecurrentAutoencoder,
    load_checkpoint,
    reconstruction_error,
    save_checkpoint,
    score_windows,
)
from detector.source import SampleBatch
from detector.train import fit
from detector.window import Scaler

WINDOW = 16
N_ROWS = 600


def make_stream(**overrides: Any) -> Stream:
    spec: dict[str, Any] = {
        "input": {"kind": "file", "path": "history.csv"},
        "mapping": {"entity": "host", "features": ["a", "b"]},
        "window": {"size": WINDOW},
        "normalization": {"method": "standard"},
        "model": {"cell": "lstm", "hidden_size": 16, "latent_size": 4},
        "training": {
            "epochs": 30,
            "batch_size": 32,
            "learning_rate": 1e-2,
            "stride": 2,
            "early_stopping_patience": 0,
            "seed": 0,
        },
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return Stream.model_validate(spec)


def periodic_values(n: int = N_ROWS) -> np.ndarray:
    """Two clean periodic features: a sine of period 16 and a cosine of period 8."""
    t = np.arange(n)
    return np.stack([np.sin(2 * np.pi * t / 16), np.cos(2 * np.pi * t / 8)], axis=1).astype(np.float32)


def periodic_samples(n: int = N_ROWS) -> SampleBatch:
    t = np.arange(n, dtype=np.int64)
    return SampleBatch(["host-1"] * n, t * 1000, periodic_values(n), t)


def normalized_windows(ckpt: Checkpoint, values: np.ndarray, starts: range) -> np.ndarray:
    windows = np.stack([values[s : s + WINDOW] for s in starts])
    return ((windows - ckpt.scaler.center) / ckpt.scaler.scale).astype(np.float32)


@pytest.fixture(scope="module")
def stream() -> Stream:
    return make_stream()


@pytest.fixture(scope="module")
def trained(stream: Stream) -> Checkpoint:
    torch.set_num_threads(1)
    return fit("web", stream, periodic_samples(), progress=False)


# --- shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize(("num_layers", "dropout"), [(1, 0.0), (3, 0.3)])
def test_shapes(cell: str, attention: bool, num_layers: int, dropout: float) -> None:
    spec = ModelSpec.model_validate(
        {"cell": cell, "hidden_size": 8, "latent_size": 3, "num_layers": num_layers, "dropout": dropout}
        | {"attention": attention}
    )
    model = RecurrentAutoencoder(5, spec).eval()
    assert isinstance(model.encoder, {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell])
    assert model.encoder.num_layers == num_layers
    assert model.encoder.dropout == dropout
    x = torch.randn(4, 12, 5)
    out = model(x)
    assert out.shape == (4, 12, 5)
    per_window, per_feature = reconstruction_error(model, x)
    assert per_window.shape == (4,)
    assert per_feature.shape == (4, 5)
    assert torch.all(per_feature >= 0)
    torch.testing.assert_close(per_window, per_feature.mean(dim=1))
    torch.testing.assert_close(per_feature, (out - x).pow(2).mean(dim=1))

    scores, features = score_windows(model, x.numpy())
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert features.shape == (4, 5) and features.dtype == np.float32
    np.testing.assert_allclose(scores, per_window.detach().numpy(), rtol=1e-5)
    empty_scores, empty_features = score_windows(model, np.zeros((0, 12, 5), np.float32))
    assert empty_scores.shape == (0,) and empty_features.shape == (0, 5)


def test_dropout_is_active_only_in_training_mode() -> None:
    model = RecurrentAutoencoder(2, ModelSpec(cell="gru", hidden_size=16, latent_size=4, num_layers=2, dropout=0.5))
    x = torch.randn(8, 10, 2)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_single_layer_ignores_dropout() -> None:
    model = RecurrentAutoencoder(2, ModelSpec(num_layers=1, dropout=0.5, hidden_size=4, latent_size=2)).train()
    assert model.encoder.dropout == 0.0 and model.decoder.dropout == 0.0
    x = torch.randn(3, 6, 2)
    assert torch.equal(model(x), model(x))


def test_attention_changes_the_output_layer() -> None:
    plain = RecurrentAutoencoder(3, ModelSpec(hidden_size=8, latent_size=2))
    attending = RecurrentAutoencoder(3, ModelSpec(hidden_size=8, latent_size=2, attention=True))
    assert plain.output.in_features == 8
    assert attending.output.in_features == 16


def test_score_does_not_depend_on_the_other_windows_in_the_call() -> None:
    # The pipeline promises the same scores whatever the batch cut; that needs each window's
    # score to be bit-identical however many windows share its forward pass.
    model = RecurrentAutoencoder(3, ModelSpec(hidden_size=32, latent_size=8, num_layers=2)).eval()
    windows = np.random.default_rng(0).normal(size=(70, 20, 3)).astype(np.float32)
    scores, features = score_windows(model, windows)
    for lo, hi, batch_size in [(0, 1, 1024), (5, 8, 1024), (3, 70, 1), (0, 70, 7), (10, 43, 16), (69, 70, 2)]:
        got_scores, got_features = score_windows(model, windows[lo:hi], batch_size=batch_size)
        np.testing.assert_array_equal(got_scores, scores[lo:hi])
        np.testing.assert_array_equal(got_features, features[lo:hi])


# --- what training learns ------------------------------------------------------------------


def test_training_learns_the_clean_signal(trained: Checkpoint) -> None:
    assert trained.training["epochs"] == 30
    assert trained.training["best_validation_loss"] < 0.1  # normalized data has variance 1
    assert trained.features == ("a", "b")
    assert trained.window_size == WINDOW
    assert not trained.model.training
    assert len(trained.errors.sorted_errors) == trained.training["validation_windows"]


@pytest.mark.parametrize("feature", [0, 1])
@pytest.mark.parametrize("position", [4, 8, 12])
def test_spike_raises_error_per_window_and_on_the_spiked_feature(
    trained: Checkpoint, feature: int, position: int
) -> None:
    clean = normalized_windows(trained, periodic_values(), range(100, 116))  # 16 phases
    spiked = clean.copy()
    spiked[:, position, feature] += 3.0
    clean_scores, clean_features = score_windows(trained.model, clean)
    spiked_scores, spiked_features = score_windows(trained.model, spiked)
    assert np.all(spiked_scores > clean_scores)
    assert np.median(spiked_scores / clean_scores) > 1.5
    # The error the spike adds lands on the spiked feature, whatever the clean error was.
    added = spiked_features - clean_features
    np.testing.assert_array_equal(added.argmax(axis=1), np.full(16, feature))


def test_training_is_deterministic_with_a_seed() -> None:
    stream = make_stream(training={"epochs": 3})
    samples = periodic_samples(300)
    first = fit("web", stream, samples, progress=False)
    second = fit("web", stream, samples, progress=False)
    other_seed = fit("web", make_stream(training={"epochs": 3, "seed": 1}), samples, progress=False)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name
    np.testing.assert_array_equal(first.errors.sorted_errors, second.errors.sorted_errors)
    assert first.errors.mean == second.errors.mean
    assert first.training["best_validation_loss"] == second.training["best_validation_loss"]
    assert not all(torch.equal(t, other_seed.model.state_dict()[k]) for k, t in first_state.items())


# --- checkpoint round trip -----------------------------------------------------------------


def assert_same_checkpoint(loaded: Checkpoint, original: Checkpoint) -> None:
    windows = normalized_windows(original, periodic_values(), range(0, 200, 3))
    original_scores, original_features = score_windows(original.model, windows)
    loaded_scores, loaded_features = score_windows(loaded.model, windows)
    assert np.array_equal(loaded_scores, original_scores)
    assert np.array_equal(loaded_features, original_features)
    assert not loaded.model.training
    assert loaded.model.spec == original.model.spec
    np.testing.assert_array_equal(loaded.scaler.center, original.scaler.center)
    np.testing.assert_array_equal(loaded.scaler.scale, original.scaler.scale)
    assert loaded.scaler.entities == original.scaler.entities
    np.testing.assert_array_equal(loaded.errors.sorted_errors, original.errors.sorted_errors)
    assert loaded.errors.mean == original.errors.mean
    assert loaded.errors.std == original.errors.std
    assert loaded.version == original.version
    assert loaded.features == original.features
    assert loaded.window_size == original.window_size
    assert loaded.layout_hash == original.layout_hash
    assert loaded.created == original.created
    assert loaded.training == original.training


def test_checkpoint_round_trip(trained: Checkpoint, stream: Stream, tmp_path: Path) -> None:
    path = tmp_path / "models" / "web.pt"
    save_checkpoint(path, trained)
    assert path.exists()
    assert list(path.parent.iterdir()) == [path]  # the temp file was renamed away
    loaded = load_checkpoint(path, stream)
    assert_same_checkpoint(loaded, trained)
    assert loaded.version.startswith("web-")
    assert loaded.layout_hash == stream.layout_hash()


def test_checkpoint_round_trip_with_per_entity_scaler(trained: Checkpoint, tmp_path: Path) -> None:
    values = np.concatenate([periodic_values(50), 3.0 + 2.0 * periodic_values(50)])
    scaler = Scaler.fit(values, ["x"] * 50 + ["y"] * 50, make_stream(normalization={"per_entity": True}).normalization)
    ckpt = replace(trained, scaler=scaler)
    path = tmp_path / "per-entity.pt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert_same_checkpoint(loaded, ckpt)
    assert loaded.scaler.entities == ("x", "y")
    assert loaded.scaler.entity_center is not None and loaded.scaler.entity_scale is not None
    np.testing.assert_array_equal(loaded.scaler.entity_center, scaler.entity_center)
    np.testing.assert_array_equal(loaded.scaler.entity_scale, scaler.entity_scale)
    np.testing.assert_array_equal(loaded.scaler.params_for("y")[0], scaler.params_for("y")[0])


def test_saving_again_replaces_the_checkpoint(trained: Checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "web.pt"
    save_checkpoint(path, replace(trained, version="old"))
    save_checkpoint(path, trained)
    assert load_checkpoint(path).version == trained.version


# --- refused checkpoints -------------------------------------------------------------------


@pytest.fixture
def saved(trained: Checkpoint, tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(path, trained)
    return path


def payload_of(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, weights_only=True)
    return payload


def refused(path: Path, stream: Stream | None = None) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, stream)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path / "nope.pt")
    assert "not found" in message
    assert "detector train" in message


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(os.urandom(4096), id="random-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(b"hello world\n", id="text"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 100, id="zip-header-only"),
    ],
)
def test_unreadable_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    refused(path)


@pytest.mark.parametrize("content", [b"definitely not a torch file", b"}&\xd2\xbcZ\xa1\xb3\xae" * 64])
def test_junk_file_is_called_corrupt_not_tampered(tmp_path: Path, content: bytes) -> None:
    # Junk that the safe unpickler stops at its first byte is not a smuggled object.
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    message = refused(path)
    assert "is not a detector checkpoint: the file is unreadable or corrupt" in message
    assert "tampered" not in message


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_refused(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    assert "not a readable torch file" in refused(saved)


def test_non_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3), 1, "x"], path)
    assert "not a dict" in refused(path)


def test_missing_keys_are_named(saved: Path) -> None:
    payload = payload_of(saved)
    del payload["state_dict"], payload["errors"]
    torch.save(payload, saved)
    message = refused(saved)
    assert "missing" in message
    assert "state_dict" in message and "errors" in message


@pytest.mark.parametrize("value", [CHECKPOINT_FORMAT + 1, 0, "1"])
def test_wrong_format_is_refused(saved: Path, value: object) -> None:
    payload = payload_of(saved)
    payload["format"] = value
    torch.save(payload, saved)
    message = refused(saved)
    assert f"format {value!r}" in message
    assert f"reads {CHECKPOINT_FORMAT}" in message


def _wrong_shape(payload: dict[str, Any]) -> None:
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = torch.zeros(3, 3)


def _nan_weight(payload: dict[str, Any]) -> None:
    next(iter(payload["state_dict"].values())).fill_(float("nan"))


def _per_entity_mismatch(payload: dict[str, Any]) -> None:
    payload["scaler"].update(entities=["x"], entity_center=torch.zeros(2, 5), entity_scale=torch.ones(2, 5))


DAMAGE: dict[str, Callable[[dict[str, Any]], None]] = {
    "state-dict-wrong-shape": _wrong_shape,
    "state-dict-missing-tensor": lambda p: p["state_dict"].pop(next(iter(p["state_dict"]))),
    "state-dict-extra-tensor": lambda p: p["state_dict"].update(extra=torch.zeros(1)),
    "state-dict-not-a-dict": lambda p: p.update(state_dict=[1, 2]),
    "state-dict-nan": _nan_weight,
    "model-spec-bigger": lambda p: p["model"].update(hidden_size=32),
    "model-spec-unknown-key": lambda p: p["model"].update(wings=2),
    "features-not-a-list": lambda p: p.update(features="ab"),
    "three-features-two-feature-weights": lambda p: p.update(features=["a", "b", "c"]),
    "window-size-not-an-integer": lambda p: p.update(window_size=2.5),
    "scaler-wrong-size": lambda p: p["scaler"].update(scale=torch.ones(3)),
    "scaler-not-tensors": lambda p: p["scaler"].update(center=[0.0, 0.0]),
    "scaler-missing-entry": lambda p: p["scaler"].pop("entities"),
    "per-entity-scaler-mismatch": _per_entity_mismatch,
    "errors-empty": lambda p: p["errors"].update(sorted=torch.zeros(0)),
    "errors-not-tensor": lambda p: p["errors"].update(sorted=[0.1, 0.2]),
    "errors-nan": lambda p: p["errors"].update(sorted=torch.tensor([float("nan")])),
    "errors-not-a-dict": lambda p: p.update(errors=None),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_payload_is_refused(saved: Path, damage: Callable[[dict[str, Any]], None]) -> None:
    payload = payload_of(saved)
    damage(payload)
    torch.save(payload, saved)
    assert "damaged" in refused(saved)


def test_features_differing_from_the_stream_are_refused(saved: Path) -> None:
    other = make_stream(mapping={"entity": "host", "features": ["a", "c"]})
    message = refused(saved, other)
    assert "['a', 'b']" in message and "['a', 'c']" in message
    reordered = make_stream(mapping={"entity": "host", "features": ["b", "a"]})
    refused(saved, reordered)


def test_window_size_differing_from_the_stream_is_refused(saved: Path) -> None:
    message = refused(saved, make_stream(window={"size": WINDOW * 2}))
    assert f"windows of {WINDOW} samples" in message
    assert f"window.size {WINDOW * 2}" in message


def test_stream_check_is_skipped_without_a_stream(saved: Path, stream: Stream) -> None:
    assert load_checkpoint(saved).features == ("a", "b")
    assert load_checkpoint(saved, stream).window_size == WINDOW


# --- checkpoints that would run code -------------------------------------------------------


def _write_marker(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


class RunsFunction:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_write_marker, (str(self.marker),))


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _torch_zip(path: Path, obj: object) -> None:
    torch.save(obj, path)


def _torch_legacy(path: Path, obj: object) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _plain_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj))


def test_marker_payloads_do_run_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    # The control for the test below: these objects really execute on a plain unpickle.
    for kind in (RunsFunction, RunsShell):
        marker = tmp_path / f"{kind.__name__}.marker"
        pickle.loads(pickle.dumps(kind(marker)))  # deliberately unsafe, on our own bytes
        assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", [_torch_zip, _torch_legacy, _plain_pickle])
@pytest.mark.parametrize("kind", [RunsFunction, RunsShell])
@pytest.mark.parametrize("nested", [False, True])
def test_checkpoint_that_would_run_code_is_refused(
    saved: Path, tmp_path: Path, writer: Callable[[Path, object], None], kind: type, nested: bool
) -> None:
    marker = tmp_path / "marker"
    evil = kind(marker)
    if nested:
        # A real checkpoint with one smuggled object inside.
        payload = payload_of(saved)
        payload["training"]["note"] = evil
        obj: object = payload
    else:
        obj = evil
    path = tmp_path / "evil.pt"
    writer(path, obj)
    message = refused(path)
    assert "refused" in message
    assert "weights_only" not in message  # no advice to bypass the safe loader
    assert not marker.exists()


@pytest.mark.parametrize("last_steps", [1, 3, WINDOW])
def test_last_steps_scores_only_the_newest_errors(last_steps: int) -> None:
    model = RecurrentAutoencoder(2, ModelSpec(hidden_size=8, latent_size=2)).eval()
    windows = np.random.default_rng(1).normal(size=(5, WINDOW, 2)).astype(np.float32)
    with torch.inference_mode():
        squared = (model(torch.from_numpy(windows)) - torch.from_numpy(windows)).pow(2).numpy()
    scores, features = score_windows(model, windows, last_steps=last_steps)
    expected_features = squared[:, -last_steps:, :].mean(axis=1)
    np.testing.assert_allclose(features, expected_features, rtol=1e-5)
    np.testing.assert_allclose(scores, expected_features.mean(axis=1), rtol=1e-5)
    # A spike before the scored steps does not move the score; one inside them does.
    if last_steps < WINDOW:
        early = windows.copy()
        early[:, 0, 0] += 50.0
        late = windows.copy()
        late[:, -1, 0] += 50.0
        early_scores, _ = score_windows(model, early, last_steps=last_steps)
        late_scores, _ = score_windows(model, late, last_steps=last_steps)
        assert np.all(late_scores > scores)
        assert np.all(np.abs(early_scores - scores) < np.abs(late_scores - scores))


def test_thresholds_are_fitted_on_the_same_score_as_live_scoring() -> None:
    stream = make_stream(model={"score_last_steps": 2}, training={"epochs": 2})
    ckpt = fit("web", stream, periodic_samples(), progress=False)
    assert ckpt.model.spec.score_last_steps == 2
    whole = fit("web", make_stream(training={"epochs": 2}), periodic_samples(), progress=False)
    # Same seed, same weights: only the score differs, and with it the fitted error statistics.
    for a, b in zip(ckpt.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert ckpt.errors.mean != whole.errors.mean
