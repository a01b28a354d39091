"""Start a real edge-agent for benchmarks (not a test fixture: no pytest here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeagent.client import AgentClient

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = ROOT / "models" / "dev-keys"


def extract_bundled(dest: Path, package: Path = PACKAGE) -> Path:
    """Unpack a package of the repository (trusted: it is in the repository)."""
    target = dest / package.name.removesuffix(".tar.gz")
    target.mkdir(parents=True)
    with tarfile.open(package) as tar:
        tar.extractall(target, filter="data")
    return target


@contextmanager
def running_agent(
    config: dict[str, object] | None = None,
    package: Path = PACKAGE,
) -> Iterator[tuple[AgentClient, int, Path]]:
    """An agent process serving ``package`` (the bundled model) as ``wt``; yields (client, pid,
    package dir)."""
    with tempfile.TemporaryDirectory(prefix="windedge-bench-") as tmp:
        tmpdir = Path(tmp)
        unpacked = extract_bundled(tmpdir, package)
        sock = tmpdir / "agent.sock"
        conf = tmpdir / "agent.toml"
        lines = [
            f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
            for k, v in (config or {}).items()
        ]
        conf.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeagent",
                "--socket",
                str(sock),
                "--trusted-keys",
                str(DEV_KEYS),
                "--state-dir",
                str(tmpdir / "state"),
                "--config",
                str(conf),
                "--log-level",
                "WARNING",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = AgentClient(sock, timeout=120)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("agent did not start")
                time.sleep(0.05)
            client.wait_ready(30)
            client.load_model("wt", unpacked)
            yield client, proc.pid, unpacked
        finally:
            client.close()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


@contextmanager
def echo_server() -> Iterator[Path]:
    """bench/_echo_server.py (a do-nothing grpcio server) in a subprocess; yields its socket."""
    with tempfile.TemporaryDirectory(prefix="windedge-echo-") as tmp:
        sock = Path(tmp) / "echo.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench._echo_server", str(sock)],
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("echo server did not start")
                time.sleep(0.05)
            yield sock
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
