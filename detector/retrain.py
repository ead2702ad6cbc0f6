"""Continuous retraining: fine-tune a stream's model on its recent normal windows.

`Reservoir` keeps a bounded, recent-biased sample of the windows the pipeline scored
normal: anomalous windows and `exclude_neighbours` windows of the same entity on either
side of each are left out (the ones before an anomaly are evicted when it arrives). Adding
a batch is a few vectorized numpy operations, no Python loop over windows.

`Retrainer` decides when to retrain (every `every_windows` scored windows and/or
`interval_s` of event time), fine-tunes a copy of the current model on the reservoir,
validates the copy and the current model on the most recent part of the reservoir (held
out of the fine-tuning), and accepts the copy when its mean reconstruction error is at most
(1 + `tolerance`) times the current model's. An accepted candidate's checkpoint carries its
held-out errors, so thresholds refit from them when the pipeline swaps it in, and the
ratio of the two models' held-out errors scales each entity's dynamic-threshold statistics
across the swap (with a model store, it is stored and promoted first).

In the background (the daemon), a worker thread hands the job to a `TrainingProcess`, a
lower-priority child process that shares neither the GIL nor torch's thread setting with
scoring, and the scoring loop picks the result up at a batch boundary, never waiting for
it. In line (replay, tests), fine-tuning runs at the batch boundary where retraining is
due, so a replay is reproducible; both give the same candidate. The pipeline owns the
retrainer and calls it from its own thread only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from detector.config import ModelSpec, Retraining, Stream
from detector.errors import CheckpointError
from detector.metrics import Metrics
from detector.model import Checkpoint, ErrorStats, RecurrentAutoencoder, new_version, score_windows
from detector.source import format_timestamp
from detector.store import CheckpointStore

log = logging.getLogger(__name__)

Outcome = Literal["accepted", "rejected", "failed"]
_KEY_SHIFT = 40  # window sequence numbers below 2**40; slot * 2**40 + seq orders by (slot, seq)


class Reservoir:
    """A bounded sample of recent normal windows, for fine-tuning.

    Until full, every eligible window is kept; then each new one overwrites a random entry,
    so an entry survives about `capacity` later insertions (ages are geometric: recent
    windows dominate, a few older ones remain). Not thread safe: `snapshot` copies.

    Shape:
        windows: (C, W, D) float32 normalized, as scored
    """

    def __init__(
        self,
        capacity: int,
        window: int,
        n_features: int,
        exclude_neighbours: int = 0,
        exclude_anomalous: bool = True,
        seed: int = 0,
    ) -> None:
        self.capacity = capacity
        self.exclude_neighbours = exclude_neighbours
        self.exclude_anomalous = exclude_anomalous
        self._rng = np.random.default_rng(seed)
        self._values = np.zeros((capacity, window, n_features), np.float32)
        self._slot = np.zeros(capacity, np.int64)
        self._seq = np.zeros(capacity, np.int64)
        self._order = np.zeros(capacity, np.int64)  # insertion counter: larger is more recent
        self._end_ms = np.zeros(capacity, np.int64)
        self._valid = np.zeros(capacity, np.bool_)
        self._filled = 0
        self._inserted = 0
        self._seen = np.zeros(0, np.int64)  # windows seen per slot
        self._last_anomalous = np.zeros(0, np.int64)  # seq of each slot's latest anomalous window

    def __len__(self) -> int:
        return int(self._valid[: self._filled].sum())

    def _ensure(self, slots: np.ndarray) -> None:
        need = int(slots.max()) + 1 if len(slots) else 0
        if need <= len(self._seen):
            return
        size = max(need, 2 * len(self._seen))
        seen = np.zeros(size, np.int64)
        seen[: len(self._seen)] = self._seen
        # Far enough back that no neighbourhood reaches a slot's first window.
        last = np.full(size, -(2**40), np.int64)
        last[: len(self._last_anomalous)] = self._last_anomalous
        self._seen, self._last_anomalous = seen, last

    def add(self, slots: np.ndarray, windows: np.ndarray, anomalous: np.ndarray, end_ms: np.ndarray) -> int:
        """Offer a batch of scored windows, in arrival order; returns how many were kept.

        Shape:
            slots, anomalous, end_ms: (R,); windows: (R, W, D)
        """
        n = len(slots)
        if n == 0:
            return 0
        self._ensure(slots)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        first = np.ones(n, np.bool_)
        first[1:] = sorted_slots[1:] != sorted_slots[:-1]
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
        seq = self._seen[slots] + rank
        self._seen += np.bincount(slots, minlength=len(self._seen))
        bad = np.asarray(anomalous, np.bool_) if self.exclude_anomalous else np.zeros(n, np.bool_)
        k = self.exclude_neighbours
        eligible = ~bad & (seq - self._last_anomalous[slots] > k)
        if bad.any():
            marks = np.sort((slots[bad] << _KEY_SHIFT) + seq[bad])
            eligible &= ~_near((slots << _KEY_SHIFT) + seq, marks, k)
            np.maximum.at(self._last_anomalous, slots[bad], seq[bad])
            # Entries kept before the anomaly arrived may be its onset: evict them.
            held = np.flatnonzero(self._valid[: self._filled])
            if len(held) and k > 0:
                keys = (self._slot[held] << _KEY_SHIFT) + self._seq[held]
                self._valid[held[_near(keys, marks, k)]] = False
        keep = np.flatnonzero(eligible)
        if len(keep) == 0:
            return 0
        room = min(self.capacity - self._filled, len(keep))
        cells = np.arange(self._filled, self._filled + room)
        if room < len(keep):
            cells = np.concatenate([cells, self._rng.integers(0, self.capacity, len(keep) - room)])
        self._filled += room
        # With repeated random cells the later window wins (numpy assigns in order).
        self._values[cells] = windows[keep]
        self._slot[cells] = slots[keep]
        self._seq[cells] = seq[keep]
        self._end_ms[cells] = end_ms[keep]
        self._order[cells] = self._inserted + np.arange(len(keep))
        self._valid[cells] = True
        self._inserted += len(keep)
        return len(keep)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the kept windows, oldest insertion first, and each one's window end.

        Shape:
            returns: windows (K, W, D) float32, end_ms (K,) int64
        """
        held = np.flatnonzero(self._valid[: self._filled])
        held = held[np.argsort(self._order[held], kind="stable")]
        return self._values[held].copy(), self._end_ms[held].copy()


def _near(keys: np.ndarray, marks: np.ndarray, k: int) -> np.ndarray:
    """Whether each key is within `k` of a mark, before or after it (same slot: keys differ
    by at most `k` only within a slot). `marks` is sorted.

    Shape:
        keys: (N,) int64; marks: (M,) int64, M ≥ 1; returns (N,) bool
    """
    after = np.searchsorted(marks, keys, "left")
    next_mark = marks[np.minimum(after, len(marks) - 1)]
    before = np.searchsorted(marks, keys, "right") - 1
    prev_mark = marks[np.maximum(before, 0)]
    result: np.ndarray = ((after < len(marks)) & (next_mark - keys <= k)) | ((before >= 0) & (keys - prev_mark <= k))
    return result


@dataclass(frozen=True)
class RetrainResult:
    """One retraining: its outcome and the numbers that decided it.

    `checkpoint` is the candidate when accepted (else None); the errors are mean
    reconstruction errors on the held-out windows, of the model in use and the candidate.
    """

    outcome: Outcome
    checkpoint: Checkpoint | None
    current_error: float
    candidate_error: float
    train_windows: int
    validation_windows: int
    seconds: float
    detail: str = ""
    # What the retrainer's `prepare` made of the accepted candidate, off the scoring path (the
    # pipeline's scorer for it, built and warmed up), or None.
    prepared: Any = None


def fine_tune(model: RecurrentAutoencoder, windows: np.ndarray, cfg: Retraining, seed: int) -> RecurrentAutoencoder:
    """Train `model` in place on `windows` for `cfg.epochs` epochs (AdamW, gradient norm
    clipped to 1) and return it in eval mode.

    Shape:
        windows: (N, W, D) float32 normalized
    """
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), cfg.batch_size):
            xb = x[order[start : start + cfg.batch_size]]
            optimizer.zero_grad()
            loss = (model(xb) - xb).pow(2).mean()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.eval()
    return model


def fit_candidate(
    model: RecurrentAutoencoder, train: np.ndarray, val: np.ndarray, cfg: Retraining, seed: int
) -> tuple[RecurrentAutoencoder, np.ndarray, np.ndarray]:
    """Fine-tune a copy of `model` on `train`; score both on `val` (as live windows are).

    Runs with `cfg.threads` torch threads (restored afterwards). Torch has one such setting
    per process, so the daemon runs this in a `TrainingProcess`, away from scoring.

    Shape:
        train: (N, W, D), val: (V, W, D); returns the candidate and the errors (V,) of the
        model and of the candidate
    """
    last_steps = model.spec.score_last_steps
    current = score_windows(model, val, last_steps=last_steps)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads)
        candidate = fine_tune(copy.deepcopy(model), train, cfg, seed)
        errors = score_windows(candidate, val, last_steps=last_steps)[0]
    finally:
        torch.set_num_threads(threads)
    return candidate, current, errors


def _model_from(n_features: int, spec: ModelSpec, state: dict[str, np.ndarray]) -> RecurrentAutoencoder:
    """A model in eval mode with the weights `state` (as `TrainingProcess` passes them)."""
    model = RecurrentAutoencoder(n_features, spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.eval()


def _serve(conn: Connection) -> None:
    """The body of a `TrainingProcess`: answer fine-tuning jobs until the pipe closes."""
    # Ctrl-C reaches the whole process group; the daemon decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: on a busy machine the scheduler should favour the scoring process.
    os.nice(10)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            model = _model_from(job["n_features"], ModelSpec.model_validate(job["spec"]), job["state"])
            cfg = Retraining.model_validate(job["cfg"])
            candidate, current, errors = fit_candidate(model, job["train"], job["val"], cfg, job["seed"])
            state = {k: v.detach().numpy() for k, v in candidate.state_dict().items()}
            conn.send(("ok", (state, current, errors)))
        except Exception as exc:
            conn.send(("error", repr(exc)))


class TrainingInterruptedError(RuntimeError):
    """The training process was closed (shutdown, rebalance) while a job was in flight."""


class TrainingProcess:
    """A child process (spawned on first use, then kept) that runs `fit_candidate`.

    Fine-tuning a small recurrent model is mostly Python overhead between tiny tensor ops:
    in a thread it would hold the GIL most of the time and make every scoring batch wait for
    it, and torch's thread count is per process. A process shares neither. `run` blocks the
    calling (worker) thread only; `close` ends the process, and a `run` in progress then
    raises.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one job at a time, whichever retrainer sends it

    def start(self) -> TrainingProcess:
        """Start the process now (importing torch there takes a while), not at the first job."""
        with self._lock:
            self._ensure()
        return self

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            context = multiprocessing.get_context("spawn")
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs,), name=self.name, daemon=True)
            process.start()
            theirs.close()
            self._process, self._conn = process, ours
        return self._conn

    def run(
        self, model: RecurrentAutoencoder, train: np.ndarray, val: np.ndarray, cfg: Retraining, seed: int
    ) -> tuple[RecurrentAutoencoder, np.ndarray, np.ndarray]:
        """`fit_candidate` in the child process (same arguments, same result).

        Shape:
            train: (N, W, D), val: (V, W, D); returns the candidate and two (V,) error arrays
        """
        with self._lock:
            conn = self._ensure()
            conn.send(
                {
                    "n_features": model.output.out_features,
                    "spec": model.spec.model_dump(),
                    "state": {k: v.detach().numpy() for k, v in model.state_dict().items()},
                    "cfg": cfg.model_dump(),
                    "train": train,
                    "val": val,
                    "seed": seed,
                }
            )
            try:
                status, payload = conn.recv()
            except Exception as exc:
                if self._conn is not conn:  # `close` ended it under us
                    raise TrainingInterruptedError(f"training process {self.name} closed: {exc!r}") from None
                raise
        if status != "ok":
            raise RuntimeError(f"training process: {payload}")
        state, current, errors = payload
        # Not a deepcopy of `model`: that is pure Python for milliseconds, holding the GIL
        # against the scoring thread (it doubled scoring p99 next to it); building the module
        # is mostly torch calls that let go of it.
        return _model_from(model.output.out_features, model.spec, state), current, errors

    def close(self, busy: bool = False) -> None:
        """End the process: ask it to exit, or, when `busy` (a job in flight that nobody will
        wait for), terminate it at once. A later job starts a new one."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None and busy:
            process.terminate()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        if process is not None:
            process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)


def retrain(
    stream_name: str,
    stream: Stream,
    current: Checkpoint,
    windows: np.ndarray,
    end_ms: np.ndarray,
    seed: int,
    trainer: TrainingProcess | None = None,
) -> RetrainResult:
    """Fine-tune a copy of `current` on the older part of `windows` and judge it on the rest,
    in `trainer` when given, else in this thread.

    `current.model` is only read, so the caller may pass a copy that no other thread uses.
    Never raises for a bad candidate: a worse one is `rejected`, an exception while training
    is `failed`.

    Shape:
        windows: (K, W, D) oldest first; end_ms: (K,)
    """
    cfg = stream.retraining
    started = time.monotonic()
    n_val = max(1, round(len(windows) * cfg.validation_fraction))
    train, val = windows[: len(windows) - n_val], windows[len(windows) - n_val :]
    if not isinstance(current.model, RecurrentAutoencoder):  # the pipeline refuses this at start
        message = f"model {current.version} is an ensemble; retraining fine-tunes one model"
        return RetrainResult("failed", None, float("nan"), float("nan"), len(train), n_val, 0.0, message)
    try:
        fit = trainer.run if trainer is not None else fit_candidate
        candidate, current_errors, errors = fit(current.model, train, val, cfg, seed)
    except TrainingInterruptedError as exc:
        return RetrainResult(
            "failed", None, float("nan"), float("nan"), len(train), n_val, time.monotonic() - started, str(exc)
        )
    except Exception as exc:
        log.exception("stream %s: retraining failed", stream_name)
        return RetrainResult(
            "failed", None, float("nan"), float("nan"), len(train), n_val, time.monotonic() - started, repr(exc)
        )
    current_error = float(current_errors.mean())
    candidate_error = float(errors.mean())
    seconds = time.monotonic() - started
    if not np.isfinite(candidate_error) or candidate_error > current_error * (1 + cfg.tolerance):
        return RetrainResult(
            "rejected",
            None,
            current_error,
            candidate_error,
            len(train),
            n_val,
            seconds,
            f"held-out error {candidate_error:.6g} > {current_error:.6g} x {1 + cfg.tolerance:g}",
        )
    trained_on = {
        "windows": len(train),
        "validation_windows": n_val,
        "from": format_timestamp(int(end_ms.min())),
        "until": format_timestamp(int(end_ms.max())),
    }
    ckpt = Checkpoint(
        model=candidate,
        scaler=current.scaler,
        errors=ErrorStats.from_errors(errors),
        features=current.features,
        window_size=current.window_size,
        version=new_version(stream_name, candidate),
        layout_hash=current.layout_hash,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        training={
            **trained_on,
            "source": "retrain",
            "parent": current.version,
            "epochs": cfg.epochs,
            "validation_error": candidate_error,
            "parent_validation_error": current_error,
            "seconds": round(seconds, 3),
        },
    )
    return RetrainResult("accepted", ckpt, current_error, candidate_error, len(train), n_val, seconds)


class Retrainer:
    """When and how one stream's model is retrained; see the module docstring.

    The pipeline calls `observe` after scoring a batch and `step` at each batch boundary,
    from its own thread. With a `trainer`, `step` starts a worker thread that has the
    trainer fine-tune, and a later `step` returns the result; without, it fine-tunes in line.
    `store` (a `CheckpointStore`) receives each accepted candidate (source "retrain", parent
    the version in use), promoted. The trainer belongs to the caller, who closes it.
    """

    def __init__(
        self,
        stream_name: str,
        stream: Stream,
        n_features: int,
        trainer: TrainingProcess | None = None,
        metrics: Metrics | None = None,
        store: CheckpointStore | None = None,
        prepare: Callable[[Checkpoint], Any] | None = None,
    ) -> None:
        """`prepare` runs on each accepted candidate in the worker, before the result is handed
        over: whatever it returns rides along as `RetrainResult.prepared`."""
        cfg = stream.retraining
        self.stream_name = stream_name
        self.stream = stream
        self.prepare = prepare
        self.background = trainer is not None
        self.metrics = metrics
        self.store = store
        self.reservoir = Reservoir(
            cfg.reservoir_size,
            stream.window.size,
            n_features,
            cfg.exclude_neighbours,
            cfg.exclude_anomalous,
            cfg.seed,
        )
        # The latest finished retrainings, oldest first (bounded: each may hold a model).
        self.results: deque[RetrainResult] = deque(maxlen=32)
        self.outcomes: Counter[str] = Counter()  # every finished retraining, by outcome
        self._rounds = 0
        self._windows_since = 0
        self._last_ms: int | None = None  # event time of the latest window seen
        self._started_ms: int | None = None  # event time the latest retraining started
        self._worker: threading.Thread | None = None
        self._done: RetrainResult | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._trainer = trainer

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def observe(self, slots: np.ndarray, windows: np.ndarray, anomalous: np.ndarray, end_ms: np.ndarray) -> None:
        """Offer a scored batch to the reservoir and count it towards the next retraining.

        Shape:
            slots, anomalous, end_ms: (R,); windows: (R, W, D)
        """
        self.reservoir.add(slots, windows, anomalous, end_ms)
        self._windows_since += len(slots)
        if len(end_ms):
            latest = int(end_ms.max())
            self._last_ms = latest if self._last_ms is None else max(self._last_ms, latest)
            if self._started_ms is None:
                self._started_ms = int(end_ms.min())

    def due(self) -> bool:
        cfg = self.stream.retraining
        if self.busy or len(self.reservoir) < min(cfg.min_windows, cfg.reservoir_size):
            return False
        by_count = cfg.every_windows is not None and self._windows_since >= cfg.every_windows
        by_time = (
            cfg.interval_s is not None
            and self._last_ms is not None
            and self._started_ms is not None
            and self._last_ms - self._started_ms >= cfg.interval_s * 1000
        )
        return by_count or by_time

    def step(self, current: Checkpoint) -> RetrainResult | None:
        """At a batch boundary: the finished retraining to act on, if any (its candidate is
        to be swapped in when accepted); starts the next one when due."""
        finished = self._collect()
        if finished is None and self.due():
            windows, end_ms = self.reservoir.snapshot()
            self._rounds += 1
            self._windows_since = 0
            self._started_ms = self._last_ms
            seed = self.stream.retraining.seed + self._rounds
            log.info("stream %s: retraining on %d recent normal windows", self.stream_name, len(windows))
            # No copy of the model: fine-tuning copies it, and scoring never changes it in place
            # (a swap replaces the object), so the worker may read it while scoring runs.
            if self.background:
                self._worker = threading.Thread(
                    target=self._run,
                    args=(current, windows, end_ms, seed),
                    name=f"retrain-{self.stream_name}",
                    daemon=True,
                )
                self._worker.start()
            else:
                self._run(current, windows, end_ms, seed)
                finished = self._collect()
        return finished

    def _run(self, current: Checkpoint, windows: np.ndarray, end_ms: np.ndarray, seed: int) -> None:
        try:
            result = retrain(self.stream_name, self.stream, current, windows, end_ms, seed, self._trainer)
            if result.outcome == "accepted" and self.store is not None:
                result = self._keep(result, current.version)
            if result.checkpoint is not None and self.prepare is not None:
                result = replace(result, prepared=self.prepare(result.checkpoint))
        except Exception as exc:  # the worker must always report back, or retraining stops for good
            log.exception("stream %s: retraining failed", self.stream_name)
            result = RetrainResult("failed", None, float("nan"), float("nan"), 0, 0, 0.0, repr(exc))
        if self._closed:
            return  # the pipeline is gone (a rebalance or shutdown ended the training process)
        if self.metrics is not None:
            self.metrics.retrain_total.labels(self.stream_name, result.outcome).inc()
            self.metrics.retrain_seconds.labels(self.stream_name).observe(result.seconds)
        with self._lock:
            self._done = result

    def _keep(self, result: RetrainResult, parent: str) -> RetrainResult:
        """Add the accepted candidate to the model store and promote it."""
        assert result.checkpoint is not None
        store = self.store
        assert store is not None
        known: str | None = parent
        try:
            store.info(parent)
        except CheckpointError:
            known = None  # the model in use came from a checkpoint file, not from the store
        try:
            store.add(
                result.checkpoint,
                parent=known,
                source="retrain",
                trained_on={k: result.checkpoint.training[k] for k in ("windows", "from", "until")},
                validation_error=result.candidate_error,
            )
            store.promote(
                result.checkpoint.version,
                f"retrained: held-out error {result.candidate_error:.6g} vs {result.current_error:.6g}",
            )
        except (CheckpointError, OSError) as exc:
            log.error("stream %s: retrained model not stored (%s); not swapped in", self.stream_name, exc)
            return replace(result, outcome="failed", checkpoint=None, detail=str(exc))
        return result

    def _collect(self) -> RetrainResult | None:
        with self._lock:
            result, self._done = self._done, None
        if result is None:
            return None
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self.results.append(result)
        self.outcomes[result.outcome] += 1
        level = logging.INFO if result.outcome == "accepted" else logging.WARNING
        log.log(
            level,
            "stream %s: retrained model %s (held-out error %.6g, in use %.6g; %d windows, %.1f s)%s",
            self.stream_name,
            result.outcome,
            result.candidate_error,
            result.current_error,
            result.train_windows,
            result.seconds,
            f": {result.detail}" if result.detail else "",
        )
        return result

    def wait(self, timeout_s: float) -> bool:
        """Wait at most `timeout_s` for a running retraining to finish; whether none runs now.
        Its result is still picked up by the next `step`."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout_s)
            return not worker.is_alive()
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait at most `timeout_s` for a running retraining; its result is dropped (the worker
        is a daemon thread, so one still running does not hold up the process's exit)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout_s)
        self._closed = True
        self._worker = None
