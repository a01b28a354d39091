"""The Jobs emulator's MQTT side: a paho-mqtt client of the stand-in's broker.

It subscribes to the four request topics of the device-side Jobs API for every
thing and hands each request to the engine on paho's network thread (the
engine only computes and writes a small sqlite transaction); the engine's
replies and notifications go out at QoS 1. The subscriptions are made again on
every (re)connection, so a broker restart costs only the requests sent while
it was down, as with AWS IoT.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud.local.jobs import JobsEngine, Sink

__all__ = ["REQUEST_FILTERS", "JobsMqttAdapter", "parse_request_topic"]

log = structlog.get_logger("cloud.local.jobs_mqtt")

REQUEST_FILTERS = (
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
)


def parse_request_topic(topic: str) -> tuple[str, str, str | None] | None:
    """``(thing, operation, job_id)`` of a request topic, None for anything else."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
        return None
    thing, rest = parts[2], parts[4:]
    if rest in (["get"], ["start-next"]):
        return thing, rest[0], None
    if len(rest) == 2 and rest[1] in ("get", "update"):
        return thing, rest[1], rest[0]
    return None


class JobsMqttAdapter:
    """Connects the engine to the broker: requests in, replies and notifications out."""

    def __init__(
        self, engine_factory: Callable[[Sink], JobsEngine], *, host: str, port: int, client_id: str
    ) -> None:
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._host, self._port = host, port
        self.ready = threading.Event()
        self.engine: JobsEngine = engine_factory(self.publish)

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self._client.publish(topic, data, qos=1)

    # -- paho callbacks (network thread) ---------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("local stand-in: broker refused the jobs emulator", reason=str(reason))
            return
        client.subscribe([(f, 1) for f in REQUEST_FILTERS])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if all(not r.is_failure for r in reasons):
            log.info("local stand-in: jobs emulator subscribed", filters=list(REQUEST_FILTERS))
            self.ready.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.ready.clear()
        log.info("local stand-in: jobs emulator disconnected", reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = parse_request_topic(msg.topic)
        if parsed is None:
            return
        thing, operation, job_id = parsed
        try:
            self.engine.handle(thing, operation, job_id, bytes(msg.payload))
        except Exception:
            log.exception("local stand-in: jobs request failed", topic=msg.topic)
