"""The MQTT source: the device's sensor topics into the ingestor.

A thin adapter: it subscribes to ``mqtt_topic`` (``wind-turbine/+/raw-data``)
after every (re)connection and hands each message's topic, payload and
arrival time to ``Ingestor.on_message``, on paho's network thread. Everything
about payloads (parsing, validation, counting) is the ingestor's business.
"""

from __future__ import annotations

from edgeapp.ingest import Ingestor
from edgeapp.mqtt import BrokerConfig, MqttConnection

__all__ = ["MqttSource"]


class MqttSource:
    """Subscribes to the sensor topics; implements ``edgeapp.sources.Source``."""

    name = "mqtt"

    def __init__(
        self, *, broker: BrokerConfig, client_id: str, topic: str, ingestor: Ingestor, qos: int = 0
    ) -> None:
        self.topic = topic
        self.qos = qos
        self.connection = MqttConnection(
            broker=broker, client_id=client_id, on_message=ingestor.on_message
        )
        self.connection.on_connected(self._subscribe)

    def _subscribe(self, connection: MqttConnection) -> None:
        connection.subscribe(self.topic, self.qos)

    def start(self) -> None:
        self.connection.start()

    def stop(self, timeout: float) -> None:
        # paho joins its thread without a deadline; on loopback that takes milliseconds
        del timeout
        self.connection.stop()

    def alive(self) -> bool:
        return self.connection.alive()
