"""CaptureData throughput and latency, durable (the default) against non-durable acknowledgement.

Four client threads (one connection each, as four device applications) send
CaptureData calls of ~40 KB (a float32 input and output of 8 windows each) as
fast as they can (a refused call backs off 1 ms) to one real agent whose
spool is on this machine's disk. Batches are uploaded meanwhile to a Disk
destination on tmpfs (/dev/shm), standing in for S3: an upload then costs
the spool's disk only what an S3 upload would (the status journal's fsync),
not a Disk destination's own fsyncs on the same device. Modes alternate
in short rounds so that a busy neighbour hits both alike; per mode: calls/s,
p50 and p99 latency of a call, and the durable/non-durable throughput ratio.
It prints which file system the spools are on (fsync on tmpfs is free, on a
disk it is the durable mode's price) and, measured alone in the same run, the
disk's latency for one capture line appended and fsynced.

    .venv/bin/python -m bench.capture_durability [--seconds 2] [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from bench._agent import running_agent
from edgeagent.client import AgentClient
from edgeagent.errors import ResourceExhaustedError

THREADS = 4
RECORD = np.random.default_rng(0).standard_normal((8, 6, 10, 10), dtype=np.float32)  # 19,200 B


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def file_system(path: Path) -> str:
    """``type device`` of the mount holding ``path`` (from /proc/self/mounts)."""
    best = ("", "?", "?")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    for line in mounts:
        device, point, kind = line.split()[:3]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, kind, device)
    return f"{best[1]} on {best[2]}"


def fsync_alone(folder: Path, size: int, count: int = 200) -> tuple[float, float]:
    """p50/p99 seconds to append ``size`` bytes and fsync, alone, in ``folder``."""
    took = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        fd = os.open(Path(tmp) / "probe", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            line = b"x" * size
            for _ in range(count):
                began = time.perf_counter()
                os.write(fd, line)
                os.fsync(fd)
                took.append(time.perf_counter() - began)
        finally:
            os.close(fd)
    return pct(took, 0.5), pct(took, 0.99)


def hammer(socket: Path, seconds: float) -> tuple[list[float], int]:
    """Latency of every call THREADS threads had acknowledged in ``seconds``; refusals.

    A refused call (RESOURCE_EXHAUSTED: the non-durable writer is behind) is
    counted, and its thread backs off 1 ms as a device application would.
    """
    latencies: list[list[float]] = [[] for _ in range(THREADS)]
    refused = [0] * THREADS
    start = threading.Barrier(THREADS + 1)
    stop = threading.Event()

    def run(index: int) -> None:
        mine = latencies[index]
        with AgentClient(socket, timeout=60) as client:
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    client.capture_data(
                        model_name="wt",
                        capture_id=str(uuid.uuid4()),
                        inputs=[RECORD],
                        outputs=[RECORD],
                    )
                except ResourceExhaustedError:
                    refused[index] += 1
                    time.sleep(0.001)
                    continue
                mine.append(time.perf_counter() - began)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return [x for mine in latencies for x in mine], sum(refused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="idle seconds after each round (uploads)"
    )
    parser.add_argument(
        "--destination-parent",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the Disk destination's folder is made (default /dev/shm)",
    )
    args = parser.parse_args()

    modes = {"durable": True, "non-durable": False}
    calls: dict[str, int] = dict.fromkeys(modes, 0)
    refusals: dict[str, int] = dict.fromkeys(modes, 0)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    per_round: dict[str, list[float]] = {m: [] for m in modes}
    common = {
        "capture_buffer_size": 1_000_000,
        "capture_spool_max_bytes": 8 << 30,
        "capture_batch_size": 64,
        "capture_push_period_seconds": 1.0,
        "workers": 8,
    }
    with contextlib.ExitStack() as stack:
        sockets: dict[str, Path] = {}
        for mode, durable in modes.items():
            destination = tempfile.mkdtemp(
                prefix="windedge-bench-out-", dir=args.destination_parent
            )
            stack.callback(shutil.rmtree, destination, ignore_errors=True)
            config = {**common, "capture_sync_ack": durable, "capture_disk_path": destination}
            _client, _pid, package = stack.enter_context(running_agent(config))
            sockets[mode] = package.parent / "agent.sock"  # running_agent puts both there
            hammer(sockets[mode], 0.5)  # warm up
        # both agents stay up; the modes take turns in short rounds, so that the
        # machine's other load drifts over both alike
        for round_ in range(args.rounds):
            order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
            for mode in order:
                latencies, refused = hammer(sockets[mode], args.seconds)
                # let the round's leftovers (sealing, uploads) finish before the
                # other mode's round, so neither pays for the other's backlog
                time.sleep(args.settle)
                calls[mode] += len(latencies)
                refusals[mode] += refused
                samples[mode].extend(latencies)
                per_round[mode].append(len(latencies) / args.seconds)

        spool_parent = sockets["durable"].parent
        line_bytes = 54_000  # one such capture's spool line (base64 and JSON)
        alone = fsync_alone(spool_parent, line_bytes)

    total_seconds = args.rounds * args.seconds
    print(
        f"CaptureData, {THREADS} threads, ~{2 * RECORD.nbytes // 1000} KB records, "
        f"{args.rounds} rounds x {args.seconds:g} s per mode"
    )
    print(
        f"spools on {file_system(spool_parent)}; one {line_bytes // 1000} KB line appended "
        f"and fsynced alone there: p50 {alone[0] * 1e3:.2f} ms, p99 {alone[1] * 1e3:.2f} ms"
    )
    print("acknowledged calls/s (range over rounds), p50/p99 latency of an acknowledged call")
    head = ("mode", "calls/s", "per round", "p50 ms", "p99 ms", "refused/s")
    print(f"{head[0]:<12} {head[1]:>8} {head[2]:>20} {head[3]:>7} {head[4]:>7} {head[5]:>9}")
    for mode in modes:
        rounds = f"{min(per_round[mode]):.0f}-{max(per_round[mode]):.0f}"
        print(
            f"{mode:<12} {calls[mode] / total_seconds:8.0f} {rounds:>20} "
            f"{statistics.median(samples[mode]) * 1e3:7.2f} {pct(samples[mode], 0.99) * 1e3:7.2f} "
            f"{refusals[mode] / total_seconds:9.0f}"
        )
    ratio = calls["durable"] / max(1, calls["non-durable"])
    print(f"durable / non-durable throughput: {ratio:.2f}x (goal >= 0.80x)")


if __name__ == "__main__":
    main()
