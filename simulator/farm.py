"""The simulated farm: turbines, their streams, operator commands and what the devices said.

The core of the simulator process, thread-safe (one lock), knowing neither MQTT
nor HTTP: the publisher thread calls ``tick`` for the payloads to send, the
MQTT adapter hands in the app's verdicts and labels, the web adapter reads
snapshots and applies ``Command``s.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecommon.settings import validation_problems
from simulator.generator import (
    STUCK_FIELDS,
    Batch,
    FarmGenerator,
    Fault,
    FaultError,
    FaultKind,
)

__all__ = [
    "ALL",
    "FEATURES",
    "GROUPS",
    "Command",
    "CommandError",
    "Farm",
    "UnknownTurbineError",
    "quaternion_to_euler",
]

ALL: Final = "all"
"""The turbine id a command uses to address every turbine."""

FEATURES: Final = ("roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage")
GROUPS: Final = ("vibration", "rotation", "voltage")
HISTORY_S: Final = 30.0  # seconds of samples kept per turbine for the charts
SCORES_KEPT: Final = 120  # verdicts kept per turbine


class CommandError(ValueError):
    """A command the farm cannot carry out (unknown turbine, bad fault)."""


class UnknownTurbineError(CommandError):
    """No turbine of the farm has this id."""


class Command(BaseModel):
    """An operator command, the same over HTTP and MQTT.

    ``{"action": "start"}``, ``{"action": "stop"}``,
    ``{"action": "fault", "kind": "bearing_wear", "intensity": 2.0}`` (optional
    ``field`` for a stuck sensor, ``ramp_s``), ``{"action": "clear", "kind": ...}``
    (no kind: every fault).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["start", "stop", "fault", "clear"]
    kind: FaultKind | None = None
    intensity: float | None = Field(None, allow_inf_nan=False)
    field: str | None = None
    ramp_s: float = Field(0.0, ge=0, allow_inf_nan=False)

    @classmethod
    def parse(cls, data: bytes | str | dict[str, Any]) -> Command:
        """A command from JSON; CommandError with the reason otherwise."""
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise CommandError(f"invalid command: {validation_problems(exc, 'command')}") from None

    def fault(self) -> Fault:
        if self.kind is None:
            raise CommandError("a fault command needs a kind")
        try:
            return Fault(
                self.kind,
                math.nan if self.intensity is None else self.intensity,
                field=self.field or "rps",
                ramp_s=self.ramp_s,
            )
        except FaultError as exc:
            raise CommandError(str(exc)) from None


def quaternion_to_euler(
    qx: NDArray[np.float64],
    qy: NDArray[np.float64],
    qz: NDArray[np.float64],
    qw: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ZYX roll, pitch, yaw for display (the asin argument clipped, as the app does)."""
    roll = np.arctan2(2 * (qw * qx + qy * qz), 1 - 2 * (qx * qx + qy * qy))
    pitch = np.arcsin(np.clip(2 * (qw * qy - qz * qx), -1.0, 1.0))
    yaw = np.arctan2(2 * (qw * qz + qx * qy), 1 - 2 * (qy * qy + qz * qz))
    return roll, pitch, yaw


@dataclass
class _Verdicts:
    """What the devices said about one turbine."""

    label: str = ""
    anomalies: dict[str, bool] = field(default_factory=dict)
    scores: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=SCORES_KEPT))
    seq: int = 0  # verdicts received so far


def _sample_json(ts: int, values: Sequence[float]) -> str:
    qx, qy, qz, qw, wind, rps, volts = values
    return (
        f'{{"ts":{ts},"qx":{qx:.7g},"qy":{qy:.7g},"qz":{qz:.7g},"qw":{qw:.7g},'
        f'"wind_speed_rps":{wind:.5g},"rps":{rps:.5g},"voltage":{volts:.5g}}}'
    )


class Farm:
    """Every simulated turbine: generator, running state, faults, history, verdicts."""

    def __init__(
        self,
        ids: Sequence[str],
        *,
        seed: int = 0,
        rate_hz: float = 20.0,
        running: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not ids:
            raise CommandError("a farm needs at least one turbine")
        if len(set(ids)) != len(ids):
            raise CommandError("turbine ids must be unique")
        self.ids: Final = tuple(ids)
        self.index: Final = {tid: i for i, tid in enumerate(self.ids)}
        self.rate_hz: Final = float(rate_hz)
        self.seed: Final = seed
        self._clock = clock
        self._lock = threading.Lock()
        n = len(self.ids)
        self._gen = FarmGenerator(n, seed=seed, rate_hz=rate_hz, start_ms=int(clock() * 1000))
        self._publishing = np.full(n, running, dtype=bool)
        self._gen.set_running(range(n), running)
        self._history_len = max(1, int(HISTORY_S * rate_hz))
        self._history = np.zeros((n, self._history_len, len(FEATURES)), dtype=np.float32)
        self._history_t = np.zeros(self._history_len, dtype=np.float64)  # epoch s per slot
        self._written = 0  # samples written into the history ring so far
        self._latest = np.zeros((n, len(FEATURES)), dtype=np.float64)
        self._fault_bits = np.zeros(n, dtype=np.int64)
        self._verdicts = [_Verdicts() for _ in range(n)]
        self._anomaly_bits = np.zeros(n, dtype=np.int64)  # bit g: GROUPS[g] anomalous
        self._has_verdict = np.zeros(n, dtype=bool)
        self.samples_published = 0

    # ---- commands -----------------------------------------------------------------------
    def _targets(self, turbine: str) -> list[int]:
        if turbine == ALL:
            return list(range(len(self.ids)))
        try:
            return [self.index[turbine]]
        except KeyError:
            raise UnknownTurbineError(f"unknown turbine {turbine!r}") from None

    def apply(self, turbine: str, command: Command) -> None:
        """Carry out an operator command on one turbine (or ``all``)."""
        targets = self._targets(turbine)
        with self._lock:
            if command.action in ("start", "stop"):
                running = command.action == "start"
                self._publishing[targets] = running
                self._gen.set_running(targets, running)
            elif command.action == "fault":
                fault = command.fault()
                self._gen.set_fault(targets, fault)
                self._fault_bits[targets] |= 1 << fault.kind.bit
            else:
                self._gen.clear_fault(targets, command.kind)
                if command.kind is None:
                    self._fault_bits[targets] = 0
                else:
                    self._fault_bits[targets] &= ~(1 << command.kind.bit)

    # ---- the stream ---------------------------------------------------------------------
    def tick(self, n_samples: int, keep: int | None = None) -> list[tuple[str, bytes]]:
        """Advance every turbine by ``n_samples``; the raw-data payloads of the running ones.

        Only the last ``keep`` samples (all by default) go into the payloads: a
        publisher that fell far behind sends the recent past, not a backlog.
        One sample: the sample object itself; several: ``{"samples": [...]}``.
        """
        with self._lock:
            batch = self._gen.step(n_samples)
            self._record(batch)
            publishing = np.flatnonzero(self._publishing)
        first = 0 if keep is None else max(0, n_samples - max(1, keep))
        raw = batch.raw()[:, first:]  # (N, n, 7)
        ts = batch.ts_ms[first:].tolist()
        out = []
        for i in publishing.tolist():
            rows = raw[i].tolist()
            if len(ts) == 1:
                body = _sample_json(ts[0], rows[0])
            else:
                body = (
                    '{"samples":['
                    + ",".join(_sample_json(t, r) for t, r in zip(ts, rows, strict=True))
                    + "]}"
                )
            out.append((self.ids[i], body.encode()))
        self.samples_published += len(publishing) * len(ts)
        return out

    def _record(self, batch: Batch) -> None:
        roll, pitch, yaw = quaternion_to_euler(batch.qx, batch.qy, batch.qz, batch.qw)
        feats = np.stack([roll, pitch, yaw, batch.wind_speed_rps, batch.rps, batch.voltage], -1)
        self._latest = feats[:, -1].astype(np.float64)
        feats[~self._publishing] = np.nan  # a stopped turbine's sensors send nothing
        n = batch.n_samples
        slots = (self._written + np.arange(n)) % self._history_len
        self._history[:, slots] = feats
        self._history_t[slots] = batch.ts_ms / 1000.0
        self._written += n

    # ---- what the devices say -----------------------------------------------------------
    def on_anomalies(self, turbine: str, payload: bytes | bytearray) -> bool:
        """A verdict from ``wind-turbine/<id>/anomalies``; False when it is not understood."""
        i = self.index.get(turbine)
        if i is None:
            return False
        try:
            doc = json.loads(payload)
            flags = doc["anomalies"]
            bits = sum(1 << g for g, name in enumerate(GROUPS) if bool(flags.get(name)))
            anomalies = {name: bool(flags.get(name)) for name in GROUPS}
            entry: dict[str, Any] = {
                "ts": float(doc.get("ts", self._clock() * 1000)),
                "scores": [float(x) for x in doc.get("scores", [])],
                "thresholds": [float(x) for x in doc.get("thresholds", [])],
                "anomalies": anomalies,
                "model": str(doc.get("model", "")),
                "version": str(doc.get("version", "")),
            }
        except (ValueError, TypeError, KeyError, AttributeError):
            return False
        with self._lock:
            v = self._verdicts[i]
            v.anomalies = anomalies
            v.seq += 1
            entry["seq"] = v.seq
            v.scores.append(entry)
            self._anomaly_bits[i] = bits
            self._has_verdict[i] = True
        return True

    def on_label(self, turbine: str, payload: bytes | bytearray) -> bool:
        """A status line from ``wind-turbine/<id>/label/update``."""
        i = self.index.get(turbine)
        if i is None:
            return False
        try:
            label = json.loads(payload)["model_label_status"]
        except (ValueError, TypeError, KeyError):
            return False
        if not isinstance(label, str):
            return False
        with self._lock:
            self._verdicts[i].label = label[:200]
        return True

    # ---- views --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids),
            "rate_hz": self.rate_hz,
            "seed": self.seed,
            "features": list(FEATURES),
            "groups": list(GROUPS),
            "fault_kinds": [k.value for k in FaultKind],
            "stuck_fields": list(STUCK_FIELDS),
        }

    def overview(self) -> dict[str, Any]:
        """Every turbine in a few flat arrays (cheap at thousands of turbines)."""
        with self._lock:
            anomaly = np.where(self._has_verdict, self._anomaly_bits, -1)
            return {
                "t": self._clock(),
                "running": self._publishing.astype(np.int8).tolist(),
                "faults": self._fault_bits.tolist(),
                "anomaly": anomaly.tolist(),  # -1: no verdict yet
                "rps": np.round(self._latest[:, 4], 2).tolist(),
                "labels": [v.label for v in self._verdicts],
                "published": self.samples_published,
            }

    def detail(self, turbine: str, since: float = 0.0, after_seq: int = 0) -> dict[str, Any]:
        """One turbine: its state, samples newer than ``since`` (epoch s), verdicts after
        the ``after_seq``-th (each verdict carries its ``seq``)."""
        i = self.index.get(turbine)
        if i is None:
            raise UnknownTurbineError(f"unknown turbine {turbine!r}")
        with self._lock:
            filled = min(self._written, self._history_len)
            start = self._written - filled
            slots = np.arange(start, self._written) % self._history_len
            times = self._history_t[slots]
            keep = (times > since) & ~np.isnan(self._history[i, slots, 0])
            samples = self._history[i, slots[keep]]
            verdict = self._verdicts[i]
            scores = [s for s in verdict.scores if s["seq"] > after_seq]
            faults = [
                {"kind": f.kind.value, "intensity": f.intensity, "field": f.field}
                for f in self._gen.faults(i)
            ]
            return {
                "id": turbine,
                "running": bool(self._publishing[i]),
                "faults": faults,
                "label": verdict.label,
                "anomalies": verdict.anomalies,
                "t": np.round(times[keep], 3).tolist(),
                "samples": {
                    name: np.round(samples[:, k].astype(np.float64), 5).tolist()
                    for k, name in enumerate(FEATURES)
                },
                "verdicts": scores,
            }
