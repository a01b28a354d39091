"""The agent's memory, threads and Predict latency while 2,000 connections are attempted.

A real agent serves the bundled model; this process opens 2,000 connections to
its socket at once: first some silent ones (slowloris: not even the HTTP/2
preface), then idle ones that send the preface and SETTINGS and nothing more.
A client that was connected before keeps calling Predict (batch 1) all along.
Printed per ``max_connections``: connections kept and refused, the agent's RSS
and thread count idle (the baseline of the same run), with the connections
held and after they are gone, Predict p50 / max before and during, and the
agent's CPU time per batch-1 Predict (a figure a loaded machine moves less than
latency).

    .venv/bin/python -m bench.agent_connections [--caps 256,2048] [--connections 2000]

A cap of 0 starts the agent without the key (for builds that do not know it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from bench._agent import running_agent
from edgeagent.client import AgentClient
from edgeagent.wire import h2

SILENT = 100  # of the connections, the first ones send nothing at all


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far (robust to a loaded machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_predicts(client: AgentClient, x: NDArray[np.float32], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        client.predict("wt", x)
        out.append(time.perf_counter() - started)
    return out


def refused(sock: socket.socket) -> bool:
    """The agent answered with GOAWAY and closed (a kept connection stays silent)."""
    sock.setblocking(False)
    data = b""
    with contextlib.suppress(BlockingIOError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    frames = h2.FrameReader(1 << 24).feed(data)
    return any(f.kind == h2.GOAWAY for f in frames)


def run(cap: int, connections: int) -> dict[str, float]:
    config: dict[str, object] = {"max_connections": cap} if cap else {}
    x = np.zeros((1, 6, 10, 10), np.float32)
    with running_agent(config) as (first, pid, _package):
        socket_path = first.socket_path
        with AgentClient(socket_path, timeout=30) as client:
            timed_predicts(client, x, 300)  # warm up
            idle = status(pid)
            cpu = cpu_seconds(pid)
            before = timed_predicts(client, x, 2000)
            cpu_per_call = (cpu_seconds(pid) - cpu) / len(before)
            socks: list[socket.socket] = []
            during: list[float] = []
            opening = h2.PREFACE + h2.settings_frame({})
            started = time.monotonic()
            for i in range(connections):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(socket_path))
                if i >= SILENT:
                    with contextlib.suppress(OSError):
                        sock.sendall(opening)
                socks.append(sock)
                if i % 25 == 0:
                    during += timed_predicts(client, x, 1)
            opened_s = time.monotonic() - started
            time.sleep(1.0)
            during += timed_predicts(client, x, 200)
            held = status(pid)
            kept = sum(not refused(s) for s in socks)
            for sock in socks:
                sock.close()
            time.sleep(1.0)
            after = status(pid)
    return {
        "cap": cap,
        "kept": kept,
        "refused": connections - kept,
        "open_s": opened_s,
        "rss_idle": idle["VmRSS"] / 1024,
        "rss_held": held["VmRSS"] / 1024,
        "rss_after": after["VmRSS"] / 1024,
        "hwm": held["VmHWM"] / 1024,
        "threads_idle": idle["Threads"],
        "threads_held": held["Threads"],
        "cpu_us": cpu_per_call * 1e6,
        "p50_before": statistics.median(before) * 1e6,
        "p50_during": statistics.median(during) * 1e6,
        "max_during": max(during) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--caps", default="256,2048", help="max_connections values (0: unset)")
    ap.add_argument("--connections", type=int, default=2000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    rows = [run(int(c), args.connections) for c in args.caps.split(",")]
    print(f"{args.connections} connections attempted at once ({SILENT} silent, then idle ones)")
    print(
        "max_conn  kept  refused  RSS MB idle -> held (x idle) -> closed  peak   "
        "threads idle/held  Predict p50 before/during us  max during us"
    )
    for r in rows:
        print(
            f"{int(r['cap']) or '(unset)':>8} {int(r['kept']):>5} {int(r['refused']):>8}  "
            f"{r['rss_idle']:>7.1f} -> {r['rss_held']:6.1f} ({r['rss_held'] / r['rss_idle']:.3f}x)"
            f" -> {r['rss_after']:6.1f}  {r['hwm']:6.1f}   "
            f"{int(r['threads_idle']):>6}/{int(r['threads_held']):<6}  "
            f"{r['p50_before']:>12.0f}/{r['p50_during']:<8.0f}  {r['max_during']:>12.0f}"
        )
        print(f"          agent CPU per batch-1 Predict: {r['cpu_us']:.0f} us")
        extra = r["rss_held"] - r["rss_idle"]
        if r["kept"]:
            print(f"          {extra * 1024 / r['kept']:.1f} KiB per kept connection")


if __name__ == "__main__":
    main()
