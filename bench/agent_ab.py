"""Batch-1 Predict latency of this tree's agent against another tree's, side by side.

Both agents run at once and are called in alternating blocks, so a busy
neighbour on a shared machine slows both alike: the difference is what the
code changed, even when the absolute figures are noise-bound. The other tree
is any checkout of windedge, e.g. the main branch unpacked with
``git archive main | tar -x -C /tmp/windedge-main``:

    .venv/bin/python -m bench.agent_ab /tmp/windedge-main [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._agent import DEV_KEYS, ROOT, extract_bundled
from edgeagent.client import AgentClient

BLOCK = 200  # calls per block


def start(tree: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], AgentClient]:
    """An agent whose code comes from ``tree``, serving the bundled model as ``wt``."""
    package = extract_bundled(tmp)
    sock = tmp / "agent.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeagent",
            "--socket",
            str(sock),
            "--trusted-keys",
            str(DEV_KEYS),
            "--state-dir",
            str(tmp / "state"),
            "--log-level",
            "WARNING",
        ],
        cwd=tree,
        env=dict(os.environ, PYTHONPATH=str(tree)),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = AgentClient(sock, timeout=60)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the agent from {tree} did not start")
        time.sleep(0.05)
    client.wait_ready(30)
    client.load_model("wt", package)
    return proc, client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("other", type=Path, help="the other windedge tree")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    x = np.zeros((1, 6, 10, 10), np.float32)
    samples: dict[str, list[float]] = {"this tree": [], str(args.other): []}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        agents = [start(ROOT, Path(a)), start(args.other.resolve(), Path(b))]
        try:
            names = list(samples)
            for _, client in agents:
                for _ in range(300):  # warm up
                    client.predict("wt", x)
            for r in range(args.rounds):
                order = [0, 1] if r % 2 == 0 else [1, 0]
                for i in order:
                    client = agents[i][1]
                    for _ in range(BLOCK):
                        started = time.perf_counter()
                        client.predict("wt", x)
                        samples[names[i]].append(time.perf_counter() - started)
        finally:
            for proc, client in agents:
                client.close()
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
    print(f"batch-1 Predict through windedge's client, {args.rounds} alternating blocks of {BLOCK}")
    for name, times in samples.items():
        times.sort()
        print(
            f"  {name:30} p50 {statistics.median(times) * 1e6:6.0f} us"
            f"   p90 {times[int(len(times) * 0.9)] * 1e6:6.0f} us"
        )


if __name__ == "__main__":
    main()
