"""Captured records back into NumPy arrays: what a data scientist needs first.

A captured batch is JSON Lines, one record per capture (see
``edgeagent.capture``). Tensors are base64 of raw little-endian bytes, typed
and shaped by ``observedContentType`` (``Tensor[FLOAT32; 1, 6, 10, 10]``),
which consumers parse with a regular expression; this module does the same::

    from edgeagent.capture.reader import read_records, stack
    records = read_records(Path("batch.jsonl"))
    x = stack(records, "input")    # [N, 6, 10, 10] float32, every input tensor 0
    y = stack(records, "output")

It works on our records and on the original SageMaker Edge agent's alike, and
needs nothing but NumPy (it imports no other part of the agent).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

CONTENT_TYPE_RE = re.compile(r"Tensor\[(\w+); ([\d, ]*)\]")

# the wire DataType names as they appear in observedContentType
DTYPES: dict[str, str] = {
    "UINT8": "uint8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FLOAT16": "float16",
    "FLOAT32": "float32",
    "FLOAT64": "float64",
}

Resolver = Callable[[str], bytes]


class CaptureFormatError(ValueError):
    """A record that is not a capture record (the message says which part)."""


def parse_content_type(text: str) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """``Tensor[FLOAT32; 1, 6, 10, 10]`` -> (little-endian float32, (1, 6, 10, 10))."""
    match = CONTENT_TYPE_RE.fullmatch(text.strip())
    if match is None:
        raise CaptureFormatError(f"not a tensor content type: {text!r}")
    name = match.group(1).upper()
    if name not in DTYPES:
        raise CaptureFormatError(f"unknown tensor data type {name!r} in {text!r}")
    dims = [d.strip() for d in match.group(2).split(",") if d.strip()]
    return np.dtype(DTYPES[name]).newbyteorder("<"), tuple(int(d) for d in dims)


def decode_tensor(entry: dict[str, Any]) -> NDArray[Any]:
    """One ``deviceFleetInputs``/``Outputs`` entry as an array of its dtype and shape."""
    dtype, shape = parse_content_type(str(entry.get("observedContentType", "")))
    try:
        raw = base64.b64decode(entry["data"], validate=True)
    except (KeyError, ValueError) as exc:
        raise CaptureFormatError(f"tensor {entry.get('name')!r}: bad base64 data") from exc
    array = np.frombuffer(raw, dtype=dtype)
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise CaptureFormatError(
            f"tensor {entry.get('name')!r}: {len(raw)} bytes do not make {dtype} {list(shape)}"
        ) from exc


@dataclass(frozen=True, slots=True)
class AuxiliaryPayload:
    name: str
    encoding: str
    mode: str
    content_type: str
    data: bytes | None  # None: a data-ref that could not be resolved here
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class CapturedRecord:
    event_id: str
    model_name: str
    model_version: str
    device_id: str
    fleet_name: str
    inference_time: datetime
    inputs: dict[str, NDArray[Any]]
    outputs: dict[str, NDArray[Any]]
    auxiliary_inputs: list[AuxiliaryPayload] = field(default_factory=list)
    auxiliary_outputs: list[AuxiliaryPayload] = field(default_factory=list)


def read_file_ref(ref: str) -> bytes:
    """Resolve a ``file://`` data-ref (the Disk destination's)."""
    parsed = urllib.parse.urlsplit(ref)
    if parsed.scheme != "file":
        raise CaptureFormatError(f"cannot resolve {ref!r} here (only file:// URLs)")
    return Path(urllib.request.url2pathname(parsed.path)).read_bytes()


def _aux(entries: Iterable[dict[str, Any]], resolve: Resolver | None) -> list[AuxiliaryPayload]:
    out = []
    for entry in entries:
        ref = entry.get("data-ref")
        data: bytes | None
        if ref is not None:
            try:
                data = (resolve or read_file_ref)(str(ref))
            except (OSError, CaptureFormatError):
                data = None
        else:
            data = base64.b64decode(entry.get("data", ""))
        out.append(
            AuxiliaryPayload(
                name=str(entry.get("name", "")),
                encoding=str(entry.get("encoding", "")),
                mode=str(entry.get("mode", "")),
                content_type=str(entry.get("observedContentType", "")),
                data=data,
                ref=None if ref is None else str(ref),
            )
        )
    return out


def parse_record(record: dict[str, Any], *, resolve: Resolver | None = None) -> CapturedRecord:
    try:
        meta = record["eventMetadata"]
        when = datetime.strptime(meta["inferenceTime"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        return CapturedRecord(
            event_id=str(meta["eventId"]),
            model_name=str(meta["modelName"]),
            model_version=str(meta.get("modelVersion", "")),
            device_id=str(meta.get("deviceId", "")),
            fleet_name=str(meta.get("deviceFleetName", "")),
            inference_time=when,
            inputs={str(t["name"]): decode_tensor(t) for t in record.get("deviceFleetInputs", [])},
            outputs={
                str(t["name"]): decode_tensor(t) for t in record.get("deviceFleetOutputs", [])
            },
            auxiliary_inputs=_aux(record.get("deviceFleetAuxiliaryInputs", []), resolve),
            auxiliary_outputs=_aux(record.get("deviceFleetAuxiliaryOutputs", []), resolve),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CaptureFormatError):
            raise
        raise CaptureFormatError(f"not a capture record: {exc}") from exc


def read_records(
    source: Path | bytes | str | Iterable[str], *, resolve: Resolver | None = None
) -> list[CapturedRecord]:
    """Every record of a JSON Lines batch (a file, its bytes or text, or its lines)."""
    if isinstance(source, Path):
        lines: Iterable[str] = source.read_text(encoding="utf-8").splitlines()
    elif isinstance(source, bytes):
        lines = source.decode("utf-8").splitlines()
    elif isinstance(source, str):
        lines = source.splitlines()
    else:
        lines = source
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise CaptureFormatError(f"line {number}: not JSON ({exc})") from exc
        try:
            records.append(parse_record(value, resolve=resolve))
        except CaptureFormatError as exc:
            raise CaptureFormatError(f"line {number}: {exc}") from exc
    return records


def stack(records: Iterable[CapturedRecord], kind: str, index: int = 0) -> NDArray[Any]:
    """Tensor ``index`` of every record's inputs (``kind="input"``) or outputs, concatenated
    along the batch axis (records of batch 1 give [N, ...])."""
    if kind not in ("input", "output"):
        raise ValueError("kind is 'input' or 'output'")
    arrays = [list((r.inputs if kind == "input" else r.outputs).values())[index] for r in records]
    if not arrays:
        raise ValueError("no records")
    return np.concatenate(arrays, axis=0)


__all__ = [
    "CONTENT_TYPE_RE",
    "AuxiliaryPayload",
    "CaptureFormatError",
    "CapturedRecord",
    "decode_tensor",
    "parse_content_type",
    "parse_record",
    "read_file_ref",
    "read_records",
    "stack",
]
