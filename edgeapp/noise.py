"""Noise check: a slow reading that suddenly jumps about is a failing sensor or link.

Wind, rotor speed and voltage move slowly against 20 Hz sampling: the
rotor's inertia, the gusts' time scale and the generator following the rotor
leave only the sensor's own noise between one sample and the next. A loose
connector, a failing sensor or a corrupted link turns such a reading into
samples scattered over its whole range (the simulator's gross rotation and
voltage injections): the reading's step from sample to sample grows tens of
times. The model sees it only through the wavelet denoising of the whole
window, which averages much of that scatter away; a reading scattered around
a mean close to the turbine's own goes unseen for ticks.

Per turbine and feature (``NOISY_FEATURES``), each look measures the root mean
square of the steps between the newest ``TAIL`` samples (the tick's 10 and the
one before). For the first ``learn`` samples a turbine sends, these measures
are averaged (geometric mean, so the few large steps of a rotor starting or
braking hardly count; steps of exactly 0, a machine at rest reading 0, are
left out); then the level is frozen. A look whose measure exceeds ``limit``
times the turbine's level flags the feature at once, and the detector raises
its group. On the simulator's farms a healthy turbine's look stays below 4.5x
its level (a rotor braking to a stop), the gross injections' first look
measures above 35x; the default limit of 12 sits between them.

The inertial features (roll, pitch, yaw) are left out: their steps are the
rotor's vibration, which scales with its speed, and the model catches their
gross fault. What the check cannot know: a turbine noisy while it learns has
its noise learned as normal. The levels outlive a restart in edge-app's
``learned_file`` and a turbine's slot going to another (``edgeapp.checks``).

Transport-free and vectorised over a chunk of turbines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from edgeapp.checks import Baselines, Handover, LearnsPerTurbine, from_row
from edgeapp.features import FEATURES, N_FEATURES

__all__ = ["NOISY_FEATURES", "TAIL", "NoisySensors"]

NOISY_FEATURES: tuple[int, ...] = tuple(
    FEATURES.index(name) for name in ("wind_speed_rps", "rps", "voltage")
)
"""Features whose sample-to-sample steps are the sensor's noise."""
TAIL = 11
"""Samples per look: a tick's 10 new ones and the one before, so 10 steps."""
_MIN_LOOKS = 20  # looks with a moving reading needed for a level


class NoisySensors(LearnsPerTurbine):
    """Per turbine slot and noisy feature: its learned step level."""

    def __init__(self, max_turbines: int, learn: int, limit: float) -> None:
        if learn < 1:
            raise ValueError(f"learn must be >= 1 sample, got {learn}")
        if not limit > 1.0:
            raise ValueError(f"limit must be above 1 (times the learned level), got {limit}")
        self.learn = learn
        self.limit = limit
        f = len(NOISY_FEATURES)
        self._features = np.array(NOISY_FEATURES, dtype=np.intp)
        self._baselines = Baselines(
            max_turbines, f, rows=self._rows, forget=self._forget, apply=self._apply
        )
        self._learned = np.zeros(max_turbines, dtype=np.int64)  # samples learned from
        self._log_sum = np.zeros((max_turbines, f))
        self._looks = np.zeros((max_turbines, f), dtype=np.int64)
        self._level = np.full((max_turbines, f), np.nan)  # NaN: still learning

    name = "noise"
    layout = tuple(f"{FEATURES[f]}.level" for f in NOISY_FEATURES)

    def _rows(self, slots: NDArray[np.intp]) -> NDArray[np.float64]:
        rows: NDArray[np.float64] = self._level[slots]
        return rows

    def _apply(self, slot: int, row: list[float | None]) -> None:
        self._level[slot] = from_row(row)

    def learned(self, slots: NDArray[np.intp]) -> NDArray[np.bool_]:
        """``(T, noisy features)``: which levels are learned."""
        ready: NDArray[np.bool_] = ~np.isnan(self._level[slots])
        return ready

    def update(
        self,
        slots: NDArray[np.intp],
        moves: Sequence[Handover],
        counts: NDArray[np.int64],
        features: NDArray[np.float32],
    ) -> NDArray[np.bool_]:
        """``(T, 6)`` readings far noisier than learned (``edgeapp.checks.SensorCheck``)."""
        before = self._baselines.look(slots, moves, counts)
        tail = features[:, -min(TAIL, features.shape[1]) :, self._features].astype(np.float64)
        steps = np.diff(tail, axis=1)
        measure = np.sqrt(np.mean(steps * steps, axis=1))  # (T, noisy features)
        arrived = np.where(before >= 0, np.maximum(counts - before, 0), features.shape[1])
        level = self._level[slots]
        learning = np.isnan(level).any(axis=1)
        if learning.any():
            self._learn(slots[learning], measure[learning], arrived[learning])
        with np.errstate(invalid="ignore"):
            noisy = measure > self.limit * level  # NaN while learning: False
        flagged = np.zeros((len(slots), N_FEATURES), dtype=bool)
        flagged[:, self._features] = noisy
        return flagged

    def _forget(self, slots: NDArray[np.intp]) -> None:
        """Slots now holding another turbine start from nothing."""
        self._learned[slots] = 0
        self._log_sum[slots] = 0.0
        self._looks[slots] = 0
        self._level[slots] = np.nan

    def _learn(
        self, at: NDArray[np.intp], measure: NDArray[np.float64], arrived: NDArray[np.int64]
    ) -> None:
        open_ = np.isnan(self._level[at])
        moving = open_ & (measure > 0.0)
        self._log_sum[at] += np.where(moving, np.log(np.where(moving, measure, 1.0)), 0.0)
        self._looks[at] += moving
        self._learned[at] += arrived
        looks = self._looks[at]
        done = open_ & (self._learned[at] >= self.learn)[:, None] & (looks >= _MIN_LOOKS)
        if done.any():
            level = np.exp(self._log_sum[at] / np.maximum(looks, 1))
            self._level[at] = np.where(done, level, self._level[at])
            self._baselines.version += 1
