"""Offline scoring of a recorded CSV: the original pipeline's batch-prediction step.

``predict_batch`` verifies and unpacks a package, prepares every turbine's
recording tick by tick with the device's pipeline (``buffer`` samples per
verdict, a verdict every tick of ``TICK_SAMPLES`` samples), runs the model with ONNX Runtime
in this process and writes one CSV row per scored window: the turbine, the
sample index (and ``ts`` when the recording has one) ending its buffer, the
six scores and the three fault groups. The same numbers the device would
publish for that buffer (the device's tick runs the same pipeline; it may
score fewer buffers when samples arrive faster than its ticks).

Also ``model_cost``: what one window of a package's model costs.
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from cloud.training.data import features_of, read_csv_recording, tick_ends, tick_windows
from cloud.training.device import GROUPS
from edgeagent.package import Manifest, extract_package, load_trusted_keys
from edgeapp.features import FEATURES, PreprocessingParams, score
from edgecommon.fsutil import atomic_write_bytes

__all__ = ["BatchSummary", "predict_batch", "score_windows", "multiply_adds_of", "time_model"]


@dataclass(frozen=True)
class BatchSummary:
    """What a batch prediction wrote."""

    turbines: int
    rows: int
    too_short: int
    """Turbines with fewer samples than one buffer (no row)."""


def _unpack(package: Path, trusted_keys: Path, into: Path) -> tuple[Path, PreprocessingParams]:
    keys = load_trusted_keys(trusted_keys)
    manifest: Manifest = extract_package(package, into, trusted_keys=keys)
    return into / manifest.model_file, PreprocessingParams.from_block(manifest.preprocessing)


def predict_batch(recording: Path, package: Path, *, trusted_keys: Path, out: Path) -> BatchSummary:
    """Score ``recording`` with ``package``; write ``out`` (CSV, atomically)."""
    turbines = read_csv_recording(recording)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["turbine", "end_sample", "ts", *(f"score_{f}" for f in FEATURES), *GROUPS])
    rows = short = 0
    with tempfile.TemporaryDirectory(prefix="windedge-batch-") as tmp:
        model, params = _unpack(package, trusted_keys, Path(tmp) / "package")
        for rec in turbines:
            ends = tick_ends(len(rec.raw), params)
            if not len(ends):
                short += 1
                continue
            windows = tick_windows([features_of(rec.raw)], params)
            scores = score_windows(model, windows, params)
            for i, end in enumerate(ends):
                flags = scores[i] > params.thresholds_array
                groups = params.fault_groups
                raised = [int(flags[list(groups[g])].any()) if g in groups else 0 for g in GROUPS]
                ts = "" if rec.ts is None else f"{rec.ts[end - 1]:.0f}"
                writer.writerow(
                    [rec.turbine, int(end), ts, *(f"{s:.6g}" for s in scores[i]), *raised]
                )
                rows += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue().encode())
    return BatchSummary(turbines=len(turbines), rows=rows, too_short=short)


def score_windows(
    model: Path, windows: NDArray[np.float32], params: PreprocessingParams
) -> NDArray[np.float64]:
    """``(ticks, 6)`` device scores of ``(ticks, W, 6, side, side)`` windows, through ONNX
    Runtime (one thread, as the agent runs a session) and ``edgeapp.features.score``."""
    import onnxruntime as ort  # noqa: PLC0415 - heavy; only the scoring steps need it

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scores = np.empty((len(windows), 6))
    for begin in range(0, len(windows), 512):
        chunk = windows[begin : begin + 512]
        flat = np.ascontiguousarray(chunk.reshape(-1, *chunk.shape[-3:]))
        output = session.run(None, {name: flat})[0].reshape(chunk.shape)
        scores[begin : begin + len(chunk)] = score(chunk, output, params).scores
    return scores


def multiply_adds_of(model_path: Path) -> int:
    """Multiply-adds of one sample through the Conv/ConvTranspose/Gemm/MatMul nodes."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes: dict[str, list[int]] = {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shapes[info.name] = [d.dim_value or 1 for d in info.type.tensor_type.shape.dim]
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in weights:
            continue
        size = int(np.prod(weights[node.input[1]]))
        # Conv: every output pixel; ConvTranspose: every input pixel scatters the kernel
        where = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0])
        if where is None:
            raise ValueError(f"{model_path}: no shape for node {node.name}")
        total += int(np.prod(where[2:])) * size
    return total


def time_model(model_path: Path, shape: tuple[int, ...], *, batch: int, repeats: int) -> float:
    """Median microseconds per window of ONNX Runtime (one thread, in process)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x: NDArray[np.float32] = np.random.default_rng(0).standard_normal(
        (batch, *shape), dtype=np.float32
    )
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - started)
    return float(np.median(times)) / batch * 1e6


def package_model(
    package: Path, trusted_keys: Path, into: Path
) -> tuple[Path, PreprocessingParams]:
    """Verify and unpack ``package`` into ``into``; its model file and preprocessing."""
    return _unpack(package, trusted_keys, into)
