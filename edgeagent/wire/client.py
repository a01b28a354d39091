"""A gRPC client for unary calls over a Unix socket.

Each call borrows a connection from a small pool, runs one stream on it from
start to finish on the calling thread and gives it back, so concurrent
callers use separate connections and no call waits for a background thread.
A deadline is enforced here: the stream is reset and the connection dropped.
``Channel.close`` also ends the calls in flight (their sockets are shut down,
the callers get CANCELLED at once), so a process stopping while the agent hangs
never waits out a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path

from edgeagent.wire import h2
from edgeagent.wire.h2 import ErrorCode, Status

_RECV = 256 * 1024
_STREAM_WINDOW = 1 << 24
_CONN_WINDOW = 1 << 26
_MAX_FRAME = 1 << 20
_MAX_IDLE = 8


class CallError(Exception):
    """A call ended without a response: the gRPC status and its message."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class _BrokenError(Exception):
    """The connection cannot carry another call."""


class _Connection:
    def __init__(self, path: Path, *, timeout: float, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise CallError(Status.UNAVAILABLE, _unreachable(path, exc)) from None
        # blocking mode with kernel timeouts: a timed-out recv/send fails with EAGAIN.
        # (Python's own timeout mode adds a poll() before every recv and send.)
        sock.settimeout(None)
        self.sock = sock
        self._timeout_set = 0.0
        self._rbuf = bytearray(_RECV)  # reused: recv(n) would allocate n bytes every call
        self._rview = memoryview(self._rbuf)
        self.reader = h2.FrameReader(_MAX_FRAME)
        self.decoder = h2.HeaderDecoder(64 * 1024)
        self.next_sid = 1
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_initial_window = h2.DEFAULT_WINDOW
        self.peer_max_frame = h2.DEFAULT_MAX_FRAME
        self.recv_unacked = 0
        self.usable = True
        self.cancelled = False
        self._pending: deque[h2.Frame] = deque()
        self._headers_cache: dict[str, bytes] = {}
        try:
            self._send(
                h2.PREFACE
                + h2.settings_frame(
                    {
                        h2.ENABLE_PUSH: 0,
                        h2.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                        h2.MAX_FRAME_SIZE: _MAX_FRAME,
                    }
                )
                + h2.window_update(0, _CONN_WINDOW - h2.DEFAULT_WINDOW)
            )
        except (_BrokenError, TimeoutError) as exc:
            self.close()
            raise CallError(Status.UNAVAILABLE, str(exc) or "the agent did not answer") from None

    def close(self) -> None:
        self.usable = False
        with contextlib.suppress(OSError):
            self.sock.close()

    def cancel(self) -> None:
        """From another thread: end the call in flight (a blocked recv/send returns at once)."""
        self.cancelled = True
        self.usable = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def set_timeout(self, seconds: float) -> None:
        """Bound each blocking recv/send by ``seconds`` (the call's deadline is checked too)."""
        seconds = max(0.001, seconds)
        if abs(seconds - self._timeout_set) <= 0.05 * seconds:
            return
        secs = int(seconds)
        tv = struct.pack("ll", secs, int((seconds - secs) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._timeout_set = seconds

    def _send(self, *parts: bytes | memoryview) -> None:
        try:
            for part in parts:
                self.sock.sendall(part)
        except BlockingIOError:
            raise TimeoutError from None
        except OSError as exc:
            reason = self._goaway_reason() or f"the agent closed the connection: {exc}"
            raise _BrokenError(reason) from None

    def _goaway_reason(self) -> str | None:
        """Why the agent hung up, if a GOAWAY it sent is still unread (e.g. over its
        connection limit)."""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536, socket.MSG_DONTWAIT):
                data += chunk
        try:
            frames = [*self._pending, *self.reader.feed(data)]
        except h2.ProtocolError:
            return None
        for f in frames:
            if f.kind == h2.GOAWAY and len(f.payload) >= 8:
                return _gone(f.payload).message
        return None

    def _next_frame(self, deadline: float) -> h2.Frame:
        """The next frame; connection-level control is handled here, and the frame returned."""
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                n = self.sock.recv_into(self._rbuf)
            except BlockingIOError:
                raise TimeoutError from None
            except OSError as exc:
                raise _BrokenError(f"the agent closed the connection: {exc}") from None
            if not n:
                raise _BrokenError("the agent closed the connection")
            self._pending.extend(self.reader.feed(bytes(self._rview[:n])))
        f = self._pending.popleft()
        if f.kind == h2.SETTINGS and not f.flags & h2.ACK:
            values = h2.parse_settings(f.payload)
            if h2.INITIAL_WINDOW_SIZE in values:
                self.peer_initial_window = values[h2.INITIAL_WINDOW_SIZE]
            self.peer_max_frame = values.get(h2.MAX_FRAME_SIZE, self.peer_max_frame)
            self._send(h2.frame(h2.SETTINGS, h2.ACK, 0))
        elif f.kind == h2.PING and not f.flags & h2.ACK:
            self._send(h2.frame(h2.PING, h2.ACK, 0, f.payload[:8]))
        elif f.kind == h2.WINDOW_UPDATE and not f.stream_id and len(f.payload) == 4:
            self.send_window += struct.unpack(">I", f.payload)[0] & 0x7FFF_FFFF
        elif f.kind == h2.DATA:
            self.recv_unacked += len(f.payload)
            if self.recv_unacked >= _CONN_WINDOW // 2:
                self._send(h2.window_update(0, self.recv_unacked))
                self.recv_unacked = 0
        elif f.kind == h2.GOAWAY:
            self.usable = False
        return f

    def _headers(self, method: str) -> bytes:
        block = self._headers_cache.get(method)
        if block is None:
            block = h2.encode_headers(
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", method.encode()),
                    (b":authority", b"localhost"),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                ]
            )
            self._headers_cache[method] = block
        return block

    def unary(self, method: str, request: bytes, deadline: float) -> memoryview:
        self.set_timeout(deadline - time.monotonic())
        sid = self.next_sid
        self.next_sid += 2
        if self.next_sid > 2**31 - 1:
            self.usable = False
        body = memoryview(h2.message(request))
        stream_window = self.peer_initial_window
        head = h2.frame(h2.HEADERS, h2.END_HEADERS, sid, self._headers(method))
        pos = 0
        response: list[bytes] = []
        received = 0
        headers: dict[bytes, bytes] | None = None
        stream_unacked = 0
        ended = False  # the agent ended the stream: nothing to reset
        try:
            while True:
                n = min(len(body) - pos, self.send_window, stream_window, self.peer_max_frame)
                if n > 0:
                    flags = h2.END_STREAM if pos + n == len(body) else 0
                    frame_head = struct.pack(">BHBBI", n >> 16, n & 0xFFFF, h2.DATA, flags, sid)
                    if n <= 65536:
                        self._send(head + frame_head + bytes(body[pos : pos + n]))
                    else:
                        self._send(head + frame_head, body[pos : pos + n])
                    head = b""
                    pos += n
                    self.send_window -= n
                    stream_window -= n
                    continue
                before = self.peer_initial_window
                f = self._next_frame(deadline)
                stream_window += self.peer_initial_window - before  # a SETTINGS change
                if f.kind == h2.WINDOW_UPDATE and f.stream_id == sid and len(f.payload) == 4:
                    stream_window += struct.unpack(">I", f.payload)[0] & 0x7FFF_FFFF
                elif f.kind == h2.GOAWAY and len(f.payload) >= 8:
                    last_sid = struct.unpack(">I", f.payload[:4])[0] & 0x7FFF_FFFF
                    if sid > last_sid:
                        raise _gone(f.payload)
                elif f.stream_id != sid:
                    if f.kind == h2.HEADERS and f.stream_id:
                        self._header_block(f, deadline)  # a stale stream's: keeps HPACK state
                elif f.kind == h2.RST_STREAM:
                    ended = True
                    raise _reset(f)
                elif f.kind in (h2.HEADERS, h2.CONTINUATION):
                    decoded = self._header_block(f, deadline)
                    if headers is None:
                        headers = dict(decoded)
                        status = decoded.get(b":status")
                        if status != b"200":
                            raise CallError(
                                Status.UNAVAILABLE if status == b"503" else Status.INTERNAL,
                                f"the agent answered HTTP {status!r}",
                            )
                    else:
                        headers.update(decoded)
                    if f.flags & h2.END_STREAM:
                        ended = True
                        return self._result(headers, response)
                elif f.kind == h2.DATA:
                    data = h2.strip_padding(f)
                    response.append(data)
                    received += len(data)
                    stream_unacked += len(f.payload)
                    if received > self.max_message_bytes + 5:
                        raise CallError(
                            Status.RESOURCE_EXHAUSTED,
                            f"response larger than this client's limit of "
                            f"{self.max_message_bytes} bytes",
                        )
                    if f.flags & h2.END_STREAM:
                        ended = True
                        raise CallError(Status.INTERNAL, "the response ended without status")
                    if stream_unacked >= _STREAM_WINDOW // 2:
                        self._send(h2.window_update(sid, stream_unacked))
                        stream_unacked = 0
        except CallError:
            if not ended:
                self._reset_quietly(sid)
            raise
        except TimeoutError:
            self.close()
            if self.cancelled:
                raise _cancelled() from None
            raise CallError(Status.DEADLINE_EXCEEDED, "the agent did not answer in time") from None
        except _BrokenError as exc:
            self.close()
            if self.cancelled:
                raise _cancelled() from None
            raise CallError(Status.UNAVAILABLE, str(exc)) from None
        except h2.ProtocolError as exc:
            self.close()
            raise CallError(Status.INTERNAL, f"protocol error from the agent: {exc}") from None

    def _header_block(self, first: h2.Frame, deadline: float) -> dict[bytes, bytes]:
        """The decoded header block starting at ``first`` (reading its CONTINUATIONs)."""
        if first.kind != h2.HEADERS:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        block = bytearray(h2.strip_padding(first))
        flags = first.flags
        while not flags & h2.END_HEADERS:
            f = self._next_frame(deadline)
            if f.kind != h2.CONTINUATION or f.stream_id != first.stream_id:
                raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
            block += f.payload
            flags = f.flags
        return self.decoder.decode(bytes(block))

    def _result(self, headers: dict[bytes, bytes], parts: list[bytes]) -> memoryview:
        raw_status = headers.get(b"grpc-status")
        if raw_status != b"0":
            if raw_status is None:
                raise CallError(Status.INTERNAL, "the response carries no grpc-status")
            try:
                code = Status(int(raw_status))
            except ValueError:
                code = Status.UNKNOWN
            raise CallError(code, h2.decode_grpc_message(headers.get(b"grpc-message", b"")))
        response = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(response) < 5 or response[0] != 0:
            raise CallError(Status.INTERNAL, "the response is not one uncompressed message")
        (length,) = struct.unpack_from(">I", response, 1)
        if length != len(response) - 5:
            raise CallError(Status.INTERNAL, "the response is not exactly one message")
        return memoryview(response)[5:]

    def _reset_quietly(self, sid: int) -> None:
        try:
            self._send(h2.rst_stream(sid, ErrorCode.CANCEL))
        except (_BrokenError, TimeoutError):
            self.close()


def _gone(goaway: bytes) -> CallError:
    """The agent will not serve this call on this connection (GOAWAY)."""
    code = struct.unpack(">I", goaway[4:8])[0]
    if code == ErrorCode.NO_ERROR:
        return CallError(Status.UNAVAILABLE, "the agent is shutting down")
    reason = goaway[8:].decode("utf-8", "replace") or f"HTTP/2 error {code}"
    return CallError(Status.UNAVAILABLE, f"the agent closed the connection: {reason}")


def _reset(f: h2.Frame) -> CallError:
    code = struct.unpack(">I", f.payload[:4])[0] if len(f.payload) >= 4 else 0
    if code == ErrorCode.REFUSED_STREAM:
        return CallError(Status.UNAVAILABLE, "the agent refused the call (busy or stopping)")
    if code == ErrorCode.CANCEL:
        return CallError(Status.CANCELLED, "the agent cancelled the call")
    return CallError(Status.INTERNAL, f"the agent reset the call (HTTP/2 error {code})")


def _unreachable(path: Path, exc: OSError) -> str:
    """Why nothing answers on ``path``, in the words an operator acts on."""
    if isinstance(exc, FileNotFoundError):
        why = "the socket does not exist (is edge-agent running? is the path right?)"
    elif isinstance(exc, ConnectionRefusedError):
        why = "nothing listens on the socket (edge-agent stopped?)"
    elif isinstance(exc, PermissionError):
        why = "permission denied (is this user in the agent's group?)"
    else:
        why = str(exc)
    return f"no agent answering on {path}: {why}"


def _cancelled() -> CallError:
    return CallError(Status.CANCELLED, "the client was closed")


class Channel:
    """Unary calls to one Unix socket. Thread-safe."""

    def __init__(self, path: Path, *, max_message_bytes: int) -> None:
        self.path = path
        self.max_message_bytes = max_message_bytes
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()  # carrying a call: close() cancels them
        self._lock = threading.Lock()
        self._closed = False

    def unary(self, method: str, request: bytes, *, timeout: float) -> memoryview:
        """The response message of ``method`` (a view: copy it to keep it past the caller)."""
        if len(request) > self.max_message_bytes:
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"request of {len(request)} bytes is over this client's limit of "
                f"{self.max_message_bytes}",
            )
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise _cancelled()
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = _Connection(self.path, timeout=timeout, max_message_bytes=self.max_message_bytes)
        if not self._claim(conn):
            conn.close()
            raise _cancelled()
        try:
            return conn.unary(method, request, deadline)
        finally:
            with self._lock:
                self._busy.discard(conn)
                keep = conn.usable and not self._closed and len(self._idle) < _MAX_IDLE
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _claim(self, conn: _Connection) -> bool:
        """Count ``conn`` as carrying a call (close() cancels it); False once closed."""
        with self._lock:
            if not self._closed:
                self._busy.add(conn)
            return not self._closed

    def close(self) -> None:
        """Close the idle connections and cancel the calls in flight (any thread)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for conn in busy:
            conn.cancel()
        for conn in idle:
            conn.close()
