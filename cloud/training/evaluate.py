"""How well a released package detects faults, measured through the device path.

For each package: a held-out normal farm (seeds never used in training) gives
the false-positive rate; a faulted farm gives, per fault, the detection rate
and the time from onset to the first correct verdict; an intensity sweep of
each subtle fault gives the intensity where detection falls below half.
Everything is scored by ``cloud.training.device`` (a real edge-agent and
edge-app's detector), tick by tick.

Definitions (the numbers in the report):

- a tick is one detector run (every 10 samples, 0.5 s); the fault
  starts at a tick boundary, so "tick k after onset" is the k-th tick whose
  buffer holds faulted samples;
- a fault is *detected* on a turbine when a tick within the fault's deadline
  raises the fault's expected group (gross faults: 2 ticks; subtle faults:
  30 s = 60 ticks); the time to detection is that tick's end minus the onset;
- the false-positive rate is the fraction of (turbine, tick) verdicts of the
  normal farm that raise any group;
- the confusion row of a fault is the fraction of post-onset ticks (all
  observed ticks after onset) raising each group, and raising none.

The verdicts are the device's: the model's scores, edge-app's flat-line
check (``edgeapp.stuck``, on by default) raising the group of a feature whose
reading has not changed for ``stuck_after_samples``, and its relation check
(``edgeapp.relations``, on by default) raising the group of a voltage or
rotor speed departed from the turbine's own relation, learned over its first
``relation_learn_samples``, and its noise check (``edgeapp.noise``, on by
default) raising the group of a wind, rotor speed or voltage reading whose
steps grew beyond ``noise_limit`` times the turbine's learned level. So
every turbine runs normally for longer than those learnings before a fault
(``EvalConfig.warmup_s``), and the normal farm runs as long again after
them. The detection and false-positive rates of the model's scores alone
are kept beside them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from cloud.training.device import (
    GROUPS,
    NOISE_LEARN_SAMPLES,
    NOISE_LIMIT,
    RELATION_LEARN_SAMPLES,
    STUCK_AFTER_SAMPLES,
    StreamVerdicts,
    device_path,
)

__all__ = ["FaultCase", "EvalConfig", "PackageEvaluation", "evaluate_package", "CASES", "SWEEPS"]

log = structlog.get_logger("cloud.training.evaluate")

RATE_HZ = 20.0
TICK_S = 0.5


@dataclass(frozen=True)
class FaultCase:
    """One fault injection: the generator's kind and options, and the group that must rise."""

    label: str
    kind: str  # a simulator.generator.FaultKind value
    intensity: float
    expected: str  # a group of GROUPS
    gross: bool
    field: str = "rps"  # stuck sensor only

    @property
    def deadline_ticks(self) -> int:
        return 2 if self.gross else 60


CASES: tuple[FaultCase, ...] = (
    FaultCase("vibration (gross)", "vibration", 1.0, "vibration", gross=True),
    FaultCase("rotation (gross)", "rotation", 1.0, "rotation", gross=True),
    FaultCase("voltage (gross)", "voltage", 1.0, "voltage", gross=True),
    FaultCase("rotor imbalance x3", "rotor_imbalance", 3.0, "vibration", gross=False),
    FaultCase("bearing wear x2", "bearing_wear", 2.0, "vibration", gross=False),
    FaultCase("generator degradation 15%", "generator_degradation", 0.15, "voltage", gross=False),
    FaultCase("brake drag 20%", "brake_drag", 0.20, "rotation", gross=False),
    FaultCase("stuck rps", "stuck_sensor", 1.0, "rotation", gross=False, field="rps"),
    FaultCase("stuck wind", "stuck_sensor", 1.0, "rotation", gross=False, field="wind_speed_rps"),
    FaultCase("stuck voltage", "stuck_sensor", 1.0, "voltage", gross=False, field="voltage"),
    FaultCase("stuck IMU", "stuck_sensor", 1.0, "vibration", gross=False, field="quaternion"),
)
"""The faults of the targets, at the stated intensities."""

SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "rotor_imbalance": ("vibration", (1.5, 2.0, 3.0, 4.0, 6.0, 10.0)),
    "bearing_wear": ("vibration", (1.25, 1.5, 2.0, 3.0, 5.0, 8.0)),
    "generator_degradation": ("voltage", (0.05, 0.1, 0.15, 0.25, 0.4, 0.6)),
    "brake_drag": ("rotation", (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)),
}
"""Subtle faults and the intensities tried to find where detection falls below 50%."""


@dataclass(frozen=True)
class EvalConfig:
    """Sizes and seeds of an evaluation (seeds far from the training seeds)."""

    seed: int = 1_000_003
    normal_turbines: int = 40
    normal_minutes: float = 20.0
    """The first ``relation_learn_samples`` (10 min) learn the turbines' relations."""
    turbines_per_case: int = 20
    turbines_per_sweep_step: int = 10
    warmup_s: float = 660.0
    """Normal operation before every onset: the buffer fills in 25 s, the relation check
    learns for 10 min and scores 20 s windows."""
    observe_s: float = 45.0
    """Observed after the onset (the subtle deadline is 30 s)."""


@dataclass
class CaseResult:
    case: FaultCase
    detected: NDArray[np.bool_]  # (K,) within the deadline
    seconds: NDArray[np.float64]  # (K,) onset -> first correct verdict (NaN: never)
    confusion: NDArray[np.float64]  # (4,) fraction of post-onset ticks: GROUPS..., none
    fault_scores: NDArray[np.float64]  # (K * post ticks, 6)
    model_detected: NDArray[np.bool_]  # (K,) within the deadline by the model's scores alone

    @property
    def rate(self) -> float:
        return float(self.detected.mean())

    @property
    def model_rate(self) -> float:
        return float(self.model_detected.mean())


@dataclass
class PackageEvaluation:
    """Everything measured for one package."""

    package: Path
    version: str
    thresholds: tuple[float, ...]
    normal_ticks: int
    false_positive_rate: float
    false_positive_by_group: dict[str, float]
    normal_scores: NDArray[np.float64]
    cases: list[CaseResult]
    sweeps: dict[str, list[tuple[float, float]]]  # kind -> [(intensity, rate)]
    infer_ms_per_window: float
    seconds: float
    model_false_positive_rate: float = math.nan
    """The normal farm's ticks the model's scores alone flagged."""
    learned_false_positive_rate: float = math.nan
    """The normal farm's ticks flagged once the relations were learned."""
    learned_ticks: int = 0
    stuck_after_samples: int = 0
    """The flat-line check the verdicts include (0: none)."""
    relation_learn_samples: int = 0
    """The relation check the verdicts include: samples learned from (0: none)."""
    noise_limit: float = 0.0
    """The noise check the verdicts include: times the learned level (0: none)."""
    noise_learn_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _fault_stream(
    cases: Sequence[FaultCase], config: EvalConfig, seed: int, k: int
) -> tuple[NDArray[np.float64], int]:
    """``(len(cases) * k, n, 7)``: k turbines per case, the fault from sample ``onset`` on."""
    from simulator.generator import FarmGenerator, Fault, FaultKind  # noqa: PLC0415

    generator = FarmGenerator(len(cases) * k, seed=seed, rate_hz=RATE_HZ)
    onset = round(config.warmup_s * RATE_HZ)
    before = generator.step(onset).raw()
    for i, case in enumerate(cases):
        fault = Fault(FaultKind(case.kind), case.intensity, field=case.field)
        generator.set_fault(range(i * k, (i + 1) * k), fault)
    after = generator.step(round(config.observe_s * RATE_HZ)).raw()
    return np.concatenate([before, after], axis=1), onset


def _first_correct(
    flags: NDArray[np.bool_], case: FaultCase
) -> tuple[NDArray[np.bool_], NDArray[np.intp], NDArray[np.bool_]]:
    """Of ``(K, post ticks, 3)`` flags: raised at all, first tick, within the deadline."""
    correct = flags[..., GROUPS.index(case.expected)]
    hit: NDArray[np.bool_] = np.asarray(correct.any(axis=1))
    at: NDArray[np.intp] = np.asarray(np.argmax(correct, axis=1), dtype=np.intp)
    return hit, at, hit & (at < case.deadline_ticks)


def _case_results(
    cases: Sequence[FaultCase], verdicts: StreamVerdicts, onset: int, k: int
) -> list[CaseResult]:
    post = verdicts.tick_end > onset  # ticks whose buffer holds faulted samples
    first = int(np.argmax(post))
    out = []
    for i, case in enumerate(cases):
        rows = slice(i * k, (i + 1) * k)
        hit, at, detected = _first_correct(verdicts.flags[rows, first:], case)
        seconds = np.where(hit, (verdicts.tick_end[first + at] - onset) / RATE_HZ, np.nan)
        flags = verdicts.flags[rows, first:]
        confusion = np.array([*flags.mean(axis=(0, 1)), (~flags.any(axis=-1)).mean()])
        out.append(
            CaseResult(
                case=case,
                detected=detected,
                seconds=seconds,
                confusion=confusion,
                fault_scores=verdicts.scores[rows, first:].reshape(-1, 6),
                model_detected=_first_correct(verdicts.model_flags[rows, first:], case)[2],
            )
        )
    return out


def evaluate_package(
    package: Path,
    *,
    trusted_keys: Path,
    config: EvalConfig | None = None,
    progress: bool = True,
) -> PackageEvaluation:
    """Measure one package through the device path (an agent process and the detector)."""
    from simulator.generator import FarmGenerator  # noqa: PLC0415

    cfg = config or EvalConfig()
    started = time.monotonic()
    k, k_sweep = cfg.turbines_per_case, cfg.turbines_per_sweep_step
    sweep_cases = [
        FaultCase(f"{kind} {x:g}", kind, x, group, gross=False)
        for kind, (group, intensities) in SWEEPS.items()
        for x in intensities
    ]
    with device_path(package, trusted_keys=trusted_keys) as device:
        version = device.follower.refresh().label.removeprefix("Model loaded: ")
        _say(progress, f"{package.name}: normal farm")
        normal_gen = FarmGenerator(cfg.normal_turbines, seed=cfg.seed, rate_hz=RATE_HZ)
        normal_raw = normal_gen.step(round(cfg.normal_minutes * 60 * RATE_HZ)).raw()
        normal = device.score_stream(normal_raw)
        del normal_raw
        _say(progress, f"{package.name}: faults at the target intensities")
        raw, onset = _fault_stream(CASES, cfg, cfg.seed + 1, k)
        faulted = device.score_stream(raw)
        _say(progress, f"{package.name}: intensity sweeps")
        raw, onset_sweep = _fault_stream(sweep_cases, cfg, cfg.seed + 2, k_sweep)
        swept = device.score_stream(raw)
        del raw
    any_flag: NDArray[np.bool_] = np.asarray(normal.flags.any(axis=-1))
    learned = normal.tick_end >= RELATION_LEARN_SAMPLES + normal.tick_end[0]
    sweep_results = _case_results(sweep_cases, swept, onset_sweep, k_sweep)
    sweeps: dict[str, list[tuple[float, float]]] = {}
    for result in sweep_results:
        sweeps.setdefault(result.case.kind, []).append((result.case.intensity, result.rate))
    return PackageEvaluation(
        package=package,
        version=version,
        thresholds=normal.thresholds,
        normal_ticks=int(any_flag.size),
        false_positive_rate=float(any_flag.mean()),
        false_positive_by_group={
            g: float(normal.flags[..., i].mean()) for i, g in enumerate(GROUPS)
        },
        normal_scores=normal.scores.reshape(-1, 6),
        cases=_case_results(CASES, faulted, onset, k),
        sweeps=sweeps,
        infer_ms_per_window=normal.infer_ms_per_window,
        seconds=time.monotonic() - started,
        model_false_positive_rate=float(normal.model_flags.any(axis=-1).mean()),
        learned_false_positive_rate=(
            float(any_flag[:, learned].mean()) if learned.any() else math.nan
        ),
        learned_ticks=int(any_flag[:, learned].size),
        stuck_after_samples=STUCK_AFTER_SAMPLES,
        relation_learn_samples=RELATION_LEARN_SAMPLES,
        noise_limit=NOISE_LIMIT,
        noise_learn_samples=NOISE_LEARN_SAMPLES,
    )


def below_half(points: Sequence[tuple[float, float]], *, increasing: bool = True) -> str:
    """The intensity where detection falls below 50%, interpolated between tried ones."""
    ordered = sorted(points, reverse=not increasing)
    # walk from the strongest intensity down to the weakest
    strong_to_weak = list(reversed(ordered)) if increasing else ordered
    previous: tuple[float, float] | None = None
    for x, rate in strong_to_weak:
        if rate < 0.5:
            if previous is None:
                return f">= {x:g} (below 50% at every intensity tried)"
            (x1, r1), (x0, r0) = previous, (x, rate)
            cross = x0 + (0.5 - r0) * (x1 - x0) / (r1 - r0) if r1 != r0 else x0
            return f"~{cross:.3g} (between {x0:g} and {x1:g})"
        previous = (x, rate)
    weakest = strong_to_weak[-1][0]
    return f"< {weakest:g} (at least 50% at every intensity tried)"


def _say(progress: bool, message: str) -> None:
    if progress:
        log.info(message)


def fmt_rate(rate: float) -> str:
    return f"{100 * rate:.0f}%" if not math.isnan(rate) else "-"
