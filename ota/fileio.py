"""Small file and HTTP helpers shared by the updater and its S3 download child.

Kept to the standard library on purpose: the child (``ota.s3fetch``) imports
this module and should pay for boto3 only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ota.errors import TransientError

CHUNK = 1024 * 1024


def content_range(text: str | None) -> tuple[int, int | None]:
    """``bytes 100-199/200`` -> (100, 200); TransientError when unusable."""
    try:
        if text is None:
            raise ValueError("missing")
        unit, rest = text.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
        return start, None if total == "*" else int(total)
    except ValueError as exc:
        raise TransientError(f"unusable Content-Range {text!r}") from exc


def hash_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    if length == 0:
        return digest
    with path.open("rb") as f:
        remaining = length
        while remaining and (chunk := f.read(min(CHUNK, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
