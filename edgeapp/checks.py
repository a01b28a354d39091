"""Checks the detector runs beside the model, on the samples it gathered anyway.

A check looks at the newest samples of a chunk of turbines each tick and
answers, per turbine and feature, whether that feature is faulty; the
detector raises the fault groups of the flagged features on top of the
model's verdict. Three exist: ``edgeapp.stuck`` (a reading that stopped
changing), ``edgeapp.relations`` (a reading that left the turbine's own
learned relation to another) and ``edgeapp.noise`` (a slow reading jumping
about far more than learned).

All keep state per turbine slot, and a slot freed by a silent turbine goes
to the next new one: the detector's one ``SlotOwners`` finds the slots of a
part that changed hands since the last look (once, for every check), and
each check starts those from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Baselines",
    "LearningCheck",
    "Parked",
    "SensorCheck",
    "Handover",
    "LearnsPerTurbine",
    "SlotOwners",
    "Snapshot",
    "from_row",
    "moved_slots",
    "to_row",
]


Handover = tuple[int, str | None, str]
"""``(slot, previous turbine or None, turbine)``: a slot now held by another turbine."""


class SensorCheck(Protocol):
    def update(
        self,
        slots: NDArray[np.intp],
        moves: Sequence[Handover],
        counts: NDArray[np.int64],
        features: NDArray[np.float32],
    ) -> NDArray[np.bool_]:
        """``(T, 6)`` flagged features of the turbines in ``slots``.

        ``moves``: those of ``slots`` that changed hands since the last look
        (``SlotOwners.handovers``). ``features`` is ``(T, n, 6)``, oldest
        first, the newest ``n`` samples of each slot; ``counts`` how many
        samples each slot had received then.
        """
        ...


class LearningCheck(SensorCheck, Protocol):
    name: str
    """Its section in the learned file."""
    layout: tuple[str, ...]
    """What each value of a turbine's baseline is (a file of another layout is not used)."""

    def baselines(self) -> Snapshot:
        """Every learned baseline (``Snapshot.rows``: by turbine id, None: a part still
        learning), taken cheaply; the rows may be built on another thread."""
        ...

    def restore(self, baselines: Mapping[str, Sequence[float | None]]) -> None:
        """Take these baselines; each is used when its turbine next takes a slot."""
        ...

    @property
    def version(self) -> int:
        """Changes when the baselines may have: unchanged, they need no writing."""
        ...


class SlotOwners:
    """Which turbine each slot held when the checks last looked at it."""

    def __init__(self, max_turbines: int) -> None:
        self._ids: list[str | None] = [None] * max_turbines

    def handovers(self, slots: NDArray[np.intp], ids: Sequence[str]) -> list[Handover]:
        """The slots of ``slots`` now held by another turbine (recorded as theirs now)."""
        out = []
        for slot, turbine in zip(slots.tolist(), ids, strict=True):
            previous = self._ids[slot]
            if previous != turbine:
                self._ids[slot] = turbine
                out.append((slot, previous, turbine))
        return out

    def apply(self, moves: Sequence[Handover]) -> None:
        """Record handovers found by another ``SlotOwners`` (a check's own record)."""
        for slot, _, turbine in moves:
            self._ids[slot] = turbine

    def held(self) -> list[tuple[int, str]]:
        """``(slot, turbine)`` of every slot held."""
        return [(slot, turbine) for slot, turbine in enumerate(self._ids) if turbine is not None]


def moved_slots(moves: Sequence[Handover]) -> NDArray[np.intp]:
    return np.array([slot for slot, _, _ in moves], dtype=np.intp)


class Parked:
    """Baselines of turbines not in a slot: restored ones waiting, or a slot given away.

    At most ``limit`` are kept; beyond it the longest-parked go (a fleet's ids
    come back, a stream of ever new ids must not grow the daemon's memory).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._rows: dict[str, list[float | None]] = {}

    def put(self, turbine: str, row: list[float | None]) -> None:
        self._rows.pop(turbine, None)
        self._rows[turbine] = row
        while len(self._rows) > self.limit:
            del self._rows[next(iter(self._rows))]

    def take(self, turbine: str) -> list[float | None] | None:
        return self._rows.pop(turbine, None)

    def rows(self) -> dict[str, list[float | None]]:
        return dict(self._rows)


class Baselines:
    """The handing over of slots for a check that learns per turbine (a ``LearningCheck``).

    The check supplies how to read slots' baselines as rows (``(k, width)``,
    NaN where nothing is learned), how to forget slots, and how to put a row
    into a slot. ``version`` counts the changes a file of them must follow:
    the check adds one when it finishes learning turbines. ``counts`` is the
    samples each slot had received at the last look (-1: not looked at since
    it changed hands), for the checks' learning and sliding.
    """

    def __init__(
        self,
        max_turbines: int,
        width: int,
        *,
        rows: Callable[[NDArray[np.intp]], NDArray[np.float64]],
        forget: Callable[[NDArray[np.intp]], None],
        apply: Callable[[int, list[float | None]], None],
    ) -> None:
        self.width = width
        self.owners = SlotOwners(max_turbines)
        self.parked = Parked(4 * max_turbines)
        self.version = 0
        self.counts = np.full(max_turbines, -1, dtype=np.int64)
        self._rows, self._forget, self._apply = rows, forget, apply

    def look(
        self, slots: NDArray[np.intp], moves: Sequence[Handover], counts: NDArray[np.int64]
    ) -> NDArray[np.int64]:
        """Hand over ``moves``; the slots' counts at their last look (-1: none), then
        record ``counts`` as this look's."""
        if moves:
            self._hand_over(moves)
        before = self.counts[slots]
        self.counts[slots] = counts
        return before

    def _hand_over(self, moves: Sequence[Handover]) -> None:
        """Park the baselines of slots' previous turbines, give the new ones theirs."""
        self.owners.apply(moves)
        self.version += 1
        moved = moved_slots(moves)
        values = self._rows(moved)
        for (_, previous, _), row in zip(moves, values, strict=True):
            if previous is not None and not np.isnan(row).all():
                self.parked.put(previous, to_row(row))
        self.counts[moved] = -1
        self._forget(moved)
        for slot, _, turbine in moves:
            taken = self.parked.take(turbine)
            if taken is not None:
                self._apply(slot, taken)

    def snapshot(self) -> Snapshot:
        """A copy of every baseline, cheap to take (the rows are built by ``Snapshot.rows``)."""
        held = self.owners.held()
        slots = np.array([slot for slot, _ in held], dtype=np.intp)
        values = self._rows(slots) if len(slots) else np.empty((0, self.width))
        return Snapshot(self.parked.rows(), [turbine for _, turbine in held], values)

    def restore(self, baselines: Mapping[str, Sequence[float | None]]) -> None:
        self.version += 1
        held = {turbine: slot for slot, turbine in self.owners.held()}
        for turbine, values in baselines.items():
            row = list(values)
            if len(row) != self.width:
                raise ValueError(f"{turbine}: {len(row)} values, expected {self.width}")
            if turbine in held:
                self.counts[held[turbine]] = -1
                self._forget(np.array([held[turbine]], dtype=np.intp))
                self._apply(held[turbine], row)
            else:
                self.parked.put(turbine, row)


class LearnsPerTurbine:
    """What a ``LearningCheck`` answers through its ``Baselines`` (``_baselines``)."""

    _baselines: Baselines

    def baselines(self) -> Snapshot:
        """Learned baselines by turbine id (``LearningCheck``)."""
        return self._baselines.snapshot()

    def restore(self, baselines: Mapping[str, Sequence[float | None]]) -> None:
        """Baselines learned before, used when their turbine takes a slot."""
        self._baselines.restore(baselines)

    @property
    def version(self) -> int:
        return self._baselines.version


@dataclass(frozen=True)
class Snapshot:
    """Baselines as taken: the parked rows, and the held turbines' values (NaN: none)."""

    parked: dict[str, list[float | None]]
    turbines: list[str]
    values: NDArray[np.float64]

    def rows(self) -> dict[str, list[float | None]]:
        """Every learned baseline by turbine id (NaN as None)."""
        rows = dict(self.parked)
        nan = np.isnan(self.values)
        for turbine, row, missing in zip(
            self.turbines, self.values.tolist(), nan.tolist(), strict=True
        ):
            if not all(missing):
                rows[turbine] = [None if m else v for v, m in zip(row, missing, strict=True)]
        return rows


def to_row(values: NDArray[np.float64]) -> list[float | None]:
    """Floats with NaN as None (JSON has no NaN)."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def from_row(row: Sequence[float | None]) -> NDArray[np.float64]:
    return np.array([math.nan if v is None else float(v) for v in row], dtype=np.float64)
