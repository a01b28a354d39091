"""The simulator's MQTT adapter: raw data out, verdicts, labels and commands in.

paho-mqtt on its own network thread (reconnects by itself). Topics:

- publishes ``<topic_prefix>/<id>/raw-data`` (QoS 0, as sensors do);
- reads ``<topic_prefix>/+/anomalies`` and ``<topic_prefix>/+/label/update``
  (the app's verdicts and status, shown on the dashboard);
- reads ``<control_prefix>/<id|all>/control``: a JSON ``Command``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from simulator.farm import Command, CommandError, Farm

__all__ = ["MqttLink"]

log = structlog.get_logger("simulator.mqtt")


class MqttLink:
    """One connection to the broker for the whole farm."""

    def __init__(
        self,
        farm: Farm,
        *,
        host: str,
        port: int,
        topic_prefix: str = "wind-turbine",
        control_prefix: str = "windedge-sim",
        client_id: str = "windfarm-sim",
    ) -> None:
        self._farm = farm
        self._host, self._port = host, port
        self._prefix = topic_prefix
        self._control = control_prefix
        self.connected = threading.Event()
        self.commands_rejected = 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._topics = [
            f"{topic_prefix}/+/anomalies",
            f"{topic_prefix}/+/label/update",
            f"{control_prefix}/+/control",
        ]

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self.connected.clear()
        self._client.disconnect()
        self._client.loop_stop()

    def publish_samples(self, payloads: Iterable[tuple[str, bytes]]) -> int:
        """Publish raw-data payloads; how many the client accepted (0 while disconnected)."""
        if not self.connected.is_set():
            return 0
        sent = 0
        publish = self._client.publish
        prefix = self._prefix
        for turbine, body in payloads:
            if publish(f"{prefix}/{turbine}/raw-data", body, qos=0).rc == mqtt.MQTT_ERR_SUCCESS:
                sent += 1
        return sent

    # ---- paho callbacks (its network thread) ---------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection", reason=str(reason))
            return
        client.subscribe([(topic, 0) for topic in self._topics])
        self.connected.set()
        log.info("connected to the broker", host=self._host, port=self._port)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if self.connected.is_set():
            log.warning("disconnected from the broker", reason=str(reason))
        self.connected.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        levels = msg.topic.split("/")
        prefix_levels = self._prefix.count("/") + 1
        control_levels = self._control.count("/") + 1
        if msg.topic.startswith(self._control + "/") and len(levels) == control_levels + 2:
            self._command(levels[control_levels], msg.payload)
            return
        if len(levels) < prefix_levels + 2:
            return
        turbine, rest = levels[prefix_levels], levels[prefix_levels + 1 :]
        if rest == ["anomalies"]:
            self._farm.on_anomalies(turbine, msg.payload)
        elif rest == ["label", "update"]:
            self._farm.on_label(turbine, msg.payload)

    def _command(self, turbine: str, payload: bytes | bytearray) -> None:
        try:
            command = Command.parse(bytes(payload))
            self._farm.apply(turbine, command)
        except CommandError as exc:
            self.commands_rejected += 1
            log.warning("command rejected", turbine=turbine, error=str(exc))
            return
        log.info("command", turbine=turbine, action=command.action, kind=command.kind)
