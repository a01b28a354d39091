"""Checks the detector runs beside the model, on the samples it gathered anyway.

A check looks at the newest samples of a chunk of turbines each tick and
answers, per turbine and feature, whether that feature is faulty; the
detector raises the fault groups of the flagged features on top of the
model's verdict. Three exist: ``edgeapp.stuck`` (a reading that stopped
changing), ``edgeapp.relations`` (a reading that left the turbine's own
learned relation to another) and ``edgeapp.noise`` (a slow reading jumping
about far more than learned).

All keep state per turbine slot, and a slot freed by a silent turbine goes
to the next new one: ``SlotOwners`` tells a check which slots changed hands
since it last looked, so it starts those from nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = ["SensorCheck", "SlotOwners"]


class SensorCheck(Protocol):
    def update(
        self,
        slots: NDArray[np.intp],
        ids: Sequence[str],
        counts: NDArray[np.int64],
        features: NDArray[np.float32],
    ) -> NDArray[np.bool_]:
        """``(T, 6)`` flagged features of the turbines ``ids`` in ``slots``.

        ``features`` is ``(T, n, 6)``, oldest first, the newest ``n`` samples of
        each slot; ``counts`` how many samples each slot had received then.
        """
        ...


class SlotOwners:
    """Which turbine each slot held when a check last looked at it."""

    def __init__(self, max_turbines: int) -> None:
        self._ids: list[str | None] = [None] * max_turbines

    def changed(self, slots: NDArray[np.intp], ids: Sequence[str]) -> NDArray[np.intp]:
        """The slots of ``slots`` now held by another turbine (recorded as theirs now)."""
        out = []
        for slot, turbine in zip(slots.tolist(), ids, strict=True):
            if self._ids[slot] != turbine:
                self._ids[slot] = turbine
                out.append(slot)
        return np.array(out, dtype=np.intp)
