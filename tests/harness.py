"""Small helpers every process-level test harness shares."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest


def short_dir(prefix: str = "we-") -> Path:
    """A new directory with a short path (Unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def toml_text(values: Mapping[str, object]) -> str:
    """A flat TOML document (enough for the processes' settings files)."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str = "", *, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it is truthy; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@contextlib.contextmanager
def small_filesystem(size_mb: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_mb`` MB, unmounted (and its folder removed) afterwards.

    Mounting needs root; the test is skipped, with the reason, where it is impossible.
    """
    where = short_dir("wefull-")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (root needed): {done.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def read_log(path: Path) -> str:
    """Everything a child process wrote to its log so far ("" before the file exists)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among ``text``'s lines (a structlog JSON log), in order."""
    out = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out
