"""Cost of edge-app's flat-line check against the feature pipeline it runs beside.

    .venv/bin/python bench/stuck_check.py [--turbines 5000] [--ticks 40]

Per tick, for T turbines with full buffers, the detector copies each turbine's
newest samples out in parts of 64 and prepares them (``windows_from_features``);
with ``stuck_after_samples`` set it also runs ``StuckSensors.update`` on each
part. This times both on the same parts, tick after tick with 10 new samples
per turbine (a 2 Hz tick at 20 Hz), and prints milliseconds per tick (median
over ticks) and the check's cost as a fraction of the preparation's. The
window is the released models' (``models/wind-turbine-1.1.tar.gz``): the
newest ``buffer`` samples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeagent.package import Manifest  # noqa: E402
from edgeapp.features import N_FEATURES, PreprocessingParams, windows_from_features  # noqa: E402
from edgeapp.stuck import StuckSensors  # noqa: E402

PART = 64  # turbines gathered and prepared at once (edgeapp.detector._GATHER_TURBINES)
STEP = 10


def released_params() -> PreprocessingParams:
    with tarfile.open(ROOT / "models" / "wind-turbine-1.1.tar.gz") as archive:
        member = archive.extractfile("manifest.json")
        if member is None:
            raise SystemExit("the release has no manifest.json")
        manifest = Manifest.from_json_bytes(member.read())
    return PreprocessingParams.from_block(manifest.preprocessing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turbines", type=int, default=5000)
    parser.add_argument("--ticks", type=int, default=40)
    args = parser.parse_args()
    params = released_params()
    n, turbines = params.buffer, args.turbines
    rng = np.random.default_rng(0)
    length = n + STEP * (args.ticks + 1)
    stream = rng.standard_normal((turbines, length, N_FEATURES)).astype(np.float32)
    stream[: turbines // 10, :, 5] = 1.25  # a tenth of them with a frozen voltage
    check = StuckSensors(turbines, after=200)
    slots = np.arange(turbines, dtype=np.intp)
    prepare_ms: list[float] = []
    check_ms: list[float] = []
    flagged = 0
    for tick in range(args.ticks + 1):
        end = n + STEP * tick
        counts = np.full(turbines, end, dtype=np.int64)
        prepare = stuck = 0.0
        for begin in range(0, turbines, PART):
            part = slice(begin, min(turbines, begin + PART))
            features = np.ascontiguousarray(stream[part, end - n : end])
            started = time.perf_counter()
            flags = check.update(slots[part], counts[part], features)
            checked = time.perf_counter()
            windows_from_features(features, params)
            prepare += time.perf_counter() - checked
            stuck += checked - started
            flagged += int(flags.sum()) if tick == args.ticks else 0
        if tick:  # the first look reads whole windows: not the steady state
            prepare_ms.append(prepare * 1e3)
            check_ms.append(stuck * 1e3)
    p, c = statistics.median(prepare_ms), statistics.median(check_ms)
    print(f"{turbines} turbines, window {n} samples, {STEP} new per tick, parts of {PART}")
    print(f"prepare (windows_from_features)  {p:8.2f} ms per tick (median of {args.ticks})")
    print(f"flat-line check                  {c:8.2f} ms per tick")
    print(f"check / prepare                  {c / p:8.3f}")
    print(f"features flagged stuck at the end: {flagged} (expected {turbines // 10})")


if __name__ == "__main__":
    main()
