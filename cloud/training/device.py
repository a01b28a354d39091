"""The real device path, driven off-line: an edge-agent process and edge-app's detector.

``DevicePath`` starts ``edge-agent`` (a child process on a Unix socket in a
temporary folder), extracts and verifies a package, loads it, and builds
edge-app's own ``TurbineBuffers``, ``ModelFollower`` and ``Detector`` in this
process, with a sink that records the verdicts instead of publishing them
over MQTT. ``score_stream`` then feeds simulated samples into the buffers one
tick's worth (``TICK_SAMPLES`` = 10 samples, 0.5 s at 20 Hz) at a time and runs one
detector tick after each: the buffers, the feature pipeline, the batched
``Predict`` over the socket, the scoring and the fault groups are the
device's code, unchanged. Only time is simulated (a tick runs as soon as its
samples are in, not 0.5 s later) and the transport to the app (MQTT) is
left out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cloud.training.data import tick_ends
from edgeagent.client import AgentClient
from edgeagent.package import Manifest, extract_package, load_trusted_keys
from edgeapp.buffers import TurbineBuffers
from edgeapp.detector import Detector, VerdictBatch
from edgeapp.features import N_FEATURES
from edgeapp.model_follower import ModelClient, ModelFollower, ModelStatus
from edgeapp.settings import AppSettings

__all__ = ["DevicePath", "StreamVerdicts", "device_path"]

GROUPS = ("vibration", "rotation", "voltage")
_START_TIMEOUT_S = 60.0
_APP = AppSettings.model_fields
STUCK_AFTER_SAMPLES: int = _APP["stuck_after_samples"].default
"""edge-app's flat-line check as a device runs it by default."""
RELATION_LEARN_SAMPLES: int = _APP["relation_learn_samples"].default
"""edge-app's relation check as a device runs it by default: samples learned from."""
NOISE_LIMIT: float = _APP["noise_limit"].default
"""edge-app's noise check as a device runs it by default: times the learned level."""
NOISE_LEARN_SAMPLES: int = _APP["noise_learn_samples"].default
RELATION_TOLERANCES: tuple[float, float] = (
    _APP["generator_tolerance"].default,
    _APP["power_curve_tolerance"].default,
)


@dataclass(frozen=True, eq=False)
class StreamVerdicts:
    """Every tick's verdict of every turbine of a stream."""

    tick_end: NDArray[np.intp]
    """``(ticks,)`` exclusive end (sample index) of the buffer each tick scored."""
    scores: NDArray[np.float64]
    """``(T, ticks, 6)``."""
    flags: NDArray[np.bool_]
    """``(T, ticks, 3)`` fault groups raised, in ``GROUPS`` order: the verdicts."""
    model_flags: NDArray[np.bool_]
    """``(T, ticks, 3)`` fault groups the model's scores alone raised (no flat-line or
    relation check)."""
    thresholds: tuple[float, ...]
    infer_ms_per_window: float
    """Agent time per window, from the detector's own tick reports."""


class _Recorder:
    """A ``VerdictSink`` that keeps the newest tick's verdicts."""

    def __init__(self) -> None:
        self.batches: list[VerdictBatch] = []

    def verdicts(self, batch: VerdictBatch) -> None:
        self.batches.append(batch)

    def status(self, turbines: Sequence[str], label: str) -> None:
        pass

    def dashboard(
        self, turbines: Sequence[str], ts_ms: NDArray[np.int64], means: NDArray[np.float64]
    ) -> None:
        pass


class DevicePath:
    """An agent serving one package, and a detector in this process that asks it."""

    def __init__(
        self, *, socket: Path, model: str, follower: ModelFollower, agent_pid: int
    ) -> None:
        self.socket = socket
        self.model = model
        self.follower = follower
        self.agent_pid = agent_pid

    def score_stream(
        self,
        raw: NDArray[np.float64],
        *,
        max_batch: int = 256,
        stuck_after_samples: int = STUCK_AFTER_SAMPLES,
        relation_learn_samples: int = RELATION_LEARN_SAMPLES,
        noise_limit: float = NOISE_LIMIT,
    ) -> StreamVerdicts:
        """Feed ``(T, n, 7)`` raw samples tick by tick; every tick's verdicts.

        ``stuck_after_samples``, ``relation_learn_samples``, ``noise_limit``: the
        detector's flat-line, relation and noise checks, edge-app's defaults.
        """
        turbines, n, _ = raw.shape
        state = self.follower.refresh()
        if state.status is not ModelStatus.LOADED or state.model is None:
            raise RuntimeError(f"the agent does not serve {self.model}: {state.label}")
        params = state.model.params
        buffers = TurbineBuffers(
            max_turbines=turbines, capacity=params.buffer, gap_reset_s=1e9,
            fixed_ids=[f"t{i}" for i in range(turbines)],
        )  # fmt: skip
        sink = _Recorder()
        detector = Detector(
            buffers=buffers, follower=self.follower, sink=sink, max_batch=max_batch,
            dashboard_period_s=1e9, stuck_after_samples=stuck_after_samples,
            relation_learn_samples=relation_learn_samples, relation_tolerances=RELATION_TOLERANCES,
            noise_limit=noise_limit, noise_learn_samples=NOISE_LEARN_SAMPLES,
        )  # fmt: skip
        ends = tick_ends(n, params)
        scores = np.full((turbines, len(ends), N_FEATURES), np.nan)
        flags = np.zeros((turbines, len(ends), len(GROUPS)), dtype=bool)
        model_flags = np.zeros_like(flags)
        infer_ms = 0.0
        windows = 0
        written = 0
        try:
            for tick, end in enumerate(ends):
                arrival = time.monotonic()
                for t in range(turbines):
                    buffers.extend(t, raw[t, written:end].tolist(), arrival=arrival)
                written = int(end)
                sink.batches.clear()
                report = detector.tick()
                if report.verdicts != turbines:
                    raise RuntimeError(
                        f"tick {tick}: {report.verdicts} of {turbines} turbines scored "
                        f"({report.label}, {report.error})"
                    )
                infer_ms += report.ms.get("infer", 0.0)
                windows += report.verdicts * params.n_windows
                for batch in sink.batches:
                    index = [int(name[1:]) for name in batch.turbines]
                    scores[index, tick] = batch.scores
                    model = batch.model_anomalies or batch.anomalies
                    for g, group in enumerate(GROUPS):
                        flags[index, tick, g] = batch.anomalies[group]
                        model_flags[index, tick, g] = model[group]
        finally:
            detector.close()
        return StreamVerdicts(
            tick_end=ends,
            scores=scores,
            flags=flags,
            model_flags=model_flags,
            thresholds=params.thresholds,
            infer_ms_per_window=infer_ms / max(1, windows),
        )


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the agent runs, SIGTERM raises SystemExit so ``device_path`` ends the agent.

    The agent runs in a session of its own (Ctrl-C in a terminal reaches only this
    process, which then stops it); SIGTERM's default action would end this process
    without unwinding and leave the agent running.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the caller owns signals then
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def device_path(
    package: Path, *, trusted_keys: Path, model: str = "wind-turbine"
) -> Iterator[DevicePath]:
    """An edge-agent child serving ``package`` (verified with ``trusted_keys``) as ``model``."""
    with tempfile.TemporaryDirectory(prefix="windedge-eval-") as tmp:
        base = Path(tmp)
        keys = load_trusted_keys(trusted_keys)
        target = base / "package"
        manifest: Manifest = extract_package(package, target, trusted_keys=keys)
        socket = base / "agent.sock"
        with _sigterm_unwinds():  # from before the agent starts until it has ended
            log = (base / "agent.log").open("wb")
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "edgeagent", "--socket", str(socket),
                    "--trusted-keys", str(trusted_keys), "--state-dir", str(base / "state"),
                    "--log-level", "WARNING",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
            )  # fmt: skip
            client = AgentClient(socket, timeout=120)
            follower: ModelFollower | None = None
            try:
                deadline = time.monotonic() + _START_TIMEOUT_S
                while not socket.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"edge-agent did not start: {(base / 'agent.log').read_text()[-2000:]}"
                        )
                    time.sleep(0.05)
                client.wait_ready(_START_TIMEOUT_S)
                client.load_model(model, target)

                def factory() -> ModelClient:
                    return AgentClient(socket, timeout=120)

                follower = ModelFollower(
                    client_factory=factory, model_name=model, retry_min_s=0.05, retry_max_s=0.5,
                    buffer_length=manifest_buffer(manifest),
                )  # fmt: skip
                yield DevicePath(socket=socket, model=model, follower=follower, agent_pid=proc.pid)
            finally:
                if follower is not None:
                    follower.close()
                client.close()
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.close()


def manifest_buffer(manifest: Manifest) -> int:
    """The buffer length of a package's preprocessing block."""
    return int(manifest.preprocessing.get("buffer", 500))
