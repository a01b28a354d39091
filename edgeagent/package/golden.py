"""The golden check: run a package's model on its golden input, compare.

The build computes ``golden/expected.npy`` here, and the agent (or an
operator, ``edgectl package verify --golden``) re-runs it on the device. The
session is single-threaded and without graph optimisations beyond the
default, so a build gives the same expected bytes every time on one machine.

Everything here works on bytes already verified (see
:func:`edgeagent.package.verify.load_verified_package`); a model given as a
path is only the build's. ONNX Runtime's errors never leave this module raw:
a model it cannot load is :class:`ModelLoadError`, one that fails to run on the
golden input is :class:`GoldenCheckError`.
"""

from __future__ import annotations

import importlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgeagent.package.errors import GoldenCheckError, ModelLoadError, PackageInvalidError
from edgeagent.package.manifest import Manifest, TensorEntry
from edgeagent.tensors import ORT_DTYPES, TensorSpec

MAX_GOLDEN_BYTES = 64 * 1024 * 1024


def _onnxruntime() -> Any:
    # onnxruntime ships no type information; the module is used through this
    # one function and its results are converted to typed values right away
    return importlib.import_module("onnxruntime")


def ort_errors(ort: Any) -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises: its own classes derive from Exception, not RuntimeError."""
    state = ort.capi.onnxruntime_pybind11_state
    own = tuple(
        obj
        for obj in vars(state).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == state.__name__
    )
    return (RuntimeError, ValueError, OSError, *own)


def _session(model: Path | bytes, name: str = "model.onnx") -> Any:
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    label = name if isinstance(model, bytes) else Path(model).name
    try:
        return ort.InferenceSession(
            source, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except ort_errors(ort) as exc:
        raise ModelLoadError(f"ONNX Runtime cannot load {label}: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:500]


def _spec_of(node: Any) -> TensorSpec:
    dtype = ORT_DTYPES.get(str(node.type))
    if dtype is None:
        raise PackageInvalidError(f"tensor {node.name!r} has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape)
    return TensorSpec(name=str(node.name), dtype=dtype, shape=shape)


def model_specs(model_path: str | os.PathLike[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX model as ONNX Runtime loads it (-1 = dynamic)."""
    session = _session(Path(model_path))
    return (
        [_spec_of(n) for n in session.get_inputs()],
        [_spec_of(n) for n in session.get_outputs()],
    )


def run_model(model: str | os.PathLike[str] | bytes, golden_input: NDArray[Any]) -> NDArray[Any]:
    """First output of a single-input ONNX model on ``golden_input`` (1-thread CPU session).

    ``model``: the model's path, or its (verified) bytes.
    """
    session = _session(model if isinstance(model, bytes) else Path(model))
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise PackageInvalidError(f"the golden check needs a single-input model, not {len(inputs)}")
    try:
        result = session.run(None, {inputs[0].name: golden_input})
    except ort_errors(_onnxruntime()) as exc:
        raise GoldenCheckError(
            f"golden check: ONNX Runtime cannot run the model: {_one_line(exc)}"
        ) from None
    return np.asarray(result[0])


def shape_fits(spec_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """True when ``shape`` is an instance of ``spec_shape`` (-1 matches any size)."""
    return len(spec_shape) == len(shape) and all(
        s in (-1, d) for s, d in zip(spec_shape, shape, strict=True)
    )


def check_array(what: str, array: NDArray[Any], entry: TensorEntry) -> None:
    """``array`` has the dtype and a shape allowed by the manifest's tensor entry."""
    if array.dtype != np.dtype(entry.dtype):
        raise PackageInvalidError(
            f"{what} is {array.dtype}, tensor {entry.name!r} is {entry.dtype}"
        )
    if not shape_fits(entry.shape, tuple(array.shape)):
        raise PackageInvalidError(
            f"{what} has shape {list(array.shape)}, tensor {entry.name!r} is {list(entry.shape)}"
        )


def npy_bytes(array: NDArray[Any]) -> bytes:
    """The .npy encoding of ``array`` (C order, little-endian, no pickle)."""
    buf = io.BytesIO()
    little_endian = array.astype(array.dtype.newbyteorder("<"))
    np.save(buf, np.ascontiguousarray(little_endian), allow_pickle=False)
    return buf.getvalue()


def load_npy_bytes(data: bytes, name: str) -> NDArray[Any]:
    """Parse a .npy file's bytes without pickle; PackageInvalidError if it is not one."""
    if len(data) > MAX_GOLDEN_BYTES:
        raise PackageInvalidError(f"{name} is larger than {MAX_GOLDEN_BYTES} bytes")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PackageInvalidError(f"{name} is not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise PackageInvalidError(f"{name} is not a single .npy array")
    return array


def golden_arrays(
    manifest: Manifest, input_bytes: bytes, expected_bytes: bytes
) -> tuple[NDArray[Any], NDArray[Any]]:
    """The golden input and expected output, checked against the manifest's tensors."""
    if len(manifest.inputs) != 1:
        raise PackageInvalidError("the golden check needs a single-input model")
    golden_input = load_npy_bytes(input_bytes, manifest.golden.input)
    expected = load_npy_bytes(expected_bytes, manifest.golden.expected)
    check_array("golden input", golden_input, manifest.inputs[0])
    check_array("golden expected output", expected, manifest.outputs[0])
    return golden_input, expected


def compare_golden(actual: NDArray[Any], expected: NDArray[Any], manifest: Manifest) -> float:
    """The largest absolute difference; GoldenCheckError beyond the manifest's tolerances."""
    if actual.shape != expected.shape:
        raise GoldenCheckError(
            f"golden check: output shape {list(actual.shape)}, expected {list(expected.shape)}"
        )
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if actual.size else 0.0
    tol = manifest.golden
    if not np.allclose(actual, expected, rtol=tol.rtol, atol=tol.atol):
        raise GoldenCheckError(
            f"golden check failed: max abs difference {diff:.3g} "
            f"(rtol {tol.rtol:g}, atol {tol.atol:g})"
        )
    return diff
