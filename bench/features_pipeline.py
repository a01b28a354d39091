"""Cost per turbine of the feature pipeline: batched vs the one-at-a-time reference.

    .venv/bin/python bench/features_pipeline.py [--quick]

For T turbines with full buffers (500 samples, the default constants), times
``edgeapp.features.prepare_windows`` on the whole ``(T, 500, 7)`` batch and the
plain reference of ``tests/edgeapp/reference.py`` called once per turbine, in the
same run, and prints both per turbine, their ratio and the largest difference
between the two outputs. The target is batched >= 20x cheaper per turbine.
It also times what edge-app's tick runs, ``windows_from_features`` on the
float32 features its buffers store (converted once per sample on arrival), and
prints that path's largest difference from the reference.

Timings are the best of several repeats (the machine is shared; the minimum is
the least disturbed figure). BLAS may use several threads for the large
matrix products; the environment's OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are
printed and left as they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeapp.features import (  # noqa: E402
    PreprocessingParams,
    prepare_windows,
    raw_to_features,
    windows_from_features,
)


def load_reference() -> ModuleType:
    path = ROOT / "tests" / "edgeapp" / "reference.py"
    spec = importlib.util.spec_from_file_location("windedge_features_reference", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_buffers(
    turbines: int, n: int, params: PreprocessingParams, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Turbine-like raw buffers (T, n, 7) around the seed statistics."""
    mean, raw_std = np.array(params.mean), np.array(params.raw_std)
    t = np.arange(n) * 0.05
    roll = mean[0] + raw_std[0] * rng.standard_normal((turbines, n))
    pitch = mean[1] + raw_std[1] * rng.standard_normal((turbines, n))
    yaw = rng.uniform(-np.pi, np.pi, (turbines, 1)) + np.cumsum(
        0.01 * rng.standard_normal((turbines, n)), axis=1
    )
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    rps = mean[4] + 0.5 * raw_std[4] * np.sin(2 * np.pi * t / 30 + rng.uniform(0, 6, (turbines, 1)))
    rps = rps + 0.1 * rng.standard_normal((turbines, n))
    wind = mean[3] + 0.8 * (rps - mean[4]) + 0.1 * rng.standard_normal((turbines, n))
    voltage = mean[5] / mean[4] * rps + 2.0 * rng.standard_normal((turbines, n))
    return np.stack(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
            wind,
            rps,
            voltage,
        ],
        axis=-1,
    )


def best_time(run: Callable[[], object], min_seconds: float, min_repeats: int = 5) -> float:
    """Best wall time of one call, over repeats adding up to at least ``min_seconds``."""
    run()  # warm-up: plans, caches, page faults
    best, spent, repeats = float("inf"), 0.0, 0
    while spent < min_seconds or repeats < min_repeats:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="shorter timing budget (noisier figures)"
    )
    parser.add_argument("--turbines", type=int, nargs="*", default=[1, 10, 100, 1000])
    args = parser.parse_args()
    budget = 0.2 if args.quick else 1.0

    reference = load_reference()
    params = PreprocessingParams.default()
    rng = np.random.default_rng(2024)
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{os.cpu_count()} cpus, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(
        f"buffer {params.buffer} samples, window {params.window}, step {params.step}, "
        f"wavelet {params.wavelet}"
    )
    print(
        f"{'T':>5} {'batched us/turbine':>19} {'reference us/turbine':>21} "
        f"{'ratio':>7} {'max |diff|':>11} {'stored us/turbine':>18} {'stored |diff|':>14}"
    )
    ref_kwargs = {
        "raw_std": params.raw_std,
        "mean": params.mean,
        "std": params.std,
        "window": params.window,
        "step": params.step,
        "wavelet": params.wavelet,
        "max_level": params.max_level,
    }
    for turbines in args.turbines:
        raw = synthetic_buffers(turbines, params.buffer, params, rng)

        def batched_call(raw: NDArray[np.float64] = raw) -> NDArray[np.float32]:
            return prepare_windows(raw, params)

        def one_at_a_time(raw: NDArray[np.float64] = raw) -> NDArray[np.float32]:
            return np.stack([reference.prepare_windows(b, **ref_kwargs) for b in raw])

        batched = best_time(batched_call, budget) / turbines

        per_ref = best_time(one_at_a_time, budget, min_repeats=1 if turbines >= 100 else 3)
        per_ref /= turbines
        stored = raw_to_features(raw).astype(np.float32)

        def stored_call(stored: NDArray[np.float32] = stored) -> NDArray[np.float32]:
            return windows_from_features(stored, params)

        per_stored = best_time(stored_call, budget) / turbines
        want = one_at_a_time()
        diff = float(np.max(np.abs(prepare_windows(raw, params) - want)))
        stored_diff = float(np.max(np.abs(stored_call() - want)))
        print(
            f"{turbines:>5} {batched * 1e6:>19.1f} {per_ref * 1e6:>21.1f} "
            f"{per_ref / batched:>6.1f}x {diff:>11.2e} {per_stored * 1e6:>18.1f} "
            f"{stored_diff:>14.2e}"
        )


if __name__ == "__main__":
    main()
