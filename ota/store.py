"""What the updater keeps on disk, each file written atomically (edgecommon.fsutil).

``<state_dir>/update.json``
    The record of the update in progress: the job, its state by *name*, the
    outcome to report, what served before. Schema-versioned. Written before
    each state's side effects; removed only after the final status was
    acknowledged (and its outcome added to the history).
``<state_dir>/history.json``
    The last outcomes, newest first (``edgectl ota status``), and the
    ``(job id, execution number)`` pairs already finished, so a duplicate
    notification never runs a job twice.
``<state_dir>/installed.json``
    The committed version per model and its predecessor (the rollback
    target), with their package directories.
``<state_dir>/downloads/``
    Partial and complete package archives of the update in progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecommon.fsutil import atomic_write_json

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
RECORD_NAME = "update.json"
HISTORY_NAME = "history.json"
INSTALLED_NAME = "installed.json"
PID_NAME = "edge-ota.pid"
DOWNLOADS = "downloads"


class Record(BaseModel):
    """The update in progress."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    job_id: str
    execution_number: int | None = None
    version_number: int | None = None  # expectedVersion of the next job update
    document: dict[str, Any] = Field(default_factory=dict)
    state: str
    outcome: str | None = None
    reason: str | None = None
    failed_step: str | None = None
    model_name: str | None = None
    from_version: str | None = None
    from_url: str | None = None
    to_version: str | None = None
    to_url: str | None = None
    downloaded_bytes: int = 0
    acknowledged: bool = True  # False: the cloud held another final status
    installs_new: bool = False  # the version directory did not exist before this update
    resumes: int = 0  # restarts that found this record unfinished
    transitions: int = 0  # state writes: a cap breaks loops that restarts cannot see
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @property
    def key(self) -> str:
        return job_key(self.job_id, self.execution_number)


def job_key(job_id: str, execution_number: int | None) -> str:
    return f"{job_id}#{execution_number if execution_number is not None else '-'}"


class Finished(BaseModel):
    """One finished update, as the history keeps it."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    execution_number: int | None = None
    outcome: str
    reason: str | None = None
    failed_step: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    acknowledged: bool = True  # False: the cloud held another final status (e.g. CANCELED)
    finished_at: float = Field(default_factory=time.time)


class Installed(BaseModel):
    """The committed version of one model, and the one before it."""

    model_config = ConfigDict(extra="ignore")

    version: str
    url: str
    previous_version: str | None = None
    previous_url: str | None = None


class Store:
    """The updater's files under ``state_dir``."""

    def __init__(self, state_dir: Path, *, history_size: int = 20, create: bool = True) -> None:
        self.root = state_dir
        self.history_size = history_size
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.downloads.mkdir(exist_ok=True, mode=0o750)

    @property
    def downloads(self) -> Path:
        return self.root / DOWNLOADS

    @property
    def pid_file(self) -> Path:
        return self.root / PID_NAME

    def download_path(self, record: Record) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in record.job_id)
        return self.downloads / f"{safe}-{record.execution_number or 0}.tar.gz"

    # -- the record ----------------------------------------------------------------
    def load_record(self, *, quiet: bool = False) -> Record | None:
        """The persisted record, or None.

        An unreadable one is set aside (renamed ``update.json.corrupt-<time>``)
        unless ``quiet`` (a reader that is not the updater).
        """
        path = self.root / RECORD_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            record = Record.model_validate(data)
        except (ValueError, TypeError) as exc:  # ValidationError is a ValueError
            if not quiet:
                log.error("update record unreadable; set aside", path=str(path), error=str(exc))
                self._set_aside(path)
            return None
        if record.schema_version != SCHEMA_VERSION:
            # another schema: its state names are not ours to trust
            log.warning("update record of another schema", schema=record.schema_version)
            record.state = f"unknown:{record.state}"
            record.schema_version = SCHEMA_VERSION  # ours from now on: resumes as a rollback
        return record

    def save_record(self, record: Record) -> None:
        record.updated_at = time.time()
        atomic_write_json(self.root / RECORD_NAME, record.model_dump(mode="json"), mode=0o640)

    def clear_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / RECORD_NAME).unlink()

    def _set_aside(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))

    # -- history ---------------------------------------------------------------------
    def history(self) -> list[Finished]:
        data = self._read_json(HISTORY_NAME, [])
        out = []
        for item in data if isinstance(data, list) else []:
            with contextlib.suppress(ValidationError):
                out.append(Finished.model_validate(item))
        return out

    def finished(self, job_id: str, execution_number: int | None) -> Finished | None:
        key = job_key(job_id, execution_number)
        for item in self.history():
            if job_key(item.job_id, item.execution_number) == key:
                return item
        return None

    def add_outcome(self, outcome: Finished) -> None:
        items = [outcome, *self.history()][: self.history_size]
        atomic_write_json(
            self.root / HISTORY_NAME, [i.model_dump(mode="json") for i in items], mode=0o640
        )

    # -- installed versions ----------------------------------------------------------------
    def installed(self, model: str) -> Installed | None:
        data = self._read_json(INSTALLED_NAME, {})
        item = data.get(model) if isinstance(data, dict) else None
        if item is None:
            return None
        try:
            return Installed.model_validate(item)
        except ValidationError:
            return None

    def set_installed(self, model: str, installed: Installed) -> None:
        data = self._read_json(INSTALLED_NAME, {})
        if not isinstance(data, dict):
            data = {}
        data[model] = installed.model_dump(mode="json")
        atomic_write_json(self.root / INSTALLED_NAME, data, mode=0o640)

    def _read_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.root / name).read_bytes())
        except FileNotFoundError:
            return default
        except ValueError as exc:
            log.error("state file unreadable", file=name, error=str(exc))
            return default
