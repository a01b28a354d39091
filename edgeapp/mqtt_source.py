"""The MQTT source: the device's sensor topics into the ingestor.

A thin adapter: it keeps one subscription to ``mqtt_topic``
(``wind-turbine/+/raw-data``) through an ``MqttClient`` (reconnecting with
backoff, subscribing again after every reconnection) and hands the topics,
payloads and arrival time of each socket read's messages to
``Ingestor.on_messages`` at once, on the client's thread. Everything about
payloads (parsing, validation, counting) is the ingestor's business.
"""

from __future__ import annotations

from edgeapp.ingest import Ingestor
from edgeapp.mqtt import BrokerConfig, MqttClient

__all__ = ["MqttSource"]

# Room for the topic and the fixed header around a payload of max_payload_bytes:
# larger packets are skipped unread (and counted as oversized).
_PACKET_OVERHEAD = 64 * 1024 + 8


class MqttSource:
    """Subscribes to the sensor topics; implements ``edgeapp.sources.Source``."""

    name = "mqtt"

    def __init__(
        self, *, broker: BrokerConfig, client_id: str, topic: str, ingestor: Ingestor, qos: int = 0
    ) -> None:
        self.topic = topic
        self.client = MqttClient(
            broker=broker,
            client_id=client_id,
            subscription=topic,
            qos=qos,
            on_message=ingestor.on_message,
            on_batch=ingestor.on_messages,
            on_oversized=ingestor.on_oversized,
            max_packet_bytes=ingestor.max_payload_bytes + _PACKET_OVERHEAD,
        )

    def start(self) -> None:
        self.client.start()

    def stop(self, timeout: float) -> None:
        self.client.stop(timeout)

    def alive(self) -> bool:
        return self.client.alive()
