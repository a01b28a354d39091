"""The standard gRPC health service (grpc.health.v1.Health): Check and Watch.

Messages are grpcio-health-checking's; the state lives here so the transport
stays generic. ``""`` is the whole server, other names are services.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from edgeagent.wire.h2 import Status
from edgeagent.wire.server import Method, RpcError, StreamCall

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
PREFIX = "/grpc.health.v1.Health/"


def _request(raw: bytes) -> health_pb2.HealthCheckRequest:
    try:
        return health_pb2.HealthCheckRequest.FromString(raw)
    except DecodeError:
        raise RpcError(Status.INVALID_ARGUMENT, "not a HealthCheckRequest") from None


class HealthState:
    """Serving status per service; Watch calls follow its changes."""

    def __init__(self, *, max_watchers: int = 4) -> None:
        self._changed = threading.Condition()
        self._status: dict[str, int] = {}
        self._watchers = 0
        self._max_watchers = max_watchers
        self._shutdown = False

    def set(self, service: str, status: int) -> None:
        with self._changed:
            if self._shutdown:
                return
            self._status[service] = status
            self._changed.notify_all()

    def status(self, service: str) -> int | None:
        with self._changed:
            return self._status.get(service)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on; later ``set`` calls are ignored."""
        with self._changed:
            self._shutdown = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._changed.notify_all()

    def methods(self) -> dict[str, Method]:
        return {
            PREFIX + "Check": Method(parse=_request, unary=self._check, inline=lambda _r: True),
            PREFIX + "Watch": Method(parse=_request, streaming=self._watch),
        }

    def _check(self, request: health_pb2.HealthCheckRequest) -> bytes:
        service = request.service
        status = self.status(service)
        if status is None:
            raise RpcError(Status.NOT_FOUND, f"unknown service {service!r}")
        return health_pb2.HealthCheckResponse(status=status).SerializeToString()

    def _watch(self, request: health_pb2.HealthCheckRequest, call: StreamCall) -> Iterator[bytes]:
        service = request.service
        with self._changed:
            if self._watchers >= self._max_watchers:
                raise RpcError(
                    Status.RESOURCE_EXHAUSTED, f"at most {self._max_watchers} Watch calls at once"
                )
            self._watchers += 1
        try:
            last: int | None = None
            while call.active():
                with self._changed:
                    status = self._status.get(service, SERVICE_UNKNOWN)
                    if status == last:
                        self._changed.wait(0.5)
                        continue
                last = status
                yield health_pb2.HealthCheckResponse(status=status).SerializeToString()
        finally:
            with self._changed:
                self._watchers -= 1
