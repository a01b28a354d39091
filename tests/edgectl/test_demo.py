"""``edgectl demo``: the local system starts, verdicts reach the dashboard, Ctrl-C ends it all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.harness import free_port, short_dir, wait_until

pytestmark = pytest.mark.timeout(180)

EDGECTL = [sys.executable, "-m", "edgectl"]


def pids_of(output: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", output)}


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


class Run:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("WINDEDGE_")}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*EDGECTL, "demo", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in pids_of(self.output()).values():
            if not gone(pid):
                os.killpg(pid, signal.SIGKILL)


def overview(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url + "api/overview", timeout=2) as resp:  # noqa: S310
        data: dict[str, object] = json.loads(resp.read())
        return data


def test_the_demo_runs_devices_and_dashboard_and_ctrl_c_stops_everything() -> None:
    base = short_dir("we-demo-")
    port = free_port()
    run = Run(
        [
            "--devices",
            "2",
            "--turbines-per-device",
            "2",
            "--http-port",
            str(port),
            "--run-dir",
            str(base / "run"),
            "--duration",
            "150",
        ],
        base / "demo.out",
    )
    try:
        wait_until(lambda: "Ctrl-C stops everything" in run.output(), 90, what="the demo ready")
        out = run.output()
        url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", out)
        assert url and url[1] == f"http://127.0.0.1:{port}/"
        pids = pids_of(out)
        for name in ("mosquitto", "moto", "emulator", "windfarm-sim"):
            assert name in pids
        for device in ("device-1", "device-2"):
            assert f"{device}/edge-agent" in pids and f"{device}/edge-app" in pids
        assert "device-1: turbines wt-001, wt-002" in out
        # each device's own socket and state
        for device in ("device-1", "device-2"):
            assert (base / "run" / "devices" / device / "agent.sock").is_socket()
        # every turbine is scored by its device's app and the dashboard shows it
        wait_until(
            lambda: all(a >= 0 for a in overview(url[1])["anomaly"]),  # type: ignore[attr-defined]
            60,
            what="a verdict for every turbine",
            interval=0.5,
        )
        labels = overview(url[1])["labels"]
        assert labels == ["Model loaded: " + labels[0].split(": ")[1]] * 4  # type: ignore[index]

        os.kill(run.proc.pid, signal.SIGINT)  # Ctrl-C
        assert run.proc.wait(60) == 0
        assert run.output().rstrip().endswith("stopped")
        wait_until(lambda: all(gone(p) for p in pids.values()), 10, what="every process ended")
        assert not (base / "run" / "devices" / "device-1" / "agent.sock").exists()
    finally:
        run.end()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_the_demo_ends_by_itself_after_its_duration() -> None:
    base = short_dir("we-demo-")
    run = Run(
        [
            "--devices",
            "1",
            "--turbines-per-device",
            "1",
            "--http-port",
            str(free_port()),
            "--duration",
            "2",
        ],
        base / "demo.out",
    )
    try:
        assert run.proc.wait(90) == 0, run.output()
        out = run.output()
        assert "--duration 2 s reached" in out and out.rstrip().endswith("stopped")
        assert all(gone(p) for p in pids_of(out).values())
        run_dir = re.search(r"run directory: (\S+)", out)
        assert run_dir and not Path(run_dir[1]).exists()  # a temporary one is removed
    finally:
        run.end()
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "0"], "must be >= 1"),
        (["--model-version", "9.9"], "no wind-turbine version 9.9"),
        (["--models", "/nonexistent"], "no wind-turbine-<version>.tar.gz"),
    ],
)
def test_the_demo_refuses_what_it_cannot_run(args: list[str], message: str) -> None:
    done = subprocess.run(
        [*EDGECTL, "demo", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
