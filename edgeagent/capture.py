"""CaptureData: validated capture requests and the tracking of their ids.

The transport converts wire messages into ``CaptureRequest``; the
``CaptureService`` validates it against the model, rejects reused ids and
future timestamps, and hands accepted records to a sink. Statuses of ids are
kept for a bounded time and count.
"""

from __future__ import annotations

import enum
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from edgeagent.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    OutOfRangeError,
    ResourceExhaustedError,
)

CAPTURE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
FUTURE_TOLERANCE_S = 5.0


class CaptureStatus(enum.IntEnum):
    """Wire enum CaptureDataStatus."""

    FAILURE = 0
    SUCCESS = 1
    IN_PROGRESS = 2
    NOT_FOUND = 3


class AuxEncoding(enum.IntEnum):
    """Wire enum Encoding."""

    CSV = 0
    JSON = 1
    NONE = 2
    BASE64 = 3


@dataclass(frozen=True, slots=True)
class CapturedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class AuxiliaryData:
    name: str
    encoding: AuxEncoding
    data: bytes


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    model_name: str
    model_version: str
    capture_id: str
    inference_time: float  # epoch seconds
    input_tensors: tuple[CapturedTensor, ...]
    output_tensors: tuple[CapturedTensor, ...]
    inputs: tuple[AuxiliaryData, ...]
    outputs: tuple[AuxiliaryData, ...]


def validate_capture_id(capture_id: str) -> None:
    if not CAPTURE_ID_RE.fullmatch(capture_id):
        raise InvalidArgumentError(
            f"invalid capture id {capture_id[:64]!r}: 1-128 characters, letters, digits, "
            "'.', '_', ':' and '-'"
        )


def validate_timestamp(ts: float, *, now: float | None = None) -> None:
    current = time.time() if now is None else now
    if ts > current + FUTURE_TOLERANCE_S:
        raise OutOfRangeError(f"inference timestamp {ts:.3f} is in the future (now {current:.3f})")
    if ts < 0:
        raise InvalidArgumentError("inference timestamp is negative")


class StatusBook:
    """Capture id -> status, bounded by count and age, thread-safe."""

    def __init__(self, *, max_entries: int = 100_000, ttl_seconds: float = 3600.0) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[CaptureStatus, float]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_seconds

    def claim(self, capture_id: str) -> None:
        """Record a new id as IN_PROGRESS; ALREADY_EXISTS when it was seen before."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if capture_id in self._entries:
                raise AlreadyExistsError(f"capture id {capture_id!r} was already used")
            self._entries[capture_id] = (CaptureStatus.IN_PROGRESS, now)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def set(self, capture_id: str, status: CaptureStatus) -> None:
        with self._lock:
            self._entries[capture_id] = (status, time.monotonic())
            self._entries.move_to_end(capture_id)

    def get(self, capture_id: str) -> CaptureStatus:
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.get(capture_id)
        return CaptureStatus.NOT_FOUND if entry is None else entry[0]

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (status, stamp) = next(iter(self._entries.items()))
            if status is CaptureStatus.IN_PROGRESS or now - stamp < self._ttl:
                return
            del self._entries[key]


class CaptureSink:
    """Where accepted captures go. The base keeps them in a bounded queue."""

    def __init__(self, *, capacity: int) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._queue: list[CaptureRequest] = []

    def put(self, request: CaptureRequest) -> None:
        with self._lock:
            if len(self._queue) >= self._capacity:
                raise ResourceExhaustedError(
                    f"capture buffer full ({self._capacity} captures waiting)"
                )
            self._queue.append(request)

    def drain(self) -> list[CaptureRequest]:
        with self._lock:
            items, self._queue = self._queue, []
        return items

    def close(self) -> None:
        """Stop background work (none here)."""
