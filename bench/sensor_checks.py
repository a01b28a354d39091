"""Cost of edge-app's flat-line, relation and noise checks against the feature pipeline.

    .venv/bin/python bench/sensor_checks.py [--turbines 5000] [--ticks 40]

Per tick, for T turbines with full buffers, the detector copies each turbine's
newest samples out in parts of 64 and prepares them (``windows_from_features``);
with ``stuck_after_samples`` set it also runs ``StuckSensors.update`` on each
part, with ``relation_learn_samples`` set ``Relations.update`` (timed once
the relations are learned: the scoring path), and with ``noise_limit`` set
``NoisySensors.update`` (timed once its levels are learned). This times all
four on the same parts, tick after tick with 10 new samples per turbine (a 2 Hz tick at
20 Hz), and prints milliseconds per tick (median over the ticks after the
relations are learned) and each check's cost as a fraction of the preparation's. The
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
from edgeapp.checks import SlotOwners  # noqa: E402
from edgeapp.features import N_FEATURES, PreprocessingParams, windows_from_features  # noqa: E402
from edgeapp.noise import NoisySensors  # noqa: E402
from edgeapp.relations import Relations  # noqa: E402
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
    parser.add_argument("--ticks", type=int, default=40, help="timed, after 25 to learn")
    args = parser.parse_args()
    params = released_params()
    n, turbines = params.buffer, args.turbines
    rng = np.random.default_rng(0)
    warmup = 25  # ticks: a relation and a noise level are learned from 20 looks
    length = n + STEP * (args.ticks + warmup + 1)
    stream = rng.standard_normal((turbines, length, N_FEATURES)).astype(np.float32)
    # wind, rotor speed, voltage: readings around a turbine's operating point
    stream[:, :, 3:6] = np.array([2.15, 1.6, 47.0]) + 0.05 * stream[:, :, 3:6]
    stream[: turbines // 10, :, 5] = 1.25  # a tenth of them with a frozen voltage
    check = StuckSensors(turbines, after=200)
    relations = Relations(turbines, learn=STEP, tolerances=(0.05, 0.08))  # learned at once
    noise = NoisySensors(turbines, learn=STEP, limit=12.0)
    ids = [f"t{i}" for i in range(turbines)]
    owners = SlotOwners(turbines)
    slots = np.arange(turbines, dtype=np.intp)
    prepare_ms: list[float] = []
    check_ms: list[float] = []
    relation_ms: list[float] = []
    noise_ms: list[float] = []
    flagged = 0
    for tick in range(args.ticks + warmup + 1):
        end = n + STEP * tick
        counts = np.full(turbines, end, dtype=np.int64)
        prepare = stuck = related = noisy = 0.0
        for begin in range(0, turbines, PART):
            part = slice(begin, min(turbines, begin + PART))
            features = np.ascontiguousarray(stream[part, end - n : end])
            moves = owners.handovers(slots[part], ids[part])  # once for all, as the detector
            started = time.perf_counter()
            flags = check.update(slots[part], moves, counts[part], features)
            checked = time.perf_counter()
            relations.update(slots[part], moves, counts[part], features)
            related_at = time.perf_counter()
            noise.update(slots[part], moves, counts[part], features)
            noise_at = time.perf_counter()
            windows_from_features(features, params)
            prepare += time.perf_counter() - noise_at
            noisy += noise_at - related_at
            related += related_at - checked
            stuck += checked - started
            flagged += int(flags.sum()) if tick == args.ticks + warmup else 0
        if tick > warmup:  # the relations learned, the flat line followed across looks
            prepare_ms.append(prepare * 1e3)
            check_ms.append(stuck * 1e3)
            relation_ms.append(related * 1e3)
            noise_ms.append(noisy * 1e3)
    p, c = statistics.median(prepare_ms), statistics.median(check_ms)
    r, z = statistics.median(relation_ms), statistics.median(noise_ms)
    print(f"{turbines} turbines, window {n} samples, {STEP} new per tick, parts of {PART}")
    print(f"prepare (windows_from_features)  {p:8.2f} ms per tick (median of {args.ticks})")
    print(f"flat-line check                  {c:8.2f} ms per tick")
    print(f"relation check                   {r:8.2f} ms per tick")
    print(f"noise check                      {z:8.2f} ms per tick")
    print(f"flat-line check / prepare        {c / p:8.3f}")
    print(f"relation check / prepare         {r / p:8.3f}")
    print(f"noise check / prepare            {z / p:8.3f}")
    print(f"features flagged stuck at the end: {flagged} (expected {turbines // 10})")


if __name__ == "__main__":
    main()
