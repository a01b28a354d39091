"""``edgectl ota status`` and ``edgectl ota check`` against a real updater and agent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from ota_devices import Archives, Device, MakeDevice

from tests.harness import wait_until

EDGECTL = [sys.executable, "-m", "edgectl"]


def edgectl(dev: Device, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGECTL, "ota", *args, "--config", str(dev.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_and_check(device: MakeDevice, archives: Archives) -> None:
    dev = device()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(dev.base / "notify.sock"))
    notify.settimeout(30)
    ota = dev.start_ota(env={"NOTIFY_SOCKET": str(dev.base / "notify.sock")})
    assert notify.recv(4096).startswith(b"READY=1")  # Type=notify: systemd knows it is up
    notify.close()
    job = dev.deploy(archives.get("2.0"))
    assert dev.wait_final(job)["status"] == "SUCCEEDED"
    rejected = dev.deploy(archives.get("0.9"))
    assert dev.wait_final(rejected)["status"] == "REJECTED"

    out = edgectl(dev, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["serving"]["version"] == "2.0"
    assert status["committed"]["version"] == "2.0"
    assert status["committed"]["previous_version"] == "1.0"
    assert status["in_progress"] is None
    assert status["updater_pid"] == ota.proc.pid
    assert [(h["job_id"], h["outcome"]) for h in status["history"]] == [
        (rejected, "REJECTED"),
        (job, "SUCCEEDED"),
    ]
    text = edgectl(dev, "status")
    assert text.returncode == 0 and "serving    2.0" in text.stdout
    assert "older than the installed 2.0" in text.stdout

    asked = len([e for e in ota.events() if e.get("reason") == "check"])
    out = edgectl(dev, "check")
    assert out.returncode == 0 and f"pid {ota.proc.pid}" in out.stdout
    wait_until(
        lambda: len([e for e in ota.events() if e.get("reason") == "check"]) > asked,
        10,
        "the updater to ask for jobs",
    )
    assert ota.stop() == 0  # SIGTERM: a clean stop
    out = edgectl(dev, "check")
    assert out.returncode == 1 and "not running" in out.stderr
    assert "Traceback" not in out.stderr
