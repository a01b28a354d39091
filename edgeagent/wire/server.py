"""A gRPC server on a Unix socket: unary and server-streaming methods.

One reader thread per connection parses frames, answers SETTINGS and PING,
keeps flow control and hands each complete request to a worker pool; the
worker writes its own response (a single ``sendmsg`` for a small one), so a
call crosses one thread boundary. A method may say which of its requests are
cheap (``inline``: e.g. a Predict of a few windows); those run on the reader
thread itself when the connection has nothing else in flight, with no
hand-off at all. A concurrent call on the same connection then waits at most
that cheap call's time; anything else runs in the pool.

Bad input ends at the smallest scope that holds it: a malformed request gets
a gRPC status, a protocol violation ends its connection with GOAWAY, and
nothing a peer sends stops the server. Against peers that abuse the protocol
on purpose:

- connections are capped (``max_connections``; beyond it a connection gets
  GOAWAY and is closed), and one that has not sent the preface and its first
  SETTINGS within ``handshake_timeout`` is dropped. An idle connection holds
  no receive buffer (its thread waits in ``poll``; buffers are lent while
  bytes are read), so a connection costs its thread and a few KiB;
- work for a stream the client resets is dropped, and the stream counts
  toward the concurrent-stream limit until its work is gone; a connection
  that resets streams faster than ``_RESET_RATE`` per second (after a burst of
  ``_RESET_BURST``) gets GOAWAY ENHANCE_YOUR_CALM (CVE-2023-44487);
- one connection runs at most ``connection_workers`` calls in the pool at
  once (the rest wait, per connection, and are dropped if reset), and a
  response waits at most ``send_stall`` seconds in all for the peer's
  flow-control window (then the stream is reset and the worker freed);
- a header block may span at most ``_MAX_CONTINUATIONS`` CONTINUATION frames.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog

from edgeagent.wire import h2
from edgeagent.wire.h2 import ErrorCode, Status

log = structlog.get_logger(__name__)

_RECV = 256 * 1024
_STREAM_WINDOW = 1 << 20
_CONN_WINDOW = 1 << 24
_MAX_FRAME = 1 << 20
_MAX_HEADER_LIST = 16 * 1024
_MAX_IOV = 512
_MAX_GRPC_MESSAGE_TEXT = 2048
_MAX_CONTINUATIONS = 16  # CONTINUATION frames one header block may take
_RESET_BURST = 200  # stream resets a connection may send at once ...
_RESET_RATE = 50.0  # ... and per second after that (nghttp2: 1000 and 33)
_RECENTLY_CLOSED = 1024  # streams we ended early whose late frames are ignored
_WARN_EVERY = 10.0  # seconds between warnings about the same kind of abuse

# receive buffers, lent to a reader while it copies what arrived: an idle
# connection waits in poll() and holds none
_buffers: list[bytearray] = []

_RESPONSE_HEADERS = h2.encode_headers(
    [(b":status", b"200"), (b"content-type", b"application/grpc")]
)
_OK_TRAILERS = h2.encode_headers([(b"grpc-status", b"0")])
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


class RpcError(Exception):
    """Raised by a method: the call ends with this status and message."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamCall:
    """What a streaming method sees of its call."""

    def __init__(self, stream: _Stream, conn: _Connection) -> None:
        self._stream = stream
        self._conn = conn

    def active(self) -> bool:
        return not (self._stream.closed or self._conn.dead or self._conn.server.stopping)


Unary = Callable[[Any], bytes]
Streaming = Callable[[Any, StreamCall], Iterator[bytes]]


@dataclass(frozen=True, slots=True)
class Method:
    """How to serve one path: ``parse`` turns the request message into what ``unary``
    (one response) or ``streaming`` (any number) take, raising ``RpcError`` for a bad
    one; ``inline`` says whether a parsed request is cheap enough to run on the
    connection's reader thread."""

    parse: Callable[[bytes], Any]
    unary: Unary | None = None
    streaming: Streaming | None = None
    inline: Callable[[Any], bool] | None = None


@dataclass(slots=True, eq=False)
class _Stream:
    sid: int
    method: Method | None
    window: int
    deadline: float | None = None
    body: list[bytes] = field(default_factory=list)  # DATA payloads, joined at the end
    received: int = 0
    headers_sent: bool = False
    unacked: int = 0  # body bytes received and not yet given back to the window
    discard: bool = False  # answered already (an error): the rest of its body is ignored
    closed: bool = False  # reset (by either end), or finished: nothing more is sent
    remote_done: bool = False  # the client ended its half (END_STREAM) or reset it
    working: bool = False  # its call waits for or runs on a worker
    orphaned: bool = False  # reset while working: counts toward the limit until done


Job = Callable[[], None]


def _timeout(value: bytes | None) -> float | None:
    if not value or len(value) < 2 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else time.monotonic() + int(value[:-1]) * unit


def _error_block(code: Status, text: str, *, trailers_only: bool) -> bytes:
    status = [
        (b"grpc-status", str(int(code)).encode()),
        (b"grpc-message", h2.encode_grpc_message(text[:_MAX_GRPC_MESSAGE_TEXT])),
    ]
    if trailers_only:
        status = [(b":status", b"200"), (b"content-type", b"application/grpc"), *status]
    return h2.encode_headers(status)


def _take_buffer() -> bytearray:
    try:
        return _buffers.pop()
    except IndexError:
        return bytearray(_RECV)


def _give_buffer(buffer: bytearray) -> None:
    if len(_buffers) < 8:
        _buffers.append(buffer)


class _Tally:
    """Counts one kind of event caused by clients and logs it at most every
    ``_WARN_EVERY`` seconds, so that a hostile client cannot flood the journal."""

    def __init__(self, event: str, **fields: object) -> None:
        self._event = event
        self._fields = fields
        self._lock = threading.Lock()
        self._count = 0
        self._logged = -_WARN_EVERY

    def add(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if now - self._logged < _WARN_EVERY:
                return
            count, self._count, self._logged = self._count, 0, now
        log.warning(self._event, count=count, **self._fields)


class _Connection:
    def __init__(self, sock: socket.socket, server: Server) -> None:
        self.sock = sock
        self.server = server
        self.lock = threading.Lock()
        self.window_open = threading.Condition(self.lock)
        self.streams: dict[int, _Stream] = {}
        self.running = 0  # this connection's calls handed to the pool and not yet done
        self.waiting: dict[int, tuple[_Stream, Job]] = {}  # over its share: wait, in order
        self.orphans = 0  # streams reset by the client whose work still runs
        self.recently_closed: dict[int, None] = {}  # ended by us early: late frames ignored
        self.reset_tokens = float(_RESET_BURST)
        self.reset_at = time.monotonic()
        self.dead = False
        self.goaway_sent = False
        self.last_sid = 0
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_initial_window = h2.DEFAULT_WINDOW
        self.peer_max_frame = h2.DEFAULT_MAX_FRAME
        self.recv_window = h2.DEFAULT_WINDOW
        self.reader = h2.FrameReader(_MAX_FRAME)
        self.decoder = h2.HeaderDecoder(_MAX_HEADER_LIST)
        # a header block in progress: stream, flags, bytes so far, CONTINUATION frames so far
        self._continuation: tuple[int, int, bytearray, int] | None = None

    # -- writing (any thread) --------------------------------------------
    def _sendv(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write every part; the caller holds ``self.lock``."""
        views = [memoryview(p) for p in parts if len(p)]
        while views:
            sent = self.sock.sendmsg(views[:_MAX_IOV])
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def write(self, data: bytes) -> None:
        with self.lock:
            if not self.dead:
                self._send_or_die([data])

    def _send_or_die(self, parts: Sequence[bytes | memoryview]) -> bool:
        try:
            self._sendv(parts)
        except OSError:
            self.dead = True
            self.window_open.notify_all()
            return False
        return True

    def _remember_closed(self, sid: int) -> None:
        """Under the lock: we ended ``sid`` while the client may still be sending on it."""
        self.recently_closed[sid] = None
        if len(self.recently_closed) > _RECENTLY_CLOSED:
            del self.recently_closed[next(iter(self.recently_closed))]

    def _end_locked(self, stream: _Stream) -> list[bytes]:
        """Under the lock: the stream ends with what the caller sends now; the frames
        returned go after it (a client still sending its request is asked to stop)."""
        stream.closed = True
        self.streams.pop(stream.sid, None)
        if stream.remote_done:
            return []
        stream.remote_done = True
        self._remember_closed(stream.sid)
        return [h2.rst_stream(stream.sid, ErrorCode.NO_ERROR)]

    def _drop_locked(self, stream: _Stream, *, by_us: bool) -> bool:
        """Under the lock: the stream is reset (by the client, or by us for a stream
        error). Its waiting work is dropped (returns True: the caller calls
        ``server.call_done``); work already running keeps counting toward the
        concurrent-stream limit until it ends."""
        stream.closed = True
        stream.remote_done = True
        self.streams.pop(stream.sid, None)
        if by_us:
            self._remember_closed(stream.sid)
        self.window_open.notify_all()
        if self.waiting.pop(stream.sid, None) is not None:
            stream.working = False
            return True
        if stream.working and not stream.orphaned:
            stream.orphaned = True
            self.orphans += 1
        return False

    def send_error(self, stream: _Stream, code: Status, text: str) -> None:
        with self.lock:
            if stream.closed or self.dead:
                return
            block = _error_block(code, text, trailers_only=not stream.headers_sent)
            frames = [h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream.sid, block)]
            self._send_or_die(frames + self._end_locked(stream))

    def send_messages(self, stream: _Stream, payloads: Iterator[bytes]) -> bool:
        """Response headers (once) and each payload as a message; False when the call ended.

        Waiting for the peer's window takes at most ``send_stall`` seconds in all; then
        the stream is reset and the worker is free again."""
        waited = 0.0
        stall = self.server.send_stall
        for payload in payloads:
            if len(payload) > self.server.max_message_bytes:
                self.send_error(
                    stream,
                    Status.RESOURCE_EXHAUSTED,
                    f"response of {len(payload)} bytes is over the limit of "
                    f"{self.server.max_message_bytes}",
                )
                return False
            data = memoryview(h2.message(payload))
            with self.lock:
                parts: list[bytes | memoryview] = []
                if not stream.headers_sent:
                    parts.append(
                        h2.frame(h2.HEADERS, h2.END_HEADERS, stream.sid, _RESPONSE_HEADERS)
                    )
                    stream.headers_sent = True
                pos = 0
                while pos < len(data):
                    while (
                        not (stream.closed or self.dead)
                        and min(self.send_window, stream.window) <= 0
                    ):
                        if parts and not self._send_or_die(parts):
                            return False
                        parts = []
                        if waited >= stall:
                            self._stalled_locked(stream)
                            return False
                        began = time.monotonic()
                        self.window_open.wait(min(1.0, stall - waited))
                        waited += time.monotonic() - began
                    if stream.closed or self.dead:
                        return False
                    n = min(len(data) - pos, self.send_window, stream.window, self.peer_max_frame)
                    parts.append(struct.pack(">BHBBI", n >> 16, n & 0xFFFF, h2.DATA, 0, stream.sid))
                    parts.append(data[pos : pos + n])
                    pos += n
                    self.send_window -= n
                    stream.window -= n
                if not self._send_or_die(parts):
                    return False
        return True

    def _stalled_locked(self, stream: _Stream) -> None:
        self.server.stalled.add()
        stream.closed = True
        stream.remote_done = True
        self.streams.pop(stream.sid, None)
        self._remember_closed(stream.sid)
        self._send_or_die([h2.rst_stream(stream.sid, ErrorCode.CANCEL)])

    def finish_now(self, stream: _Stream, payload: bytes) -> bool:
        """A small unary response in one write, if the windows allow it now."""
        n = len(payload) + 5
        if n > self.peer_max_frame:
            return False
        with self.lock:
            if stream.closed or self.dead:
                return True  # nobody to answer
            if min(self.send_window, stream.window) < n:
                return False
            self.send_window -= n
            stream.window -= n
            frames: list[bytes | memoryview] = [
                h2.frame(h2.HEADERS, h2.END_HEADERS, stream.sid, _RESPONSE_HEADERS)
                + struct.pack(">BHBBI", n >> 16, n & 0xFFFF, h2.DATA, 0, stream.sid)
                + b"\x00"
                + struct.pack(">I", len(payload)),
                payload,
                h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream.sid, _OK_TRAILERS),
            ]
            self._send_or_die([*frames, *self._end_locked(stream)])
            return True

    def finish_waiting(self, stream: _Stream, payload: bytes) -> None:
        """A unary response that ``finish_now`` could not send: as the windows allow."""
        if self.send_messages(stream, iter((payload,))):
            self.end_ok(stream)

    def end_ok(self, stream: _Stream) -> None:
        with self.lock:
            if stream.closed or self.dead:
                return
            trailers = h2.frame(
                h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream.sid, _OK_TRAILERS
            )
            self._send_or_die([trailers, *self._end_locked(stream)])

    # -- the connection's share of the workers ---------------------------------
    def enqueue(self, stream: _Stream, job: Job) -> None:
        """Run ``job`` for ``stream`` on a worker, within this connection's share of them."""
        self.server.call_started()
        with self.lock:
            stream.working = True
            if self.running >= self.server.connection_workers:
                self.waiting[stream.sid] = (stream, job)
                return
            self.running += 1
        self._submit(stream, job)

    def _submit(self, stream: _Stream, job: Job) -> None:
        try:
            self.server.pool.submit(self._run_job, stream, job)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.send_error(stream, Status.UNAVAILABLE, "the agent is shutting down")
            self._job_done(stream)

    def _run_job(self, stream: _Stream, job: Job) -> None:
        try:
            if not (stream.closed or self.dead):  # a reset stream's work is dropped
                job()
        finally:
            self._job_done(stream)

    def _job_done(self, stream: _Stream) -> None:
        following: tuple[_Stream, Job] | None = None
        with self.lock:
            stream.working = False
            if stream.orphaned:
                stream.orphaned = False
                self.orphans -= 1
            self.running -= 1
            if self.waiting and not self.dead:
                following = self.waiting.pop(next(iter(self.waiting)))
                self.running += 1
        self.server.call_done()
        if following is not None:
            self._submit(*following)

    # -- running a call ----------------------------------------------------
    def run_call(self, stream: _Stream, request: Any, *, on_reader: bool = False) -> None:
        method = stream.method
        try:
            if method is None:
                raise RpcError(Status.UNIMPLEMENTED, "no such method")
            if stream.deadline is not None and time.monotonic() > stream.deadline:
                raise RpcError(Status.DEADLINE_EXCEEDED, "deadline passed before the call started")
            if method.unary is not None:
                response = method.unary(request)
                if not self.finish_now(stream, response):
                    if on_reader:  # waiting for window here would stop the reader: hand it off
                        self.enqueue(stream, lambda: self.finish_waiting(stream, response))
                    else:
                        self.finish_waiting(stream, response)
            elif method.streaming is not None:
                sent = self.send_messages(
                    stream, method.streaming(request, StreamCall(stream, self))
                )
                if self.server.stopping:
                    self.send_error(stream, Status.UNAVAILABLE, "the agent is shutting down")
                elif sent:
                    self.end_ok(stream)
        except RpcError as exc:
            self.send_error(stream, exc.code, exc.message)
        except Exception:
            log.exception("method failed", stream=stream.sid)
            self.send_error(stream, Status.INTERNAL, "internal error; see the agent's log")

    # -- reading (the connection's own thread) ---------------------------
    def serve(self) -> None:
        try:
            self._send_settings()
            if not self._handshake():
                return
            # an idle connection waits here without a buffer; one is lent per read
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            while True:
                poller.poll()
                buffer = _take_buffer()
                try:
                    n = self.sock.recv_into(buffer, _RECV, socket.MSG_DONTWAIT)
                    data = bytes(memoryview(buffer)[:n])
                except BlockingIOError:
                    continue
                finally:
                    _give_buffer(buffer)
                if not n:
                    return
                self._on_bytes(data)
        except h2.ProtocolError as exc:
            log.warning("closing a connection that broke the protocol", error=str(exc))
            self.write(h2.goaway(self.last_sid, exc.code, str(exc)))
        except OSError:
            pass
        finally:
            with self.lock:
                self.dead = True
                for stream in self.streams.values():
                    stream.closed = True
                self.streams.clear()
                dropped = list(self.waiting.values())
                self.waiting.clear()
                self.window_open.notify_all()
            for _stream, _job in dropped:
                self.server.call_done()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.server.forget(self)

    def _send_settings(self) -> None:
        self.write(
            h2.settings_frame(
                {
                    h2.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
                    h2.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                    h2.MAX_FRAME_SIZE: _MAX_FRAME,
                    h2.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
                    h2.ENABLE_PUSH: 0,
                }
            )
            + h2.window_update(0, _CONN_WINDOW - h2.DEFAULT_WINDOW)
        )
        self.recv_window = _CONN_WINDOW

    def _handshake(self) -> bool:
        """The client's preface and its first frame, which must be SETTINGS, within
        ``handshake_timeout`` (a slow client cannot hold a thread forever). False: the
        time ran out."""
        preface = h2.PREFACE
        need = len(preface) + h2.FRAME_HEADER
        got = b""
        deadline = time.monotonic() + self.server.handshake_timeout
        try:
            while len(got) < need:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                chunk = self.sock.recv(16384)
                if not chunk:
                    raise OSError("closed before the handshake ended")
                got += chunk
                if got[: len(preface)] != preface[: len(got)]:
                    raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
                if len(got) >= need and need == len(preface) + h2.FRAME_HEADER:
                    hi, lo, kind, flags, sid = struct.unpack_from(">BHBBI", got, len(preface))
                    size = (hi << 16) | lo
                    if kind != h2.SETTINGS or flags & h2.ACK or sid:
                        raise h2.ProtocolError(
                            ErrorCode.PROTOCOL_ERROR, "the preface must be followed by SETTINGS"
                        )
                    if size > _MAX_FRAME:
                        raise h2.ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {size} bytes")
                    need += size
        except TimeoutError:
            self.server.slow_handshakes.add()
            return False
        finally:
            self.sock.settimeout(None)
        self._on_bytes(got[len(preface) :])
        return True

    def _on_bytes(self, data: bytes) -> None:
        out: list[bytes] = []
        ready: list[tuple[_Stream, memoryview]] = []
        consumed = [0]
        for f in self.reader.feed(data):
            if self._continuation is not None and f.kind != h2.CONTINUATION:
                raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
            kind = f.kind
            if kind == h2.DATA:
                self._on_data(f, out, ready, consumed)
            elif kind == h2.HEADERS:
                if not f.stream_id:
                    raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
                block = h2.strip_padding(f)
                if f.flags & h2.END_HEADERS:
                    self._on_headers(f.stream_id, f.flags, block, out, ready)
                else:
                    self._continuation = (f.stream_id, f.flags, bytearray(block), 0)
            elif kind == h2.CONTINUATION:
                self._on_continuation(f, out, ready)
            elif kind == h2.SETTINGS:
                self._on_settings(f, out)
            elif kind == h2.PING:
                if f.stream_id:
                    raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
                if len(f.payload) != 8:
                    raise h2.ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING of wrong size")
                if not f.flags & h2.ACK:
                    out.append(h2.frame(h2.PING, h2.ACK, 0, f.payload))
            elif kind == h2.WINDOW_UPDATE:
                self._on_window_update(f, out)
            elif kind == h2.RST_STREAM:
                self._on_rst_stream(f)
            elif kind == h2.PRIORITY:
                self._on_priority(f, out)
            elif kind == h2.GOAWAY:
                pass  # the client stops opening streams; ours finish, then it closes
            elif kind == h2.PUSH_PROMISE:
                raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # unknown frame types are ignored, as RFC 9113 asks
        total = consumed[0]
        if total:
            self.recv_window -= total
            if self.recv_window < _CONN_WINDOW // 2:
                out.append(h2.window_update(0, _CONN_WINDOW - self.recv_window))
                self.recv_window = _CONN_WINDOW
        if out:
            self.write(b"".join(out))
        self._dispatch(ready)

    def _dispatch(self, ready: list[tuple[_Stream, memoryview]]) -> None:
        for stream, payload in ready:
            method = stream.method
            if method is None or stream.closed:
                continue  # answered UNIMPLEMENTED already, or reset in the same read
            try:
                # a view into the received frame, not a copy: protobuf parses any buffer
                request = method.parse(cast(bytes, payload))
            except RpcError as exc:
                self.send_error(stream, exc.code, exc.message)
                continue
            with self.lock:
                inline = self.running == 0 and not self.waiting and len(ready) == 1
            if inline and method.inline is not None and method.inline(request):
                self.server.call_started()
                try:
                    self.run_call(stream, request, on_reader=True)
                finally:
                    self.server.call_done()
            else:
                self.enqueue(stream, functools.partial(self.run_call, stream, request))

    def _on_continuation(
        self, f: h2.Frame, out: list[bytes], ready: list[tuple[_Stream, memoryview]]
    ) -> None:
        if self._continuation is None or f.stream_id != self._continuation[0]:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        sid, flags, block, count = self._continuation
        if count >= _MAX_CONTINUATIONS:
            raise h2.ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        block += f.payload
        if len(block) > _MAX_HEADER_LIST * 2:
            raise h2.ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if f.flags & h2.END_HEADERS:
            self._continuation = None
            self._on_headers(sid, flags, bytes(block), out, ready)
        else:
            self._continuation = (sid, flags, block, count + 1)

    def _idle(self, sid: int) -> bool:
        """A stream the client has not opened (ours would be even: we open none)."""
        return sid > self.last_sid or sid % 2 == 0

    def _stream_error(self, sid: int, code: ErrorCode, out: list[bytes]) -> None:
        """Reset one stream for a protocol error that concerns only it."""
        out.append(h2.rst_stream(sid, code))
        with self.lock:
            stream = self.streams.get(sid)
            dropped = stream is not None and self._drop_locked(stream, by_us=True)
        if dropped:
            self.server.call_done()

    def _on_headers(
        self,
        sid: int,
        flags: int,
        block: bytes,
        out: list[bytes],
        ready: list[tuple[_Stream, memoryview]],
    ) -> None:
        headers = self.decoder.decode(block)  # always: keeps HPACK state
        with self.lock:
            stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client end its half of the stream
            if stream.remote_done:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED, out)
                return
            if not flags & h2.END_STREAM:
                raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "second HEADERS without END")
            self._complete(stream, ready)
            return
        if sid % 2 == 0:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, f"bad stream id {sid}")
        if sid <= self.last_sid:  # a closed stream
            if sid not in self.recently_closed:  # (ended by us early: frames in flight)
                self._stream_error(sid, ErrorCode.STREAM_CLOSED, out)
            return
        self.last_sid = sid
        with self.lock:
            refused = (
                self.server.stopping
                or len(self.streams) + self.orphans >= self.server.max_concurrent_streams
            )
            if refused:
                self._remember_closed(sid)
        if refused:
            out.append(h2.rst_stream(sid, ErrorCode.REFUSED_STREAM))
            return
        path = headers.get(b":path", b"").decode("latin-1")
        method = self.server.methods.get(path)
        stream = _Stream(
            sid=sid,
            method=method,
            window=self.peer_initial_window,
            deadline=_timeout(headers.get(b"grpc-timeout")),
            remote_done=bool(flags & h2.END_STREAM),
        )
        with self.lock:
            self.streams[sid] = stream
        content_type = headers.get(b"content-type", b"")
        if headers.get(b":method") != b"POST" or not content_type.startswith(b"application/grpc"):
            stream.discard = True
            with self.lock:
                closing = self._end_locked(stream)
            out.append(
                h2.frame(
                    h2.HEADERS,
                    h2.END_HEADERS | h2.END_STREAM,
                    sid,
                    h2.encode_headers([(b":status", b"415")]),
                )
            )
            out.extend(closing)
            return
        if method is None:
            stream.discard = True
            self.send_error(stream, Status.UNIMPLEMENTED, f"unknown method {path}")
        elif headers.get(b"grpc-encoding", b"identity") != b"identity":
            stream.discard = True
            self.send_error(stream, Status.UNIMPLEMENTED, "compressed requests are not supported")
        if flags & h2.END_STREAM:
            self._complete(stream, ready)

    def _on_data(
        self,
        f: h2.Frame,
        out: list[bytes],
        ready: list[tuple[_Stream, memoryview]],
        consumed: list[int],
    ) -> None:
        sid = f.stream_id
        if not sid:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        consumed[0] += len(f.payload)
        if self._idle(sid):
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
        with self.lock:
            stream = self.streams.get(sid)
        if stream is None or stream.remote_done:
            if stream is None and sid in self.recently_closed:
                return  # ended by us early: its body was on the way; the bytes are dropped
            # the client ended or reset this stream itself: RFC 9113 section 5.1
            self._stream_error(sid, ErrorCode.STREAM_CLOSED, out)
            return
        if not stream.discard:
            data = h2.strip_padding(f)
            stream.body.append(data)
            stream.received += len(data)
            if stream.received > self.server.max_message_bytes + 5:
                stream.discard = True
                stream.body = []
                self.send_error(
                    stream,
                    Status.RESOURCE_EXHAUSTED,
                    f"request larger than the agent's limit of {self.server.max_message_bytes} "
                    "bytes (max_message_bytes)",
                )
        if f.flags & h2.END_STREAM:
            self._complete(stream, ready)
        elif not stream.closed:
            # keep the stream's window open while its body arrives
            stream.unacked += len(f.payload)
            if stream.unacked >= _STREAM_WINDOW // 2:
                out.append(h2.window_update(sid, stream.unacked))
                stream.unacked = 0

    def _complete(self, stream: _Stream, ready: list[tuple[_Stream, memoryview]]) -> None:
        stream.remote_done = True
        if stream.discard or stream.closed:
            return
        parts = stream.body
        stream.body = []
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(body) < 5:
            self.send_error(stream, Status.INTERNAL, "request without a message")
            return
        if body[0] != 0:
            self.send_error(stream, Status.UNIMPLEMENTED, "compressed messages are not supported")
            return
        (length,) = struct.unpack_from(">I", body, 1)
        if length != len(body) - 5:
            self.send_error(stream, Status.INTERNAL, "request is not exactly one message")
            return
        ready.append((stream, memoryview(body)[5:]))

    def _on_settings(self, f: h2.Frame, out: list[bytes]) -> None:
        if f.stream_id:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if f.flags & h2.ACK:
            if f.payload:
                raise h2.ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        values = h2.parse_settings(f.payload)
        with self.lock:
            if h2.INITIAL_WINDOW_SIZE in values:
                delta = values[h2.INITIAL_WINDOW_SIZE] - self.peer_initial_window
                self.peer_initial_window = values[h2.INITIAL_WINDOW_SIZE]
                for stream in self.streams.values():
                    stream.window += delta
                    if stream.window > h2.MAX_WINDOW:
                        raise h2.ProtocolError(
                            ErrorCode.FLOW_CONTROL_ERROR, "a stream's window overflows"
                        )
                self.window_open.notify_all()
            if h2.MAX_FRAME_SIZE in values:
                self.peer_max_frame = values[h2.MAX_FRAME_SIZE]
        out.append(h2.frame(h2.SETTINGS, h2.ACK, 0))

    def _on_window_update(self, f: h2.Frame, out: list[bytes]) -> None:
        if len(f.payload) != 4:
            raise h2.ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong size")
        (increment,) = struct.unpack(">I", f.payload)
        increment &= 0x7FFF_FFFF
        sid = f.stream_id
        if not sid:
            if not increment:
                raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            with self.lock:
                self.send_window += increment
                if self.send_window > h2.MAX_WINDOW:
                    raise h2.ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                self.window_open.notify_all()
            return
        if self._idle(sid):
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        with self.lock:
            stream = self.streams.get(sid)
            if stream is None:
                return  # a closed stream: allowed, ignored
            stream.window += increment
            error = (
                ErrorCode.PROTOCOL_ERROR
                if not increment
                else ErrorCode.FLOW_CONTROL_ERROR
                if stream.window > h2.MAX_WINDOW
                else None
            )
            self.window_open.notify_all()
        if error is not None:
            self._stream_error(sid, error, out)

    def _on_rst_stream(self, f: h2.Frame) -> None:
        sid = f.stream_id
        if not sid:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(f.payload) != 4:
            raise h2.ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of wrong size")
        if self._idle(sid):
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        with self.lock:
            stream = self.streams.get(sid)
            dropped = stream is not None and self._drop_locked(stream, by_us=False)
        if dropped:
            self.server.call_done()
        if stream is None:
            return  # closed already: nothing to cancel, nothing to count
        # rapid reset (CVE-2023-44487): open streams reset in a burst, then at a sane rate
        now = time.monotonic()
        tokens = min(float(_RESET_BURST), self.reset_tokens + (now - self.reset_at) * _RESET_RATE)
        self.reset_at = now
        if tokens < 1.0:
            raise h2.ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many stream resets")
        self.reset_tokens = tokens - 1.0

    def _on_priority(self, f: h2.Frame, out: list[bytes]) -> None:
        """PRIORITY is deprecated (RFC 9113 section 5.3.2) and ignored, once checked."""
        if not f.stream_id:
            raise h2.ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(f.payload) != 5:
            self._stream_error(f.stream_id, ErrorCode.FRAME_SIZE_ERROR, out)

    def goaway(self) -> None:
        with self.lock:
            if self.goaway_sent or self.dead:
                return
            self.goaway_sent = True
            self._send_or_die([h2.goaway(self.last_sid, ErrorCode.NO_ERROR, "shutting down")])

    def close(self) -> None:
        with self.lock:
            self.dead = True
            self.window_open.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Server:
    """Serve ``methods`` (``/package.Service/Method`` -> ``Method``) on a Unix socket.

    ``max_connections``: connections beyond it get GOAWAY and are closed.
    ``handshake_timeout``: seconds a new connection has for its preface and SETTINGS.
    ``send_stall``: seconds a response may wait in all for the peer's flow-control window
    (then its stream is reset), and for one blocked write (then the connection is dropped).
    ``connection_workers``: calls of one connection in the pool at once (default: half
    the workers), so that one client cannot hold them all.
    """

    def __init__(
        self,
        methods: dict[str, Method],
        *,
        workers: int,
        max_message_bytes: int,
        max_concurrent_streams: int = 128,
        max_connections: int = 256,
        handshake_timeout: float = 5.0,
        send_stall: float = 10.0,
        connection_workers: int | None = None,
    ) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.send_stall = send_stall
        self.connection_workers = connection_workers or max(1, workers // 2)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-rpc")
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._connections: dict[_Connection, threading.Thread] = {}
        self._acceptor: threading.Thread | None = None
        self.refused = _Tally(
            "connections refused: the agent is at its limit", max_connections=max_connections
        )
        self.slow_handshakes = _Tally(
            "connections dropped: no HTTP/2 preface and SETTINGS in time",
            handshake_timeout_s=handshake_timeout,
        )
        self.stalled = _Tally(
            "streams reset: the client gave no flow-control window for its answer",
            send_stall_s=send_stall,
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def bind(self, path: Path, *, mode: int = 0o660) -> None:
        """Listen on ``path`` (which must be free), created with ``mode``."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~mode)  # the socket is born with its mode, never wider
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        listener.listen(128)
        self._listener = listener
        self._path = path

    def start(self) -> None:
        if self._listener is None:
            raise RuntimeError("bind() before start()")
        self._acceptor = threading.Thread(target=self._accept, name="agent-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        stall = struct.pack("ll", int(self.send_stall), int(self.send_stall % 1 * 1e6))
        while not self._stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE: back off rather than spin
                continue
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                full = len(self._connections) >= self.max_connections
            if full:
                self._refuse(sock)
                continue
            # a peer that stops reading cannot hold a worker (and the connection) forever
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
            conn = _Connection(sock, self)
            thread = threading.Thread(target=conn.serve, name="agent-conn", daemon=True)
            with self._lock:
                self._connections[conn] = thread
            thread.start()

    def _refuse(self, sock: socket.socket) -> None:
        """Over ``max_connections``: say why in a GOAWAY, then close."""
        with contextlib.suppress(OSError):
            sock.send(
                h2.settings_frame({})
                + h2.goaway(
                    0,
                    ErrorCode.ENHANCE_YOUR_CALM,
                    f"the agent serves at most {self.max_connections} connections",
                ),
                socket.MSG_DONTWAIT,
            )
            sock.shutdown(socket.SHUT_WR)
        sock.close()
        self.refused.add()

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def call_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def call_done(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def stop(self, grace: float) -> None:
        """Refuse new calls, let calls in flight finish for up to ``grace`` s, close everything."""
        with self._lock:
            self._stop.set()
            connections = list(self._connections.items())
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        for conn, _ in connections:
            conn.goaway()
        deadline = time.monotonic() + grace
        with self._lock:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
        for conn, _ in connections:
            conn.close()
        for _, thread in connections:
            thread.join(timeout=2.0)
        if self._acceptor is not None:
            self._acceptor.join(timeout=2.0)
        self.pool.shutdown(wait=True, cancel_futures=True)
