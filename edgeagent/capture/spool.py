"""The capture spool: accepted captures on disk until they are uploaded.

Layout under ``state_dir/capture/``::

    LOCK                          flock held by the one process using the spool; holds its pid
    spool/seg-000000000042.open   the segment being appended to (at most one)
    spool/seg-000000000041.sealed-1732650000
                                  a sealed segment = one upload batch (sealed at that epoch second)
    free/free-000000000040        files of uploaded segments, kept to take new ones (at most 4)
    statuses.log                  finished capture ids (SUCCESS / FAILURE) and when
    rejected/                     sealed segments the destination refused for good

Each line of ``statuses.log`` is ``<crc32, 8 hex> <JSON>\\n`` and each line of a
segment ``<tag> <crc32> <header JSON>\\t<record JSON>\\n``: a torn or corrupted
line fails its checksum and is skipped alone, the lines before and after it
stay readable. The tag (``segment_tag``: ``@``, the segment's number, the
number's crc32) says which segment a line belongs to: a reused file still
holds its earlier segment's lines past the new ones, and reading stops at the
first line of another segment. Segments written before lines were tagged
are still read, and their files are not reused. The header is ``{"v": 1,
"id", "model", "fleet", "t", "side"}`` (``side``: the base64 of auxiliary
payloads that go to side files); the record is the capture's final JSON
record (``edgeagent.capture.build_record``), rendered once, here, and
uploaded as these very bytes.

Durability (the choice, and its budget): ``put`` renders the record on the
caller's thread, checks the spool's limits and the real free space of its
file system, and queues the line; queued lines are appended and fsynced as a
group, by one thread at a time.

- **Durable (the default, ``capture_sync_ack = true``)**: CaptureData returns
  once its record is on disk (``fdatasync``). Group commit, led by the
  callers: a caller that finds no commit running writes and fsyncs
  everything queued on its own thread; one write and one flush serve every
  capture that arrived while the previous flush ran, and the next commit
  starts as soon as one ends, led by the first caller still waiting (no
  waiting to gather more). So durability costs each capture at most two
  flushes of latency, a lone capture no thread hand-off; what it costs in
  throughput depends on the disk's flush latency against the rest of a call
  (bench/capture_durability.py, README).
  The writer thread only seals on time and journals refusals. Nothing
  acknowledged is ever lost, not to a crash nor to a power loss.
- **Files are reused**: a new segment takes the file of an uploaded one when
  the pool has one, and its lines overwrite that file's blocks in place. Its
  size and block map do not change, so ``fdatasync`` flushes the data and
  nothing else; appending to a new file also commits the file system's
  journal on every flush (ext4: 0.14 against 0.21-0.29 ms for a 54 KB line
  here), and the journal's kernel thread needs a CPU the callers want.
- **Non-durable** (``capture_sync_ack = false``): CaptureData returns once
  the record is queued; the writer waits ``capture_commit_window_seconds``
  to gather a group. A power loss can lose at most ``capture_max_unsynced``
  acknowledged captures (past that number CaptureData answers
  RESOURCE_EXHAUSTED until the disk catches up); a process crash (SIGKILL,
  OOM) what was still queued.

A full disk never costs an acknowledged capture. Before acknowledging, ``put``
checks the file system's free space less the bytes still queued, and keeps
``capture_spool_reserve_bytes`` free (the pool's files count as free: they
take new segments): past that, a new capture is refused at once with
RESOURCE_EXHAUSTED "spool disk full"; a write that runs out of space all the
same gives the pool's space back. Should a write still fail
(another process filled the disk), a durable capture's caller, still waiting,
gets that refusal immediately (it was never acknowledged), and acknowledged
non-durable captures stay queued, IN_PROGRESS, and are written when space
returns; meanwhile new captures are refused.

A segment is sealed (fsynced, renamed ``.sealed-<epoch>``, directory fsynced)
when it holds ``capture_batch_size`` records or its first record is
``capture_push_period_seconds`` old, or on ``flush()``; a sealed segment is
immutable and is exactly one upload batch, so its batch id (from its seal time
and the hash of its own bytes) is the same however often it is uploaded. After a
crash, the open segment is truncated after its last whole line and sealed;
every record found in a segment is IN_PROGRESS again, and the uploads resume.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from edgeagent.capture import CaptureRequest, CaptureStatus, StatusBook, build_record
from edgeagent.errors import InvalidArgumentError, ResourceExhaustedError
from edgecommon.fsutil import atomic_write_bytes, free_bytes, fsync_dir

if TYPE_CHECKING:
    from edgeagent.settings import AgentSettings

log = structlog.get_logger(__name__)

ENVELOPE_VERSION = 1
SEGMENT_RE = re.compile(r"seg-(\d{12})\.(open|sealed-(\d+))")
FREE_RE = re.compile(r"free-(\d{12})")
FREE_DIR = "free"
_POOL_MAX = 4  # uploaded segments' files kept for reuse
_TAG_LEN = 22  # b"@" + 12-digit segment number + its crc32 (8 hex) + b" "
LOCK_FILE = "LOCK"
JOURNAL_FILE = "statuses.log"
CRASH_POINT_ENV = "WINDEDGE_CAPTURE_CRASH_POINT"
_JOURNAL_COMPACT_MIN = 1024 * 1024
SYNC_ACK_TIMEOUT_S = 30.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_RETRY_MIN_S = 0.1  # a failed write of acknowledged captures is retried after this, doubling
_RETRY_MAX_S = 2.0
_IOV_MAX = 1024  # buffers one writev takes (Linux)


class SpoolLockedError(OSError):
    """Another process (an agent, or ``edgectl capture flush``) uses this spool."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(
            errno.EWOULDBLOCK, f"capture spool {directory} is in use by {who} (another agent?)"
        )
        self.pid = pid


def crash_point(name: str) -> None:
    """SIGKILL this process at a named point when the environment asks (crash tests)."""
    if os.environ.get(CRASH_POINT_ENV) == name:
        log.warning("crash point reached: killing myself", point=name)
        os.kill(os.getpid(), signal.SIGKILL)


# -- lines -----------------------------------------------------------------------------
def encode_line(value: Any, record: bytes | None = None) -> bytes:
    """``<crc32> <JSON>\n``, or ``<crc32> <JSON>\t<record JSON>\n`` with a record.

    A record travels as the exact bytes that will be uploaded, rendered once:
    the uploader never parses and re-serialises it. JSON text never holds a
    raw tab or newline, so both separators are unambiguous.
    """
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if record is not None:
        body = b"%s\t%s" % (body, record)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def split_line(line: bytes) -> tuple[Any, bytes | None] | None:
    """(JSON value, record bytes or None) of a whole line; None when torn or corrupted."""
    if len(line) < 11 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        head, tab, record = body.partition(b"\t")
        return json.loads(head), (record if tab else None)
    except ValueError:
        return None


def decode_line(line: bytes) -> Any | None:
    """The JSON value of a whole line, or None when it is torn or corrupted."""
    parts = split_line(line)
    return None if parts is None else parts[0]


def segment_tag(seq: int) -> bytes:
    """The prefix of every line written to segment ``seq``: ``@<seq, 12 digits><crc32 of
    those digits, 8 hex> ``. A file reused for a later segment still holds the old
    segment's lines past the new ones: their tag names another segment, so a reader
    stops there instead of taking them for new captures."""
    digits = b"%012d" % seq
    return b"@%s%08x " % (digits, zlib.crc32(digits))


def _line_segment(line: bytes) -> int | None:
    """The segment a tagged line names, or None when its tag is damaged."""
    digits, check = line[1:13], line[13:21]
    if line[:1] != b"@" or line[21:22] != b" " or not digits.isdigit():
        return None
    try:
        return int(digits) if int(check, 16) == zlib.crc32(digits) else None
    except ValueError:
        return None


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(end offset, line) of every newline-terminated line, and a last torn one."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        stop = len(data) if end < 0 else end + 1
        yield stop, data[start:stop]
        start = stop


# -- entries and segments -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One spooled capture, as read back for upload."""

    capture_id: str
    model: str
    fleet: str
    inference_time: float
    record_json: bytes  # the record exactly as it is uploaded
    side_files: dict[str, str]  # relative key -> base64 payload

    def record(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.record_json)
        return value


def _entry(parts: tuple[Any, bytes | None] | None) -> SpoolEntry | None:
    if parts is None:
        return None
    value, record = parts
    if record is None or not isinstance(value, dict) or value.get("v") != ENVELOPE_VERSION:
        return None
    try:
        return SpoolEntry(
            capture_id=str(value["id"]),
            model=str(value["model"]),
            fleet=str(value["fleet"]),
            inference_time=float(value["t"]),
            record_json=record,
            side_files={str(k): str(v) for k, v in dict(value.get("side") or {}).items()},
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class SegmentContent:
    entries: list[SpoolEntry]
    corrupt_lines: int
    valid_end: int  # offset just after the last valid line
    data: bytes  # the segment's own bytes (a reused file's older lines cut off)
    tagged: bool = True  # its lines carry segment tags (written since files are reused)


def read_segment_bytes(data: bytes, seq: int) -> SegmentContent:
    """The captures of segment ``seq`` in ``data``, the bytes of its file.

    Tagged lines (``segment_tag``) belong to the segment they name: the first
    whole line naming another segment is where a reused file's older content
    begins, and the segment ends after its last own line before it. A torn or
    corrupted line is skipped alone. Untagged lines are the format from before
    files were reused (such a file is never reused, so it has no older content).
    """
    entries: list[SpoolEntry] = []
    corrupt = 0
    since_valid = 0  # corrupt lines after the last valid one
    valid_end = 0
    tagged = data[:1] == b"@"
    for end, line in iter_lines(data):
        body = line
        if tagged:
            owner = _line_segment(line)
            if owner is not None and owner != seq:
                # older content of a reused file: the torn line before it is its too
                data, corrupt = data[:valid_end], corrupt - since_valid
                break
            body = line[_TAG_LEN:] if owner is not None else b""
        entry = _entry(split_line(body))
        if entry is None:
            corrupt += 1
            since_valid += 1
            continue
        entries.append(entry)
        valid_end, since_valid = end, 0
    return SegmentContent(
        entries=entries, corrupt_lines=corrupt, valid_end=valid_end, data=data, tagged=tagged
    )


@dataclass(slots=True)
class Segment:
    seq: int
    path: Path
    sealed_at: int | None = None  # epoch seconds; None while open
    ids: list[str] = field(default_factory=list)
    nbytes: int = 0
    opened_mono: float = 0.0  # when its first record was written (push period)
    reusable: bool = True  # its file may take a later segment (tagged lines only)

    @property
    def name(self) -> str:
        return self.path.name

    def batch_id(self, device_id: str, data: bytes) -> str:
        """Deterministic: the same sealed segment always yields the same id."""
        if self.sealed_at is None:
            raise ValueError("an open segment has no batch id")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.sealed_at))
        digest = hashlib.sha256(data).hexdigest()[:16]
        return f"{device_id}-{stamp}-{digest}"


def segment_name(seq: int, sealed_at: int | None) -> str:
    return f"seg-{seq:012d}." + ("open" if sealed_at is None else f"sealed-{sealed_at}")


# -- the status journal -----------------------------------------------------------------
class StatusJournal:
    """Finished statuses on disk, so they survive a restart (bounded by compaction)."""

    def __init__(self, path: Path, statuses: StatusBook) -> None:
        self._path = path
        self._statuses = statuses
        self._lock = threading.Lock()
        self._compact_at = _JOURNAL_COMPACT_MIN

    def restore(self) -> int:
        """Load remembered statuses into the book, then rewrite the journal compactly."""
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            data = b""
        restored = 0
        for _, line in iter_lines(data):
            value = decode_line(line)
            if not isinstance(value, dict):
                continue
            try:
                status = CaptureStatus[str(value["s"])]
                self._statuses.restore(str(value["id"]), status, float(value["t"]))
                restored += 1
            except (KeyError, TypeError, ValueError):
                continue
        self.compact()
        return restored

    def append(self, entries: list[tuple[str, CaptureStatus, float]], *, sync: bool) -> None:
        if not entries:
            return
        data = b"".join(
            encode_line({"id": i, "s": s.name, "t": round(t, 3)}) for i, s, t in entries
        )
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                if sync:
                    os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > self._compact_at:
                self._compact_locked()

    def compact(self) -> None:
        with self._lock:
            self._compact_locked()

    def _compact_locked(self) -> None:
        data = b"".join(
            encode_line({"id": i, "s": s.name, "t": round(t, 3)})
            for i, s, t in self._statuses.finished()
        )
        atomic_write_bytes(self._path, data, mode=0o600)
        self._compact_at = max(_JOURNAL_COMPACT_MIN, 2 * len(data))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pwritev_all(fd: int, parts: list[bytes], offset: int) -> None:
    """Write ``parts`` one after the other from ``offset``, as few ``pwritev`` calls as
    it takes (no joined copy of a group commit's lines)."""
    views = [memoryview(p) for p in parts if p]
    while views:
        sent = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += sent
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


# -- the spool ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    device_id: str
    fleet_name: str
    embed_limit: int = 3072
    max_records: int = 1024  # capture_buffer_size
    max_bytes: int = 256 * 1024 * 1024
    batch_size: int = 64
    push_period: float = 4.0
    max_unsynced: int = 64
    sync_ack: bool = True
    commit_window: float = 0.02
    reserve_bytes: int = 16 * 1024 * 1024  # free space the spool never takes


def spool_config(settings: AgentSettings) -> SpoolConfig:
    return SpoolConfig(
        device_id=settings.device_id,
        fleet_name=settings.fleet_name,
        embed_limit=settings.capture_base64_embed_limit,
        max_records=settings.capture_buffer_size,
        max_bytes=settings.capture_spool_max_bytes,
        batch_size=settings.capture_batch_size,
        push_period=settings.capture_push_period_seconds,
        max_unsynced=settings.capture_max_unsynced,
        sync_ack=settings.capture_sync_ack,
        commit_window=settings.capture_commit_window_seconds,
        reserve_bytes=settings.capture_spool_reserve_bytes,
    )


@dataclass(slots=True)
class _Queued:
    capture_id: str
    line: bytes  # the rendered spool line
    # durable mode: the lock its waiting caller blocks on (None: nobody waits), and
    # what that caller is told when it is released: "" written, "lead" commit next,
    # anything else the reason it was not written
    waiter: threading.Lock | None = None
    outcome: str | None = None


class CaptureSpool:
    """The ``CaptureSink`` of the agent: bounded, on disk, crash-safe.

    ``open()`` takes the lock and recovers what a previous process left;
    ``start()`` starts the writer thread; ``close()`` writes what is queued and
    stops. The uploader takes sealed segments with ``next_sealed`` and ends
    each with ``complete`` or ``reject``.
    """

    def __init__(self, *, directory: Path, statuses: StatusBook, config: SpoolConfig) -> None:
        self.directory = directory
        self.segments_dir = directory / "spool"
        self.rejected_dir = directory / "rejected"
        self.free_dir = directory / FREE_DIR
        self._statuses = statuses
        self._config = config
        self._journal = StatusJournal(directory / JOURNAL_FILE, statuses)
        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._sealed: deque[Segment] = deque()  # oldest first
        # files of uploaded segments, kept to take new ones: overwriting a file's
        # blocks in place lets fdatasync flush the data alone, where appending to a
        # new file also commits the file system's journal (its size and blocks)
        self._pool: list[tuple[Path, int]] = []  # (path, bytes on disk)
        self._open: Segment | None = None
        self._open_fd: int | None = None
        self._next_seq = 1
        self._records = 0  # queued + in segments
        self._bytes = 0  # queued lines + segment sizes
        self._pending = 0  # bytes queued, not yet written
        self._write_error: OSError | None = None  # acknowledged captures wait for the disk
        self._retry_at = 0.0
        self._retry_delay = _RETRY_MIN_S
        self._flush_requested = False
        self._closing = False
        self._writer_idle = False  # waiting for work (not collecting a group)
        # one thread at a time writes segments: a durable caller leading a group
        # commit, or the writer thread
        self._committing = False
        self._waiting = 0  # threads waiting on the condition for a commit to end
        self._lock_fd: int | None = None
        self._writer: threading.Thread | None = None
        self._dropped_ids: deque[str] = deque(maxlen=4096)
        self._counts: dict[str, int] = {}
        self.listeners: list[threading.Event] = []  # set whenever a segment is sealed

    # -- life cycle ----------------------------------------------------------------
    def open(self) -> None:
        """Take the spool's lock and recover it (raises SpoolLockedError when in use)."""
        for folder in (self.directory, self.segments_dir, self.rejected_dir, self.free_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = lock_spool(self.directory)
        restored = self._journal.restore()
        self._recover()
        log.info(
            "capture spool open",
            directory=str(self.directory),
            sealed_batches=len(self._sealed),
            spooled=self._records,
            statuses_restored=restored,
        )

    def start(self) -> None:
        if self._writer is not None:
            return
        self._writer = threading.Thread(
            target=self._writer_loop, name="capture-writer", daemon=True
        )
        self._writer.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write and fsync what is queued, stop the writer, release the lock."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error("capture writer did not stop in time")
                return
        else:
            with contextlib.suppress(OSError):  # logged; what could not be written is FAILURE
                self._write_queued(last_attempt=True)
        self._close_open_fd()
        if self._open is not None and not self._open.ids:  # opened ahead, never used
            with contextlib.suppress(OSError):
                self._open.path.unlink()
            self._open = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the sink ------------------------------------------------------------------
    def put(self, request: CaptureRequest) -> None:
        """Accept a capture (RESOURCE_EXHAUSTED when it cannot be kept).

        Durable mode returns once the record is fsynced; otherwise once queued.
        """
        try:
            line = self._render(request)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"capture cannot be recorded: {exc}") from None
        cfg = self._config
        size = _TAG_LEN + len(line)  # as written: each line carries its segment's tag
        with self._cond:
            reason = self._refusal(size)
            if reason is not None:
                self._count("dropped")
                self._dropped_ids.append(request.capture_id)
                self._cond.notify_all()
                raise ResourceExhaustedError(reason)
            item = _Queued(request.capture_id, line)
            self._queue.append(item)
            self._records += 1
            self._bytes += size
            self._pending += size
            self._count("accepted")
            if not cfg.sync_ack:
                if self._writer_idle or len(self._queue) >= cfg.max_unsynced // 2:
                    self._cond.notify_all()  # otherwise the writer is already collecting a group
                return
            lead = not self._committing
            if lead:
                self._committing = True
            else:  # a commit runs: this capture goes into the next one
                waiter = item.waiter = threading.Lock()
                waiter.acquire()
        outcome = "lead" if lead else self._wait_for_commit(item, waiter)
        if outcome == "lead":
            self._lead_commit()
            outcome = item.outcome or ""
        if outcome:
            raise ResourceExhaustedError(outcome)

    def _wait_for_commit(self, item: _Queued, waiter: threading.Lock) -> str:
        """Durable, a commit running: block until ``item`` is written, failed, or leads.

        Group commit led by the callers themselves. A caller that finds no
        commit running writes and fsyncs everything queued on its own thread
        (a lone caller costs no thread hand-off at all). A caller that finds
        one running waits here, on a lock of its own: the commit that ends next
        either wrote it (answer at once), or, when it was queued during that
        commit's fsync, hands the next commit to it (then it writes and fsyncs
        everything queued meanwhile, its own record with the others). So a
        capture waits for at most the fsync running when it arrived and its
        own, the next fsync starts as soon as the previous ends, and each
        waiting caller is woken exactly once: no condition broadcast, no
        thread woken only to find it must wait again (on a 2-core machine
        those wake-ups were the durable mode's main cost, more than fsync).
        """
        if waiter.acquire(timeout=SYNC_ACK_TIMEOUT_S):
            return item.outcome or ""
        with self._cond:
            if item.outcome is not None:  # released as the time ran out
                return item.outcome
            item.waiter = None  # written later all the same; nobody waits for it
            if not self._committing:  # a commit handed to nobody: the writer takes it
                self._cond.notify_all()
        return f"capture not on disk after {SYNC_ACK_TIMEOUT_S:.0f} s (the disk is too slow)"

    def _lead_commit(self) -> None:
        try:
            self._write_queued()
        except OSError as exc:  # those not written were failed; their callers learn why
            log.error("capture spool write failed", error=str(exc))
        finally:
            self._end_commit()

    def _begin_commit(self) -> None:
        """Wait until no commit runs, then own the segments (the condition is held)."""
        while self._committing:
            self._waiting += 1
            try:
                self._cond.wait()
            finally:
                self._waiting -= 1
        self._committing = True

    def _end_commit(self) -> None:
        """Give the segments to the next writer: a thread waiting for them (the
        writer thread: sealing, flush, close), else the first durable caller
        still waiting in the queue (it leads the next group commit)."""
        with self._cond:
            following = None
            if not self._waiting:
                following = next((i for i in self._queue if i.waiter is not None), None)
            if following is None:
                self._committing = False
                if self._waiting or (self._queue and self._config.sync_ack):
                    self._cond.notify_all()
                return
            # the commit passes straight to that caller: _committing stays True
            _answer(following, "lead")

    def _refusal(self, size: int) -> str | None:
        """Why a capture of ``size`` spool bytes cannot be accepted now (None: it can)."""
        cfg = self._config
        if self._closing:
            return "the agent is stopping"
        if self._write_error is not None:
            return _write_failure(self._write_error, waiting=len(self._queue))
        if self._records >= cfg.max_records:
            return f"capture spool full ({self._records} captures waiting for upload)"
        if self._bytes + size > cfg.max_bytes:
            return f"capture spool full ({self._bytes} bytes waiting for upload)"
        if len(self._queue) >= cfg.max_unsynced:
            return f"capture spool writer behind ({len(self._queue)} captures not on disk)"
        try:  # the pool's files take new segments: their space is the spool's
            free = free_bytes(self.segments_dir) + self._pool_bytes() - self._pending
        except OSError as exc:
            return f"capture spool unusable: {exc.strerror or exc}"
        if free - size < cfg.reserve_bytes:
            return (
                f"spool disk full ({max(0, free)} bytes free, {cfg.reserve_bytes} kept in reserve)"
            )
        return None

    def _pool_bytes(self) -> int:
        return sum(size for _, size in self._pool)

    def flush(self) -> None:
        """Seal the open segment now (its records become an upload batch)."""
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()

    # -- for the uploader ---------------------------------------------------------
    def next_sealed(self) -> Segment | None:
        with self._cond:
            return self._sealed[0] if self._sealed else None

    def read(self, segment: Segment) -> SegmentContent:
        content = read_segment_bytes(segment.path.read_bytes(), segment.seq)
        if content.corrupt_lines:
            log.warning(
                "corrupt records skipped in capture segment",
                segment=segment.name,
                corrupt=content.corrupt_lines,
            )
        return content

    def complete(self, segment: Segment) -> None:
        """The batch is in the destination: statuses SUCCESS, segment removed (its
        file kept for a later segment while the pool has room)."""
        self._finish(segment, CaptureStatus.SUCCESS)
        # no directory fsync: should a power loss undo this unlink or rename, the
        # batch is uploaded again to the same keys, which changes nothing there
        self._retire(segment.path, segment.seq if segment.reusable else None)
        self._release(segment)
        self._count("uploaded", len(segment.ids))

    def reject(self, segment: Segment, reason: str) -> None:
        """The destination refused the batch for good: statuses FAILURE, segment kept aside."""
        log.error(
            "capture batch rejected", segment=segment.name, captures=len(segment.ids), reason=reason
        )
        self._finish(segment, CaptureStatus.FAILURE)
        with contextlib.suppress(FileNotFoundError):
            os.replace(segment.path, self.rejected_dir / segment.name)
        fsync_dir(self.segments_dir)
        fsync_dir(self.rejected_dir)
        self._prune_rejected()
        self._release(segment)
        self._count("rejected", len(segment.ids))

    def seal_all(self) -> None:
        """Seal the open segment now, from this thread (no writer running: edgectl)."""
        self._write_queued()
        self._seal_open()

    # -- introspection ------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        with self._cond:
            return {
                **self._counts,
                "spooled": self._records,
                "spooled_bytes": self._bytes,
                "sealed_batches": len(self._sealed),
            }

    # -- internals ----------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:  # re-entrant: callers may hold it already
            self._counts[key] = self._counts.get(key, 0) + n

    def _finish(self, segment: Segment, status: CaptureStatus) -> None:
        now = time.time()
        for capture_id in segment.ids:
            self._statuses.set(capture_id, status, at=now)
        self._journal.append([(i, status, now) for i in segment.ids], sync=True)

    def _retire(self, path: Path, seq: int | None) -> None:
        """Put a segment's file in the pool (``seq`` None: not reusable), else remove it."""
        with self._cond:
            room = seq is not None and len(self._pool) < _POOL_MAX and self._write_error is None
        if room and seq is not None:
            target = self.free_dir / f"free-{seq:012d}"
            try:
                size = os.stat(path).st_blocks * 512
                os.replace(path, target)
            except FileNotFoundError:
                return
            except OSError as exc:
                log.warning("capture segment not kept for reuse", error=str(exc))
            else:
                with self._cond:
                    self._pool.append((target, size))
                return
        path.unlink(missing_ok=True)

    def _drop_pool(self) -> None:
        """Give the pool's space back to the file system (a write ran out of it)."""
        with self._cond:
            pool, self._pool = self._pool, []
        for path, _ in pool:
            path.unlink(missing_ok=True)

    def _release(self, segment: Segment) -> None:
        with self._cond:
            if self._sealed and self._sealed[0] is segment:
                self._sealed.popleft()
            else:
                with contextlib.suppress(ValueError):
                    self._sealed.remove(segment)
            self._records -= len(segment.ids)
            self._bytes -= segment.nbytes
            self._cond.notify_all()

    def _recover(self) -> None:
        # a file moved from the pool to a segment just before a power loss may show
        # under both names where renames are not atomic: the segment's name wins
        in_use = {(st.st_dev, st.st_ino) for st in map(os.stat, self.segments_dir.iterdir())}
        for path in sorted(self.free_dir.iterdir()):
            match = FREE_RE.fullmatch(path.name)
            st = path.stat()
            if match is None or len(self._pool) >= _POOL_MAX or (st.st_dev, st.st_ino) in in_use:
                path.unlink(missing_ok=True)
                continue
            # a reused file holds lines of its earlier segments: numbers stay above them
            self._next_seq = max(self._next_seq, int(match.group(1)) + 1)
            self._pool.append((path, st.st_blocks * 512))
        found: list[tuple[int, Path, int | None]] = []
        for path in self.segments_dir.iterdir():
            match = SEGMENT_RE.fullmatch(path.name)
            if match is None:
                if path.name.startswith(".") or path.suffix == ".tmp":
                    path.unlink(missing_ok=True)  # an interrupted write of ours
                continue
            sealed = None if match.group(2) == "open" else int(match.group(3))
            found.append((int(match.group(1)), path, sealed))
        found.sort()
        for seq, path, sealed in found:
            self._next_seq = max(self._next_seq, seq + 1)
            raw = path.read_bytes()
            content = read_segment_bytes(raw, seq)
            segment = Segment(seq=seq, path=path, sealed_at=sealed, reusable=content.tagged)
            segment.ids = [e.capture_id for e in content.entries]
            if sealed is None:
                # torn tail from a crash (or a reused file's older lines): keep
                # only whole, valid lines, then seal
                if content.valid_end < len(raw):
                    with open(path, "r+b") as handle:
                        handle.truncate(content.valid_end)
                        os.fsync(handle.fileno())
                if not segment.ids:
                    path.unlink()
                    fsync_dir(self.segments_dir)
                    continue
                segment.nbytes = content.valid_end
                self._seal(segment)
            else:
                segment.nbytes = len(content.data)
            if content.corrupt_lines:
                log.warning(
                    "capture segment has corrupt records (skipped)",
                    segment=path.name,
                    corrupt=content.corrupt_lines,
                )
            for entry in content.entries:
                self._statuses.set(entry.capture_id, CaptureStatus.IN_PROGRESS)
            self._sealed.append(segment)
            self._records += len(segment.ids)
            self._bytes += segment.nbytes

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                self._writer_idle = True
                while not self._work_due():
                    self._cond.wait(self._next_wake())
                self._writer_idle = False
                if self._queue and not self._config.sync_ack and self._write_error is None:
                    # group commit: let captures arriving close together share one
                    # write and one fsync (fewer wake-ups and fsyncs beside Predict)
                    deadline = time.monotonic() + self._config.commit_window
                    while (
                        not self._closing
                        and not self._flush_requested
                        and len(self._queue) < self._config.max_unsynced // 2
                        and (left := deadline - time.monotonic()) > 0
                    ):
                        self._cond.wait(left)
                self._begin_commit()
                closing = self._closing
            failed = False
            try:
                self._write_queued(last_attempt=closing)
                with self._cond:
                    flush, self._flush_requested = self._flush_requested, False
                if flush or self._seal_due():
                    self._seal_open()
            except OSError as exc:  # the disk failed us: keep running, say so
                log.error("capture spool write failed", error=str(exc))
                failed = True
            finally:
                self._end_commit()
            if failed and not closing:
                with self._cond:  # no spinning on a lasting failure; a new capture wakes us
                    self._cond.wait(_RETRY_MIN_S)
            if closing:
                with self._cond:
                    for item in self._queue:  # none: the last write took them all
                        _answer(item, "the agent is stopping")
                    self._cond.notify_all()
                return

    def _work_due(self) -> bool:
        # durable: the callers commit; what is queued with no commit running belongs
        # to callers that stopped waiting (timed out), and the writer writes it
        sync_ack = self._config.sync_ack
        return bool(
            (
                self._queue
                and (not sync_ack or not self._committing)
                and time.monotonic() >= self._retry_at
            )
            or self._closing
            or self._flush_requested
            or self._dropped_ids
            or self._seal_due()
        )

    def _next_wake(self) -> float | None:
        waits = [w for w in (self._seal_wait(), self._retry_wait()) if w is not None]
        return min(waits) if waits else None

    def _retry_wait(self) -> float | None:
        if not self._queue or self._write_error is None:
            return None
        return max(0.0, self._retry_at - time.monotonic()) + 0.001

    def _seal_due(self) -> bool:
        seg = self._open
        if seg is None or not seg.ids:
            return False
        return (
            len(seg.ids) >= self._config.batch_size
            or time.monotonic() - seg.opened_mono >= self._config.push_period
        )

    def _seal_wait(self) -> float | None:
        seg = self._open
        if seg is None or not seg.ids:
            return None
        return max(0.0, seg.opened_mono + self._config.push_period - time.monotonic()) + 0.001

    def _write_queued(self, *, last_attempt: bool = False) -> None:
        """Append and fsync everything queued (one write and one fsync per segment touched).

        On a failure the captures not written are either refused to their
        waiting (durable) callers, or, acknowledged already, put back at the
        head of the queue to be retried; ``last_attempt`` (closing) gives up on
        those, as FAILURE.
        """
        with self._cond:
            waiting = self._write_error is not None and time.monotonic() < self._retry_at
            items: list[_Queued] = []
            if last_attempt or not waiting:  # else: acknowledged captures wait for their retry
                items = list(self._queue)
                self._queue.clear()
            dropped = list(self._dropped_ids)
            self._dropped_ids.clear()
        if dropped:
            now = time.time()
            try:
                self._journal.append([(i, CaptureStatus.FAILURE, now) for i in dropped], sync=False)
            except OSError as exc:  # the statuses are in memory; only a restart forgets them
                log.warning("refused captures not journaled", count=len(dropped), error=str(exc))
        pos = 0
        while pos < len(items):
            try:
                segment = self._ensure_open()
                room = max(1, self._config.batch_size - len(segment.ids))
                chunk = items[pos : pos + room]
                lines = [item.line for item in chunk]
                size = sum(map(len, lines)) + _TAG_LEN * len(lines)
                self._append(segment, lines)
            except OSError as exc:
                self._not_written(items[pos:], exc, give_up=last_attempt)
                raise
            pos += len(chunk)
            with self._cond:
                if not segment.ids:
                    segment.opened_mono = time.monotonic()
                    if self._writer_idle:  # a caller wrote: the writer's seal timer starts
                        self._cond.notify_all()
                segment.ids.extend(item.capture_id for item in chunk)
                segment.nbytes += size
                self._pending -= size
                for item in chunk:
                    _answer(item, "")
                self._write_error = None
                self._retry_delay = _RETRY_MIN_S
                self._counts["written"] = self._counts.get("written", 0) + len(chunk)
                self._counts["commits"] = self._counts.get("commits", 0) + 1
            if len(segment.ids) >= self._config.batch_size:
                try:
                    # open the next segment now when captures will need it: more
                    # in this round, or durable callers who will be right back
                    self._seal_open(open_next=pos < len(items) or self._config.sync_ack)
                except OSError as exc:
                    # what is written stays in the open segment; the rest waits
                    self._not_written(items[pos:], exc, give_up=last_attempt)
                    raise

    def _not_written(self, items: list[_Queued], exc: OSError, *, give_up: bool) -> None:
        if not items:
            return
        if self._config.sync_ack or give_up:
            self._fail(items, _write_failure(exc, waiting=0))
            return
        # acknowledged: they stay queued, IN_PROGRESS, until the disk takes them
        with self._cond:
            self._queue.extendleft(reversed(items))
            self._write_error = exc
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(_RETRY_MAX_S, self._retry_delay * 2)
            self._cond.notify_all()

    def _fail(self, items: list[_Queued], reason: str) -> None:
        """Queued captures that will never be on disk: FAILURE, capacity given back.

        In durable mode these were never acknowledged: their callers, still
        waiting, are answered ``reason`` at once.
        """
        if not items:
            return
        now = time.time()
        for item in items:
            self._statuses.set(item.capture_id, CaptureStatus.FAILURE, at=now)
        size = sum(_TAG_LEN + len(item.line) for item in items)
        with self._cond:
            self._records -= len(items)
            self._bytes -= size
            self._pending -= size
            for item in items:
                _answer(item, reason)
            self._count("write_failed", len(items))
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._journal.append(
                [(i.capture_id, CaptureStatus.FAILURE, now) for i in items], sync=False
            )
        if self._config.sync_ack:
            log.warning("captures refused: the spool cannot write", count=len(items), reason=reason)
        else:
            log.error("acknowledged captures lost", count=len(items), reason=reason)

    def _render(self, request: CaptureRequest) -> bytes:
        cfg = self._config
        built = build_record(
            request,
            device_id=cfg.device_id,
            fleet_name=cfg.fleet_name,
            embed_limit=cfg.embed_limit,
        )
        header: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "id": request.capture_id,
            "model": request.model_name,
            "fleet": cfg.fleet_name,
            "t": request.inference_time,
        }
        if built.side_files:
            header["side"] = {
                k: base64.b64encode(v).decode("ascii") for k, v in built.side_files.items()
            }
        record = json.dumps(built.record, separators=(",", ":"), ensure_ascii=True)
        return encode_line(header, record.encode("ascii"))

    def _ensure_open(self) -> Segment:
        if self._open is not None:
            return self._open
        segment, fd = self._new_segment()
        try:
            fsync_dir(self.segments_dir)
        except OSError:
            _discard_new(segment, fd)
            raise
        with self._cond:
            self._open = segment
            self._open_fd = fd
        return segment

    def _new_segment(self) -> tuple[Segment, int]:
        """A new, empty open segment: a pool file when there is one, else a new file.

        Not yet durable: its folder needs an fsync. A reused file keeps its old
        bytes; new lines overwrite them from the start, and their tags tell
        where the new segment ends.
        """
        seq = self._next_seq
        self._next_seq += 1
        path = self.segments_dir / segment_name(seq, None)
        with self._cond:
            reused = self._pool.pop()[0] if self._pool else None
        if reused is not None:
            try:
                os.replace(reused, path)
            except OSError as exc:
                log.warning("pooled capture segment file unusable", error=str(exc))
                reused.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return Segment(seq=seq, path=path, opened_mono=time.monotonic()), fd

    def _append(self, segment: Segment, lines: list[bytes]) -> None:
        fd = self._open_fd
        if fd is None:
            raise OSError(errno.EBADF, "no open capture segment")
        if not lines:
            return
        before = segment.nbytes
        tag = segment_tag(segment.seq)
        try:
            _pwritev_all(fd, [part for line in lines for part in (tag, line)], before)
            # the file's size and blocks, when it grew, are part of what
            # fdatasync flushes; a reused file's overwritten blocks need nothing else
            os.fdatasync(fd)
        except OSError as exc:
            # take back a partial write so later lines start clean
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            if exc.errno in _NO_SPACE:
                self._drop_pool()
            raise

    def _seal_open(self, *, open_next: bool = False) -> None:
        """Seal the open segment; with ``open_next``, open the next one in the same step.

        The next segment's file is created before the rename, so one fsync of
        the folder makes both durable (a folder fsync costs as much as a
        record's: captures waiting for the next commit should not pay two).
        """
        segment = self._open
        if segment is None:
            return
        if not segment.ids:
            return
        following = self._new_segment() if open_next else None
        try:
            self._seal(segment)  # renaming an open file is fine; on failure it stays open
        except OSError:
            if following is not None:
                _discard_new(*following)
            raise
        self._close_open_fd()
        with self._cond:
            self._open, self._open_fd = following if following is not None else (None, None)
            self._sealed.append(segment)
            self._cond.notify_all()
        for event in self.listeners:
            event.set()

    def _seal(self, segment: Segment) -> None:
        sealed_at = int(time.time())
        crash_point("seal-before-rename")
        target = self.segments_dir / segment_name(segment.seq, sealed_at)
        os.replace(segment.path, target)
        fsync_dir(self.segments_dir)
        segment.path = target
        segment.sealed_at = sealed_at

    def _close_open_fd(self) -> None:
        with self._cond:
            fd, self._open_fd = self._open_fd, None
        if fd is not None:
            os.close(fd)

    def _prune_rejected(self, keep: int = 100) -> None:
        rejected = sorted(self.rejected_dir.iterdir())
        for path in rejected[: max(0, len(rejected) - keep)]:
            path.unlink(missing_ok=True)


def _answer(item: _Queued, outcome: str) -> None:
    """Tell a queued capture's caller ``outcome``, and wake it if it waits."""
    item.outcome = outcome
    waiter, item.waiter = item.waiter, None
    if waiter is not None:
        waiter.release()


# -- the lock ------------------------------------------------------------------------------
def _discard_new(segment: Segment, fd: int) -> None:
    os.close(fd)
    with contextlib.suppress(OSError):
        segment.path.unlink()


def _write_failure(exc: OSError, *, waiting: int) -> str:
    held = f"; {waiting} acknowledged captures wait for space" if waiting else ""
    if exc.errno in _NO_SPACE:
        return f"spool disk full (a write failed: {exc.strerror or exc}{held})"
    return f"capture spool cannot write ({exc.strerror or exc}{held})"


def lock_spool(directory: Path) -> int:
    """flock ``directory/LOCK`` and write our pid in it; SpoolLockedError when held."""
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = spool_owner(directory)
        os.close(fd)
        raise SpoolLockedError(directory, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def spool_owner(directory: Path) -> int | None:
    """The pid written in the spool's lock file (meaningful only while it is locked)."""
    try:
        text = (directory / LOCK_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


__all__ = [
    "CRASH_POINT_ENV",
    "CaptureSpool",
    "Segment",
    "SegmentContent",
    "SpoolConfig",
    "SpoolEntry",
    "SpoolLockedError",
    "crash_point",
    "decode_line",
    "encode_line",
    "split_line",
    "lock_spool",
    "read_segment_bytes",
    "spool_config",
    "spool_owner",
]
