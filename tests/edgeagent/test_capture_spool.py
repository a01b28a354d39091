"""The capture spool, record and uploader in-process: format, crash recovery, limits, statuses.

The agent-level behaviour (real processes, real S3) is in test_capture_agent.py
and test_capture_s3.py; these tests pin the pieces those rely on, quickly.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.capture import (
    AuxEncoding,
    AuxiliaryData,
    CapturedTensor,
    CaptureRequest,
    CaptureStatus,
    StatusBook,
    build_record,
)
from edgeagent.capture.reader import read_records, stack
from edgeagent.capture.spool import (
    CaptureSpool,
    SpoolConfig,
    SpoolLockedError,
    decode_line,
    encode_line,
    read_segment_bytes,
    segment_tag,
)
from edgeagent.capture.upload import (
    DiskDestination,
    PermanentUploadError,
    Uploader,
    render_batch,
)
from edgeagent.errors import AlreadyExistsError, ResourceExhaustedError


def request(
    capture_id: str | None = None,
    *,
    model: str = "wt",
    when: float = 1_700_000_000.25,
    aux: bytes = b"",
) -> CaptureRequest:
    x = np.arange(600, dtype=np.float32).reshape(1, 6, 10, 10)
    return CaptureRequest(
        model_name=model,
        model_version="1.0",
        capture_id=capture_id or str(uuid.uuid4()),
        inference_time=when,
        input_tensors=(CapturedTensor("input", "float32", (1, 6, 10, 10), x.tobytes()),),
        output_tensors=(CapturedTensor("output", "float32", (1, 6, 10, 10), (-x).tobytes()),),
        inputs=(AuxiliaryData("label", AuxEncoding.CSV, b"a,b\n1,2\n"),),
        outputs=(AuxiliaryData("blob", AuxEncoding.NONE, aux),) if aux else (),
    )


CONFIG = SpoolConfig(
    device_id="turbine-7",
    fleet_name="farm-north",
    embed_limit=64,
    max_records=20,
    max_bytes=10 * 1024 * 1024,
    batch_size=5,
    push_period=3600.0,
    sync_ack=False,  # these tests put without a writer thread, then seal_all() as edgectl does
)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "capture"


@pytest.fixture
def spools(spool_dir: Path) -> Iterator[list[CaptureSpool]]:
    opened: list[CaptureSpool] = []
    yield opened
    for spool in opened:
        spool.close()


def open_spool(
    spools: list[CaptureSpool], directory: Path, config: SpoolConfig = CONFIG, **kw: Any
) -> tuple[CaptureSpool, StatusBook]:
    book = StatusBook(**kw)
    spool = CaptureSpool(directory=directory, statuses=book, config=config)
    spool.open()
    spools.append(spool)
    return spool, book


def put(spool: CaptureSpool, book: StatusBook, req: CaptureRequest) -> None:
    book.claim(req.capture_id)
    spool.put(req)


# -- the record ---------------------------------------------------------------------------
def test_record_is_the_original_schema() -> None:
    req = request("cap-1", aux=b"\x00" * 100)
    built = build_record(req, device_id="turbine-7", fleet_name="farm-north", embed_limit=64)
    rec = built.record
    assert set(rec) == {
        "eventVersion",
        "eventMetadata",
        "deviceFleetInputs",
        "deviceFleetOutputs",
        "deviceFleetAuxiliaryInputs",
        "deviceFleetAuxiliaryOutputs",
    }
    assert rec["eventVersion"] == "0"
    assert rec["eventMetadata"] == {
        "deviceFleetName": "farm-north",
        "deviceId": "turbine-7",
        "eventId": "cap-1",
        "inferenceTime": "2023-11-14T22:13:20",
        "modelName": "wt",
        "modelVersion": "1.0",
    }
    (tin,) = rec["deviceFleetInputs"]
    assert set(tin) == {"name", "data", "observedContentType"}
    assert tin["observedContentType"] == "Tensor[FLOAT32; 1, 6, 10, 10]"
    assert base64.b64decode(tin["data"]) == req.input_tensors[0].data
    (aux_in,) = rec["deviceFleetAuxiliaryInputs"]
    assert aux_in == {
        "name": "label",
        "encoding": "CSV",
        "mode": "Input",
        "observedContentType": "text/csv",
        "data": base64.b64encode(b"a,b\n1,2\n").decode(),
    }
    (aux_out,) = rec["deviceFleetAuxiliaryOutputs"]
    assert "data" not in aux_out
    ref = aux_out["data-ref"]
    assert ref == "farm-north/wt/2023/11/14/22/auxiliary/cap-1/output-0-blob"
    assert built.side_files == {ref: b"\x00" * 100}
    json.dumps(rec)  # plain JSON values only


def test_lines_carry_a_checksum() -> None:
    line = encode_line({"a": 1})
    assert decode_line(line) == {"a": 1}
    assert decode_line(line[:-1]) is None  # torn: no newline
    assert decode_line(line[:5]) is None
    flipped = bytearray(line)
    flipped[-3] ^= 0x01
    assert decode_line(bytes(flipped)) is None
    assert decode_line(b"garbage\n") is None


# -- durability and recovery ------------------------------------------------------------------
def test_records_survive_a_reopen_and_stay_in_progress(
    spools: list[CaptureSpool], spool_dir: Path
) -> None:
    spool, book = open_spool(spools, spool_dir)
    spool.start()
    reqs = [request() for _ in range(7)]
    for req in reqs:
        put(spool, book, req)
    spool.close()
    segments = sorted(p.name for p in (spool_dir / "spool").iterdir())
    assert len(segments) == 2  # one sealed at batch_size 5, one still open
    assert segments[0].startswith("seg-000000000001.sealed-")
    assert segments[1] == "seg-000000000002.open"

    again, book2 = open_spool(spools, spool_dir)
    assert {book2.get(r.capture_id) for r in reqs} == {CaptureStatus.IN_PROGRESS}
    with pytest.raises(AlreadyExistsError):  # reused ids are still refused after a restart
        book2.claim(reqs[0].capture_id)
    assert all(".sealed-" in p.name for p in (spool_dir / "spool").iterdir())
    assert again.counters()["spooled"] == 7


def test_torn_tail_is_cut_and_a_corrupt_line_is_skipped_alone(
    spools: list[CaptureSpool], spool_dir: Path
) -> None:
    spool, book = open_spool(spools, spool_dir)
    spool.start()
    reqs = [request() for _ in range(4)]
    for req in reqs:
        put(spool, book, req)
    spool.close()
    (segment,) = (spool_dir / "spool").iterdir()
    data = bytearray(segment.read_bytes())
    lines = bytes(data).splitlines(keepends=True)
    # corrupt the second record in the middle, and leave half a record at the end
    second = len(lines[0]) + 100
    data[second] ^= 0x20
    torn = encode_line({"v": 1, "id": "torn"})[:50]
    segment.write_bytes(bytes(data) + torn)

    again, book2 = open_spool(spools, spool_dir)
    assert [book2.get(r.capture_id) for r in reqs] == [
        CaptureStatus.IN_PROGRESS,
        CaptureStatus.NOT_FOUND,
        CaptureStatus.IN_PROGRESS,
        CaptureStatus.IN_PROGRESS,
    ]
    (sealed,) = (spool_dir / "spool").iterdir()
    assert sealed.stat().st_size == len(data)  # the torn tail was truncated
    sealed_segment = again.next_sealed()
    assert sealed_segment is not None
    content = again.read(sealed_segment)
    assert [e.capture_id for e in content.entries] == [
        reqs[0].capture_id,
        *(r.capture_id for r in reqs[2:]),
    ]


def test_one_process_per_spool(spools: list[CaptureSpool], spool_dir: Path) -> None:
    open_spool(spools, spool_dir)
    with pytest.raises(SpoolLockedError) as caught:
        open_spool(spools, spool_dir)
    assert caught.value.pid == os.getpid()


def test_full_spool_refuses_new_captures(spools: list[CaptureSpool], spool_dir: Path) -> None:
    config = SpoolConfig(device_id="d", fleet_name="f", max_records=3, batch_size=100)
    spool, book = open_spool(spools, spool_dir, config)
    spool.start()
    for _ in range(3):
        put(spool, book, request())
    with pytest.raises(ResourceExhaustedError, match="full"):
        put(spool, book, request())
    assert spool.counters()["dropped"] == 1

    by_bytes = SpoolConfig(device_id="d", fleet_name="f", max_bytes=1024 * 1024)
    spool2, book2 = open_spool(spools, spool_dir.parent / "other", by_bytes)
    with pytest.raises(ResourceExhaustedError, match="bytes"):
        put(spool2, book2, request(aux=b"x" * 2 * 1024 * 1024))


def test_a_stalled_disk_refuses_past_max_unsynced_and_loses_nothing_acknowledged(
    spools: list[CaptureSpool], spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # acknowledged once queued: at most max_unsynced captures wait for a disk that stalls
    config = SpoolConfig(device_id="d", fleet_name="f", sync_ack=False, max_unsynced=4,
                         commit_window=0.0)  # fmt: skip
    spool, book = open_spool(spools, spool_dir, config)
    stalled, release = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        stalled.set()
        assert release.wait(30)
        real_fdatasync(fd)

    monkeypatch.setattr("edgeagent.capture.spool.os.fdatasync", slow_fdatasync)
    spool.start()
    first = request()
    put(spool, book, first)
    assert stalled.wait(10)  # the writer is in its flush with the first capture
    queued = [request() for _ in range(4)]
    for req in queued:
        put(spool, book, req)
    behind = re.escape("writer behind (4 captures not on disk)")
    with pytest.raises(ResourceExhaustedError, match=behind):
        put(spool, book, request())
    assert spool.counters()["dropped"] == 1
    release.set()
    acknowledged = {r.capture_id for r in [first, *queued]}
    ids: set[str] = set()
    deadline = time.monotonic() + 10
    while ids != acknowledged and time.monotonic() < deadline:  # as the uploader takes them
        spool.flush()
        segment = spool.next_sealed()
        if segment is None:
            time.sleep(0.01)
            continue
        ids |= {e.capture_id for e in spool.read(segment).entries}
        spool.complete(segment)
    assert ids == acknowledged  # every acknowledged capture, none of the refused
    put(spool, book, request())  # the disk caught up: accepted again


def test_sync_ack_returns_once_the_record_is_on_disk(
    spools: list[CaptureSpool], spool_dir: Path
) -> None:
    config = SpoolConfig(device_id="d", fleet_name="f", sync_ack=True)
    spool, book = open_spool(spools, spool_dir, config)
    spool.start()
    req = request()
    put(spool, book, req)
    (segment,) = (spool_dir / "spool").iterdir()
    assert req.capture_id.encode() in segment.read_bytes()


# -- upload ---------------------------------------------------------------------------------------
def test_upload_is_idempotent_and_statuses_outlive_a_restart(
    spools: list[CaptureSpool], spool_dir: Path, tmp_path: Path
) -> None:
    spool, book = open_spool(spools, spool_dir)
    reqs = [request(model=m) for m in ("wt", "wt-b", "wt", "wt-b", "wt")]
    for req in reqs:
        put(spool, book, req)
    spool.seal_all()
    segment = spool.next_sealed()
    assert segment is not None
    dest = DiskDestination(tmp_path / "out")
    first = render_batch(
        segment, spool.read(segment), device_id="turbine-7", prefix="p/q", destination=dest
    )
    second = render_batch(
        segment, spool.read(segment), device_id="turbine-7", prefix="p/q", destination=dest
    )
    assert first == second  # same keys, same bodies: a repeated upload overwrites
    assert sorted(o.key.split("/")[3] for o in first.objects) == ["wt", "wt-b"]
    assert all(o.key.startswith("p/q/farm-north/") for o in first.objects)
    assert all(o.key.endswith(f"/{first.batch_id}.jsonl") for o in first.objects)

    uploader = Uploader(spool=spool, destination=dest, device_id="turbine-7", prefix="p/q")
    assert uploader.drain(timeout=10)
    assert {book.get(r.capture_id) for r in reqs} == {CaptureStatus.SUCCESS}
    assert not list((spool_dir / "spool").iterdir())
    records = read_records(
        b"".join(p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.jsonl")))
    )
    assert sorted(r.event_id for r in records) == sorted(r.capture_id for r in reqs)
    np.testing.assert_array_equal(stack(records, "output")[0], -stack(records, "input")[0])
    spool.close()

    _, book2 = open_spool(spools, spool_dir)
    assert {book2.get(r.capture_id) for r in reqs} == {CaptureStatus.SUCCESS}


class RefusingDestination(DiskDestination):
    def put(self, key: str, body: bytes, content_type: str) -> None:
        raise PermanentUploadError(f"{key}: EntityTooLarge")


def test_a_permanently_refused_batch_is_failure_and_kept_aside(
    spools: list[CaptureSpool], spool_dir: Path, tmp_path: Path
) -> None:
    spool, book = open_spool(spools, spool_dir)
    reqs = [request() for _ in range(3)]
    for req in reqs:
        put(spool, book, req)
    spool.seal_all()
    uploader = Uploader(
        spool=spool, destination=RefusingDestination(tmp_path), device_id="d", prefix=""
    )
    assert uploader.drain(timeout=10)
    assert {book.get(r.capture_id) for r in reqs} == {CaptureStatus.FAILURE}
    assert len(list((spool_dir / "rejected").iterdir())) == 1
    assert spool.counters()["spooled"] == 0


# -- uploaded segments' files are reused ------------------------------------------------------
def upload_all(spool: CaptureSpool, out: Path) -> None:
    uploader = Uploader(spool=spool, destination=DiskDestination(out), device_id="d", prefix="")
    assert uploader.drain(timeout=10)


def uploaded_ids(out: Path) -> list[str]:
    data = b"".join(p.read_bytes() for p in sorted(out.rglob("*.jsonl")))
    return sorted(r.event_id for r in read_records(data))


def test_a_reused_file_never_brings_back_its_older_captures(
    spools: list[CaptureSpool], spool_dir: Path, tmp_path: Path
) -> None:
    """An uploaded segment's file takes the next segment; its older, longer
    content is never read as captures: not on upload, not after a crash."""
    out = tmp_path / "out"
    spool, book = open_spool(spools, spool_dir)
    first = [request(aux=b"x" * 20_000) for _ in range(5)]  # large lines
    for req in first:
        put(spool, book, req)
    spool.seal_all()
    upload_all(spool, out)
    (pooled,) = (spool_dir / "free").iterdir()
    old_size = pooled.stat().st_size
    assert not list((spool_dir / "spool").iterdir())

    # the next segment reuses that file: a short segment over a long one
    second = [request() for _ in range(2)]
    for req in second:
        put(spool, book, req)
    spool.seal_all()
    assert not list((spool_dir / "free").iterdir())
    (sealed,) = (spool_dir / "spool").iterdir()
    assert sealed.stat().st_size == old_size  # overwritten in place, older lines still there
    upload_all(spool, out)
    assert uploaded_ids(out) == sorted(r.capture_id for r in first + second)

    # a crash with a reused file open: recovery keeps only its own lines
    third = [request() for _ in range(3)]
    for req in third:
        put(spool, book, req)
    spool.close()  # no seal: the open segment is left as a crash leaves it
    (left,) = (spool_dir / "spool").iterdir()
    assert left.name.endswith(".open") and left.stat().st_size == old_size
    again, book2 = open_spool(spools, spool_dir)
    assert again.counters()["spooled"] == 3
    assert {book2.get(r.capture_id) for r in first + second} == {CaptureStatus.SUCCESS}
    upload_all(again, out)
    assert uploaded_ids(out) == sorted(r.capture_id for r in first + second + third)


def test_segment_numbers_stay_above_the_pooled_files_after_a_restart(
    spools: list[CaptureSpool], spool_dir: Path, tmp_path: Path
) -> None:
    """A pooled file holds lines tagged with its last segment's number: a
    restarted spool with nothing else on disk must not number a segment so."""
    out = tmp_path / "out"
    spool, book = open_spool(spools, spool_dir)
    first = [request() for _ in range(5)]
    for req in first:
        put(spool, book, req)
    spool.seal_all()
    upload_all(spool, out)
    spool.close()

    again, book2 = open_spool(spools, spool_dir)
    late = request()
    put(again, book2, late)
    again.seal_all()
    segment = again.next_sealed()
    assert segment is not None and segment.seq == 2
    assert [e.capture_id for e in again.read(segment).entries] == [late.capture_id]


def test_segments_in_the_format_before_reuse_are_uploaded_and_not_reused(
    spools: list[CaptureSpool], spool_dir: Path, tmp_path: Path
) -> None:
    """A device upgraded with captures in its spool: untagged lines still upload."""
    spool, book = open_spool(spools, spool_dir)
    reqs = [request() for _ in range(3)]
    for req in reqs:
        put(spool, book, req)
    spool.seal_all()
    spool.close()
    (sealed,) = (spool_dir / "spool").iterdir()
    tag = segment_tag(1)
    lines = sealed.read_bytes().splitlines(keepends=True)
    assert all(line.startswith(tag) for line in lines)
    sealed.write_bytes(b"".join(line[len(tag) :] for line in lines))  # the older format

    again, _ = open_spool(spools, spool_dir)
    assert again.counters()["spooled"] == 3
    upload_all(again, tmp_path / "out")
    assert uploaded_ids(tmp_path / "out") == sorted(r.capture_id for r in reqs)
    assert not list((spool_dir / "free").iterdir())  # its file is removed, not pooled


def test_a_damaged_tag_skips_its_line_alone_and_another_segments_line_ends_the_segment() -> None:
    headers = {"model": "m", "fleet": "f", "t": 1.0}
    own = [
        segment_tag(9) + encode_line({"v": 1, "id": f"c{i}", **headers}, b"{}") for i in range(4)
    ]
    stale = segment_tag(3) + encode_line({"v": 1, "id": "old", **headers}, b"{}")
    bad = bytearray(own[1])
    bad[5] ^= 0x01  # a digit of the segment number: the tag's checksum fails
    data = own[0] + bytes(bad) + own[2] + stale[40:] + stale + own[3]
    content = read_segment_bytes(data, 9)
    assert [e.capture_id for e in content.entries] == ["c0", "c2"]
    assert content.corrupt_lines == 1  # the damaged tag; the torn older line is not counted
    assert content.data == own[0] + bytes(bad) + own[2]  # what the batch id is made of
    assert read_segment_bytes(data, 3).entries == []  # numbers must match, not only checksums


# -- statuses -------------------------------------------------------------------------------------
def test_status_book_bounds_finished_ids_by_age_and_count() -> None:
    now = [1000.0]
    book = StatusBook(max_entries=3, ttl_seconds=60, clock=lambda: now[0])
    for i in range(5):
        book.claim(f"id{i}")
    for i in range(4):
        book.set(f"id{i}", CaptureStatus.SUCCESS)
    # only the 3 most recently finished are remembered; in-progress ones are never evicted
    assert [book.get(f"id{i}").name for i in range(5)] == [
        "NOT_FOUND",
        "SUCCESS",
        "SUCCESS",
        "SUCCESS",
        "IN_PROGRESS",
    ]
    now[0] += 61
    assert book.get("id3") is CaptureStatus.NOT_FOUND
    assert book.get("id4") is CaptureStatus.IN_PROGRESS
    book.restore("old", CaptureStatus.SUCCESS, at=now[0] - 120)  # already past its time
    assert book.get("old") is CaptureStatus.NOT_FOUND
