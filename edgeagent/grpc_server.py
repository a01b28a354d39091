"""The gRPC adapter: protobuf in, plain values to ``AgentService``, protobuf out.

Nothing here decides anything: it converts, calls the service and maps
``AgentError`` subclasses to status codes through ``errors.STATUS_OF``. Unexpected
exceptions become INTERNAL with a generic message (logged with the trace,
never sent to the client). The transport underneath is ``edgeagent.wire``.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import math
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from edgeagent import errors
from edgeagent._proto import agent_pb2 as pb
from edgeagent.capture import AuxEncoding, AuxiliaryData
from edgeagent.health import HealthState
from edgeagent.service import AgentService, InputTensor, SharedMemoryRef
from edgeagent.tensors import DTYPE_TO_WIRE, ITEMSIZE, WIRE_DTYPES, ModelInfo, TensorSpec
from edgeagent.wire import h2
from edgeagent.wire.h2 import Status
from edgeagent.wire.server import Method, RpcError, Server

log = structlog.get_logger(__name__)

SERVICE_NAME = "AWS.SageMaker.Edge.Agent"

Resp = TypeVar("Resp")


def _guard(method: str, call: Callable[[], Resp]) -> Resp:
    try:
        return call()
    except errors.AgentError as exc:
        raise RpcError(errors.status_of(exc), str(exc)) from None
    except Exception:
        log.exception("internal error", method=method)
        raise RpcError(
            Status.INTERNAL, f"internal error in {method}; see the agent's log"
        ) from None


# -- conversions ------------------------------------------------------------
def _metadata(spec: TensorSpec) -> pb.TensorMetadata:
    return pb.TensorMetadata(
        name=spec.name,
        data_type=pb.DataType.ValueType(DTYPE_TO_WIRE[spec.dtype]),
        shape=list(spec.shape),
    )


def _model(info: ModelInfo) -> pb.Model:
    return pb.Model(
        url=info.url,
        name=info.name,
        input_tensor_metadatas=[_metadata(s) for s in info.inputs],
        output_tensor_metadatas=[_metadata(s) for s in info.outputs],
    )


def _input(tensor: pb.Tensor) -> InputTensor:
    md = tensor.tensor_metadata
    kind = tensor.WhichOneof("data")
    if kind == "shared_memory_handle":
        h = tensor.shared_memory_handle
        data: bytes | SharedMemoryRef = SharedMemoryRef(
            segment_id=h.segment_id, offset=h.offset, size=h.size
        )
    elif kind == "byte_data":
        data = tensor.byte_data
    else:
        data = b""
    return InputTensor(
        name=md.name, dtype=WIRE_DTYPES.get(md.data_type), shape=tuple(md.shape), data=data
    )


def _aux(item: pb.AuxilaryData) -> AuxiliaryData:
    if item.WhichOneof("data") == "shared_memory_handle":
        raise errors.InvalidArgumentError(
            f"auxiliary data {item.name!r}: shared memory is not supported for auxiliary data"
        )
    try:
        encoding = AuxEncoding(item.encoding)
    except ValueError:
        raise errors.InvalidArgumentError(
            f"auxiliary data {item.name!r}: unknown encoding {item.encoding}"
        ) from None
    return AuxiliaryData(name=item.name, encoding=encoding, data=item.byte_data)


class AgentServicer:
    """Wire adapter for ``AgentService``."""

    def __init__(self, service: AgentService) -> None:
        self._service = service

    def Predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        def call() -> pb.PredictResponse:
            outputs = self._service.predict(request.name, [_input(t) for t in request.tensors])
            return pb.PredictResponse(
                tensors=[
                    pb.Tensor(
                        tensor_metadata=pb.TensorMetadata(
                            name=o.name,
                            data_type=pb.DataType.ValueType(DTYPE_TO_WIRE[o.dtype]),
                            shape=list(o.shape),
                        ),
                        byte_data=o.data,
                    )
                    for o in outputs
                ]
            )

        return _guard("Predict", call)

    def LoadModel(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        return _guard(
            "LoadModel",
            lambda: pb.LoadModelResponse(
                model=_model(self._service.load_model(request.name, request.url))
            ),
        )

    def UnLoadModel(self, request: pb.UnLoadModelRequest) -> pb.UnLoadModelResponse:
        def call() -> pb.UnLoadModelResponse:
            self._service.unload_model(request.name)
            return pb.UnLoadModelResponse()

        return _guard("UnLoadModel", call)

    def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return _guard(
            "ListModels",
            lambda: pb.ListModelsResponse(models=[_model(m) for m in self._service.list_models()]),
        )

    def DescribeModel(self, request: pb.DescribeModelRequest) -> pb.DescribeModelResponse:
        return _guard(
            "DescribeModel",
            lambda: pb.DescribeModelResponse(
                model=_model(self._service.describe_model(request.name))
            ),
        )

    def CaptureData(self, request: pb.CaptureDataRequest) -> pb.CaptureDataResponse:
        def call() -> pb.CaptureDataResponse:
            ts = (
                request.inference_timestamp.seconds + request.inference_timestamp.nanos / 1e9
                if request.HasField("inference_timestamp")
                else None
            )
            self._service.capture_data(
                model_name=request.model_name,
                capture_id=request.capture_id,
                inference_time=ts,
                input_tensors=[_input(t) for t in request.input_tensors],
                output_tensors=[_input(t) for t in request.output_tensors],
                inputs=[_aux(a) for a in request.inputs],
                outputs=[_aux(a) for a in request.outputs],
            )
            return pb.CaptureDataResponse()

        return _guard("CaptureData", call)

    def GetCaptureDataStatus(
        self, request: pb.GetCaptureDataStatusRequest
    ) -> pb.GetCaptureDataStatusResponse:
        return _guard(
            "GetCaptureDataStatus",
            lambda: pb.GetCaptureDataStatusResponse(
                status=pb.CaptureDataStatus.ValueType(
                    self._service.capture_status(request.capture_id)
                )
            ),
        )


class SocketInUseError(RuntimeError):
    """Another agent is serving on the socket path."""


def prepare_socket_path(path: Path) -> None:
    """Make ``path`` free to bind: replace a stale socket, refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketInUseError(f"cannot probe {path}: {exc}") from exc
        log.info("replacing stale socket", socket=str(path))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise SocketInUseError(f"another agent is already serving on {path}")


Req = TypeVar("Req")


INLINE_MAX_BYTES = 8 * 1024
"""A Predict whose tensors hold at most this much (byte_data, or shared memory of a
known size) runs on the connection's reader thread (see ``edgeagent.wire.server``):
for the wind-turbine model that is up to three windows, ~1 ms of inference, and the
hand-off it saves is ~50 us."""


def _always(_request: object) -> bool:
    return True


def _small_predict(request: pb.PredictRequest) -> bool:
    """A Predict small enough to run without a hand-off. For shared memory the request
    says nothing about the batch unless the handle has a size or the shape no -1."""
    size = 0
    for t in request.tensors:
        if t.WhichOneof("data") != "shared_memory_handle":
            size += len(t.byte_data)
            continue
        if t.shared_memory_handle.size:
            size += t.shared_memory_handle.size
            continue
        shape = t.tensor_metadata.shape
        dtype = WIRE_DTYPES.get(t.tensor_metadata.data_type)
        if dtype is None or any(d < 1 for d in shape):
            return False  # unknown: the segment decides, so do not guess
        size += math.prod(shape) * ITEMSIZE[dtype]
    return size <= INLINE_MAX_BYTES


def _parser(parse: Callable[[bytes], Req]) -> Callable[[bytes], Req]:
    def call(raw: bytes) -> Req:
        try:
            return parse(raw)
        except DecodeError:
            raise RpcError(Status.INVALID_ARGUMENT, "the request is not valid protobuf") from None

    return call


def _unary(
    parse: Callable[[bytes], Req],
    handler: Callable[[Req], h2.Message],
    *,
    inline: Callable[[Req], bool] | None = None,
) -> Method:
    return Method(
        parse=_parser(parse),
        unary=lambda request: handler(request).SerializeToString(),
        inline=inline,
    )


def agent_methods(servicer: AgentServicer) -> dict[str, Method]:
    """The seven RPCs of AGENT_API.md by their wire paths."""
    prefix = f"/{SERVICE_NAME}/"
    return {
        prefix + "Predict": _unary(
            pb.PredictRequest.FromString, servicer.Predict, inline=_small_predict
        ),
        prefix + "LoadModel": _unary(pb.LoadModelRequest.FromString, servicer.LoadModel),
        prefix + "UnLoadModel": _unary(pb.UnLoadModelRequest.FromString, servicer.UnLoadModel),
        prefix + "ListModels": _unary(
            pb.ListModelsRequest.FromString, servicer.ListModels, inline=_always
        ),
        prefix + "DescribeModel": _unary(
            pb.DescribeModelRequest.FromString, servicer.DescribeModel, inline=_always
        ),
        prefix + "CaptureData": _unary(pb.CaptureDataRequest.FromString, servicer.CaptureData),
        prefix + "GetCaptureDataStatus": _unary(
            pb.GetCaptureDataStatusRequest.FromString, servicer.GetCaptureDataStatus, inline=_always
        ),
    }


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """What the transport allows a client (see ``edgeagent.wire.server.Server``)."""

    max_connections: int = 256
    handshake_timeout: float = 5.0
    send_stall: float = 10.0
    connection_workers: int | None = None


def build_server(
    service: AgentService,
    *,
    socket_path: Path,
    workers: int,
    max_message_bytes: int,
    socket_group: str | None = None,
    limits: TransportLimits | None = None,
) -> tuple[Server, HealthState]:
    """A started server on the Unix socket (0660), with the health service."""
    prepare_socket_path(socket_path)
    health = HealthState()
    limits = limits or TransportLimits()
    server = Server(
        {**agent_methods(AgentServicer(service)), **health.methods()},
        workers=workers,
        max_message_bytes=max_message_bytes,
        max_concurrent_streams=workers * 16,
        max_connections=limits.max_connections,
        handshake_timeout=limits.handshake_timeout,
        send_stall=limits.send_stall,
        connection_workers=limits.connection_workers,
    )
    server.bind(socket_path, mode=0o660)
    if socket_group:
        try:
            os.chown(socket_path, -1, grp.getgrnam(socket_group).gr_gid)
        except (KeyError, PermissionError) as exc:
            log.warning("cannot give the socket to its group", group=socket_group, error=str(exc))
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, health
