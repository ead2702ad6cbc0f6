"""Fitting a stream's model on history.

`fit` takes decoded samples (any number of entities, in arrival order), fits the scaler,
cuts windows exactly as the pipeline will, holds out the latest part of each entity's
windows for validation, trains with early stopping, and returns a `Checkpoint` whose error
statistics come from those held-out windows. With `time_of_day` or `time_of_week` (see
`detector.seasonality`) it first decides whether the model gets those calendar inputs, and
names them in the checkpoint's features if so.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from datetime import UTC, datetime

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detector.config import Stream
from detector.errors import InputError
from detector.model import (
    Autoencoder,
    AutoencoderEnsemble,
    Checkpoint,
    ErrorStats,
    RecurrentAutoencoder,
    new_version,
    score_windows,
)
from detector.seasonality import calendar_inputs, with_calendar
from detector.source import Rejection, SampleBatch
from detector.window import Scaler, WindowStore

log = logging.getLogger(__name__)

# Fewer windows than this cannot fit even a tiny autoencoder meaningfully.
MIN_TRAIN_WINDOWS = 4


def training_windows(
    stream: Stream, samples: SampleBatch, scaler: Scaler, rejected: list[Rejection] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized windows at the training stride, and the entity slot of each.

    Samples older than their entity's newest (with `mapping.out_of_order: drop`) are skipped
    exactly as the pipeline skips them, and appended to `rejected` as `out_of_order`.

    Shape:
        returns: windows (R, W, D) float32 in arrival order, slots (R,) int64
    """
    store = WindowStore(stream.window.size, stream.training.stride, samples.values.shape[1], scaler)
    ready, late = store.append(samples, drop_out_of_order=stream.mapping.out_of_order == "drop")
    if len(late):
        log.warning("training data: %d out-of-order samples skipped", len(late))
        if rejected is not None:
            rejected.extend(
                Rejection(int(samples.positions[i]), "out_of_order", "timestamp older than the entity's newest sample")
                for i in late
            )
    return ready.values, ready.slots


def split_validation(slots: np.ndarray, fraction: float, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation windows: the latest `fraction` of each entity's
    windows validate, and `gap` windows before them are dropped so no validation window
    overlaps a training window, when that leaves the entity `MIN_TRAIN_WINDOWS` training
    windows (a short entity keeps them, overlapping). An entity with a single window only
    validates.

    Shape:
        slots: (R,) int64; returns two sorted int64 index arrays into `slots`
    """
    train, val = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for slot in np.unique(slots):
        idx = np.flatnonzero(slots == slot)
        n_val = max(1, round(len(idx) * fraction))
        # Keep the gap only when it still leaves MIN_TRAIN_WINDOWS; otherwise an entity with a
        # few more windows would train on fewer (the gap eats them) and more data could fail.
        if len(idx) - n_val - gap >= max(MIN_TRAIN_WINDOWS, n_val):
            train.append(idx[: len(idx) - n_val - gap])
        else:
            train.append(idx[: len(idx) - n_val])
        val.append(idx[len(idx) - n_val :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _train_one(
    label: str,
    stream: Stream,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    rng: np.random.Generator,
    progress: bool,
) -> tuple[RecurrentAutoencoder, int, float]:
    """One autoencoder trained with early stopping on `x_val`, the epochs it ran and its best
    validation loss."""
    cfg = stream.training
    model = RecurrentAutoencoder(x_train.shape[2], stream.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    best_state = copy.deepcopy(model.state_dict())
    best_val, stale, epochs_run = math.inf, 0, 0
    batches_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    bar = tqdm(
        total=cfg.epochs * batches_per_epoch,
        desc=f"train {label}",
        unit="batch",
        disable=not progress,
        leave=True,
    )
    try:
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.from_numpy(rng.permutation(len(x_train)))
            total = 0.0
            for b in range(batches_per_epoch):
                xb = x_train[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
                optimizer.zero_grad()
                per_window = (model(xb) - xb).pow(2).mean(dim=(1, 2))
                if cfg.trim_fraction > 0:
                    keep = max(1, int(len(per_window) * (1 - cfg.trim_fraction)))
                    per_window = per_window.sort().values[:keep]
                loss = per_window.mean()
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                total += loss.item() * len(xb)
                bar.update(1)
            train_loss = total / len(x_train)
            model.eval()
            val_loss = float(score_windows(model, x_val.numpy())[0].mean())
            epochs_run = epoch + 1
            bar.set_postfix(epoch=epochs_run, loss=f"{train_loss:.4g}", val_loss=f"{val_loss:.4g}")
            if val_loss < best_val - 1e-9:
                best_val, stale = val_loss, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
                    log.info("early stopping after epoch %d (no improvement for %d epochs)", epochs_run, stale)
                    break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return model, epochs_run, best_val


def fit(
    stream_name: str,
    stream: Stream,
    samples: SampleBatch,
    progress: bool = True,
    rejected: list[Rejection] | None = None,
) -> Checkpoint:
    """Train a model for `stream` on `samples` (raw, any entities) and return its checkpoint.

    Samples that training skips (out of order) are appended to `rejected`, so the caller can
    report them. Raises InputError when the samples give fewer than `MIN_TRAIN_WINDOWS`
    training windows once validation windows are held out.
    """
    cfg = stream.training
    skipped: list[Rejection] = []
    if len(samples) == 0:
        raise InputError("no usable training rows")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    features = tuple(stream.mapping.feature_names)
    calendar, why = calendar_inputs(stream.time_of_day, stream.time_of_week, samples)
    for setting, verdict in why.items():
        log.info("stream %s: %s as model input %s", stream_name, setting, verdict)
    samples, features = with_calendar(samples, calendar), features + calendar
    scaler = Scaler.fit(samples.values, samples.entities, stream.normalization)
    windows, slots = training_windows(stream, samples, scaler, skipped)
    if rejected is not None:
        rejected.extend(skipped)
    gap = math.ceil((stream.window.size - 1) / cfg.stride)
    train_idx, val_idx = split_validation(slots, cfg.validation_split, gap)
    if len(train_idx) < MIN_TRAIN_WINDOWS:
        raise InputError(
            f"need at least {MIN_TRAIN_WINDOWS} training windows, got {len(train_idx)}: "
            f"{len(windows)} windows of window.size={stream.window.size} rows (every training.stride={cfg.stride}) "
            f"from {len(set(samples.entities))} entities, and the latest {cfg.validation_split:.0%} of each "
            "entity's windows (at least one) are held out for validation; give each entity more rows, "
            "or lower window.size or training.stride"
        )
    if len(train_idx) > cfg.max_windows:
        train_idx = np.sort(rng.choice(train_idx, cfg.max_windows, replace=False))
    x_train = torch.from_numpy(windows[train_idx])
    x_val = torch.from_numpy(windows[val_idx])

    started = time.monotonic()
    members: list[RecurrentAutoencoder] = []
    runs: list[tuple[int, float]] = []  # epochs run, best validation loss
    for member in range(stream.model.ensemble):
        if member:
            # The first model draws from the generators exactly as a single model does; the
            # others as a single model with seed + member would (same windows, same split).
            torch.manual_seed(cfg.seed + member)
            rng = np.random.default_rng(cfg.seed + member)
        label = stream_name if stream.model.ensemble == 1 else f"{stream_name} {member + 1}/{stream.model.ensemble}"
        member_model, epochs_run, best_val = _train_one(label, stream, x_train, x_val, rng, progress)
        members.append(member_model)
        runs.append((epochs_run, best_val))
    model: Autoencoder = members[0]
    if len(members) > 1:
        model = AutoencoderEnsemble(x_train.shape[2], stream.model, members)
    # Thresholds compare against live scores, so the held-out errors are scored the same way.
    val_errors = score_windows(model, x_val.numpy(), last_steps=stream.model.score_last_steps)[0]
    # An ensemble's: the mean of its combined whole-window errors, as a single model's is the mean
    # of its own (the errors above already are those unless only the last steps are scored).
    if len(runs) == 1:
        validation_loss = runs[0][1]
    elif stream.model.score_last_steps is None:
        validation_loss = float(val_errors.mean())
    else:
        validation_loss = float(score_windows(model, x_val.numpy())[0].mean())
    return Checkpoint(
        model=model,
        scaler=scaler,
        errors=ErrorStats.from_errors(val_errors),
        features=features,
        window_size=stream.window.size,
        version=new_version(stream_name, model),
        layout_hash=stream.layout_hash(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        training={
            "rows": len(samples) - len(skipped),
            "entities": len(set(samples.entities)),
            "train_windows": len(train_idx),
            "validation_windows": len(val_idx),
            "epochs": max(epochs for epochs, _ in runs),
            "best_validation_loss": validation_loss,
            **({"ensemble_epochs": [epochs for epochs, _ in runs]} if len(runs) > 1 else {}),
            "first_ms": int(samples.timestamps.min()),
            "last_ms": int(samples.timestamps.max()),
            "seconds": round(time.monotonic() - started, 2),
            **why,
        },
    )
