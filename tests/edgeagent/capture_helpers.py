"""Helpers of the capture tests: real agents, a real S3 (moto's server), records by eventId.

Kept apart from tests/conftest.py on purpose (it is written concurrently by
another engineer); everything here starts real processes or servers and
offers a way to end them, which the tests' fixtures always call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.client import AgentClient
from edgeagent.package import extract_package, load_public_key

# re-exported: the capture tests import these from here
from tests.harness import free_port as free_port
from tests.harness import json_lines, read_log
from tests.harness import short_dir as short_dir
from tests.harness import toml_text as toml_text
from tests.harness import wait_until as wait_for

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = REPO / "models" / "dev-keys"
AGENT = [sys.executable, "-m", "edgeagent"]
BUCKET = "capture-bucket"
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_SCRUBBED = ("WINDEDGE_", "NOTIFY_SOCKET", "WATCHDOG_", "AWS_")


def windows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 6, 10, 10), dtype=np.float32)


def extract_model(dest: Path) -> Path:
    """The bundled wind-turbine 1.0 package, verified and unpacked at ``dest``."""
    extract_package(BUNDLED, dest, trusted_keys=[load_public_key(DEV_KEYS / "windedge-dev.pub")])
    return dest


@dataclass
class CaptureAgent:
    """One ``edge-agent`` child (its own process group) and a client."""

    proc: subprocess.Popen[bytes]
    socket: Path
    state_dir: Path
    log: Path
    client: AgentClient

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return read_log(self.log)

    def log_events(self) -> list[dict[str, Any]]:
        return json_lines(self.output())

    def kill(self) -> None:
        self.client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        self.client.close()
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent ignored SIGTERM:\n{self.output()[-3000:]}") from None

    def statuses(self, ids: list[str]) -> Counter[str]:
        return Counter(self.client.capture_status(i).name for i in ids)

    def wait_statuses(self, ids: list[str], status: str, timeout: float = 20.0) -> None:
        def done() -> bool:
            return self.statuses(ids)[status] == len(ids)

        try:
            wait_for(done, timeout, f"{len(ids)} captures {status}", interval=0.1)
        except AssertionError:
            raise AssertionError(
                f"statuses {dict(self.statuses(ids))}, wanted all {status}:\n"
                f"{self.output()[-3000:]}"
            ) from None


@dataclass
class Agents:
    """Starts agents; ``close`` ends every one still running."""

    base: Path
    started: list[CaptureAgent] = field(default_factory=list)

    def start(
        self,
        config: Mapping[str, Any],
        *,
        name: str = "agent",
        env: Mapping[str, str] | None = None,
        state_dir: Path | None = None,
        wait: bool = True,
    ) -> CaptureAgent:
        sock = self.base / f"{name}.sock"
        state = state_dir or self.base / f"{name}-state"
        conf = self.base / f"{name}-{time.monotonic_ns()}.toml"
        conf.write_text(toml_text(config))
        log = self.base / f"{name}-{time.monotonic_ns()}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        child_env.update(PYTHONUNBUFFERED="1", AWS_EC2_METADATA_DISABLED="true")
        child_env.update(TEST_CREDENTIALS if env is None else env)
        argv = [
            *AGENT,
            "--socket",
            str(sock),
            "--state-dir",
            str(state),
            "--trusted-keys",
            str(DEV_KEYS),
            "--config",
            str(conf),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=self.base,
                start_new_session=True,
            )
        agent = CaptureAgent(
            proc=proc, socket=sock, state_dir=state, log=log, client=AgentClient(sock, timeout=30)
        )
        self.started.append(agent)
        if wait:
            self.wait_serving(agent)
        return agent

    @staticmethod
    def wait_serving(agent: CaptureAgent, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not agent.alive():
                raise AssertionError(f"agent exited early:\n{agent.output()[-3000:]}")
            if agent.socket.exists() and agent.client.health():
                return
            time.sleep(0.05)
        raise AssertionError(f"agent not serving:\n{agent.output()[-3000:]}")

    def close(self) -> None:
        for agent in self.started:
            if agent.alive():
                with contextlib.suppress(AssertionError):
                    agent.terminate(10)
            else:
                agent.client.close()


@contextlib.contextmanager
def agents(prefix: str = "wecap-") -> Iterator[Agents]:
    base = short_dir(prefix)
    pool = Agents(base)
    try:
        yield pool
    finally:
        pool.close()
        shutil.rmtree(base, ignore_errors=True)


# -- S3 through moto's server -------------------------------------------------------------
class Moto:
    """moto's S3 server on a loopback port; stop() and start() again keep its data
    (the backend lives in this test process), which is how an outage is staged."""

    def __init__(self, port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = port
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Moto:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = int(self._server.get_host_and_port()[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto accepts any credentials
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}),
        )


def s3_keys(client: Any, bucket: str = BUCKET, prefix: str = "") -> list[str]:
    paginator = client.get_paginator("list_objects_v2")
    return [
        item["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]


def s3_objects(client: Any, bucket: str = BUCKET, prefix: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def disk_objects(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def records_of(objects: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """Every record of every .jsonl object."""
    records = []
    for key, body in sorted(objects.items()):
        if key.endswith(".jsonl"):
            records.extend(json.loads(line) for line in body.decode().splitlines() if line)
    return records


def event_ids(objects: Mapping[str, bytes]) -> Counter[str]:
    return Counter(r["eventMetadata"]["eventId"] for r in records_of(objects))
