"""The whole local system on one machine: what ``edgectl demo`` starts, watches and stops.

What runs, each a process of its own (logs in ``<run dir>/logs/``):

- the local AWS stand-in (``cloud.local.LocalCloud``): its mosquitto is the
  farm's broker (plain MQTT on loopback), beside S3 (moto) and the IoT Jobs
  emulator, with one thing (certificate) per simulated device;
- per simulated device ``device-<k>``, with its own folder
  ``<run dir>/devices/device-<k>/`` (socket, state, installed packages):
  ``edge-agent`` serving the newest released package of ``models/``
  (verified and installed as a device does), and ``edge-app`` detecting for
  that device's turbines;
- the simulator (``windfarm-sim``) publishing every turbine, with the
  dashboard on loopback.

Each device also runs ``edge-ota``, connected over mutual TLS to the
stand-in as its thing (``env_for(thing)`` gives the endpoints). The devices
start on the release before the newest of ``models/`` (1.0), so that
``edgectl ota demo-deploy`` has a real, trained update to deploy (1.1): it
uploads that package and creates the IoT job that updates every device.
Adding a process per device is one more entry in ``Demo.device_services``.
Stopping goes in reverse: simulator, devices (each device's services in
reverse order), stand-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cloud.local import LocalCloud
from edgeagent.client import AgentClient
from edgeagent.package import extract_package, load_trusted_keys

__all__ = [
    "Demo",
    "DemoError",
    "DemoOptions",
    "Device",
    "Service",
    "newest_package",
    "released_packages",
    "starting_package",
]

PYTHON: Final = sys.executable
MODEL: Final = "wind-turbine"
_VERSION_RE: Final = re.compile(r"(\d+(?:\.\d+)*)\.tar\.gz")  # after "<model>-"


class DemoError(RuntimeError):
    """The demo cannot start (the message says what is missing)."""


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 5
    turbines_per_device: int = 2
    seed: int = 0
    http_port: int = 8080  # taken: a free one is used instead
    duration_s: float | None = None
    run_dir: Path | None = None  # default: a new temporary folder, removed at the end
    models_dir: Path = Path("models")
    trusted_keys: Path = Path("models/dev-keys")
    model_version: str | None = None  # default: the release before the newest in models_dir
    keep: bool = False


class Service:
    """A child process in its own session (Ctrl-C reaches the demo, which stops it in order)."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.reported = False  # an unexpected exit was reported

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to its process group, SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@dataclass
class Device:
    """One simulated edge device: its thing name, folder, socket, turbines and processes."""

    name: str
    folder: Path
    turbines: list[str]
    services: list[Service] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.folder / "agent.sock"

    @property
    def models(self) -> Path:
        return self.folder / "models"


def released_packages(models_dir: Path, model: str = MODEL) -> list[tuple[Path, str]]:
    """Every released ``<model>-<version>.tar.gz`` of ``models_dir``, oldest first.

    Versions as the file names give them (compared as versions: 1.10 > 1.9);
    the package's signed manifest is what a device checks when it installs it.
    """
    found = {}
    for path in models_dir.glob(f"{model}-*.tar.gz"):
        match = _VERSION_RE.fullmatch(path.name.removeprefix(f"{model}-"))
        if match:
            found[tuple(int(p) for p in match[1].split("."))] = (path, match[1])
    return [found[key] for key in sorted(found)]


def newest_package(models_dir: Path, version: str | None = None) -> tuple[Path, str]:
    """The released ``wind-turbine-<version>.tar.gz`` named, or the newest."""
    found = released_packages(models_dir)
    if not found:
        raise DemoError(f"no {MODEL}-<version>.tar.gz in {models_dir}")
    if version is not None:
        for path, name in found:
            if name == version:
                return path, name
        known = ", ".join(v for _, v in found)
        raise DemoError(f"no {MODEL} version {version} in {models_dir} (there: {known})")
    return found[-1]


def starting_package(models_dir: Path, version: str | None = None) -> tuple[Path, str]:
    """What the demo's devices serve first: the release named, else the one before the newest.

    Starting one release back leaves the newest for ``edgectl ota demo-deploy``
    to roll out, so the demo's update is a real, trained model version.
    """
    if version is not None:
        return newest_package(models_dir, version)
    found = released_packages(models_dir)
    if len(found) >= 2:
        return found[-2]
    return newest_package(models_dir)


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
            return chosen
    raise DemoError("no free port on 127.0.0.1")


def _wait(ready: Callable[[], bool], service: Service, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise DemoError(f"{service.name} exited while starting:\n{service.tail()}")
        with contextlib.suppress(OSError, RuntimeError):
            if ready():
                return
        time.sleep(0.1)
    raise DemoError(f"{what} not ready after {timeout:.0f} s:\n{service.tail()}")


def _toml(values: Mapping[str, object]) -> str:
    lines = ["[app]"]
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, list | tuple):
            text = "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
        else:
            text = json.dumps(str(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


class Demo:
    """Starts, watches and stops the whole local system (see the module doc)."""

    def __init__(self, options: DemoOptions, say: Callable[[str], None] = print) -> None:
        if options.devices < 1 or options.turbines_per_device < 1:
            raise DemoError("--devices and --turbines-per-device must be >= 1")
        self.options = options
        self.say = say
        self._own_dir = options.run_dir is None
        self.run_dir = (
            Path(tempfile.mkdtemp(prefix="windedge-demo-"))
            if options.run_dir is None
            else options.run_dir.resolve()
        )
        self.logs = self.run_dir / "logs"
        self.cloud: LocalCloud | None = None
        self.devices: list[Device] = []
        self.simulator: Service | None = None
        self.dashboard_url = ""
        self._stop = threading.Event()
        width = max(3, len(str(options.devices * options.turbines_per_device)))
        ids = iter(f"wt-{i + 1:0{width}d}" for i in range(10**6))
        for k in range(1, options.devices + 1):
            self.devices.append(
                Device(
                    name=f"device-{k}",
                    folder=self.run_dir / "devices" / f"device-{k}",
                    turbines=[next(ids) for _ in range(options.turbines_per_device)],
                )
            )

    # ---- the per-device processes (extend here) ------------------------------------------
    def device_services(self, device: Device) -> list[Service]:
        """The processes of one device, in start order (stopped in reverse)."""
        agent = Service(
            f"{device.name}/edge-agent",
            [
                PYTHON,
                "-m",
                "edgeagent",
                "--socket",
                str(device.socket),
                "--trusted-keys",
                str(self.options.trusted_keys.resolve()),
                "--state-dir",
                str(device.folder / "agent-state"),
                "--log-level",
                "WARNING",
            ],
            self.logs / f"{device.name}-agent.log",
        )
        app_conf = device.folder / "app.toml"
        app = Service(
            f"{device.name}/edge-app",
            [PYTHON, "-m", "edgeapp", "--config", str(app_conf)],
            self.logs / f"{device.name}-app.log",
        )
        ota = Service(
            f"{device.name}/edge-ota",
            [PYTHON, "-m", "ota", "--config", str(self._ota_config(device))],
            self.logs / f"{device.name}-ota.log",
        )
        return [agent, app, ota]

    def _ota_config(self, device: Device) -> Path:
        """The device's edge-ota configuration: its thing on the stand-in, over mutual TLS."""
        if self.cloud is None:
            raise DemoError("the stand-in must run before the updaters are configured")
        values: dict[str, object] = {
            key.removeprefix("WINDEDGE_OTA_").lower(): value
            for key, value in self.cloud.env_for(device.name).items()
            if key.startswith("WINDEDGE_OTA_")
        }
        values.update(
            model_name=MODEL,
            state_dir=str(device.folder / "ota-state"),
            models_dir=str(device.models),
            trusted_keys=str(self.options.trusted_keys.resolve()),
            agent_socket=str(device.socket),
            progress_interval_s=1.0,
            log_level="INFO",
        )
        path = device.folder / "ota.toml"
        path.write_text(_toml(values).replace("[app]", "[ota]", 1))
        return path

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start everything; on failure, whatever started is stopped again."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        opts = self.options
        package, version = starting_package(opts.models_dir, opts.model_version)
        keys = load_trusted_keys(opts.trusted_keys)
        if not keys:
            raise DemoError(f"no trusted keys in {opts.trusted_keys}")
        self.say(f"run directory: {self.run_dir}")
        self.say("starting the local AWS stand-in (broker, S3, IoT Jobs emulator)")
        self.cloud = LocalCloud(self.run_dir / "cloud", things=[d.name for d in self.devices])
        endpoints = self.cloud.start()
        broker_port = endpoints.mqtt_port
        for name, pid in self.cloud.pids().items():
            self.say(f"  started {name} (pid {pid})")

        self.say(f"installing {MODEL} {version} on {len(self.devices)} devices")
        for device in self.devices:
            (device.models / MODEL).mkdir(parents=True, exist_ok=True)
            extract_package(package, device.models / MODEL / version, trusted_keys=keys)
            device.services = self.device_services(device)
            (device.folder / "app.toml").write_text(
                _toml(
                    {
                        "agent_socket": str(device.socket),
                        "mqtt_host": endpoints.mqtt_host,
                        "mqtt_port": broker_port,
                        "mqtt_client_id": f"app-{device.name}"[:20],
                        "model_name": MODEL,
                        "turbines": device.turbines,
                        "learned_file": str(device.folder / "app-learned.json"),
                        "log_level": "WARNING",
                    }
                )
            )
        # agents first (all at once: each verifies and checks its model), then apps
        for device in self.devices:
            agent = device.services[0]
            agent.start()
            self.say(f"  started {agent.name} (pid {agent.pid})")
        for device in self.devices:
            agent = device.services[0]
            with AgentClient(device.socket, timeout=60) as client:
                _wait(client.health, agent, 60, agent.name)
                client.load_model(MODEL, device.models / MODEL / version, timeout=120)
        for device in self.devices:
            for service in device.services[1:]:
                service.start()
                self.say(f"  started {service.name} (pid {service.pid})")

        port = _free_port(opts.http_port)
        if port != opts.http_port:
            self.say(f"port {opts.http_port} is taken: the dashboard uses {port}")
        ids = [t for d in self.devices for t in d.turbines]
        self.simulator = Service(
            "windfarm-sim",
            [
                PYTHON,
                "-m",
                "simulator",
                "run",
                "--ids",
                ",".join(ids),
                "--seed",
                str(opts.seed),
                "--mqtt-host",
                endpoints.mqtt_host,
                "--mqtt-port",
                str(broker_port),
                "--http-port",
                str(port),
                "--log-level",
                "WARNING",
            ],
            self.logs / "simulator.log",
        )
        self.simulator.start()
        self.say(f"  started {self.simulator.name} (pid {self.simulator.pid})")
        self.dashboard_url = f"http://127.0.0.1:{port}/"

        def dashboard_up() -> bool:
            with urllib.request.urlopen(self.dashboard_url + "healthz", timeout=1) as resp:  # noqa: S310 - our own loopback URL
                return bool(resp.status == 200)

        _wait(dashboard_up, self.simulator, 30, "the dashboard")
        self.say("")
        self.say(f"dashboard: {self.dashboard_url}")
        for device in self.devices:
            self.say(f"  {device.name}: turbines {', '.join(device.turbines)}")
        self.say(
            "verdicts start once a turbine has 25 s of samples; inject faults from the dashboard"
        )
        hint = self.deploy_hint()
        if hint:
            self.say(hint)
        self.say("Ctrl-C stops everything")

    def deploy_hint(self) -> str | None:
        """How to deploy a new model version to the devices (when the OTA updater runs)."""
        return (
            "deploy the next model version to every device (an IoT job on the stand-in):\n"
            f"  edgectl ota demo-deploy --run-dir {self.run_dir}"
        )

    def request_stop(self) -> None:
        self._stop.set()

    def run_until_stopped(self) -> None:
        """Wait for Ctrl-C/SIGTERM or ``duration_s``, reporting any process that exits."""
        deadline = (
            None if self.options.duration_s is None else time.monotonic() + self.options.duration_s
        )
        while not self._stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                self.say(f"--duration {self.options.duration_s:g} s reached")
                break
            for service in self._services():
                if not service.alive() and not service.reported:
                    service.reported = True
                    code = service.proc.returncode if service.proc else None
                    self.say(f"{service.name} exited (code {code}); see {service.log}")

    def _services(self) -> list[Service]:
        out = [s for d in self.devices for s in d.services]
        if self.simulator is not None:
            out.append(self.simulator)
        return out

    def stop(self) -> None:
        """Stop everything that was started, in reverse order."""
        if self.simulator is not None:
            self.simulator.stop()
        for device in reversed(self.devices):
            for service in reversed(device.services):
                service.stop()
        if self.cloud is not None:
            self.cloud.stop()
            self.cloud = None
        if self._own_dir and not self.options.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.options.keep:
            self.say(f"run directory kept: {self.run_dir}")
