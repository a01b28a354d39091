"""The IoT Jobs adapter: awsiotsdk's MQTT5 client and ``IotJobsClientV2``, kept thin.

- One MQTT5 client for the process lifetime: mutual TLS with the device
  certificate (AWS IoT Core, or the local stand-in with its own CA and port),
  or plain TCP when ``tls = false`` (local development only). The CRT
  reconnects by itself.
- The notify-next stream is opened once and held (dropping the reference
  would silently stop delivery). Notifications are hints: every one, every
  connection success, every ``edgectl ota check`` and a slow idle timer just
  put a wake-up in a queue; the main loop then asks ``start-next`` for the
  truth. SDK callbacks never block and never call back into the SDK.
- ``update`` is :class:`ota.updater.JobReporter`: statusDetails cleaned to
  IOT_JOBS.md's limits, ``expectedVersion`` from the record, the step timer
  refreshed with every IN_PROGRESS update; rejections map to our errors.
"""

from __future__ import annotations

import queue
import re
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import structlog

from ota.errors import JobGoneError, TransientError
from ota.settings import OtaSettings
from ota.store import Record
from ota.updater import JobExecution

log = structlog.get_logger(__name__)

_KEY_RE = re.compile(r"[^a-zA-Z0-9:_-]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RETRYABLE = frozenset({"RequestThrottled", "InternalError"})
_GONE = frozenset({"InvalidStateTransition", "TerminalStateReached", "ResourceNotFound"})
MAX_DETAILS = 10
MAX_VALUE = 1024


def clean_details(details: dict[str, str]) -> dict[str, str]:
    """statusDetails within the service's limits: <= 10 keys of [A-Za-z0-9:_-], values 1-1024."""
    out: dict[str, str] = {}
    for key, value in details.items():
        k = _KEY_RE.sub("_", key)[:128] or "_"
        v = _CONTROL_RE.sub(" ", str(value))[:MAX_VALUE] or "-"
        out[k] = v
        if len(out) == MAX_DETAILS:
            break
    return out


class IotJobs:
    """The device's IoT Jobs connection; wake-ups go to ``wakeups``."""

    def __init__(self, settings: OtaSettings, wakeups: queue.Queue[str]) -> None:
        self.settings = settings
        self.wakeups = wakeups
        self.thing = settings.thing_name
        self._client: Any = None
        self._jobs: Any = None
        self._stream: Any = None  # held for the process lifetime
        self.connected = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        from awscrt import mqtt_request_response  # noqa: PLC0415 - the SDK loads here, once
        from awsiot import ServiceStreamOptions, iotjobs  # noqa: PLC0415

        self._client = self._build_client()
        self._jobs = iotjobs.IotJobsClientV2(
            self._client,
            mqtt_request_response.ClientOptions(
                max_request_response_subscriptions=4,
                max_streaming_subscriptions=2,
                operation_timeout_in_seconds=self.settings.operation_timeout_s,
            ),
        )
        self._stream = self._jobs.create_next_job_execution_changed_stream(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=self.thing),
            ServiceStreamOptions(
                incoming_event_listener=self._on_next,
                subscription_status_listener=self._on_subscription,
            ),
        )
        self._stream.open()
        self._client.start()
        log.info(
            "connecting to IoT Jobs",
            endpoint=self.settings.iot_endpoint,
            port=self.settings.iot_port if self.settings.tls else self.settings.iot_plain_port,
            tls=self.settings.tls,
            thing=self.thing,
        )

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()

    def _build_client(self) -> Any:
        from awscrt import mqtt5  # noqa: PLC0415

        s = self.settings
        callbacks = {
            "on_lifecycle_connection_success": self._on_connected,
            "on_lifecycle_connection_failure": self._on_connection_failure,
            "on_lifecycle_disconnection": self._on_disconnected,
        }
        if s.tls:
            from awsiot import mqtt5_client_builder  # noqa: PLC0415

            return mqtt5_client_builder.mtls_from_path(
                endpoint=s.iot_endpoint,
                port=s.iot_port,
                cert_filepath=str(s.cert_path),
                pri_key_filepath=str(s.key_path),
                ca_filepath=str(s.ca_path) if s.ca_path else None,
                client_id=s.mqtt_client_id,
                keep_alive_interval_sec=s.keep_alive_s,
                min_reconnect_delay_ms=500,
                max_reconnect_delay_ms=30_000,
                enable_metrics_collection=False,
                **callbacks,
            )
        # plain TCP: local development against the stand-in's plain listener
        return mqtt5.Client(
            mqtt5.ClientOptions(
                host_name=s.iot_endpoint,
                port=s.iot_plain_port,
                connect_options=mqtt5.ConnectPacket(
                    client_id=s.mqtt_client_id, keep_alive_interval_sec=s.keep_alive_s
                ),
                min_reconnect_delay_ms=500,
                max_reconnect_delay_ms=30_000,
                on_lifecycle_event_connection_success_fn=self._on_connected,
                on_lifecycle_event_connection_failure_fn=self._on_connection_failure,
                on_lifecycle_event_disconnection_fn=self._on_disconnected,
                disable_metrics=True,
            )
        )

    # -- SDK callbacks: never block, never call the SDK ------------------------------------
    def _on_connected(self, _data: Any) -> None:
        self.connected = True
        log.info("connected to IoT Jobs")
        self.wakeups.put("connected")

    def _on_connection_failure(self, data: Any) -> None:
        self.connected = False
        log.warning("IoT connection failed", error=str(getattr(data, "exception", data)))

    def _on_disconnected(self, data: Any) -> None:
        self.connected = False
        log.warning("IoT connection lost", error=str(getattr(data, "exception", data)))

    def _on_next(self, event: Any) -> None:
        execution = getattr(event, "execution", None)
        log.info("notify-next", job_id=getattr(execution, "job_id", None))
        self.wakeups.put("notify-next")

    def _on_subscription(self, event: Any) -> None:
        log.info("notify-next stream", status=str(getattr(event, "type", event)))

    # -- requests (main thread) ----------------------------------------------------------
    def _wait(self, future: Future[Any]) -> Any:
        from awscrt.exceptions import AwsCrtError  # noqa: PLC0415

        try:
            return future.result(timeout=self.settings.operation_timeout_s + 5)
        except FutureTimeout as exc:
            raise TransientError("IoT Jobs request timed out") from exc
        except AwsCrtError as exc:  # the connection, not the service: try again later
            raise TransientError(f"IoT Jobs request failed: {exc}") from exc

    def start_next(self) -> JobExecution | None:
        """The next pending execution, now IN_PROGRESS (TransientError when unreachable)."""
        from awsiot import V2ServiceException, iotjobs  # noqa: PLC0415

        request = iotjobs.StartNextPendingJobExecutionRequest(
            thing_name=self.thing, step_timeout_in_minutes=self.settings.step_timeout_minutes
        )
        try:
            response = self._wait(self._jobs.start_next_pending_job_execution(request))
        except V2ServiceException as exc:
            raise TransientError(f"start-next failed: {_describe(exc)}") from exc
        execution = response.execution
        if execution is None or not execution.job_id:
            return None
        return JobExecution(
            job_id=execution.job_id,
            execution_number=execution.execution_number,
            version_number=execution.version_number,
            status=execution.status,
            document=execution.job_document,
        )

    def update(self, record: Record, status: str, details: dict[str, str]) -> None:
        """UpdateJobExecution for ``record``'s job (see :class:`ota.updater.JobReporter`)."""
        from awsiot import V2ServiceException, iotjobs  # noqa: PLC0415

        cleaned = clean_details(details)
        for _ in range(3):  # a version mismatch is adopted and tried again
            request = iotjobs.UpdateJobExecutionRequest(
                thing_name=self.thing,
                job_id=record.job_id,
                status=status,
                status_details=cleaned,
                expected_version=record.version_number,
                execution_number=record.execution_number,
                include_job_execution_state=True,
                step_timeout_in_minutes=(
                    self.settings.step_timeout_minutes if status == "IN_PROGRESS" else None
                ),
            )
            try:
                response = self._wait(self._jobs.update_job_execution(request))
            except V2ServiceException as exc:
                error = exc.modeled_error
                code = getattr(error, "code", None)
                state = getattr(error, "execution_state", None)
                if code == "VersionMismatch" and state is not None:
                    log.info("job version moved on; adopting it", version=state.version_number)
                    record.version_number = state.version_number
                    continue
                if code in _GONE:
                    cloud_status = getattr(state, "status", None)
                    raise JobGoneError(
                        f"job execution is {cloud_status or code}", cloud_status
                    ) from exc
                if code == "InvalidRequest" and cleaned != {"outcome": status}:
                    log.error("job update refused as invalid; sending a minimal one")
                    cleaned = {"outcome": status}
                    continue
                raise TransientError(f"job update failed: {_describe(exc)}") from exc
            state = getattr(response, "execution_state", None)
            if state is not None and state.version_number is not None:
                record.version_number = state.version_number
            elif record.version_number is not None:
                record.version_number += 1
            return
        raise TransientError("job update: version kept moving")


def _describe(exc: Any) -> str:
    error = getattr(exc, "modeled_error", None)
    if error is not None:
        return f"{getattr(error, 'code', '?')}: {getattr(error, 'message', '')}"
    return str(getattr(exc, "inner_error", None) or exc)
