"""The recurrent autoencoder, its reconstruction error, and checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings and lists, written with
`torch.save` and read with `torch.load(..., weights_only=True)`: loading one never runs
code from the file.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.config import ModelSpec, Stream
from detector.errors import CheckpointError
from detector.seasonality import CALENDAR_INPUTS
from detector.window import Scaler

CHECKPOINT_FORMAT = 1
_REQUIRED_KEYS = (
    "format",
    "version",
    "layout_hash",
    "features",
    "window_size",
    "model",
    "state_dict",
    "scaler",
    "errors",
)
_CELLS: dict[str, type[nn.LSTM] | type[nn.GRU] | type[nn.RNN]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentAutoencoder(nn.Module):
    """Encoder RNN → latent vector → decoder RNN → reconstruction of the whole window.

    The decoder sees only the latent vector (repeated at every step), so it must rebuild
    the window from a compressed summary: normal shapes reconstruct well, unusual ones do
    not. With `attention`, each decoder step also attends over the encoder states; that
    sharpens reconstructions but lets the model copy its input, so it is off by default.

    Shape:
        input: (B, W, D) normalized windows
        output: (B, W, D) reconstructions
    """

    def __init__(self, n_features: int, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        cell = _CELLS[spec.cell]
        dropout = spec.dropout if spec.num_layers > 1 else 0.0
        self.encoder = cell(n_features, spec.hidden_size, spec.num_layers, batch_first=True, dropout=dropout)
        self.to_latent = nn.Linear(spec.hidden_size, spec.latent_size)
        self.from_latent = nn.Linear(spec.latent_size, spec.hidden_size)
        self.decoder = cell(spec.hidden_size, spec.hidden_size, spec.num_layers, batch_first=True, dropout=dropout)
        out_in = spec.hidden_size * (2 if spec.attention else 1)
        self.output = nn.Linear(out_in, n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded, _ = self.encoder(x)  # (B, W, H)
        latent = torch.tanh(self.to_latent(encoded[:, -1]))  # (B, L)
        steps = self.from_latent(latent).unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, W, H)
        decoded, _ = self.decoder(steps)  # (B, W, H)
        if self.spec.attention:
            weights = torch.softmax(decoded @ encoded.transpose(1, 2) / encoded.shape[-1] ** 0.5, dim=-1)
            decoded = torch.cat([decoded, weights @ encoded], dim=-1)
        out: torch.Tensor = self.output(decoded)
        return out


class AutoencoderEnsemble(nn.Module):
    """`spec.ensemble` autoencoders of one shape, trained alike from different seeds.

    It reconstructs nothing itself: `reconstruction_error` combines its members' errors, per
    window and per feature, by their mean (or median, `spec.ensemble_score`). Each model trained
    on a short history has its own blind spots and its own spurious misses; combined, what most
    of them agree on stands out (on NAB: fewer false alerts, and a score that moves less with the
    seed; docs/results.md).
    """

    def __init__(self, n_features: int, spec: ModelSpec, members: list[RecurrentAutoencoder] | None = None) -> None:
        super().__init__()
        self.spec = spec
        if members is None:
            members = [RecurrentAutoencoder(n_features, spec) for _ in range(spec.ensemble)]
        self.members = nn.ModuleList(members)

    def autoencoders(self) -> list[RecurrentAutoencoder]:
        return list(self.members)  # type: ignore[arg-type]  # ModuleList is not generic


Autoencoder = RecurrentAutoencoder | AutoencoderEnsemble


def new_autoencoder(n_features: int, spec: ModelSpec) -> Autoencoder:
    """One model, or an ensemble when `spec.ensemble` > 1 (a single model keeps its own layout
    of weights, so checkpoints from before ensembles load unchanged)."""
    return AutoencoderEnsemble(n_features, spec) if spec.ensemble > 1 else RecurrentAutoencoder(n_features, spec)


def autoencoders(model: Autoencoder) -> list[RecurrentAutoencoder]:
    """The single models `model` is made of."""
    return model.autoencoders() if isinstance(model, AutoencoderEnsemble) else [model]


def reconstruction_error(
    model: nn.Module, windows: torch.Tensor, last_steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared reconstruction error per window and per feature, over the window's last
    `last_steps` steps (all when None); of an ensemble, the mean or the median of its members'
    (`spec.ensemble_score`; the median of an odd count, so each value is one member's).

    Shape:
        windows: (B, W, D)
        returns: per-window (B,), per-feature (B, D)
    """
    if isinstance(model, AutoencoderEnsemble):
        errors = [reconstruction_error(m, windows, last_steps) for m in model.autoencoders()]
        members_window = torch.stack([e[0] for e in errors])  # (members, B)
        members_feature = torch.stack([e[1] for e in errors])  # (members, B, D)
        if model.spec.ensemble_score == "median":
            return members_window.median(dim=0).values, members_feature.median(dim=0).values
        return members_window.mean(dim=0), members_feature.mean(dim=0)
    squared = (model(windows) - windows).pow(2)
    if last_steps is not None:
        squared = squared[:, -last_steps:, :]
    per_feature = squared.mean(dim=1)
    return per_feature.mean(dim=1), per_feature


# Every forward pass gets a multiple of this many rows (zero windows pad the last one). CPU
# kernels take other code paths for a few rows than for many and round differently, so
# without padding a window's score would change in its last bits with the number of windows
# scored beside it, i.e. with how the records were cut into batches.
_PASS_ROWS = 16


def score_in_passes(
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], windows: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Score windows with `run` (one forward pass: windows → per-window, per-feature errors) in
    passes of at most `batch_size` rows, each padded with zero windows to a multiple of 16.

    Shape:
        windows: (R, W, D) float32, C-contiguous
        returns: per-window (R,) float32, per-feature (R, D) float32
    """
    if len(windows) == 0:
        return np.empty(0, np.float32), np.empty((0, windows.shape[2]), np.float32)
    scores, features = [], []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        n = len(chunk)
        rows = -(-n // _PASS_ROWS) * _PASS_ROWS
        if rows > n:
            chunk = np.concatenate([chunk, np.zeros((rows - n, *chunk.shape[1:]), np.float32)])
        s, f = run(chunk)
        scores.append(s[:n])
        features.append(f[:n])
    return np.concatenate(scores), np.concatenate(features)


def score_windows(
    model: nn.Module, windows: np.ndarray, batch_size: int = 1024, last_steps: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Score normalized windows with torch in batches, in inference mode.

    A window's score does not depend on the other windows scored with it (forward passes are
    padded to a multiple of 16 rows), so any cut of the same windows into calls gives the
    same scores, bit for bit.

    Shape:
        windows: (R, W, D) float32
        returns: per-window (R,) float32, per-feature (R, D) float32
    """

    def run(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, f = reconstruction_error(model, torch.from_numpy(chunk), last_steps)
        return s.numpy(), f.numpy()

    with torch.inference_mode():
        return score_in_passes(run, np.ascontiguousarray(windows, dtype=np.float32), batch_size)


# --- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorStats:
    """Reconstruction errors of held-out validation windows, for threshold rules.

    Shape:
        sorted_errors: (K,) float32, ascending (K ≤ 20,000, evenly subsampled if more)
    """

    sorted_errors: np.ndarray
    mean: float
    std: float

    @staticmethod
    def from_errors(errors: np.ndarray, keep: int = 20_000) -> ErrorStats:
        ordered = np.sort(errors.astype(np.float32))
        if len(ordered) > keep:
            ordered = ordered[np.linspace(0, len(ordered) - 1, keep).round().astype(np.int64)]
        return ErrorStats(ordered, float(errors.mean()), float(errors.std()))

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.sorted_errors, q))


@dataclass(frozen=True)
class Checkpoint:
    """A trained model and everything needed to score with it."""

    model: Autoencoder
    scaler: Scaler
    errors: ErrorStats
    features: tuple[str, ...]
    window_size: int
    version: str
    layout_hash: str
    created: str
    training: dict[str, Any]


def new_version(stream_name: str, model: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return f"{stream_name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{digest.hexdigest()[:8]}"


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a checkpoint."""
    scaler = ckpt.scaler
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": ckpt.version,
        "created": ckpt.created,
        "layout_hash": ckpt.layout_hash,
        "features": list(ckpt.features),
        "window_size": ckpt.window_size,
        "model": ckpt.model.spec.model_dump(),
        "state_dict": ckpt.model.state_dict(),
        "scaler": {
            "center": torch.from_numpy(scaler.center),
            "scale": torch.from_numpy(scaler.scale),
            "entities": list(scaler.entities),
            "entity_center": None if scaler.entity_center is None else torch.from_numpy(scaler.entity_center),
            "entity_scale": None if scaler.entity_scale is None else torch.from_numpy(scaler.entity_scale),
        },
        "errors": {
            "sorted": torch.from_numpy(ckpt.errors.sorted_errors),
            "mean": ckpt.errors.mean,
            "std": ckpt.errors.std,
        },
        "training": ckpt.training,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, stream: Stream | None = None) -> Checkpoint:
    """Load a checkpoint safely and check it against the stream config.

    Raises CheckpointError when the file is missing, unreadable, holds anything but plain
    data, or was trained on a different feature layout or window size than `stream` uses.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found (train one with `detector train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with path.open("rb") as f:
            head = f.read(4)
        if "GLOBAL" not in str(exc) and not head.startswith((b"PK\x03\x04", b"\x80")):
            # Neither a zip archive (torch.save) nor a pickle stream: junk, not a smuggled object.
            raise CheckpointError(
                f"checkpoint {path} is not a detector checkpoint: the file is unreadable or corrupt "
                f"({_refusal_reason(exc)})"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} refused: it holds something other than tensors and plain data, "
            f"so it was not written by detector or was tampered with ({_refusal_reason(exc)})"
        ) from None
    except Exception as exc:
        # The weights-only unpickler runs no code from the file, so whatever else it raises on a
        # damaged or foreign file (KeyError, IndexError, struct.error, ...) means "unreadable".
        message = str(exc).strip()
        detail = type(exc).__name__ + (f": {message.splitlines()[0][:200]}" if message else "")
        raise CheckpointError(f"checkpoint {path} is not a readable torch file: {detail}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a detector checkpoint (not a dict)")
    missing = [k for k in _REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a detector checkpoint (missing: {', '.join(missing)})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {payload['format']!r}, this detector reads {CHECKPOINT_FORMAT}"
        )
    try:
        ckpt = _from_payload(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {str(exc).splitlines()[0][:300]}") from None
    if stream is not None:
        check_layout(ckpt, stream, path)
    return ckpt


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused.

    Its first line only advises re-running with `weights_only=False`, which is exactly what
    must not be done with a file that smuggles in code.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:300]
    return lines[-1][:300] if lines else "unknown object"


def _from_payload(payload: dict[str, Any]) -> Checkpoint:
    if not isinstance(payload["features"], list | tuple) or not all(isinstance(f, str) for f in payload["features"]):
        raise TypeError("features is not a list of names")
    features = tuple(payload["features"])
    if isinstance(payload["window_size"], bool) or not isinstance(payload["window_size"], int):
        raise TypeError(f"window_size {payload['window_size']!r} is not an integer")
    # Ensembles saved before `ensemble_score` existed combined their members by the median.
    spec = ModelSpec.model_validate({"ensemble_score": "median", **payload["model"]})
    model = new_autoencoder(len(features), spec)
    model.load_state_dict(payload["state_dict"], strict=True)
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
        raise ValueError("model weights are not all finite")
    model.eval()
    s = payload["scaler"]

    def array(t: Any) -> np.ndarray | None:
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(t).__name__}")
        return t.detach().cpu().numpy().astype(np.float32)

    d = len(features)
    center, scale = array(s["center"]), array(s["scale"])
    if center is None or scale is None or center.shape != (d,) or scale.shape != (d,):
        raise ValueError("scaler does not match the feature count")
    entities = tuple(str(e) for e in s["entities"])
    entity_center, entity_scale = array(s["entity_center"]), array(s["entity_scale"])
    if entities and not (
        entity_center is not None
        and entity_scale is not None
        and entity_center.shape == entity_scale.shape == (len(entities), d)
    ):
        raise ValueError("per-entity scaler does not match the entity and feature counts")
    scaler = Scaler(center, scale, entities, entity_center, entity_scale)
    e = payload["errors"]
    errors = ErrorStats(array(e["sorted"]), float(e["mean"]), float(e["std"]))  # type: ignore[arg-type]
    if errors.sorted_errors is None or len(errors.sorted_errors) == 0:
        raise ValueError("no validation errors")
    if not np.isfinite(errors.sorted_errors).all() or not np.isfinite([errors.mean, errors.std]).all():
        raise ValueError("validation errors are not all finite")
    return Checkpoint(
        model=model,
        scaler=scaler,
        errors=errors,
        features=features,
        window_size=int(payload["window_size"]),
        version=str(payload["version"]),
        layout_hash=str(payload["layout_hash"]),
        created=str(payload.get("created", "")),
        training=dict(payload.get("training") or {}),
    )


def check_layout(ckpt: Checkpoint, stream: Stream, path: Path | str) -> None:
    """Refuse a checkpoint whose inputs differ from what the stream will feed it (the stream's
    features, then the calendar inputs the model was trained with, if any)."""
    names = tuple(stream.mapping.feature_names)
    if ckpt.features[: len(names)] != names or ckpt.features[len(names) :] not in CALENDAR_INPUTS:
        raise CheckpointError(
            f"checkpoint {path} was trained on features {list(ckpt.features)} "
            f"but the stream maps {list(names)}; retrain with `detector train`"
        )
    if ckpt.window_size != stream.window.size:
        raise CheckpointError(
            f"checkpoint {path} was trained on windows of {ckpt.window_size} samples "
            f"but the stream uses window.size {stream.window.size}; retrain with `detector train`"
        )


def check_same_inputs(new: Checkpoint, running: Checkpoint) -> None:
    """Refuse to swap in a model whose inputs differ from the running one's: the windows kept
    across a swap hold the running model's columns (with or without the calendar inputs)."""
    if new.features != running.features:
        raise CheckpointError(
            f"model {new.version} takes inputs {list(new.features)} but the running model {running.version} "
            f"takes {list(running.features)} (time_of_day or time_of_week decided differently at training); "
            "restart to switch"
        )
