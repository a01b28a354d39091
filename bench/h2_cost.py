"""What the ``h2`` library would cost the agent per call, against its own transport.

Measures, in one process: (1) h2 doing only the server side of one batch-1
unary gRPC call (receive the request bytes, acknowledge its data, send
headers, one 2.4 KB message and trailers), no socket; (2) a whole round trip
of the agent's own transport (``edgeagent.wire``: client, Unix socket,
server) with the same message sizes. h2 is not a dependency of windedge:

    .venv/bin/pip install h2 && .venv/bin/python -m bench.h2_cost
"""

from __future__ import annotations

import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent.wire.client import Channel
from edgeagent.wire.server import Method, Server

CALLS = 5000
MESSAGE = b"\x00" + struct.pack(">I", 2420) + b"x" * 2420  # a batch-1 Predict's size
HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/AWS.SageMaker.Edge.Agent/Predict"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def h2_server_side() -> list[float]:
    import h2.config
    import h2.connection
    import h2.events

    def connection(client: bool) -> Any:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        return h2.connection.H2Connection(config)

    client, server = connection(True), connection(False)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    out = []
    for i in range(CALLS):
        sid = 1 + 2 * i
        client.send_headers(sid, HEADERS)
        client.send_data(sid, MESSAGE, end_stream=True)
        request = client.data_to_send()
        started = time.perf_counter()
        for event in server.receive_data(request):
            if isinstance(event, h2.events.DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        server.send_data(sid, MESSAGE)
        server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        answer = server.data_to_send()
        out.append(time.perf_counter() - started)
        for event in client.receive_data(answer):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        server.receive_data(client.data_to_send())
    return out


def own_round_trip() -> list[float]:
    with tempfile.TemporaryDirectory(prefix="we-h2-") as tmp:
        path = Path(tmp) / "s.sock"
        server = Server(
            {"/t.T/Echo": Method(parse=bytes, unary=bytes, inline=lambda _r: True)},
            workers=2,
            max_message_bytes=1 << 20,
        )
        server.bind(path)
        server.start()
        channel = Channel(path, max_message_bytes=1 << 20)
        try:
            payload = MESSAGE[5:]
            for _ in range(500):
                channel.unary("/t.T/Echo", payload, timeout=5)
            out = []
            for _ in range(CALLS):
                started = time.perf_counter()
                channel.unary("/t.T/Echo", payload, timeout=5)
                out.append(time.perf_counter() - started)
            return out
        finally:
            channel.close()
            server.stop(1.0)


def main() -> None:
    try:
        import h2  # noqa: F401 - only to say how to get it
    except ImportError:
        sys.exit("h2 is not installed: .venv/bin/pip install h2")
    h2_times = h2_server_side()
    own = own_round_trip()
    h2_p50 = statistics.median(h2_times) * 1e6
    own_p50 = statistics.median(own) * 1e6
    print("per batch-1 unary call, p50 (microseconds)")
    print(f"  h2, server side only, no socket                  {h2_p50:7.1f}")
    print(f"  edgeagent.wire, whole round trip on a Unix socket {own_p50:7.1f}")
    print(f"  ratio                                             {h2_p50 / own_p50:7.2f}x")


if __name__ == "__main__":
    main()
