"""The detection tick and the model follower, in-process, against a real edge-agent.

The sink is an in-memory recorder (the detector's own port); the agent, its
packages and its hot swaps are real.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from edgeapp_harness import MODEL, V2_THRESHOLDS, Stack, synthetic_samples, wait_until
from numpy.typing import NDArray

from edgeagent.capture import CaptureStatus
from edgeagent.client import AgentClient
from edgeagent.package import Manifest
from edgeapp.buffers import TurbineBuffers
from edgeapp.detector import Detector, VerdictBatch
from edgeapp.features import (
    FEATURES,
    RAW_FIELDS,
    PreprocessingParams,
    feature_means,
    prepare_windows,
    score,
)
from edgeapp.model_follower import ModelClient, ModelFollower, ModelStatus


class Recorder:
    """A VerdictSink that keeps everything."""

    def __init__(self) -> None:
        self.batches: list[VerdictBatch] = []
        self.labels: list[tuple[str, str]] = []
        self.dashboards: list[tuple[str, int, NDArray[np.float64]]] = []

    def verdicts(self, batch: VerdictBatch) -> None:
        self.batches.append(batch)

    def status(self, turbines: Sequence[str], label: str) -> None:
        self.labels += [(t, label) for t in turbines]

    def dashboard(
        self, turbines: Sequence[str], ts_ms: NDArray[np.int64], means: NDArray[np.float64]
    ) -> None:
        self.dashboards += [(t, int(s), m) for t, s, m in zip(turbines, ts_ms, means, strict=True)]

    def by_turbine(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for batch in self.batches:
            for i, turbine in enumerate(batch.turbines):
                out[turbine] = {
                    "scores": batch.scores[i],
                    "anomalies": {k: bool(v[i]) for k, v in batch.anomalies.items()},
                    "ts": int(batch.ts_ms[i]),
                    "version": batch.version,
                    "thresholds": batch.thresholds,
                }
        return out


def raw_buffer(n: int, seed: int) -> NDArray[np.float64]:
    return np.array([[s[f] for f in RAW_FIELDS] for s in synthetic_samples(n, seed, 10**12)])


def fill(buffers: TurbineBuffers, turbine: str, raw: NDArray[np.float64], ts: float) -> None:
    slot = buffers.add(turbine)
    assert slot is not None
    buffers.extend(slot, raw.tolist(), arrival=time.monotonic(), ts=ts)


def follower_for(stack: Stack, name: str = MODEL, **kw: Any) -> ModelFollower:
    options: dict[str, Any] = {"retry_min_s": 0.05, "retry_max_s": 0.2, "buffer_length": 500}
    options.update(kw)
    factory: Callable[[], ModelClient] = lambda: AgentClient(stack.agent.socket, timeout=30)  # noqa: E731
    return ModelFollower(client_factory=factory, model_name=name, **options)


def reference_scores(package: Path, raw: NDArray[np.float64]) -> tuple[Any, PreprocessingParams]:
    """prepare_windows, the model in-process (ONNX Runtime), score: the verdict by hand."""
    manifest = Manifest.from_json_bytes((package / "manifest.json").read_bytes())
    params = PreprocessingParams.from_block(manifest.preprocessing)
    windows = prepare_windows(raw, params)
    session = ort.InferenceSession(str(package / manifest.model_file))
    name = session.get_inputs()[0].name
    out = session.run(None, {name: windows.reshape(-1, *windows.shape[-3:])})[0]
    return score(windows, out.reshape(windows.shape), params), params


@pytest.fixture
def detector_parts(app_stack: Stack) -> Iterator[tuple[TurbineBuffers, ModelFollower, Recorder]]:
    buffers = TurbineBuffers(max_turbines=8, capacity=500, gap_reset_s=1e9)
    follower = follower_for(app_stack)
    try:
        yield buffers, follower, Recorder()
    finally:
        follower.close()


def test_one_tick_scores_every_full_buffer_like_the_reference(
    app_stack: Stack, detector_parts: tuple[TurbineBuffers, ModelFollower, Recorder]
) -> None:
    buffers, follower, sink = detector_parts
    raws = {f"t{i}": raw_buffer(500, seed=i) for i in range(5)}
    for i, (turbine, raw) in enumerate(raws.items()):
        fill(buffers, turbine, raw, ts=1_700_000_000_000 + i)
    fill(buffers, "short", raw_buffer(300, seed=9), ts=1.0)  # not ready: 300 of 500 samples
    detector = Detector(buffers=buffers, follower=follower, sink=sink, max_batch=2,
                        dashboard_samples=100)  # fmt: skip
    try:
        report = detector.tick()
    finally:
        detector.close()
    assert (report.status, report.label) == ("loaded", "Model loaded: 1.0")
    assert (report.turbines, report.ready, report.verdicts, report.chunks) == (6, 5, 5, 3)
    got = sink.by_turbine()
    assert sorted(got) == sorted(raws)
    expected, params = reference_scores(app_stack.v1, np.stack(list(raws.values())))
    for i, turbine in enumerate(raws):
        np.testing.assert_allclose(got[turbine]["scores"], expected.scores[i], rtol=1e-5, atol=1e-6)
        assert got[turbine]["anomalies"] == expected.anomalies(i)
        assert got[turbine]["ts"] == 1_700_000_000_000 + i  # the newest sample's own ts
        assert got[turbine]["thresholds"] == params.thresholds
    # the dashboard: feature means over the last 100 samples
    means = {t: m for t, _ts, m in sink.dashboards}
    for turbine, raw in raws.items():
        # the buffers store float32 features: the means agree to float32 precision
        np.testing.assert_allclose(
            means[turbine], feature_means(raw, params, samples=100), rtol=1e-6
        )
    # every turbine, the short one too, got the label once
    assert sorted(sink.labels) == sorted((t, "Model loaded: 1.0") for t in [*raws, "short"])


def test_only_turbines_with_new_samples_are_scored_again(
    detector_parts: tuple[TurbineBuffers, ModelFollower, Recorder],
) -> None:
    buffers, follower, sink = detector_parts
    for i in range(3):
        fill(buffers, f"t{i}", raw_buffer(500, seed=i), ts=1.0)
    detector = Detector(buffers=buffers, follower=follower, sink=sink, max_batch=256)
    try:
        assert detector.tick().verdicts == 3
        assert detector.tick().verdicts == 0  # nothing new
        slot = buffers.find("t1")
        assert slot is not None
        buffers.append(slot, raw_buffer(1, seed=7)[0].tolist(), arrival=time.monotonic())
        report = detector.tick()
        assert report.verdicts == 1 and list(sink.batches[-1].turbines) == ["t1"]
        assert len(sink.labels) == 3  # the label did not change: not sent again
    finally:
        detector.close()


def test_a_stuck_sensor_raises_its_group_once_held_for_the_limit(
    app_stack: Stack, detector_parts: tuple[TurbineBuffers, ModelFollower, Recorder]
) -> None:
    buffers, follower, sink = detector_parts
    voltage = RAW_FIELDS.index("voltage")
    live, stuck = raw_buffer(700, seed=1), raw_buffer(700, seed=2)
    stuck[380:, voltage] = stuck[380, voltage]  # the voltage reading freezes at sample 380
    fill(buffers, "live", live[:500], ts=1.0)
    fill(buffers, "stuck", stuck[:500], ts=1.0)
    detector = Detector(buffers=buffers, follower=follower, sink=sink, max_batch=256,
                        stuck_after_samples=200)  # fmt: skip
    raised: list[tuple[int, dict[str, dict[str, bool]]]] = []
    try:
        for count in range(500, 700, 10):
            if count > 500:
                for name, raw in (("live", live), ("stuck", stuck)):
                    slot = buffers.find(name)
                    assert slot is not None
                    buffers.extend(slot, raw[count - 10 : count].tolist(), arrival=time.monotonic())
            sink.batches.clear()
            assert detector.tick().verdicts == 2
            (batch,) = sink.batches
            assert batch.checked is not None and batch.model_anomalies is not None
            got = {t: {g: bool(v[i]) for g, v in batch.anomalies.items()}
                   for i, t in enumerate(batch.turbines)}  # fmt: skip
            stuck_fields = {t: [FEATURES[f] for f in np.flatnonzero(batch.checked[i])]
                            for i, t in enumerate(batch.turbines)}  # fmt: skip
            held = count - 380
            assert stuck_fields == {"live": [], "stuck": ["voltage"] if held >= 200 else []}
            # the model's own verdict, and the flat line's on top of it
            expected, _ = reference_scores(
                app_stack.v1, np.stack([live, stuck])[:, count - 500 : count]
            )
            for turbine in batch.turbines:
                want = expected.anomalies(["live", "stuck"].index(turbine))
                if turbine == "stuck" and held >= 200:
                    want["voltage"] = True
                assert got[turbine] == want
            if count == 580:  # the model alone does not see the frozen voltage here
                assert not expected.anomalies(1)["voltage"]
            raised.append((count, got))
    finally:
        detector.close()
    first = next(c for c, got in raised if got["stuck"]["voltage"])
    assert first == 580  # 200 samples held: 380..579


def test_a_fraction_of_inputs_goes_to_capture(
    app_stack: Stack, detector_parts: tuple[TurbineBuffers, ModelFollower, Recorder]
) -> None:
    buffers, follower, sink = detector_parts
    for i in range(4):
        fill(buffers, f"c{i}", raw_buffer(500, seed=i), ts=1.0)
    detector = Detector(buffers=buffers, follower=follower, sink=sink, max_batch=256,
                        capture_fraction=1.0, seed=1)  # fmt: skip
    statuses: list[CaptureStatus] = []
    try:
        detector.tick()
        capture_id = detector.last_capture_id
        assert capture_id is not None
        with AgentClient(app_stack.agent.socket) as client:  # the call runs on the worker

            def captured() -> bool:
                statuses.append(client.capture_status(capture_id))
                return statuses[-1] is not CaptureStatus.NOT_FOUND

            wait_until(captured, 10, what="the capture to reach the agent")
    finally:
        detector.close()
    assert statuses[-1] in (CaptureStatus.IN_PROGRESS, CaptureStatus.SUCCESS)
    assert detector.capture_errors == 0


def test_follower_states_and_labels(app_stack: Stack, tmp_path: Path) -> None:
    missing = follower_for(app_stack, "no-such-model")
    assert missing.refresh().label == "Model not loaded"
    assert missing.refresh().status is ModelStatus.NOT_LOADED  # within the retry delay
    missing.close()

    down = ModelFollower(
        client_factory=lambda: AgentClient(tmp_path / "nothing.sock", timeout=5),
        model_name=MODEL,
        retry_min_s=0.05,
        retry_max_s=0.2,
        buffer_length=500,
    )
    assert down.refresh().label == "Agent unavailable"
    down.close()

    short = follower_for(app_stack, buffer_length=200)  # the model needs 500 samples
    state = short.refresh()
    assert (state.status, state.label) == (ModelStatus.INVALID, "Model invalid")
    short.close()

    loaded = follower_for(app_stack)
    state = loaded.refresh()
    assert state.status is ModelStatus.LOADED and state.model is not None
    manifest = Manifest.from_json_bytes((app_stack.v1 / "manifest.json").read_bytes())
    assert state.model.params == PreprocessingParams.from_block(manifest.preprocessing)
    assert state.model.version == "1.0" and state.label == "Model loaded: 1.0"
    loaded.close()


def test_follower_rereads_the_manifest_on_a_hot_swap_and_rejects_a_broken_one(
    app_stack: Stack, package_v2: Path, tmp_path: Path
) -> None:
    alias = "swap-test"
    copy = tmp_path / "v1-copy"
    shutil.copytree(app_stack.v1, copy)
    app_stack.agent.load(alias, copy)
    follower = follower_for(app_stack, alias)
    try:
        first = follower.refresh()
        assert first.model is not None and first.model.version == "1.0"
        app_stack.agent.load(alias, package_v2)
        second = follower.refresh()
        assert second.model is not None and second.model.version == "2.0"
        assert list(second.model.params.thresholds) == V2_THRESHOLDS
        assert follower.swaps == 1
        # the agent serves the copy again, whose manifest is now garbage on disk
        app_stack.agent.load(alias, copy)
        (copy / "manifest.json").write_text("{ not json")
        assert follower.refresh().status is ModelStatus.INVALID
    finally:
        follower.close()
        with AgentClient(app_stack.agent.socket) as client:
            client.unload_model(alias)
