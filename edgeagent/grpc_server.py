"""The gRPC adapter: protobuf in, plain values to ``AgentService``, protobuf out.

Nothing here decides anything: it converts, calls the service and maps
``AgentError`` subclasses to status codes through ``STATUS_OF``. Unexpected
exceptions become INTERNAL with a generic message (logged with the trace,
never sent to the client).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgeagent import errors
from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgeagent.capture import AuxEncoding, AuxiliaryData
from edgeagent.service import AgentService, InputTensor, SharedMemoryRef
from edgeagent.tensors import DTYPE_TO_WIRE, WIRE_DTYPES, ModelInfo, TensorSpec

log = structlog.get_logger(__name__)

SERVICE_NAME = "AWS.SageMaker.Edge.Agent"

STATUS_OF: dict[type[errors.AgentError], grpc.StatusCode] = {
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}


def status_of(exc: errors.AgentError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _guard(method: str, ctx: grpc.ServicerContext, call: Callable[[], Resp]) -> Resp:
    try:
        return call()
    except errors.AgentError as exc:
        code = status_of(exc)
        ctx.abort(code, str(exc))
    except Exception:
        log.exception("internal error", method=method)
        ctx.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the agent's log")
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


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


class AgentServicer(pb_grpc.AgentServicer):
    """Wire adapter for ``AgentService``."""

    def __init__(self, service: AgentService) -> None:
        self._service = service

    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
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

        return _guard("Predict", context, call)

    def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.ServicerContext
    ) -> pb.LoadModelResponse:
        return _guard(
            "LoadModel",
            context,
            lambda: pb.LoadModelResponse(
                model=_model(self._service.load_model(request.name, request.url))
            ),
        )

    def UnLoadModel(
        self, request: pb.UnLoadModelRequest, context: grpc.ServicerContext
    ) -> pb.UnLoadModelResponse:
        def call() -> pb.UnLoadModelResponse:
            self._service.unload_model(request.name)
            return pb.UnLoadModelResponse()

        return _guard("UnLoadModel", context, call)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return _guard(
            "ListModels",
            context,
            lambda: pb.ListModelsResponse(models=[_model(m) for m in self._service.list_models()]),
        )

    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
    ) -> pb.DescribeModelResponse:
        return _guard(
            "DescribeModel",
            context,
            lambda: pb.DescribeModelResponse(
                model=_model(self._service.describe_model(request.name))
            ),
        )

    def CaptureData(
        self, request: pb.CaptureDataRequest, context: grpc.ServicerContext
    ) -> pb.CaptureDataResponse:
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

        return _guard("CaptureData", context, call)

    def GetCaptureDataStatus(
        self, request: pb.GetCaptureDataStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetCaptureDataStatusResponse:
        return _guard(
            "GetCaptureDataStatus",
            context,
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


def build_server(
    service: AgentService,
    *,
    socket_path: Path,
    workers: int,
    max_message_bytes: int,
    socket_group: str | None = None,
) -> tuple[grpc.Server, health.HealthServicer]:
    """A started gRPC server on the Unix socket, with the health service."""
    prepare_socket_path(socket_path)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-rpc"),
        options=options,
        maximum_concurrent_rpcs=workers * 16,
    )
    pb_grpc.add_AgentServicer_to_server(AgentServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    old_umask = os.umask(0o117)  # the socket is born 0660, never wider
    try:
        server.add_insecure_port(f"unix://{socket_path}")
    finally:
        os.umask(old_umask)
    server.start()
    os.chmod(socket_path, 0o660)
    if socket_group:
        try:
            os.chown(socket_path, -1, grp.getgrnam(socket_group).gr_gid)
        except (KeyError, PermissionError) as exc:
            log.warning("cannot give the socket to its group", group=socket_group, error=str(exc))
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer
