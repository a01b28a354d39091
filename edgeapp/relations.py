"""Relation check: each turbine's own physics, learned, then held to.

Two readings of a turbine follow one another: the generator's voltage its
rotor speed, the rotor speed the wind. How closely depends on the turbine
(its generator constant, its power curve), and fleet-wide thresholds must
cover the healthy turbines furthest from the fleet: a generator 15% weak or
a rotor 20% slow hides inside that spread. This check learns each turbine's
own line instead and flags a departure from it.

Per turbine and relation (``RELATIONS``: voltage on rotor speed, rotor
speed on wind), every look takes the means of both readings over the newest
``WINDOW`` samples (20 s at 20 Hz: gusts, inertia and sensor noise average
out). For the first ``learn`` samples a turbine sends, those means fit a
straight line (least squares, kept as running sums); then the line is frozen
with the range of the means it saw. From then on, a look whose mean of the
cause is inside that range and whose expected effect is at least half the
learned average is scored: the effect's relative departure from the line.
Beyond its tolerance (voltage 5%, rotor speed 8%: the rotor's inertia and
the gusts leave more spread) for ``PERSIST`` scored looks in a row, the
effect's feature is flagged, and the detector raises its group. Outside the learned
range nothing is said: the line is not extrapolated.

What it cannot know: a fault present while it learns is learned as normal.
The lines outlive a restart in edge-app's ``learned_file`` and a turbine's
slot going to another (``edgeapp.checks``).

Transport-free and vectorised over a chunk of turbines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from edgeapp.checks import Baselines, Handover, LearnsPerTurbine, from_row
from edgeapp.features import FEATURES, N_FEATURES

__all__ = ["PERSIST", "RELATIONS", "WINDOW", "Relations"]

RELATIONS: tuple[tuple[int, int, float], ...] = (
    (FEATURES.index("rps"), FEATURES.index("voltage"), 0.2),  # the generator
    (FEATURES.index("wind_speed_rps"), FEATURES.index("rps"), 0.1),  # the rotor's power curve
)
"""(cause, effect, steadiness) per relation, in the order of ``Relations``'s
tolerances: the effect's feature is flagged; a window is
learned from or scored only when the cause's standard deviation in it is at most
``steadiness`` times its mean (a rotor starting, stopping or parking in the window, a
gusty spell the rotor's inertia lags behind: the line does not hold there)."""
WINDOW = 400
"""Samples averaged per look (20 s at 20 Hz)."""
PERSIST = 4
"""Looks in a row beyond the tolerance before a feature is flagged."""
_MIN_LOOKS = 20  # a line needs this many looks to be fitted
_RESUM = 120  # looks a window's sums are slid before they are summed in full again


class Relations(LearnsPerTurbine):
    """Per turbine slot: the learned lines, their ranges, and how long each was departed from."""

    def __init__(self, max_turbines: int, learn: int, tolerances: Sequence[float]) -> None:
        if learn < 1 or len(tolerances) != len(RELATIONS):
            raise ValueError(f"learn must be >= 1 sample, with {len(RELATIONS)} tolerances")
        if not all(0 < t < 1 for t in tolerances):
            raise ValueError("tolerances must be within (0, 1)")
        self.learn = learn
        self.tolerance = np.array(tolerances, dtype=np.float64)
        r = len(RELATIONS)
        self._cause = np.array([c for c, _, _ in RELATIONS])
        self._effect = np.array([e for _, e, _ in RELATIONS])
        self._steadiness = np.array([s for _, _, s in RELATIONS])
        self._baselines = Baselines(
            max_turbines, 5 * r, rows=self._rows, forget=self._forget, apply=self._apply
        )
        self._learned = np.zeros(max_turbines, dtype=np.int64)  # samples learned from
        self._sums = np.zeros((max_turbines, r, 5))  # looks, x, y, xx, xy
        self._lo = np.full((max_turbines, r), np.inf)
        self._hi = np.full((max_turbines, r), -np.inf)
        self._line = np.full((max_turbines, r, 2), np.nan)  # slope, intercept; NaN: learning
        self._floor = np.zeros((max_turbines, r))  # half the learned mean effect
        self._over = np.zeros((max_turbines, r), dtype=np.int64)
        # the window's running sums of the features the relations use (``_window_sums``)
        self._used = np.array(sorted({c for c, _, _ in RELATIONS} | {e for _, e, _ in RELATIONS}))
        self._sums_of = np.zeros((max_turbines, len(self._used)))
        self._squares_of = np.zeros((max_turbines, len(self._used)))
        self._slid = np.full(max_turbines, -1, dtype=np.int64)  # -1: no sums yet
        self._size = np.zeros(max_turbines, dtype=np.int64)

    name = "relations"
    layout = tuple(
        f"{FEATURES[effect]}~{FEATURES[cause]}.{part}"
        for cause, effect, _ in RELATIONS
        for part in ("slope", "intercept", "low", "high", "floor")
    )

    def _rows(self, slots: NDArray[np.intp]) -> NDArray[np.float64]:
        line = self._line[slots]  # (k, r, 2)
        parts = (line, self._lo[slots, :, None], self._hi[slots, :, None])
        values = np.concatenate([*parts, self._floor[slots, :, None]], axis=2)  # (k, r, 5)
        learning = np.isnan(line[..., :1])  # a relation still learning: all NaN
        rows: NDArray[np.float64] = np.where(learning, np.nan, values).reshape(len(slots), -1)
        return rows

    def _apply(self, slot: int, row: list[float | None]) -> None:
        values = from_row(row).reshape(len(RELATIONS), 5)
        learned = np.asarray(~np.isnan(values).any(axis=1), dtype=bool)
        self._line[slot] = np.where(learned[:, None], values[:, :2], np.nan)
        self._lo[slot] = np.where(learned, values[:, 2], np.inf)
        self._hi[slot] = np.where(learned, values[:, 3], -np.inf)
        self._floor[slot] = np.where(learned, values[:, 4], 0.0)

    def learned(self, slots: NDArray[np.intp]) -> NDArray[np.bool_]:
        """``(T, relations)``: which lines are fitted (learning is over)."""
        ready: NDArray[np.bool_] = ~np.isnan(self._line[slots, :, 0])
        return ready

    def update(
        self,
        slots: NDArray[np.intp],
        moves: Sequence[Handover],
        counts: NDArray[np.int64],
        features: NDArray[np.float32],
    ) -> NDArray[np.bool_]:
        """``(T, 6)`` effects departed from their line (``edgeapp.checks.SensorCheck``)."""
        before = self._baselines.look(slots, moves, counts)
        size = min(WINDOW, features.shape[1])
        sums, squares = self._window_sums(slots, counts - before, before >= 0, features)
        x, y = sums[:, self._cause] / size, sums[:, self._effect] / size  # (T, relations)
        variance = squares[:, self._cause] / size - x * x
        steady = variance <= (self._steadiness * x) ** 2
        arrived = np.where(before >= 0, np.maximum(counts - before, 0), size)
        learning = np.isnan(self._line[slots, :, 0])  # (T, relations)
        if learning.any():
            self._learn(slots, learning=learning, steady=steady, x=x, y=y, arrived=arrived)
        line = self._line[slots]
        expected = line[..., 0] * x + line[..., 1]
        floor = self._floor[slots]
        scored = (
            steady
            & ~np.isnan(expected)
            & (x >= self._lo[slots])
            & (x <= self._hi[slots])
            & (expected >= floor)
            & (floor > 0)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            departure = np.abs(y - expected) / expected
        beyond = scored & (departure > self.tolerance)
        over = np.where(beyond, self._over[slots] + 1, np.where(scored, 0, self._over[slots]))
        self._over[slots] = over
        flagged = np.zeros((len(slots), N_FEATURES), dtype=bool)
        for r, effect in enumerate(self._effect):
            flagged[:, effect] |= over[:, r] >= PERSIST
        return flagged

    def _window_sums(
        self,
        slots: NDArray[np.intp],
        arrived: NDArray[np.int64],
        looked: NDArray[np.bool_],
        features: NDArray[np.float32],
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``(T, 6)`` sums of each feature and of its square over the newest ``WINDOW`` samples.

        Kept per slot and slid: a look adds the samples that arrived since the
        last and takes off those that left the window (a tick's 10 each, not
        the window's 400). A slot not looked at before, one whose samples
        arrived faster than the gathered samples beyond the window can take
        off, or one slid ``_RESUM`` times, is summed in full (float64 sums of
        float32 samples: sliding them drifts only in the last bits, and the
        full sum resets that).
        """
        n = features.shape[1]
        size = min(WINDOW, n)
        used = self._used
        sums, squares = self._sums_of[slots], self._squares_of[slots]
        slide = (
            looked
            & (self._slid[slots] >= 0)
            & (self._slid[slots] < _RESUM)
            & (arrived >= 0)
            & (arrived <= n - size)
            & (self._size[slots] == size)
        )
        full = np.flatnonzero(~slide)
        if len(full):
            window = features[full, n - size :][:, :, used].astype(np.float64)
            sums[full] = window.sum(axis=1)
            squares[full] = (window * window).sum(axis=1)
        part = np.flatnonzero(slide)
        step = int(arrived[part].max(initial=0))
        if step:
            # per slot its own arrivals: the newest ``arrived`` samples come in, as many
            # go out from just beyond the window's oldest
            keep = np.arange(step) >= (step - arrived[part])[:, None]  # (P, step)
            came = features[part, n - step :][:, :, used].astype(np.float64) * keep[..., None]
            went = features[part, n - size - step : n - size][:, :, used].astype(np.float64)
            went *= keep[..., None]
            sums[part] += came.sum(axis=1) - went.sum(axis=1)
            squares[part] += (came * came).sum(axis=1) - (went * went).sum(axis=1)
        self._sums_of[slots] = sums
        self._squares_of[slots] = squares
        self._slid[slots] = np.where(slide, self._slid[slots] + 1, 0)
        self._size[slots] = size
        out_sums = np.zeros((len(slots), N_FEATURES))
        out_squares = np.zeros((len(slots), N_FEATURES))
        out_sums[:, used] = sums
        out_squares[:, used] = squares
        return out_sums, out_squares

    def _forget(self, slots: NDArray[np.intp]) -> None:
        """Slots now holding another turbine start from nothing."""
        self._slid[slots] = -1
        self._learned[slots] = 0
        self._sums[slots] = 0.0
        self._lo[slots] = np.inf
        self._hi[slots] = -np.inf
        self._line[slots] = np.nan
        self._floor[slots] = 0.0
        self._over[slots] = 0

    def _learn(
        self,
        slots: NDArray[np.intp],
        *,
        learning: NDArray[np.bool_],
        steady: NDArray[np.bool_],
        x: NDArray[np.float64],
        y: NDArray[np.float64],
        arrived: NDArray[np.int64],
    ) -> None:
        rows = np.flatnonzero(learning.any(axis=1))
        at = slots[rows]
        take = learning[rows] & steady[rows]
        add = np.stack([np.ones_like(x[rows]), x[rows], y[rows], x[rows] ** 2, x[rows] * y[rows]])
        self._sums[at] += np.moveaxis(add, 0, -1) * take[..., None]
        self._lo[at] = np.where(take, np.minimum(self._lo[at], x[rows]), self._lo[at])
        self._hi[at] = np.where(take, np.maximum(self._hi[at], x[rows]), self._hi[at])
        self._learned[at] += arrived[rows]
        done = at[self._learned[at] >= self.learn]
        if not len(done):
            return
        n, sx, sy, sxx, sxy = np.moveaxis(self._sums[done], -1, 0)
        var = n * sxx - sx * sx
        fit = (n >= _MIN_LOOKS) & (var > 1e-12 * np.maximum(n * sxx, 1e-300))
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(fit, (n * sxy - sx * sy) / var, 0.0)
            mean_y = sy / np.maximum(n, 1)
            intercept = np.where(fit, mean_y - slope * sx / np.maximum(n, 1), mean_y)
        # too few looks to fit: keep learning; a cause that never moved: the mean effect
        ok = n >= _MIN_LOOKS
        line = np.stack([slope, intercept], axis=-1)
        self._line[done] = np.where(ok[..., None], line, np.nan)
        self._baselines.version += 1
        self._floor[done] = np.where(ok, 0.5 * mean_y, 0.0)
