"""The typed client of the Edge Agent API: what every other windedge process uses.

It speaks the same wire contract as any SageMaker Edge Agent client (a gRPC
channel to ``unix://<socket>``), raises the agent's own exception classes
instead of ``grpc.RpcError``, and returns plain values (NumPy arrays,
``ModelInfo``) so protobuf never leaks into callers.
"""

from __future__ import annotations

import time
import types
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import sysv_ipc
from grpc_health.v1 import health_pb2
from numpy.typing import NDArray

from edgeagent import errors
from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgeagent.capture import AuxEncoding, CaptureStatus
from edgeagent.tensors import DTYPE_TO_WIRE, WIRE_DTYPES, ModelInfo, TensorSpec

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_ERROR_OF: dict[grpc.StatusCode, type[errors.AgentError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRangeError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.UnavailableError,
}


def error_from_rpc(exc: grpc.RpcError) -> errors.AgentError:
    """The agent error class for a failed call, with the agent's message."""
    # a failed call's RpcError is also a grpc.Call (code, details); the stubs
    # cannot express that, so ask for the methods
    code_of = getattr(exc, "code", None)
    details_of = getattr(exc, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    detail = details_of() if callable(details_of) else str(exc)
    cls = _ERROR_OF.get(code, errors.InternalError)
    return cls(detail or code.name)


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


def _tensor_proto(name: str, array: NDArray[np.generic], shape: Sequence[int] | None) -> pb.Tensor:
    dtype = array.dtype.newbyteorder("=").name
    if dtype not in DTYPE_TO_WIRE:
        raise errors.InvalidArgumentError(f"dtype {array.dtype} cannot travel to the agent")
    little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    return pb.Tensor(
        tensor_metadata=pb.TensorMetadata(
            name=name,
            data_type=pb.DataType.ValueType(DTYPE_TO_WIRE[dtype]),
            shape=list(shape or array.shape),
        ),
        byte_data=little.tobytes(),
    )


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
        self._channel = grpc.insecure_channel(
            f"unix://{self.socket_path}",
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.enable_retries", 0),
            ],
        )
        self._stub = pb_grpc.AgentStub(self._channel)
        # the health stub's type information is incomplete; a typed callable instead
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def close(self) -> None:
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
        try:
            resp = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return [_info(m) for m in resp.models]

    def describe_model(self, name: str) -> ModelInfo:
        try:
            resp = self._stub.DescribeModel(
                pb.DescribeModelRequest(name=name), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return _info(resp.model)

    def load_model(self, name: str, url: str | Path, *, timeout: float | None = None) -> ModelInfo:
        try:
            resp = self._stub.LoadModel(
                pb.LoadModelRequest(name=name, url=str(url)),
                timeout=timeout or max(self.timeout, 120),
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return _info(resp.model)

    def unload_model(self, name: str) -> None:
        try:
            self._stub.UnLoadModel(pb.UnLoadModelRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def health(self, service: str = "") -> bool:
        """True when the agent answers SERVING."""
        try:
            resp = self._health_check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
            )
        except grpc.RpcError:
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
            try:
                resp = self._stub.Predict(
                    pb.PredictRequest(name=name, tensors=tensors), timeout=self.timeout
                )
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from None
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
        try:
            self._stub.CaptureData(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def capture_status(self, capture_id: str) -> CaptureStatus:
        try:
            resp = self._stub.GetCaptureDataStatus(
                pb.GetCaptureDataStatusRequest(capture_id=capture_id), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return CaptureStatus(resp.status)


def decode_tensor(tensor: pb.Tensor) -> NDArray[np.generic]:
    """A response tensor as an array, shaped by its metadata."""
    md = tensor.tensor_metadata
    dtype = np.dtype(WIRE_DTYPES.get(md.data_type, "float32")).newbyteorder("<")
    return np.frombuffer(tensor.byte_data, dtype=dtype).reshape(tuple(md.shape))


def _shm_tensor(name: str, array: NDArray[np.generic]) -> tuple[sysv_ipc.SharedMemory, pb.Tensor]:
    """A SysV segment holding ``array``, made read-only, as the original clients did."""
    dtype = array.dtype.newbyteorder("=").name
    if dtype not in DTYPE_TO_WIRE:
        raise errors.InvalidArgumentError(f"dtype {array.dtype} cannot travel to the agent")
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes()
    seg = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=max(len(data), 1))
    seg.write(data)
    seg.mode = 0o400
    tensor = pb.Tensor(
        tensor_metadata=pb.TensorMetadata(
            name=name,
            data_type=pb.DataType.ValueType(DTYPE_TO_WIRE[dtype]),
            shape=list(array.shape),
        ),
        shared_memory_handle=pb.SharedMemoryHandle(segment_id=seg.id, offset=0, size=0),
    )
    return seg, tensor
