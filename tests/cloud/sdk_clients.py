"""awsiotsdk's own Jobs clients, connected to the local stand-in as a device would be.

- ``V2Device``: ``IotJobsClientV2`` over an awscrt MQTT5 client (plain TCP, or
  mutual TLS through ``mqtt5_client_builder.mtls_from_path``), with the
  notify and notify-next streams open and their events collected;
- ``V1Device``: the older ``IotJobsClient`` over an MQTT 3.1.1 connection
  (plain, or ``mqtt_connection_builder.mtls_from_path``), replies collected by
  ``clientToken`` from the accepted/rejected subscriptions.

Both are closed by ``close()`` (tests use them as context managers).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from awscrt import io, mqtt, mqtt5, mqtt_request_response
from awsiot import ServiceStreamOptions, iotjobs, mqtt5_client_builder, mqtt_connection_builder

from cloud.local import LocalCloud

TIMEOUT = 10.0


class V2Device:
    """``IotJobsClientV2`` on MQTT5 for ``thing``; events land in ``notify`` / ``notify_next``."""

    def __init__(self, cloud: LocalCloud, thing: str, *, tls: bool = False) -> None:
        ep = cloud.endpoints
        self.thing = thing
        self.connected = threading.Event()
        self.connections = 0
        self.stopped = threading.Event()
        self.failures: queue.Queue[Any] = queue.Queue()
        client_id = f"{thing}-v2-{uuid.uuid4().hex[:8]}"
        callbacks: dict[str, Any] = {
            "on_lifecycle_connection_success": self._on_success,
            "on_lifecycle_connection_failure": self._on_failure,
            "on_lifecycle_disconnection": lambda data: self.connected.clear(),
            "on_lifecycle_stopped": lambda data: self.stopped.set(),
        }
        if tls:
            identity = cloud.provision_thing(thing)
            self.client = mqtt5_client_builder.mtls_from_path(
                endpoint=ep.mqtt_host,
                port=ep.mqtt_tls_port,
                cert_filepath=str(identity.cert_path),
                pri_key_filepath=str(identity.key_path),
                ca_filepath=str(identity.ca_path),
                client_id=client_id,
                enable_metrics_collection=False,
                min_reconnect_delay_ms=200,
                max_reconnect_delay_ms=1000,
                **callbacks,
            )
        else:
            options = mqtt5.ClientOptions(
                host_name=ep.mqtt_host,
                port=ep.mqtt_port,
                connect_options=mqtt5.ConnectPacket(
                    client_id=client_id, keep_alive_interval_sec=30
                ),
                min_reconnect_delay_ms=200,
                max_reconnect_delay_ms=1000,
            )
            options.on_lifecycle_event_connection_success_fn = self._on_success
            options.on_lifecycle_event_connection_failure_fn = self._on_failure
            options.on_lifecycle_event_disconnection_fn = callbacks["on_lifecycle_disconnection"]
            options.on_lifecycle_event_stopped_fn = callbacks["on_lifecycle_stopped"]
            self.client = mqtt5.Client(options)
        self.jobs = iotjobs.IotJobsClientV2(
            self.client,
            mqtt_request_response.ClientOptions(
                max_request_response_subscriptions=6,
                max_streaming_subscriptions=4,
                operation_timeout_in_seconds=int(TIMEOUT),
            ),
        )
        self.notify: queue.Queue[iotjobs.JobExecutionsChangedEvent] = queue.Queue()
        self.notify_next: queue.Queue[iotjobs.NextJobExecutionChangedEvent] = queue.Queue()
        self.subscribed = threading.Semaphore(0)
        self.client.start()
        if not self.connected.wait(TIMEOUT):
            self.close()
            raise AssertionError(f"{thing}: MQTT5 connection failed: {self._failure_text()}")
        self._streams = [
            self.jobs.create_job_executions_changed_stream(
                iotjobs.JobExecutionsChangedSubscriptionRequest(thing_name=thing),
                ServiceStreamOptions(
                    incoming_event_listener=self.notify.put,
                    subscription_status_listener=self._on_status,
                ),
            ),
            self.jobs.create_next_job_execution_changed_stream(
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
                ServiceStreamOptions(
                    incoming_event_listener=self.notify_next.put,
                    subscription_status_listener=self._on_status,
                ),
            ),
        ]
        for stream in self._streams:
            stream.open()
        for _ in self._streams:
            if not self.subscribed.acquire(timeout=TIMEOUT):
                self.close()
                raise AssertionError(f"{thing}: streams not established")

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.connections += 1
        self.connected.set()

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self.failures.put(data.exception)

    def _failure_text(self) -> str:
        items = []
        while not self.failures.empty():
            items.append(str(self.failures.get()))
        return "; ".join(items) or "no connection"

    def _on_status(self, event: Any) -> None:
        if event.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            self.subscribed.release()

    # -- requests (blocking, with the client's own timeout) ------------------------
    def get_pending(self) -> iotjobs.GetPendingJobExecutionsResponse:
        return _wait(
            self.jobs.get_pending_job_executions(
                iotjobs.GetPendingJobExecutionsRequest(thing_name=self.thing)
            )
        )

    def start_next(self, **kwargs: Any) -> iotjobs.StartNextJobExecutionResponse:
        return _wait(
            self.jobs.start_next_pending_job_execution(
                iotjobs.StartNextPendingJobExecutionRequest(thing_name=self.thing, **kwargs)
            )
        )

    def describe(self, job_id: str, **kwargs: Any) -> iotjobs.DescribeJobExecutionResponse:
        return _wait(
            self.jobs.describe_job_execution(
                iotjobs.DescribeJobExecutionRequest(thing_name=self.thing, job_id=job_id, **kwargs)
            )
        )

    def update(self, job_id: str, status: str, **kwargs: Any) -> iotjobs.UpdateJobExecutionResponse:
        return _wait(
            self.jobs.update_job_execution(
                iotjobs.UpdateJobExecutionRequest(
                    thing_name=self.thing, job_id=job_id, status=status, **kwargs
                )
            )
        )

    def close(self) -> None:
        self.client.stop()
        self.stopped.wait(TIMEOUT)

    def __enter__(self) -> V2Device:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _wait(future: Future[Any]) -> Any:
    return future.result(TIMEOUT + 5)


class V1Device:
    """The older ``IotJobsClient`` on MQTT 3.1.1; replies are matched by ``clientToken``."""

    def __init__(self, cloud: LocalCloud, thing: str, *, tls: bool = False) -> None:
        ep = cloud.endpoints
        self.thing = thing
        client_id = f"{thing}-v1-{uuid.uuid4().hex[:8]}"
        if tls:
            identity = cloud.provision_thing(thing)
            self.connection = mqtt_connection_builder.mtls_from_path(
                endpoint=ep.mqtt_host,
                port=ep.mqtt_tls_port,
                cert_filepath=str(identity.cert_path),
                pri_key_filepath=str(identity.key_path),
                ca_filepath=str(identity.ca_path),
                client_id=client_id,
                clean_session=True,
                enable_metrics_collection=False,
            )
        else:
            client = mqtt.Client(io.ClientBootstrap.get_or_create_static_default(), None)
            self.connection = mqtt.Connection(
                client=client, host_name=ep.mqtt_host, port=ep.mqtt_port, client_id=client_id
            )
        self.connection.connect().result(TIMEOUT)
        self.jobs = iotjobs.IotJobsClient(self.connection)
        self.replies: dict[str, queue.Queue[tuple[str, Any]]] = {}
        self.notify: queue.Queue[iotjobs.JobExecutionsChangedEvent] = queue.Queue()
        self.notify_next: queue.Queue[iotjobs.NextJobExecutionChangedEvent] = queue.Queue()
        q1 = mqtt.QoS.AT_LEAST_ONCE
        subs = [
            self.jobs.subscribe_to_get_pending_job_executions_accepted(
                iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing),
                q1,
                self._reply("accepted"),
            ),
            self.jobs.subscribe_to_get_pending_job_executions_rejected(
                iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing),
                q1,
                self._reply("rejected"),
            ),
            self.jobs.subscribe_to_start_next_pending_job_execution_accepted(
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing),
                q1,
                self._reply("accepted"),
            ),
            self.jobs.subscribe_to_start_next_pending_job_execution_rejected(
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing),
                q1,
                self._reply("rejected"),
            ),
            self.jobs.subscribe_to_describe_job_execution_accepted(
                iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
                q1,
                self._reply("accepted"),
            ),
            self.jobs.subscribe_to_describe_job_execution_rejected(
                iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
                q1,
                self._reply("rejected"),
            ),
            self.jobs.subscribe_to_update_job_execution_accepted(
                iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
                q1,
                self._reply("accepted"),
            ),
            self.jobs.subscribe_to_update_job_execution_rejected(
                iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
                q1,
                self._reply("rejected"),
            ),
            self.jobs.subscribe_to_job_executions_changed_events(
                iotjobs.JobExecutionsChangedSubscriptionRequest(thing_name=thing),
                q1,
                self.notify.put,
            ),
            self.jobs.subscribe_to_next_job_execution_changed_events(
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
                q1,
                self.notify_next.put,
            ),
        ]
        for future, _topic in subs:
            future.result(TIMEOUT)

    def _reply(self, kind: str) -> Any:
        def on_reply(response: Any) -> None:
            token = getattr(response, "client_token", None)
            if token is not None:
                self.replies.setdefault(token, queue.Queue()).put((kind, response))

        return on_reply

    def _await(self, token: str) -> tuple[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            q = self.replies.get(token)
            if q is not None:
                return q.get(timeout=max(0.01, deadline - time.monotonic()))
            time.sleep(0.01)
        raise AssertionError(f"no reply for clientToken {token}")

    def _token(self) -> str:
        return uuid.uuid4().hex[:10]

    def get_pending(self) -> tuple[str, Any]:
        token = self._token()
        self.jobs.publish_get_pending_job_executions(
            iotjobs.GetPendingJobExecutionsRequest(thing_name=self.thing, client_token=token),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        return self._await(token)

    def start_next(self, **kwargs: Any) -> tuple[str, Any]:
        token = self._token()
        self.jobs.publish_start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(
                thing_name=self.thing, client_token=token, **kwargs
            ),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        return self._await(token)

    def describe(self, job_id: str, **kwargs: Any) -> tuple[str, Any]:
        token = self._token()
        self.jobs.publish_describe_job_execution(
            iotjobs.DescribeJobExecutionRequest(
                thing_name=self.thing, job_id=job_id, client_token=token, **kwargs
            ),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        return self._await(token)

    def update(self, job_id: str, status: str, **kwargs: Any) -> tuple[str, Any]:
        token = self._token()
        self.jobs.publish_update_job_execution(
            iotjobs.UpdateJobExecutionRequest(
                thing_name=self.thing, job_id=job_id, status=status, client_token=token, **kwargs
            ),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        return self._await(token)

    def close(self) -> None:
        self.connection.disconnect().result(TIMEOUT)

    def __enter__(self) -> V1Device:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
