"""The agent's core: the seven operations of the Edge Agent API, transport-free.

Requests arrive here as plain Python values (``InputTensor``, ``CaptureRequest``);
protobuf never gets past ``edgeagent.grpc_server``. Every failure is an
``AgentError`` subclass the adapter maps to a status code.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from numpy.typing import NDArray

from edgeagent import shm
from edgeagent.capture import (
    AuxiliaryData,
    CapturedTensor,
    CaptureRequest,
    CaptureSink,
    CaptureStatus,
    StatusBook,
    validate_capture_id,
    validate_timestamp,
)
from edgeagent.errors import (
    AgentError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from edgeagent.package import PackageError, load_verified_package
from edgeagent.registry import LoadedModel, ModelRegistry, resolve_package_dir, validate_alias
from edgeagent.runtime import ModelRuntime, RuntimeOptions
from edgeagent.tensors import ModelInfo, TensorSpec

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    segment_id: int
    offset: int
    size: int  # 0: as many bytes as the declared shape needs


@dataclass(frozen=True, slots=True)
class InputTensor:
    """A Predict input as the client declared it."""

    name: str
    dtype: str | None  # None: a wire data type we do not know
    shape: tuple[int, ...]
    data: bytes | SharedMemoryRef


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


class PackageLoader:
    """Finds, verifies and warms up a package: everything about files on disk."""

    def __init__(
        self,
        *,
        trusted_keys: Sequence[Ed25519PublicKey],
        require_signature: bool,
        runtime_options: RuntimeOptions,
        golden_check: bool,
    ) -> None:
        self._trusted_keys = list(trusted_keys)
        self._require_signature = require_signature
        self._options = runtime_options
        self._golden_check = golden_check

    def __call__(self, name: str, url: str) -> LoadedModel:
        try:
            return self._load(name, url)
        except OSError as exc:
            # the package's files cannot be read: a name too long, permissions, I/O errors
            cls = (
                InvalidArgumentError if exc.errno == errno.ENAMETOOLONG else FailedPreconditionError
            )
            raise cls(f"cannot read the package at {url[:200]!r}: {exc.strerror or exc}") from None

    def _load(self, name: str, url: str) -> LoadedModel:
        package_dir = resolve_package_dir(url)
        # every file is read once and hashed; the session and the golden check
        # are built from those bytes, never from the paths again
        package = load_verified_package(
            package_dir, trusted_keys=self._trusted_keys, require_signature=self._require_signature
        )
        manifest = package.manifest
        inputs = manifest.input_specs()
        outputs = manifest.output_specs()
        runtime = ModelRuntime(
            package.model_bytes,
            inputs=inputs,
            outputs=outputs,
            options=self._options,
            name=manifest.model_file,
        )
        if self._golden_check:
            golden_input, expected = package.golden_arrays()
            runtime.golden_check(
                golden_input, expected, rtol=manifest.golden.rtol, atol=manifest.golden.atol
            )
        else:  # still warm up, so the first real Predict is not the slow one
            runtime.run({inputs[0].name: _zeros_like(inputs[0])})
        return LoadedModel(
            info=ModelInfo(name=name, url=url, inputs=inputs, outputs=outputs),
            manifest=manifest,
            runtime=runtime,
            package_dir=package_dir,
            loaded_at=time.time(),
        )


def _zeros_like(spec: TensorSpec) -> NDArray[np.generic]:
    return np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.dtype)


class AgentService:
    """Predict, load, unload, list, describe, capture."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        capture_sink: CaptureSink,
        capture_statuses: StatusBook,
        max_batch: int,
    ) -> None:
        self._registry = registry
        self._sink = capture_sink
        self._statuses = capture_statuses
        self._max_batch = max_batch
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    # -- control ---------------------------------------------------------
    def load_model(self, name: str, url: str) -> ModelInfo:
        try:
            model, _previous = self._registry.load(name, url)
        except PackageError:
            self._count("load_failed")
            raise
        except FailedPreconditionError:
            self._count("load_failed")
            raise
        self._count("loads")
        return model.info

    def unload_model(self, name: str) -> None:
        validate_alias(name)
        self._registry.unload(name)
        self._count("unloads")

    def list_models(self) -> list[ModelInfo]:
        return [m.info for m in self._registry.loaded()]

    def describe_model(self, name: str) -> ModelInfo:
        return self._registry.get(name).info

    def model_version(self, name: str) -> str:
        return self._registry.get(name).manifest.version

    def counters(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    # -- inference -------------------------------------------------------
    def predict(self, name: str, tensors: Sequence[InputTensor]) -> list[OutputTensor]:
        try:
            model = self._registry.get(name)
            feeds = self._feeds(model, tensors)
            results = model.runtime.run(feeds)
        except AgentError as exc:
            self._count(f"predict_error:{type(exc).__name__}")
            raise
        self._count("predictions")
        return [
            OutputTensor(
                name=spec.name,
                dtype=spec.dtype,
                shape=arr.shape,
                data=_le_bytes(arr),
            )
            for spec, arr in zip(model.info.outputs, results, strict=True)
        ]

    def _feeds(
        self, model: LoadedModel, tensors: Sequence[InputTensor]
    ) -> dict[str, NDArray[np.generic]]:
        specs = model.info.inputs
        if len(tensors) != len(specs):
            raise InvalidArgumentError(
                f"model {model.info.name!r} takes {len(specs)} input tensor(s), got {len(tensors)}"
            )
        by_name = {s.name: s for s in specs}
        feeds: dict[str, NDArray[np.generic]] = {}
        for position, tensor in enumerate(tensors):
            spec = by_name.get(tensor.name) if tensor.name else specs[position]
            if spec is None:
                raise InvalidArgumentError(
                    f"model {model.info.name!r} has no input named {tensor.name!r} "
                    f"(inputs: {', '.join(by_name)})"
                )
            if spec.name in feeds:
                raise InvalidArgumentError(f"input {spec.name!r} given twice")
            feeds[spec.name] = self._array(spec, tensor)
        return feeds

    def _array(self, spec: TensorSpec, tensor: InputTensor) -> NDArray[np.generic]:
        if tensor.dtype != spec.dtype:
            raise InvalidArgumentError(
                f"input {spec.name!r} is {spec.dtype.upper()}, got "
                f"{tensor.dtype.upper() if tensor.dtype else 'an unknown data type'}"
            )
        declared = tensor.shape
        if len(declared) != len(spec.shape):
            raise InvalidArgumentError(
                f"input {spec.name!r} has rank {len(spec.shape)} {list(spec.shape)}, "
                f"got rank {len(declared)} {list(declared)}"
            )
        dynamic = [i for i, d in enumerate(declared) if d == -1]
        for i, (got, want) in enumerate(zip(declared, spec.shape, strict=True)):
            if got == -1:
                if want != -1:
                    raise InvalidArgumentError(
                        f"input {spec.name!r}: dimension {i} is fixed at {want}, not dynamic"
                    )
            elif got <= 0 or want not in (-1, got):
                raise InvalidArgumentError(
                    f"input {spec.name!r}: dimension {i} is {got}, the model needs "
                    f"{'a positive size' if want == -1 else want} (shape {list(spec.shape)})"
                )
        if len(dynamic) > 1:
            raise InvalidArgumentError(f"input {spec.name!r}: at most one dimension may be -1")
        itemsize = spec.itemsize
        fixed = math.prod(d for d in declared if d != -1)
        needed = None if dynamic else fixed * itemsize

        data = tensor.data
        if isinstance(data, SharedMemoryRef):
            size = data.size
            if size == 0:
                size = (
                    needed
                    if needed is not None
                    else shm.segment_size(data.segment_id) - data.offset
                )
            if needed is not None and size != needed:
                raise InvalidArgumentError(
                    f"input {spec.name!r}: shape {list(declared)} needs {needed} bytes, "
                    f"shared memory handle says {size}"
                )
            if size > self._max_batch * fixed * itemsize and dynamic:
                # a size beyond the segment is a bad handle, not a big batch
                shm.check_bounds(data.segment_id, data.offset, size)
                raise ResourceExhaustedError(
                    f"input {spec.name!r}: batch larger than the limit of {self._max_batch}"
                )
            raw = shm.read_segment(data.segment_id, data.offset, size)
        else:
            raw = data
        nbytes = len(raw)
        if nbytes % itemsize:
            raise InvalidArgumentError(
                f"input {spec.name!r}: {nbytes} bytes is not a whole number of "
                f"{spec.dtype} elements"
            )
        shape = list(declared)
        if dynamic:
            row = fixed * itemsize
            if nbytes == 0 or nbytes % row:
                raise InvalidArgumentError(
                    f"input {spec.name!r}: {nbytes} bytes is not a whole number of rows of "
                    f"{row} bytes for shape {list(declared)}"
                )
            shape[dynamic[0]] = nbytes // row
        elif nbytes != needed:
            raise InvalidArgumentError(
                f"input {spec.name!r}: shape {list(declared)} needs {needed} bytes, got {nbytes}"
            )
        if spec.shape and spec.shape[0] == -1 and shape[0] > self._max_batch:
            raise ResourceExhaustedError(
                f"input {spec.name!r}: batch {shape[0]} is larger than the limit of "
                f"{self._max_batch}"
            )
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    # -- capture ---------------------------------------------------------
    def capture_data(
        self,
        *,
        model_name: str,
        capture_id: str,
        inference_time: float | None,
        input_tensors: Sequence[InputTensor],
        output_tensors: Sequence[InputTensor],
        inputs: Sequence[AuxiliaryData],
        outputs: Sequence[AuxiliaryData],
    ) -> None:
        validate_capture_id(capture_id)
        model = self._registry.get(model_name)
        ts = time.time() if inference_time is None else inference_time
        validate_timestamp(ts)
        request = CaptureRequest(
            model_name=model_name,
            model_version=model.manifest.version,
            capture_id=capture_id,
            inference_time=ts,
            input_tensors=tuple(_captured(t, "input", i) for i, t in enumerate(input_tensors)),
            output_tensors=tuple(_captured(t, "output", i) for i, t in enumerate(output_tensors)),
            inputs=tuple(inputs),
            outputs=tuple(outputs),
        )
        self._statuses.claim(capture_id)
        try:
            self._sink.put(request)
        except AgentError:  # refused (full, disk full, unrenderable): never acknowledged
            self._statuses.set(capture_id, CaptureStatus.FAILURE)
            self._count("captures_dropped")
            raise
        self._count("captures")

    def capture_status(self, capture_id: str) -> CaptureStatus:
        validate_capture_id(capture_id)
        return self._statuses.get(capture_id)

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1


def _captured(tensor: InputTensor, kind: str, index: int) -> CapturedTensor:
    """A capture tensor by value (shared memory is copied now, not later).

    Device applications capture the input they sent to Predict, whose metadata
    they copied from ListModels: a batch of -1 is taken from the byte count,
    as Predict does, and the record gets the real shape.
    """
    if tensor.dtype is None:
        raise InvalidArgumentError(f"capture {kind} tensor {index}: unknown data type")
    dynamic = [i for i, d in enumerate(tensor.shape) if d == -1]
    if len(dynamic) > 1 or any(d <= 0 for d in tensor.shape if d != -1):
        raise InvalidArgumentError(
            f"capture {kind} tensor {index}: shape {list(tensor.shape)} must have positive "
            "dimensions and at most one -1"
        )
    itemsize = int(np.dtype(tensor.dtype).itemsize)
    row = math.prod(d for d in tensor.shape if d != -1) * itemsize
    data = tensor.data
    if isinstance(data, SharedMemoryRef):
        size = data.size
        if size == 0:
            size = shm.segment_size(data.segment_id) - data.offset if dynamic else row
        raw = shm.read_segment(data.segment_id, data.offset, size)
    else:
        raw = data
    shape = list(tensor.shape)
    if dynamic:
        if not raw or len(raw) % row:
            raise InvalidArgumentError(
                f"capture {kind} tensor {index}: {len(raw)} bytes is not a whole number of "
                f"rows of {row} bytes for shape {list(tensor.shape)}"
            )
        shape[dynamic[0]] = len(raw) // row
    elif len(raw) != row:
        raise InvalidArgumentError(
            f"capture {kind} tensor {index}: shape {list(tensor.shape)} needs {row} bytes, "
            f"got {len(raw)}"
        )
    name = tensor.name or f"{kind}{index}"
    return CapturedTensor(name=name, dtype=tensor.dtype, shape=tuple(shape), data=raw)


def _le_bytes(arr: NDArray[np.generic]) -> bytes:
    """Little-endian bytes in C order (``tobytes`` always writes C order)."""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def default_state_path(state_dir: Path) -> Path:
    return state_dir
