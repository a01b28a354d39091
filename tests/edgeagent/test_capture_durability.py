"""An acknowledged capture is never lost: not to a full disk, not to a SIGKILL.

The spool runs on a real 20 MB file system (tmpfs, mounted here as root and
unmounted afterwards), the destination is unreachable, and captures of about
40 KB arrive from four threads until the disk is full:

- before the disk is full, new captures are refused at once with
  RESOURCE_EXHAUSTED "spool disk full" (a free-space check with a reserve,
  before acknowledging), and no acknowledged capture turns FAILURE;
- once the destination is back, every acknowledged capture is delivered,
  once;
- acknowledgement is durable by default (fsynced, by group commit), so a
  SIGKILL under load loses none either.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from capture_helpers import (
    Agents,
    agents,
    disk_objects,
    event_ids,
    extract_model,
    short_dir,
    windows,
)

from edgeagent.capture import (
    AuxEncoding,
    AuxiliaryData,
    CapturedTensor,
    CaptureRequest,
    CaptureStatus,
    StatusBook,
)
from edgeagent.capture.spool import CaptureSpool, SpoolConfig
from edgeagent.errors import AgentError, ResourceExhaustedError
from edgeagent.settings import AgentSettings
from tests.harness import small_filesystem

MiB = 1024 * 1024
FS_SIZE_MB = 20


@pytest.fixture(scope="module")
def model() -> Iterator[Path]:
    base = short_dir("wedur-model-")
    try:
        yield extract_model(base / "wind-turbine-1.0")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pool() -> Iterator[Agents]:
    with agents("wedur-") as started:
        yield started


def record_40k() -> list[np.ndarray[Any, Any]]:
    return [windows(8, seed=1)]  # 19,200 bytes in, the same out: ~40 KB a record


class Senders:
    """Four threads sending ~40 KB captures until each has been refused ``stop_after`` times."""

    def __init__(self, agent: Any, stop_after: int = 3, threads: int = 4) -> None:
        self.agent = agent
        self.acknowledged: list[str] = []
        self.refusals: list[tuple[str, float]] = []  # (message, seconds the call took)
        self.other_errors: list[str] = []
        self._stop_after = stop_after
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        x = record_40k()
        refused = 0
        while refused < self._stop_after:
            cid = str(uuid.uuid4())
            started = time.monotonic()
            try:
                self.agent.client.capture_data(model_name="wt", capture_id=cid, inputs=x, outputs=x)
            except ResourceExhaustedError as exc:
                refused += 1
                with self._lock:
                    self.refusals.append((str(exc), time.monotonic() - started))
                continue
            except AgentError as exc:
                with self._lock:
                    self.other_errors.append(f"{type(exc).__name__}: {exc}")
                return
            with self._lock:
                self.acknowledged.append(cid)

    def run(self) -> None:
        for t in self._threads:
            t.start()
        for t in self._threads:
            t.join(120)
        assert not any(t.is_alive() for t in self._threads), "a capture call hung"


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "non-durable"])
def test_full_disk_never_loses_acknowledged_captures(
    pool: Agents, model: Path, durable: bool
) -> None:
    with small_filesystem(FS_SIZE_MB) as fs:
        blocked = pool.base / "destination-down"
        blocked.write_text("a file where the destination folder should be: uploads fail\n")
        config = {
            "capture_destination": "Disk",
            "capture_disk_path": str(blocked / "out"),
            "capture_buffer_size": 100_000,  # only the disk limits the spool here
            "capture_spool_max_bytes": 1024 * MiB,
            "capture_spool_reserve_bytes": 2 * MiB,
            "capture_batch_size": 16,
            "capture_push_period_seconds": 0.2,
            "capture_retry_max_seconds": 0.3,
            "capture_sync_ack": durable,
        }
        agent = pool.start(config, state_dir=fs / "state")
        agent.client.load_model("wt", model)
        senders = Senders(agent)
        senders.run()
        assert not senders.other_errors, senders.other_errors[:3]
        acknowledged = senders.acknowledged
        # 20 MB less the reserve, ~54 KB a spooled record: the disk, not a setting, stopped us
        assert len(acknowledged) > 200, len(acknowledged)
        assert all("spool disk full" in msg for msg, _ in senders.refusals), senders.refusals[:3]
        # refused at once: no waiting for a writer that cannot write
        slowest = max(took for _, took in senders.refusals)
        assert slowest < 0.25, f"a refusal took {slowest:.3f} s"

        time.sleep(1.0)  # uploads keep failing; the writer and the uploader keep trying
        statuses = agent.statuses(acknowledged)
        assert statuses == {"IN_PROGRESS": len(acknowledged)}, statuses
        assert agent.alive()

        blocked.unlink()  # the destination comes back
        agent.wait_statuses(acknowledged, "SUCCESS", timeout=60)
        delivered = event_ids(disk_objects(blocked / "out"))
        assert all(delivered[cid] == 1 for cid in acknowledged)
        # room again: captures are accepted
        x = record_40k()
        agent.client.capture_data(
            model_name="wt", capture_id=str(uuid.uuid4()), inputs=x, outputs=x
        )
        agent.terminate()


def test_sigkill_loses_no_acknowledged_capture_by_default(pool: Agents, model: Path) -> None:
    """The default configuration: acknowledged means fsynced."""
    assert AgentSettings().capture_sync_ack is True
    out = pool.base / "out"
    config = {
        "capture_destination": "Disk",
        "capture_disk_path": str(out),
        "capture_batch_size": 8,
        "capture_push_period_seconds": 0.2,
    }
    agent = pool.start(config)
    agent.client.load_model("wt", model)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send() -> None:
        x = record_40k()
        while not stop.is_set():
            cid = str(uuid.uuid4())
            try:
                agent.client.capture_data(model_name="wt", capture_id=cid, inputs=x, outputs=x)
            except AgentError:
                return  # the agent is gone
            with lock:
                acknowledged.append(cid)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(acknowledged) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.proc.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    agent.kill()
    assert len(acknowledged) >= 150
    again = pool.start(config, state_dir=agent.state_dir, name="again")
    again.wait_statuses(acknowledged, "SUCCESS", timeout=60)
    delivered = event_ids(disk_objects(out))
    assert all(delivered[cid] == 1 for cid in acknowledged)  # none lost, none twice


# -- the spool in-process, on a small file system ---------------------------------------------


def _fill(fs: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``fs``."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with filler.open("wb") as f:
        f.truncate(0)
        chunk = b"\0" * MiB
        while size > 0:
            n = f.write(chunk[: min(len(chunk), size)])
            size -= n
        f.flush()
        os.fsync(f.fileno())
    return filler


def _big_request() -> CaptureRequest:
    """~40 KB of capture (base64 makes it ~54 KB in the spool)."""
    x = np.random.default_rng(0).standard_normal((8, 6, 10, 10), dtype=np.float32).tobytes()
    return CaptureRequest(
        model_name="wt",
        model_version="1.0",
        capture_id=str(uuid.uuid4()),
        inference_time=1_700_000_000.25,
        input_tensors=(CapturedTensor("input", "float32", (8, 6, 10, 10), x),),
        output_tensors=(CapturedTensor("output", "float32", (8, 6, 10, 10), x),),
        inputs=(AuxiliaryData("label", AuxEncoding.CSV, b"a,b\n1,2\n"),),
        outputs=(),
    )


def test_sync_ack_refuses_at_once_on_a_full_disk() -> None:
    with small_filesystem(4) as fs:
        book = StatusBook()
        config = SpoolConfig(device_id="d", fleet_name="f", sync_ack=True, reserve_bytes=256 * 1024)
        spool = CaptureSpool(directory=fs / "capture", statuses=book, config=config)
        spool.open()
        spool.start()
        try:
            _fill(fs, 64 * 1024)
            for _ in range(5):
                req = _big_request()
                book.claim(req.capture_id)
                started = time.monotonic()
                with pytest.raises(ResourceExhaustedError, match="spool disk full"):
                    spool.put(req)
                assert time.monotonic() - started < 0.1
        finally:
            spool.close()


def test_disk_full_after_acknowledgement_keeps_the_captures() -> None:
    """Non-durable mode: what was acknowledged waits in memory for space, never FAILURE."""
    with small_filesystem(4) as fs:
        book = StatusBook()
        config = SpoolConfig(device_id="d", fleet_name="f", sync_ack=False, reserve_bytes=0)
        spool = CaptureSpool(directory=fs / "capture", statuses=book, config=config)
        spool.open()
        try:
            reqs = [_big_request() for _ in range(10)]
            for req in reqs:  # acknowledged while the disk still had room (no writer yet)
                book.claim(req.capture_id)
                spool.put(req)
            filler = _fill(fs, 16 * 1024)  # then someone else fills the disk
            spool.start()
            time.sleep(0.5)  # the writer meets ENOSPC, and retries
            assert {book.get(r.capture_id) for r in reqs} == {CaptureStatus.IN_PROGRESS}
            late = _big_request()
            book.claim(late.capture_id)
            with pytest.raises(ResourceExhaustedError, match="spool disk full"):
                spool.put(late)
            filler.unlink()
            deadline = time.monotonic() + 10
            while spool.counters().get("written", 0) < len(reqs) and time.monotonic() < deadline:
                time.sleep(0.05)
            spool.flush()
            time.sleep(0.3)
            spooled = b"".join(p.read_bytes() for p in (fs / "capture" / "spool").iterdir())
            assert all(r.capture_id.encode() in spooled for r in reqs)
            assert {book.get(r.capture_id) for r in reqs} == {CaptureStatus.IN_PROGRESS}
        finally:
            spool.close()


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    """Durable mode: one fsync serves every capture that arrived while the previous ran."""
    book = StatusBook()
    config = SpoolConfig(device_id="d", fleet_name="f", max_records=10_000, sync_ack=True)
    spool = CaptureSpool(directory=tmp_path / "capture", statuses=book, config=config)
    spool.open()
    spool.start()
    per_thread = 40

    def send() -> None:
        for _ in range(per_thread):
            req = _big_request()
            book.claim(req.capture_id)
            spool.put(req)

    try:
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        counters = spool.counters()
    finally:
        spool.close()
    assert counters["written"] == 4 * per_thread
    assert counters["commits"] < counters["written"], counters
