"""A device installed once per session into a staging root by ``scripts/install-device``.

The staging root starts as a device with mosquitto installed (its user
exists), gets the development package key as a trusted key and a device
certificate from a throw-away CA. Installing needs root (files are owned by
root, windedge and mosquitto) and systemd's offline tools.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import short_dir
from tests.tls import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-device"
UNITS = ("windedge-agent.service", "windedge-app.service", "windedge-ota.service")
DEV_PUBLIC_KEY = REPO / "models" / "dev-keys" / "windedge-dev.pub"
TOOLS = ("systemd-analyze", "systemd-sysusers", "systemd-tmpfiles", "systemctl", "userdel")
# the device had mosquitto before windedge came
MOSQUITTO_UID, MOSQUITTO_GID = 120, 130


def missing_prerequisite() -> str | None:
    """Why the installation cannot run here, or None."""
    if os.geteuid() != 0:
        return "scripts/install-device runs as root (it creates users and owns files)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} missing: scripts/setup.sh installs the systemd package"
    return None


def run_install(
    root: Path, *args: str | Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(INSTALL), "--root", str(root), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"install-device failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def ids(root: Path, table: str) -> dict[str, int]:
    """name -> id from the staged /etc/passwd or /etc/group."""
    out = {}
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        out[fields[0]] = int(fields[2])
    return out


@dataclass(frozen=True)
class Staged:
    root: Path
    pki: Pki
    output: str

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "windedge"

    def uid(self, name: str) -> int:
        return ids(self.root, "passwd")[name]

    def gid(self, name: str) -> int:
        return ids(self.root, "group")[name]


def new_device_root(base: Path) -> Path:
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        f"mosquitto:x:{MOSQUITTO_UID}:{MOSQUITTO_GID}::/var/lib/mosquitto:/usr/sbin/nologin\n"
    )
    (root / "etc" / "group").write_text(f"mosquitto:x:{MOSQUITTO_GID}:\n")
    return root


@contextlib.contextmanager
def device_root(prefix: str) -> Iterator[tuple[Path, Path]]:
    """(scratch directory, an empty device root in it); skips where installing cannot run."""
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    base = short_dir(prefix)
    try:
        yield base, new_device_root(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def staged() -> Iterator[Staged]:
    with device_root("we-dev-") as (base, root):
        pki = make_pki(base / "pki", clients=("turbine-farm-01",))
        proc = run_install(
            root,
            "--trusted-key",
            DEV_PUBLIC_KEY,
            "--device-cert",
            pki.crt("turbine-farm-01"),
            "--device-key",
            pki.key("turbine-farm-01"),
            "--root-ca",
            pki.ca,
        )
        yield Staged(root=root, pki=pki, output=proc.stderr)
