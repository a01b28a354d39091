"""The typed client of the Edge Agent API: what every other windedge process uses.

It speaks the same wire contract as any SageMaker Edge Agent client (gRPC on
``unix://<socket>``, through ``edgeagent.wire``, which costs a fraction of
grpcio's per-call CPU), raises the agent's own exception classes, and returns
plain values (NumPy arrays, ``ModelInfo``) so protobuf never leaks into
callers.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import sysv_ipc
from grpc_health.v1 import health_pb2
from numpy.typing import NDArray

from edgeagent import errors
from edgeagent._proto import agent_pb2 as pb
from edgeagent.capture import AuxEncoding, CaptureStatus
from edgeagent.tensors import WIRE_DTYPES, ModelInfo, TensorSpec
from edgeagent.wire import h2
from edgeagent.wire.client import CallError, Channel

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVICE = "/AWS.SageMaker.Edge.Agent/"


def error_from_call(exc: CallError) -> errors.AgentError:
    """The agent error class for a failed call, with the agent's message."""
    return errors.error_of(exc.code, exc.message)


def _spec(md: pb.TensorMetadata) -> TensorSpec:
    return TensorSpec(
        name=md.name, dtype=WIRE_DTYPES.get(md.data_type, "float32"), shape=tuple(md.shape)
    )


def _info(model: pb.Model) -> ModelInfo:
    return ModelInfo(
        name=model.name,
        url=model.url,
        inputs=tuple(_spec(m) for m in model.input_tensor_metadatas),
        outputs=tuple(_spec(m) for m in model.output_tensor_metadatas),
    )


# little-endian dtype -> wire number, and back: lookups instead of dtype-name strings
_WIRE_OF: dict[np.dtype[np.generic], int] = {
    np.dtype(name).newbyteorder("<"): number for number, name in WIRE_DTYPES.items()
}
_DTYPE_OF: dict[int, np.dtype[np.generic]] = {number: dt for dt, number in _WIRE_OF.items()}


def _wire_bytes(array: NDArray[np.generic]) -> tuple[int, bytes]:
    """The wire dtype number and little-endian C-order bytes of ``array``."""
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    number = _WIRE_OF.get(little)
    if number is None:
        raise errors.InvalidArgumentError(f"dtype {array.dtype} cannot travel to the agent")
    if little is not array.dtype:
        array = array.astype(little)
    return number, array.tobytes()  # C order, whatever the array's layout


def _tensor_proto(name: str, array: NDArray[np.generic], shape: Sequence[int] | None) -> pb.Tensor:
    number, data = _wire_bytes(array)
    return pb.Tensor(
        tensor_metadata=pb.TensorMetadata(
            name=name,
            data_type=pb.DataType.ValueType(number),
            shape=list(shape or array.shape),
        ),
        byte_data=data,
    )


Resp = TypeVar("Resp")


class AgentClient:
    """A connection to one agent. Thread-safe; use as a context manager or call ``close``."""

    def __init__(
        self,
        socket_path: str | Path,
        *,
        timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._channel = Channel(self.socket_path, max_message_bytes=max_message_bytes)

    def _call(
        self,
        method: str,
        request: h2.Message,
        parse: Callable[[bytes], Resp],
        timeout: float | None = None,
    ) -> Resp:
        try:
            raw = self._channel.unary(
                method, request.SerializeToString(), timeout=timeout or self.timeout
            )
        except CallError as exc:
            raise error_from_call(exc) from None
        return parse(cast(bytes, raw))  # a view, not a copy: protobuf parses any buffer

    def close(self) -> None:
        """Close the connections; calls in flight on other threads end at once (CANCELLED,
        raised as UnavailableError), later calls fail without touching the socket."""
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    # -- control ---------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        resp = self._call(
            SERVICE + "ListModels", pb.ListModelsRequest(), pb.ListModelsResponse.FromString
        )
        return [_info(m) for m in resp.models]

    def describe_model(self, name: str) -> ModelInfo:
        resp = self._call(
            SERVICE + "DescribeModel",
            pb.DescribeModelRequest(name=name),
            pb.DescribeModelResponse.FromString,
        )
        return _info(resp.model)

    def load_model(self, name: str, url: str | Path, *, timeout: float | None = None) -> ModelInfo:
        resp = self._call(
            SERVICE + "LoadModel",
            pb.LoadModelRequest(name=name, url=str(url)),
            pb.LoadModelResponse.FromString,
            timeout=timeout or max(self.timeout, 120),
        )
        return _info(resp.model)

    def unload_model(self, name: str) -> None:
        self._call(
            SERVICE + "UnLoadModel",
            pb.UnLoadModelRequest(name=name),
            pb.UnLoadModelResponse.FromString,
        )

    def health(self, service: str = "") -> bool:
        """True when the agent answers SERVING."""
        try:
            resp = self._call(
                "/grpc.health.v1.Health/Check",
                health_pb2.HealthCheckRequest(service=service),
                health_pb2.HealthCheckResponse.FromString,
            )
        except errors.AgentError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the agent answers health checks, or raise UnavailableError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health():
                return
            time.sleep(0.05)
        raise errors.UnavailableError(f"no agent answering on {self.socket_path} after {timeout}s")

    # -- inference -------------------------------------------------------
    def predict(
        self,
        name: str,
        array: NDArray[np.generic],
        *,
        input_name: str = "",
        shared_memory: bool = False,
    ) -> NDArray[np.generic]:
        """Run one input through model ``name``; returns its first output."""
        return self.predict_many(name, {input_name: array}, shared_memory=shared_memory)[0]

    def predict_many(
        self,
        name: str,
        inputs: dict[str, NDArray[np.generic]],
        *,
        shared_memory: bool = False,
    ) -> list[NDArray[np.generic]]:
        segments: list[sysv_ipc.SharedMemory] = []
        try:
            if shared_memory:
                tensors = []
                for tname, arr in inputs.items():
                    seg, tensor = _shm_tensor(tname, arr)
                    segments.append(seg)
                    tensors.append(tensor)
            else:
                tensors = [_tensor_proto(n, a, None) for n, a in inputs.items()]
            resp = self._call(
                SERVICE + "Predict",
                pb.PredictRequest(name=name, tensors=tensors),
                pb.PredictResponse.FromString,
            )
        finally:
            for seg in segments:
                seg.detach()
                seg.remove()
        return [decode_tensor(t) for t in resp.tensors]

    # -- capture ---------------------------------------------------------
    def capture_data(
        self,
        *,
        model_name: str,
        capture_id: str,
        inputs: Sequence[NDArray[np.generic]],
        outputs: Sequence[NDArray[np.generic]],
        inference_time: float | None = None,
        aux_inputs: Sequence[tuple[str, AuxEncoding, bytes]] = (),
        aux_outputs: Sequence[tuple[str, AuxEncoding, bytes]] = (),
    ) -> None:
        ts = time.time() if inference_time is None else inference_time
        request = pb.CaptureDataRequest(
            model_name=model_name,
            capture_id=capture_id,
            inference_timestamp=pb.Timestamp(seconds=int(ts), nanos=int((ts % 1) * 1e9)),
            input_tensors=[_tensor_proto(f"input{i}", a, None) for i, a in enumerate(inputs)],
            output_tensors=[_tensor_proto(f"output{i}", a, None) for i, a in enumerate(outputs)],
            inputs=[
                pb.AuxilaryData(name=n, encoding=pb.Encoding.ValueType(e), byte_data=d)
                for n, e, d in aux_inputs
            ],
            outputs=[
                pb.AuxilaryData(name=n, encoding=pb.Encoding.ValueType(e), byte_data=d)
                for n, e, d in aux_outputs
            ],
        )
        self._call(SERVICE + "CaptureData", request, pb.CaptureDataResponse.FromString)

    def capture_status(self, capture_id: str) -> CaptureStatus:
        resp = self._call(
            SERVICE + "GetCaptureDataStatus",
            pb.GetCaptureDataStatusRequest(capture_id=capture_id),
            pb.GetCaptureDataStatusResponse.FromString,
        )
        return CaptureStatus(resp.status)


def decode_tensor(tensor: pb.Tensor) -> NDArray[np.generic]:
    """A response tensor as an array, shaped by its metadata."""
    md = tensor.tensor_metadata
    dtype = _DTYPE_OF.get(md.data_type, _DTYPE_OF[5])
    return np.frombuffer(tensor.byte_data, dtype=dtype).reshape(tuple(md.shape))


def _shm_tensor(name: str, array: NDArray[np.generic]) -> tuple[sysv_ipc.SharedMemory, pb.Tensor]:
    """A SysV segment holding ``array``, made read-only, as the original clients did."""
    number, data = _wire_bytes(array)
    seg = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=max(len(data), 1))
    seg.write(data)
    seg.mode = 0o400
    tensor = pb.Tensor(
        tensor_metadata=pb.TensorMetadata(
            name=name,
            data_type=pb.DataType.ValueType(number),
            shape=list(array.shape),
        ),
        shared_memory_handle=pb.SharedMemoryHandle(segment_id=seg.id, offset=0, size=0),
    )
    return seg, tensor
