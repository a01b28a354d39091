"""Flat-line check: a sensor that repeats the very same reading is stuck.

A live sensor's reading moves from one sample to the next: its own noise
changes at least the last bits, and the features (roll, pitch, yaw from the
quaternion, then float32) keep that. A field whose reading stays exactly
equal for ``after`` samples in a row (200: 10 s at 20 Hz) is a frozen sensor,
a dead link that repeats its last value, or a firmware fault: the model's
reconstruction sees such a reading only once the value it should have read
has moved away from the held one, which on a calm half minute it has not.

Exempt: a reading of exactly 0 for wind, rotor speed and voltage (a calm
anemometer, a parked rotor, an idle generator read 0 for hours); a sensor
stuck at 0 is then left to the model.

The check counts samples, not seconds: its state per turbine is the number
of samples received when it last looked (the buffers' count) and, per
feature, the newest value and how many samples in a row held it. Each look
sees the newest ``n`` samples (the detector's window), so a run is followed
across looks as long as fewer than ``n`` samples arrived in between (at 2
ticks a second and 20 Hz, 10 between looks). A turbine whose buffer started
over (count lower than last time) or a slot given to another turbine
(``edgeapp.checks.SlotOwners``) starts from nothing.

Transport-free and vectorised over a chunk of turbines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from edgeapp.checks import Handover, moved_slots
from edgeapp.features import FEATURES, N_FEATURES

__all__ = ["ZERO_AT_REST", "StuckSensors"]

ZERO_AT_REST: tuple[int, ...] = tuple(
    FEATURES.index(name) for name in ("wind_speed_rps", "rps", "voltage")
)
"""Features that read exactly 0 while the machine is at rest."""


class StuckSensors:
    """Per turbine slot and feature: how many samples in a row held the newest value."""

    def __init__(self, max_turbines: int, after: int) -> None:
        if after < 2:
            raise ValueError(f"a flat line needs at least 2 samples, got {after}")
        self.after = after
        self._count = np.full(max_turbines, -1, dtype=np.int64)  # -1: never looked
        self._held = np.zeros((max_turbines, N_FEATURES), dtype=np.int64)
        self._last = np.zeros((max_turbines, N_FEATURES), dtype=np.float32)
        self._exempt = np.zeros(N_FEATURES, dtype=bool)
        self._exempt[list(ZERO_AT_REST)] = True

    def update(
        self,
        slots: NDArray[np.intp],
        moves: Sequence[Handover],
        counts: NDArray[np.int64],
        features: NDArray[np.float32],
    ) -> NDArray[np.bool_]:
        """``(T, 6)`` stuck or not (``edgeapp.checks.SensorCheck``).

        Turbines looked at last time read only the samples since (a tick's
        10, not the window's 100-odd); the others read the whole window.
        """
        if moves:
            self._count[moved_slots(moves)] = -1
        n = features.shape[1]
        newest = features[:, -1, :]  # (T, 6)
        before = self._count[slots]
        arrived = counts - before
        # the newest sample of the last look is still in this window: the run goes on
        follows = (before >= 0) & (arrived >= 0) & (arrived < n)
        depth = int(arrived[follows].max(initial=0)) + 1 if follows.all() else n
        tail = features[:, n - depth :, :]
        run = _trailing_run(tail, newest)
        carried = self._held[slots] + arrived[:, None]
        on = (run == depth) & follows[:, None] & (self._last[slots] == newest)
        held = np.where(on, carried, run)
        self._count[slots] = counts
        self._held[slots] = held
        self._last[slots] = newest
        stuck: NDArray[np.bool_] = (held >= self.after) & ~(self._exempt & (newest == 0.0))
        return stuck


def _trailing_run(samples: NDArray[np.float32], newest: NDArray[np.float32]) -> NDArray[np.int64]:
    """``(T, 6)``: how many of the ``(T, d, 6)`` samples, counted back from the last, equal
    ``newest`` in a row (``d``: all of them)."""
    d = samples.shape[1]
    moved = samples != newest[:, None, :]
    last_move = d - 1 - np.argmax(moved[:, ::-1, :], axis=1)
    run: NDArray[np.int64] = np.where(moved.any(axis=1), d - 1 - last_move, d).astype(np.int64)
    return run
