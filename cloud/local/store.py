"""The Jobs emulator's durable state: one sqlite file, JSON documents by key.

Three tables (things, jobs, executions) each hold one JSON object per key. The
engine keeps its working set in memory and writes every change through in one
transaction per operation, so jobs and executions survive a restart of the
emulator (or a kill: sqlite's journal makes each transaction all or nothing).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS things (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
  job_id TEXT NOT NULL, thing_name TEXT NOT NULL, data TEXT NOT NULL,
  PRIMARY KEY (job_id, thing_name)
);
"""


class Store:
    """Thread-safe write-through persistence (callers hold the engine lock anyway)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- writes (inside transaction()) -------------------------------------------
    def put_thing(self, name: str, data: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO things VALUES (?, ?)", (name, json.dumps(data, sort_keys=True))
        )

    def put_job(self, job_id: str, seq: int, data: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)",
            (job_id, seq, json.dumps(data, sort_keys=True)),
        )

    def delete_job(self, job_id: str) -> None:
        self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        self._db.execute("DELETE FROM executions WHERE job_id = ?", (job_id,))

    def put_execution(self, job_id: str, thing_name: str, data: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO executions VALUES (?, ?, ?)",
            (job_id, thing_name, json.dumps(data, sort_keys=True)),
        )

    # -- reads (at start) ------------------------------------------------------------
    def things(self) -> Iterable[tuple[str, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT name, data FROM things ORDER BY name").fetchall()
        return [(name, json.loads(data)) for name, data in rows]

    def jobs(self) -> Iterable[tuple[str, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT job_id, data FROM jobs ORDER BY seq").fetchall()
        return [(job_id, json.loads(data)) for job_id, data in rows]

    def executions(self) -> Iterable[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM executions").fetchall()
        return [json.loads(data) for (data,) in rows]
