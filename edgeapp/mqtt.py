"""The publishing connection: one paho-mqtt client on its own network thread.

``MqttConnection`` connects in the background, reconnects with a doubling
delay (``reconnect_min_s`` .. ``reconnect_max_s``) whenever the broker goes
away, and calls the ``on_connected`` hooks after every (re)connection (where
the publisher sends its retained labels again). paho's types never leave this
module. (The sensor stream is received by ``edgeapp.mqtt_subscriber``, which
costs a tenth of paho per message.)

Stopping queues a DISCONNECT behind every message already handed to paho, so
the broker receives them whole and in order, then joins the network thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["BrokerConfig", "MessageHandler", "MqttConnection"]

log = structlog.get_logger("edgeapp.mqtt")

MessageHandler = Callable[[str, bytes | bytearray, float], None]
"""``(topic, payload, monotonic arrival time)``; must not raise."""


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    host: str
    port: int
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30


class MqttConnection:
    """A client connection to the broker, owned by whoever constructs it."""

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        client_id: str,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self._connect_hooks: list[Callable[[MqttConnection], None]] = []
        self._connected = threading.Event()
        self._stopping = False
        self.connects = 0
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        client.reconnect_delay_set(broker.reconnect_min_s, broker.reconnect_max_s)
        # no enable_logger(): paho's own log lines repeat what the callbacks below
        # report, and it would format one DEBUG line per received message
        client.on_connect = self._connect_callback
        client.on_disconnect = self._disconnect_callback
        self._client = client

    # ---- lifecycle

    def on_connected(self, hook: Callable[[MqttConnection], None]) -> None:
        """Call ``hook(connection)`` after every (re)connection (on the network thread)."""
        self._connect_hooks.append(hook)

    def start(self) -> None:
        """Connect in the background (retrying until the broker answers)."""
        self._client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        """Flush what was published, disconnect, and join the network thread."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def alive(self) -> bool:
        """Whether the network thread runs."""
        thread = getattr(self._client, "_thread", None)  # paho keeps no public handle
        return isinstance(thread, threading.Thread) and thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ---- traffic

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Queue one message; False when there is no connection (QoS 0 is then dropped)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # ---- paho callbacks (network thread)

    def _connect_callback(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        _properties: Any,
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection", client=self.client_id, reason=str(reason))
            return
        self.connects += 1
        log.info(
            "connected to the broker",
            client=self.client_id,
            host=self.broker.host,
            port=self.broker.port,
            reconnect=self.connects > 1,
        )
        self._connected.set()
        for hook in self._connect_hooks:
            hook(self)

    def _disconnect_callback(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _properties: Any,
    ) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning(
                "disconnected from the broker; reconnecting",
                client=self.client_id,
                reason=str(reason),
            )
