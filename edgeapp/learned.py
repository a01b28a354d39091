"""The checks' learned baselines kept in a file, so a restart does not learn them again.

The relation and noise checks learn each turbine's own lines and levels over
its first minutes. Learned only in memory, a restart of the daemon (a
reboot, an upgrade, a crash) would leave every turbine unwatched by them for
those minutes, and worse, a turbine already faulty then would have its fault
learned as its normal. With ``learned_file`` set, edge-app writes what they
learned there every ``learned_save_period_s`` when it changed, and on
shutdown; at start it reads it back, and each turbine takes up its baseline
when it next sends samples.

The file is JSON, written atomically (a temporary file, fsync, rename), one
section per check with its layout (the meaning of each value) and a row of
numbers per turbine (null: a part still learning)::

    {"format": 1, "checks": {"relations": {"layout": [...], "turbines": {"wt-1": [...]}}}}

A file that cannot be used (not JSON, another format, values that are not
finite numbers) is reported, renamed to ``<name>.bad`` for inspection and
left out: the checks learn again. A section whose layout differs (another
version of the check) is left out the same way, without renaming the file.
To have a turbine learn again (a generator replaced, a rotor re-bladed),
stop edge-app, remove its entry or the file, start it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from edgeapp.checks import LearningCheck, Snapshot
from edgecommon.fsutil import atomic_write_bytes

__all__ = ["FORMAT", "LearnedFile"]

log = structlog.get_logger("edgeapp.learned")

FORMAT = 1
_MAX_BYTES = 256 * 1024 * 1024


class LearnedFileError(ValueError):
    """The file cannot be used."""


class LearnedFile:
    """Reads the checks' baselines at start and writes them when they changed."""

    def __init__(self, path: Path, checks: Sequence[LearningCheck]) -> None:
        self.path = path
        self.checks = list(checks)
        self._versions: tuple[int, ...] | None = None  # the checks' versions last taken
        self.saves = 0

    def load(self) -> int:
        """Give the checks the baselines of the file; how many turbines' were restored.

        A missing file is a first start (0). A file that cannot be used is
        renamed to ``<name>.bad`` and logged; the checks then learn again.
        """
        try:
            sections = self._read()
        except FileNotFoundError:
            log.info("no learned baselines yet", path=str(self.path))
            return 0
        except (OSError, LearnedFileError) as exc:
            bad = self.path.with_name(self.path.name + ".bad")
            try:
                os.replace(self.path, bad)
            except OSError as moved:
                log.error("learned baselines unusable", path=str(self.path), error=str(exc),
                          moved_to=None, move_error=str(moved))  # fmt: skip
            else:
                log.error("learned baselines unusable; the checks learn again",
                          path=str(self.path), error=str(exc), moved_to=str(bad))  # fmt: skip
            return 0
        restored = 0
        for check in self.checks:
            section = sections.get(check.name)
            if section is None:
                continue
            if tuple(section["layout"]) != check.layout:
                log.warning("learned baselines of another layout left out", check=check.name,
                            layout=section["layout"], expected=list(check.layout))  # fmt: skip
                continue
            check.restore(section["turbines"])
            restored += len(section["turbines"])
        self._versions = self._current()
        log.info("learned baselines restored", path=str(self.path), baselines=restored)
        return restored

    def save(self) -> bool:
        """Write the baselines if they changed since the last write; whether it wrote."""
        content = self.snapshot()
        if content is None:
            return False
        try:
            self.write(content)
        except BaseException:
            self.invalidate()
            raise
        return True

    def snapshot(self) -> list[tuple[LearningCheck, Snapshot]] | None:
        """The baselines to write, None when the checks have not changed since last taken.

        Free when nothing changed (the checks' version counters); otherwise a
        copy of their arrays, which the caller may write on another thread
        (``write`` builds the rows and the JSON).
        """
        versions = self._current()
        if versions == self._versions:
            return None
        self._versions = versions
        return [(check, check.baselines()) for check in self.checks]

    def write(self, taken: list[tuple[LearningCheck, Snapshot]]) -> None:
        """Write what ``snapshot`` took, atomically (a temporary file, fsync, rename)."""
        content = {
            "format": FORMAT,
            "checks": {
                check.name: {"layout": list(check.layout), "turbines": snapshot.rows()}
                for check, snapshot in taken
            },
        }
        data = json.dumps(content, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, data, mode=0o640)
        self.saves += 1

    def invalidate(self) -> None:
        """A write failed: the next ``snapshot`` takes the baselines again."""
        self._versions = None

    def _current(self) -> tuple[int, ...]:
        return tuple(check.version for check in self.checks)

    def _read(self) -> Mapping[str, Any]:
        with self.path.open("rb") as handle:
            data = handle.read(_MAX_BYTES + 1)
        if len(data) > _MAX_BYTES:
            raise LearnedFileError(f"larger than {_MAX_BYTES} bytes")
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LearnedFileError(f"not JSON: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise LearnedFileError(f"not a learned-baselines file of format {FORMAT}")
        checks = document.get("checks")
        if not isinstance(checks, dict):
            raise LearnedFileError("'checks' must be an object")
        for name, section in checks.items():
            _check_section(name, section)
        return checks


def _check_section(name: str, section: object) -> None:
    if not isinstance(section, dict):
        raise LearnedFileError(f"{name}: must be an object")
    layout, turbines = section.get("layout"), section.get("turbines")
    if not isinstance(layout, list) or not all(isinstance(x, str) for x in layout):
        raise LearnedFileError(f"{name}: 'layout' must be a list of names")
    if not isinstance(turbines, dict):
        raise LearnedFileError(f"{name}: 'turbines' must be an object")
    for turbine, row in turbines.items():
        if not isinstance(row, list) or len(row) != len(layout):
            raise LearnedFileError(f"{name}: {turbine!r} must be {len(layout)} values")
        for value in row:
            ok = value is None or (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if not ok:
                raise LearnedFileError(f"{name}: {turbine!r} has {value!r}, not a finite number")
