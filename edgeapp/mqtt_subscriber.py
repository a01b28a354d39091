"""A receive-only MQTT 3.1.1 client for the sensor stream: one subscription, bulk reads.

Why not paho for this one connection: at 1,000 turbines x 20 Hz the daemon
receives 20,000 messages a second, and paho-mqtt 2 spends about 22 us of
Python per message (a ``select`` and three ``recv`` calls per packet, a
message object, topic matching, callback locks): 0.45 of a core on a 2-core
device, the largest single cost of the daemon (``bench/farm_scale.py``
measures it). This client reads what the socket holds in one ``recv``, cuts
it into packets in one loop and hands ``(topic, payload, arrival)`` to the
handler: about 2 us per message. paho still publishes the daemon's output.

What it implements of MQTT 3.1.1 (OASIS, 2014), and nothing more: CONNECT
(clean session, keep-alive) / CONNACK; SUBSCRIBE / SUBACK, sent again after
every reconnection; PUBLISH at QoS 0 and 1 (a PUBACK for QoS 1; the
subscription asks for at most QoS 1, so the broker never sends QoS 2);
PINGREQ / PINGRESP; DISCONNECT on stop. The connection is retried with a
delay that doubles from ``reconnect_min_s`` to ``reconnect_max_s``; a broker
silent for 1.5 keep-alive periods is treated as gone.

A packet larger than ``max_packet_bytes`` is skipped as it streams past
(never buffered) and reported to ``on_oversized``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

import structlog

from edgeapp.mqtt import BrokerConfig, MessageHandler

__all__ = ["MqttProtocolError", "MqttSubscriber"]

log = structlog.get_logger("edgeapp.mqtt")

OversizedHandler = Callable[[str, int, float], None]
"""``(topic, size in bytes, arrival)`` of a packet that was skipped."""

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 8, 9, 12, 13, 14
_PINGREQ_PACKET = b"\xc0\x00"
_DISCONNECT_PACKET = b"\xe0\x00"
_RECV_BYTES = 256 * 1024
_POLL_S = 0.25  # how often a blocked read looks at the stop flag and the keep-alive
_CONNECT_TIMEOUT_S = 5.0
_CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


class MqttProtocolError(ConnectionError):
    """The broker broke the protocol or refused us; the connection is dropped and retried."""


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive_s: int) -> bytes:
    body = _utf8("MQTT") + bytes((4, 0x02)) + struct.pack("!H", keepalive_s) + _utf8(client_id)
    return bytes((_CONNECT << 4,)) + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8(topic) + bytes((qos,))
    return bytes((_SUBSCRIBE << 4 | 0x02,)) + _remaining_length(len(body)) + body


class MqttSubscriber:
    """Subscribes to one topic filter and streams its messages to a handler, on one thread."""

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        client_id: str,
        topic: str,
        on_message: MessageHandler,
        on_oversized: OversizedHandler | None = None,
        qos: int = 0,
        max_packet_bytes: int = 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        self.broker = broker
        self.client_id = client_id
        self.topic = topic
        self.qos = qos
        self.max_packet_bytes = max_packet_bytes
        self._on_message = on_message
        self._on_oversized = on_oversized
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()  # sends come from the thread and from stop()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.connects = 0
        self.messages = 0
        self.handler_errors = 0
        # parser state that survives between reads: bytes still to skip of an oversized packet
        self._skip = 0

    # ---- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}")
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Send DISCONNECT, close the connection and join the thread."""
        self._stop.set()
        with self._sock_lock:
            sock = self._sock
            # OSError: the broker is gone already, or the socket is not connected (yet)
            if sock is not None and self._connected.is_set():
                with contextlib.suppress(OSError):
                    sock.sendall(_DISCONNECT_PACKET)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    # ---- the thread

    def _run(self) -> None:
        delay = float(self.broker.reconnect_min_s)
        while not self._stop.is_set():
            try:
                sock = self._connect()
            except (OSError, MqttProtocolError) as exc:
                log.warning(
                    "cannot connect to the broker",
                    client=self.client_id,
                    error=str(exc) or type(exc).__name__,
                    retry_in_s=delay,
                )
            else:
                delay = float(self.broker.reconnect_min_s)
                try:
                    self._read(sock)
                except (OSError, MqttProtocolError) as exc:
                    if not self._stop.is_set():
                        log.warning(
                            "disconnected from the broker; reconnecting",
                            client=self.client_id,
                            error=str(exc) or type(exc).__name__,
                            retry_in_s=delay,
                        )
                finally:
                    self._close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, float(self.broker.reconnect_max_s))
        self._close()

    def _close(self) -> None:
        with self._sock_lock:
            sock, self._sock = self._sock, None
            self._connected.clear()
            self._subscribed.clear()
        if sock is not None:
            sock.close()

    def _send(self, data: bytes) -> None:
        with self._sock_lock:
            if self._sock is not None:
                self._sock.sendall(data)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(
            (self.broker.host, self.broker.port), timeout=_CONNECT_TIMEOUT_S
        )
        try:
            sock.sendall(connect_packet(self.client_id, self.broker.keepalive_s))
            ack = self._read_exactly(sock, 4)
            if ack[0] >> 4 != _CONNACK or ack[1] != 2:
                raise MqttProtocolError(f"expected CONNACK, got {ack.hex()}")
            if ack[3]:
                reason = _CONNACK_CODES.get(ack[3], f"code {ack[3]}")
                raise MqttProtocolError(f"broker refused the connection: {reason}")
            sock.settimeout(_POLL_S)
        except BaseException:
            sock.close()
            raise
        with self._sock_lock:
            self._sock = sock
            self._connected.set()
        self.connects += 1
        log.info(
            "connected to the broker",
            client=self.client_id,
            host=self.broker.host,
            port=self.broker.port,
            reconnect=self.connects > 1,
        )
        self._send(subscribe_packet(1, self.topic, self.qos))
        return sock

    @staticmethod
    def _read_exactly(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError("the broker closed the connection")
            data += chunk
        return data

    def _read(self, sock: socket.socket) -> None:
        keepalive = float(self.broker.keepalive_s)
        buffer = bytearray()
        self._skip = 0
        last_sent = last_received = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now - last_sent >= keepalive / 2:
                self._send(_PINGREQ_PACKET)
                last_sent = now
            if now - last_received > 1.5 * keepalive:
                raise MqttProtocolError(f"nothing from the broker for {1.5 * keepalive:.0f} s")
            try:
                chunk = sock.recv(_RECV_BYTES)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionResetError("the broker closed the connection")
            last_received = self._clock()
            if self._skip:
                skipped = min(self._skip, len(chunk))
                self._skip -= skipped
                chunk = chunk[skipped:]
            buffer += chunk
            if buffer:
                del buffer[: self._packets(buffer, last_received)]

    def _packets(self, buf: bytearray, arrival: float) -> int:
        """Handle every complete packet at the start of ``buf``; returns the bytes consumed."""
        on_message = self._on_message
        size = len(buf)
        pos = 0
        while pos + 2 <= size:
            header = buf[pos]
            # remaining length: 1 to 4 bytes, 7 bits each
            length = 0
            shift = 0
            at = pos + 1
            while True:
                if at >= size:
                    return pos  # incomplete header
                byte = buf[at]
                length |= (byte & 0x7F) << shift
                at += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MqttProtocolError("malformed remaining length")
            end = at + length
            kind = header >> 4
            if kind == _PUBLISH:
                if length > self.max_packet_bytes:
                    self._oversized(buf, at, length, arrival)
                    if end > size:
                        self._skip = end - size
                        return size
                    pos = end
                    continue
                if end > size:
                    return pos
                topic_end = at + 2 + ((buf[at] << 8) | buf[at + 1]) if length >= 2 else end + 1
                if topic_end > end:
                    raise MqttProtocolError("PUBLISH topic longer than its packet")
                topic = buf[at + 2 : topic_end].decode("utf-8", "replace")
                start = topic_end
                if header & 0x06:  # QoS 1: a packet id follows the topic
                    self._send(b"\x40\x02" + bytes(buf[topic_end : topic_end + 2]))
                    start += 2
                self.messages += 1
                try:
                    on_message(topic, bytes(buf[start:end]), arrival)
                except Exception:  # a bug in the handler must not end the stream
                    self.handler_errors += 1
                    if self.handler_errors <= 10 or self.handler_errors % 10000 == 0:
                        log.exception("message handler failed", errors=self.handler_errors)
            else:
                if end > size:
                    return pos
                if kind == _SUBACK:
                    self._suback(buf[at:end])
                elif kind not in (_PINGRESP, _PUBACK):
                    raise MqttProtocolError(f"unexpected packet type {kind} from the broker")
            pos = end
        return pos

    def _suback(self, body: bytearray) -> None:
        granted = body[2:]
        if not granted or granted[0] == 0x80:
            raise MqttProtocolError(f"the broker refused the subscription to {self.topic!r}")
        self._subscribed.set()
        log.info("subscribed", client=self.client_id, topic=self.topic, qos=granted[0])

    def _oversized(self, buf: bytearray, at: int, length: int, arrival: float) -> None:
        topic = "<unknown>"
        if at + 2 <= len(buf):
            topic_end = at + 2 + ((buf[at] << 8) | buf[at + 1])
            if topic_end <= len(buf):
                topic = buf[at + 2 : topic_end].decode("utf-8", "replace")
        if self._on_oversized is not None:
            self._on_oversized(topic, length, arrival)
