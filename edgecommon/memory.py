"""glibc malloc tuning for long-running processes with bursty large buffers.

Without it, a process that once handled a large request keeps the memory:
glibc raises its mmap threshold after large blocks are freed (so later large
blocks come from the heap and stay), and each thread gets its own arena. A
fixed mmap threshold returns large buffers to the kernel on free, and fewer
arenas keep fragmentation down. Both are no-ops where glibc is absent.

The threshold is 1 MiB, not lower: every block above it is a fresh mapping
whose pages fault in on first touch, which on a virtualised 2-core device
costs microseconds per 4 KiB page. At 256 KiB a batch-256 Predict (614 KB
each way, copied a few times) spent more time faulting than moving bytes;
at 1 MiB it is 2-3% faster end to end and the agent's high-water mark after
maximum-batch requests is unchanged (measured with bench/agent_latency.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.mallopt  # noqa: B018 - probe: glibc only
        lib.malloc_trim  # noqa: B018 - probe: glibc only
    except (OSError, AttributeError):
        return None
    return lib


def tune_malloc(*, arena_max: int = 2, mmap_threshold: int = 1024 * 1024) -> bool:
    """Apply the settings; call once at start, before threads. True if applied."""
    lib = _libc()
    if lib is None:
        return False
    ok = lib.mallopt(M_ARENA_MAX, arena_max) == 1
    ok &= lib.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok &= lib.mallopt(M_TRIM_THRESHOLD, 4 * mmap_threshold) == 1
    return bool(ok)


def trim() -> None:
    """Give free heap memory back to the kernel."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
