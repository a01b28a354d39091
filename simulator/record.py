"""``windfarm-sim record``: a run of the generator written as plain CSV.

Columns: ``ts`` (epoch ms), ``turbine``, the seven raw fields
(``qx, qy, qz, qw, wind_speed_rps, rps, voltage``) and ``faults`` (the fault
kinds active for that sample, ``|``-separated, empty when normal). edge-app's
replay source reads it as it is (it ignores the ``faults`` column), training
and plotting read it with any CSV reader. Rows are grouped by time: every
turbine's sample k comes before any sample k + 1. The file is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from edgecommon.fsutil import fsync_dir
from simulator.generator import RAW_FIELDS, FarmGenerator, Fault, FaultError, FaultKind

__all__ = ["ScheduledFault", "parse_fault", "record_csv", "CSV_COLUMNS"]

CSV_COLUMNS: Final = ("ts", "turbine", *RAW_FIELDS, "faults")
_FAULT_RE: Final = re.compile(
    r"(?P<turbine>[^:]+):(?P<kind>[a-z_]+)(=(?P<intensity>[0-9.eE+-]+))?"
    r"(,field=(?P<field>[a-z_]+))?(@(?P<start>[0-9.]+)(-(?P<end>[0-9.]+))?)?"
)
_CHUNK_S: Final = 10.0


@dataclass(frozen=True)
class ScheduledFault:
    turbine: str  # id, or index as a number
    fault: Fault
    start_s: float = 0.0
    end_s: float | None = None


def parse_fault(text: str) -> ScheduledFault:
    """``TURBINE:KIND[=INTENSITY][,field=F][@START[-END]]``.

    E.g. ``wt-002:bearing_wear=2@60-120``: bearing wear of intensity 2 on
    turbine wt-002 from 60 s to 120 s (TURBINE may also be an index).
    """
    match = _FAULT_RE.fullmatch(text.strip())
    if not match:
        raise FaultError(f"{text!r}: expected TURBINE:KIND[=INTENSITY][,field=F][@START[-END]]")
    try:
        kind = FaultKind(match["kind"])
    except ValueError:
        kinds = ", ".join(k.value for k in FaultKind)
        raise FaultError(f"{text!r}: unknown fault kind (one of {kinds})") from None
    try:
        intensity = float(match["intensity"]) if match["intensity"] else float("nan")
        start = float(match["start"]) if match["start"] else 0.0
        end = float(match["end"]) if match["end"] else None
    except ValueError:
        raise FaultError(f"{text!r}: not a number") from None
    if end is not None and end <= start:
        raise FaultError(f"{text!r}: the end must come after the start")
    fault = Fault(kind, intensity, field=match["field"] or "rps")
    return ScheduledFault(match["turbine"], fault, start, end)


def _fault_names(bits: np.ndarray) -> list[str]:
    names = {}
    for value in np.unique(bits).tolist():
        names[value] = "|".join(k.value for k in FaultKind if value & (1 << k.bit))
    return [names[v] for v in bits.tolist()]


def record_csv(
    out: Path,
    *,
    ids: Sequence[str],
    seconds: float,
    seed: int = 0,
    rate_hz: float = 20.0,
    start_ms: int = 0,
    faults: Sequence[ScheduledFault] = (),
) -> int:
    """Write ``seconds`` of every turbine's stream to ``out``; the number of rows."""
    if seconds <= 0:
        raise FaultError("seconds must be > 0")
    gen = FarmGenerator(len(ids), seed=seed, rate_hz=rate_hz, start_ms=start_ms)
    index = {tid: i for i, tid in enumerate(ids)}
    events: list[tuple[int, bool, int, ScheduledFault]] = []  # (sample, on, turbine, fault)
    for sf in faults:
        i = index.get(sf.turbine)
        if i is None and sf.turbine.isdigit() and int(sf.turbine) < len(ids):
            i = int(sf.turbine)
        if i is None:
            raise FaultError(f"unknown turbine {sf.turbine!r}")
        events.append((round(sf.start_s * rate_hz), True, i, sf))
        if sf.end_s is not None:
            events.append((round(sf.end_s * rate_hz), False, i, sf))
    events.sort(key=lambda e: (e[0], e[1]))
    total = max(1, round(seconds * rate_hz))
    chunk = max(1, round(_CHUNK_S * rate_hz))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = Path(tmp_name)
    rows = 0
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            done = 0
            while done < total:
                while events and events[0][0] <= done:
                    _, on, i, sf = events.pop(0)
                    if on:
                        gen.set_fault(i, sf.fault)
                    else:
                        gen.clear_fault(i, sf.fault.kind)
                next_event = events[0][0] if events else total
                n = min(chunk, total - done, max(1, next_event - done))
                batch = gen.step(n)
                raw = batch.raw().transpose(1, 0, 2)  # (n, N, 7): time-major rows
                flags = _fault_names(batch.fault_bits.T.reshape(-1))
                ts = np.repeat(batch.ts_ms, len(ids)).tolist()
                turbines = list(ids) * n
                values = raw.reshape(-1, len(RAW_FIELDS)).tolist()
                writer.writerows(
                    (t, tid, *(f"{v:.9g}" for v in row), fl)
                    for t, tid, row, fl in zip(ts, turbines, values, flags, strict=True)
                )
                rows += n * len(ids)
                done += n
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows
