"""How large a wind farm one edge-app keeps up with on this machine, and where the time goes.

    .venv/bin/python bench/farm_scale.py [--quick] [--turbines 250 500 1000 ...]

Starts mosquitto (loopback, free port), an edge-agent serving the bundled
model, and for each farm size a fresh ``edge-app`` process; a load generator
publishes every turbine at 20 Hz (one sample per message, after a fast
prefill of each turbine's 500-sample buffer) and a listener receives the
verdicts. Both speak MQTT over raw sockets with pre-encoded packets, so they
cost the shared CPU as little as possible. All processes are ended before
the script exits; the whole run is bounded by ``--budget`` seconds.

A farm size *keeps up* when, over the measurement window, every tick scored
every turbine, the tick's processing p99 stayed under the 500 ms period, and
the app ingested what was sent (no backlog). Sizes are tried in increasing
order until one fails.

Then it reports, per size: tick processing p50/p99/max and the time per stage
(gather, prepare, inference in the agent, score, publish on its own thread, and the
tick waiting for that at its end), sample-to-verdict
latency p50/p99 (inside the app: newest sample's arrival to publish; end to
end: the sample's publish time, its ``ts``, to the verdict's arrival at the
listener), CPU per process, and the app's resident memory. Separately, the
cost per item of each stage: the MQTT client plus JSON parsing plus validation
per message (an app run with no model, so it only ingests), ``json.loads``
alone, the ingest path alone (a read's messages at once, as the app, and one at a
time), ``prepare_windows`` per turbine batched versus the
one-turbine-at-a-time reference of ``tests/edgeapp/reference.py``,
``windows_from_features`` on float32 features as the app's buffers store them
(what its tick runs), inference per window through the agent, and publishing
per verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

# the per-item costs below run with one BLAS thread, like edge-app (edgeapp.__main__)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import paho.mqtt.client as paho
from numpy.typing import NDArray
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._agent import PACKAGE, running_agent  # noqa: E402
from edgeapp.buffers import TurbineBuffers  # noqa: E402
from edgeapp.detector import VerdictBatch  # noqa: E402
from edgeapp.features import (  # noqa: E402
    PreprocessingParams,
    prepare_windows,
    raw_to_features,
    score,
    windows_from_features,
)
from edgeapp.ingest import DropCounter, Ingestor  # noqa: E402
from edgeapp.mqtt import BrokerConfig, MqttClient  # noqa: E402
from edgeapp.publisher import MqttPublisher, Topics, verdict_payloads  # noqa: E402
from edgeapp.sources import TopicPattern  # noqa: E402

MODEL = "wt"  # the name bench/_agent.py loads the bundled package under
RATE_HZ = 20.0
TICK_S = 0.5
BUFFER = 500
PREFILL_BATCH = 100
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
EDGE_APP = str(Path(sys.executable).with_name("edge-app"))


# ---------------------------------------------------------------- MQTT on raw sockets


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    ack = sock.recv(4)
    if ack[:2] != b"\x20\x02" or ack[3:4] != b"\x00":
        raise RuntimeError(f"broker refused {client_id}: {ack!r}")
    return sock


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    body_len = 2 + len(topic) + len(payload)
    return b"\x30" + _varint(body_len) + struct.pack("!H", len(topic)) + topic + payload


def mqtt_subscribe(sock: socket.socket, topic: str) -> None:
    t = topic.encode()
    body = b"\x00\x01" + struct.pack("!H", len(t)) + t + b"\x00"
    sock.sendall(b"\x82" + _varint(len(body)) + body)


# ---------------------------------------------------------------- synthetic turbines


def sample_pool(count: int, seed: int = 7) -> list[dict[str, float]]:
    """Turbine-like samples around the seed statistics (20 Hz series)."""
    rng = np.random.default_rng(seed)
    t = np.arange(count) / RATE_HZ
    roll = -0.008 + 0.016 * rng.standard_normal(count)
    pitch = 0.001 + 0.016 * rng.standard_normal(count)
    yaw = 0.3 + np.cumsum(0.01 * rng.standard_normal(count))
    cr, sr, cp, sp = np.cos(roll / 2), np.sin(roll / 2), np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    rps = 1.6 + 0.3 * np.sin(2 * math.pi * t / 30) + 0.1 * rng.standard_normal(count)
    wind = 2.15 + 0.8 * (rps - 1.6) + 0.1 * rng.standard_normal(count)
    volts = 47.8 / 1.6 * rps + 2.0 * rng.standard_normal(count)
    columns = {
        "qx": sr * cp * cy - cr * sp * sy,
        "qy": cr * sp * cy + sr * cp * sy,
        "qz": cr * cp * sy - sr * sp * cy,
        "qw": cr * cp * cy + sr * sp * sy,
        "wind_speed_rps": wind,
        "rps": rps,
        "voltage": volts,
    }
    return [{k: round(float(v[i]), 6) for k, v in columns.items()} for i in range(count)]


def run_sensors(port: int, turbines: int, out: Path) -> None:
    """Role: prefill every turbine's buffer, then one sample per turbine every 50 ms."""
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sock = mqtt_connect(port, "bench-sensors")
    pool = sample_pool(400)
    # pre-encoded bodies without the ts: b'"qx":...}' (the payload is b'{"ts":N,' + body)
    bodies = [json.dumps(s, separators=(",", ":")).encode()[1:] for s in pool]
    topics = [f"wind-turbine/t{i:05d}/raw-data".encode() for i in range(turbines)]
    headers = [struct.pack("!H", len(t)) + t for t in topics]
    offsets = [(37 * i) % len(pool) for i in range(turbines)]
    # prefill: 500 samples per turbine in batches, paced so the broker never queues much
    now_ms = int(time.time() * 1000)
    for begin in range(0, BUFFER, PREFILL_BATCH):
        for i in range(turbines):
            batch = [
                dict(pool[(offsets[i] + j) % len(pool)], ts=now_ms - (BUFFER - j) * 50)
                for j in range(begin, begin + PREFILL_BATCH)
            ]
            payload = json.dumps({"samples": batch}, separators=(",", ":")).encode()
            sock.sendall(publish_packet(topics[i], payload))
            if i % 50 == 49:
                time.sleep(0.02)
    sent = 0
    steps = 0
    late = 0
    max_lag = 0.0
    started = time.monotonic()
    next_at = started
    k = 0
    while not stop:
        ts = b'{"ts":%d,' % int(time.time() * 1000)
        parts = []
        for i in range(turbines):
            payload = ts + bodies[(offsets[i] + k) % len(bodies)]
            parts.append(b"\x30" + _varint(len(headers[i]) + len(payload)) + headers[i] + payload)
        sock.sendall(b"".join(parts))
        sent += turbines
        steps += 1
        k += 1
        next_at += 1.0 / RATE_HZ
        lag = time.monotonic() - next_at
        if lag > 0:
            late += 1
            max_lag = max(max_lag, lag)
        else:
            time.sleep(-lag)
    elapsed = time.monotonic() - started
    sock.close()
    out.write_text(
        json.dumps(
            {
                "sent": sent,
                "steps": steps,
                "late_steps": late,
                "max_lag_ms": max_lag * 1000,
                "rate": sent / elapsed,
            }
        )
    )


_VERDICT = re.compile(rb'^\{"ts":(\d+),.*"latency_ms":([0-9.]+)\}$', re.DOTALL)


def run_listener(port: int, out: Path) -> None:
    """Role: receive verdicts; write (turbine, received ms, ts, latency_ms) rows at the end."""
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sock = mqtt_connect(port, "bench-listener")
    mqtt_subscribe(sock, "wind-turbine/+/anomalies")
    sock.settimeout(0.2)
    buf = b""
    rows: list[tuple[int, float, int, float]] = []
    while not stop:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            break
        received = time.time() * 1000.0
        buf += chunk
        pos = 0
        while True:
            if len(buf) - pos < 2:
                break
            length, mult, i = 0, 1, pos + 1
            while i < len(buf):
                byte = buf[i]
                length += (byte & 127) * mult
                mult *= 128
                i += 1
                if not byte & 128:
                    break
            else:
                break
            end = i + length
            if end > len(buf):
                break
            if buf[pos] >> 4 == 3:  # PUBLISH, QoS 0
                tlen = struct.unpack_from("!H", buf, i)[0]
                topic = buf[i + 2 : i + 2 + tlen]
                match = _VERDICT.match(buf[i + 2 + tlen : end])
                if match:
                    turbine = int(topic.split(b"/")[1][1:])
                    rows.append((turbine, received, int(match[1]), float(match[2])))
            pos = end
        buf = buf[pos:]
    sock.close()
    np.save(out, np.array(rows, dtype=np.float64).reshape(-1, 4))


def run_counting_subscriber(
    port: int,
    impl: str,
    out: Path,
    *,
    tls: ssl.SSLContext | None = None,
    stream_max_bytes: int = 1024,
) -> None:
    """Role: receive the sensor stream with paho or edgeapp's subscriber (over ``tls`` if
    given), count, report CPU from the first message of at most ``stream_max_bytes``."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    state = {"messages": 0, "first_cpu": 0.0}

    def count(_topic: str, payload: bytes, _arrival: float) -> None:
        # from the first one-sample message on: the prefill's large ones are not the stream
        if not state["messages"]:
            if len(payload) > stream_max_bytes:
                return
            state["first_cpu"] = time.process_time()
        state["messages"] += 1

    if impl == "paho":
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho")
        client.on_connect = lambda c, *_: c.subscribe("wind-turbine/+/raw-data")
        client.on_message = lambda _c, _u, msg: count(msg.topic, msg.payload, 0.0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        stop.wait()
        client.disconnect()
        client.loop_stop()
    else:
        sub = MqttClient(
            broker=BrokerConfig(host="127.0.0.1", port=port, tls=tls),
            client_id="bench-edgeapp",
            subscription="wind-turbine/+/raw-data",
            on_message=count,
        )
        sub.start()
        stop.wait()
        sub.stop()
    cpu = time.process_time() - state["first_cpu"]
    out.write_text(json.dumps({"messages": state["messages"], "cpu_s": cpu}))


# ---------------------------------------------------------------- processes


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """RSS and its peak (status), PSS and private memory (smaps_rollup), in MB.

    RSS counts shared library pages in full although the agent maps the same
    ones (numpy, gRPC, Python); PSS splits shared pages between the processes
    that map them; private is what the app alone adds.
    """
    values: dict[str, float] = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Pss", "Private_Clean", "Private_Dirty"):
                values[key] = int(rest.split()[0]) / 1024
    return {
        "rss": values["VmRSS"],
        "peak": values["VmHWM"],
        "pss": values["Pss"],
        "private": values["Private_Clean"] + values["Private_Dirty"],
    }


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Child:
    """A child process in its own group; ``stop`` ends the whole group."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        with log.open("wb") as handle:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                cwd=ROOT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def mosquitto(tmp: Path) -> Iterator[tuple[int, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = Child([MOSQUITTO, "-c", str(conf)], tmp / "mosquitto.log")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)
        yield port, broker.pid
    finally:
        broker.stop()


def app_events(log: Path, event: str) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError), log.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("{") and f'"event": "{event}"' in line:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


def epoch(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_app(
    tmp: Path, name: str, port: int, agent_socket: Path, turbines: int, **overrides: object
) -> Child:
    config: dict[str, object] = {
        "agent_socket": str(agent_socket),
        "mqtt_port": port,
        "model_name": MODEL,
        "max_turbines": turbines,
        "tick_period_s": TICK_S,
        "status_period_s": 10.0,
        "log_level": "DEBUG",  # the per-tick lines this benchmark reads
        "learned_file": str(tmp / f"{name}-learned.json"),
        **overrides,
    }
    lines = ["[app]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    conf = tmp / f"{name}.toml"
    conf.write_text("\n".join(lines) + "\n")
    app = Child([EDGE_APP, "--config", str(conf)], tmp / f"{name}.log")
    wait_for(lambda: app_events(app.log, "subscribed"), 30, f"{name} to subscribe")
    return app


def role(name: str, port: int, turbines: int, out: Path, tmp: Path) -> Child:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", name, "--port", str(port)]
    argv += ["--turbines", str(turbines), "--out", str(out)]
    return Child(argv, tmp / f"{name}-{turbines}-{time.monotonic_ns()}.log")


def pct(values: Sequence[float] | NDArray[np.float64], q: float) -> float:
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ---------------------------------------------------------------- one farm size


@dataclass
class FarmResult:
    turbines: int
    ticks: int = 0
    full_ticks: int = 0
    tick_p50: float = math.nan
    tick_p99: float = math.nan
    tick_max: float = math.nan
    stages: dict[str, float] = field(default_factory=dict)
    sent_rate: float = 0.0
    ingest_rate: float = 0.0
    dropped: int = 0
    latency_p50: float = math.nan
    latency_p99: float = math.nan
    e2e_p50: float = math.nan
    e2e_p99: float = math.nan
    verdict_rate: float = 0.0
    min_verdicts_per_turbine: int = 0
    expected_per_turbine: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def keeps_up(self) -> bool:
        return (
            self.ticks > 0
            and self.full_ticks == self.ticks
            and self.tick_p99 < TICK_S * 1000
            and self.ingest_rate >= 0.98 * self.sent_rate
            and self.min_verdicts_per_turbine >= self.expected_per_turbine - 1
        )


def run_farm(
    n: int, *, port: int, agent_socket: Path, agent_pid: int, broker_pid: int, seconds: float,
    tmp: Path, max_batch: int, stuck_after_samples: int | None = None,
) -> FarmResult:  # fmt: skip
    result = FarmResult(turbines=n)
    extra = {} if stuck_after_samples is None else {"stuck_after_samples": stuck_after_samples}
    app = start_app(tmp, f"app-{n}", port, agent_socket, n, max_batch=max_batch, **extra)
    sensors_out, listener_out = tmp / f"sensors-{n}.json", tmp / f"listener-{n}.npy"
    listener = role("listener", port, n, listener_out, tmp)
    sensors: Child | None = None
    try:
        time.sleep(0.5)  # the listener subscribes
        sensors = role("sensors", port, n, sensors_out, tmp)
        try:
            wait_for(
                lambda: any(t["verdicts"] >= n for t in app_events(app.log, "tick")),
                max(60.0, n / 20),
                f"a full tick at {n} turbines",
            )
        except RuntimeError as exc:
            result.note = str(exc)
        time.sleep(2 * TICK_S)  # let the prefill's backlog drain
        pids = {
            "app": app.pid,
            "agent": agent_pid,
            "broker": broker_pid,
            "sensors": sensors.pid,
            "listener": listener.pid,
        }
        cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
        busy0 = machine_busy_s()
        t0, w0 = time.monotonic(), time.time()
        time.sleep(seconds)
        t1, w1 = time.monotonic(), time.time()
        busy1 = machine_busy_s()
        cpu1 = {k: proc_cpu_s(p) for k, p in pids.items()}
        result.cpu = {k: (cpu1[k] - cpu0[k]) / (t1 - t0) for k in pids}
        result.cpu["other processes"] = max(
            0.0, (busy1 - busy0) / (t1 - t0) - sum(result.cpu.values())
        )
        result.memory = memory_mb(app.pid)
    finally:
        if sensors is not None:
            sensors.stop()
        time.sleep(2 * TICK_S)
        listener.stop()
        app.stop()
    ticks = [t for t in app_events(app.log, "tick") if w0 <= epoch(t) <= w1]
    result.ticks = len(ticks)
    if ticks:
        totals = [t["total_ms"] for t in ticks]
        result.tick_p50, result.tick_p99, result.tick_max = (
            pct(totals, 50), pct(totals, 99), max(totals),
        )  # fmt: skip
        result.full_ticks = sum(1 for t in ticks if t["verdicts"] >= n)
        for stage in ("gather", "prepare", "infer", "wait", "score", "publish", "publish_wait"):
            result.stages[stage] = float(np.mean([t.get(f"{stage}_ms", 0.0) for t in ticks]))
        span = epoch(ticks[-1]) - epoch(ticks[0])
        inner = ticks[1:]
        if span > 0:
            result.ingest_rate = sum(t["messages"] for t in inner) / span
            result.dropped = sum(t["dropped"] for t in inner)
    with contextlib.suppress(FileNotFoundError, ValueError):
        stats = json.loads(sensors_out.read_text())
        result.sent_rate = stats["rate"]
        if stats["late_steps"] > stats["steps"] * 0.05:
            result.note += f" load generator late in {stats['late_steps']}/{stats['steps']} steps"
    with contextlib.suppress(FileNotFoundError):
        rows = np.load(listener_out)
        window = rows[(rows[:, 1] >= w0 * 1000) & (rows[:, 1] <= w1 * 1000)]
        if len(window):
            result.latency_p50, result.latency_p99 = pct(window[:, 3], 50), pct(window[:, 3], 99)
            e2e = window[:, 1] - window[:, 2]
            result.e2e_p50, result.e2e_p99 = pct(e2e, 50), pct(e2e, 99)
            counts = np.bincount(window[:, 0].astype(np.int64), minlength=n)[:n]
            result.min_verdicts_per_turbine = int(counts.min())
            result.verdict_rate = len(window) / (w1 - w0)
    result.expected_per_turbine = int(seconds / TICK_S)
    return result


# ---------------------------------------------------------------- costs per item


def load_reference() -> ModuleType:
    path = ROOT / "tests" / "edgeapp" / "reference.py"
    spec = importlib.util.spec_from_file_location("windedge_features_reference", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_of(fn: Any, number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def ingestion_only(
    n: int, *, port: int, agent_socket: Path, seconds: float, tmp: Path
) -> dict[str, float]:
    """An app with no model at n turbines: CPU per message of MQTT client + JSON + validation."""
    app = start_app(tmp, f"ingest-{n}", port, agent_socket, n, model_name="no-such-model")
    sensors = role("sensors", port, n, tmp / f"ingest-sensors-{n}.json", tmp)
    try:
        wait_for(
            lambda: sum(t["messages"] for t in app_events(app.log, "tick")) > n * 5 + n * 20,
            max(60.0, n / 20),
            "ingestion to start",
        )
        time.sleep(1.0)
        cpu0, w0 = proc_cpu_s(app.pid), time.time()
        time.sleep(seconds)
        cpu1, w1 = proc_cpu_s(app.pid), time.time()
    finally:
        sensors.stop()
        app.stop()
    ticks = [t for t in app_events(app.log, "tick") if w0 <= epoch(t) <= w1]
    messages = sum(t["messages"] for t in ticks[1:])
    span = epoch(ticks[-1]) - epoch(ticks[0]) if len(ticks) > 1 else 0.0
    rate = messages / span if span else math.nan
    result = {
        "cores": (cpu1 - cpu0) / (w1 - w0),
        "msg_rate": rate,
        "us_per_msg": (cpu1 - cpu0) / (w1 - w0) / rate * 1e6 if rate else math.nan,
    }
    # the MQTT clients alone, receiving the same stream and only counting
    for impl in ("paho", "edgeapp"):
        out = tmp / f"client-{impl}.json"
        listener = role(f"count-{impl}", port, n, out, tmp)
        time.sleep(0.5)
        sensors = role("sensors", port, n, tmp / f"client-sensors-{impl}.json", tmp)
        time.sleep(seconds)
        sensors.stop()
        time.sleep(0.5)
        listener.stop()
        stats = json.loads(out.read_text())
        result[f"{impl}_us"] = stats["cpu_s"] / max(1, stats["messages"]) * 1e6
        result[f"{impl}_messages"] = stats["messages"]
    return result


def item_costs(n: int, port: int, agent_client: Any) -> dict[str, float]:
    params = PreprocessingParams.default()
    costs: dict[str, float] = {}
    pool = sample_pool(BUFFER)
    payload = json.dumps({"ts": int(time.time() * 1000), **pool[0]}).encode()
    costs["json_loads_us"] = best_of(lambda: json.loads(payload), 20000) * 1e6
    buffers = TurbineBuffers(max_turbines=n, capacity=BUFFER, gap_reset_s=10.0)
    ingestor = Ingestor(
        buffers=buffers,
        topics=TopicPattern("wind-turbine/+/raw-data"),
        drops=DropCounter(interval_s=10.0),
        max_payload_bytes=65536,
        max_samples_per_message=1000,
        max_abs_quaternion=1.5,
        max_abs_value=1e5,
    )
    topics = [f"wind-turbine/t{i:05d}/raw-data" for i in range(n)]
    clock = iter(range(10**9))

    def ingest_round() -> None:
        for topic in topics:
            ingestor.on_message(topic, payload, next(clock) * 1e-6)

    costs["ingest_one_us"] = best_of(ingest_round, 3) / n * 1e6
    # what the MQTT source does: a socket read's messages at once (~1,800 of them)
    names = [t.encode() for t in topics]
    read = 1800

    def ingest_reads() -> None:
        for begin in range(0, n, read):
            part = slice(begin, begin + read)
            ingestor.on_messages(names[part], [payload] * len(names[part]), next(clock) * 1e-6)

    costs["ingest_us"] = best_of(ingest_reads, 3) / n * 1e6
    # prepare_windows: batched over the farm versus one turbine at a time (reference)
    raw = np.array([[[s[k] for k in ("qx", "qy", "qz", "qw", "wind_speed_rps", "rps",
                                     "voltage")] for s in pool]] * n)  # fmt: skip
    raw += np.random.default_rng(1).normal(0, 1e-3, raw.shape)
    prepare_windows(raw, params)  # warm-up: plans, caches, page faults
    costs["prepare_batched_us"] = best_of(lambda: prepare_windows(raw, params), 1, 9) / n * 1e6
    # what the app's tick runs: the buffers hold float32 features (converted on arrival)
    stored = raw_to_features(raw).astype(np.float32)
    windows_from_features(stored, params)
    costs["prepare_stored_us"] = (
        best_of(lambda: windows_from_features(stored, params), 1, 9) / n * 1e6
    )
    reference = load_reference()
    kwargs = {
        "raw_std": params.raw_std, "mean": params.mean, "std": params.std,
        "window": params.window, "step": params.step, "wavelet": params.wavelet,
        "max_level": params.max_level,
    }  # fmt: skip
    few = raw[:20]
    costs["prepare_reference_us"] = (
        best_of(lambda: [reference.prepare_windows(b, **kwargs) for b in few], 1, repeat=3)
        / len(few)
        * 1e6
    )
    # inference through the agent, per window, at the app's chunk size
    windows = prepare_windows(raw[:256], params).reshape(-1, 6, 10, 10)
    agent_client.predict(MODEL, windows)
    costs["infer_us_per_window"] = (
        best_of(lambda: agent_client.predict(MODEL, windows), 1, repeat=5) / len(windows) * 1e6
    )
    # scoring and publishing n verdicts to the broker
    out = np.asarray(agent_client.predict(MODEL, windows)).reshape(-1, 1, 6, 10, 10)
    scores = score(windows.reshape(-1, 1, 6, 10, 10), out, params)
    reps = max(1, n // len(windows))
    batch = VerdictBatch(
        turbines=[f"t{i:05d}" for i in range(len(windows) * reps)],
        ts_ms=np.full(len(windows) * reps, int(time.time() * 1000), dtype=np.int64),
        arrival=np.full(len(windows) * reps, time.monotonic()),
        model=MODEL,
        version="1.0",
        scores=np.tile(scores.scores, (reps, 1)),
        thresholds=params.thresholds,
        anomalies={k: np.tile(v, reps) for k, v in scores.groups.items()},
    )
    client = MqttClient(broker=BrokerConfig(host="127.0.0.1", port=port), client_id="bench-pub")
    publisher = MqttPublisher(client=client, topics=Topics("bench-out"))
    client.start()
    try:
        client.wait_connected(10)
        costs["publish_us"] = (
            best_of(lambda: publisher.verdicts(batch), 1, repeat=5) / len(batch.turbines) * 1e6
        )
    finally:
        client.stop()
    # the same messages through paho-mqtt (CPU of all its threads, per message)
    payloads = verdict_payloads(batch, time.monotonic())
    topics = [f"bench-out/{t}/anomalies" for t in batch.turbines]
    pahoc = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho-pub")
    pahoc.connect("127.0.0.1", port)
    pahoc.loop_start()
    try:
        best = math.inf
        for _ in range(5):
            started = time.process_time()
            infos = [pahoc.publish(t, p) for t, p in zip(topics, payloads, strict=True)]
            infos[-1].wait_for_publish(10)
            best = min(best, time.process_time() - started)
        costs["paho_publish_us"] = best / len(topics) * 1e6
    finally:
        pahoc.disconnect()
        pahoc.loop_stop()
    return costs


# ---------------------------------------------------------------- report


def print_result(r: FarmResult) -> None:
    stages = ", ".join(f"{k} {v:.0f}" for k, v in r.stages.items())
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items())
    print(
        f"\n{r.turbines} turbines: {'KEEPS UP' if r.keeps_up else 'falls behind'}"
        f"{(' (' + r.note.strip() + ')') if r.note else ''}\n"
        f"  ticks {r.ticks}, every turbine scored in {r.full_ticks}; tick ms p50 {r.tick_p50:.0f}"
        f" p99 {r.tick_p99:.0f} max {r.tick_max:.0f}\n"
        f"  mean ms per tick: {stages}\n"
        f"  samples sent {r.sent_rate:.0f}/s, ingested {r.ingest_rate:.0f}/s, dropped {r.dropped}\n"
        f"  verdicts {r.verdict_rate:.0f}/s, fewest per turbine {r.min_verdicts_per_turbine}"
        f" of {r.expected_per_turbine}\n"
        f"  latency ms (app: arrival -> publish) p50 {r.latency_p50:.0f} p99 {r.latency_p99:.0f};"
        f" end to end (sample ts -> verdict received) p50 {r.e2e_p50:.0f} p99 {r.e2e_p99:.0f}\n"
        f"  CPU cores: {cpu}\n"
        f"  app memory MB: RSS {r.memory.get('rss', math.nan):.0f} (peak"
        f" {r.memory.get('peak', math.nan):.0f}), PSS {r.memory.get('pss', math.nan):.0f},"
        f" private {r.memory.get('private', math.nan):.0f}"
    )


def print_costs(c: dict[str, float], ingest: dict[str, float] | None, n: int) -> None:
    ratio = c["prepare_reference_us"] / c["prepare_batched_us"]
    print(
        f"\ncost per item (n = {n} turbines):\n"
        f"  json.loads of one sample message      {c['json_loads_us']:7.1f} us\n"
        f"  ingest path (parse+validate+write)    {c['ingest_us']:7.1f} us per message"
        f" (a read's messages at once; one at a time: {c['ingest_one_us']:.1f} us)\n"
        f"  prepare_windows batched               {c['prepare_batched_us']:7.1f} us per turbine\n"
        f"  prepare_windows reference, one by one {c['prepare_reference_us']:7.1f} us per turbine"
        f"  ({ratio:.0f}x)\n"
        f"  windows_from_features, stored float32 {c['prepare_stored_us']:7.1f} us per turbine"
        f" (the app's tick)\n"
        f"  inference through the agent           {c['infer_us_per_window']:7.1f} us per window\n"
        f"  verdict payload + MQTT publish        {c['publish_us']:7.1f} us per verdict"
        f" (paho-mqtt: {c['paho_publish_us']:.1f} us to publish one already encoded)"
    )
    if ingest:
        print(
            f"  app with no model (ingestion only) at {ingest['msg_rate']:.0f} msg/s:"
            f" {ingest['cores']:.2f} cores, {ingest['us_per_msg']:.1f} us per message all in"
            f" (so the MQTT client itself ~{ingest['us_per_msg'] - c['ingest_us']:.1f} us)\n"
            f"  MQTT client alone, receiving only: edgeapp.mqtt"
            f" {ingest['edgeapp_us']:.1f} us, paho-mqtt {ingest['paho_us']:.1f} us per message"
        )
    msgs = n * RATE_HZ
    per_tick = n / TICK_S
    print(f"\nbudget at {n} turbines (core-ms per second; 2000 = this whole machine):")
    rows = [
        ("ingestion: MQTT client", (ingest["us_per_msg"] - c["ingest_us"]) * msgs / 1000
         if ingest else math.nan),
        ("ingestion: decode, check, buffer write", c["ingest_us"] * msgs / 1000),
        ("preprocessing (stored features)", c["prepare_stored_us"] * per_tick / 1000),
        ("inference (agent)", c["infer_us_per_window"] * per_tick / 1000),
        ("publishing verdicts", c["publish_us"] * per_tick / 1000),
    ]  # fmt: skip
    for name, value in rows:
        print(f"  {name:36s} {value:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--turbines", type=int, nargs="*", default=[500, 1000, 1100, 1200, 1300, 1500]
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    parser.add_argument("--quick", action="store_true", help="a 6 s window; sizes 250 and 1000")
    parser.add_argument("--max-batch", type=int, default=256, help="the app's max_batch")
    parser.add_argument("--budget", type=float, default=420.0, help="stop trying sizes after")
    parser.add_argument("--no-costs", action="store_true", help="skip the per-item costs")
    parser.add_argument(
        "--stuck-after-samples",
        type=int,
        help="the app's flat-line check (default: the app's own, 200; 0: off)",
    )
    parser.add_argument(
        "--package",
        type=Path,
        default=PACKAGE,
        help="model package the agent serves (e.g. models/wind-turbine-compact-1.0.tar.gz)",
    )
    parser.add_argument(
        "--role",
        choices=["sensors", "listener", "count-paho", "count-edgeapp"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sensors":
        run_sensors(args.port, args.turbines[0], args.out)
        return
    if args.role == "listener":
        run_listener(args.port, args.out)
        return
    if args.role in ("count-paho", "count-edgeapp"):
        run_counting_subscriber(args.port, args.role.removeprefix("count-"), args.out)
        return
    sizes = sorted(args.turbines)
    seconds = args.seconds
    if args.quick:
        sizes, seconds = [250, 1000], 6.0
    started = time.monotonic()
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cpus, tick {TICK_S * 1000:.0f} ms, "
        f"{RATE_HZ:.0f} Hz per turbine, one sample per message, max_batch {args.max_batch}, "
        f"{seconds:.0f} s windows"
    )
    results: list[FarmResult] = []
    with tempfile.TemporaryDirectory(prefix="windedge-farm-") as tmp_name:
        tmp = Path(tmp_name)
        with (
            mosquitto(tmp) as (port, broker_pid),
            running_agent({"max_batch": 1024, "intra_op_threads": 1}, args.package) as (
                client,
                agent_pid,
                _pkg,
            ),
        ):
            agent_socket = client.socket_path
            for n in sizes:
                if time.monotonic() - started > args.budget:
                    print(f"\n(budget of {args.budget:.0f} s used: {n} turbines not tried)")
                    break
                result = run_farm(
                    n,
                    port=port,
                    agent_socket=agent_socket,
                    agent_pid=agent_pid,
                    broker_pid=broker_pid,
                    seconds=seconds,
                    tmp=tmp,
                    max_batch=args.max_batch,
                    stuck_after_samples=args.stuck_after_samples,
                )
                results.append(result)
                print_result(result)
                if not result.keeps_up:
                    break
            if not args.no_costs:
                n = max([r.turbines for r in results if r.keeps_up] or [1000])
                n = max(n, 1000)
                ingest = ingestion_only(
                    n, port=port, agent_socket=agent_socket, seconds=min(seconds, 8.0), tmp=tmp
                )
                print_costs(item_costs(n, port, client), ingest, n)
    kept = [r.turbines for r in results if r.keeps_up]
    print(
        f"\nlargest farm kept up with: {max(kept) if kept else 'none of the sizes tried'}"
        f" turbines (tried {', '.join(str(r.turbines) for r in results)});"
        f" {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
