"""The ONNX Runtime engine scores like the torch model it was built from."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.config import ModelSpec, Scoring, parse_config
from detector.engine import OnnxScorer, TorchScorer, make_scorer
from detector.errors import ConfigError
from detector.model import RecurrentAutoencoder

pytest.importorskip("onnxruntime")


def model_of(n_features: int, **spec: object) -> RecurrentAutoencoder:
    torch.manual_seed(0)
    return RecurrentAutoencoder(n_features, ModelSpec(hidden_size=8, latent_size=3, **spec)).eval()  # type: ignore[arg-type]


def windows(n: int, size: int, n_features: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, n_features)).astype(np.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize(
    "spec",
    [{}, {"num_layers": 2}, {"attention": True}, {"score_last_steps": 3}, {"num_layers": 3, "attention": True}],
    ids=["plain", "two-layers", "attention", "last-3", "three-layers-attention"],
)
@pytest.mark.parametrize("n_features", [1, 5])
def test_onnx_scores_match_torch(cell: str, spec: dict[str, object], n_features: int) -> None:
    model = model_of(n_features, cell=cell, **spec)
    x = windows(40, 12, n_features)
    want_scores, want_features = TorchScorer(model, 256).score(x)
    got_scores, got_features = OnnxScorer(model, 12, 256, threads=1).score(x)
    assert got_scores.dtype == np.float32 and got_features.shape == (40, n_features)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_features, want_features, rtol=1e-5, atol=1e-7)


def test_a_trained_like_model_scores_spikes_higher_in_both_engines() -> None:
    model = model_of(2)
    x = windows(32, 12, 2) * 0.1
    spiked = x.copy()
    spiked[:, -1, 0] += 8.0
    for scorer in (TorchScorer(model, 256), OnnxScorer(model, 12, 256, threads=1)):
        assert (scorer.score(spiked)[0] > scorer.score(x)[0]).all()


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 70), min_size=1, max_size=6), batch=st.sampled_from([16, 33, 256]))
def test_onnx_scores_do_not_depend_on_how_windows_are_cut(cuts: list[int], batch: int) -> None:
    model = model_of(3, cell="lstm")
    x = windows(70, 10, 3, seed=1)
    scorer = OnnxScorer(model, 10, batch, threads=1)
    whole_scores, whole_features = scorer.score(x)
    bounds = sorted({0, 70, *cuts})
    parts = [scorer.score(x[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole_scores)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole_features)


def test_empty_input_gives_empty_scores() -> None:
    scores, features = OnnxScorer(model_of(4), 12, 256, threads=1).score(np.zeros((0, 12, 4), np.float32))
    assert scores.shape == (0,) and features.shape == (0, 4)


def test_make_scorer_follows_the_config() -> None:
    model = model_of(1)
    assert isinstance(make_scorer(model, 12, Scoring()), OnnxScorer)
    assert isinstance(make_scorer(model, 12, Scoring(engine="torch")), TorchScorer)
    assert isinstance(make_scorer(model, 12, Scoring(engine="onnxruntime", threads=1)), OnnxScorer)


def test_a_missing_package_is_a_config_error_naming_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    streams = "streams:\n  s:\n    input: {kind: file, path: x.csv}\n    mapping: {features: [v]}\n"
    for text in ("scoring: {engine: onnxruntime}\n" + streams, streams):  # named, and by default
        with pytest.raises(ConfigError, match=r"scoring\.engine.*onnxruntime"):
            parse_config(text, "test.yaml")
    parse_config("scoring: {engine: torch}\n" + streams, "test.yaml")
