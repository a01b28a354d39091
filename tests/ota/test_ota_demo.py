"""The demo runs one edge-ota per simulated device, and one command deploys the next version."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.client import AgentClient
from edgectl.demo import newest_package, starting_package
from tests.harness import free_port, short_dir, wait_until

pytestmark = pytest.mark.timeout(240)
EDGECTL = [sys.executable, "-m", "edgectl"]


def serving(socket: Path) -> str | None:
    try:
        with AgentClient(socket, timeout=5) as client:
            url = client.describe_model("wind-turbine").url
        return str(json.loads((Path(url) / "manifest.json").read_bytes())["version"])
    except Exception:
        return None


def test_demo_deploy_updates_every_device_of_the_running_demo() -> None:
    base = short_dir("we-otademo-")
    run_dir = base / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINDEDGE_")}
    log = base / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [
                *EDGECTL,
                "demo",
                "--devices",
                "2",
                "--turbines-per-device",
                "1",
                "--http-port",
                str(free_port()),
                "--run-dir",
                str(run_dir),
                "--duration",
                "200",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    pids: dict[str, int] = {}
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text(), 120, "the demo ready")
        text = log.read_text()
        pids = {m[1]: int(m[2]) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", text)}
        assert "device-1/edge-ota" in pids and "device-2/edge-ota" in pids
        assert f"edgectl ota demo-deploy --run-dir {run_dir}" in text  # the printed command
        sockets = [run_dir / "devices" / d / "agent.sock" for d in ("device-1", "device-2")]
        models = Path(__file__).resolve().parents[2] / "models"
        first, newest = starting_package(models)[1], newest_package(models)[1]
        assert first != newest  # the demo keeps a trained release to roll out
        assert [serving(s) for s in sockets] == [first, first]

        def demo_deploy() -> str:
            done = subprocess.run(
                [*EDGECTL, "ota", "demo-deploy", "--run-dir", str(run_dir)],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        # the next release of models/, as released (its own signed bytes)
        assert f"wind-turbine-{newest}.tar.gz (signed) uploaded" in demo_deploy()
        wait_until(
            lambda: [serving(s) for s in sockets] == [newest, newest], 90, "the release everywhere"
        )
        # no newer release: the best detector's model re-signed as the next major version
        major = f"{int(newest.split('.')[0]) + 1}.0"
        said = demo_deploy()
        assert f"wind-turbine-relational-1.0.tar.gz's model re-signed as {major}" in said
        assert f"wind-turbine-{major}.tar.gz (signed) uploaded" in said
        wait_until(
            lambda: [serving(s) for s in sockets] == [major, major], 90, f"{major} everywhere"
        )
        for device in ("device-1", "device-2"):
            history = run_dir / "devices" / device / "ota-state" / "history.json"
            wait_until(
                lambda h=history: h.exists() and len(json.loads(h.read_text())) >= 2,
                30,
                f"{device}'s outcomes",
            )
            outcomes = [entry["outcome"] for entry in json.loads(history.read_text())]
            assert outcomes[:2] == ["SUCCEEDED", "SUCCEEDED"], outcomes
        os.kill(demo.pid, signal.SIGINT)
        assert demo.wait(60) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(base)], check=False)
