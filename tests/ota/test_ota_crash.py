"""Crash tests, table-driven like mender's: SIGKILL at every persisted state and between
the side effects inside a step, then a restart.

Each row: where the process kills itself (``WINDEDGE_OTA_CRASH_AT``), which
package the job carries, and the final status the restarted updater must
reach. Every run must end with exactly one accepted final report, every
installed version directory complete (verified like the agent verifies it;
no staging left), and the agent serving the new version if and only if the
report says SUCCEEDED (otherwise the version it served before).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from ota_devices import MODEL, Archives, Device, MakeDevice

from edgeagent.package import load_trusted_keys, verify_package_dir
from tests.harness import wait_until


@dataclass(frozen=True)
class Row:
    crash_at: str
    status: str
    package: str = "good"  # "good", or "bad-golden" (activation fails: the rollback path)


ROWS = [
    Row("state:received", "SUCCEEDED"),
    Row("state:downloading", "SUCCEEDED"),
    Row("download:partial", "SUCCEEDED"),
    Row("download:complete", "SUCCEEDED"),
    Row("state:verifying", "SUCCEEDED"),
    Row("state:installing", "SUCCEEDED"),
    Row("install:start", "SUCCEEDED"),
    Row("install:extracted", "SUCCEEDED"),
    Row("state:activating", "FAILED"),
    Row("activate:start", "FAILED"),
    Row("activate:loaded", "FAILED"),  # swapped, unproven: swapped back
    Row("state:checking", "FAILED"),
    Row("check:passed", "FAILED"),
    Row("state:committing", "SUCCEEDED"),
    Row("commit:recorded", "SUCCEEDED"),
    Row("state:reporting", "SUCCEEDED"),
    Row("report:sent", "SUCCEEDED"),  # acknowledged, then killed: never reported twice
    Row("state:rolling_back", "FAILED", "bad-golden"),
    Row("state:cleaning", "FAILED", "bad-golden"),
    Row("state:reporting", "FAILED", "bad-golden"),
]


@pytest.fixture(scope="module")
def turbine(module_device: MakeDevice) -> Iterator[Device]:
    yield module_device(agent_wait_s=2.0)


def _archive(archives: Archives, index: int, package: str) -> Any:
    version = f"{10 + index}.0"
    if package == "bad-golden":
        return archives.get(
            version, "bad-golden", golden_expected=np.ones((4, 6, 10, 10), dtype=np.float32)
        )
    return archives.get(version, seed=1 + index % 3)


def _check_models(dev: Device) -> None:
    keys = load_trusted_keys(dev.settings["trusted_keys"])
    for entry in (dev.models / MODEL).iterdir():
        assert not entry.name.startswith("."), f"staging left behind: {entry.name}"
        verify_package_dir(entry, trusted_keys=keys)  # complete, or it raises


@pytest.mark.parametrize(
    ("index", "row"), list(enumerate(ROWS)), ids=[f"{r.crash_at}-{r.package}" for r in ROWS]
)
def test_killed_at_every_state_finishes_or_rolls_back_once(
    turbine: Device, archives: Archives, index: int, row: Row
) -> None:
    dev = turbine
    before = dev.serving()
    archive = _archive(archives, index, row.package)
    crashing = dev.start_ota(crash_at=row.crash_at)
    job = dev.deploy(archive)
    try:
        code = crashing.proc.wait(60)
    except subprocess.TimeoutExpired:
        crashing.kill()
        raise AssertionError(
            f"never reached {row.crash_at}:\n{crashing.output()[-3000:]}"
        ) from None
    assert code == -9, f"exit {code} instead of SIGKILL at {row.crash_at}"
    again = dev.start_ota()
    try:
        final = dev.wait_final(job)
        wait_until(lambda: dev.ota_record() is None, 10, "the record to clear")
    finally:
        again.stop()
    assert final["status"] == row.status, (final, again.output()[-3000:])
    assert dev.watch.finals(job) == [row.status]
    expected = archive.version if row.status == "SUCCEEDED" else before
    assert dev.serving() == expected
    _check_models(dev)


def test_a_restart_loop_is_broken_by_rolling_back(device: MakeDevice, archives: Archives) -> None:
    """Killed at the same point on every start: after max_resumes it rolls back and reports."""
    dev = device(max_resumes=2)
    job = dev.deploy(archives.get("2.0"))
    for _ in range(3):
        ota = dev.start_ota(crash_at="state:downloading")
        assert ota.proc.wait(60) == -9
    last = dev.start_ota(crash_at="state:downloading")  # still armed: it must not get there
    final = dev.wait_final(job)
    last.stop()
    assert final["status"] == "FAILED", final
    assert "interrupted while downloading" in final["statusDetails"]["reason"]
    assert dev.watch.finals(job) == ["FAILED"]
    assert dev.serving() == "1.0"


def test_unreadable_record_is_set_aside_and_the_job_runs_again(
    device: MakeDevice, archives: Archives
) -> None:
    dev = device()
    job = dev.deploy(archives.get("2.0"))
    crashing = dev.start_ota(crash_at="state:verifying")
    assert crashing.proc.wait(60) == -9
    (dev.state / "update.json").write_bytes(b'{"schema_version": 1, "job_id": "x", "sta')
    again = dev.start_ota()
    final = dev.wait_final(job)
    again.stop()
    assert final["status"] == "SUCCEEDED", final
    assert dev.serving() == "2.0"
    assert any(p.name.startswith("update.json.corrupt-") for p in dev.state.iterdir())
