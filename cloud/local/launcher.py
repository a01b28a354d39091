"""``LocalCloud``: start and stop the local AWS stand-in's processes (see ``cloud.local``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import structlog

from cloud.local.admin import JobsAdmin
from cloud.local.config import ServiceConfig
from cloud.local.jobs import ACCOUNT, REGION, validate_thing_name
from cloud.local.pki import DeviceIdentity, Pki
from edgecommon.fsutil import atomic_write_json

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_ROLE_ALIAS",
    "Endpoints",
    "LocalCloud",
    "LocalCloudError",
    "Ports",
    "find_mosquitto",
]

log = structlog.get_logger("cloud.local")

DEFAULT_BUCKET = "windedge-models"
DEFAULT_ROLE_ALIAS = "windedge-device-role-alias"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/windedge-device"
STATE_FILE = "cloud.json"
START_TIMEOUT = 30.0
_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_FAKE_KEY = "local-stand-in"  # moto accepts any key; real AWS would refuse this one
BANNER = "local AWS stand-in (not AWS)"


class LocalCloudError(RuntimeError):
    """The stand-in cannot start or be found (a one-line reason)."""


@dataclass(frozen=True)
class Endpoints:
    """Where the running stand-in listens (all on loopback)."""

    mqtt_host: str
    mqtt_port: int  # plain MQTT, anonymous
    mqtt_tls_port: int  # mutual TLS: a device certificate signed by ca_path is required
    s3_endpoint_url: str
    credentials_endpoint: str  # host:port of the HTTPS credentials provider
    role_alias: str
    admin_url: str
    ca_path: Path
    bucket: str
    region: str = REGION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ca_path"] = str(self.ca_path)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Endpoints:
        values = dict(data)
        values["ca_path"] = Path(values["ca_path"])
        return cls(**values)


@dataclass(frozen=True)
class Ports:
    """Ports to use; 0 picks a free one. A port that is taken is an error, never a fallback."""

    mqtt: int = 0
    mqtt_tls: int = 0
    s3: int = 0
    credentials: int = 0
    admin: int = 0


def find_mosquitto() -> Path:
    found = shutil.which("mosquitto")
    candidates = [found] if found else []
    candidates += list(_MOSQUITTO_CANDIDATES)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise LocalCloudError(
        "mosquitto not found (looked in PATH and /usr/sbin): install it, scripts/setup.sh does"
    )


def _claim_port(port: int, what: str) -> int:
    """``port`` if it is free on 127.0.0.1 (0: any free one); LocalCloudError when taken."""
    return _claim_ports([(port, what)])[0]


def _claim_ports(wanted: Sequence[tuple[int, str]]) -> list[int]:
    """Each ``(port, what)`` if free on 127.0.0.1 (0: any free one), all distinct.

    Every socket stays bound until all are chosen, so two requests for any free
    port cannot be handed the same one; LocalCloudError names a taken port.
    """
    with contextlib.ExitStack() as held:
        chosen: list[int] = []
        for port, what in wanted:
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            # as the servers do: a listener holds the port, old TIME_WAIT connections do not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise LocalCloudError(
                        f"port {port} on 127.0.0.1 ({what}) is already in use"
                    ) from None
                raise LocalCloudError(
                    f"cannot use port {port} on 127.0.0.1 ({what}): {exc}"
                ) from None
            chosen.append(int(s.getsockname()[1]))
        return chosen


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


class _Child:
    """A child process in its own session, output to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            self.proc.wait()


def _stop_pid(pid: int, marker: str, timeout: float = 10.0) -> bool:
    """Stop a process started by an earlier ``up`` (only if its command line has ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    if marker not in cmdline:
        return False  # the pid was reused by something else: leave it alone
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when this process started it
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class LocalCloud:
    """The local AWS stand-in: mosquitto, moto's S3, the IoT Jobs emulator, credentials.

    See the package docstring of ``cloud.local`` for the interface.
    """

    def __init__(
        self,
        state_dir: Path,
        things: Iterable[str] = (),
        *,
        ports: Ports | None = None,
        bucket: str = DEFAULT_BUCKET,
        role_alias: str = DEFAULT_ROLE_ALIAS,
        minute_seconds: float = 60.0,
        thing_groups: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.things = [validate_thing_name(t) for t in things]
        self.ports = ports or Ports()
        self.bucket = bucket
        self.role_alias = role_alias
        self.minute_seconds = minute_seconds
        self.thing_groups = {g: list(m) for g, m in (thing_groups or {}).items()}
        self.pki = Pki(self.state_dir / "pki")
        self._children: dict[str, _Child] = {}
        self._endpoints: Endpoints | None = None
        self._service_config: ServiceConfig | None = None
        self._registered: set[str] = set()

    # -- life cycle ------------------------------------------------------------
    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Endpoints:
        """Start everything and wait until it answers; on failure nothing is left running."""
        if self._children:
            raise LocalCloudError("this LocalCloud is already started")
        mosquitto = find_mosquitto()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        self._refuse_if_running()
        p = self.ports
        mqtt, mqtt_tls, s3, creds, admin = _claim_ports(
            [
                (p.mqtt, "MQTT"),
                (p.mqtt_tls, "MQTT over mutual TLS"),
                (p.s3, "S3"),
                (p.credentials, "credentials provider"),
                (p.admin, "jobs admin API"),
            ]
        )
        if len({mqtt, mqtt_tls, s3, creds, admin}) != 5:
            raise LocalCloudError("the stand-in needs five different ports")
        self.pki.ensure()
        endpoints = Endpoints(
            mqtt_host="127.0.0.1",
            mqtt_port=mqtt,
            mqtt_tls_port=mqtt_tls,
            s3_endpoint_url=f"http://127.0.0.1:{s3}",
            credentials_endpoint=f"127.0.0.1:{creds}",
            role_alias=self.role_alias,
            admin_url=f"http://127.0.0.1:{admin}",
            ca_path=self.pki.ca_path,
            bucket=self.bucket,
        )
        self._service_config = ServiceConfig(
            state_dir=self.state_dir,
            mqtt_port=mqtt,
            admin_port=admin,
            credentials_port=creds,
            s3_endpoint_url=endpoints.s3_endpoint_url,
            role_alias=self.role_alias,
            role_arn=ROLE_ARN,
            ca_path=self.pki.ca_path,
            server_cert_path=self.pki.server_cert_path,
            server_key_path=self.pki.server_key_path,
            minute_seconds=self.minute_seconds,
        )
        atomic_write_json(
            self.state_dir / "service.json",
            json.loads(self._service_config.model_dump_json()),
            mode=0o600,
        )
        try:
            self._start_mosquitto(mosquitto, mqtt, mqtt_tls)
            self._start_moto(s3)
            self._endpoints = endpoints
            self.start_emulator()
            self._write_state()
            for thing in self.things:
                self.provision_thing(thing)
            for group, members in self.thing_groups.items():
                for member in members:
                    self.add_to_group(member, group)
        except BaseException:
            self.stop()
            raise
        log.info(f"{BANNER}: ready", **endpoints.to_json())
        return endpoints

    def stop(self) -> None:
        """Stop every process this object started (the emulator first)."""
        for name in ("emulator", "moto", "mosquitto"):
            child = self._children.pop(name, None)
            if child is not None:
                child.stop()
        self._endpoints = None
        self._registered.clear()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    def detach(self) -> None:
        """Leave the processes running for another process to stop (``edgectl cloud up``).

        ``stop_detached(state_dir)`` ends them later, by the pids in the state file.
        """
        for child in self._children.values():
            # no longer ours to wait for: Popen must neither warn nor reap it
            child.proc.returncode = 0
        self._children.clear()
        self._endpoints = None

    # -- the emulator alone (persistence, restart tests) -------------------------
    def stop_emulator(self) -> None:
        child = self._children.pop("emulator", None)
        if child is not None:
            child.stop()

    def start_emulator(self) -> None:
        if self._service_config is None:
            raise LocalCloudError("start() the stand-in first")
        if "emulator" in self._children:
            raise LocalCloudError("the emulator is already running")
        env = self._child_env()
        child = _Child(
            "emulator",
            [sys.executable, "-m", "cloud.local", "--config", str(self.state_dir / "service.json")],
            self.state_dir / "logs" / "emulator.log",
            env,
        )
        self._children["emulator"] = child
        admin = JobsAdmin(f"http://127.0.0.1:{self._service_config.admin_port}", timeout=2.0)
        self._wait(
            child,
            lambda: admin.health().get("ready") is True,
            "the IoT Jobs emulator",
        )
        self._write_state()

    def restart_emulator(self) -> None:
        self.stop_emulator()
        self.start_emulator()

    def stop_broker(self) -> None:
        """Stop mosquitto alone (devices and the emulator lose their connections)."""
        child = self._children.pop("mosquitto", None)
        if child is not None:
            child.stop()

    def start_broker(self) -> None:
        """Start mosquitto again on the same ports; returns once the emulator serves again.

        Devices reconnect by themselves (after their own reconnect delay).
        """
        ep = self.endpoints
        if "mosquitto" in self._children:
            raise LocalCloudError("the broker is already running")
        _claim_port(ep.mqtt_port, "MQTT")
        _claim_port(ep.mqtt_tls_port, "MQTT over mutual TLS")
        self._start_mosquitto(find_mosquitto(), ep.mqtt_port, ep.mqtt_tls_port)
        self._write_state()
        emulator = self._children.get("emulator")
        if emulator is not None:  # back only when the emulator has subscribed again
            admin = JobsAdmin(ep.admin_url, timeout=2.0)
            self._wait(emulator, lambda: admin.health().get("ready") is True, "the emulator")

    def restart_broker(self, pause: float = 0.0) -> None:
        self.stop_broker()
        time.sleep(pause)
        self.start_broker()

    # -- public interface --------------------------------------------------------
    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            raise LocalCloudError("the stand-in is not running: start() it first")
        return self._endpoints

    @property
    def jobs(self) -> JobsAdmin:
        return JobsAdmin(self.endpoints.admin_url)

    def provision_thing(self, thing: str) -> DeviceIdentity:
        """Register ``thing`` (if running) and return its certificate, key and CA."""
        validate_thing_name(thing)
        identity = self.pki.device(thing)
        if thing not in self.things:
            self.things.append(thing)
        if self._endpoints is not None and thing not in self._registered:
            self.jobs.register_thing(thing)
            self._registered.add(thing)
        return identity

    def add_to_group(self, thing: str, group: str) -> None:
        """Put ``thing`` in thing group ``group`` (registers the thing)."""
        self.provision_thing(thing)
        self.thing_groups.setdefault(group, [])
        if thing not in self.thing_groups[group]:
            self.thing_groups[group].append(thing)
        groups = sorted(g for g, members in self.thing_groups.items() if thing in members)
        self.jobs.register_thing(thing, groups)

    def env_for(self, thing: str) -> dict[str, str]:
        """The environment a device process (edge-ota) needs to reach the stand-in as ``thing``."""
        ep = self.endpoints
        identity = self.provision_thing(thing)
        return {
            "WINDEDGE_OTA_THING_NAME": thing,
            "WINDEDGE_OTA_IOT_ENDPOINT": ep.mqtt_host,
            "WINDEDGE_OTA_IOT_PORT": str(ep.mqtt_tls_port),
            "WINDEDGE_OTA_IOT_PLAIN_PORT": str(ep.mqtt_port),
            "WINDEDGE_OTA_CERT_PATH": str(identity.cert_path),
            "WINDEDGE_OTA_KEY_PATH": str(identity.key_path),
            "WINDEDGE_OTA_CA_PATH": str(identity.ca_path),
            "WINDEDGE_OTA_CREDENTIALS_ENDPOINT": ep.credentials_endpoint,
            "WINDEDGE_OTA_ROLE_ALIAS": ep.role_alias,
            "WINDEDGE_OTA_S3_ENDPOINT_URL": ep.s3_endpoint_url,
            "WINDEDGE_OTA_REGION": ep.region,
            "AWS_DEFAULT_REGION": ep.region,
        }

    def s3_client(self) -> Any:
        """A boto3 S3 client of the stand-in's S3 (moto accepts any credentials)."""
        return self._s3(self.endpoints.s3_endpoint_url)

    def pids(self) -> dict[str, int]:
        return {name: child.pid for name, child in self._children.items()}

    # -- a stand-in started by another process (edgectl cloud up/down/status) ---
    @staticmethod
    def read_state(state_dir: Path) -> dict[str, Any] | None:
        """The running stand-in's record in ``state_dir`` (None: none was started there)."""
        path = Path(state_dir) / STATE_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return data

    @staticmethod
    def alive_pids(state: Mapping[str, Any]) -> dict[str, bool]:
        out = {}
        for name, pid in state.get("pids", {}).items():
            marker = state.get("markers", {}).get(name, "")
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmdline = ""
            out[name] = bool(cmdline) and marker in cmdline and not _zombie(pid)
        return out

    @staticmethod
    def stop_detached(state_dir: Path) -> list[str]:
        """Stop the processes a detached ``up`` started in ``state_dir``; the names stopped."""
        state = LocalCloud.read_state(state_dir)
        if state is None:
            return []
        stopped = []
        for name in ("emulator", "moto", "mosquitto"):
            pid = state.get("pids", {}).get(name)
            if pid is not None and _stop_pid(int(pid), state["markers"][name]):
                stopped.append(name)
        (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
        return stopped

    # -- internals ---------------------------------------------------------------------
    def _refuse_if_running(self) -> None:
        state = self.read_state(self.state_dir)
        if state is not None and any(self.alive_pids(state).values()):
            raise LocalCloudError(
                f"a local stand-in is already running with state in {self.state_dir}:"
                " stop it first (edgectl cloud down)"
            )

    def _write_state(self) -> None:
        if self._endpoints is None:
            return
        markers = {
            "mosquitto": str(self.state_dir / "mosquitto.conf"),
            "moto": "moto.server",
            "emulator": str(self.state_dir / "service.json"),
        }
        atomic_write_json(
            self.state_dir / STATE_FILE,
            {
                "stand_in": BANNER,
                "endpoints": self._endpoints.to_json(),
                "pids": self.pids(),
                "markers": {k: v for k, v in markers.items() if k in self._children},
                "things": sorted(self.things),
            },
            mode=0o600,
        )

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WINDEDGE_")}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "AWS_ACCESS_KEY_ID": _FAKE_KEY,
                "AWS_SECRET_ACCESS_KEY": _FAKE_KEY,
                "AWS_DEFAULT_REGION": REGION,
            }
        )
        # the emulator imports cloud.local: make the repository importable from any cwd
        root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env

    def _wait(self, child: _Child, ready: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not child.alive():
                raise LocalCloudError(
                    f"{what} exited with {child.proc.returncode} while starting:"
                    f" {child.tail(600).strip()}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError, RuntimeError):
                if ready():
                    return
            time.sleep(0.05)
        raise LocalCloudError(f"{what} did not become ready in {START_TIMEOUT:.0f}s")

    def _start_mosquitto(self, binary: Path, port: int, tls_port: int) -> None:
        conf = self.state_dir / "mosquitto.conf"
        conf.write_text(
            "# local AWS stand-in broker: loopback only\n"
            "per_listener_settings false\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_keepalive 65535\n"
            # as root, mosquitto would switch to the user "mosquitto", who cannot read
            # the 0600 keys in the 0700 state directory: it keeps the caller's user
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"listener {port} 127.0.0.1\n"
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {self.pki.ca_path}\n"
            f"certfile {self.pki.server_cert_path}\n"
            f"keyfile {self.pki.server_key_path}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "tls_version tlsv1.2\n"
        )
        child = _Child(
            "mosquitto",
            [str(binary), "-c", str(conf)],
            self.state_dir / "logs" / "mosquitto.log",
            self._child_env(),
        )
        self._children["mosquitto"] = child
        self._wait(
            child, lambda: _listening(port) and _listening(tls_port), "mosquitto (local stand-in)"
        )

    def _start_moto(self, port: int) -> None:
        child = _Child(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            self.state_dir / "logs" / "moto.log",
            self._child_env(),
        )
        self._children["moto"] = child
        url = f"http://127.0.0.1:{port}/moto-api/"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return bool(resp.status == 200)

        self._wait(child, ready, "moto's S3 server (local stand-in)")
        s3 = self._s3(f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket=self.bucket)

    @staticmethod
    def _s3(endpoint_url: str) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=REGION,
            aws_access_key_id=_FAKE_KEY,
            aws_secret_access_key=_FAKE_KEY,
        )
