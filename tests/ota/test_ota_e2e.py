"""End to end on the local stand-in: a real edge-ota, agent, broker (mTLS), S3 and Jobs emulator.

The success path runs while a client predicts without pause (zero failures
allowed). Every failure case ends with its final status in the emulator, one
accepted final update on the wire, and wind-turbine 1.0 still serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_devices import MODEL, Archive, Archives, Device, MakeDevice
from ota_harness import PackageServer, hostile_archive, resigned_with_version

from edgeagent.client import AgentClient
from tests.harness import wait_until


class Predictor:
    """Predicts through the agent without pause on its own connection; counts failures."""

    def __init__(self, socket: Path) -> None:
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._client = AgentClient(socket, timeout=10.0)
        self._x = np.random.default_rng(3).standard_normal((1, 6, 10, 10), dtype=np.float32)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.predict(MODEL, self._x)
                self.ok += 1
            except Exception as exc:
                self.failed.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


def test_workshop_document_deploys_version_2_with_no_failed_prediction(
    device: MakeDevice, archives: Archives
) -> None:
    dev = device()
    v2 = archives.get("2.0")
    predictor = Predictor(dev.agent.socket)
    try:
        dev.start_ota()
        job = dev.deploy(v2)  # exactly the workshop's five keys
        final = dev.wait_final(job)
        time.sleep(0.3)  # predictions after the swap, too
    finally:
        predictor.stop()
    assert final["status"] == "SUCCEEDED", final
    assert final["statusDetails"]["from_version"] == "1.0"
    assert final["statusDetails"]["to_version"] == "2.0"
    assert dev.serving() == "2.0"
    assert dev.watch.finals(job) == ["SUCCEEDED"]
    assert predictor.failed == [] and predictor.ok > 20
    assert (dev.models / MODEL / "2.0" / "manifest.json").is_file()
    assert list((dev.state / "downloads").iterdir()) == []  # the archive is gone
    assert not (dev.state / "update.json").exists()  # nothing left in progress


# -- failures on one shared device: each leaves 1.0 serving ------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    job: Callable[[Device, Archives, dict[str, Any]], str]
    status: str
    reason: str


@pytest.fixture(scope="module")
def shared(module_device: MakeDevice) -> Iterator[Device]:
    dev = module_device()
    dev.start_ota()
    yield dev


@pytest.fixture(scope="module")
def extras(
    archives: Archives, other_key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("ota-hostile")
    v2 = archives.get("2.0")
    out: dict[str, Any] = {"v2": v2}
    for kind in ("traversal", "symlink"):
        path = hostile_archive(v2.path, folder / f"{kind}.tar.gz", kind=kind)
        out[kind] = archives.upload(path, "2.0", f"hostile/{kind}.tar.gz")
    lying = resigned_with_version(v2.path, folder / "lying.tar.gz", "2.5", archives.key)
    out["lying"] = archives.upload(lying, "2.0", "lying/wind-turbine-2.0.tar.gz")
    out["untrusted"] = archives.get("2.0", "untrusted", signer=other_key)
    out["golden"] = archives.get(
        "2.0", "bad-golden", golden_expected=np.ones((4, 6, 10, 10), dtype=np.float32)
    )
    out["old"] = archives.get("0.9")
    return out


def _doc(**fields: Any) -> Callable[[Device, Archives, dict[str, Any]], str]:
    def create(dev: Device, _a: Archives, extra: dict[str, Any]) -> str:
        doc = dict(fields)
        return dev.deploy(extra[doc.pop("archive", "v2")], **doc)

    return create


FAILURES = [
    Case("bad-signature", _doc(archive="untrusted"), "FAILED", "signature"),
    Case("hash-mismatch", _doc(sha256="0" * 64), "FAILED", "SHA-256 mismatch"),
    Case("size-mismatch", _doc(size=12345), "FAILED", "job document says 12345"),
    Case("traversal-tar", _doc(archive="traversal"), "FAILED", "unsafe member name"),
    Case("symlink-tar", _doc(archive="symlink"), "FAILED", "symbolic link"),
    Case(
        "signed-version-differs", _doc(archive="lying"), "REJECTED", "signed package is version 2.5"
    ),
    Case("older-version", _doc(archive="old"), "REJECTED", "older than the installed 1.0"),
    Case("same-version", _doc(archive="v2", model_version="1.0"), "REJECTED", "already installed"),
    Case("other-model", _doc(model_name="pump-model"), "REJECTED", "this device runs"),
    Case("unknown-type", _doc(type="reboot"), "REJECTED", "invalid job document"),
    Case(
        "no-package",
        _doc(model_package_key=None, model_package_bucket=None),
        "REJECTED",
        "names no package",
    ),
    Case("bad-version", _doc(model_version="two"), "REJECTED", "invalid version"),
    Case("missing-object", _doc(model_package_key="nothing/here.tar.gz"), "FAILED", "NoSuchKey"),
    Case("disk-full", _doc(size=1 << 50), "FAILED", "not enough disk space"),
    Case("golden-check", _doc(archive="golden"), "FAILED", "activating"),
]


@pytest.mark.parametrize("case", FAILURES, ids=[c.name for c in FAILURES])
def test_failure_ends_with_its_status_and_the_old_version_serving(
    shared: Device, archives: Archives, extras: dict[str, Any], case: Case
) -> None:
    job = case.job(shared, archives, dict(extras))
    final = shared.wait_final(job)
    assert final["status"] == case.status, final
    assert case.reason in final["statusDetails"].get("reason", ""), final["statusDetails"]
    assert shared.serving() == "1.0"
    assert shared.watch.finals(job) == [case.status]
    # nothing half-installed, nothing outside the package, nothing left to resume
    assert sorted(p.name for p in (shared.models / MODEL).iterdir()) == ["1.0"]
    assert not (shared.models.parent / "escaped").exists()
    wait_until(lambda: shared.ota_record() is None, 5, "the record to clear")
    assert list((shared.state / "downloads").iterdir()) == []


# -- presigned URLs: Range resume, server errors then success -------------------------------
def _url_job(dev: Device, server: PackageServer, archive: Archive) -> str:
    server.files["/" + archive.key] = archive.path
    return dev.deploy(
        None,
        model_version=archive.version,
        model_package_url=server.url(archive.key) + "?X-Amz-Signature=local",
        sha256=archive.sha256,
        size=archive.size,
    )


def test_presigned_url_survives_cuts_and_errors(
    device: MakeDevice, archives: Archives, package_server: PackageServer
) -> None:
    dev = device()
    v2 = archives.get("2.0")
    package_server.faults.__init__()  # type: ignore[misc]
    package_server.faults.errors = 1  # a 503 first,
    package_server.faults.truncate = 1  # then a body cut short, resumed with Range
    package_server.faults.cut_at = v2.size // 3
    dev.start_ota()
    job = _url_job(dev, package_server, v2)
    final = dev.wait_final(job)
    assert final["status"] == "SUCCEEDED", final
    assert dev.serving() == "2.0"
    ranges = [r.get("Range") for r in package_server.requests if v2.key in r["path"]]
    assert f"bytes={v2.size // 3}-" in ranges


def test_download_that_never_completes_fails_and_keeps_the_old_version(
    device: MakeDevice, archives: Archives, package_server: PackageServer
) -> None:
    dev = device()
    v2 = archives.get("2.0")
    package_server.faults.__init__()  # type: ignore[misc]
    package_server.faults.truncate = 1000
    package_server.faults.ignore_range = True  # and no resume either
    dev.start_ota()
    job = _url_job(dev, package_server, v2)
    final = dev.wait_final(job)
    package_server.faults.__init__()  # type: ignore[misc]
    assert final["status"] == "FAILED", final
    assert "downloading" in final["statusDetails"]["step"]
    assert dev.serving() == "1.0"


def test_cancellation_mid_download_stops_and_cleans_up(
    device: MakeDevice, archives: Archives, package_server: PackageServer
) -> None:
    dev = device()
    v2 = archives.get("2.0")
    package_server.faults.__init__()  # type: ignore[misc]
    hold = threading.Event()
    package_server.faults.hold = hold
    package_server.faults.cut_at = 70_000
    dev.start_ota()
    job = _url_job(dev, package_server, v2)
    wait_until(lambda: (dev.ota_record() or {}).get("state") == "downloading", 20, "downloading")
    wait_until(
        lambda: any(p.name.endswith(".part") for p in (dev.state / "downloads").iterdir()),
        10,
        "a partial download",
    )
    dev.cloud.jobs.cancel_job(job, force=True)
    hold.set()  # the body goes on; the updater must notice the cancellation and stop
    wait_until(lambda: dev.ota_record() is None, 20, "the update to be dropped")
    package_server.faults.__init__()  # type: ignore[misc]
    assert dev.execution(job)["status"] == "CANCELED"
    assert dev.watch.finals(job) == []  # nothing reported over the cloud's CANCELED
    assert list((dev.state / "downloads").iterdir()) == []
    assert sorted(p.name for p in (dev.models / MODEL).iterdir()) == ["1.0"]
    assert dev.serving() == "1.0"
    history = json.loads((dev.state / "history.json").read_text())
    assert history[0]["outcome"] == "CANCELED"


def test_agent_down_during_activation_rolls_back(
    device: MakeDevice, archives: Archives, package_server: PackageServer
) -> None:
    dev = device(agent_wait_s=2.0)
    v2 = archives.get("2.0")
    package_server.faults.__init__()  # type: ignore[misc]
    # the agent dies the moment the last byte of the package is sent: before activation
    package_server.faults.on_complete = dev.agent.kill
    dev.start_ota()
    job = _url_job(dev, package_server, v2)
    wait_until(lambda: (dev.ota_record() or {}).get("state") == "rolling_back", 30, "the rollback")
    package_server.faults.__init__()  # type: ignore[misc]
    time.sleep(1.0)
    dev.restart_agent()  # as systemd would: it restores the version it served, 1.0
    final = dev.wait_final(job)
    assert final["status"] == "FAILED", final
    assert final["statusDetails"]["step"] == "activating"
    assert dev.serving() == "1.0"
    assert dev.watch.finals(job) == ["FAILED"]


def test_broker_restart_mid_job(
    device: MakeDevice, archives: Archives, package_server: PackageServer
) -> None:
    dev = device()
    v2 = archives.get("2.0")
    package_server.faults.__init__()  # type: ignore[misc]
    hold = threading.Event()
    package_server.faults.hold = hold
    dev.start_ota()
    job = _url_job(dev, package_server, v2)
    wait_until(lambda: (dev.ota_record() or {}).get("state") == "downloading", 20, "downloading")
    dev.cloud.restart_broker(pause=1.0)
    hold.set()
    final = dev.wait_final(job, timeout=90)
    package_server.faults.__init__()  # type: ignore[misc]
    assert final["status"] == "SUCCEEDED", final
    assert dev.serving() == "2.0"


def test_restart_prune_reconcile_and_presigned_urls(device: MakeDevice, archives: Archives) -> None:
    """A restarted updater takes the next job, never re-runs a finished one, prunes old
    versions (never the serving one or its predecessor), and reloads the committed
    version into an agent that serves nothing."""
    dev = device(keep_versions=2)
    first = dev.start_ota()
    job2 = dev.deploy(archives.get("2.0"), presigned=True)  # fetched by URL, not boto3
    assert dev.wait_final(job2)["status"] == "SUCCEEDED"
    (fetched,) = [e for e in first.events() if e.get("event") == "downloaded"]
    assert fetched["source"].startswith("http://127.0.0.1:")  # the minted URL, not s3://
    first.stop()
    dev.start_ota()
    # 3.0 the way an operator ships it: edgectl deploy (verify, upload, create the job)
    deployed = subprocess.run(
        [
            *(sys.executable, "-m", "edgectl", "deploy", "--local", "--json"),
            *("--state-dir", str(dev.cloud.state_dir), "--things", dev.thing),
            *("--package", str(archives.get("3.0", seed=2).path)),
            *("--trusted-keys", dev.settings["trusted_keys"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert deployed.returncode == 0, deployed.stderr
    job3 = json.loads(deployed.stdout)["jobId"]
    final3 = dev.wait_final(job3)
    assert final3["status"] == "SUCCEEDED", final3
    assert dev.serving() == "3.0"
    assert dev.watch.finals(job2) == ["SUCCEEDED"]  # the restart did not report it again
    assert sorted(p.name for p in (dev.models / MODEL).iterdir()) == ["2.0", "3.0"]
    older = dev.deploy(archives.get("2.0"))  # a downgrade: refused, and 2.0 stays installed
    assert dev.wait_final(older)["status"] == "REJECTED"
    # allowed, but another package under the installed 2.0's name: refused, 2.0 untouched
    other = archives.get(
        "2.0", "bad-golden", golden_expected=np.ones((4, 6, 10, 10), dtype=np.float32)
    )
    clash = dev.deploy(other, allow_downgrade=True)
    final = dev.wait_final(clash)
    assert final["status"] == "FAILED", final
    assert "different package" in final["statusDetails"]["reason"]
    assert sorted(p.name for p in (dev.models / MODEL).iterdir()) == ["2.0", "3.0"]
    assert dev.serving() == "3.0"

    dev.agent.client.unload_model(MODEL)  # the agent lost its model (e.g. its state)
    dev.processes[-1].stop()
    dev.start_ota()
    wait_until(lambda: dev.agent.client.list_models() != [], 20, "the committed version back")
    assert dev.serving() == "3.0"


# -- S3 downloads run in a child of edge-ota; a child that dies is retried, then FAILED -------
def _download_children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{parent}\n" in status and b"ota.s3fetch" in cmdline:
            found.append(int(entry.name))
    return found


class ChildKiller:
    """Kills edge-ota's S3 download children as they appear, at most ``budget`` of them."""

    def __init__(self, parent: int, budget: int) -> None:
        self.killed: list[int] = []
        self._parent, self._budget = parent, budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.killed) < self._budget:
            for pid in _download_children(self._parent):
                if pid not in self.killed and len(self.killed) < self._budget:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_s3_download_child_killed_is_retried_and_fails_clearly_when_it_keeps_dying(
    device: MakeDevice, archives: Archives
) -> None:
    dev = device()
    ota = dev.start_ota()

    def deploy_killing(budget: int) -> tuple[dict[str, Any], ChildKiller]:
        killer = ChildKiller(ota.proc.pid, budget=budget)
        try:
            return dev.wait_final(dev.deploy(archives.get("2.0"))), killer
        finally:
            killer.stop()

    # every download child dies: the attempts run out and the job says why
    final, killer = deploy_killing(1000)
    assert final["status"] == "FAILED", final
    assert "downloading" in final["statusDetails"]["step"]
    assert "download process ended (signal 9)" in final["statusDetails"]["reason"]
    assert len(killer.killed) == dev.settings["download_attempts"]
    assert dev.serving() == "1.0"
    # one child dies: the next attempt resumes and the update succeeds
    final, killer = deploy_killing(1)
    assert final["status"] == "SUCCEEDED", final
    assert len(killer.killed) == 1
    assert dev.serving() == "2.0"
    interrupted = [e for e in ota.events() if e.get("event") == "download interrupted"]
    assert any("signal 9" in e.get("error", "") for e in interrupted), interrupted
    assert _download_children(ota.proc.pid) == []  # none left behind
