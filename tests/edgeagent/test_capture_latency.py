"""Capturing does not slow Predict: batch-1 Predict p50 with and without capture load.

The test process times batch-1 Predicts against one real agent, back to back,
in five modes:

* ``alone``: Predict only (reported, the reference a reader expects);
* ``each+capture``: each Predict followed by a CaptureData of its input and
  output (the original device application's pattern at the full rate the
  client can drive: every prediction captured, ~400 captures/s here);
* ``each+refused``: the control: each Predict followed by the very same
  CaptureData request for a model that is not loaded, refused (NOT_FOUND)
  before any capture work: same size, same client and gRPC cost; then an
  idle wait as long as a capture's acknowledgement takes beyond a refusal
  (acknowledgement is durable by default: the call returns once its record
  is fsynced, and the client idles meanwhile; measured before the runs);
* ``concurrent capture``: another process captures at 100 captures/s
  meanwhile (a device capturing each of 50 turbines on every 2 Hz tick);
* ``concurrent refused``: the control: another process sends as many
  refused CaptureData requests.

Asserted, for both acknowledgement modes: capture's own cost, each capture
mode against its control, moves Predict p50 by at most 5 % when captures are
acknowledged once queued (``capture_sync_ack = false``), and by at most 15 %
when each is acknowledged only once fsynced (the default): a client that
waits for every answer then costs one fsync per capture. Why controls: this
machine has 2 cores shared with other work, and the Predict loop alone keeps
about one of them busy;
any second RPC, even one refused at once, then costs Predict some CPU time
(an unthrottled loop of GetCaptureDataStatus calls: +30 %, an unthrottled
capture loop: +75 %, both mostly CPU contention, not asserted), and an idle
gap between Predicts makes the next one slower (so pacing with sleeps would
flatter the busier mode, and the control idles as long as the fsync wait).
Against its control, the only difference left is the capture work:
validation, the copy, the status book, the spool's writer and the uploader.
The ratios against ``alone`` are printed too.

Noise: modes alternate in short blocks (a slow neighbour hits all of them
alike), p50 is over all samples of a mode in a run, and the ratio asserted
is the median over five runs (with three, one invocation in four to eight
went over 1.05 on this machine whatever the spool did: per-run ratios of
the concurrent pair spread 0.96-1.13). Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from capture_helpers import Agents, agents, extract_model, short_dir, windows

from edgeagent.errors import NotFoundError

BLOCKS = 20  # per run and mode
PER_BLOCK = 20  # Predicts per block
RUNS = 5
CONCURRENT_RATE = 100.0  # captures/s from the other process
# Acknowledged once queued (group-committed within the window): the capture work
# itself may move Predict p50 by at most 5 %.
LIMIT = 1.05
# Acknowledged once fsynced (the default): a client that waits for each answer
# costs one fsync per capture (100/s here), ~100-200 us of kernel CPU each on this
# 2-core VM, on top of the capture work. Measured 1.00-1.10 against the control;
# the bound keeps that cost visible and stops it from growing.
LIMIT_DURABLE = 1.15

# the other process: captures (or sends refused captures) at a fixed rate while
# switched on (stdin "capture" / "refused" / "off")
CAPTURE_LOOP = r"""
import sys, threading, time, uuid
from pathlib import Path
import numpy as np
from edgeagent.client import AgentClient
from edgeagent.errors import NotFoundError

client = AgentClient(Path(sys.argv[1]), timeout=30)
period = 1.0 / float(sys.argv[2])
x = np.random.default_rng(0).standard_normal((1, 6, 10, 10), dtype=np.float32)
mode, done = [None], threading.Event()

def run():
    nxt = time.perf_counter()
    while not done.is_set():
        if mode[0] is None:
            time.sleep(0.005)
            nxt = time.perf_counter()
            continue
        try:
            client.capture_data(
                model_name="wt" if mode[0] == "capture" else "not-loaded",
                capture_id=str(uuid.uuid4()),
                inputs=[x],
                outputs=[x],
            )
        except NotFoundError:
            pass
        nxt += period
        time.sleep(max(0.0, nxt - time.perf_counter()))

thread = threading.Thread(target=run)
thread.start()
print("ready", flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "quit":
        break
    mode[0] = None if command == "off" else command
    print("ok", flush=True)
done.set()
thread.join()
client.close()
"""


@pytest.fixture
def pool() -> Iterator[Agents]:
    with agents() as started:
        yield started


class CaptureLoop:
    def __init__(self, socket: Path, rate: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CAPTURE_LOOP, str(socket), str(rate)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._read() == "ready"

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        if text != "quit":
            assert self._read() == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.command("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize(
    ("sync_ack", "limit"), [(False, LIMIT), (True, LIMIT_DURABLE)], ids=["queued", "durable"]
)
def test_capture_does_not_move_predict_p50(pool: Agents, sync_ack: bool, limit: float) -> None:
    base = short_dir("wecap-lat-")
    try:
        model = extract_model(base / "wind-turbine-1.0")
        agent = pool.start(
            {
                "capture_sync_ack": sync_ack,
                "capture_disk_path": str(base / "captured"),
                "capture_push_period_seconds": 1.0,  # uploads happen during the measurement
                "capture_buffer_size": 100_000,
                "capture_spool_max_bytes": 1 << 30,
                # acknowledged once queued, at most capture_max_unsynced (64) wait for the
                # disk: at each+capture's ~400 captures/s, one flush stalled for 160 ms
                # refuses captures ("writer behind", seen once in a CI run). That is the
                # bound doing its job (test_capture_spool), not capture's cost to Predict.
                "capture_max_unsynced": 4096,
            }
        )
        agent.client.load_model("wt", model)
        x = windows(1)
        y = agent.client.predict("wt", x)
        for _ in range(300):  # warm up both sides
            agent.client.predict("wt", x)
        calls = _call_times(agent, x, y)
        ack_wait = _extra_wait(calls)
        loop = CaptureLoop(agent.socket, CONCURRENT_RATE)
        try:
            modes = [
                "alone",
                "each+capture",
                "each+refused",
                "concurrent capture",
                "concurrent refused",
            ]
            pairs = {
                "each+capture": "each+refused",
                "concurrent capture": "concurrent refused",
            }
            ratios: dict[str, list[float]] = {m: [] for m in pairs}
            p50s: dict[str, list[float]] = {m: [] for m in modes}
            captured = 0
            for _ in range(RUNS):
                samples: dict[str, list[float]] = {m: [] for m in modes}
                for block in range(BLOCKS):
                    shift = block % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        if mode.startswith("concurrent"):
                            loop.command(mode.split()[1])
                            time.sleep(0.01)
                        for _ in range(PER_BLOCK):
                            started = time.perf_counter()
                            agent.client.predict("wt", x)
                            samples[mode].append(time.perf_counter() - started)
                            if mode == "each+capture":
                                called = time.perf_counter()
                                agent.client.capture_data(
                                    model_name="wt",
                                    capture_id=str(uuid.uuid4()),
                                    inputs=[x],
                                    outputs=[y],
                                )
                                calls["wt"].append(time.perf_counter() - called)
                                captured += 1
                            elif mode == "each+refused":
                                called = time.perf_counter()
                                with contextlib.suppress(NotFoundError):
                                    agent.client.capture_data(
                                        model_name="not-loaded",
                                        capture_id=str(uuid.uuid4()),
                                        inputs=[x],
                                        outputs=[y],
                                    )
                                calls["not-loaded"].append(time.perf_counter() - called)
                                time.sleep(ack_wait)
                        # the control's idle wait follows the machine's current fsync time
                        ack_wait = _extra_wait(calls)
                        if mode.startswith("concurrent"):
                            loop.command("off")
                p50 = {m: statistics.median(v) for m, v in samples.items()}
                for m in modes:
                    p50s[m].append(p50[m] * 1e6)
                for m, control in pairs.items():
                    ratios[m].append(p50[m] / p50[control])
        finally:
            loop.close()
        print(
            f"\nacknowledgement wait beyond a refusal (last): {ack_wait * 1e6:.0f} us"
            "\nPredict p50 (us) per run: "
            + "; ".join(f"{m} {[round(v) for v in p50s[m]]}" for m in modes)
            + "\ncapture against its control, per run: "
            + "; ".join(f"{m} {[round(r, 3) for r in ratios[m]]}" for m in ratios)
            + "\nagainst alone (median): "
            + "; ".join(
                f"{m} x{statistics.median(p50s[m]) / statistics.median(p50s['alone']):.3f}"
                for m in modes[1:]
            )
        )
        for m, control in pairs.items():
            ratio = statistics.median(ratios[m])
            assert ratio <= limit, f"{m} moves Predict p50 by x{ratio:.3f} against {control}"
        assert captured == RUNS * BLOCKS * PER_BLOCK  # the load was real
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _call_times(agent: Any, x: Any, y: Any, n: int = 60) -> dict[str, deque[float]]:
    """Seconds CaptureData calls take, captured ("wt") and refused, the most recent kept."""
    taken: dict[str, deque[float]] = {"wt": deque(maxlen=n), "not-loaded": deque(maxlen=n)}
    for i in range(2 * n):
        name = "wt" if i % 2 else "not-loaded"
        started = time.perf_counter()
        with contextlib.suppress(NotFoundError):
            agent.client.capture_data(
                model_name=name, capture_id=str(uuid.uuid4()), inputs=[x], outputs=[y]
            )
        taken[name].append(time.perf_counter() - started)
    return taken


def _extra_wait(taken: dict[str, deque[float]]) -> float:
    """How much longer a capture call takes than a refused one (the durable ack's fsync)."""
    return max(0.0, statistics.median(taken["wt"]) - statistics.median(taken["not-loaded"]))
