"""The replay source: a recorded CSV or JSON-lines file, at recorded or accelerated speed.

For offline runs: the same ingestor, buffers, model and verdicts as the live
daemon, fed from a file instead of the broker. The format follows the file
name: ``.csv`` or ``.jsonl``/``.ndjson``/``.json``, optionally ``.gz``.

CSV: a header row naming the columns ``qx, qy, qz, qw, wind_speed_rps`` (or
``wind speed rps``), ``rps, voltage``; optional ``ts`` (epoch ms) and a
turbine column (``turbine``, ``turbine_id`` or ``turbineId``; without one
every row belongs to turbine ``replay``). Other columns are ignored, so a
recording with more sensors replays as it is.

JSON lines: one object per line, a sample as on the MQTT topic plus the
turbine's id under ``turbine`` (or ``turbine_id``): ``{"turbine": "t1",
"ts": ..., "qx": ..., ...}``, or ``{"turbine": "t1", "samples": [...]}``.

Timing: a record with a ``ts`` is due at its ts; without, a turbine's k-th
sample is due at ``k / replay_rate_hz``. ``replay_speed`` divides the
intervals (1 = as recorded, 10 = ten times faster, 0 = no waiting). When the
file ends the source either starts it again (``replay_loop``) or reports that
it finished, and the daemon stops after a last tick.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import structlog

from edgeapp.errors import ReplayError
from edgeapp.features import RAW_FIELDS
from edgeapp.ingest import ALIAS, DropReason, Ingestor

__all__ = ["ReplaySource", "replay_format"]

log = structlog.get_logger("edgeapp.replay")

TURBINE_COLUMNS = ("turbine", "turbine_id", "turbineId")
DEFAULT_TURBINE = "replay"
_MIN_SLEEP_S = 0.002  # shorter waits are batched into the next one
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")

FinishedCallback = Callable[[str | None], None]
"""Called once when the file ended (no loop) with None, or with the error that ended it."""


def replay_format(path: Path) -> str:
    """``"csv"`` or ``"jsonl"``, from the file name; ReplayError for anything else."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(_JSON_SUFFIXES):
        return "jsonl"
    raise ReplayError(f"{path}: unknown replay format (expected .csv or .jsonl, maybe .gz)")


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _csv_columns(header: list[str], path: Path) -> tuple[dict[str, int], int | None, int | None]:
    """Field -> column index, and the turbine and ts columns (or None)."""
    at = {name.strip(): i for i, name in enumerate(header)}
    fields: dict[str, int] = {}
    missing = []
    for name in RAW_FIELDS:
        if name in at:
            fields[name] = at[name]
        elif name == "wind_speed_rps" and ALIAS in at:
            fields[name] = at[ALIAS]
        else:
            missing.append(name)
    if missing:
        raise ReplayError(f"{path}: CSV header lacks {', '.join(missing)}")
    turbine = next((at[c] for c in TURBINE_COLUMNS if c in at), None)
    return fields, turbine, at.get("ts")


def _number(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell  # the ingestor drops it as wrong_type


class ReplaySource:
    """Feeds a recorded file to the ingestor on its own thread; implements ``Source``."""

    name = "replay"

    def __init__(
        self,
        *,
        path: Path,
        ingestor: Ingestor,
        speed: float = 1.0,
        rate_hz: float = 20.0,
        loop: bool = False,
        on_finished: FinishedCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.format = replay_format(path)
        self.ingestor = ingestor
        self.speed = speed
        self.rate_hz = rate_hz
        self.loop = loop
        self.on_finished = on_finished
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self.records = 0
        self.passes = 0
        self._check_readable()

    def _check_readable(self) -> None:
        """Fail at start, not later on the thread, for a missing file or bad header."""
        try:
            with _open_text(self.path) as handle:
                if self.format == "csv":
                    header = next(csv.reader(handle), None)
                    if header is None:
                        raise ReplayError(f"{self.path}: empty CSV file")
                    _csv_columns(header, self.path)
        except OSError as exc:
            raise ReplayError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    # ---- Source

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeapp-replay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return not self._failed

    # ---- the thread

    def _run(self) -> None:
        error: str | None = None
        try:
            while not self._stop.is_set():
                replayed = self._replay_once()
                self.passes += 1
                if not self.loop or not replayed:
                    break
        except (OSError, UnicodeDecodeError, csv.Error, EOFError, ReplayError) as exc:
            self._failed = True
            error = f"{type(exc).__name__}: {exc}"
            log.error("replay failed", path=str(self.path), error=error, records=self.records)
        if self._stop.is_set():
            return
        log.info("replay finished", path=str(self.path), records=self.records, error=error)
        if self.on_finished is not None:
            self.on_finished(error)

    def _replay_once(self) -> int:
        """One pass over the file; returns how many records it held."""
        started = self._clock()
        base: float | None = None
        count = 0
        counters: dict[str, int] = {}
        with _open_text(self.path) as handle:
            for turbine, record, ts_ms in self._records(handle):
                if self._stop.is_set():
                    break
                if ts_ms is not None:
                    due = ts_ms / 1000.0
                else:
                    k = counters.get(turbine, 0)
                    samples = record.get("samples")
                    counters[turbine] = k + (len(samples) if isinstance(samples, list) else 1)
                    due = k / self.rate_hz
                if base is None:
                    base = due
                if self.speed > 0:
                    delay = started + (due - base) / self.speed - self._clock()
                    if delay > _MIN_SLEEP_S and self._stop.wait(delay):
                        break
                count += 1
                self.records += 1
                self.ingestor.ingest_object(turbine, record, self._clock())
        return count

    def _records(self, handle: TextIO) -> Iterator[tuple[str, dict[str, Any], float | None]]:
        if self.format == "csv":
            yield from self._csv_records(handle)
        else:
            yield from self._json_records(handle)

    def _csv_records(self, handle: TextIO) -> Iterator[tuple[str, dict[str, Any], float | None]]:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        fields, turbine_at, ts_at = _csv_columns(header, self.path)
        for row in reader:
            if not row:
                continue
            try:
                record: dict[str, Any] = {name: _number(row[i]) for name, i in fields.items()}
                turbine = row[turbine_at].strip() if turbine_at is not None else DEFAULT_TURBINE
                ts_cell = row[ts_at].strip() if ts_at is not None else ""
            except IndexError:
                self.ingestor.drops.add(DropReason.MISSING_FIELD, str(self.path), self._clock())
                continue
            ts_ms = _finite(_number(ts_cell)) if ts_cell else None
            if ts_ms is not None:
                record["ts"] = ts_ms
            yield turbine, record, ts_ms

    def _json_records(self, handle: TextIO) -> Iterator[tuple[str, dict[str, Any], float | None]]:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                self.ingestor.drops.add(DropReason.NOT_JSON, str(self.path), self._clock())
                continue
            if not isinstance(record, dict):
                self.ingestor.drops.add(DropReason.NOT_OBJECT, str(self.path), self._clock())
                continue
            turbine = next((record.pop(c) for c in TURBINE_COLUMNS if c in record), DEFAULT_TURBINE)
            if not isinstance(turbine, str):
                self.ingestor.drops.add(DropReason.BAD_TOPIC, str(self.path), self._clock())
                continue
            yield turbine, record, _record_ts(record)


def _finite(value: float | str) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def _record_ts(record: dict[str, Any]) -> float | None:
    """The due time of a JSON record: its ts, or its last sample's."""
    ts = record.get("ts")
    samples = record.get("samples")
    if ts is None and isinstance(samples, list) and samples and isinstance(samples[-1], dict):
        ts = samples[-1].get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool) and math.isfinite(ts):
        return float(ts)
    return None
