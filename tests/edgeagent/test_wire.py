"""The agent's own gRPC transport (``edgeagent.wire``) against other gRPC implementations
and against hostile peers.

The server is driven by grpcio, the client that stranded device applications
use: many threads sharing one HTTP/2 connection, messages far larger than the
flow-control windows, cancellation, compression, unknown methods, the health
Watch stream. Raw sockets send what no well-behaved client would; the agent
must drop that connection and keep serving. The typed client is pointed at a
grpcio server, so both halves are checked against an independent
implementation.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_helpers import PREDICT_HEADERS, predict_request, windows

from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgeagent.client import AgentClient
from edgeagent.errors import NotFoundError, UnavailableError
from edgeagent.wire import h2
from edgeagent.wire.client import CallError, Channel
from edgeagent.wire.server import Method, RpcError, Server
from tests.harness import short_dir

CODE = grpc.StatusCode


def output_of(resp: pb.PredictResponse) -> np.ndarray[Any, Any]:
    t = resp.tensors[0]
    return np.frombuffer(t.byte_data, "<f4").reshape(tuple(t.tensor_metadata.shape))


@pytest.fixture(scope="module")
def agent(module_agent_factory: Any, packages: Any) -> Any:
    agent = module_agent_factory()
    agent.client.load_model("wt", packages.v1)
    return agent


@pytest.fixture(scope="module")
def model(packages: Any) -> Path:
    return Path(packages.v1) / "model.onnx"


@pytest.fixture(autouse=True)
def still_serving(agent: Any) -> Iterator[None]:
    yield
    assert agent.alive(), agent.output()[-3000:]
    assert "Traceback" not in agent.output(), agent.output()[-3000:]  # no unexpected error
    assert agent.client.health()
    assert agent.client.predict("wt", windows(1)).shape == (1, 6, 10, 10)


# -- grpcio as the client ---------------------------------------------------------
def test_threads_sharing_one_grpcio_connection_get_their_own_answers(
    agent: Any, model: Path, reference: Any
) -> None:
    """Big and small calls interleaved on one HTTP/2 connection: flow control both ways
    (300 windows is 720 KB, ten times grpcio's initial window) and stream bookkeeping."""
    stub = agent.stub()
    sizes = [1, 300, 2, 150, 1, 64]
    inputs = {n: windows(n, seed=n) for n in sizes}
    expected = {n: reference(model, x) for n, x in inputs.items()}
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(8):
            n = sizes[(offset + i) % len(sizes)]
            try:
                got = output_of(stub.Predict(predict_request(inputs[n]), timeout=60))
                np.testing.assert_allclose(got, expected[n], rtol=1e-5, atol=1e-5)
            except (grpc.RpcError, AssertionError) as exc:
                errors.append(f"batch {n}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []


def test_unknown_method_is_unimplemented(agent: Any) -> None:
    call = agent.channel().unary_unary("/AWS.SageMaker.Edge.Agent/Train")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    assert info.value.code() == CODE.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_compressed_request_is_refused_clearly(agent: Any) -> None:
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(predict_request(windows(4)), timeout=10, compression=grpc.Compression.Gzip)
    assert info.value.code() == CODE.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert "compress" in info.value.details()  # type: ignore[attr-defined]


def test_request_that_is_not_protobuf_is_invalid_argument(agent: Any) -> None:
    call = agent.channel().unary_unary("/AWS.SageMaker.Edge.Agent/Predict")
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() == CODE.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_cancelled_calls_leave_the_agent_serving(agent: Any) -> None:
    stub = agent.stub()
    for _ in range(5):
        future = stub.Predict.future(predict_request(windows(800)), timeout=60)
        time.sleep(0.005)
        future.cancel()
    ok = stub.Predict(predict_request(windows(3)), timeout=30)
    assert output_of(ok).shape == (3, 6, 10, 10)


def test_deadline_shorter_than_the_call(agent: Any) -> None:
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(predict_request(windows(1024)), timeout=0.001)
    assert info.value.code() == CODE.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def test_health_watch_follows_the_agent_until_it_stops(start_agent: Any) -> None:
    agent = start_agent()
    stub = health_pb2_grpc.HealthStub(agent.channel())
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()
    started = time.monotonic()
    assert agent.terminate(10.0) == 0
    statuses = []
    with pytest.raises(grpc.RpcError):  # the stream ends when the agent goes
        for item in stream:
            statuses.append(item.status)
    assert set(statuses) <= {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert time.monotonic() - started < 10


# -- hostile peers on a raw socket ----------------------------------------------------
def raw_connect(agent: Any) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(agent.socket))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection (fails if it does not)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the agent kept the connection open; sent {got[:200]!r}") from None
    return got


def goaway_codes(data: bytes) -> list[int]:
    frames = h2.FrameReader(1 << 24).feed(data)
    return [struct.unpack(">I", f.payload[4:8])[0] for f in frames if f.kind == h2.GOAWAY]


def test_http1_request_is_dropped(agent: Any) -> None:
    with raw_connect(agent) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(sock)
    kinds = {f.kind for f in h2.FrameReader(1 << 24).feed(answer)}
    assert kinds <= {h2.SETTINGS, h2.WINDOW_UPDATE, h2.GOAWAY}, answer[:200]


def test_protocol_violations_end_with_goaway(agent: Any) -> None:
    cases = {
        "data-on-stream-0": h2.frame(h2.DATA, 0, 0, b"x"),
        "push-promise": h2.frame(h2.PUSH_PROMISE, h2.END_HEADERS, 1, b"\0\0\0\2"),
        "bad-settings": h2.frame(h2.SETTINGS, 0, 0, b"\0\0\0"),
        "continuation-alone": h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, b""),
        "even-stream": h2.frame(h2.HEADERS, h2.END_HEADERS, 2, b""),
        "bad-hpack": h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff\xff"),
        "oversized-frame": struct.pack(">BHBBI", 0x7F, 0xFFFF, h2.DATA, 0, 1),
    }
    for name, payload in cases.items():
        with raw_connect(agent) as sock:
            sock.sendall(h2.PREFACE + h2.settings_frame({}) + payload)
            codes = goaway_codes(read_until_closed(sock))
        assert codes and codes[-1] != h2.ErrorCode.NO_ERROR, name


def test_peers_that_vanish_mid_call(agent: Any) -> None:
    request = h2.message(predict_request(windows(200)).SerializeToString())
    headers = PREDICT_HEADERS
    for cut in (0, 9, 100, len(request) // 2, len(request)):
        with raw_connect(agent) as sock:
            sock.sendall(h2.PREFACE + h2.settings_frame({}))
            sock.sendall(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, headers))
            sock.sendall(h2.frame(h2.DATA, 0, 1, request[:cut]))
    # and one that sends a whole call but never reads the answer
    with raw_connect(agent) as sock:
        sock.sendall(h2.PREFACE + h2.settings_frame({}))
        sock.sendall(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, headers))
        sock.sendall(h2.frame(h2.DATA, h2.END_STREAM, 1, request[:60000]))


def test_a_client_with_a_tiny_window_gets_the_whole_answer(
    agent: Any, model: Path, reference: Any
) -> None:
    """The response (2.4 KB) is larger than the window the client grants (100 bytes): the
    agent sends what fits, waits for WINDOW_UPDATE and finishes, without blocking the
    connection's reader that has to receive those updates."""
    x = windows(1, seed=5)
    request = h2.message(predict_request(x).SerializeToString())
    headers = PREDICT_HEADERS
    reader = h2.FrameReader(1 << 24)
    decoder = h2.HeaderDecoder(1 << 16)
    body = b""
    trailers: dict[bytes, bytes] = {}
    with raw_connect(agent) as sock:
        sock.sendall(
            h2.PREFACE
            + h2.settings_frame({h2.INITIAL_WINDOW_SIZE: 100})
            + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, headers)
            + h2.frame(h2.DATA, h2.END_STREAM, 1, request)
        )
        data_frames = 0
        while not trailers:
            chunk = sock.recv(65536)
            assert chunk, "the agent closed the connection"
            for f in reader.feed(chunk):
                if f.kind == h2.SETTINGS and not f.flags & h2.ACK:
                    sock.sendall(h2.frame(h2.SETTINGS, h2.ACK, 0))
                elif f.kind == h2.DATA and f.stream_id == 1:
                    assert len(f.payload) <= 100
                    body += f.payload
                    data_frames += 1
                    sock.sendall(h2.window_update(1, 100) + h2.window_update(0, 100))
                elif f.kind == h2.HEADERS and f.stream_id == 1:
                    decoded = dict(decoder.decode(f.payload))
                    if f.flags & h2.END_STREAM:
                        trailers = decoded
    assert trailers.get(b"grpc-status") == b"0", trailers
    assert data_frames > 20
    resp = pb.PredictResponse.FromString(body[5:])
    np.testing.assert_allclose(output_of(resp), reference(model, x), rtol=1e-5, atol=1e-5)


def test_a_peer_that_stops_reading_does_not_stall_others(agent: Any) -> None:
    """It grants a huge window for a 2.4 MB answer and never reads: the agent's write to
    it blocks (until the send timeout drops it), other clients are served meanwhile."""
    request = h2.message(predict_request(windows(1000)).SerializeToString())
    headers = PREDICT_HEADERS
    stuck = []
    for _ in range(2):
        sid = 1
        sock = raw_connect(agent)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frames = [h2.frame(h2.HEADERS, h2.END_HEADERS, sid, headers)]
        for begin in range(0, len(request), 16384):
            last = begin + 16384 >= len(request)
            chunk = request[begin : begin + 16384]
            frames.append(h2.frame(h2.DATA, h2.END_STREAM if last else 0, sid, chunk))
        sock.sendall(
            h2.PREFACE
            + h2.settings_frame({h2.INITIAL_WINDOW_SIZE: 2**31 - 1})
            + h2.window_update(0, 2**31 - 1 - 65535)
            + b"".join(frames)
        )
        stuck.append(sock)
    try:
        time.sleep(1.0)  # both answers are computed and being written into full sockets
        with AgentClient(agent.socket, timeout=10) as client:
            for _ in range(20):
                assert client.predict("wt", windows(2)).shape == (2, 6, 10, 10)
            assert client.predict("wt", windows(300)).shape == (300, 6, 10, 10)
    finally:
        for sock in stuck:
            sock.close()


frame_strategy = st.tuples(
    st.integers(0, 12),  # frame type, including unknown ones
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
    st.binary(max_size=80),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    opening=st.sampled_from(["preface", "settings", "request-headers", "half-request"]),
    frames=st.lists(frame_strategy, max_size=6),
)
def test_random_frames_never_hurt_the_agent(agent: Any, opening: str, frames: list[Any]) -> None:
    """Random frames after a preface, after settings, or in the middle of a real call."""
    prefix = h2.PREFACE
    if opening != "preface":
        prefix += h2.settings_frame({})
    if opening in ("request-headers", "half-request"):
        prefix += h2.frame(h2.HEADERS, h2.END_HEADERS, 1, PREDICT_HEADERS)
    if opening == "half-request":
        body = h2.message(predict_request(windows(1)).SerializeToString())
        prefix += h2.frame(h2.DATA, 0, 1, body[: len(body) // 2])
    with raw_connect(agent) as sock:
        data = prefix + b"".join(h2.frame(k, f, s, p) for k, f, s, p in frames)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent closed first: fine
    assert agent.alive()


# -- the typed client against grpcio's server ---------------------------------------
class _GrpcioEcho(pb_grpc.AgentServicer):
    def Predict(  # noqa: N802 - the generated name
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        if request.name == "missing":
            context.abort(CODE.NOT_FOUND, "modèle « missing » absent: 100% sûr")
        return pb.PredictResponse(tensors=list(request.tensors))


@pytest.fixture
def grpcio_server() -> Iterator[Path]:
    folder = short_dir()
    path = folder / "grpcio.sock"
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    pb_grpc.add_AgentServicer_to_server(_GrpcioEcho(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{path}")
    server.start()
    try:
        yield path
    finally:
        server.stop(None).wait()
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_typed_client_talks_to_grpcio(grpcio_server: Path) -> None:
    with AgentClient(grpcio_server, timeout=30) as client:
        for n in (1, 3, 2000):  # 2000 windows: 4.8 MB, many windows' worth of flow control
            x = windows(n, seed=n)
            np.testing.assert_array_equal(client.predict("echo", x), x)
        with pytest.raises(NotFoundError, match="modèle « missing » absent: 100% sûr"):
            client.predict("missing", windows(1))
        np.testing.assert_array_equal(client.predict("echo", windows(1)), windows(1))


def test_typed_client_without_an_agent_is_unavailable(tmp_path: Path) -> None:
    with AgentClient(tmp_path / "nothing.sock", timeout=2) as client:
        with pytest.raises(UnavailableError):
            client.list_models()
        assert client.health() is False


# -- deadlines and limits of the client and server themselves -------------------------
@pytest.fixture
def wire_server() -> Iterator[Path]:
    folder = short_dir()
    path = folder / "wire.sock"

    def slow(request: bytes) -> bytes:
        time.sleep(float(request.decode()))
        return b"done"

    def fail(_request: bytes) -> bytes:
        raise RpcError(h2.Status.FAILED_PRECONDITION, "nope: 100% sure")

    def echo(request: bytes) -> bytes:
        return request

    server = Server(
        {
            "/t.T/Slow": Method(parse=bytes, unary=slow),
            "/t.T/Fail": Method(parse=bytes, unary=fail, inline=lambda _r: True),
            "/t.T/Echo": Method(parse=bytes, unary=echo, inline=lambda r: len(r) < 100),
        },
        workers=2,
        max_message_bytes=1 << 20,
    )
    server.bind(path)
    server.start()
    try:
        yield path
    finally:
        server.stop(2.0)
        folder.rmdir()


def test_client_deadline_and_recovery(wire_server: Path) -> None:
    channel = Channel(wire_server, max_message_bytes=1 << 20)
    try:
        started = time.monotonic()
        with pytest.raises(CallError) as info:
            channel.unary("/t.T/Slow", b"2", timeout=0.3)
        assert info.value.code == h2.Status.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        assert bytes(channel.unary("/t.T/Slow", b"0", timeout=5)) == b"done"
    finally:
        channel.close()


def test_status_messages_and_size_limits(wire_server: Path) -> None:
    channel = Channel(wire_server, max_message_bytes=4 << 20)
    try:
        with pytest.raises(CallError) as info:
            channel.unary("/t.T/Fail", b"", timeout=5)
        assert (info.value.code, info.value.message) == (
            h2.Status.FAILED_PRECONDITION,
            "nope: 100% sure",
        )
        with pytest.raises(CallError) as info:
            channel.unary("/t.T/Missing", b"", timeout=5)
        assert info.value.code == h2.Status.UNIMPLEMENTED
        big = bytes(range(256)) * 4096  # 1 MiB: over the server's limit by its prefix
        with pytest.raises(CallError) as info:
            channel.unary("/t.T/Echo", big + b"x", timeout=10)
        assert info.value.code == h2.Status.RESOURCE_EXHAUSTED
        assert bytes(channel.unary("/t.T/Echo", big[:900_000], timeout=10)) == big[:900_000]
        assert bytes(channel.unary("/t.T/Echo", b"small", timeout=5)) == b"small"
    finally:
        channel.close()
