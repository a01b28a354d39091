"""ONNX Runtime sessions for verified packages.

A ``ModelRuntime`` owns one ``InferenceSession``; it knows nothing of gRPC or
of the registry. It runs batches in chunks of at most ``chunk`` rows, so the
memory ONNX Runtime needs for activations does not grow with the request's
batch size: its CPU arena (which keeps buffers for reuse, and so avoids a
page fault storm on every run) stays at the size one chunk needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from edgeagent.errors import FailedPreconditionError
from edgeagent.package.golden import ort_errors
from edgeagent.tensors import ORT_DTYPES, TensorSpec
from edgecommon.memory import trim

ORT_ERRORS = ort_errors(ort)


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    chunk: int = 16
    memory_arena: bool = True


class ModelRuntime:
    """One model, one ONNX Runtime session; thread-safe ``run``.

    ``model`` is the model's verified bytes (the agent never lets ONNX Runtime
    open a package file by path: the bytes that were hashed are the bytes that
    run), or a path for tools that have no package.
    """

    def __init__(
        self,
        model: Path | bytes,
        *,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        options: RuntimeOptions,
        name: str = "model.onnx",
    ) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_cpu_mem_arena = options.memory_arena
        so.enable_mem_pattern = options.memory_arena
        so.log_severity_level = 3
        label = name if isinstance(model, bytes) else model.name
        try:
            self._session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model),
                sess_options=so,
                providers=["CPUExecutionProvider"],
            )
        except ORT_ERRORS as exc:
            raise FailedPreconditionError(f"ONNX Runtime cannot load {label}: {exc}") from exc
        self.inputs = inputs
        self.outputs = outputs
        self._chunk = options.chunk
        self._output_names = [o.name for o in outputs]
        self._check_signature()
        # chunking splits along the first axis: only when every input and
        # output has a dynamic batch dimension
        self._batched = all(t.shape and t.shape[0] == -1 for t in (*inputs, *outputs))

    def _check_signature(self) -> None:
        """The manifest's declared tensors must be the model's real ones."""
        real_in = {i.name: i for i in self._session.get_inputs()}
        real_out = {o.name: o for o in self._session.get_outputs()}
        for declared, real, kind in (
            (self.inputs, real_in, "input"),
            (self.outputs, real_out, "output"),
        ):
            if {t.name for t in declared} != set(real):
                raise FailedPreconditionError(
                    f"manifest {kind}s {sorted(t.name for t in declared)} do not match the "
                    f"model's {sorted(real)}"
                )
            for spec in declared:
                arg = real[spec.name]
                dtype = ORT_DTYPES.get(arg.type)
                if dtype != spec.dtype:
                    raise FailedPreconditionError(
                        f"{kind} {spec.name!r}: manifest says {spec.dtype}, model has {arg.type}"
                    )
                if len(arg.shape) != len(spec.shape):
                    raise FailedPreconditionError(
                        f"{kind} {spec.name!r}: manifest rank {len(spec.shape)}, "
                        f"model rank {len(arg.shape)}"
                    )

    def run(self, feeds: dict[str, NDArray[np.generic]]) -> list[NDArray[np.generic]]:
        """Run the model; large batches run in chunks and are concatenated."""
        batch = next(iter(feeds.values())).shape[0] if feeds else 0
        if not self._batched or batch <= self._chunk:
            return self._run_once(feeds)
        parts: list[list[NDArray[np.generic]]] = []
        for start in range(0, batch, self._chunk):
            stop = start + self._chunk
            parts.append(self._run_once({k: v[start:stop] for k, v in feeds.items()}))
        merged = [np.concatenate([p[i] for p in parts]) for i in range(len(self._output_names))]
        del parts
        trim()  # a large request's buffers go back to the kernel, not the heap
        return merged

    def _run_once(self, feeds: dict[str, NDArray[np.generic]]) -> list[NDArray[np.generic]]:
        try:
            results = self._session.run(self._output_names, feeds)
        except ORT_ERRORS as exc:
            raise FailedPreconditionError(f"inference failed: {exc}") from exc
        return [np.asarray(r) for r in results]

    def golden_check(
        self,
        golden_input: NDArray[np.generic],
        expected: NDArray[np.generic],
        *,
        rtol: float,
        atol: float,
    ) -> None:
        """Run the package's golden input; raise FailedPreconditionError on a mismatch."""
        if not self.inputs or not self.outputs:
            raise FailedPreconditionError("model declares no inputs or outputs")
        out = self.run({self.inputs[0].name: golden_input})[0]
        if out.shape != expected.shape:
            raise FailedPreconditionError(
                f"golden check: output shape {out.shape}, expected {expected.shape}"
            )
        if not np.allclose(out, expected, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(out.astype(np.float64) - expected.astype(np.float64))))
            raise FailedPreconditionError(
                f"golden check failed: max abs difference {worst:.3g} (rtol={rtol}, atol={atol})"
            )
