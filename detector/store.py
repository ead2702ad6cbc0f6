"""A directory of versioned checkpoints, one of them promoted: the model a stream scores with.

Layout of a store `<root>`:

- `<version>.pt`: the checkpoint (`save_checkpoint`), never changed once written;
- `<version>.json`: its metadata (`VersionInfo`, plus the SHA-256 of the `.pt`); written after
  the `.pt`, so a version exists exactly when its `.json` does and a crash mid-`add` leaves at
  most an unlisted `.pt`;
- `promoted.json`: the promoted version, the stack of earlier promotions that `rollback` walks
  back, and an append-only history of every promotion and rollback.

Every file is written to a temporary name and renamed into place, so a reader (the daemon on
SIGHUP) sees the old state or the new one, never half of either. Writers (`add`, `promote`,
`rollback`) take an exclusive `flock` on `<root>/.lock`, so `detector models promote` and a
background retrain in the daemon cannot lose each other's promotions. Linux/POSIX only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detector.config import Stream
from detector.errors import CheckpointError
from detector.model import Checkpoint, load_checkpoint, save_checkpoint

SOURCES = ("train", "retrain", "import")
_PROMOTED = "promoted.json"
_LOCK = ".lock"
# Versions become file names: no separators, no leading dot (hidden files, `..`).
_VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


@dataclass(frozen=True)
class VersionInfo:
    """Metadata of one stored version.

    `trained_on` says what data fitted it, e.g. `{"rows": n, "from": iso, "until": iso}` or
    `{"offsets": {...}}`; `validation_error` is the mean held-out reconstruction error (None
    when unknown); `path` is the `.pt` file.
    """

    version: str
    created: str
    parent: str | None
    source: str
    trained_on: dict[str, Any]
    validation_error: float | None
    layout_hash: str
    path: Path


class CheckpointStore:
    """Versioned checkpoints under `root` (created on the first `add`).

    Thread and process safe for writers (a file lock); readers never block.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.root)!r})"

    # --- versions ---------------------------------------------------------------------------

    def add(
        self,
        ckpt: Checkpoint,
        *,
        parent: str | None,
        source: str,
        trained_on: dict[str, Any],
        validation_error: float | None,
    ) -> VersionInfo:
        """Store `ckpt` under its own version (`ckpt.version`). Promotes nothing.

        Raises CheckpointError when the version is already stored, its name cannot be a file
        name, `source` is not one of "train", "retrain", "import", or `parent` is unknown.
        """
        version = ckpt.version
        if not _VERSION_PATTERN.match(version):
            raise CheckpointError(
                f"model store {self.root}: {version!r} cannot name a version (letters, digits, _ . -)"
            )
        if source not in SOURCES:
            raise CheckpointError(f"model store {self.root}: source {source!r} is not one of {', '.join(SOURCES)}")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self._meta_path(version).exists():
                raise CheckpointError(f"model store {self.root} already holds version {version}")
            if parent is not None:
                self.info(parent)
            seq = max((s for s, _ in self._scan()), default=0) + 1
            pt = self._pt_path(version)
            save_checkpoint(pt, ckpt)
            _fsync(pt)
            meta = {
                "version": version,
                "created": ckpt.created or _now(),
                "parent": parent,
                "source": source,
                "trained_on": _plain(trained_on),
                "validation_error": None if validation_error is None else float(validation_error),
                "layout_hash": ckpt.layout_hash,
                "sha256": _sha256(pt),
                "seq": seq,
                "added": _now(),
                "features": list(ckpt.features),
                "window_size": ckpt.window_size,
                "training": _plain(ckpt.training),
            }
            _write_json(self._meta_path(version), meta)
        return self.info(version)

    def versions(self) -> list[VersionInfo]:
        """Every stored version, oldest (first added) first."""
        return [_info(meta, self._pt_path(meta["version"])) for _, meta in sorted(self._scan(), key=lambda m: m[0])]

    def info(self, version: str) -> VersionInfo:
        """One version's metadata; CheckpointError naming the store when it is unknown."""
        return _info(self._meta(version), self._pt_path(version))

    def metadata(self, version: str) -> dict[str, Any]:
        """Everything stored about a version (for `detector models show`)."""
        return self._meta(version)

    # --- promotion --------------------------------------------------------------------------

    def promoted(self) -> str | None:
        """The promoted version, or None when nothing was promoted yet."""
        version: str | None = self._promotions()["promoted"]
        return version

    def history(self) -> list[dict[str, Any]]:
        """Every promotion and rollback, oldest first: `{"at", "action", "version", "reason"}`."""
        history: list[dict[str, Any]] = self._promotions()["history"]
        return history

    def promote(self, version: str, reason: str = "") -> None:
        """Make `version` the promoted one (atomically). Promoting the promoted version again
        only adds a history entry. Raises CheckpointError when the version is unknown or its
        `.pt` no longer matches the digest recorded when it was added."""
        with self._locked():
            self._verify(version)
            state = self._promotions()
            if state["promoted"] != version:
                state["stack"].append(version)
            state["promoted"] = version
            state["history"].append({"at": _now(), "action": "promote", "version": version, "reason": reason})
            _write_json(self.root / _PROMOTED, state)

    def rollback(self) -> str:
        """Re-promote the version promoted before the current one and return it. Rolling back
        again goes further back; a later `promote` starts a new branch from there.

        Raises CheckpointError when there is no earlier promotion to go back to.
        """
        with self._locked():
            state = self._promotions()
            stack: list[str] = state["stack"]
            if len(stack) < 2:
                current = state["promoted"]
                what = f"only {current} was ever promoted" if current else "nothing was promoted yet"
                raise CheckpointError(f"model store {self.root}: nothing to roll back to ({what})")
            previous = stack[-2]
            self._verify(previous)
            stack.pop()
            state["promoted"] = previous
            state["history"].append({"at": _now(), "action": "rollback", "version": previous, "reason": ""})
            _write_json(self.root / _PROMOTED, state)
        return previous

    # --- loading ----------------------------------------------------------------------------

    def load(self, version: str | None = None, stream: Stream | None = None) -> Checkpoint:
        """Load a version (the promoted one by default), checked against `stream` when given.

        The file is read with `load_checkpoint` (weights only: no code from the file runs) after
        its SHA-256 is checked against the one recorded by `add`. Raises CheckpointError when
        nothing is promoted, the version is unknown, or the file was altered or does not fit.
        """
        if version is None:
            version = self.promoted()
            if version is None:
                raise CheckpointError(
                    f"model store {self.root} has no promoted version "
                    "(train one with `detector train`, or `detector models promote VERSION`)"
                )
        self._verify(version)
        ckpt = load_checkpoint(self._pt_path(version), stream)
        if ckpt.version != version:
            raise CheckpointError(
                f"model store {self.root}: {self._pt_path(version).name} holds version {ckpt.version}, not {version}"
            )
        return ckpt

    # --- internals --------------------------------------------------------------------------

    def _pt_path(self, version: str) -> Path:
        return self.root / f"{version}.pt"

    def _meta_path(self, version: str) -> Path:
        return self.root / f"{version}.json"

    def _meta(self, version: str) -> dict[str, Any]:
        path = self._meta_path(version)
        if not _VERSION_PATTERN.match(version) or not path.is_file():
            known = [v.version for v in self.versions()] if self.root.is_dir() else []
            listing = f"; it holds: {', '.join(known)}" if known else " (it holds no versions)"
            if not self.root.is_dir():
                listing = " (the directory does not exist)"
            raise CheckpointError(f"model store {self.root} has no version {version!r}{listing}")
        return _read_json(path)

    def _verify(self, version: str) -> None:
        meta = self._meta(version)
        pt = self._pt_path(version)
        if not pt.is_file():
            raise CheckpointError(f"model store {self.root}: {pt.name} is missing")
        if _sha256(pt) != meta.get("sha256"):
            raise CheckpointError(
                f"model store {self.root}: {pt.name} was altered after it was stored "
                "(its SHA-256 differs from the one recorded); refusing it"
            )

    def _scan(self) -> Iterator[tuple[int, dict[str, Any]]]:
        if not self.root.is_dir():
            return
        for path in self.root.glob("*.json"):
            if path.name == _PROMOTED or not _VERSION_PATTERN.match(path.stem):
                continue
            meta = _read_json(path)
            yield int(meta.get("seq", 0)), meta

    def _promotions(self) -> dict[str, Any]:
        path = self.root / _PROMOTED
        if not path.exists():
            return {"promoted": None, "stack": [], "history": []}
        state = _read_json(path)
        if not isinstance(state.get("stack"), list) or not isinstance(state.get("history"), list):
            raise CheckpointError(f"model store {self.root}: {_PROMOTED} is damaged")
        return state

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / _LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _info(meta: dict[str, Any], path: Path) -> VersionInfo:
    return VersionInfo(
        version=str(meta["version"]),
        created=str(meta.get("created", "")),
        parent=meta.get("parent"),
        source=str(meta.get("source", "")),
        trained_on=dict(meta.get("trained_on") or {}),
        validation_error=meta.get("validation_error"),
        layout_hash=str(meta.get("layout_hash", "")),
        path=path,
    )


def _plain(value: Any) -> Any:
    """`value` as strict JSON: non-finite floats become None, numpy scalars and other leaves
    (paths, topic-partitions) their JSON or string form, keys strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float) or hasattr(value, "item"):
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return number
    return str(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write to a unique temporary file in the same folder, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model store {path.parent}: cannot read {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model store {path.parent}: {path.name} is not a JSON object")
    return data


def stream_checkpoint(stream: Stream) -> Checkpoint:
    """The checkpoint a stream scores with: its store's promoted version, or its `checkpoint`
    file. Raises CheckpointError when it has neither or the model cannot be loaded."""
    if stream.model_store is not None:
        return CheckpointStore(stream.model_store).load(stream=stream)
    if stream.checkpoint is None:
        raise CheckpointError("the stream has neither `checkpoint` nor `model_store`")
    return load_checkpoint(stream.checkpoint, stream)
