"""CaptureData: validated capture requests, their records, and the status of every id.

The transport converts wire messages into ``CaptureRequest``; the service
validates it against the model, rejects reused ids and future timestamps, and
hands accepted requests to a ``CaptureSink`` (the on-disk spool,
``edgeagent.capture.spool``). ``build_record`` turns a request into exactly the
JSON record the original SageMaker Edge agent uploaded (AGENT_API.md,
CaptureData), so existing consumers keep working:

``eventVersion`` "0"; ``eventMetadata`` {deviceFleetName, deviceId, eventId,
inferenceTime "YYYY-MM-DDTHH:MM:SS" (UTC), modelName, modelVersion};
``deviceFleetInputs``/``deviceFleetOutputs``: [{name, data (base64 of the raw
little-endian bytes), observedContentType "Tensor[FLOAT32; 1, 6, 10, 10]"}];
``deviceFleetAuxiliaryInputs``/``Outputs``: [{name, encoding, mode,
observedContentType, and ``data`` (base64 of the bytes the client sent) or,
when that base64 text would be longer than the embed limit, ``data-ref`` (the
URL of a side file holding the raw bytes)}].

Statuses: ``StatusBook`` answers GetCaptureDataStatus. Ids still in the spool
are IN_PROGRESS and never expire; finished ids (SUCCESS, FAILURE) are kept for
a bounded time and count.
"""

from __future__ import annotations

import base64
import enum
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from edgeagent.errors import AlreadyExistsError, InvalidArgumentError, OutOfRangeError

CAPTURE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
FUTURE_TOLERANCE_S = 5.0
EVENT_VERSION = "0"

# what an auxiliary payload is, by its wire Encoding (the wire message has no
# content type of its own)
AUX_CONTENT_TYPES: dict[str, str] = {
    "CSV": "text/csv",
    "JSON": "application/json",
    "NONE": "application/octet-stream",
    "BASE64": "application/base64",
}
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._=-]")


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
    dtype: str  # NumPy dtype name, e.g. "float32"
    shape: tuple[int, ...]
    data: bytes  # raw little-endian bytes, copied (never a shared-memory view)


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

    def payload_bytes(self) -> int:
        """Bytes of tensor and auxiliary payload (before base64)."""
        return sum(len(t.data) for t in (*self.input_tensors, *self.output_tensors)) + sum(
            len(a.data) for a in (*self.inputs, *self.outputs)
        )


class CaptureSink(Protocol):
    """Where accepted captures go (``edgeagent.capture.spool.CaptureSpool``)."""

    def put(self, request: CaptureRequest) -> None:
        """Accept a capture, or raise ResourceExhaustedError (the sink is full)."""

    def close(self) -> None:
        """Stop background work; what was accepted stays where it is."""


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


# -- the record --------------------------------------------------------------------
def tensor_content_type(dtype: str, shape: tuple[int, ...]) -> str:
    """``Tensor[FLOAT32; 1, 6, 10, 10]``, as the original agent wrote it."""
    return f"Tensor[{dtype.upper()}; {', '.join(str(d) for d in shape)}]"


def inference_time_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def path_segment(text: str) -> str:
    """``text`` made safe as one segment of an object key or a file name."""
    cleaned = _UNSAFE_SEGMENT.sub("_", text).strip(".") or "_"
    return cleaned[:128]


def hour_path(ts: float) -> str:
    """``YYYY/MM/DD/HH`` (UTC), the time partition of object keys."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y/%m/%d/%H")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class BuiltRecord:
    """A record and the auxiliary payloads that go to side files.

    In ``record`` an auxiliary entry that was too big to embed carries
    ``data-ref`` = the side file's key relative to the destination's prefix;
    the uploader replaces it with the destination's URL for that key.
    """

    record: dict[str, Any]
    side_files: dict[str, bytes] = field(default_factory=dict)


def build_record(
    request: CaptureRequest, *, device_id: str, fleet_name: str, embed_limit: int
) -> BuiltRecord:
    """The original agent's JSON record for one capture."""
    side: dict[str, bytes] = {}

    def aux(items: tuple[AuxiliaryData, ...], mode: str) -> list[dict[str, Any]]:
        entries = []
        for index, item in enumerate(items):
            entry: dict[str, Any] = {
                "name": item.name,
                "encoding": item.encoding.name,
                "mode": mode,
                "observedContentType": AUX_CONTENT_TYPES[item.encoding.name],
            }
            if 4 * ((len(item.data) + 2) // 3) > embed_limit:
                key = "/".join(
                    (
                        path_segment(fleet_name),
                        path_segment(request.model_name),
                        hour_path(request.inference_time),
                        "auxiliary",
                        path_segment(request.capture_id),
                        f"{mode.lower()}-{index}-{path_segment(item.name or 'data')}",
                    )
                )
                side[key] = item.data
                entry["data-ref"] = key
            else:
                entry["data"] = _b64(item.data)
            entries.append(entry)
        return entries

    record: dict[str, Any] = {
        "eventVersion": EVENT_VERSION,
        "eventMetadata": {
            "deviceFleetName": fleet_name,
            "deviceId": device_id,
            "eventId": request.capture_id,
            "inferenceTime": inference_time_text(request.inference_time),
            "modelName": request.model_name,
            "modelVersion": request.model_version,
        },
        "deviceFleetInputs": [
            {
                "name": t.name,
                "data": _b64(t.data),
                "observedContentType": tensor_content_type(t.dtype, t.shape),
            }
            for t in request.input_tensors
        ],
        "deviceFleetOutputs": [
            {
                "name": t.name,
                "data": _b64(t.data),
                "observedContentType": tensor_content_type(t.dtype, t.shape),
            }
            for t in request.output_tensors
        ],
        "deviceFleetAuxiliaryInputs": aux(request.inputs, "Input"),
        "deviceFleetAuxiliaryOutputs": aux(request.outputs, "Output"),
    }
    return BuiltRecord(record=record, side_files=side)


# -- statuses --------------------------------------------------------------------------
class StatusBook:
    """Capture id -> status, thread-safe.

    IN_PROGRESS ids (in the spool, bounded by the spool's capacity) are kept
    until they finish. Finished ids are kept ``ttl_seconds`` after they
    finished and at most ``max_entries`` of them, oldest evicted first. Times
    are wall-clock epoch seconds, so statuses restored after a restart keep
    their age.
    """

    def __init__(
        self, *, max_entries: int = 100_000, ttl_seconds: float = 3600.0, clock: Any = time.time
    ) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}
        self._finished: OrderedDict[str, tuple[CaptureStatus, float]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_seconds
        self._clock = clock

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    def claim(self, capture_id: str) -> None:
        """Record a new id as IN_PROGRESS; ALREADY_EXISTS when it was seen before."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            if capture_id in self._pending or capture_id in self._finished:
                raise AlreadyExistsError(f"capture id {capture_id!r} was already used")
            self._pending[capture_id] = now

    def set(self, capture_id: str, status: CaptureStatus, *, at: float | None = None) -> None:
        """Move an id to ``status`` (IN_PROGRESS, SUCCESS or FAILURE)."""
        stamp = self._clock() if at is None else at
        with self._lock:
            if status is CaptureStatus.IN_PROGRESS:
                self._finished.pop(capture_id, None)
                self._pending[capture_id] = stamp
                return
            self._pending.pop(capture_id, None)
            self._finished.pop(capture_id, None)
            self._finished[capture_id] = (status, stamp)
            while len(self._finished) > self._max:
                self._finished.popitem(last=False)

    def restore(self, capture_id: str, status: CaptureStatus, at: float) -> None:
        """A status recovered after a restart (ignored when already too old)."""
        if status is not CaptureStatus.IN_PROGRESS and self._clock() - at >= self._ttl:
            return
        self.set(capture_id, status, at=at)

    def get(self, capture_id: str) -> CaptureStatus:
        with self._lock:
            self._expire(self._clock())
            if capture_id in self._pending:
                return CaptureStatus.IN_PROGRESS
            entry = self._finished.get(capture_id)
        return CaptureStatus.NOT_FOUND if entry is None else entry[0]

    def finished(self) -> list[tuple[str, CaptureStatus, float]]:
        """The finished ids still remembered, oldest first."""
        with self._lock:
            self._expire(self._clock())
            return [(cid, status, at) for cid, (status, at) in self._finished.items()]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {"IN_PROGRESS": len(self._pending)}
            for status, _ in self._finished.values():
                out[status.name] = out.get(status.name, 0) + 1
        return out

    def _expire(self, now: float) -> None:
        # ordered by the time each id finished (set() re-inserts at the end)
        while self._finished:
            key, (_, stamp) = next(iter(self._finished.items()))
            if now - stamp < self._ttl:
                return
            del self._finished[key]


__all__ = [
    "AUX_CONTENT_TYPES",
    "AuxEncoding",
    "AuxiliaryData",
    "BuiltRecord",
    "CaptureRequest",
    "CaptureSink",
    "CaptureStatus",
    "CapturedTensor",
    "StatusBook",
    "build_record",
    "hour_path",
    "inference_time_text",
    "path_segment",
    "tensor_content_type",
    "validate_capture_id",
    "validate_timestamp",
]
