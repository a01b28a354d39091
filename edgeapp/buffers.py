"""Rolling buffers of samples: one preallocated array for the whole farm.

A sample arrives raw (7 values, ``RAW_FIELDS``) and is stored as its 6
features (``FEATURES``: the quaternion already turned into roll, pitch, yaw,
step 1 of the pipeline) in float32. ``data`` is ``(max_turbines, capacity, 6)``
float32, allocated once; each turbine owns a row (a *slot*) and writes into it
as a ring.

Why features and not raw float32: rounding the quaternion to float32 before
the conversion is ill-conditioned where the asin argument nears +-1 (pitch
near +-90 degrees, or non-unit quaternions at the clip): there it moved the
model input by up to 0.16 against the float64 reference (allowed: 1e-4).
Converted in float64 first, then rounded, an angle is off by at most half a
float32 ulp (1.2e-7 rad), which the pipeline's float32 output absorbs. At
1,000 turbines the ring is 12 MB instead of 28 MB in float64.

Per slot the buffer keeps the write index, how many samples arrived since
the buffer last (re)started, when the newest sample arrived (monotonic
seconds, for latency) and that sample's own timestamp (epoch ms, NaN when it
had none).

One writer thread (the source) appends; the tick thread gathers copies of the
newest ``n`` samples of many turbines at once. A single lock guards both: an
append holds it for about a microsecond, a gather for the copy of one chunk.

A turbine silent for longer than ``gap_reset_s`` starts over (its count drops
to zero): the pipeline's wavelet denoising assumes an evenly sampled series,
so a window never spans an outage.

Learned turbines (no fixed list) silent for longer than the daemon's
``turbine_evict_s`` give their slot back (``evict_idle``, called by the tick
thread): a burst of junk ids fills the table only until they fall silent.
A freed slot is reused, reset, by the next new turbine; an append to a slot
freed under the writer's feet is refused (returns False), never written into
another turbine's ring. Fixed turbines keep their slots.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgeapp.features import N_FEATURES, N_RAW, raw_to_features, sample_to_features

__all__ = ["Gathered", "TurbineBuffers"]


@dataclass(frozen=True, eq=False)
class Gathered:
    """The newest samples of some turbines, copied out of the buffers."""

    features: NDArray[np.float32]
    """``(T, n, 6)`` features (``FEATURES``), oldest sample first."""
    arrival: NDArray[np.float64]
    """``(T,)`` monotonic arrival time of each turbine's newest sample."""
    ts: NDArray[np.float64]
    """``(T,)`` the newest sample's own timestamp (epoch ms), NaN when it had none."""
    count: NDArray[np.int64]
    """``(T,)`` samples each slot had received since its buffer (re)started."""


class TurbineBuffers:
    """Preallocated per-turbine ring buffers of samples, stored as float32 features."""

    def __init__(
        self,
        *,
        max_turbines: int,
        capacity: int,
        gap_reset_s: float,
        fixed_ids: Sequence[str] | None = None,
    ) -> None:
        if max_turbines < 1 or capacity < 1:
            raise ValueError("max_turbines and capacity must be at least 1")
        if fixed_ids is not None and len(fixed_ids) > max_turbines:
            raise ValueError(f"{len(fixed_ids)} fixed turbines exceed max_turbines {max_turbines}")
        self.max_turbines = max_turbines
        self.capacity = capacity
        self.gap_reset_s = gap_reset_s
        self.lock = threading.Lock()
        # np.zeros maps untouched pages lazily: a slot costs memory once it is used.
        self.data: NDArray[np.float32] = np.zeros(
            (max_turbines, capacity, N_FEATURES), dtype=np.float32
        )
        # Per-slot scalars live in arrays: the source writes a whole batch of
        # messages at once (``append_many``), the tick reads many slots at once.
        self._write = np.zeros(max_turbines, dtype=np.intp)
        self._count = np.zeros(max_turbines, dtype=np.int64)
        self._arrival = np.full(max_turbines, -math.inf)
        self._ts = np.full(max_turbines, math.nan)
        self._held = np.zeros(max_turbines, dtype=np.bool_)  # given out and not freed
        self._ids: list[str | None] = []  # by slot; None: a freed slot
        self._free: list[int] = []
        self._added: list[str] = []  # turbines given a slot since take_added()
        self._slots: dict[str, int] = {}
        self.fixed = fixed_ids is not None
        self.evicted = 0
        """Turbines evicted so far (the ingestor's slot cache watches it)."""
        for turbine in fixed_ids or ():
            self._add(turbine)

    # ---- turbines

    def find(self, turbine: str) -> int | None:
        """The slot of a known turbine, or None."""
        return self._slots.get(turbine)

    def can_add(self) -> bool:
        """Whether a new turbine would get a slot (learned mode, room left)."""
        return not self.fixed and (len(self._ids) < self.max_turbines or bool(self._free))

    def add(self, turbine: str) -> int | None:
        """The turbine's slot, allocating one if needed; None when there is no room."""
        slot = self._slots.get(turbine)
        if slot is not None:
            return slot
        if not self.can_add():
            return None
        with self.lock:
            return self._add(turbine)

    def _add(self, turbine: str) -> int | None:
        slot = self._slots.get(turbine)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._ids[slot] = turbine
                self._write[slot] = self._count[slot] = 0
                self._arrival[slot] = -math.inf
                self._ts[slot] = math.nan
            elif len(self._ids) < self.max_turbines:
                slot = len(self._ids)
                self._ids.append(turbine)
            else:
                return None
            self._held[slot] = True
            self._slots[turbine] = slot
            self._added.append(turbine)
        return slot

    def evict_idle(self, now: float, idle_s: float) -> list[str]:
        """Free the slots of learned turbines silent since ``now - idle_s``; their ids."""
        if self.fixed:
            return []
        limit = now - idle_s
        evicted: list[str] = []
        with self.lock:
            n = len(self._ids)
            arrival = self._arrival[:n]
            # -inf: a slot given out but not written yet (its first sample is coming)
            silent = self._held[:n] & (arrival > -math.inf) & (arrival < limit)
            for slot in np.flatnonzero(silent).tolist():
                turbine = self._ids[slot] or ""  # held: never None
                self._ids[slot] = None
                self._held[slot] = False
                del self._slots[turbine]
                self._count[slot] = 0
                self._free.append(slot)
                evicted.append(turbine)
            self.evicted += len(evicted)
        return evicted

    def take_added(self) -> list[str]:
        """Turbines given a slot since the last call (and still holding it)."""
        with self.lock:
            added, self._added = self._added, []
            return [t for t in added if t in self._slots]

    @property
    def ids(self) -> list[str]:
        """Ids of the turbines holding a slot, by slot."""
        return [t for t in self._ids if t is not None]

    def slot_ids(self) -> list[str | None]:
        """The turbine of each slot given out so far (None: freed), a copy."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._slots)

    # ---- writing (the source's thread)

    def append(
        self, slot: int, row: Sequence[float], arrival: float, ts: float | None = None
    ) -> bool:
        """Append one sample (7 values in ``RAW_FIELDS`` order) to a turbine's ring.

        False (nothing written) when the slot was freed meanwhile."""
        features = sample_to_features(row)
        with self.lock:
            if self._ids[slot] is None:
                return False  # evicted under the writer's feet
            if arrival - self._arrival[slot] > self.gap_reset_s:
                self._count[slot] = 0
            w = int(self._write[slot])
            self.data[slot, w] = features
            w += 1
            self._write[slot] = 0 if w == self.capacity else w
            self._count[slot] += 1
            self._arrival[slot] = arrival
            self._ts[slot] = math.nan if ts is None else ts
        return True

    def append_many(
        self,
        slots: NDArray[np.intp],
        features: NDArray[np.float32],
        arrival: float,
        ts: NDArray[np.float64],
    ) -> NDArray[np.bool_]:
        """Append one sample to each of ``slots`` ``(N,)``, in order (a slot may repeat),
        all arrived at ``arrival``: their ``features`` ``(N, 6)`` (``FEATURES``, already
        converted) and own timestamps ``ts`` ``(N,)`` (NaN: none).

        Returns which were written: False where the slot was freed meanwhile. The
        same as ``append`` for each sample in turn, under one lock and in a few
        array operations (the source's thread hands a whole socket read at once).
        """
        count = len(slots)
        written = np.ones(count, dtype=np.bool_)
        if not count:
            return written
        with self.lock:
            held = self._held[slots]
            if not held.all():
                written = held
                slots, features, ts = slots[held], features[held], ts[held]
                if not len(slots):
                    return written
            # messages grouped by slot, in arrival order within each group
            count = len(slots)
            order = np.argsort(slots, kind="stable")
            grouped = slots[order]
            first = np.empty(count, dtype=np.bool_)
            first[0] = True
            np.not_equal(grouped[1:], grouped[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            if len(starts) == count:  # each slot once (the stream): no ranks to work out
                self._append_distinct(slots, features, arrival, ts)
                return written
            sizes = np.empty(len(starts), dtype=np.intp)
            sizes[:-1] = starts[1:] - starts[:-1]
            sizes[-1] = count - starts[-1]
            unique = grouped[starts]
            rank = np.empty(count, dtype=np.intp)
            rank[order] = np.arange(count) - np.repeat(starts, sizes)
            # a turbine silent for gap_reset_s starts over (only its first sample here can)
            restart = arrival - self._arrival[unique] > self.gap_reset_s
            if restart.any():
                self._count[unique[restart]] = 0
            index = (self._write[slots] + rank) % self.capacity
            if sizes.max() > self.capacity:  # keep each slot's newest: no index twice
                size_of = np.empty(count, dtype=np.intp)
                size_of[order] = np.repeat(sizes, sizes)
                newest = rank >= size_of - self.capacity
                self.data[slots[newest], index[newest]] = features[newest]
            else:
                self.data[slots, index] = features
            self._write[unique] = (self._write[unique] + sizes) % self.capacity
            self._count[unique] += sizes
            self._arrival[unique] = arrival
            self._ts[unique] = ts[order[starts + sizes - 1]]
        return written

    def _append_distinct(
        self,
        slots: NDArray[np.intp],
        features: NDArray[np.float32],
        arrival: float,
        ts: NDArray[np.float64],
    ) -> None:
        """``append_many`` for slots that are all different (under the lock)."""
        restart = arrival - self._arrival[slots] > self.gap_reset_s
        if restart.any():
            self._count[slots[restart]] = 0
        index = self._write[slots]
        self.data[slots, index] = features
        index += 1
        index[index == self.capacity] = 0
        self._write[slots] = index
        self._count[slots] += 1
        self._arrival[slots] = arrival
        self._ts[slots] = ts

    def extend(
        self,
        slot: int,
        rows: Sequence[Sequence[float]],
        arrival: float,
        ts: float | None = None,
    ) -> bool:
        """Append several samples, oldest first, that arrived together (False: slot freed)."""
        block = np.asarray(rows, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != N_RAW:
            raise ValueError(f"rows must have shape (k, {N_RAW}), got {block.shape}")
        k = block.shape[0]
        if k == 0:
            return True
        keep = raw_to_features(block[-self.capacity :])
        with self.lock:
            if self._ids[slot] is None:
                return False
            if arrival - self._arrival[slot] > self.gap_reset_s:
                self._count[slot] = 0
            w = int(self._write[slot])
            index = (w + (k - len(keep)) + np.arange(len(keep))) % self.capacity
            self.data[slot, index] = keep
            self._write[slot] = (w + k) % self.capacity
            self._count[slot] += k
            self._arrival[slot] = arrival
            self._ts[slot] = math.nan if ts is None else ts
        return True

    # ---- reading (the tick's thread)

    def state(self) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """``(counts, newest arrival)`` of every allocated slot, a consistent snapshot."""
        with self.lock:
            n = len(self._ids)
            counts = self._count[:n].copy()
            arrival = self._arrival[:n].copy()
        return counts, arrival

    def gather(
        self, slots: NDArray[np.intp], n: int, out: NDArray[np.float32] | None = None
    ) -> Gathered:
        """Copy the newest ``n`` samples of each slot (oldest first), into ``out`` if given.

        The caller chooses slots with at least ``n`` samples (``state``); a slot
        with fewer gets older ring content in front.
        """
        if not 1 <= n <= self.capacity:
            raise ValueError(f"n must be within 1..{self.capacity}, got {n}")
        count = len(slots)
        shape = (count, n, N_FEATURES)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
        slots = np.asarray(slots, dtype=np.intp)
        data = self.data
        with self.lock:
            write = self._write[slots]
            arrival = self._arrival[slots]
            ts = self._ts[slots]
            received = self._count[slots]
            # a ring's newest n samples are one or two runs of it: slice copies, 3-4x
            # cheaper than an index per sample
            for k, (slot, end) in enumerate(zip(slots.tolist(), write.tolist(), strict=True)):
                start = end - n
                if start >= 0:
                    out[k] = data[slot, start:end]
                else:
                    out[k, :-start] = data[slot, start:]
                    out[k, -start:] = data[slot, :end]
        return Gathered(features=out, arrival=arrival, ts=ts, count=received)
