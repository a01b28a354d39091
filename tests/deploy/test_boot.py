"""The installed units under a real systemd: the staged device booted in a container.

``systemd-nspawn`` boots the staged tree (the host's ``/usr`` read-only, the
staged ``/opt/windedge`` read-only, its own network namespace) with systemd
as PID 1. The agent and the app start from their units as they would on a
device; the test talks to the agent through its socket, checks the sandbox
the unit declared is the one the process runs in, and freezes the app to
see the watchdog restart it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Staged, missing_prerequisite

from edgeagent.client import AgentClient
from edgeagent.package import extract_package, load_trusted_keys
from tests.harness import short_dir, wait_until

NSPAWN = shutil.which("systemd-nspawn")
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
MODEL_DIR = "/var/lib/windedge/models/wind-turbine/1.0"
BOOT_TIMEOUT = 120.0


def cannot_boot() -> str | None:
    reason = missing_prerequisite()
    if reason:
        return reason
    if NSPAWN is None:
        return "systemd-nspawn missing: scripts/setup.sh installs systemd-container"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) missing: the test runs commands inside the container with it"
    if not all(Path(f"/{d}").is_symlink() for d in ("bin", "sbin", "lib")):
        return "the host's /usr is not merged: its /usr alone cannot boot a container"
    probe = short_dir("we-probe-")
    try:
        for d in ("usr", "etc", "proc", "sys", "dev", "run", "tmp"):
            (probe / d).mkdir()
        for d in ("bin", "sbin", "lib", "lib64"):
            (probe / d).symlink_to(f"usr/{d}")
        shutil.copy(Path("/etc/os-release").resolve(), probe / "etc" / "os-release")
        proc = subprocess.run(
            [NSPAWN, "-q", "-D", str(probe), "--bind-ro=/usr", "--register=no", "--keep-unit",
             "--private-network", "/usr/bin/true"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if proc.returncode != 0:
        return f"systemd-nspawn cannot start a container here: {proc.stderr.strip()[-300:]}"
    return None


@dataclass
class Machine:
    proc: subprocess.Popen[bytes]
    root: Path
    log: Path
    init_pid: int = 0

    def run(self, *argv: str, check: bool = True) -> str:
        """A command inside the container (all its namespaces)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", *argv],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "--value", "-p", prop, unit)

    def process_status(self, unit: str) -> dict[str, str]:
        pid = self.show(unit, "MainPID")
        lines = self.run("cat", f"/proc/{pid}/status").splitlines()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}

    @property
    def socket(self) -> Path:
        return Path(f"/proc/{self.init_pid}/root/run/windedge/agent.sock")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def prepare(staged: Staged, base: Path) -> Path:
    """A container tree: the staged /etc and /var, the host's /usr, a model to load."""
    root = base / "machine"
    root.mkdir()
    subprocess.run(["cp", "-a", str(staged.root / "etc"), str(staged.root / "var"), str(root)],
                   check=True)  # fmt: skip
    for d in ("usr", "opt/windedge", "proc", "sys", "dev", "run", "tmp", "root", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "lib", "lib64"):
        (root / d).symlink_to(f"usr/{d}")
    shutil.copy(Path("/etc/os-release").resolve(), root / "etc" / "os-release")
    # a machine id: not a first boot, so no preset enables the host's other services
    (root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
    with (root / "etc" / "passwd").open("a") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with (root / "etc" / "group").open("a") as f:
        f.write("root:x:0:\n")
    # for the test only: a short watchdog, and status lines every second
    dropin = root / "etc/systemd/system/windedge-app.service.d"
    dropin.mkdir(parents=True)
    (dropin / "test.conf").write_text(
        "[Service]\nWatchdogSec=3\nTimeoutAbortSec=3\nEnvironment=WINDEDGE_APP_STATUS_PERIOD_S=1\n"
    )
    models = root / MODEL_DIR.lstrip("/")
    models.parent.mkdir()
    extract_package(BUNDLED, models, trusted_keys=load_trusted_keys(REPO / "models" / "dev-keys"))
    uid, gid = staged.uid("windedge"), staged.gid("windedge")
    for path in [models.parent, *models.parent.rglob("*")]:
        os.lchown(path, uid, gid)
    return root


def find_init(nspawn_pid: int) -> int:
    children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    for child in children:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return int(child)
    return 0


@pytest.fixture(scope="module")
def machine(staged: Staged) -> Iterator[Machine]:
    reason = cannot_boot()
    if reason:
        pytest.skip(reason)
    assert NSPAWN is not None
    base = short_dir("we-boot-")
    log = base / "console.log"
    try:
        root = prepare(staged, base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [NSPAWN, "-D", str(root), f"--machine=we-{uuid.uuid4().hex[:8]}", "--bind-ro=/usr",
             f"--bind-ro={staged.venv}:/opt/windedge", "--register=no", "--keep-unit",
             "--private-network", "--boot"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    m = Machine(proc=proc, root=root, log=log)
    try:
        wait_until(lambda: find_init(proc.pid) or proc.poll() is not None, 30, "container init")
        m.init_pid = find_init(proc.pid)
        assert m.init_pid, m.output()
        yield m
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn powers the container off
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_agent_starts_from_its_unit_and_answers_on_its_socket(machine: Machine) -> None:
    wait_until(
        lambda: machine.run("systemctl", "is-active", "windedge-agent", check=False) == "active",
        BOOT_TIMEOUT,
        "windedge-agent active (READY=1 received)",
    )
    st = os.stat(machine.socket)
    assert oct(st.st_mode & 0o777) == "0o660"
    with AgentClient(machine.socket, timeout=60) as client:
        client.wait_ready(30)
        assert client.list_models() == []
        info = client.load_model("wind-turbine", MODEL_DIR)  # verified, golden check inside
        assert info.name == "wind-turbine" and info.url == MODEL_DIR
        golden = Path(MODEL_DIR.lstrip("/"))
        x = np.load(machine.root / golden / "golden" / "input.npy")
        expected = np.load(machine.root / golden / "golden" / "expected.npy")
        y = client.predict("wind-turbine", x)
        np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-4)
    assert "Started windedge-agent.service" in machine.run("journalctl", "-u", "windedge-agent")


def test_agent_runs_in_the_sandbox_its_unit_declares(machine: Machine) -> None:
    wait_until(
        lambda: machine.run("systemctl", "is-active", "windedge-agent", check=False) == "active",
        BOOT_TIMEOUT,
        "windedge-agent active",
    )
    status = machine.process_status("windedge-agent.service")
    uid = machine.run("id", "-u", "windedge")
    assert status["Uid"].split()[0] == uid
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is installed
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    # ProtectSystem=strict: the agent cannot write outside its own directories
    pid = machine.show("windedge-agent", "MainPID")
    mounts = machine.run("cat", f"/proc/{pid}/mountinfo")
    assert any(" /usr " in line and " ro" in line for line in mounts.splitlines())


def test_the_updater_starts_from_its_unit_confined_like_the_others(machine: Machine) -> None:
    if "edge-ota" not in (REPO / "pyproject.toml").read_text():
        pytest.skip("edge-ota is not part of this version")
    wait_until(
        lambda: machine.run("systemctl", "is-active", "windedge-ota", check=False) == "active",
        BOOT_TIMEOUT,
        "windedge-ota active (READY=1 received)",
    )
    status = machine.process_status("windedge-ota.service")
    assert status["Uid"].split()[0] == machine.run("id", "-u", "windedge")
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["CapEff"], 16) == 0


def test_app_follows_the_agent_and_the_watchdog_restarts_a_frozen_app(machine: Machine) -> None:
    def status() -> str:
        return machine.show("windedge-app", "StatusText")

    wait_until(
        lambda: machine.run("systemctl", "is-active", "windedge-app", check=False) == "active",
        BOOT_TIMEOUT,
        "windedge-app active",
    )
    with AgentClient(machine.socket, timeout=60) as client:
        client.wait_ready(30)
        if not client.list_models():
            client.load_model("wind-turbine", MODEL_DIR)
    wait_until(lambda: "Model loaded: 1.0" in status(), 60, "the app following model 1.0")
    restarts = int(machine.show("windedge-app", "NRestarts"))
    pid = machine.show("windedge-app", "MainPID")
    machine.run("kill", "-STOP", pid)  # a hung tick: no more WATCHDOG=1
    wait_until(
        lambda: int(machine.show("windedge-app", "NRestarts")) > restarts,
        60,
        "systemd restarting the frozen app",
    )
    wait_until(
        lambda: machine.run("systemctl", "is-active", "windedge-app", check=False) == "active",
        60,
        "the app back",
    )
    assert machine.show("windedge-app", "MainPID") != pid
    journal = machine.run("journalctl", "-u", "windedge-app")
    assert "Watchdog timeout" in journal, journal[-3000:]
    wait_until(lambda: "Model loaded: 1.0" in status(), 60, "the restarted app following 1.0")


def test_a_killed_agent_is_restarted_with_its_models_and_the_app_keeps_running(
    machine: Machine,
) -> None:
    wait_until(
        lambda: machine.run("systemctl", "is-active", "windedge-agent", check=False) == "active",
        BOOT_TIMEOUT,
        "windedge-agent active",
    )
    with AgentClient(machine.socket, timeout=60) as client:
        client.wait_ready(30)
        if not client.list_models():
            client.load_model("wind-turbine", MODEL_DIR)
    app_pid = machine.show("windedge-app", "MainPID")
    restarts = int(machine.show("windedge-agent", "NRestarts"))
    machine.run("kill", "-KILL", machine.show("windedge-agent", "MainPID"))
    wait_until(
        lambda: (
            int(machine.show("windedge-agent", "NRestarts")) > restarts
            and machine.run("systemctl", "is-active", "windedge-agent", check=False) == "active"
        ),
        60,
        "systemd restarting the killed agent",
    )
    with AgentClient(machine.socket, timeout=60) as client:
        client.wait_ready(30)
        # the record in its StateDirectory brought the model back
        assert [m.name for m in client.list_models()] == ["wind-turbine"]
    # Wants=, not Requires=: the app was not stopped with the agent
    assert machine.show("windedge-app", "MainPID") == app_pid
    assert machine.run("systemctl", "is-active", "windedge-app", check=False) == "active"
