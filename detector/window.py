"""Per-entity sliding windows and the scaling applied to them.

`WindowStore` keeps one ring buffer of raw values per entity, in flat numpy arrays indexed
by an integer *slot* per entity (thresholds and alert state use the same slots). A batch of
samples is appended with vectorized index arithmetic, with no Python loop over samples or
features, and the windows that become due (every `stride` samples once `size` are
there) come back normalized, in batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.config import Normalization
from detector.source import SampleBatch

NORMALIZED_LIMIT = 1e4


@dataclass(frozen=True)
class Scaler:
    """Affine scaling fitted on training values: x' = (x - center) / scale.

    Shape:
        center, scale: (D,) float32, the population parameters
        entity_center, entity_scale: (E, D) float32 for `entities` (per-entity scaling)
    """

    center: np.ndarray
    scale: np.ndarray
    entities: tuple[str, ...] = ()
    entity_center: np.ndarray | None = None
    entity_scale: np.ndarray | None = None

    @staticmethod
    def fit(values: np.ndarray, entities: list[str], spec: Normalization) -> Scaler:
        """Fit population parameters, and per-entity ones when `spec.per_entity`.

        Shape:
            values: (N, D) raw training values; entities: N names
        """
        center, scale = _fit_params(values, spec)
        if not spec.per_entity:
            return Scaler(center, scale)
        names = sorted(set(entities))
        index = {name: i for i, name in enumerate(names)}
        codes = np.fromiter((index[e] for e in entities), dtype=np.int64, count=len(entities))
        params = [_fit_params(values[codes == i], spec) for i in range(len(names))]
        return Scaler(
            center,
            scale,
            tuple(names),
            np.stack([p[0] for p in params]),
            np.stack([p[1] for p in params]),
        )

    def params_for(self, entity: str) -> tuple[np.ndarray, np.ndarray]:
        """The entity's own parameters when it was seen in training, else the population's."""
        if self.entity_center is not None and self.entity_scale is not None and entity in self._entity_index:
            i = self._entity_index[entity]
            return self.entity_center[i], self.entity_scale[i]
        return self.center, self.scale

    @property
    def _entity_index(self) -> dict[str, int]:
        cached: dict[str, int] | None = self.__dict__.get("_index")
        if cached is None:
            cached = {name: i for i, name in enumerate(self.entities)}
            object.__setattr__(self, "_index", cached)
        return cached


def _fit_params(values: np.ndarray, spec: Normalization) -> tuple[np.ndarray, np.ndarray]:
    d = values.shape[1]
    if spec.method == "none" or len(values) == 0:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    data = values.astype(np.float64)
    if spec.method == "robust":
        q25, center, q75 = np.percentile(data, [25, 50, 75], axis=0)
        scale = q75 - q25
        # A series that is mostly constant has IQR 0; fall back to the std, then the floor.
        scale = np.where(scale > spec.min_scale, scale, data.std(axis=0))
    else:
        center, scale = data.mean(axis=0), data.std(axis=0)
    scale = np.maximum(scale, spec.min_scale)
    return center.astype(np.float32), scale.astype(np.float32)


@dataclass
class ReadyWindows:
    """The windows a batch made due, in batch order.

    Shape:
        rows: (R,) int64 indices into the batch (the sample that completed each window)
        slots: (R,) int64 entity slots
        values: (R, W, D) float32 normalized windows, oldest sample first
        start_ms, end_ms: (R,) int64 timestamps of the first and last sample
    """

    rows: np.ndarray
    slots: np.ndarray
    values: np.ndarray
    start_ms: np.ndarray
    end_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


class WindowStore:
    """Ring buffers of the last `size` raw samples of every entity.

    Not thread safe: one pipeline owns it.
    """

    def __init__(self, size: int, stride: int, n_features: int, scaler: Scaler, capacity: int = 1024) -> None:
        self.size = size
        self.stride = stride
        self.n_features = n_features
        self.scaler = scaler
        self.slot_of: dict[str, int] = {}
        self.entity_of: list[str] = []
        capacity = max(capacity, 1)
        self._values = np.zeros((capacity, size, n_features), np.float32)
        self._times = np.zeros((capacity, size), np.int64)
        self._count = np.zeros(capacity, np.int64)  # samples ever appended
        self._last_ms = np.full(capacity, np.iinfo(np.int64).min, np.int64)
        self._center = np.zeros((capacity, n_features), np.float32)
        self._scale = np.ones((capacity, n_features), np.float32)

    def __len__(self) -> int:
        return len(self.entity_of)

    def slots(self, entities: list[str]) -> np.ndarray:
        """Slot of each entity, creating slots for new ones."""
        slot_of = self.slot_of
        out = np.empty(len(entities), np.int64)
        for i, entity in enumerate(entities):
            slot = slot_of.get(entity)
            if slot is None:
                slot = self._new_slot(entity)
            out[i] = slot
        return out

    def count(self, slot: int) -> int:
        return int(self._count[slot])

    def _new_slot(self, entity: str) -> int:
        slot = len(self.entity_of)
        if slot == len(self._count):
            self._grow(2 * slot)
        self.slot_of[entity] = slot
        self.entity_of.append(entity)
        self._center[slot], self._scale[slot] = self.scaler.params_for(entity)
        return slot

    def _grow(self, capacity: int) -> None:
        def grown(a: np.ndarray, fill: int | float) -> np.ndarray:
            out = np.full((capacity, *a.shape[1:]), fill, a.dtype)
            out[: len(a)] = a
            return out

        self._values = grown(self._values, 0.0)
        self._times = grown(self._times, 0)
        self._count = grown(self._count, 0)
        self._last_ms = grown(self._last_ms, np.iinfo(np.int64).min)
        self._center = grown(self._center, 0.0)
        self._scale = grown(self._scale, 1.0)

    def append(self, batch: SampleBatch, drop_out_of_order: bool = True) -> tuple[ReadyWindows, np.ndarray]:
        """Append a batch; return the windows it made due and the rows rejected as out of order.

        A sample older than the newest one already seen for its entity is out of order; with
        `drop_out_of_order` it is rejected (never silently: its row comes back), otherwise it
        is appended where it arrived.
        """
        n = len(batch)
        if n == 0:
            return self._no_windows(), np.empty(0, np.int64)
        slots = self.slots(batch.entities)
        # Group the batch by entity, keeping arrival order inside each group.
        order = np.argsort(slots, kind="stable")
        s_slots = slots[order]
        s_times = batch.timestamps[order]
        first = np.ones(n, bool)
        first[1:] = s_slots[1:] != s_slots[:-1]
        group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))

        rejected = np.empty(0, np.int64)
        if drop_out_of_order:
            previous_max = _segmented_running_max(s_times, first, self._last_ms[s_slots])
            late = s_times < previous_max
            if late.any():
                rejected = np.sort(order[late])
                keep = np.ones(n, bool)
                keep[rejected] = False
                return self._append_rows(batch, np.flatnonzero(keep)), rejected
        return self._append_sorted(batch, slots, order, s_slots, first, group_start), rejected

    def _append_rows(self, batch: SampleBatch, rows: np.ndarray) -> ReadyWindows:
        ready = self.append(batch.take(rows), drop_out_of_order=False)[0]
        ready.rows = rows[ready.rows]
        return ready

    def _append_sorted(
        self,
        batch: SampleBatch,
        slots: np.ndarray,
        order: np.ndarray,
        s_slots: np.ndarray,
        first: np.ndarray,
        group_start: np.ndarray,
    ) -> ReadyWindows:
        n, w = len(batch), self.size
        rank = np.arange(n) - group_start  # position of the sample inside its entity's group
        before = self._count[s_slots]  # samples the entity had before this batch
        seq = before + rank  # sequence number of each sample in its entity's history
        due = (seq + 1 >= w) & ((seq + 1 - w) % self.stride == 0)

        ready = self._no_windows()
        if due.any():
            ready = self._gather(batch, order, s_slots, group_start, rank, before, due)

        # Write the new samples into the rings. Only the last `w` of each group survive,
        # and writing only those keeps every target cell unique.
        group_len = np.bincount(np.cumsum(first) - 1)[np.cumsum(first) - 1]
        keep = rank >= group_len - w
        cells = seq[keep] % w
        rows = order[keep]
        self._values[s_slots[keep], cells] = batch.values[rows]
        self._times[s_slots[keep], cells] = batch.timestamps[rows]
        last = np.flatnonzero(np.r_[first[1:], True])  # last sample of each group
        self._count[s_slots[last]] += rank[last] + 1
        self._last_ms[s_slots[last]] = np.maximum(
            self._last_ms[s_slots[last]], _group_max(batch.timestamps[order], first)
        )
        return ready

    def _gather(
        self,
        batch: SampleBatch,
        order: np.ndarray,
        s_slots: np.ndarray,
        group_start: np.ndarray,
        rank: np.ndarray,
        before: np.ndarray,
        due: np.ndarray,
    ) -> ReadyWindows:
        w = self.size
        # A due window ending at group rank r covers the entity's virtual sequence
        # (old ring contents ++ this batch's samples) at offsets r+1 .. r+w, where offsets
        # below w are ring cells and the rest are batch samples.
        r = rank[due]
        offsets = r[:, None] + 1 + np.arange(w)[None, :]  # (R, W)
        slot = s_slots[due]
        from_ring = offsets < w
        ring_cell = (before[due][:, None] - w + offsets) % w
        batch_pos = group_start[due][:, None] + offsets - w  # index into the sorted batch
        batch_pos = np.where(from_ring, 0, batch_pos)
        ring_values = self._values[slot[:, None], ring_cell]
        new_values = batch.values[order[batch_pos]]
        values = np.where(from_ring[..., None], ring_values, new_values)
        start_ms = np.where(
            from_ring[:, 0], self._times[slot, ring_cell[:, 0]], batch.timestamps[order[batch_pos[:, 0]]]
        )
        rows = order[due]
        values = (values - self._center[slot][:, None, :]) / self._scale[slot][:, None, :]
        # A finite but absurd reading (1e20 from a broken exporter) would overflow the squared
        # error to inf; ten thousand scales out is already as anomalous as a score can say.
        values = np.clip(values, -NORMALIZED_LIMIT, NORMALIZED_LIMIT)
        # Back to batch order so results line up with the records that produced them.
        back = np.argsort(rows, kind="stable")
        return ReadyWindows(
            rows=rows[back],
            slots=slot[back],
            values=np.ascontiguousarray(values[back], dtype=np.float32),
            start_ms=start_ms[back],
            end_ms=batch.timestamps[rows[back]],
        )

    def _no_windows(self) -> ReadyWindows:
        empty = np.empty(0, np.int64)
        return ReadyWindows(empty, empty, np.empty((0, self.size, self.n_features), np.float32), empty, empty)


def _segmented_running_max(values: np.ndarray, first: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """For each element, the max of its group's `initial` and the group's earlier elements.

    Groups are contiguous runs starting where `first` is True.
    """
    n = len(values)
    # Clamping `initial` to the batch minimum changes no comparison against batch values and
    # keeps the "never seen" sentinel from overflowing the offsets below.
    lo = int(values.min())
    start = np.maximum(initial, lo)
    group = np.cumsum(first) - 1
    span = int(max(int(values.max()), int(start.max()))) - lo + 1
    if span * (int(group[-1]) + 1) < 2**62:
        # Offsetting each group above all earlier ones turns one running max into per-group maxima.
        offset = group * span - lo
        running = np.maximum.accumulate(np.maximum(values, start) + offset) - offset
        prev = np.empty(n, np.int64)
        prev[0] = lo
        prev[1:] = running[:-1]
        result: np.ndarray = np.where(first, start, np.maximum(prev, start))
        return result
    out = np.empty(n, np.int64)
    current = lo
    for i in range(n):  # timestamps too spread for the offset trick
        if first[i]:
            current = int(start[i])
        out[i] = current
        current = max(current, int(values[i]))
    return out


def _group_max(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.maximum.reduceat(values, np.flatnonzero(first))
    return out
