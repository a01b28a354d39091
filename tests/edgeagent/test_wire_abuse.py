"""The agent's HTTP/2 transport against clients that abuse it on purpose.

Rapid reset (CVE-2023-44487), readers that never open their window, thousands
of idle or silent connections, CONTINUATION floods, and the RFC 9113 MUSTs
about stream 0, closed streams and window overflow. Every flood is bounded in
count and time. The scenarios a device meets run against a real agent
process; what needs a method the agent does not have (one that counts its
calls, or waits for the test) runs against ``edgeagent.wire.server.Server``
on a real socket in this process.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from wire_helpers import PREDICT_HEADERS, predict_request, windows

from edgeagent.client import AgentClient
from edgeagent.errors import NotFoundError
from edgeagent.wire import h2
from edgeagent.wire.client import CallError, Channel
from edgeagent.wire.h2 import ErrorCode
from edgeagent.wire.server import Method, Server
from tests.harness import short_dir

STALL = 1.0  # the module agent's send_stall_seconds
HANDSHAKE = 1.0  # the module agent's handshake_timeout_seconds


def predict_body(n: int) -> bytes:
    return h2.message(predict_request(windows(n)).SerializeToString())


def call_frames(sid: int, body: bytes, headers: bytes = PREDICT_HEADERS) -> bytes:
    """HEADERS and the body in DATA frames of at most 16 KiB, the last one ending the stream."""
    out = [h2.frame(h2.HEADERS, h2.END_HEADERS, sid, headers)]
    for begin in range(0, len(body), 16384):
        last = begin + 16384 >= len(body)
        out.append(
            h2.frame(h2.DATA, h2.END_STREAM if last else 0, sid, body[begin : begin + 16384])
        )
    return b"".join(out)


def connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: waits while the listen backlog is full
    sock.settimeout(timeout)
    return sock


class Peer:
    """A raw HTTP/2 client: sends bytes, collects the frames the server sends."""

    opened: ClassVar[list[Peer]] = []  # closed after each test, whatever happened

    def __init__(self, path: Path, settings: dict[int, int] | None = None) -> None:
        self.sock = connect(path)
        Peer.opened.append(self)
        self.reader = h2.FrameReader(1 << 24)
        self.frames: list[h2.Frame] = []
        self.closed = False
        self.sock.sendall(h2.PREFACE + h2.settings_frame(settings or {}))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_for(self, want: Callable[[h2.Frame], bool], timeout: float = 5.0) -> h2.Frame:
        """The first frame (already received or arriving) that ``want`` accepts."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for f in self.frames[seen:]:
                if want(f):
                    return f
            seen = len(self.frames)
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                kinds = [(f.kind, f.stream_id) for f in self.frames[-20:]]
                raise AssertionError(f"no such frame; closed={self.closed}, last frames {kinds}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.frames += self.reader.feed(chunk)

    def until_closed(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(AssertionError):
            self.wait_for(lambda _f: False, timeout)
        assert self.closed, "the server kept the connection open"

    def close(self) -> None:
        self.sock.close()


def rst_code(f: h2.Frame) -> int:
    return int(struct.unpack(">I", f.payload)[0])


def goaway_code(f: h2.Frame) -> int:
    return int(struct.unpack(">I", f.payload[4:8])[0])


def is_rst(sid: int, code: ErrorCode) -> Callable[[h2.Frame], bool]:
    return lambda f: f.kind == h2.RST_STREAM and f.stream_id == sid and rst_code(f) == code


def is_goaway(code: ErrorCode) -> Callable[[h2.Frame], bool]:
    return lambda f: f.kind == h2.GOAWAY and goaway_code(f) == code


def is_trailers(sid: int) -> Callable[[h2.Frame], bool]:
    return lambda f: f.kind == h2.HEADERS and f.stream_id == sid and bool(f.flags & h2.END_STREAM)


def pong(peer: Peer) -> None:
    """The connection still works: a PING is answered."""
    peer.send(h2.frame(h2.PING, 0, 0, b"12345678"))
    peer.wait_for(lambda f: f.kind == h2.PING and f.flags & h2.ACK and f.payload == b"12345678")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def agent(module_agent_factory: Any, packages: Any) -> Any:
    agent = module_agent_factory(
        config={"send_stall_seconds": STALL, "handshake_timeout_seconds": HANDSHAKE}
    )
    agent.client.load_model("wt", packages.v1)
    return agent


@pytest.fixture(autouse=True)
def still_serving(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    while Peer.opened:
        Peer.opened.pop().close()
    if "agent" in request.fixturenames:
        agent = request.getfixturevalue("agent")
        assert agent.alive(), agent.output()[-3000:]
        assert "Traceback" not in agent.output(), agent.output()[-3000:]
        assert agent.client.predict("wt", windows(1)).shape == (1, 6, 10, 10)


# -- a. rapid reset ----------------------------------------------------------------------
def test_rapid_reset_gets_enhance_your_calm_and_others_keep_answering(agent: Any) -> None:
    """Predict streams opened and reset at once, thousands of them on one connection: the
    connection ends with GOAWAY ENHANCE_YOUR_CALM and another client is answered within
    1 s all along."""
    body = predict_body(1)
    burst = b"".join(
        call_frames(sid, body) + h2.rst_stream(sid, ErrorCode.CANCEL)
        for sid in range(1, 2 * 3000, 2)
    )
    attacker = Peer(agent.socket)
    attacker.sock.settimeout(20)

    def attack() -> None:
        with contextlib.suppress(OSError):  # the agent hangs up on it half-way
            attacker.send(burst)

    flood = threading.Thread(target=attack)
    latencies = []
    with AgentClient(agent.socket, timeout=10) as client:
        client.predict("wt", windows(1))
        flood.start()
        while flood.is_alive() or len(latencies) < 20:
            started = time.monotonic()
            client.predict("wt", windows(1))
            latencies.append(time.monotonic() - started)
            if len(latencies) > 2000:
                break
    flood.join(20)
    attacker.wait_for(is_goaway(ErrorCode.ENHANCE_YOUR_CALM), timeout=10)
    attacker.until_closed()
    attacker.close()
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


@pytest.fixture
def wire(request: pytest.FixtureRequest) -> Iterator[Callable[..., tuple[Path, Server]]]:
    """``wire(methods, **server kwargs) -> (socket path, server)``: a server in this process."""
    servers: list[tuple[Server, Path]] = []

    def start(methods: dict[str, Method], **kwargs: Any) -> tuple[Path, Server]:
        folder = short_dir()
        path = folder / "wire.sock"
        kwargs.setdefault("workers", 2)
        kwargs.setdefault("max_message_bytes", 1 << 20)
        server = Server(methods, **kwargs)
        server.bind(path)
        server.start()
        servers.append((server, folder))
        return path, server

    yield start
    for server, folder in servers:
        server.stop(1.0)
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


RAW_HEADERS = h2.encode_headers(
    [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/t.T/Work"),
        (b"content-type", b"application/grpc"),
    ]
)


def test_work_for_reset_streams_is_dropped(wire: Any) -> None:
    calls = []

    def work(request: bytes) -> bytes:
        calls.append(request)
        time.sleep(0.02)
        return b"done"

    path, _ = wire({"/t.T/Work": Method(parse=bytes, unary=work)}, workers=2)
    peer = Peer(path)
    body = h2.message(b"x")
    peer.send(
        b"".join(
            call_frames(sid, body, RAW_HEADERS) + h2.rst_stream(sid, ErrorCode.CANCEL)
            for sid in range(1, 101, 2)
        )
    )
    pong(peer)
    time.sleep(0.5)  # 50 calls of 20 ms on 2 workers would still be running
    assert len(calls) <= 2, f"{len(calls)} of 50 cancelled calls ran"
    peer.close()


def test_reset_streams_count_until_their_work_ends(wire: Any) -> None:
    release = threading.Event()
    started: list[bytes] = []

    def work(request: bytes) -> bytes:
        started.append(request)
        release.wait(10)
        return b"done"

    path, _ = wire(
        {"/t.T/Work": Method(parse=bytes, unary=work)}, workers=4, max_concurrent_streams=2
    )
    peer = Peer(path)
    try:
        body = h2.message(b"x")
        peer.send(call_frames(1, body, RAW_HEADERS) + call_frames(3, body, RAW_HEADERS))
        deadline = time.monotonic() + 5
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(started) == 2
        peer.send(h2.rst_stream(1, ErrorCode.CANCEL) + h2.rst_stream(3, ErrorCode.CANCEL))
        # their work still runs: new streams are over the limit of 2
        peer.send(call_frames(5, body, RAW_HEADERS) + call_frames(7, body, RAW_HEADERS))
        peer.wait_for(is_rst(5, ErrorCode.REFUSED_STREAM))
        peer.wait_for(is_rst(7, ErrorCode.REFUSED_STREAM))
        release.set()
        time.sleep(0.2)  # the work is gone: the streams no longer count
        peer.send(call_frames(9, body, RAW_HEADERS))
        peer.wait_for(is_trailers(9))
    finally:
        release.set()
        peer.close()


# -- b. readers that never open their window -------------------------------------------
def test_zero_window_readers_do_not_tie_up_the_workers(agent: Any) -> None:
    """Streams whose answers never fit the client's window (0): one connection gets no more
    than its share of the workers, another client's large Predict is answered, and after
    send_stall_seconds each stuck stream is reset and its worker freed."""
    body = predict_body(300)
    hostile = Peer(agent.socket, {h2.INITIAL_WINDOW_SIZE: 0})
    sids = list(range(1, 2 * 10, 2))  # 10 streams: more than the agent's 8 workers
    hostile.send(b"".join(call_frames(sid, body) for sid in sids))
    try:
        time.sleep(0.5)  # the answers are computed and wait for window
        with AgentClient(agent.socket, timeout=5) as client:
            started = time.monotonic()
            assert client.predict("wt", windows(300)).shape == (300, 6, 10, 10)
            assert time.monotonic() - started < 3.0  # alone: ~0.1 s; stuck today: never
        for sid in sids:  # each waits at most STALL, a few workers at a time
            hostile.wait_for(is_rst(sid, ErrorCode.CANCEL), timeout=10 * STALL + 5)
        pong(hostile)  # the connection itself is fine
        assert "streams reset: the client gave no flow-control window" in agent.output()
    finally:
        hostile.close()


# -- c. many connections ----------------------------------------------------------------
def test_two_thousand_connections_are_capped_and_cheap(start_agent: Any, packages: Any) -> None:
    """2,000 connections attempted at once, silent ones (slowloris) first: the agent keeps
    at most max_connections, refuses the rest with GOAWAY, drops the silent ones after the
    handshake timeout, stays within a few MB of its memory and answers within 1 s."""
    agent = start_agent(config={"handshake_timeout_seconds": HANDSHAKE, "max_connections": 256})
    agent.client.load_model("wt", packages.v1)
    with AgentClient(agent.socket, timeout=10) as client:
        for _ in range(50):
            client.predict("wt", windows(1))
        before = rss_kb(agent.pid)
        silent = [connect(agent.socket) for _ in range(100)]
        idle: list[socket.socket] = []
        latencies = []
        opening = h2.PREFACE + h2.settings_frame({})
        for i in range(1900):
            sock = connect(agent.socket)
            with contextlib.suppress(OSError):  # a refused one may be closed already
                sock.sendall(opening)
            idle.append(sock)
            if i % 100 == 0:
                started = time.monotonic()
                client.predict("wt", windows(1))
                latencies.append(time.monotonic() - started)
        time.sleep(0.5)
        after = rss_kb(agent.pid)
        started = time.monotonic()
        client.predict("wt", windows(1))
        latencies.append(time.monotonic() - started)

        refused = 0
        for sock in idle:
            sock.settimeout(0.5)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue  # kept: an idle connection
            frames = h2.FrameReader(1 << 24).feed(data)
            if any(f.kind == h2.GOAWAY and goaway_code(f) for f in frames):
                refused += 1
        assert refused >= 1900 - 256, refused
        for sock in silent:  # silent ones are dropped after the handshake timeout
            sock.settimeout(HANDSHAKE + 3)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
        for sock in silent + idle:
            sock.close()
        with AgentClient(agent.socket, timeout=5) as fresh:  # room again for a new client
            assert fresh.predict("wt", windows(1)).shape == (1, 6, 10, 10)
    grown_mb = (after - before) / 1024
    assert grown_mb < 8, f"RSS grew by {grown_mb:.1f} MB ({before} -> {after} KiB)"
    assert max(latencies) < 1.0, sorted(latencies)[-3:]
    assert agent.alive()
    log = agent.output()  # said in the journal, a line per 10 s at most
    assert "connections refused: the agent is at its limit" in log
    assert "connections dropped: no HTTP/2 preface and SETTINGS in time" in log
    assert log.count("connections refused") < 10


def test_a_slow_preface_is_dropped_after_the_handshake_timeout(agent: Any) -> None:
    with connect(agent.socket) as sock:
        started = time.monotonic()
        for byte in h2.PREFACE[:10]:  # a byte now and then, never the whole preface
            with contextlib.suppress(OSError):
                sock.sendall(bytes([byte]))
            time.sleep(HANDSHAKE / 5)
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
        assert time.monotonic() - started < HANDSHAKE + 3


def test_the_first_frame_must_be_settings(agent: Any) -> None:
    with connect(agent.socket) as sock:
        sock.sendall(h2.PREFACE + h2.frame(h2.PING, 0, 0, b"12345678"))
        peer_frames = h2.FrameReader(1 << 24)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
        codes = [goaway_code(f) for f in peer_frames.feed(got) if f.kind == h2.GOAWAY]
        assert codes == [ErrorCode.PROTOCOL_ERROR]


# -- d. CONTINUATION floods -------------------------------------------------------------
def test_a_continuation_flood_ends_the_connection(agent: Any) -> None:
    peer = Peer(agent.socket)
    flood = (
        h2.frame(h2.HEADERS, 0, 1, PREDICT_HEADERS[:8])
        + h2.frame(h2.CONTINUATION, 0, 1, b"") * 20_000
    )
    with contextlib.suppress(OSError):
        peer.send(flood)
    peer.wait_for(is_goaway(ErrorCode.ENHANCE_YOUR_CALM))
    peer.until_closed()
    peer.close()


def test_a_header_block_in_a_few_continuations_is_fine(agent: Any) -> None:
    body = predict_body(1)
    block = PREDICT_HEADERS
    cut = [block[i : i + 16] for i in range(0, len(block), 16)]
    peer = Peer(agent.socket)
    frames = [h2.frame(h2.HEADERS, 0, 1, cut[0])]
    frames += [h2.frame(h2.CONTINUATION, 0, 1, c) for c in cut[1:-1]]
    frames.append(h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, cut[-1]))
    peer.send(b"".join(frames) + h2.frame(h2.DATA, h2.END_STREAM, 1, body))
    peer.wait_for(is_trailers(1))
    peer.close()


# -- e. RFC 9113 MUSTs ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "frame",
    [
        h2.rst_stream(0, ErrorCode.CANCEL),
        h2.frame(h2.PRIORITY, 0, 0, b"\0\0\0\1\x10"),
    ],
    ids=["rst-stream-on-0", "priority-on-0"],
)
def test_stream_0_frames_are_a_protocol_error(agent: Any, frame: bytes) -> None:
    peer = Peer(agent.socket)
    peer.send(frame)
    peer.wait_for(is_goaway(ErrorCode.PROTOCOL_ERROR))
    peer.until_closed()
    peer.close()


def test_data_on_a_closed_stream_is_stream_closed(agent: Any) -> None:
    body = predict_body(1)
    peer = Peer(agent.socket)
    peer.send(call_frames(1, body))
    peer.wait_for(is_trailers(1))
    peer.send(h2.frame(h2.DATA, 0, 1, body))  # after both ends closed it
    peer.wait_for(is_rst(1, ErrorCode.STREAM_CLOSED))
    peer.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 3, PREDICT_HEADERS))
    peer.send(h2.rst_stream(3, ErrorCode.CANCEL))
    peer.send(h2.frame(h2.DATA, h2.END_STREAM, 3, body))  # after the client reset it
    peer.wait_for(is_rst(3, ErrorCode.STREAM_CLOSED))
    peer.send(call_frames(5, body))  # the connection still serves
    peer.wait_for(is_trailers(5))
    peer.close()


def test_stream_window_overflow_is_a_flow_control_error(agent: Any) -> None:
    peer = Peer(agent.socket)
    peer.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, PREDICT_HEADERS))  # open, body to come
    peer.send(h2.window_update(1, h2.MAX_WINDOW))  # 65,535 + 2^31 - 1: over the maximum
    peer.wait_for(is_rst(1, ErrorCode.FLOW_CONTROL_ERROR))
    peer.send(call_frames(3, predict_body(1)))
    peer.wait_for(is_trailers(3))
    peer.close()


def test_many_error_answers_are_not_taken_for_rapid_reset(agent: Any) -> None:
    """An error ends its stream: a client that gets hundreds in a row is served as usual."""
    with AgentClient(agent.socket, timeout=10) as client:
        for _ in range(3 * 200):
            with pytest.raises(NotFoundError):
                client.describe_model("not-loaded")
        assert client.predict("wt", windows(1)).shape == (1, 6, 10, 10)


def test_a_client_over_the_connection_cap_is_told_why(wire: Any) -> None:
    path, _ = wire({"/t.T/Echo": Method(parse=bytes, unary=bytes)}, max_connections=1)
    holder = Peer(path)
    pong(holder)  # served: it holds the only place
    channel = Channel(path, max_message_bytes=1 << 20)
    try:
        with pytest.raises(CallError) as refused:
            channel.unary("/t.T/Echo", b"hello", timeout=5)
        assert refused.value.code == h2.Status.UNAVAILABLE
        assert "at most 1 connections" in refused.value.message
        holder.close()
        deadline = time.monotonic() + 5
        while True:  # the place is free once the server has seen the close
            try:
                assert bytes(channel.unary("/t.T/Echo", b"hello", timeout=5)) == b"hello"
                break
            except CallError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (h2.window_update(0, 0), ErrorCode.PROTOCOL_ERROR),  # increment 0 on the connection
        (h2.window_update(9, 1), ErrorCode.PROTOCOL_ERROR),  # on a stream never opened
        (h2.rst_stream(9, ErrorCode.CANCEL), ErrorCode.PROTOCOL_ERROR),  # the same
        (h2.frame(h2.PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),  # PING on a stream
        (  # a new initial window that overflows an open stream's window
            h2.frame(h2.HEADERS, h2.END_HEADERS, 1, PREDICT_HEADERS)
            + h2.window_update(1, h2.MAX_WINDOW - h2.DEFAULT_WINDOW)
            + h2.settings_frame({h2.INITIAL_WINDOW_SIZE: h2.MAX_WINDOW}),
            ErrorCode.FLOW_CONTROL_ERROR,
        ),
    ],
    ids=["window-update-0", "window-update-idle", "rst-idle", "ping-on-stream", "settings-window"],
)
def test_connection_errors_of_rfc_9113(agent: Any, frames: bytes, code: ErrorCode) -> None:
    peer = Peer(agent.socket)
    peer.send(frames)
    peer.wait_for(is_goaway(code))
    peer.until_closed()


def test_stream_errors_leave_the_connection_serving(agent: Any) -> None:
    peer = Peer(agent.socket)
    peer.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, PREDICT_HEADERS))
    peer.send(h2.window_update(1, 0))  # increment 0 on a stream
    peer.wait_for(is_rst(1, ErrorCode.PROTOCOL_ERROR))
    peer.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 3, PREDICT_HEADERS))
    peer.send(h2.frame(h2.PRIORITY, 0, 3, b"\0\0"))  # PRIORITY of the wrong size
    peer.wait_for(is_rst(3, ErrorCode.FRAME_SIZE_ERROR))
    peer.send(call_frames(5, predict_body(1)))
    peer.wait_for(is_trailers(5))
