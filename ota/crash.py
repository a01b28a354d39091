"""Named crash points for the crash tests (RELIABILITY.md, "Crash testing that works").

``WINDEDGE_OTA_CRASH_AT=<point>`` makes the process SIGKILL itself when it
reaches ``<point>``: ``state:<name>`` right after the record of a state was
written (before its side effects), or a point between the side effects inside
a step (``install:extracted``, ``activate:loaded``, ...). Unset, it costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

import structlog

CRASH_AT_ENV = "WINDEDGE_OTA_CRASH_AT"

log = structlog.get_logger(__name__)


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == name:
        log.warning("crash point reached: killing myself", point=name)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
