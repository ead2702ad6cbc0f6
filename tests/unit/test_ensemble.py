"""`model.ensemble`: several autoencoders trained from consecutive seeds, scored by the mean (or
the median) of their errors, in both engines, through checkpoints and the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.config import ModelSpec, Scoring, Stream
from detector.engine import EnsembleScorer, OnnxScorer, TorchScorer, make_scorer
from detector.errors import CheckpointError
from detector.model import (
    AutoencoderEnsemble,
    Checkpoint,
    RecurrentAutoencoder,
    autoencoders,
    load_checkpoint,
    reconstruction_error,
    save_checkpoint,
    score_windows,
)
from detector.pipeline import Pipeline
from detector.source import SampleBatch
from detector.train import fit

STEP_MS = 60_000


def samples(n: int, seed: int, start: int = 0) -> SampleBatch:
    """Two entities of a noisy sine, interleaved."""
    rng = np.random.default_rng(seed)
    t = np.repeat(np.arange(start, start + n), 2)
    ms = (t * STEP_MS).astype(np.int64)
    values = (np.sin(t / 7.0) + 0.05 * rng.standard_normal(2 * n)).astype(np.float32)[:, None]
    return SampleBatch(["a", "b"] * n, ms, values, np.arange(2 * n, dtype=np.int64))


def stream(ensemble: int = 1, seed: int = 0, **extra: Any) -> Stream:
    return Stream.model_validate(
        {
            "input": {"kind": "file", "path": "unused.csv"},
            "mapping": {"entity": "host", "features": ["value"]},
            "window": {"size": 10},
            "model": {"cell": "gru", "hidden_size": 8, "latent_size": 3, "ensemble": ensemble},
            "training": {"epochs": 3, "batch_size": 32, "early_stopping_patience": 0, "seed": seed},
            "thresholds": {"warning": {"rule": "quantile", "q": 0.99, "factor": 1.5}},
            "alerts": {"n": 1, "m": 1, "cooldown_s": 0, "resolve_after": 2},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def trio() -> Checkpoint:
    return fit("s", stream(ensemble=3, seed=5), samples(300, 1), progress=False)


def members_of(n_features: int, n: int, combine: Literal["mean", "median"] = "mean") -> AutoencoderEnsemble:
    spec = ModelSpec(hidden_size=8, latent_size=3, ensemble=n, ensemble_score=combine)
    torch.manual_seed(0)
    return AutoencoderEnsemble(n_features, spec).eval()


def test_an_ensemble_is_the_models_of_consecutive_seeds(trio: Checkpoint) -> None:
    assert isinstance(trio.model, AutoencoderEnsemble) and len(autoencoders(trio.model)) == 3
    for member, seed in zip(autoencoders(trio.model), (5, 6, 7), strict=True):
        alone = fit("s", stream(seed=seed), samples(300, 1), progress=False).model
        assert isinstance(alone, RecurrentAutoencoder)
        for name, tensor in alone.state_dict().items():
            assert torch.equal(member.state_dict()[name], tensor), (seed, name)
    assert len(trio.training["ensemble_epochs"]) == 3


def test_the_ensembles_validation_errors_are_its_scores(trio: Checkpoint) -> None:
    validation = trio.training["validation_windows"]
    assert len(trio.errors.sorted_errors) == validation
    assert trio.errors.mean == pytest.approx(trio.training["best_validation_loss"], rel=1e-6)


def combined_and_alone(
    n: int, size: int, seed: int, combine: Literal["mean", "median"]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ensemble's per-window (n,) and per-feature (n, 2) scores of n random windows, and its
    members' own, stacked: (size, n) and (size, n, 2)."""
    ensemble = members_of(2, size, combine)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 6, 2)).astype(np.float32))
    with torch.inference_mode():
        per_window, per_feature = reconstruction_error(ensemble, x)
        alone = [reconstruction_error(m, x) for m in autoencoders(ensemble)]
    return per_window, per_feature, torch.stack([a[0] for a in alone]), torch.stack([a[1] for a in alone])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.sampled_from([3, 5]), st.integers(0, 2**16))
def test_each_score_is_the_median_member_score(n: int, size: int, seed: int) -> None:
    per_window, per_feature, window_scores, feature_scores = combined_and_alone(n, size, seed, "median")
    # One member's value each time, with as many members below it as above it.
    assert bool((window_scores == per_window).any(dim=0).all())
    below = (window_scores < per_window).sum(dim=0)
    above = (window_scores > per_window).sum(dim=0)
    assert bool((below <= size // 2).all()) and bool((above <= size // 2).all())
    torch.testing.assert_close(per_feature, feature_scores.median(dim=0).values, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(2, 5), st.integers(0, 2**16))
def test_each_score_is_the_mean_member_score(n: int, size: int, seed: int) -> None:
    per_window, per_feature, window_scores, feature_scores = combined_and_alone(n, size, seed, "mean")
    # Between the lowest and highest member, and the window's score is its features' mean still.
    assert bool((window_scores.min(dim=0).values <= per_window * (1 + 1e-6)).all())
    assert bool((per_window <= window_scores.max(dim=0).values * (1 + 1e-6)).all())
    torch.testing.assert_close(per_window, window_scores.sum(dim=0) / size)
    torch.testing.assert_close(per_feature, feature_scores.sum(dim=0) / size)
    torch.testing.assert_close(per_window, per_feature.mean(dim=1))


@pytest.mark.parametrize("combine", ["mean", "median"])
def test_onnx_scores_an_ensemble_like_torch(combine: Literal["mean", "median"]) -> None:
    pytest.importorskip("onnxruntime")
    ensemble = members_of(3, 3, combine)
    x = np.random.default_rng(1).standard_normal((50, 12, 3)).astype(np.float32)
    scorer = make_scorer(ensemble, 12, Scoring(threads=1))
    assert isinstance(scorer, EnsembleScorer) and all(isinstance(m, OnnxScorer) for m in scorer.members)
    got_scores, got_features = scorer.score(x)
    want_scores, want_features = TorchScorer(ensemble, 256).score(x)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_features, want_features, rtol=1e-4, atol=1e-7)
    assert isinstance(make_scorer(autoencoders(ensemble)[0], 12, Scoring(threads=1)), OnnxScorer)


def test_an_ensemble_checkpoint_round_trips(trio: Checkpoint, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "trio.pt", trio)
    loaded = load_checkpoint(tmp_path / "trio.pt", stream(ensemble=3))
    assert isinstance(loaded.model, AutoencoderEnsemble) and loaded.model.spec.ensemble == 3
    x = np.random.default_rng(2).standard_normal((20, 10, 1)).astype(np.float32)
    np.testing.assert_array_equal(score_windows(loaded.model, x)[0], score_windows(trio.model, x)[0])


def test_an_ensemble_saved_before_the_ensemble_score_option_loads_median_combined(
    trio: Checkpoint, tmp_path: Path
) -> None:
    save_checkpoint(tmp_path / "trio.pt", trio)
    payload = torch.load(tmp_path / "trio.pt", weights_only=True)
    del payload["model"]["ensemble_score"]
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(loaded.model, AutoencoderEnsemble) and loaded.model.spec.ensemble_score == "median"
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((20, 10, 1)).astype(np.float32))
    with torch.inference_mode():
        alone = torch.stack([reconstruction_error(m, x)[0] for m in autoencoders(loaded.model)])
        torch.testing.assert_close(reconstruction_error(loaded.model, x)[0], alone.median(dim=0).values)


def test_the_pipeline_scores_an_ensemble_whatever_the_batches(trio: Checkpoint) -> None:
    live = samples(150, 3, start=300)
    whole = Pipeline("s", stream(ensemble=3, seed=5), trio).process(live).score
    pieces = Pipeline("s", stream(ensemble=3, seed=5), trio)
    parts = [pieces.process(live.take(np.arange(i, min(i + 41, len(live))))).score for i in range(0, len(live), 41)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5)
    assert np.isfinite(whole).sum() == len(live) - 2 * 9


def test_retraining_an_ensemble_is_refused(trio: Checkpoint) -> None:
    retraining = {"retraining": {"enabled": True, "every_windows": 100}}
    with pytest.raises(CheckpointError, match="fine-tunes one model"):
        Pipeline("s", stream(**retraining), trio)
