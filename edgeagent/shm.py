"""Read a client's SysV shared-memory segment, read-only and bounds-checked.

Clients (as the original device application did) create a segment, fill it,
make it read-only (mode 0400) and send its id. The agent attaches it with
``SHM_RDONLY``, checks ``offset + size`` against the segment's real size,
copies the bytes out and detaches at once, so a client may remove the segment
as soon as the call returns.
"""

from __future__ import annotations

import sysv_ipc

from edgeagent.errors import InvalidArgumentError


def segment_size(segment_id: int) -> int:
    """The real size of a segment, without keeping it attached."""
    shm = _attach(segment_id)
    try:
        return int(shm.size)
    finally:
        shm.detach()


def read_segment(segment_id: int, offset: int, size: int) -> bytes:
    """Copy ``size`` bytes at ``offset`` out of segment ``segment_id``."""
    shm = _attach(segment_id)
    try:
        _check_bounds(segment_id, int(shm.size), offset, size)
        data: bytes = shm.read(size, offset)
        return data
    finally:
        shm.detach()


def check_bounds(segment_id: int, offset: int, size: int) -> None:
    """InvalidArgumentError unless ``offset + size`` lies within the segment."""
    _check_bounds(segment_id, segment_size(segment_id), offset, size)


def _check_bounds(segment_id: int, real: int, offset: int, size: int) -> None:
    if offset < 0 or size < 0 or offset + size > real:
        raise InvalidArgumentError(
            f"shared memory segment {segment_id} has {real} bytes; "
            f"offset {offset} + size {size} is beyond it"
        )


def _attach(segment_id: int) -> sysv_ipc.SharedMemory:
    if segment_id < 0 or segment_id > 0x7FFFFFFF:
        raise InvalidArgumentError(f"invalid shared memory segment id {segment_id}")
    try:
        return sysv_ipc.attach(segment_id, None, sysv_ipc.SHM_RDONLY)
    except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError, ValueError, OSError) as exc:
        raise InvalidArgumentError(
            f"cannot attach shared memory segment {segment_id} read-only: {exc}"
        ) from exc
