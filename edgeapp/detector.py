"""The detection tick: every ready turbine prepared together, one Predict, verdicts out.

At each tick (``tick_period_s``, 2 Hz by default) the detector

1. asks the ``ModelFollower`` which package the agent serves (and publishes
   the dashboard label when that changes, or to turbines seen for the first time);
2. picks the turbines with a full buffer and samples newer than their last verdict;
3. per chunk of at most ``max_batch`` windows: copies their newest samples
   out of the buffers (stored as features), runs ``windows_from_features`` on
   the whole chunk, and sends it to the agent in one ``Predict``; then scores
   the reconstruction and hands the verdicts (and, once per
   ``dashboard_period_s``, the feature means) to the sink. With
   ``stuck_after_samples`` set, a feature whose reading has not changed for
   that many samples (``edgeapp.stuck``) raises its fault group too; with
   ``relation_learn_samples`` set, so does an effect (voltage, rotor speed)
   departed from the turbine's own learned relation to its cause
   (``edgeapp.relations``); with ``noise_limit`` set, so does a wind, rotor
   speed or voltage reading jumping about far more than the turbine's learned
   level (``edgeapp.noise``). All are ``edgeapp.checks.SensorCheck``: they see
   the samples gathered for the model, one part of turbines at a time.

Inference runs on ``max_inflight`` worker threads (2 by default): the agent
works on chunks k and k+1 at once (its sessions run requests concurrently, one
core each) while this thread prepares the next chunk and scores the one
before. On a 2-core device at 1,000 turbines the agent's share of a tick then
fits the 500 ms period, which one chunk at a time does not (the model costs
~0.4 ms per window on one core here: 1,000 windows in a row are 0.4 s).

The sink's calls run on one more thread, in order: building thousands of
payloads and writing them to a busy broker overlaps the preparation instead
of following it. The tick ends when they are done, so all of a tick's
verdicts are with the sink when ``tick`` returns.

After every Predict the worker asks the agent which package served it: a chunk
scored by a package other than the one whose preprocessing prepared it (a hot
swap mid-tick) is discarded, and the next tick reads the new manifest.

Transport-free: the sink (``VerdictSink``) and the agent client
(``ModelClient``) are ports; MQTT and gRPC live behind them.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog
from numpy.typing import NDArray

from edgeagent.capture import AuxEncoding
from edgeagent.errors import AgentError
from edgeapp.buffers import TurbineBuffers
from edgeapp.checks import LearningCheck, SensorCheck, SlotOwners
from edgeapp.features import N_FEATURES, means_of_features, score, windows_from_features
from edgeapp.model_follower import LoadedModel, ModelClient, ModelFollower, ModelStatus
from edgeapp.noise import NoisySensors
from edgeapp.relations import Relations
from edgeapp.stuck import StuckSensors

__all__ = ["Detector", "TickReport", "VerdictBatch", "VerdictSink"]

log = structlog.get_logger("edgeapp.detector")

# After a stop request, how long an in-flight Predict may still take before the
# connection is closed under it (the daemon must stop within 2 s).
STOP_GRACE_S = 0.7
_CAPTURE_LOG_INTERVAL_S = 60.0
# Turbines copied out of the buffers and prepared at once (the feature pipeline's own chunk).
_GATHER_TURBINES = 64


@dataclass(frozen=True, eq=False)
class VerdictBatch:
    """The verdicts of one chunk of turbines (arrays indexed like ``turbines``)."""

    turbines: Sequence[str]
    ts_ms: NDArray[np.int64]
    """Epoch ms of each turbine's newest sample (its own ts, else its arrival)."""
    arrival: NDArray[np.float64]
    """Monotonic arrival time of that sample: the publisher computes the latency."""
    model: str
    version: str
    scores: NDArray[np.float64]
    """``(T, 6)`` mean absolute reconstruction error per feature."""
    thresholds: tuple[float, ...]
    anomalies: Mapping[str, NDArray[np.bool_]]
    """Fault group -> ``(T,)`` raised or not: by the model's scores, or by a feature of
    the group that a check beside the model flagged (``edgeapp.checks``)."""
    model_anomalies: Mapping[str, NDArray[np.bool_]] | None = None
    """The groups the model's scores alone raised (None: the same as ``anomalies``)."""
    checked: NDArray[np.bool_] | None = None
    """``(T, 6)`` features the checks flagged; None when no check runs."""


class VerdictSink(Protocol):
    """Where verdicts, labels and dashboard figures go (the MQTT publisher)."""

    def verdicts(self, batch: VerdictBatch) -> None: ...

    def status(self, turbines: Sequence[str], label: str) -> None: ...

    def dashboard(
        self, turbines: Sequence[str], ts_ms: NDArray[np.int64], means: NDArray[np.float64]
    ) -> None: ...


@dataclass
class TickReport:
    """What one tick did (logged as one line; the benchmark reads it)."""

    status: str
    label: str
    turbines: int = 0
    """Turbines buffered (known)."""
    ready: int = 0
    """Turbines with a full buffer and new samples."""
    verdicts: int = 0
    chunks: int = 0
    discarded: int = 0
    """Verdicts computed but not published (the model changed under them)."""
    error: str | None = None
    ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds per stage: gather, prepare, infer (in the agent), wait, score,
    publish (on the publishing thread, overlapping the others), publish_wait (this
    thread waiting for it at the end), total."""

    def add_ms(self, stage: str, seconds: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + seconds * 1000.0


@dataclass(frozen=True, eq=False)
class _Chunk:
    slots: NDArray[np.intp]
    turbines: list[str]
    arrival: NDArray[np.float64]  # (T,) newest sample's monotonic arrival
    ts: NDArray[np.float64]  # (T,) its own ts (epoch ms) or NaN
    windows: NDArray[np.float32]  # (T, W, 6, side, side)
    means: NDArray[np.float64] | None  # (T, 6) when the dashboard is due
    checked: NDArray[np.bool_] | None  # (T, 6) features flagged, when checks run


@dataclass(frozen=True, eq=False)
class _Inference:
    output: NDArray[np.generic]
    url: str | None  # what the agent served right after; None if it could not say
    seconds: float


class _TickAbortedError(Exception):
    """A chunk could not be scored; the rest of the tick is dropped."""


class Detector:
    """Runs ticks; owned by the main thread (the worker thread belongs to it)."""

    def __init__(
        self,
        *,
        buffers: TurbineBuffers,
        follower: ModelFollower,
        sink: VerdictSink,
        max_batch: int,
        max_inflight: int = 2,
        capture_fraction: float = 0.0,
        dashboard_period_s: float = 1.0,
        dashboard_samples: int = 100,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        seed: int | None = None,
        stuck_after_samples: int = 0,
        relation_learn_samples: int = 0,
        relation_tolerances: Sequence[float] = (0.05, 0.08),
        noise_limit: float = 0.0,
        noise_learn_samples: int = 1_200,
    ) -> None:
        self.buffers = buffers
        self.follower = follower
        self.sink = sink
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.capture_fraction = capture_fraction
        self.dashboard_period_s = dashboard_period_s
        self.dashboard_samples = dashboard_samples
        self._clock = clock
        self._wallclock = wallclock
        self._rng = np.random.default_rng(seed)
        self._worker = ThreadPoolExecutor(
            max_workers=max_inflight, thread_name_prefix="edgeapp-predict"
        )
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeapp-publish")
        self._scored = np.full(buffers.max_turbines, -math.inf)
        self._checks: list[SensorCheck] = []
        self.learning_checks: list[LearningCheck] = []
        """The checks that learn a baseline per turbine (``edgeapp.learned`` keeps it)."""
        if stuck_after_samples > 0:
            self._checks.append(StuckSensors(buffers.max_turbines, stuck_after_samples))
        if relation_learn_samples > 0:
            self.learning_checks.append(
                Relations(buffers.max_turbines, relation_learn_samples, relation_tolerances)
            )
        if noise_limit > 0:
            self.learning_checks.append(
                NoisySensors(buffers.max_turbines, noise_learn_samples, noise_limit)
            )
        self._checks.extend(self.learning_checks)
        self._owners = SlotOwners(buffers.max_turbines)  # for every check, compared once
        self._next_dashboard = -math.inf
        self._label: str | None = None
        self._gathered: NDArray[np.float32] | None = None  # reused gather buffer
        self._capture_prefix = f"edge-app-{uuid.uuid4().hex[:12]}"
        self._captures = 0
        self.last_capture_id: str | None = None
        self.capture_errors = 0
        self._capture_logged = -math.inf
        self._stop: threading.Event | None = None
        self.ticks = 0
        self.verdicts = 0

    def close(self) -> None:
        """Finish queued capture calls and join the worker threads."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._publisher.shutdown(wait=True)

    # ---- the tick

    def tick(self, stop: threading.Event | None = None) -> TickReport:
        """One tick; returns early (between chunks) once ``stop`` is set."""
        self._stop = stop
        start = self._clock()
        state = self.follower.refresh()
        report = TickReport(status=state.status.value, label=state.label)
        self._announce(state.label)
        counts, arrival = self.buffers.state()
        report.turbines = len(self.buffers)
        model = state.model
        if state.status is ModelStatus.LOADED and model is not None:
            n = model.params.buffer
            ready = np.flatnonzero((counts >= n) & (arrival > self._scored[: len(counts)]))
            report.ready = len(ready)
            if len(ready):
                self._run(model, ready, report)
        self.ticks += 1
        self.verdicts += report.verdicts
        report.add_ms("total", self._clock() - start)
        return report

    def _run(self, model: LoadedModel, ready: NDArray[np.intp], report: TickReport) -> None:
        params = model.params
        per_chunk = max(1, self.max_batch // params.n_windows)
        dashboard = self._clock() >= self._next_dashboard
        if dashboard:
            self._next_dashboard = self._clock() + self.dashboard_period_s
        client = self.follower.client
        ids = self.buffers.slot_ids()
        pending: deque[tuple[_Chunk, Future[_Inference]]] = deque()
        published: list[Future[float]] = []
        try:
            for begin in range(0, len(ready), per_chunk):
                if self._stopping():
                    break
                slots = ready[begin : begin + per_chunk]
                chunk = self._prepare(model, slots, ids, dashboard, report)
                pending.append(
                    (chunk, self._worker.submit(self._infer, client, model, chunk.windows))
                )
                report.chunks += 1
                # keep max_inflight Predicts running and one more chunk queued behind them
                while len(pending) > self.max_inflight:
                    published.append(self._finish(model, *pending.popleft(), report))
            while pending:
                published.append(self._finish(model, *pending.popleft(), report))
        except _TickAbortedError:
            pass
        finally:
            while pending:  # aborted with Predicts in flight: let them end
                self._drain(pending.popleft()[1], report)
            started = self._clock()
            try:
                report.add_ms("publish", sum(f.result() for f in published))
            finally:
                report.add_ms("publish_wait", self._clock() - started)

    def _prepare(
        self,
        model: LoadedModel,
        slots: NDArray[np.intp],
        ids: list[str | None],
        dashboard: bool,
        report: TickReport,
    ) -> _Chunk:
        """Copy out and prepare one Predict chunk, ``_GATHER_TURBINES`` turbines at a time.

        Small copies keep the daemon's memory flat (one reusable buffer of
        ``_GATHER_TURBINES`` x n samples) and hold the buffer lock briefly;
        the feature pipeline works in chunks of that size anyway.
        """
        params = model.params
        n = params.buffer
        count = len(slots)
        buffer = self._gathered
        if buffer is None or buffer.shape[1] != n:
            buffer = self._gathered = np.empty((_GATHER_TURBINES, n, N_FEATURES), np.float32)
        windows = np.empty((count, params.n_windows, *params.input_shape), dtype=np.float32)
        means = np.empty((count, N_FEATURES)) if dashboard else None
        checked = np.zeros((count, N_FEATURES), dtype=bool) if self._checks else None
        turbines = [ids[s] or "" for s in slots]  # ready slots are held: never None
        arrival = np.empty(count)
        ts = np.empty(count)
        gather_s = prepare_s = 0.0
        for begin in range(0, count, _GATHER_TURBINES):
            part = slice(begin, min(count, begin + _GATHER_TURBINES))
            started = self._clock()
            size = part.stop - part.start
            gathered = self.buffers.gather(slots[part], n, out=buffer[:size])
            gathered_at = self._clock()
            if checked is not None:
                moves = self._owners.handovers(slots[part], turbines[part])
                for check in self._checks:
                    checked[part] |= check.update(
                        slots[part], moves, gathered.count, gathered.features
                    )
            windows[part] = windows_from_features(gathered.features, params)
            if means is not None:
                means[part] = means_of_features(
                    gathered.features, params, samples=self.dashboard_samples
                )
            arrival[part] = gathered.arrival
            ts[part] = gathered.ts
            gather_s += gathered_at - started
            prepare_s += self._clock() - gathered_at
        report.add_ms("gather", gather_s)
        report.add_ms("prepare", prepare_s)
        return _Chunk(
            slots=slots,
            turbines=turbines,
            arrival=arrival,
            ts=ts,
            windows=windows,
            means=means,
            checked=checked,
        )

    def _infer(
        self, client: ModelClient, model: LoadedModel, windows: NDArray[np.float32]
    ) -> _Inference:
        """On the worker thread: Predict, then which package the agent serves now."""
        started = self._clock()
        flat = windows.reshape(-1, *windows.shape[-3:])
        output = client.predict(model.name, flat)
        seconds = self._clock() - started
        try:
            url: str | None = client.describe_model(model.name).url
        except AgentError:
            url = None
        return _Inference(output=output, url=url, seconds=seconds)

    def _finish(
        self,
        model: LoadedModel,
        chunk: _Chunk,
        future: Future[_Inference],
        report: TickReport,
    ) -> Future[float]:
        """Score a chunk once its Predict is back and hand its verdicts to the publishing
        thread; the future gives the seconds the sink took."""
        inference = self._wait(future, report)
        report.add_ms("infer", inference.seconds)
        if inference.url != model.url:
            report.discarded += len(chunk.slots)
            if inference.url is None:
                self.follower.refresh()
            log.info(
                "model changed during the tick: verdicts discarded",
                model=model.name,
                version=model.version,
                turbines=len(chunk.slots),
            )
            raise _TickAbortedError
        started = self._clock()
        windows = chunk.windows
        output = np.asarray(inference.output).reshape(windows.shape)
        scores = score(windows, output, model.params)
        groups = scores.groups
        if chunk.checked is not None:
            groups = {
                name: raised | chunk.checked[:, list(model.params.fault_groups[name])].any(axis=1)
                for name, raised in scores.groups.items()
            }
        wall_offset = self._wallclock() - self._clock()
        ts_ms = np.where(np.isnan(chunk.ts), (chunk.arrival + wall_offset) * 1000.0, chunk.ts)
        batch = VerdictBatch(
            turbines=chunk.turbines,
            ts_ms=ts_ms.astype(np.int64),
            arrival=chunk.arrival,
            model=model.name,
            version=model.version,
            scores=scores.scores,
            thresholds=model.params.thresholds,
            anomalies=groups,
            model_anomalies=scores.groups,
            checked=chunk.checked,
        )
        published = self._publisher.submit(self._publish, batch, chunk.means)
        report.add_ms("score", self._clock() - started)
        self._scored[chunk.slots] = chunk.arrival
        report.verdicts += len(chunk.slots)
        if self.capture_fraction > 0.0:
            self._capture(model, chunk, windows, output)
        return published

    def _publish(self, batch: VerdictBatch, means: NDArray[np.float64] | None) -> float:
        """On the publishing thread: the chunk's verdicts (and dashboard figures) to the sink."""
        started = self._clock()
        self.sink.verdicts(batch)
        if means is not None:
            self.sink.dashboard(batch.turbines, batch.ts_ms, means)
        return self._clock() - started

    def _wait(self, future: Future[_Inference], report: TickReport) -> _Inference:
        """The worker's result; stop-aware: a stop request closes the channel after a grace."""
        started = self._clock()
        stop_seen: float | None = None
        try:
            while True:
                try:
                    return future.result(timeout=0.05)
                except TimeoutError:
                    if self._stopping():
                        now = self._clock()
                        stop_seen = now if stop_seen is None else stop_seen
                        if now - stop_seen > STOP_GRACE_S:
                            self.follower.close()  # cancels the call in flight
        except AgentError as exc:
            state = self.follower.failed(exc)
            report.status, report.label = state.status.value, state.label
            report.error = f"{type(exc).__name__}: {exc}"
            self._announce(state.label)
            raise _TickAbortedError from exc
        finally:
            report.add_ms("wait", self._clock() - started)

    def _drain(self, future: Future[_Inference], report: TickReport) -> None:
        """Wait for a Predict whose tick was aborted; its outcome no longer matters."""
        try:
            self._wait(future, report)
        except _TickAbortedError:
            pass
        except Exception as exc:  # noqa: BLE001 - the tick already failed; this only joins
            log.debug("aborted chunk failed too", error=repr(exc))

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    # ---- labels and capture

    def _announce(self, label: str) -> None:
        """Publish the label to every turbine when it changes, and to new turbines."""
        added = self.buffers.take_added()
        if label != self._label:
            self._label = label
            added = self.buffers.ids
        if added:
            self.sink.status(added, label)

    def _capture(
        self,
        model: LoadedModel,
        chunk: _Chunk,
        windows: NDArray[np.float32],
        output: NDArray[np.generic],
    ) -> None:
        chosen = np.flatnonzero(self._rng.random(len(chunk.slots)) < self.capture_fraction)
        if not len(chosen):
            return
        self._captures += 1
        capture_id = self.last_capture_id = f"{self._capture_prefix}-{self._captures}"
        turbines = [chunk.turbines[i] for i in chosen]
        inputs = np.ascontiguousarray(windows[chosen].reshape(-1, *windows.shape[-3:]))
        outputs = np.ascontiguousarray(output[chosen].reshape(-1, *windows.shape[-3:]))
        aux = ("turbines", AuxEncoding.JSON, _json_list(turbines))
        client = self.follower.client

        def send() -> None:
            try:
                client.capture_data(
                    model_name=model.name,
                    capture_id=capture_id,
                    inputs=[inputs],
                    outputs=[outputs],
                    aux_inputs=[aux],
                )
            except AgentError as exc:
                self.capture_errors += 1
                now = self._clock()
                if now - self._capture_logged >= _CAPTURE_LOG_INTERVAL_S:
                    self._capture_logged = now
                    log.warning(
                        "capture refused",
                        error=f"{type(exc).__name__}: {exc}",
                        failures=self.capture_errors,
                    )

        self._worker.submit(send)


def _json_list(items: Sequence[str]) -> bytes:
    return json.dumps(list(items)).encode()
