"""Physics-inspired sensor streams for a farm of wind turbines (pure numpy).

Stable API (training and evaluation build on it; extend it, do not change it)::

    from simulator.generator import FarmGenerator, Fault, FaultKind

    gen = FarmGenerator(n_turbines=100, seed=7, rate_hz=20.0)
    batch = gen.step(200)                 # 10 s of samples for every turbine
    batch.rps                             # (100, 200) float64, one array per field:
                                          # qx, qy, qz, qw, wind_speed_rps, rps, voltage
    batch.t, batch.ts_ms                  # (200,) seconds since start, epoch milliseconds
    batch.raw()                           # (100, 200, 7) in RAW_FIELDS order
    batch.fault_bits                      # (100, 200) uint16, bit ``kind.bit`` set while
                                          # that fault was active (ground truth)
    gen.set_fault(3, Fault(FaultKind.ROTOR_IMBALANCE, intensity=3.0))
    gen.set_fault([4, 5], Fault(FaultKind.STUCK_SENSOR, field="voltage"))
    gen.clear_fault(3, FaultKind.ROTOR_IMBALANCE)   # or clear_fault(3): every fault
    gen.set_running(0, False)             # the rotor brakes to a stop; True restarts it

Determinism: the same ``seed``, the same calls in the same order give the same
numbers, whatever the batch sizes (``step(10)`` twice equals ``step(20)``). Each
turbine gets its own site regime from the seed: mean wind, gustiness, prevailing
wind direction, power-curve slope, generator constant, vibration amplitudes and
phases.

The model per turbine, sampled at ``rate_hz`` (20 Hz default), calibrated so
that a long normal run matches the statistics of the reference recording (mean
and standard deviation of every feature; ``tests/simulator/test_generator.py``):

- wind (anemometer rotations per second): the site's mean plus a slow
  mean-reverting (Ornstein-Uhlenbeck) component and fast gusts, plus sensor noise;
- rotor speed: a power curve (cut-in, linear region, rated speed, cut-out with
  hysteresis: above cut-out the rotor is braked and parked until the wind drops)
  followed through first-order inertia;
- generator voltage (mV): proportional to rotor speed above a threshold speed,
  plus noise (correlation with rotor speed ~0.99);
- nacelle orientation: a unit quaternion (ZYX: yaw, pitch, roll) whose yaw
  follows the wind direction (a bounded slow wander around the site's
  prevailing direction) through a slow yaw controller, and whose roll and
  pitch are the mounting tilt plus rotor-driven vibration (1P and 3P components
  of the rotor angle, amplitude proportional to rotor speed) plus broadband
  noise. Yaw stays inside (-pi, pi): no wrap-around in normal operation.

Faults (``Fault.intensity``, default in ``DEFAULT_INTENSITY``):

- ``VIBRATION``: each quaternion component gets ``intensity * U(-1, 1)`` added
  (components far outside their range);
- ``ROTATION``: rotor speed replaced by ``U(0, 10 * intensity)`` rps;
- ``VOLTAGE``: voltage replaced by ``U(0, 300 * intensity)`` mV;
- ``ROTOR_IMBALANCE``: the 1P vibration amplitude multiplied by ``intensity``
  (3.0 = three times normal);
- ``BEARING_WEAR``: the broadband roll/pitch noise multiplied by ``intensity``
  (2.0 = twice normal);
- ``GENERATOR_DEGRADATION``: voltage a fraction ``intensity`` below what the
  rotor speed implies (0.15 = 15 % low);
- ``BRAKE_DRAG``: the rotor settles a fraction ``intensity`` slower than the
  wind implies (0.20 = 20 % slower; reached through the rotor's inertia);
- ``STUCK_SENSOR``: ``Fault.field`` (a raw field name, or ``"quaternion"`` for
  the whole IMU) held at its value at onset; ``intensity`` is unused.

``Fault.ramp_s`` > 0 makes a physical fault grow linearly from nothing to its
intensity over that many seconds (e.g. bearing wear that rises).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "RAW_FIELDS",
    "DEFAULT_INTENSITY",
    "STUCK_FIELDS",
    "FaultKind",
    "Fault",
    "FaultError",
    "Batch",
    "SiteRegime",
    "FarmGenerator",
    "euler_to_quaternion",
]

RAW_FIELDS: Final = ("qx", "qy", "qz", "qw", "wind_speed_rps", "rps", "voltage")
"""Field order of ``Batch.raw()``: the order the sensors stream a sample in."""

FloatArray = NDArray[np.float64]


class FaultKind(enum.Enum):
    """What can go wrong with a turbine. ``value`` is the name used on the wire."""

    VIBRATION = "vibration"
    ROTATION = "rotation"
    VOLTAGE = "voltage"
    ROTOR_IMBALANCE = "rotor_imbalance"
    BEARING_WEAR = "bearing_wear"
    GENERATOR_DEGRADATION = "generator_degradation"
    BRAKE_DRAG = "brake_drag"
    STUCK_SENSOR = "stuck_sensor"

    @property
    def bit(self) -> int:
        """Bit number of this kind in ``Batch.fault_bits``."""
        return _KINDS.index(self)

    @property
    def gross(self) -> bool:
        """One of the original three injections (random values far out of range)."""
        return self in (FaultKind.VIBRATION, FaultKind.ROTATION, FaultKind.VOLTAGE)


_KINDS: Final = tuple(FaultKind)

DEFAULT_INTENSITY: Final = {
    FaultKind.VIBRATION: 1.0,
    FaultKind.ROTATION: 1.0,
    FaultKind.VOLTAGE: 1.0,
    FaultKind.ROTOR_IMBALANCE: 3.0,
    FaultKind.BEARING_WEAR: 2.0,
    FaultKind.GENERATOR_DEGRADATION: 0.15,
    FaultKind.BRAKE_DRAG: 0.20,
    FaultKind.STUCK_SENSOR: 1.0,
}
"""Intensity of ``Fault(kind)`` when none is given."""

# the value of an intensity at which the fault does nothing (start of a ramp)
_NEUTRAL: Final = {
    FaultKind.ROTOR_IMBALANCE: 1.0,
    FaultKind.BEARING_WEAR: 1.0,
    FaultKind.GENERATOR_DEGRADATION: 0.0,
    FaultKind.BRAKE_DRAG: 0.0,
}

STUCK_FIELDS: Final = (*RAW_FIELDS, "quaternion")
"""What ``Fault.field`` may name for ``STUCK_SENSOR``."""


class FaultError(ValueError):
    """A fault, turbine index or argument the generator cannot accept."""


@dataclass(frozen=True)
class Fault:
    """A fault to inject: its kind, intensity (see the module doc), options."""

    kind: FaultKind
    intensity: float = math.nan  # NaN: DEFAULT_INTENSITY[kind]
    field: str = "rps"  # STUCK_SENSOR only
    ramp_s: float = 0.0  # physical faults: seconds from onset to full intensity

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FaultKind):
            raise FaultError(f"unknown fault kind {self.kind!r}")
        intensity = float(self.intensity)
        if math.isnan(intensity):
            intensity = DEFAULT_INTENSITY[self.kind]
            object.__setattr__(self, "intensity", intensity)
        if not math.isfinite(intensity) or intensity < 0:
            raise FaultError(f"{self.kind.value}: intensity must be finite and >= 0")
        if self.kind in (FaultKind.GENERATOR_DEGRADATION, FaultKind.BRAKE_DRAG) and intensity > 1:
            raise FaultError(f"{self.kind.value}: intensity is a fraction in [0, 1]")
        if self.kind is FaultKind.STUCK_SENSOR and self.field not in STUCK_FIELDS:
            raise FaultError(f"stuck_sensor: field must be one of {', '.join(STUCK_FIELDS)}")
        if not math.isfinite(self.ramp_s) or self.ramp_s < 0:
            raise FaultError("ramp_s must be finite and >= 0")


@dataclass(frozen=True)
class Batch:
    """``n`` consecutive samples of every turbine; field arrays are ``(N, n)``."""

    qx: FloatArray
    qy: FloatArray
    qz: FloatArray
    qw: FloatArray
    wind_speed_rps: FloatArray
    rps: FloatArray
    voltage: FloatArray
    t: FloatArray  # (n,) seconds since the generator started
    ts_ms: NDArray[np.int64]  # (n,) epoch milliseconds (start_ms + t)
    fault_bits: NDArray[np.uint16]  # (N, n) bit FaultKind.bit set while active

    @property
    def n_turbines(self) -> int:
        return int(self.rps.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.rps.shape[1])

    def raw(self) -> FloatArray:
        """``(N, n, 7)`` in ``RAW_FIELDS`` order (edge-app's raw sample layout)."""
        return np.stack([getattr(self, name) for name in RAW_FIELDS], axis=-1)

    def field(self, name: str) -> FloatArray:
        if name not in RAW_FIELDS:
            raise FaultError(f"unknown field {name!r}")
        array: FloatArray = getattr(self, name)
        return array


@dataclass(frozen=True)
class SiteRegime:
    """Per-turbine constants drawn from the seed (arrays of shape ``(N,)``)."""

    mean_wind: FloatArray  # anemometer rps
    wind_sigma: FloatArray  # slow component's standard deviation
    wind_tau: FloatArray  # slow component's time constant, s
    gust_sigma: FloatArray
    prevailing_dir: FloatArray  # rad, inside (-pi, pi)
    slope: FloatArray  # rotor rps per anemometer rps above cut-in
    cut_in: FloatArray  # anemometer rps
    volts_per_rps: FloatArray  # mV per rotor rps above VOLTAGE_OFFSET_RPS
    amp_1p: FloatArray  # rad of roll/pitch at the nominal rotor speed
    amp_3p: FloatArray
    phase_1p: FloatArray
    phase_3p: FloatArray


# ---- calibration constants (reference recording, ~20 Hz) --------------------------------
TILT_ROLL: Final = -0.00796  # mean roll, rad
TILT_PITCH: Final = 0.00117  # mean pitch, rad
NOMINAL_RPS: Final = 1.61  # mean rotor speed; vibration amplitudes are given at this speed
MEAN_WIND: Final = 2.154
GUST_TAU: Final = 2.0  # s
WIND_NOISE: Final = 0.03  # anemometer sensor noise
RATED_WIND: Final = 3.2
CUT_OUT_WIND: Final = 4.3
CUT_OUT_RESUME: Final = 3.9  # a parked rotor restarts below this wind
ROTOR_TAU: Final = 1.5  # s, rotor inertia
BRAKE_TAU: Final = 0.8  # s, parking brake
RPS_NOISE: Final = 0.02
VOLTAGE_OFFSET_RPS: Final = 0.49  # no voltage below this rotor speed
VOLTAGE_NOISE: Final = 1.5  # mV
DIR_SIGMA: Final = 0.3  # rad, wander of the wind direction (before bounding)
DIR_BOUND: Final = 0.35  # rad, the wander never exceeds this
DIR_TAU: Final = 180.0  # s
YAW_TAU: Final = 25.0  # s, yaw controller
YAW_NOISE: Final = 0.003  # rad
PREVAILING_SPAN: Final = 2.75  # prevailing directions spread over +-this (rad)
VIB_NOISE: Final = 0.0104  # rad, broadband roll/pitch noise
AMP_1P: Final = 0.0135
AMP_3P: Final = 0.0095
GROSS_RPS: Final = 10.0
GROSS_VOLTAGE: Final = 300.0

# normal-noise channels drawn per sample, time-major (so batch sizes do not matter)
_N_WIND, _N_GUST, _N_ANEMO, _N_DIR, _N_ROLL, _N_PITCH, _N_YAW, _N_VOLT, _N_RPS = range(9)
_N_CHANNELS: Final = 9
_U_CHANNELS: Final = 6  # uniform channels for gross faults: qx qy qz qw rps voltage
_CHUNK: Final = 2048  # samples generated per inner chunk (bounds memory for long steps)


def euler_to_quaternion(
    roll: FloatArray, pitch: FloatArray, yaw: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """ZYX Euler angles -> unit quaternion (qx, qy, qz, qw), the inverse of the app's formula."""
    cr, sr = np.cos(roll * 0.5), np.sin(roll * 0.5)
    cp, sp = np.cos(pitch * 0.5), np.sin(pitch * 0.5)
    cy, sy = np.cos(yaw * 0.5), np.sin(yaw * 0.5)
    qw = cr * cp * cy + sr * sp * sy
    qx = sr * cp * cy - cr * sp * sy
    qy = cr * sp * cy + sr * cp * sy
    qz = cr * cp * sy - sr * sp * cy
    return qx, qy, qz, qw


def _draw_regime(rng: np.random.Generator, n: int) -> SiteRegime:
    z = rng.standard_normal((8, n))
    # prevailing directions stratified over the span so any farm covers it evenly
    strata = (rng.permutation(n) + rng.uniform(0.0, 1.0, n)) / n
    return SiteRegime(
        mean_wind=np.clip(MEAN_WIND * (1.0 + 0.08 * z[0]), 1.5, 3.0),
        wind_sigma=0.31 * np.clip(1.0 + 0.15 * z[1], 0.6, 1.4),
        wind_tau=rng.uniform(20.0, 60.0, n),
        gust_sigma=0.14 * np.clip(1.0 + 0.15 * z[2], 0.6, 1.4),
        prevailing_dir=PREVAILING_SPAN * (2.0 * strata - 1.0),
        slope=1.62 * np.clip(1.0 + 0.04 * z[3], 0.9, 1.1),
        cut_in=np.clip(1.14 + 0.03 * z[4], 1.05, 1.25),
        volts_per_rps=42.6 * np.clip(1.0 + 0.03 * z[5], 0.9, 1.1),
        amp_1p=AMP_1P * np.clip(1.0 + 0.1 * z[6], 0.7, 1.3),
        amp_3p=AMP_3P * np.clip(1.0 + 0.1 * z[7], 0.7, 1.3),
        phase_1p=rng.uniform(0.0, 2 * math.pi, n),
        phase_3p=rng.uniform(0.0, 2 * math.pi, n),
    )


@dataclass
class _FaultState:
    """Per kind: which turbines have it, its intensity, onset time and ramp."""

    active: NDArray[np.bool_]
    intensity: FloatArray
    onset: FloatArray  # seconds (generator time)
    ramp: FloatArray


@dataclass
class _Stuck:
    which: NDArray[np.intp]  # index into STUCK_FIELDS, per turbine
    value: FloatArray  # (N, 4) held values, NaN = not captured yet


class FarmGenerator:
    """Every turbine of a farm, advanced together (arrays of shape ``(n_turbines,)``)."""

    def __init__(
        self, n_turbines: int, seed: int = 0, rate_hz: float = 20.0, *, start_ms: int = 0
    ) -> None:
        if isinstance(n_turbines, bool) or not isinstance(n_turbines, int) or n_turbines < 1:
            raise FaultError("n_turbines must be an integer >= 1")
        if not math.isfinite(rate_hz) or rate_hz <= 0:
            raise FaultError("rate_hz must be > 0")
        self.n_turbines: Final = n_turbines
        self.seed: Final = seed
        self.rate_hz: Final = float(rate_hz)
        self.dt: Final = 1.0 / self.rate_hz
        self.start_ms: Final = int(start_ms)
        regime_seq, noise_seq, fault_seq, init_seq = np.random.SeedSequence(seed).spawn(4)
        self.regime: Final = _draw_regime(np.random.default_rng(regime_seq), n_turbines)
        self._noise = np.random.default_rng(noise_seq)
        self._fault_rng = np.random.default_rng(fault_seq)
        self._index = 0  # samples generated so far
        n = n_turbines
        reg = self.regime
        init = np.random.default_rng(init_seq)
        # start in the stationary state: wind at its site mean plus a draw of each process
        self._wind_slow = reg.wind_sigma * init.standard_normal(n)
        self._gust = reg.gust_sigma * init.standard_normal(n)
        self._dir_dev = DIR_SIGMA * init.standard_normal(n)
        self._yaw = reg.prevailing_dir + DIR_BOUND * np.tanh(self._dir_dev / DIR_BOUND)
        wind = reg.mean_wind + self._wind_slow + self._gust
        self._parked = wind > CUT_OUT_WIND
        self._rps = np.where(self._parked, 0.0, self._power_curve(wind))
        self._angle = init.uniform(0.0, 2 * math.pi, n)  # rotor angle, rad
        self._running = np.ones(n, dtype=bool)
        self._faults = {
            kind: _FaultState(
                active=np.zeros(n, dtype=bool),
                intensity=np.zeros(n),
                onset=np.zeros(n),
                ramp=np.zeros(n),
            )
            for kind in FaultKind
        }
        self._stuck = _Stuck(which=np.zeros(n, dtype=np.intp), value=np.full((n, 4), np.nan))

    # ---- control ------------------------------------------------------------------------
    @property
    def t(self) -> float:
        """Seconds of samples generated so far."""
        return self._index * self.dt

    @property
    def running(self) -> NDArray[np.bool_]:
        """A copy of which turbines are running (a stopped rotor is braked and parked)."""
        return self._running.copy()

    def _indices(self, turbines: int | Iterable[int]) -> NDArray[np.intp]:
        raw = [turbines] if isinstance(turbines, int | np.integer) else list(turbines)
        idx = np.asarray(raw, dtype=np.intp).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_turbines):
            raise FaultError(f"turbine index out of range 0..{self.n_turbines - 1}")
        return idx

    def set_running(self, turbines: int | Iterable[int], running: bool) -> None:
        self._running[self._indices(turbines)] = bool(running)

    def set_fault(self, turbines: int | Iterable[int], fault: Fault) -> None:
        """Start ``fault`` on these turbines now (replacing one of the same kind)."""
        if not isinstance(fault, Fault):
            raise FaultError(f"expected a Fault, got {type(fault).__name__}")
        idx = self._indices(turbines)
        state = self._faults[fault.kind]
        state.active[idx] = True
        state.intensity[idx] = fault.intensity
        state.onset[idx] = self.t
        state.ramp[idx] = fault.ramp_s
        if fault.kind is FaultKind.STUCK_SENSOR:
            self._stuck.which[idx] = STUCK_FIELDS.index(fault.field)
            self._stuck.value[idx] = np.nan  # captured from the next sample

    def clear_fault(self, turbines: int | Iterable[int], kind: FaultKind | None = None) -> None:
        """End one kind of fault (or all of them) on these turbines."""
        idx = self._indices(turbines)
        for k in FaultKind if kind is None else (kind,):
            self._faults[k].active[idx] = False

    def faults(self, turbine: int) -> list[Fault]:
        """The faults active on one turbine."""
        (i,) = self._indices(turbine)
        out = []
        for kind, state in self._faults.items():
            if state.active[i]:
                stuck_field = STUCK_FIELDS[self._stuck.which[i]]
                out.append(
                    Fault(
                        kind,
                        float(state.intensity[i]),
                        field=stuck_field if kind is FaultKind.STUCK_SENSOR else "rps",
                        ramp_s=float(state.ramp[i]),
                    )
                )
        return out

    # ---- generation ---------------------------------------------------------------------
    def _power_curve(self, wind: FloatArray) -> FloatArray:
        reg = self.regime
        effective = np.minimum(wind, RATED_WIND) - reg.cut_in
        return np.where(wind < reg.cut_in, 0.0, reg.slope * np.maximum(effective, 0.0))

    def _level(self, kind: FaultKind, times: FloatArray) -> FloatArray:
        """``(N, n)`` effective intensity of a physical fault (neutral where inactive)."""
        state = self._faults[kind]
        neutral = _NEUTRAL[kind]
        if not state.active.any():
            return np.full((self.n_turbines, times.size), neutral)
        since = times[None, :] - state.onset[:, None]
        ramp = state.ramp[:, None]
        frac = np.where(ramp > 0, np.clip(since / np.where(ramp > 0, ramp, 1.0), 0.0, 1.0), 1.0)
        level = neutral + (state.intensity[:, None] - neutral) * frac
        return np.where(state.active[:, None], level, neutral)

    def step(self, n_samples: int) -> Batch:
        """The next ``n_samples`` samples of every turbine."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise FaultError("n_samples must be an integer >= 1")
        parts = []
        done = 0
        while done < n_samples:
            size = min(_CHUNK, n_samples - done)
            parts.append(self._chunk(size))
            done += size
        if len(parts) == 1:
            return parts[0]
        return Batch(
            **{
                name: np.concatenate([getattr(p, name) for p in parts], axis=1)
                for name in RAW_FIELDS
            },
            t=np.concatenate([p.t for p in parts]),
            ts_ms=np.concatenate([p.ts_ms for p in parts]),
            fault_bits=np.concatenate([p.fault_bits for p in parts], axis=1),
        )

    def _chunk(self, n: int) -> Batch:
        reg = self.regime
        N = self.n_turbines  # noqa: N806 (the farm's size, as in the formulas)
        dt = self.dt
        times = (self._index + np.arange(n, dtype=np.float64)) * dt
        noise = self._noise.standard_normal((n, _N_CHANNELS, N))
        uniform = self._fault_rng.uniform(-1.0, 1.0, (n, _U_CHANNELS, N))

        a_wind = np.exp(-dt / reg.wind_tau)
        b_wind = reg.wind_sigma * np.sqrt(1.0 - a_wind**2)
        a_gust = math.exp(-dt / GUST_TAU)
        b_gust = reg.gust_sigma * math.sqrt(1.0 - a_gust**2)
        a_dir = math.exp(-dt / DIR_TAU)
        b_dir = DIR_SIGMA * math.sqrt(1.0 - a_dir**2)
        k_rotor = 1.0 - math.exp(-dt / ROTOR_TAU)
        k_brake = 1.0 - math.exp(-dt / BRAKE_TAU)
        k_yaw = 1.0 - math.exp(-dt / YAW_TAU)
        drag = 1.0 - self._level(FaultKind.BRAKE_DRAG, times)  # (N, n)

        wind = np.empty((N, n))
        rps = np.empty((N, n))
        yaw = np.empty((N, n))
        wind_slow, gust, dir_dev = self._wind_slow, self._gust, self._dir_dev
        rotor, yaw_now, parked = self._rps, self._yaw, self._parked
        running = self._running
        for k in range(n):
            e = noise[k]
            wind_slow = a_wind * wind_slow + b_wind * e[_N_WIND]
            gust = a_gust * gust + b_gust * e[_N_GUST]
            w = reg.mean_wind + wind_slow + gust
            parked = np.where(parked, w > CUT_OUT_RESUME, w > CUT_OUT_WIND)
            go = running & ~parked
            target = np.where(go, self._power_curve(w) * drag[:, k], 0.0)
            rotor = rotor + np.where(go, k_rotor, k_brake) * (target - rotor)
            dir_dev = a_dir * dir_dev + b_dir * e[_N_DIR]
            direction = reg.prevailing_dir + DIR_BOUND * np.tanh(dir_dev / DIR_BOUND)
            yaw_now = yaw_now + k_yaw * (direction - yaw_now)
            wind[:, k] = w
            rps[:, k] = rotor
            yaw[:, k] = yaw_now
        self._wind_slow, self._gust, self._dir_dev = wind_slow, gust, dir_dev
        self._rps, self._yaw, self._parked = rotor, yaw_now, parked

        # rotor angle: integral of speed
        angle = self._angle[:, None] + np.cumsum(2 * math.pi * dt * rps, axis=1)
        self._angle = np.mod(angle[:, -1], 2 * math.pi)
        scale = rps / NOMINAL_RPS
        amp_1p = reg.amp_1p[:, None] * scale * self._level(FaultKind.ROTOR_IMBALANCE, times)
        amp_3p = reg.amp_3p[:, None] * scale
        broadband = VIB_NOISE * self._level(FaultKind.BEARING_WEAR, times)
        phase_1 = angle + reg.phase_1p[:, None]
        phase_3 = 3.0 * angle + reg.phase_3p[:, None]
        roll = (
            TILT_ROLL
            + amp_1p * np.sin(phase_1)
            + amp_3p * np.sin(phase_3)
            + broadband * noise[:, _N_ROLL].T
        )
        pitch = (
            TILT_PITCH
            + amp_1p * np.cos(phase_1)
            + amp_3p * np.cos(phase_3)
            + broadband * noise[:, _N_PITCH].T
        )
        yaw_meas = yaw + YAW_NOISE * noise[:, _N_YAW].T
        qx, qy, qz, qw = euler_to_quaternion(roll, pitch, yaw_meas)

        healthy_volts = reg.volts_per_rps[:, None] * np.maximum(rps - VOLTAGE_OFFSET_RPS, 0.0)
        voltage = healthy_volts * (1.0 - self._level(FaultKind.GENERATOR_DEGRADATION, times))
        voltage = np.maximum(voltage + VOLTAGE_NOISE * noise[:, _N_VOLT].T, 0.0)
        rps_meas = np.maximum(rps + RPS_NOISE * noise[:, _N_RPS].T, 0.0)
        wind_meas = np.maximum(wind + WIND_NOISE * noise[:, _N_ANEMO].T, 0.0)

        fields = {
            "qx": qx,
            "qy": qy,
            "qz": qz,
            "qw": qw,
            "wind_speed_rps": wind_meas,
            "rps": rps_meas,
            "voltage": voltage,
        }
        bits = np.zeros((N, n), dtype=np.uint16)
        for kind, state in self._faults.items():
            if state.active.any():
                bits[state.active] |= np.uint16(1 << kind.bit)
        self._apply_gross(fields, uniform)
        self._apply_stuck(fields)
        self._index += n
        return Batch(
            **fields,
            t=times,
            ts_ms=self.start_ms + np.round(times * 1000.0).astype(np.int64),
            fault_bits=bits,
        )

    def _apply_gross(self, fields: dict[str, FloatArray], uniform: FloatArray) -> None:
        vib = self._faults[FaultKind.VIBRATION]
        if vib.active.any():
            rows = vib.active
            for c, name in enumerate(("qx", "qy", "qz", "qw")):
                fields[name][rows] += vib.intensity[rows, None] * uniform[:, c, rows].T
        rot = self._faults[FaultKind.ROTATION]
        if rot.active.any():
            rows = rot.active
            u = 0.5 * (uniform[:, 4, rows].T + 1.0)
            fields["rps"][rows] = GROSS_RPS * rot.intensity[rows, None] * u
        volt = self._faults[FaultKind.VOLTAGE]
        if volt.active.any():
            rows = volt.active
            u = 0.5 * (uniform[:, 5, rows].T + 1.0)
            fields["voltage"][rows] = GROSS_VOLTAGE * volt.intensity[rows, None] * u

    def _apply_stuck(self, fields: dict[str, FloatArray]) -> None:
        stuck = self._faults[FaultKind.STUCK_SENSOR]
        if not stuck.active.any():
            return
        quaternion = STUCK_FIELDS.index("quaternion")
        for i in np.flatnonzero(stuck.active):
            which = int(self._stuck.which[i])
            names: Sequence[str] = (
                ("qx", "qy", "qz", "qw") if which == quaternion else (STUCK_FIELDS[which],)
            )
            held = self._stuck.value[i]
            if np.isnan(held[0]):
                for c, name in enumerate(names):
                    held[c] = fields[name][i, 0]
            for c, name in enumerate(names):
                fields[name][i, :] = held[c]
