"""Real processes for the edge-app tests: mosquitto, edge-agent, edge-app, and MQTT peers.

Everything a helper starts it also ends: processes run in their own process
group and are SIGKILLed (group-wide) if they ignore SIGTERM; sockets and
clients are closed. Paths are short (Unix sockets are limited to 107 bytes).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import paho.mqtt.client as paho
from numpy.typing import NDArray
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.client import AgentClient
from edgeapp.checks import SensorCheck, SlotOwners
from edgeapp.features import RAW_FIELDS

# re-exported: the edge-app tests import these from here
from tests.harness import free_port as free_port
from tests.harness import json_lines, read_log
from tests.harness import short_dir as short_dir
from tests.harness import toml_value as toml_value
from tests.harness import wait_until as wait_until

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = REPO / "models" / "dev-keys"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PYTHON = sys.executable
_SCRUBBED = ("WINDEDGE_", "NOTIFY_SOCKET", "WATCHDOG_")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Proc:
    """A child process in its own process group, output to a log file."""

    def __init__(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        self.argv = list(argv)
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(env),
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return read_log(self.log)

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; SIGKILL the group if it does not exit. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv[0]} ignored SIGTERM for {timeout}s") from None


# ---------------------------------------------------------------- mosquitto


class Mosquitto:
    """A mosquitto broker on a loopback port (no persistence)."""

    def __init__(self, base: Path, port: int | None = None) -> None:
        self.base = base
        self.port = port or free_port()
        self.conf = base / "mosquitto.conf"
        # max_queued_messages: mosquitto drops QoS 1 messages beyond 1,000 queued per
        # subscriber by default; the tests' bursts (3,000 messages) must not depend on
        # how fast a subscriber on a loaded machine drains them.
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n"
        )
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc([MOSQUITTO, "-c", str(self.conf)], self.base / "mosquitto.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise AssertionError(f"mosquitto exited:\n{self.proc.output()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise AssertionError("mosquitto did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.alive():
            self.proc.stop(5)
        self.proc = None

    def restart(self, pause: float = 0.0) -> None:
        self.stop()
        time.sleep(pause)
        self.start()


# ---------------------------------------------------------------- edge-agent


def extract_bundled(dest: Path) -> Path:
    """The bundled wind-turbine 1.0 package, verified and unpacked at ``dest``."""
    from edgeagent.package import extract_package, load_trusted_keys

    extract_package(BUNDLED, dest, trusted_keys=load_trusted_keys(DEV_KEYS))
    return dest


def build_variant(
    base_package: Path, out_dir: Path, *, version: str, thresholds: Sequence[float]
) -> Path:
    """The bundled model with other thresholds, as a signed package unpacked in ``out_dir``."""
    from edgeagent.package import (
        Manifest,
        build_package,
        extract_package,
        load_private_key,
        load_trusted_keys,
    )

    manifest = Manifest.from_json_bytes((base_package / "manifest.json").read_bytes())
    block = dict(manifest.preprocessing)
    block["thresholds"] = list(thresholds)
    golden = np.load(base_package / manifest.golden.input, allow_pickle=False)
    archive = build_package(
        model_path=base_package / manifest.model_file,
        name=manifest.name,
        version=version,
        preprocessing=block,
        golden_input=golden,
        signing_key=load_private_key(DEV_KEYS / "windedge-dev.key"),
        out_path=out_dir / "archives",
    )
    dest = out_dir / f"{manifest.name}-{version}"
    extract_package(archive, dest, trusted_keys=load_trusted_keys(DEV_KEYS))
    shutil.rmtree(out_dir / "archives")
    return dest


class Agent:
    """An ``edge-agent`` process on a socket in ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "agent.sock"
        self.state_dir = base / "agent-state"
        self.proc: Proc | None = None

    def start(self) -> AgentClient:
        argv = [
            str(Path(PYTHON).with_name("edge-agent")),
            "--socket",
            str(self.socket),
            "--trusted-keys",
            str(DEV_KEYS),
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "WARNING",
        ]
        self.proc = Proc(argv, self.base / "agent.log")
        client = AgentClient(self.socket, timeout=60)
        try:
            deadline = time.monotonic() + 30
            while not (self.socket.exists() and client.health()):
                if not self.proc.alive() or time.monotonic() > deadline:
                    raise AssertionError(f"agent did not start:\n{self.proc.output()[-3000:]}")
                time.sleep(0.05)
        finally:
            client.close()
        return AgentClient(self.socket, timeout=60)

    def load(self, name: str, package: Path) -> None:
        with AgentClient(self.socket, timeout=120) as client:
            client.load_model(name, package)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.alive():
            self.proc.stop(10)
        self.proc = None


# ---------------------------------------------------------------- edge-app


class App:
    """An ``edge-app`` process with a config file; its JSON log lines can be read back."""

    def __init__(
        self,
        base: Path,
        config: Mapping[str, object],
        env: Mapping[str, str] | None = None,
        name: str = "app",
    ) -> None:
        self.base = base
        self.conf = base / f"{name}.toml"
        self.conf.write_text(
            "[app]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items())
        )
        argv = [str(Path(PYTHON).with_name("edge-app")), "--config", str(self.conf)]
        self.proc = Proc(argv, base / f"{name}.log", env=env)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        records = json_lines(self.proc.output())
        return [r for r in records if event is None or r.get("event") == event]

    def wait_event(
        self, event: str, predicate: Callable[[dict[str, Any]], bool] = bool, timeout: float = 20
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"edge-app exited:\n{self.proc.output()[-3000:]}")
            found[:] = [r for r in self.events(event) if predicate(r)]
            return bool(found)

        wait_until(check, timeout, interval=0.05, what=f"edge-app log event {event!r}")
        return found[-1]


# ---------------------------------------------------------------- MQTT peers


@dataclass
class Received:
    topic: str
    payload: bytes
    at: float  # monotonic
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Listener:
    """Subscribes to the app's output topics and keeps every message."""

    port: int
    topics: Sequence[str] = (
        "wind-turbine/+/anomalies",
        "wind-turbine/+/label/update",
        "wind-turbine/+/dashboard/update",
    )
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{id(self)}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("listener did not subscribe")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe([(t, 0) for t in self.topics])

    def _on_subscribe(self, *_: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, msg.payload, time.monotonic(), msg.retain))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def select(self, kind: str, turbine: str | None = None, since: float = 0.0) -> list[Received]:
        with self._lock:
            items = list(self.messages)
        return [
            m
            for m in items
            if m.at >= since
            and m.topic.endswith(kind)
            and (turbine is None or m.topic.split("/")[1] == turbine)
        ]

    def wait_for(
        self,
        kind: str,
        predicate: Callable[[Received], bool] = lambda _m: True,
        *,
        turbine: str | None = None,
        since: float = 0.0,
        count: int = 1,
        timeout: float = 20.0,
    ) -> list[Received]:
        found: list[Received] = []

        def check() -> bool:
            found[:] = [m for m in self.select(kind, turbine, since) if predicate(m)]
            return len(found) >= count

        wait_until(check, timeout, what=f"{count} {kind} message(s) for {turbine or 'any'}")
        return found


def synthetic_samples(n: int, seed: int, start_ms: int | None = None) -> list[dict[str, float]]:
    """Turbine-like samples (20 Hz) around the seed statistics."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) * 0.05
    roll = -0.008 + 0.016 * rng.standard_normal(n)
    pitch = 0.001 + 0.016 * rng.standard_normal(n)
    yaw = rng.uniform(-1, 1) + np.cumsum(0.01 * rng.standard_normal(n))
    cr, sr, cp, sp = np.cos(roll / 2), np.sin(roll / 2), np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    rps = 1.6 + 0.3 * np.sin(2 * math.pi * t / 30) + 0.1 * rng.standard_normal(n)
    wind = 2.15 + 0.8 * (rps - 1.6) + 0.1 * rng.standard_normal(n)
    voltage = 47.8 / 1.6 * rps + 2.0 * rng.standard_normal(n)
    base_ms = int(time.time() * 1000) if start_ms is None else start_ms
    return [
        {
            "ts": base_ms + 50 * i,
            "qx": float(sr[i] * cp[i] * cy[i] - cr[i] * sp[i] * sy[i]),
            "qy": float(cr[i] * sp[i] * cy[i] + sr[i] * cp[i] * sy[i]),
            "qz": float(cr[i] * cp[i] * sy[i] - sr[i] * sp[i] * cy[i]),
            "qw": float(cr[i] * cp[i] * cy[i] + sr[i] * sp[i] * sy[i]),
            "wind_speed_rps": float(wind[i]),
            "rps": float(rps[i]),
            "voltage": float(voltage[i]),
        }
        for i in range(n)
    ]


def write_csv(path: Path, turbines: list[str], n: int, *, alias: bool = False) -> None:
    wind = "wind speed rps" if alias else "wind_speed_rps"
    columns = ["turbineId", "ts", "qx", "qy", "qz", "qw", wind, "rps", "voltage", "gearboxtemp"]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as handle:  # type: ignore[operator]  # both open text
        writer = csv.writer(handle)
        writer.writerow(columns)
        samples = {
            t: synthetic_samples(n, seed=k, start_ms=1_000_000) for k, t in enumerate(turbines)
        }
        for i in range(n):
            for t in turbines:
                s = samples[t][i]
                writer.writerow([t, s["ts"], *(s[f] for f in RAW_FIELDS), 40.0])


class Sensors:
    """Publishes turbines' samples: a fast prefill, then a steady stream on a thread."""

    def __init__(self, port: int, prefix: str = "wind-turbine") -> None:
        self.prefix = prefix
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sensors-{id(self)}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def topic(self, turbine: str) -> str:
        return f"{self.prefix}/{turbine}/raw-data"

    def publish_raw(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload).wait_for_publish(5)

    def prefill(self, turbines: Iterable[str], n: int = 500, batch: int = 100) -> None:
        for k, turbine in enumerate(turbines):
            samples = synthetic_samples(n, seed=k)
            for begin in range(0, n, batch):
                body = json.dumps({"samples": samples[begin : begin + batch]})
                self.client.publish(self.topic(turbine), body).wait_for_publish(5)
                self.sent += 1

    def stream(
        self,
        turbines: Sequence[str],
        rate_hz: float = 20.0,
        per_message: int = 1,
        scatter: Mapping[str, float] | None = None,
    ) -> None:
        """Publish ``per_message`` samples per turbine every ``per_message / rate_hz`` s.

        ``scatter``: turbines whose voltage reads uniformly between 0 and this
        many mV instead (a failing sensor or link).
        """
        self.stop_stream()
        self._stop.clear()
        pools = {t: synthetic_samples(400, seed=100 + k) for k, t in enumerate(turbines)}
        rng = np.random.default_rng(5)
        for turbine, top in (scatter or {}).items():
            for sample in pools[turbine]:
                sample["voltage"] = float(rng.uniform(0.0, top))

        def run() -> None:
            period = per_message / rate_hz
            i = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                now_ms = int(time.time() * 1000)
                for turbine in turbines:
                    pool = pools[turbine]
                    chunk = [dict(pool[(i + j) % len(pool)], ts=now_ms) for j in range(per_message)]
                    body = chunk[0] if per_message == 1 else {"samples": chunk}
                    self.client.publish(self.topic(turbine), json.dumps(body))
                    self.sent += 1
                i += per_message
                next_at += period
                self._stop.wait(max(0.0, next_at - time.monotonic()))

        self._thread = threading.Thread(target=run, name="sensors", daemon=True)
        self._thread.start()

    def stop_stream(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        self.stop_stream()
        self.client.disconnect()
        self.client.loop_stop()


MODEL = "wind-turbine"
V2_THRESHOLDS = [50.0, 51.0, 52.0, 53.0, 54.0, 55.0]


@dataclass
class Stack:
    """A broker and an agent serving the bundled package as ``wind-turbine``."""

    base: Path
    broker: Mosquitto
    agent: Agent
    v1: Path
    packages: Path

    def app_config(self, **overrides: Any) -> dict[str, Any]:
        config: dict[str, Any] = {
            "agent_socket": str(self.agent.socket),
            "mqtt_port": self.broker.port,
            "model_name": MODEL,
            "tick_period_s": 0.25,
            "agent_retry_min_s": 0.1,
            "agent_retry_max_s": 0.5,
            "agent_timeout_s": 5.0,
            "dashboard_period_s": 0.5,
            "max_turbines": 64,
            "drop_log_interval_s": 0.5,
            "status_period_s": 0.5,
            "log_level": "INFO",
            "learned_file": str(self.base / "app-state" / "learned.json"),
        }
        config.update(overrides)
        return config


StartApp = Callable[..., tuple["App", "NotifySocket"]]


# ---------------------------------------------------------------- sd_notify


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[tuple[float, str]]:
        return [(at, line) for at, text in list(self.messages) for line in text.split("\n")]

    def times_of(self, line: str) -> list[float]:
        return [at for at, text in self.lines() if text == line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def cleanup_dir(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- the checks, looked at

_OWNERS: WeakKeyDictionary[SensorCheck, SlotOwners] = WeakKeyDictionary()


def check_update(
    check: SensorCheck,
    slots: NDArray[np.intp],
    ids: Sequence[str],
    counts: NDArray[np.int64],
    features: NDArray[np.float32],
) -> NDArray[np.bool_]:
    """``check.update`` as the detector calls it: slot handovers found by a ``SlotOwners``
    (one per check here; the detector's one is shared by its checks)."""
    owners = _OWNERS.setdefault(check, SlotOwners(1024))
    return check.update(slots, owners.handovers(slots, ids), counts, features)
