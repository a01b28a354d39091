"""The daemon's MQTT 3.1.1 client: bulk reads, batched writes, reconnect with backoff.

Why not paho-mqtt: at 1,000 turbines x 20 Hz the daemon receives 20,000
messages a second and sends 3,000. paho-mqtt 2 spends about 24 us of CPU per
received message (a ``select`` and three ``recv`` calls per packet, a message
object, topic matching, callback locks) and 13-24 us per published one (a
wake-up byte through a socket pair and a network-thread pass per message):
half a core of a 2-core device, as much as everything else the daemon does.
This client reads what the socket holds in one ``recv``, cuts it into packets
in one loop, and writes a tick's messages with one ``sendall``: about 6 us per
received and 1 us per sent message (``bench/farm_scale.py`` and
``bench/mqtt_client.py`` measure both). Given ``on_batch`` instead of
``on_message``, it hands a read's messages over together (topics undecoded),
so the daemon's ingest works on hundreds at once. The tests talk to it with
paho, through a real mosquitto.

What it implements of MQTT 3.1.1 (OASIS, 2014), and nothing more: CONNECT
(clean session, keep-alive, user name and password, a will) / CONNACK; one
optional SUBSCRIBE / SUBACK, sent again after every reconnection; incoming
PUBLISH at QoS 0 and 1 (a PUBACK for QoS 1; the subscription asks for at most
QoS 1, so the broker never sends QoS 2); outgoing PUBLISH at QoS 0 or 1,
retained or not, and the PUBACKs of QoS 1; PINGREQ / PINGRESP; DISCONNECT on
stop. TLS (a CA, optionally a client certificate and key) wraps the socket;
the reader and the writers then take turns on it under one lock, as an
OpenSSL connection must not be read and written from two threads at once.

One thread per client reads, keeps the connection alive and reconnects with a
delay that doubles from ``reconnect_min_s`` to ``reconnect_max_s``; a broker
silent for 1.5 keep-alive periods counts as gone. Publishing writes from the
caller's thread while connected. QoS 0 messages are dropped (and counted)
while not connected: they are superseded every tick anyway. QoS 1 messages
wait for their PUBACK in a bounded queue (``max_queued``, the oldest dropped
and counted when full); while disconnected they only queue, and after a
reconnection every unacknowledged one is sent again (DUP set when it had gone
out before): at least once, in order. A write that fails half-way closes the
connection, so the broker discards the partial packet: a subscriber never sees
half a message. Hooks run after every (re)connection on the client's thread
(the publisher re-sends its retained labels there).

With a status topic, the client connects with a retained will ``offline``
there, publishes a retained ``online`` after every connection, and a retained
``offline`` before a clean DISCONNECT (which discards the will).

The broker closing a connection it had just accepted, and accepting the next
one at once, is what a second client with the same client id causes (each
connection takes the session over from the other): the log names that cause.

An incoming packet larger than ``max_packet_bytes`` is skipped as it streams
past (never buffered) and reported to ``on_oversized``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

__all__ = [
    "BrokerConfig",
    "BatchHandler",
    "MessageHandler",
    "MqttClient",
    "MqttProtocolError",
    "OversizedHandler",
    "publish_packet",
    "tls_context",
]

log = structlog.get_logger("edgeapp.mqtt")

MessageHandler = Callable[[str, bytes, float], None]
"""``(topic, payload, monotonic arrival time)`` of a received message."""
BatchHandler = Callable[[list[bytes], list[bytes], float], None]
"""``(topics, payloads, monotonic arrival time)`` of the messages of one socket read; the
topics as the packets spell them (UTF-8, not decoded)."""
OversizedHandler = Callable[[str, int, float], None]
"""``(topic, size in bytes, arrival)`` of a received packet that was skipped."""


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    host: str
    port: int
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    tls: ssl.SSLContext | None = None
    """TLS to the broker (``tls_context``); None: plain TCP."""
    username: str | None = None
    password: str | None = None


def tls_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context: the broker verified against ``ca_file`` (None: the system's
    CAs) and its host name; a client certificate when ``cert_file`` is given.

    Raises ValueError naming the file that cannot be used."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the CA file {ca_file}: {exc}") from exc
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot use the client certificate {cert_file} / key {key_file}: {exc}"
            ) from exc
    return context


class MqttProtocolError(ConnectionError):
    """The broker broke the protocol or refused us; the connection is dropped and retried."""


class _BrokerClosedError(ConnectionResetError):
    """The broker ended the connection (end of stream)."""


_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _PINGRESP = 8, 9, 13
_PINGREQ_PACKET = b"\xc0\x00"
_DISCONNECT_PACKET = b"\xe0\x00"
_RECV_BYTES = 256 * 1024
_POLL_S = 0.25  # how often the reader looks at the stop flag and the keep-alive
_IO_TIMEOUT_S = 5.0  # connect, CONNACK, and a write the broker does not take
_TLS_ENDED = (
    "the broker ended the TLS session before CONNACK "
    "(does it require a client certificate, or not trust this one?)"
)
MAX_QUEUED = 60_000
"""QoS 1 messages awaiting their PUBACK at most: packet ids are 16 bits."""
_TAKEOVER_WINDOW_S = 10.0  # a connection the broker ends sooner may have been taken over
_TAKEOVER_LOG_INTERVAL_S = 60.0
_CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised (user name or password wrong or missing, or not allowed)",
}


def _remaining_length(n: int) -> bytes:
    if n < 128:
        return _SHORT_LENGTHS[n]
    if n < 16384:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


_SHORT_LENGTHS = [bytes((n,)) for n in range(128)]


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(
    client_id: str,
    keepalive_s: int,
    *,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """CONNECT with a clean session; the will (topic, payload) is QoS 1 and retained."""
    flags = 0x02
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3) | 0x20
        payload += _utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive_s) + payload
    return bytes((_CONNECT << 4,)) + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8(topic) + bytes((qos,))
    return bytes((_SUBSCRIBE << 4 | 0x02,)) + _remaining_length(len(body)) + body


def publish_packet(
    topic: str, payload: bytes, *, retain: bool = False, packet_id: int | None = None
) -> bytes:
    """A PUBLISH packet: QoS 0, or QoS 1 with ``packet_id`` (DUP clear: ``_DUP`` is or-ed
    into byte 0 for a resend)."""
    name = _topic_name(topic)
    if packet_id is None:
        header = b"\x31" if retain else b"\x30"
        return b"".join((header, _remaining_length(len(name) + len(payload)), name, payload))
    header = b"\x33" if retain else b"\x32"
    length = _remaining_length(len(name) + 2 + len(payload))
    return b"".join((header, length, name, packet_id.to_bytes(2, "big"), payload))


@functools.lru_cache(maxsize=65536)
def _topic_name(topic: str) -> bytes:
    """A topic as a PUBLISH packet spells it (length, UTF-8): the daemon publishes to the
    same few topics per turbine again and again."""
    return _utf8(topic)


_DUP = 0x08


class _Pending:
    """A QoS 1 message awaiting its PUBACK."""

    __slots__ = ("packet", "sent")

    def __init__(self, packet: bytes) -> None:
        self.packet = packet
        self.sent = False  # went out on some connection (a resend carries DUP)


class MqttClient:
    """One connection to the broker, with its reader thread; owned by whoever builds it."""

    def __init__(
        self,
        *,
        broker: BrokerConfig,
        client_id: str,
        subscription: str | None = None,
        qos: int = 0,
        on_message: MessageHandler | None = None,
        on_batch: BatchHandler | None = None,
        on_oversized: OversizedHandler | None = None,
        max_packet_bytes: int = 1024 * 1024,
        status_topic: str | None = None,
        max_queued: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if subscription is not None and on_message is None and on_batch is None:
            raise ValueError("a subscription needs on_message or on_batch")
        if not 1 <= max_queued <= MAX_QUEUED:
            raise ValueError(f"max_queued must be within 1..{MAX_QUEUED}")
        self.broker = broker
        self.client_id = client_id
        self.subscription = subscription
        self.qos = qos
        self.max_packet_bytes = max_packet_bytes
        self.status_topic = status_topic
        self.max_queued = max_queued
        self._on_message = on_message
        self._on_batch = on_batch
        self._on_oversized = on_oversized
        self._hooks: list[Callable[[MqttClient], None]] = []
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()  # writes come from several threads
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._skip = 0  # bytes still to skip of an oversized packet
        # QoS 1 messages awaiting their PUBACK, by packet id, oldest first. At most
        # max_queued (< 65535, so a free packet id always exists). Guarded by _sock_lock.
        self._unacked: OrderedDict[int, _Pending] = OrderedDict()
        self._next_id = 1
        self._tls_lock: threading.Lock | contextlib.nullcontext[None] = (
            self._sock_lock if broker.tls is not None else contextlib.nullcontext()
        )
        self.connects = 0
        self.received = 0
        self.sent = 0
        self.unsent = 0
        """QoS 0 messages not sent because the broker was unreachable at the time."""
        self.acked = 0
        """QoS 1 messages the broker acknowledged."""
        self.overflowed = 0
        """QoS 1 messages dropped unacknowledged because the queue was full."""
        self.takeovers = 0
        """Connections the broker ended and took back at once (a client id in use twice)."""
        self._takeover_logged = -math.inf
        self._overflow_logged = -math.inf
        self.handler_errors = 0

    # ---- lifecycle

    def on_connected(self, hook: Callable[[MqttClient], None]) -> None:
        """Call ``hook(client)`` after every (re)connection, on the client's thread."""
        self._hooks.append(hook)

    def start(self) -> None:
        """Connect in the background, retrying until the broker answers."""
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}")
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """DISCONNECT after what was already written, close, and join the thread."""
        self._stop.set()
        with self._sock_lock:
            sock = self._sock
            # OSError: the broker is gone already, or the socket is not connected (yet)
            if sock is not None and self._connected.is_set():
                goodbye = _DISCONNECT_PACKET
                if self.status_topic is not None:  # a clean DISCONNECT discards the will
                    goodbye = publish_packet(self.status_topic, b"offline", retain=True) + goodbye
                with contextlib.suppress(OSError):
                    sock.sendall(goodbye)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    @property
    def queued(self) -> int:
        """QoS 1 messages not yet acknowledged (waiting to be sent, or for their PUBACK)."""
        return len(self._unacked)

    # ---- publishing (any thread)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 0) -> bool:
        """Send one message; QoS 0: False (and counted) when not connected."""
        return self.publish_many([(topic, payload)], retain=retain, qos=qos) == 1

    def publish_many(
        self, messages: Iterable[tuple[str, bytes]], *, retain: bool = False, qos: int = 0
    ) -> int:
        """Send messages with one write. QoS 0: returns how many were sent (all or none).
        QoS 1: all are queued until acknowledged (sent now when connected); returns how many."""
        if qos == 1:
            return self._publish_qos1(messages, retain)
        packets = [publish_packet(topic, payload, retain=retain) for topic, payload in messages]
        if not packets:
            return 0
        with self._sock_lock:
            sent = self._write(b"".join(packets))
        if not sent:
            self.unsent += len(packets)
            return 0
        self.sent += len(packets)
        return len(packets)

    def _publish_qos1(self, messages: Iterable[tuple[str, bytes]], retain: bool) -> int:
        with self._sock_lock:
            unacked = self._unacked
            fresh: list[tuple[int, bytes]] = []
            overflow = 0
            for topic, payload in messages:
                if len(unacked) >= self.max_queued:  # the oldest goes (a new one only if the
                    unacked.popitem(last=False)  # batch alone overflows)
                    overflow += 1
                packet_id = self._packet_id()
                packet = publish_packet(topic, payload, retain=retain, packet_id=packet_id)
                unacked[packet_id] = _Pending(packet)
                fresh.append((packet_id, packet))
            self.overflowed += overflow
            if overflow:
                fresh = [(i, p) for i, p in fresh if i in unacked]
            if fresh and self._write(b"".join(p for _i, p in fresh)):
                for packet_id, _packet in fresh:
                    unacked[packet_id].sent = True
                self.sent += len(fresh)
        if overflow and self._clock() - self._overflow_logged >= _TAKEOVER_LOG_INTERVAL_S:
            self._overflow_logged = self._clock()
            log.warning(
                "publish queue full: oldest unacknowledged messages dropped",
                client=self.client_id,
                dropped_total=self.overflowed,
                max_queued=self.max_queued,
            )
        return len(fresh)

    def _packet_id(self) -> int:
        """A packet id not in use (under ``_sock_lock``)."""
        packet_id = self._next_id
        while packet_id in self._unacked:
            packet_id = packet_id % 65535 + 1
        self._next_id = packet_id % 65535 + 1
        return packet_id

    def _write(self, data: bytes) -> bool:
        """Send ``data`` on the current connection (under ``_sock_lock``); False if none."""
        sock = self._sock if self._connected.is_set() else None
        if sock is None:
            return False
        try:
            sock.sendall(data)
        except OSError as exc:
            # part of a packet may have gone out: close the connection so the
            # broker drops it, and let the reader reconnect
            log.warning("publishing failed", client=self.client_id, error=str(exc))
            self._connected.clear()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return False
        return True

    # ---- the thread

    def _run(self) -> None:
        delay = float(self.broker.reconnect_min_s)
        taken_over = False  # the last connection was ended by the broker soon after it began
        while not self._stop.is_set():
            try:
                sock = self._connect()
            except (OSError, MqttProtocolError) as exc:
                taken_over = False
                log.warning(
                    "cannot connect to the broker",
                    client=self.client_id,
                    error=str(exc) or type(exc).__name__,
                    retry_in_s=delay,
                )
            else:
                if taken_over:
                    self._took_over()
                else:
                    delay = float(self.broker.reconnect_min_s)
                taken_over = False
                connected_at = self._clock()
                try:
                    for hook in self._hooks:
                        hook(self)
                    self._read(sock)
                except (OSError, MqttProtocolError) as exc:
                    if not self._stop.is_set():
                        taken_over = (
                            isinstance(exc, _BrokerClosedError)
                            and self._clock() - connected_at < _TAKEOVER_WINDOW_S
                        )
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

    def _took_over(self) -> None:
        """The broker ended our connection and accepted the next at once: the sign of
        another client with our client id (each connection takes the session over)."""
        self.takeovers += 1
        now = self._clock()
        if now - self._takeover_logged >= _TAKEOVER_LOG_INTERVAL_S:
            self._takeover_logged = now
            log.error(
                "another MQTT client is probably using this client id",
                client=self.client_id,
                likely_cause=(
                    f"the broker ended the connection of {self.client_id!r} soon after "
                    "accepting it, and accepted the next one at once: that is what a second "
                    "client connecting with the same client id does (e.g. two edge-app daemons "
                    "with the same mqtt_client_id on one broker); give each its own"
                ),
                takeovers=self.takeovers,
            )

    def _close(self) -> None:
        with self._sock_lock:
            sock, self._sock = self._sock, None
            self._connected.clear()
            self._subscribed.clear()
        if sock is not None:
            sock.close()

    def _connect(self) -> socket.socket:
        broker = self.broker
        sock = socket.create_connection((broker.host, broker.port), timeout=_IO_TIMEOUT_S)
        try:
            if broker.tls is not None:
                sock = broker.tls.wrap_socket(sock, server_hostname=broker.host)
            will = None if self.status_topic is None else (self.status_topic, b"offline")
            sock.sendall(
                connect_packet(
                    self.client_id,
                    broker.keepalive_s,
                    username=broker.username,
                    password=broker.password,
                    will=will,
                )
            )
            ack = b""
            while len(ack) < 4:
                chunk = sock.recv(4 - len(ack))
                if not chunk:
                    raise ConnectionResetError(
                        _TLS_ENDED if broker.tls is not None else "the broker closed the connection"
                    )
                ack += chunk
            if ack[0] >> 4 != _CONNACK or ack[1] != 2:
                raise MqttProtocolError(f"expected CONNACK, got {ack.hex()}")
            if ack[3]:
                reason = _CONNACK_CODES.get(ack[3], f"code {ack[3]}")
                raise MqttProtocolError(f"broker refused the connection: {reason}")
            if self.subscription is not None:
                sock.sendall(subscribe_packet(1, self.subscription, self.qos))
            if self.status_topic is not None:
                sock.sendall(publish_packet(self.status_topic, b"online", retain=True))
        except ssl.SSLEOFError as exc:  # TLS 1.3: a refused client certificate can look so
            sock.close()
            raise MqttProtocolError(_TLS_ENDED) from exc
        except BaseException:
            sock.close()
            raise
        with self._sock_lock:
            self._sock = sock
            self._connected.set()
            resent = self._resend()
        self.connects += 1
        log.info(
            "connected to the broker",
            client=self.client_id,
            host=self.broker.host,
            port=self.broker.port,
            tls=self.broker.tls is not None,
            reconnect=self.connects > 1,
            resent=resent or None,
        )
        return sock

    def _resend(self) -> int:
        """After connecting (under ``_sock_lock``): every unacknowledged QoS 1 message, in
        order, DUP set on those that went out before."""
        if not self._unacked:
            return 0
        packets = []
        for entry in self._unacked.values():
            packet = entry.packet
            if entry.sent:
                packet = bytes((packet[0] | _DUP,)) + packet[1:]
            packets.append(packet)
            entry.sent = True
        if not self._write(b"".join(packets)):
            return 0
        self.sent += len(packets)
        return len(packets)

    def _read(self, sock: socket.socket) -> None:
        keepalive = float(self.broker.keepalive_s)
        buffer = bytearray()
        self._skip = 0
        last_ping = last_received = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now - last_ping >= keepalive / 2:
                with self._sock_lock:
                    sock.sendall(_PINGREQ_PACKET)
                last_ping = now
            if now - last_received > 1.5 * keepalive:
                raise MqttProtocolError(f"nothing from the broker for {1.5 * keepalive:.0f} s")
            # TLS: decrypted bytes may wait in the SSL object, unseen by select
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
            if not pending:
                readable, _, _ = select.select([sock], [], [], _POLL_S)
                if not readable:
                    continue
            with self._tls_lock:
                chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                raise _BrokerClosedError("the broker closed the connection")
            last_received = self._clock()
            if self._skip:
                skipped = min(self._skip, len(chunk))
                self._skip -= skipped
                chunk = chunk[skipped:]
            buffer += chunk
            if buffer:
                del buffer[: self._packets(sock, buffer, last_received)]

    def _packets(self, sock: socket.socket, buf: bytearray, arrival: float) -> int:
        """Handle every complete packet at the start of ``buf``; returns the bytes consumed.

        With ``on_batch``, the PUBLISH packets' messages go to it together once the
        complete packets are cut (in order; other packets are handled as they come)."""
        batch = self._on_batch
        if batch is None:
            return self._cut(sock, buf, arrival, None)
        messages: tuple[list[bytes], list[bytes]] = ([], [])
        try:
            return self._cut(sock, buf, arrival, messages)
        finally:
            if messages[0]:
                self._deliver(batch, *messages, arrival)

    def _deliver(
        self, handler: BatchHandler, topics: list[bytes], payloads: list[bytes], arrival: float
    ) -> None:
        try:
            handler(topics, payloads, arrival)
        except Exception:  # a bug in the handler must not end the stream
            self.handler_errors += 1
            if self.handler_errors <= 10 or self.handler_errors % 10000 == 0:
                log.exception("message handler failed", errors=self.handler_errors)

    def _cut(
        self,
        sock: socket.socket,
        buf: bytearray,
        arrival: float,
        messages: tuple[list[bytes], list[bytes]] | None,
    ) -> int:
        """The packets of ``buf``: messages appended to ``messages`` (topics, payloads) when
        given, else handed to ``on_message`` one by one."""
        on_message = self._on_message
        add_topic, add_payload = (None, None) if messages is None else (m.append for m in messages)
        max_packet = self.max_packet_bytes
        size = len(buf)
        data = bytes(buf)  # one copy: its slices are the payloads, no copy each
        pos = 0
        while pos + 2 <= size:
            header = data[pos]
            length = data[pos + 1]
            at = pos + 2
            if length & 0x80:  # remaining length: 1 to 4 bytes, 7 bits each
                length &= 0x7F
                shift = 7
                while True:
                    if at >= size:
                        return pos  # incomplete header
                    byte = data[at]
                    length |= (byte & 0x7F) << shift
                    at += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttProtocolError("malformed remaining length")
            end = at + length
            if header >> 4 != _PUBLISH:
                if end > size:
                    return pos
                self._control(header >> 4, data[at:end])
                pos = end
                continue
            if length > max_packet:
                self._oversized(data, at, length, arrival)
                if end > size:
                    self._skip = end - size
                    return size
                pos = end
                continue
            if end > size:
                return pos
            start = at + 2 + ((data[at] << 8) | data[at + 1]) if length >= 2 else end + 1
            if start > end:
                raise MqttProtocolError("PUBLISH topic longer than its packet")
            topic = data[at + 2 : start]
            if header & 0x06:  # QoS 1: a packet id follows the topic
                with self._sock_lock:
                    sock.sendall(b"\x40\x02" + data[start : start + 2])
                start += 2
            self.received += 1
            if add_topic is not None and add_payload is not None:
                add_topic(topic)
                add_payload(data[start:end])
            elif on_message is not None:
                self._handle(on_message, topic, data[start:end], arrival)
            pos = end
        return pos

    def _handle(
        self, handler: MessageHandler, topic: bytes, payload: bytes, arrival: float
    ) -> None:
        try:
            handler(topic.decode("utf-8", "replace"), payload, arrival)
        except Exception:  # a bug in the handler must not end the stream
            self.handler_errors += 1
            if self.handler_errors <= 10 or self.handler_errors % 10000 == 0:
                log.exception("message handler failed", errors=self.handler_errors)

    def _control(self, kind: int, body: bytes) -> None:
        """A packet other than PUBLISH."""
        if kind == _PUBACK and len(body) == 2:
            with self._sock_lock:
                if self._unacked.pop((body[0] << 8) | body[1], None) is not None:
                    self.acked += 1
        elif kind == _SUBACK:
            self._suback(body)
        elif kind != _PINGRESP:
            raise MqttProtocolError(f"unexpected packet type {kind} from the broker")

    def _suback(self, body: bytes) -> None:
        granted = body[2:]
        if not granted or granted[0] == 0x80:
            raise MqttProtocolError(f"the broker refused the subscription to {self.subscription!r}")
        self._subscribed.set()
        log.info("subscribed", client=self.client_id, topic=self.subscription, qos=granted[0])

    def _oversized(self, buf: bytes, at: int, length: int, arrival: float) -> None:
        topic = "<unknown>"
        if at + 2 <= len(buf):
            topic_end = at + 2 + ((buf[at] << 8) | buf[at + 1])
            if topic_end <= len(buf):
                topic = buf[at + 2 : topic_end].decode("utf-8", "replace")
        if self._on_oversized is not None:
            self._on_oversized(topic, length, arrival)
