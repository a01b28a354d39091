"""Predict latency through the agent's socket versus in-process ONNX Runtime.

Prints p50/p99 per case, what the socket adds at p50 and the ratio, measured
in the same run against the same model with the same thread count (1), then
the agent's resident memory idle, after batch-1 and after maximum-batch
requests. Run: .venv/bin/python bench/agent_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from bench._agent import echo_server, rss_mb, running_agent


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--no-arena", action="store_true", help="agent without ORT's memory arena")
    ap.add_argument("--chunk", type=int, default=16, help="agent inference_chunk")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0
    max_batch = 1024
    with (
        echo_server() as echo,
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
        rng = np.random.default_rng(0)
        idle = rss_mb(pid)
        cases = [
            ("byte_data", 1, 2000),
            ("byte_data", 2, 2000),
            ("byte_data", 256, 40),
            ("shared_memory", 1, 2000),
            ("shared_memory", 256, 40),
        ]
        rows = []
        after_b1: tuple[float, float] | None = None
        for mode, batch, count in cases:
            n = max(10, int(count * scale))
            x = rng.standard_normal((batch, 6, 10, 10)).astype(np.float32)
            shm = mode == "shared_memory"
            expected = session.run(None, {"input": x})[0]
            got = client.predict("wt", x, shared_memory=shm)
            if not np.allclose(got, expected, atol=1e-5):
                raise SystemExit("agent and in-process outputs differ")
            local: list[float] = []
            remote: list[float] = []
            floor: list[float] = []
            per = max(5, n // args.rounds)
            for _ in range(args.rounds):  # interleave so drift hits all alike
                local += timed(lambda x=x: session.run(None, {"input": x}), per, 3)
                remote += timed(
                    lambda x=x, shm=shm: client.predict("wt", x, shared_memory=shm), per, 3
                )
                if not shm:
                    floor += timed(lambda x=x: echo.predict("echo", x), per, 3)
            rows.append(
                (
                    mode,
                    batch,
                    pct(local, 0.5),
                    pct(local, 0.99),
                    pct(remote, 0.5),
                    pct(remote, 0.99),
                    pct(floor, 0.5) if floor else None,
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

    print("Predict latency, wind-turbine autoencoder, 1 ONNX Runtime thread (microseconds)")
    print(
        f"{'path':<14}{'batch':>6}{'in-proc p50':>13}{'p99':>9}{'socket p50':>12}{'p99':>9}"
        f"{'added p50':>11}{'ratio':>8}{'echo p50':>10}"
    )
    for mode, batch, lp50, lp99, rp50, rp99, ep50 in rows:
        echo_col = "" if ep50 is None else f"{ep50:>10.0f}"
        print(
            f"{mode:<14}{batch:>6}{lp50:>13.0f}{lp99:>9.0f}{rp50:>12.0f}{rp99:>9.0f}"
            f"{rp50 - lp50:>11.0f}{rp50 / lp50:>7.3f}x{echo_col}"
        )
    print(
        "echo: a do-nothing Python gRPC server on a Unix socket (bench/_echo_server.py) "
        "with the same client,\nthe floor that any Python gRPC server adds on this machine"
    )
    print()
    print("agent resident memory (MB): RSS now / high-water mark")
    print(f"  idle, model loaded        {idle[0]:7.1f} / {idle[1]:7.1f}")
    if after_b1 is None:
        raise SystemExit("no batch-1 case ran")
    print(f"  after batch-1 requests    {after_b1[0]:7.1f} / {after_b1[1]:7.1f}")
    print(f"  after batch-{max_batch} requests {after_max[0]:7.1f} / {after_max[1]:7.1f}")


if __name__ == "__main__":
    main()
