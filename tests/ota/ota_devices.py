"""The OTA tests' devices: a real agent and edge-ota per simulated turbine, on the stand-in.

A *device* is what runs on a turbine: a real ``edge-agent`` serving
wind-turbine 1.0 from ``<models>/wind-turbine/1.0`` (installed as the OTA
installs), and a real ``edge-ota`` process connected over mutual TLS to the
stand-in's broker as its own thing, fetching from the stand-in's S3 with
credentials from its IoT credentials provider. ``make_devices`` ends every
process it started. (Kept out of conftest.py so test modules import it by a
name no other folder uses.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_harness import LocalTls, build_archive, sha256_file

from cloud.local import LocalCloud
from edgeagent.package import extract_package, load_public_key
from tests.conftest import BUNDLED, DEV_PUBLIC_KEY, Agent, StartAgent
from tests.harness import json_lines, read_log, short_dir, toml_text, wait_until

OTA = [sys.executable, "-m", "ota"]
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED"})
MODEL = "wind-turbine"
_SCRUBBED = ("WINDEDGE_", "NOTIFY_SOCKET", "WATCHDOG_", "AWS_")
_counter = itertools.count(1)


@dataclass(frozen=True)
class Archive:
    path: Path
    version: str
    key: str  # object key in the stand-in's bucket
    sha256: str
    size: int


@dataclass
class Archives:
    """Signed archives built on demand, uploaded to the stand-in's bucket once each."""

    folder: Path
    key: Ed25519PrivateKey
    cloud: LocalCloud
    made: dict[str, Archive] = field(default_factory=dict)

    def get(
        self, version: str, variant: str = "", *, signer: Ed25519PrivateKey | None = None, **kw: Any
    ) -> Archive:
        """``variant`` names what ``signer``/``kw`` change (the cache key)."""
        tag = f"{version}{'-' + variant if variant else ''}"
        if tag not in self.made:
            if "model" not in kw:  # one ONNX file per seed, built once
                from cloud.autoencoder import build_autoencoder_onnx

                seed = kw.get("seed", 1)
                onnx_path = self.folder / "onnx" / f"seed-{seed}.onnx"
                if not onnx_path.exists():
                    onnx_path.parent.mkdir(parents=True, exist_ok=True)
                    build_autoencoder_onnx(onnx_path, seed=seed)
                kw["model"] = onnx_path
            folder = self.folder / tag
            path = build_archive(folder, version, signer or self.key, **kw)
            self.made[tag] = self.upload(path, version, f"models/{tag}/{path.name}")
        return self.made[tag]

    def upload(self, path: Path, version: str, key: str) -> Archive:
        self.cloud.s3_client().put_object(
            Bucket=self.cloud.endpoints.bucket, Key=key, Body=path.read_bytes()
        )
        return Archive(path, version, key, sha256_file(path), path.stat().st_size)


@dataclass
class OtaProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return read_log(self.log)

    def events(self) -> list[dict[str, Any]]:
        return json_lines(self.output())

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class UpdateWatch:
    """An independent MQTT peer that records every accepted job update of a thing."""

    def __init__(self, cloud: LocalCloud, thing: str) -> None:
        import paho.mqtt.client as mqtt

        self.accepted: list[tuple[str, str]] = []  # (job id, status)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        topic = f"$aws/things/{thing}/jobs/+/update/accepted"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{thing}")

        def on_connect(c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self._ready.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            job_id = msg.topic.split("/")[4]
            state = json.loads(msg.payload).get("executionState") or {}
            with self._lock:
                self.accepted.append((job_id, str(state.get("status"))))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(cloud.endpoints.mqtt_host, cloud.endpoints.mqtt_port)
        client.loop_start()
        self.client = client
        if not self._ready.wait(10):
            raise AssertionError("update watcher did not subscribe")

    def finals(self, job_id: str) -> list[str]:
        with self._lock:
            return [s for j, s in self.accepted if j == job_id and s in TERMINAL]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Device:
    """One simulated turbine: agent + updater + the stand-in identity of its thing."""

    thing: str
    base: Path
    models: Path
    state: Path
    agent: Agent
    cloud: LocalCloud
    watch: UpdateWatch
    settings: dict[str, Any]
    start_agent: StartAgent
    processes: list[OtaProcess] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.base / "ota.toml"

    def start_ota(
        self, *, crash_at: str | None = None, env: dict[str, str] | None = None, **overrides: Any
    ) -> OtaProcess:
        config = {**self.settings, **overrides}
        self.config_path.write_text("[ota]\n" + toml_text(config))
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env["AWS_EC2_METADATA_DISABLED"] = "true"
        child_env.update(env or {})
        if crash_at:
            child_env["WINDEDGE_OTA_CRASH_AT"] = crash_at
        log = self.base / f"ota-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*OTA, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=self.base,
                start_new_session=True,
            )
        ota = OtaProcess(proc, log)
        self.processes.append(ota)
        return ota

    def deploy(self, archive: Archive | None, *, presigned: bool = False, **document: Any) -> str:
        """Create a job with the original workshop's document (plus ``document``).

        ``presigned``: the document also carries an IoT presigned-URL placeholder of
        the object, which the emulator replaces with a fresh URL at each delivery.
        """
        job_id = f"{self.thing}-job-{next(_counter)}"
        doc: dict[str, Any] = {"type": "new_model", "model_name": MODEL}
        if archive is not None:
            doc.update(
                model_version=archive.version,
                model_package_bucket=self.cloud.endpoints.bucket,
                model_package_key=archive.key,
            )
        if presigned and archive is not None:
            ep = self.cloud.endpoints
            s3_url = f"https://s3.{ep.region}.amazonaws.com/{ep.bucket}/{archive.key}"
            doc["model_package_url"] = "${aws:iot:s3-presigned-url:" + s3_url + "}"
        doc.update(document)
        doc = {k: v for k, v in doc.items() if v is not None}
        self.cloud.jobs.create_job(
            job_id,
            targets=[self.thing],
            document=doc,
            presigned_url_config={"expiresInSec": 600} if presigned else None,
        )
        return job_id

    def execution(self, job_id: str) -> dict[str, Any]:
        return self.cloud.jobs.describe_execution(job_id, self.thing)

    def wait_final(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        def done() -> bool:
            if self.processes and not any(p.alive() for p in self.processes):
                raise AssertionError(f"edge-ota exited:\n{self.processes[-1].output()[-4000:]}")
            return self.execution(job_id)["status"] in TERMINAL

        try:
            wait_until(done, timeout, f"job {job_id} to end", interval=0.1)
        except AssertionError:
            logs = "\n".join(p.output()[-4000:] for p in self.processes[-2:])
            raise AssertionError(f"job {job_id}: {self.execution(job_id)}\n{logs}") from None
        return self.execution(job_id)

    def serving(self) -> str:
        """The version the agent serves (from the package it names)."""
        url = self.agent.client.describe_model(MODEL).url
        return json.loads((Path(url) / "manifest.json").read_bytes())["version"]

    def restart_agent(self) -> Agent:
        self.agent = self.start_agent(
            base=self.base, socket=self.agent.socket, state_dir=self.agent.state_dir
        )
        return self.agent

    def ota_record(self) -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data: dict[str, Any] = json.loads((self.state / "update.json").read_bytes())
            return data
        return None

    def close(self) -> None:
        for p in self.processes:
            p.kill()
        self.watch.close()


MakeDevice = Callable[..., Device]


@contextlib.contextmanager
def make_devices(cloud: LocalCloud, start: StartAgent, tls: LocalTls) -> Iterator[MakeDevice]:
    made: list[Device] = []
    dirs: list[Path] = []

    def make(**settings: Any) -> Device:
        base = short_dir("weota-")
        dirs.append(base)
        models = base / "models"
        (models / MODEL).mkdir(parents=True)
        v1 = models / MODEL / "1.0"
        extract_package(BUNDLED, v1, trusted_keys=[load_public_key(DEV_PUBLIC_KEY)])
        keys = base / "keys"
        keys.mkdir()
        shutil.copyfile(DEV_PUBLIC_KEY, keys / DEV_PUBLIC_KEY.name)
        agent = start(base=base, trusted_keys=keys)
        agent.client.load_model(MODEL, v1)
        thing = f"turbine-{os.getpid()}-{next(_counter)}"
        # the stand-in's own view of what the device needs, as a config file
        stand_in = {
            k.removeprefix("WINDEDGE_OTA_").lower(): v
            for k, v in cloud.env_for(thing).items()
            if k.startswith("WINDEDGE_OTA_")
        }
        state = base / "ota"
        defaults: dict[str, Any] = {
            **stand_in,
            "model_name": MODEL,
            "state_dir": str(state),
            "models_dir": str(models),
            "trusted_keys": str(keys),
            "agent_socket": str(agent.socket),
            "progress_interval_s": 0.2,
            "retry_min_s": 0.1,
            "retry_max_s": 0.5,
            "agent_wait_s": 3.0,
            "idle_query_s": 30.0,
            "operation_timeout_s": 5,
            "download_timeout_s": 5.0,
            "download_attempts": 4,
            "check_predictions": 3,
            "allow_http_urls": True,
            "download_ca_file": str(tls.ca_file),
            "disk_reserve_bytes": 0,
        }
        dev = Device(
            thing=thing,
            base=base,
            models=models,
            state=state,
            agent=agent,
            cloud=cloud,
            watch=UpdateWatch(cloud, thing),
            settings={**defaults, **settings},
            start_agent=start,
        )
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in made:
            dev.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
