"""The golden check: run a package's model on its golden input, compare.

The build computes ``golden/expected.npy`` here, and the agent (or an
operator, ``edgectl package verify --golden``) re-runs it on the device. The
session is single-threaded and without graph optimisations beyond the
default, so a build gives the same expected bytes every time on one machine.
"""

from __future__ import annotations

import importlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgeagent.package.errors import GoldenCheckError, PackageInvalidError
from edgeagent.package.manifest import Manifest, TensorEntry
from edgeagent.tensors import ORT_DTYPES, TensorSpec

MAX_GOLDEN_BYTES = 64 * 1024 * 1024


def _onnxruntime() -> Any:
    # onnxruntime ships no type information; the module is used through this
    # one function and its results are converted to typed values right away
    return importlib.import_module("onnxruntime")


def _session(model_path: Path) -> Any:
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


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


def run_model(model_path: str | os.PathLike[str], golden_input: NDArray[Any]) -> NDArray[Any]:
    """First output of a single-input ONNX model on ``golden_input`` (1-thread CPU session)."""
    session = _session(Path(model_path))
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise PackageInvalidError(f"the golden check needs a single-input model, not {len(inputs)}")
    result = session.run(None, {inputs[0].name: golden_input})
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


def load_npy(path: Path) -> NDArray[Any]:
    """Load a .npy file without pickle; PackageInvalidError if it is not one."""
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise PackageInvalidError(f"{path.name} is larger than {MAX_GOLDEN_BYTES} bytes")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PackageInvalidError(f"{path.name} is not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise PackageInvalidError(f"{path.name} is not a single .npy array")
    return array


def load_golden(
    package_dir: str | os.PathLike[str], manifest: Manifest
) -> tuple[NDArray[Any], NDArray[Any]]:
    """The golden input and expected output, checked against the manifest's tensors."""
    root = Path(package_dir)
    if len(manifest.inputs) != 1:
        raise PackageInvalidError("the golden check needs a single-input model")
    golden_input = load_npy(root.joinpath(*manifest.golden.input.split("/")))
    expected = load_npy(root.joinpath(*manifest.golden.expected.split("/")))
    check_array("golden input", golden_input, manifest.inputs[0])
    check_array("golden expected output", expected, manifest.outputs[0])
    return golden_input, expected


def check_golden(package_dir: str | os.PathLike[str], manifest: Manifest) -> float:
    """Run the golden check of an (already verified) package directory.

    Returns the largest absolute difference; raises GoldenCheckError when the
    output is not ``allclose`` to the expected one within the manifest's
    tolerances, PackageInvalidError when the golden files do not fit.
    """
    root = Path(package_dir)
    golden_input, expected = load_golden(root, manifest)
    actual = run_model(root.joinpath(*manifest.model_file.split("/")), golden_input)
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
