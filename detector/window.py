"""Per-entity sliding windows and the scaling applied to them.

`WindowStore` keeps one ring buffer of raw values per entity, in flat numpy arrays indexed
by an integer *slot* per entity (thresholds and alert state use the same slots). A batch of
samples is appended with vectorized index arithmetic, with no Python loop over samples or
features, and the windows that become due (every `stride` samples once `size` are
there) come back normalized, in batch order.

Idle eviction (`idle_evict_ms`, from `window.idle_evict_after_s`): the store keeps a stream
clock, the newest timestamp it has seen (event time, so a file and a Kafka topic with the
same records evict the same entities). An entity is *evicted* as soon as the clock passes its
newest sample by more than `idle_evict_ms`: its slot is freed and reused by a later new entity,
so memory stays bounded however many entities come and go. If it sends again, it starts as a
brand-new entity: an empty window, and (in the pipeline) fresh threshold and alert state. The
decision is per sample (was the clock, just before this sample, past the entity's deadline?),
so it does not depend on how the records are cut into batches: between batches, one vectorized
comparison over the slots' newest timestamps (skipped while no deadline can have passed) frees
the idle ones; a sample that arrives within a batch after its entity's deadline moves the
entity to a new slot and evicts the old one. `evicted` lists what the latest `append` evicted;
the owner clears its own per-slot state for those slots before the next `append`, which makes
them free. The pipeline counts evictions in `detector_entities_evicted_total{stream}` and the
live entities in `detector_entities{stream}`.

Because the clock is the newest timestamp of the whole stream, an entity whose records lag the
others' by more than `idle_evict_ms` looks idle at every record and never fills a window:
Kafka partitions read at different paces during a catch-up, or a file that puts series from
different periods one after the other. Keep the setting well above such skew (and above the
longest normal silence of an entity). Replay and Kafka agree whenever they see the records in
the same order (one partition, or a file written in consumption order).

Timestamps (memory): a window's `start_ms` is the timestamp of its oldest sample, so every
sample's timestamp must be kept while it is in the ring. Each ring cell holds, as int32, the
*step* from the entity's previous sample to this one (milliseconds; negative for a sample
older than the previous one, kept when `drop_out_of_order` is False), and each slot keeps the
exact int64 timestamp of its latest sample (`_tail_ms`); a start is the tail minus the steps
after it. That is a quarter of an int64 ring's bytes, and exact for any cadence whose steps
stay within ±24.8 days (2**31 - 1 ms), daily or weekly series included, where offsets against
one base would overflow across a 64-day window. A larger step (a silence longer than that, or
a step back as large) is stored exactly too: its cell holds a marker and the step itself goes
to a small per-slot dict, read only when a window spans it. Appended values and the start and
end timestamps of the windows are the same as with int64 timestamps, whatever the steps.
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
    if spec.relative_min_scale > 0:
        # A feature that is flat in training but for rare spikes (IQR 0, tiny std) would turn any
        # ordinary later movement into hundreds of scales and swamp every other feature's error:
        # floor its scale at a fraction of what training showed it can span (its range, or its
        # level when that is larger, so a constant non-zero series is measured in relative change).
        magnitude = np.maximum(data.max(axis=0) - data.min(axis=0), np.abs(center))
        scale = np.maximum(scale, spec.relative_min_scale * magnitude)
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


@dataclass
class Evicted:
    """The entities one `append` evicted.

    `rows`: each eviction happened after the batch rows before it and before the rows from it
    on (the row that moved the clock past the entity's deadline is the one before; so is any
    earlier row of the entity). The same eviction gets the same place in the stream however the
    stream is cut into batches, so a caller can order its consequences (a resolve) among the
    windows' (an entity that came back within the batch continues in a new slot from a row at
    or after `row`).

    Shape:
        slots, last_ms, rows: (K,) int64; entities: K names
    """

    slots: np.ndarray
    entities: list[str]
    last_ms: np.ndarray  # the entity's newest timestamp before it was evicted
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)


_NO_TIME = np.iinfo(np.int64).min
# Steps between consecutive samples that fit the int32 ring; the one int32 left out marks a
# cell whose step is in `_wide_steps` instead.
_STEP_MAX = np.iinfo(np.int32).max
_WIDE_STEP = np.iinfo(np.int32).min


class WindowStore:
    """Ring buffers of the last `size` raw samples of every entity.

    Not thread safe: one pipeline owns it. With `idle_evict_ms`, idle entities are evicted
    (see the module docstring).
    """

    def __init__(
        self,
        size: int,
        stride: int,
        n_features: int,
        scaler: Scaler,
        capacity: int = 1024,
        idle_evict_ms: int | None = None,
    ) -> None:
        self.size = size
        self.stride = stride
        self.n_features = n_features
        self.scaler = scaler
        self.slot_of: dict[str, int] = {}
        self.entity_of: list[str] = []
        capacity = max(capacity, 1)
        self._values = np.zeros((capacity, size, n_features), np.float32)
        # Timestamps as steps from the previous sample, and the latest sample's (module docstring).
        self._steps = np.zeros((capacity, size), np.int32)
        self._tail_ms = np.zeros(capacity, np.int64)
        self._wide_steps: dict[int, dict[int, int]] = {}  # slot -> {ring cell: step beyond int32}
        self._count = np.zeros(capacity, np.int64)  # samples ever appended
        self._last_ms = np.full(capacity, _NO_TIME, np.int64)  # newest timestamp (the max, not the latest)
        self._center = np.zeros((capacity, n_features), np.float32)
        self._scale = np.ones((capacity, n_features), np.float32)
        # Centres re-fitted after a regime change (`recentre`), by entity: a new scaler keeps them.
        self._recentred: dict[str, np.ndarray] = {}
        self.idle_evict_ms = idle_evict_ms
        self.clock_ms = _NO_TIME  # newest timestamp seen on the stream
        self.evicted = Evicted(np.empty(0, np.int64), [], np.empty(0, np.int64), np.empty(0, np.int64))
        self._live = np.zeros(capacity, bool)  # slot holds an entity that is not evicted
        self._free: list[int] = []
        # A lower bound on the newest timestamp of every live entity: while the clock has not
        # passed it by `idle_evict_ms`, nothing can be idle and the sweep is skipped.
        self._oldest_ms = np.iinfo(np.int64).max
        self._evicting: list[tuple[int, str, int, int]] = []  # (slot, entity, last_ms, row)

    def __len__(self) -> int:
        """Live entities (not evicted)."""
        return len(self.slot_of)

    def slots(self, entities: list[str]) -> np.ndarray:
        """Slot of each entity, creating slots for new ones."""
        slot_of = self.slot_of
        # Looked up in C (`map`, `list.index`): a Python loop with a numpy store per sample costs
        # several times more.
        found = list(map(slot_of.get, entities))
        at = -1
        while True:
            try:
                at = found.index(None, at + 1)
            except ValueError:
                break
            slot = slot_of.get(entities[at])  # new, unless it was new earlier in the batch
            found[at] = self._new_slot(entities[at]) if slot is None else slot
        return np.array(found, np.int64)

    def count(self, slot: int) -> int:
        return int(self._count[slot])

    def rescale(self, scaler: Scaler) -> None:
        """Normalize with `scaler` from now on, for the entities already buffered too (the
        rings hold raw values, so their windows need no refill). A centre set by `recentre`
        is kept."""
        self.scaler = scaler
        for slot, entity in enumerate(self.entity_of):
            self._center[slot], self._scale[slot] = scaler.params_for(entity)
            if entity in self._recentred:
                self._center[slot] = self._recentred[entity]

    def params(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The centre and scale each slot's windows are normalized with.

        Shape:
            slots: (R,); returns two (R, D) float32 arrays
        """
        return self._center[slots], self._scale[slots]

    def recentre(self, slot: int, center: np.ndarray) -> None:
        """Normalize the slot's windows around `center` (raw units, shape (D,)) from now on: its
        level changed for good (a regime change). The scale stays."""
        self._center[slot] = center
        self._recentred[self.entity_of[slot]] = self._center[slot].copy()

    def _new_slot(self, entity: str) -> int:
        if self._free:
            slot = self._free.pop()
            self.entity_of[slot] = entity
            self._wide_steps.pop(slot, None)
        else:
            slot = len(self.entity_of)
            if slot == len(self._count):
                self._grow(slot + max(slot // 2, 1))
            self.entity_of.append(entity)
        # A grown slot is all zeros and a reused one holds its previous entity's state; with no
        # samples, none of its ring or tail is ever read.
        self._count[slot] = 0
        self._last_ms[slot] = _NO_TIME
        self.slot_of[entity] = slot
        self._live[slot] = True
        self._center[slot], self._scale[slot] = self.scaler.params_for(entity)
        if entity in self._recentred:
            self._center[slot] = self._recentred[entity]
        return slot

    def _grow(self, capacity: int) -> None:
        # Zeroed memory (calloc) is mapped lazily: the capacity not used yet costs address space,
        # not RSS, unlike a fill value that writes every page (`_new_slot` initializes a slot).
        # Growing one array at a time keeps one old copy alive at most (the peak is the state
        # plus the old values array); growing by half, not double, leaves at most a third of
        # the allocation unused.
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((capacity, *a.shape[1:]), a.dtype)
            out[: len(a)] = a
            return out

        self._values = grown(self._values)
        self._steps = grown(self._steps)
        self._tail_ms = grown(self._tail_ms)
        self._count = grown(self._count)
        self._last_ms = grown(self._last_ms)
        self._center = grown(self._center)
        self._scale = grown(self._scale)
        self._live = grown(self._live)

    def append(self, batch: SampleBatch, drop_out_of_order: bool = True) -> tuple[ReadyWindows, np.ndarray]:
        """Append a batch; return the windows it made due and the rows rejected as out of order.

        A sample older than the newest one already seen for its entity is out of order; with
        `drop_out_of_order` it is rejected (never silently: its row comes back), otherwise it
        is appended where it arrived.
        """
        self._release()
        if len(batch) == 0:
            return self._no_windows(), np.empty(0, np.int64)
        slots = self.slots(batch.entities) if self.idle_evict_ms is None else self._slots_by_life(batch)
        result = self._append(batch, slots, drop_out_of_order)
        if self.idle_evict_ms is not None:
            self._sweep(batch, slots, self.idle_evict_ms)
        self.evicted = Evicted(
            np.array([e[0] for e in self._evicting], np.int64),
            [e[1] for e in self._evicting],
            np.array([e[2] for e in self._evicting], np.int64),
            np.array([e[3] for e in self._evicting], np.int64),
        )
        self._evicting = []
        return result

    def _append(
        self, batch: SampleBatch, slots: np.ndarray, drop_out_of_order: bool
    ) -> tuple[ReadyWindows, np.ndarray]:
        n = len(batch)
        if n == 0:
            return self._no_windows(), np.empty(0, np.int64)
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
                return self._append_rows(batch, slots, np.flatnonzero(keep)), rejected
        return self._append_sorted(batch, slots, order, s_slots, first, group_start), rejected

    def _append_rows(self, batch: SampleBatch, slots: np.ndarray, rows: np.ndarray) -> ReadyWindows:
        ready = self._append(batch.take(rows), slots[rows], drop_out_of_order=False)[0]
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

        # Each sample's step from the entity's previous one (the tail, for the group's first);
        # an entity's first sample ever has none, and its step is never read.
        s_times = batch.timestamps[order]
        previous = np.empty(n, np.int64)
        previous[1:] = s_times[:-1]
        previous[first] = self._tail_ms[s_slots[first]]
        steps = s_times - previous
        steps[first & (before == 0)] = 0

        # Write the new samples into the rings. Only the last `w` of each group survive,
        # and writing only those keeps every target cell unique.
        group_len = np.bincount(np.cumsum(first) - 1)[np.cumsum(first) - 1]
        keep = rank >= group_len - w
        cells = seq[keep] % w
        rows = order[keep]
        # Flat indices into the rings: one index array is faster than two.
        self._values.reshape(-1, self.n_features)[s_slots[keep] * w + cells] = batch.values[rows]
        self._write_steps(s_slots[keep], cells, steps[keep])
        last = np.flatnonzero(np.r_[first[1:], True])  # last sample of each group
        self._count[s_slots[last]] += rank[last] + 1
        self._tail_ms[s_slots[last]] = s_times[last]
        self._last_ms[s_slots[last]] = np.maximum(self._last_ms[s_slots[last]], _group_max(s_times, first))
        return ready

    def _write_steps(self, slots: np.ndarray, cells: np.ndarray, steps: np.ndarray) -> None:
        """Store `steps` (int64) in the ring cells; one beyond int32 goes to `_wide_steps`.

        Shape:
            slots, cells, steps: (K,), each (slot, cell) at most once
        """
        if self._wide_steps:
            # A cell overwritten forgets its wide step (rare: only slots that have one loop).
            hit = np.flatnonzero(np.isin(slots, np.fromiter(self._wide_steps, np.int64)))
            for slot, cell in zip(slots[hit].tolist(), cells[hit].tolist(), strict=True):
                wide = self._wide_steps.get(slot)
                if wide is not None:
                    wide.pop(cell, None)
                    if not wide:
                        del self._wide_steps[slot]
        beyond = (steps > _STEP_MAX) | (steps <= _WIDE_STEP)
        self._steps[slots, cells] = np.where(beyond, _WIDE_STEP, steps)
        beyond_steps = zip(slots[beyond].tolist(), cells[beyond].tolist(), steps[beyond].tolist(), strict=True)
        for slot, cell, step in beyond_steps:
            self._wide_steps.setdefault(slot, {})[cell] = step

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
        # Flat indices into the rings: `np.take` is twice as fast as indexing with two arrays.
        flat = slot[:, None] * w + ring_cell
        ring_values = np.take(self._values.reshape(-1, self.n_features), flat, axis=0)
        new_values = batch.values[order[batch_pos]]
        values = np.where(from_ring[..., None], ring_values, new_values)
        # A window starting in the ring: the ring cells after its start (columns 1 on, up to the
        # ring's end) hold the steps from its start to the entity's latest sample before this
        # batch, the tail. (Rows starting in the batch sum harmless cells, then take the batch's.)
        after_start = from_ring[:, 1:]
        steps = np.take(self._steps.reshape(-1), flat[:, 1:])
        to_tail = (steps * after_start).sum(axis=1, dtype=np.int64)  # 2x faster than sum(where=)
        if self._wide_steps:
            for i, j in np.argwhere(after_start & (steps == _WIDE_STEP)).tolist():
                to_tail[i] += self._wide_steps[int(slot[i])][int(ring_cell[i, j + 1])] - _WIDE_STEP
        start_ms = np.where(from_ring[:, 0], self._tail_ms[slot] - to_tail, batch.timestamps[order[batch_pos[:, 0]]])
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

    # --- idle eviction ------------------------------------------------------------------------

    def _slots_by_life(self, batch: SampleBatch) -> np.ndarray:
        """Like `slots`, except that a sample arriving when the stream clock is already past its
        entity's deadline evicts the entity's slot and gets a new one (the entity starts afresh).

        The clock just before each sample is the newest timestamp before it in the batch, or
        before the batch, so the result is the same however the stream is cut into batches.
        """
        assert self.idle_evict_ms is not None
        slots = self.slots(batch.entities)
        n, times = len(batch), batch.timestamps
        clock = np.maximum.accumulate(np.concatenate(([self.clock_ms], times[:-1])))
        order = np.argsort(slots, kind="stable")
        s_slots, s_times, s_clock = slots[order], times[order], clock[order]
        first = np.ones(n, bool)
        first[1:] = s_slots[1:] != s_slots[:-1]
        # Newest timestamp of the entity before each sample (the sentinel where there is none).
        newest = np.where(first, self._last_ms[s_slots], _segmented_running_max(s_times, first, self._last_ms[s_slots]))
        known = ~first | (self._count[s_slots] > 0)
        newest = np.where(known, newest, s_clock)  # keeps the subtraction below from overflowing
        expired = known & (s_clock - newest > self.idle_evict_ms)
        if not expired.any():
            return slots
        if (expired & (s_times < newest)).any():
            # A sample older than the entity's previous life restarts it: the running maximum
            # above spans both lives, so recompute the rare batch sample by sample.
            expired, newest = self._expired_by_loop(s_slots, s_times, s_clock, first, self.idle_evict_ms)
        group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        lives = np.cumsum(expired)  # restarts up to each position (over all groups)
        restarted = lives > lives[group_start] - expired[group_start]
        fresh = np.empty(int(lives[-1]), np.int64)
        at = np.flatnonzero(expired)
        # The entity's previous row in the batch (-1: none) and the row that moved the clock past
        # its deadline: the eviction comes after both.
        previous_row = np.where(first[at], -1, order[np.maximum(at - 1, 0)])
        evicted_at = np.maximum(_passed(np.maximum(clock, times), newest[at] + self.idle_evict_ms), previous_row) + 1
        previous_group = -1
        # One iteration per restart, which happens once per idle period of an entity.
        for k, p in enumerate(at.tolist()):
            old = int(fresh[k - 1]) if group_start[p] == previous_group else int(s_slots[p])
            entity = self.entity_of[old]
            self._evict(old, int(newest[p]), int(evicted_at[k]))
            fresh[k] = self._new_slot(entity)
            previous_group = int(group_start[p])
        s_slots = np.where(restarted, fresh[np.maximum(lives - 1, 0)], s_slots)
        out = np.empty(n, np.int64)
        out[order] = s_slots
        return out

    def _expired_by_loop(
        self, s_slots: np.ndarray, s_times: np.ndarray, s_clock: np.ndarray, first: np.ndarray, idle_ms: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """`expired` of `_slots_by_life` and the newest timestamp of the entity's life before
        each sample, one sample at a time."""
        expired = np.zeros(len(s_slots), bool)
        before = s_clock.copy()
        newest: int | None = None
        for i in range(len(s_slots)):
            if first[i]:
                slot = int(s_slots[i])
                newest = int(self._last_ms[slot]) if self._count[slot] > 0 else None
            t = int(s_times[i])
            if newest is not None:
                before[i] = newest
            if newest is not None and int(s_clock[i]) - newest > idle_ms:
                expired[i] = True
                newest = t
            else:
                newest = t if newest is None else max(newest, t)
        return expired, before

    def _evict(self, slot: int, last_ms: int, row: int) -> None:
        entity = self.entity_of[slot]
        if self.slot_of.get(entity) == slot:
            del self.slot_of[entity]
        # A returning entity is new, so it forgets a centre re-fitted in its previous life.
        self._recentred.pop(entity, None)
        self._live[slot] = False
        self._evicting.append((slot, entity, last_ms, row))

    def _sweep(self, batch: SampleBatch, slots: np.ndarray, idle_ms: int) -> None:
        """Advance the clock past `batch` and evict every entity idle for more than `idle_ms`."""
        times = batch.timestamps
        clock_before = self.clock_ms
        self.clock_ms = max(self.clock_ms, int(times.max()))
        self._oldest_ms = min(self._oldest_ms, int(times.min()))
        deadline = self.clock_ms - idle_ms
        if self._oldest_ms >= deadline:
            return
        top = len(self.entity_of)
        live, last = self._live[:top], self._last_ms[:top]
        idle = np.flatnonzero(live & (last < deadline))
        if len(idle):
            # Each eviction comes after the row that moved the clock past the entity's deadline
            # and after the entity's own rows in the batch, as it would with the batch cut there.
            last_row = np.full(top, -1, np.int64)
            np.maximum.at(last_row, slots, np.arange(len(batch)))
            clock = np.maximum.accumulate(np.maximum(times, clock_before))
            evicted_at = np.maximum(_passed(clock, last[idle] + idle_ms), last_row[idle]) + 1
            for slot, row in zip(idle.tolist(), evicted_at.tolist(), strict=True):
                self._evict(slot, int(last[slot]), row)
        remaining = last[live]  # `_evict` cleared the idle ones from `live`
        self._oldest_ms = int(remaining.min()) if len(remaining) else np.iinfo(np.int64).max

    def _release(self) -> None:
        """The slots evicted by the previous `append` become free (their owner has cleared them)."""
        for slot in self.evicted.slots.tolist():
            self.entity_of[slot] = ""
            self._free.append(slot)
        if len(self.evicted):
            self.evicted = Evicted(np.empty(0, np.int64), [], np.empty(0, np.int64), np.empty(0, np.int64))

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


def _passed(clock: np.ndarray, deadlines: np.ndarray) -> np.ndarray:
    """For each deadline, the first row where the running `clock` is past it (len(clock) if none).

    Shape:
        clock: (N,) nondecreasing; deadlines: (K,); returns (K,) int64
    """
    out: np.ndarray = np.searchsorted(clock, deadlines, side="right").astype(np.int64)
    return out


def _group_max(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.maximum.reduceat(values, np.flatnonzero(first))
    return out
