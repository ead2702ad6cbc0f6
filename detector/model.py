"""The recurrent autoencoder, its reconstruction error, and checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings and lists, written with
`torch.save` and read with `torch.load(..., weights_only=True)`: loading one never runs
code from the file.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.config import ModelSpec, Stream
from detector.errors import CheckpointError
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


def reconstruction_error(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared reconstruction error per window and per feature.

    Shape:
        windows: (B, W, D)
        returns: per-window (B,), per-feature (B, D)
    """
    per_feature = (model(windows) - windows).pow(2).mean(dim=1)
    return per_feature.mean(dim=1), per_feature


def score_windows(model: nn.Module, windows: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Score normalized windows in batches, in inference mode.

    Shape:
        windows: (R, W, D) float32
        returns: per-window (R,) float32, per-feature (R, D) float32
    """
    if len(windows) == 0:
        return np.empty(0, np.float32), np.empty((0, windows.shape[2]), np.float32)
    scores, features = [], []
    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        for start in range(0, len(tensor), batch_size):
            s, f = reconstruction_error(model, tensor[start : start + batch_size])
            scores.append(s.numpy())
            features.append(f.numpy())
    return np.concatenate(scores), np.concatenate(features)


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

    model: RecurrentAutoencoder
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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown object"
        raise CheckpointError(
            f"checkpoint {path} refused: it holds something other than tensors and plain data, "
            f"so it was not written by detector or was tampered with ({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, io.UnsupportedOperation) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable torch file: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a detector checkpoint (not a dict)")
    missing = [k for k in _REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a detector checkpoint (missing: {', '.join(missing)})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {payload['format']}, this detector reads {CHECKPOINT_FORMAT}"
        )
    try:
        ckpt = _from_payload(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {str(exc).splitlines()[0][:300]}") from None
    if stream is not None:
        check_layout(ckpt, stream, path)
    return ckpt


def _from_payload(payload: dict[str, Any]) -> Checkpoint:
    features = tuple(str(f) for f in payload["features"])
    spec = ModelSpec.model_validate(payload["model"])
    model = RecurrentAutoencoder(len(features), spec)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    s = payload["scaler"]

    def array(t: Any) -> np.ndarray | None:
        return None if t is None else t.detach().cpu().numpy().astype(np.float32)

    center, scale = array(s["center"]), array(s["scale"])
    if center is None or scale is None or center.shape != (len(features),) or scale.shape != (len(features),):
        raise ValueError("scaler does not match the feature count")
    scaler = Scaler(center, scale, tuple(s["entities"]), array(s["entity_center"]), array(s["entity_scale"]))
    e = payload["errors"]
    errors = ErrorStats(array(e["sorted"]), float(e["mean"]), float(e["std"]))  # type: ignore[arg-type]
    if errors.sorted_errors is None or len(errors.sorted_errors) == 0:
        raise ValueError("no validation errors")
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
    """Refuse a checkpoint whose inputs differ from what the stream will feed it."""
    names = tuple(stream.mapping.feature_names)
    if ckpt.features != names:
        raise CheckpointError(
            f"checkpoint {path} was trained on features {list(ckpt.features)} "
            f"but the stream maps {list(names)}; retrain with `detector train`"
        )
    if ckpt.window_size != stream.window.size:
        raise CheckpointError(
            f"checkpoint {path} was trained on windows of {ckpt.window_size} samples "
            f"but the stream uses window.size {stream.window.size}; retrain with `detector train`"
        )
