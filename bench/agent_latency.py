"""Predict latency through the agent's socket versus in-process ONNX Runtime.

Prints p50/p99 per case, what the socket adds at p50 and the ratio, measured
in the same run against the same model with the same thread count (1): through
windedge's client, through a stock grpcio client, and (for reference) a plain
grpcio server doing nothing. Then the agent's resident memory idle, after
batch-1 and after maximum-batch requests. Run: .venv/bin/python bench/agent_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench._agent import echo_server, rss_mb, running_agent
from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgecommon.memory import tune_malloc


def timed(fn: Callable[[], object], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6


def grpcio_predict(stub: pb_grpc.AgentStub, name: str, x: np.ndarray[Any, Any]) -> bytes:
    """A Predict the way stranded device applications make it: grpcio stub, byte_data."""
    resp = stub.Predict(
        pb.PredictRequest(
            name=name,
            tensors=[
                pb.Tensor(
                    tensor_metadata=pb.TensorMetadata(
                        name="input", data_type=pb.FLOAT32, shape=list(x.shape)
                    ),
                    byte_data=x.tobytes(),
                )
            ],
        ),
        timeout=120,
    )
    return bytes(resp.tensors[0].byte_data)


def grpcio_channel(sock: Path) -> grpc.Channel:
    return grpc.insecure_channel(
        f"unix://{sock}",
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )


Row = tuple[str, int, float, float, float, float]


def print_table(title: str, rows: list[Row]) -> None:
    print(title)
    print(
        f"{'path':<14}{'batch':>6}{'in-proc p50':>13}{'p99':>9}{'socket p50':>12}{'p99':>9}"
        f"{'added p50':>11}{'ratio':>8}"
    )
    for mode, batch, lp50, lp99, rp50, rp99 in rows:
        print(
            f"{mode:<14}{batch:>6}{lp50:>13.0f}{lp99:>9.0f}{rp50:>12.0f}{rp99:>9.0f}"
            f"{rp50 - lp50:>11.0f}{rp50 / lp50:>7.3f}x"
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--no-arena", action="store_true", help="agent without ORT's memory arena")
    ap.add_argument("--chunk", type=int, default=16, help="agent inference_chunk")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0
    max_batch = 1024
    tune_malloc()  # this process is the client: tuned as edge-app tunes itself
    with (
        echo_server() as echo_sock,
        running_agent(
            {
                "max_batch": max_batch,
                "intra_op_threads": 1,
                "memory_arena": not args.no_arena,
                "inference_chunk": args.chunk,
            }
        ) as (client, pid, package),
    ):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = not args.no_arena
        so.enable_mem_pattern = not args.no_arena
        session = ort.InferenceSession(
            str(package / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        agent_stub = pb_grpc.AgentStub(grpcio_channel(client.socket_path))
        echo_stub = pb_grpc.AgentStub(grpcio_channel(echo_sock))
        rng = np.random.default_rng(0)
        idle = rss_mb(pid)
        # (client, path, batch, iterations)
        cases = [
            ("windedge", "byte_data", 1, 2000),
            ("windedge", "byte_data", 2, 2000),
            ("windedge", "byte_data", 256, 40),
            ("windedge", "shared_memory", 1, 2000),
            ("windedge", "shared_memory", 256, 40),
            ("grpcio", "byte_data", 1, 2000),
            ("grpcio", "byte_data", 256, 40),
            ("echo", "byte_data", 1, 2000),
            ("echo", "byte_data", 256, 40),
        ]
        tables: dict[str, list[Row]] = {"windedge": [], "grpcio": [], "echo": []}
        after_b1: tuple[float, float] | None = None
        for who, mode, batch, count in cases:
            n = max(10, int(count * scale))
            x = rng.standard_normal((batch, 6, 10, 10)).astype(np.float32)
            shm = mode == "shared_memory"
            expected = session.run(None, {"input": x})[0]
            remote_call: Callable[[], object]
            if who == "windedge":
                got = client.predict("wt", x, shared_memory=shm)
                remote_call = lambda x=x, shm=shm: client.predict("wt", x, shared_memory=shm)  # noqa: E731
            elif who == "grpcio":
                got = np.frombuffer(grpcio_predict(agent_stub, "wt", x), "<f4").reshape(x.shape)
                remote_call = lambda x=x: grpcio_predict(agent_stub, "wt", x)  # noqa: E731
            else:
                got = expected  # an echo computes nothing: its time is added to the model's
                remote_call = lambda x=x: grpcio_predict(echo_stub, "echo", x)  # noqa: E731
            if not np.allclose(got, expected, atol=1e-5):
                raise SystemExit(f"{who}: agent and in-process outputs differ")
            local: list[float] = []
            remote: list[float] = []
            per = max(5, n // args.rounds)
            for _ in range(args.rounds):  # interleave so drift hits all alike
                part = timed(lambda x=x: session.run(None, {"input": x}), per, 3)
                local += part
                if who == "echo":
                    # what the agent's model costs plus what a do-nothing grpcio server adds
                    echo_only = timed(remote_call, per, 3)
                    remote += [a + b for a, b in zip(sorted(part), sorted(echo_only), strict=True)]
                else:
                    remote += timed(remote_call, per, 3)
            tables[who].append(
                (
                    mode,
                    batch,
                    pct(local, 0.5),
                    pct(local, 0.99),
                    pct(remote, 0.5),
                    pct(remote, 0.99),
                )
            )
            if batch == 1 and after_b1 is None:
                after_b1 = rss_mb(pid)
        big = rng.standard_normal((max_batch, 6, 10, 10)).astype(np.float32)
        for _ in range(3):
            client.predict("wt", big)
        for _ in range(3):
            client.predict("wt", big, shared_memory=True)
        after_max = rss_mb(pid)

    print("Predict latency, wind-turbine autoencoder, 1 ONNX Runtime thread (microseconds)\n")
    print_table(
        "edge-agent, called through windedge's client (edgeagent.client)", tables["windedge"]
    )
    print_table(
        "edge-agent, called through a stock grpcio client (as stranded device applications do)",
        tables["grpcio"],
    )
    print_table(
        "reference: a plain grpcio server (bench/_echo_server.py, doing nothing) and a grpcio\n"
        "client; 'socket' = the model's in-process time + that server's round trip",
        tables["echo"],
    )
    print("agent resident memory (MB): RSS now / high-water mark")
    print(f"  idle, model loaded        {idle[0]:7.1f} / {idle[1]:7.1f}")
    if after_b1 is None:
        raise SystemExit("no batch-1 case ran")
    print(f"  after batch-1 requests    {after_b1[0]:7.1f} / {after_b1[1]:7.1f}")
    print(f"  after batch-{max_batch} requests {after_max[0]:7.1f} / {after_max[1]:7.1f}")


if __name__ == "__main__":
    main()
