"""edgeapp.mqtt.MqttClient against a real mosquitto, with paho-mqtt as the other party."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from edgeapp_harness import Mosquitto, free_port, short_dir, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edgeapp.mqtt import BrokerConfig, MqttClient, publish_packet

TOPIC = "wind-turbine/+/raw-data"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, float]] = []
        self.oversized: list[tuple[str, int]] = []
        self.batches = 0
        self.lock = threading.Lock()

    def on_message(self, topic: str, payload: bytes, arrival: float) -> None:
        with self.lock:
            self.messages.append((topic, bytes(payload), arrival))

    def on_batch(self, topics: list[bytes], payloads: list[bytes], arrival: float) -> None:
        with self.lock:
            self.batches += 1
        for topic, payload in zip(topics, payloads, strict=True):
            self.on_message(topic.decode(), payload, arrival)

    def on_oversized(self, topic: str, size: int, _arrival: float) -> None:
        with self.lock:
            self.oversized.append((topic, size))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _t, p, _a in self.messages]


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    base = short_dir()
    server = Mosquitto(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def publisher(port: int) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def subscriber(port: int, inbox: Inbox, **kw: object) -> MqttClient:
    config = BrokerConfig(host="127.0.0.1", port=port, keepalive_s=5, reconnect_min_s=1,
                          reconnect_max_s=2)  # fmt: skip
    sub = MqttClient(
        broker=config,
        client_id=f"sub-{time.monotonic_ns()}",
        subscription=TOPIC,
        on_message=inbox.on_message,
        on_oversized=inbox.on_oversized,
        **kw,  # type: ignore[arg-type]  # qos / max_packet_bytes, typed by the constructor
    )
    sub.start()
    return sub


@pytest.mark.parametrize("batched", [False, True], ids=["one by one", "per read"])
@pytest.mark.parametrize("qos", [0, 1])
def test_messages_arrive_whole_and_in_order(broker: Mosquitto, qos: int, batched: bool) -> None:
    inbox = Inbox()
    sub = subscriber(
        broker.port, inbox, qos=qos, **({"on_batch": inbox.on_batch} if batched else {})
    )
    pub = publisher(broker.port)
    try:
        assert sub.wait_subscribed(10)
        sizes = [0, 1, 100, 127, 128, 16383, 16384, 70_000]  # remaining-length edges
        expected = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]
        expected += [f"m{i}".encode() for i in range(3000)]  # many packets per read
        for i, payload in enumerate(expected):
            pub.publish(f"wind-turbine/t{i % 3}/raw-data", payload, qos=qos)
        pub.publish("wind-turbine/t0/other", b"not subscribed", qos=qos)
        wait_until(lambda: len(inbox.messages) >= len(expected), 20, what="all messages")
        time.sleep(0.2)
        assert inbox.payloads() == expected
        assert {t for t, _p, _a in inbox.messages} == {
            f"wind-turbine/t{i}/raw-data" for i in range(3)
        }
        if qos:  # every QoS 1 message acknowledged: the broker has nothing left in flight
            assert sub.connected
        if batched:  # the reads of a stream carry many messages each
            assert 0 < inbox.batches < len(expected)
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.stop()
    assert not sub.alive()


def test_oversized_packets_are_skipped_unbuffered(broker: Mosquitto) -> None:
    inbox = Inbox()
    sub = subscriber(broker.port, inbox, max_packet_bytes=1000)
    pub = publisher(broker.port)
    try:
        assert sub.wait_subscribed(10)
        pub.publish("wind-turbine/a/raw-data", b"before")
        pub.publish("wind-turbine/big/raw-data", b"x" * 500_000)
        pub.publish("wind-turbine/a/raw-data", b"after")
        wait_until(lambda: len(inbox.messages) >= 2, 10, what="the small messages")
        assert inbox.payloads() == [b"before", b"after"]
        assert inbox.oversized == [("wind-turbine/big/raw-data", 500_000 + 2 + 25)]
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.stop()


def test_a_failing_handler_does_not_end_the_stream(broker: Mosquitto) -> None:
    inbox = Inbox()
    seen: list[bytes] = []

    def handler(topic: str, payload: bytes, arrival: float) -> None:
        seen.append(bytes(payload))
        if payload == b"boom":
            raise RuntimeError("bug")
        inbox.on_message(topic, payload, arrival)

    config = BrokerConfig(host="127.0.0.1", port=broker.port)
    sub = MqttClient(broker=config, client_id="failing", subscription=TOPIC, on_message=handler)
    sub.start()
    pub = publisher(broker.port)
    try:
        assert sub.wait_subscribed(10)
        for payload in (b"1", b"boom", b"2"):
            pub.publish("wind-turbine/a/raw-data", payload)
        wait_until(lambda: len(inbox.messages) >= 2, 10, what="messages after the failure")
        assert seen == [b"1", b"boom", b"2"] and sub.handler_errors == 1
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.stop()


def test_reconnects_and_subscribes_again_after_a_broker_restart(broker: Mosquitto) -> None:
    inbox = Inbox()
    sub = subscriber(broker.port, inbox)
    try:
        assert sub.wait_subscribed(10)
        broker.restart()
        wait_until(lambda: sub.connects == 2 and sub.wait_subscribed(0), 15, what="resubscribed")
        pub = publisher(broker.port)
        pub.publish("wind-turbine/a/raw-data", b"again")
        wait_until(lambda: inbox.payloads() == [b"again"], 10, what="a message after restart")
        pub.disconnect()
        pub.loop_stop()
    finally:
        sub.stop()


def test_waits_for_a_broker_that_is_not_there_yet_and_stops_promptly() -> None:
    base = short_dir()
    port = free_port()
    inbox = Inbox()
    sub = subscriber(port, inbox)
    try:
        time.sleep(1.5)
        assert not sub.connected and sub.alive()
        late = Mosquitto(base, port)
        late.start()
        try:
            assert sub.wait_subscribed(10)
        finally:
            started = time.monotonic()
            sub.stop()
            assert time.monotonic() - started < 1.0
            late.stop()
        assert not sub.alive()
    finally:
        sub.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_stop_while_retrying_is_prompt(tmp_path: Path) -> None:
    del tmp_path
    sub = subscriber(free_port(), Inbox())
    time.sleep(0.3)
    started = time.monotonic()
    sub.stop()
    assert time.monotonic() - started < 1.0 and not sub.alive()


class PahoInbox:
    """paho-mqtt as the receiving party."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"in-{time.monotonic_ns()}"
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, m.payload, bool(m.retain))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_published_batches_arrive_whole_and_retained_ones_stay(broker: Mosquitto) -> None:
    inbox = PahoInbox(broker.port, "out/#")
    client = MqttClient(broker=BrokerConfig(host="127.0.0.1", port=broker.port), client_id="pub")
    client.start()
    try:
        assert client.wait_connected(10)
        batch = [(f"out/t{i}/anomalies", b'{"n": %d}' % i + b" " * (i * 37)) for i in range(500)]
        assert client.publish_many(batch) == 500
        assert client.publish("out/t1/label/update", b"label", retain=True)
        wait_until(lambda: len(inbox.messages) == 501, 10, what="every message")
        assert [(t, p) for t, p, _r in inbox.messages[:500]] == batch
        assert client.sent == 501 and client.unsent == 0
    finally:
        client.stop()
        inbox.close()
    late = PahoInbox(broker.port, "out/+/label/update")
    try:
        wait_until(lambda: late.messages, 5, what="the retained label")
        assert late.messages == [("out/t1/label/update", b"label", True)]
    finally:
        late.close()


def test_publishing_without_a_broker_is_counted_and_hooks_run_on_every_connection(
    tmp_path: Path,
) -> None:
    base = short_dir()
    port = free_port()
    client = MqttClient(
        broker=BrokerConfig(host="127.0.0.1", port=port, reconnect_min_s=1, reconnect_max_s=1),
        client_id="hooked",
    )
    connections: list[int] = []
    client.on_connected(lambda c: connections.append(c.connects))
    client.start()
    try:
        assert client.publish_many([("a/b", b"1"), ("a/c", b"2")]) == 0
        assert client.unsent == 2
        server = Mosquitto(base, port)
        server.start()
        try:
            assert client.wait_connected(10)
            wait_until(lambda: connections == [1], 5, what="the first hook")
            server.restart()
            wait_until(lambda: connections == [1, 2], 15, what="the hook after a restart")
            assert client.publish("a/b", b"3")
        finally:
            client.stop()
            server.stop()
    finally:
        client.stop()
        shutil.rmtree(base, ignore_errors=True)
        del tmp_path


@pytest.mark.parametrize("size", [0, 1, 100, 127, 128, 16383, 16384, 2_097_151, 2_097_152])
@pytest.mark.parametrize(("retain", "packet_id"), [(False, None), (True, None), (False, 258)])
def test_publish_packets_are_encoded_as_mqtt_3_1_1_says(
    size: int, retain: bool, packet_id: int | None
) -> None:
    topic = "wind-turbine/t\u00e9/anomalies"
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    name = topic.encode()
    ident = b"" if packet_id is None else packet_id.to_bytes(2, "big")
    body = len(name).to_bytes(2, "big") + name + ident + payload
    length, n = bytearray(), len(body)  # the spec's algorithm (section 2.2.3)
    while True:
        n, byte = divmod(n, 128)
        length.append(byte | 0x80 if n else byte)
        if not n:
            break
    header = 0x30 | (0x02 if packet_id is not None else 0) | (0x01 if retain else 0)
    expected = bytes((header,)) + bytes(length) + body
    assert publish_packet(topic, payload, retain=retain, packet_id=packet_id) == expected
