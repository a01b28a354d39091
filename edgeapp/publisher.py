"""Verdicts, labels and dashboard figures as MQTT messages (ARCHITECTURE.md, "MQTT topics").

=========================================  ======================================================
topic                                      payload (JSON)
=========================================  ======================================================
``<prefix>/<id>/anomalies``                ``{"ts", "model", "version", "scores": [6],
                                           "thresholds": [6], "anomalies": {"vibration",
                                           "rotation", "voltage"}, "latency_ms"}``
``<prefix>/<id>/label/update`` (retained)  ``{"model_label_status": "Model loaded: 1.0"}``, or
                                           ``"Model not loaded"``, ``"Agent unavailable"``,
                                           ``"Model invalid"``
``<prefix>/<id>/dashboard/update``         ``{"ts", "samples", "means": {"roll", "pitch", "yaw",
                                           "wind_speed_rps", "rps", "voltage"}}``
=========================================  ======================================================

``ts`` is the epoch ms of the turbine's newest sample (its own ``ts`` when it
sent one, else its arrival time); ``scores`` and ``thresholds`` are in feature
order (roll, pitch, yaw, wind_speed_rps, rps, voltage); ``latency_ms`` runs
from that sample's arrival to the moment its verdict is handed to the MQTT
client. The dashboard's ``means`` are of the raw (not denoised) features
over the last ``samples`` samples, in physical units (radians, rps, volts).

The payload builders are pure functions; ``MqttPublisher`` only adds topics
and a connection. Labels are retained, and sent again after every reconnect.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.typing import NDArray

from edgeapp.detector import VerdictBatch
from edgeapp.features import FEATURES
from edgeapp.mqtt import MqttClient

__all__ = [
    "MqttPublisher",
    "Topics",
    "dashboard_payloads",
    "status_payload",
    "verdict_payloads",
]

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


@dataclass(frozen=True)
class Topics:
    """The daemon's output topics under one prefix (``wind-turbine`` by default)."""

    prefix: str = "wind-turbine"

    def anomalies(self, turbine: str) -> str:
        return f"{self.prefix}/{turbine}/anomalies"

    def label(self, turbine: str) -> str:
        return f"{self.prefix}/{turbine}/label/update"

    def dashboard(self, turbine: str) -> str:
        return f"{self.prefix}/{turbine}/dashboard/update"


def verdict_payloads(batch: VerdictBatch, now: float) -> list[bytes]:
    """One ``anomalies`` payload per turbine of the batch; ``now`` is monotonic time.

    The bytes ``json`` would write for each verdict's object (compact separators),
    from one %-template per batch: the numbers are formatted with ``repr`` (what
    ``json`` writes for a float) and the constant parts are encoded once. A batch
    with a non-finite number takes ``json`` itself, which refuses it (ValueError).
    """
    latency = np.round((now - batch.arrival) * 1000.0, 3)
    if not (np.isfinite(batch.scores).all() and np.isfinite(latency).all()):
        return _verdict_payloads_json(batch, latency)
    names = list(batch.anomalies)
    thresholds = _dumps(list(batch.thresholds))  # the key: 0.0 == -0.0, their JSON differs
    template = _verdict_template(
        batch.model, batch.version, thresholds, tuple(names), batch.scores.shape[1]
    )
    flags = [[_JSON_BOOL[f] for f in batch.anomalies[name].tolist()] for name in names]
    columns = [batch.ts_ms.tolist(), *batch.scores.T.tolist(), *flags, latency.tolist()]
    return [(template % values).encode() for values in zip(*columns, strict=True)]


_JSON_BOOL = {False: "false", True: "true"}


@functools.lru_cache(maxsize=16)
def _verdict_template(
    model: str, version: str, thresholds: str, groups: tuple[str, ...], scores: int
) -> str:
    """The verdict object with %-placeholders for ts, the scores, the group flags and the
    latency, and everything else encoded by ``json`` (escaped for %); ``thresholds`` is
    their JSON already."""
    constant = [
        (_dumps(model), _dumps(version), thresholds),
        tuple(_dumps(name) for name in groups),
    ]
    (model_json, version_json, thresholds_json), group_json = (
        tuple(part.replace("%", "%%") for part in parts) for parts in constant
    )
    anomalies = ",".join(f"{name}:%s" for name in group_json)
    return (
        f'{{"ts":%d,"model":{model_json},"version":{version_json},'
        f'"scores":[{",".join(["%r"] * scores)}],"thresholds":{thresholds_json},'
        f'"anomalies":{{{anomalies}}},"latency_ms":%r}}'
    )


def _verdict_payloads_json(batch: VerdictBatch, latency: NDArray[np.float64]) -> list[bytes]:
    """``verdict_payloads`` through ``json`` (which refuses NaN and infinity)."""
    scores = batch.scores.tolist()
    ts = batch.ts_ms.tolist()
    groups = {name: flags.tolist() for name, flags in batch.anomalies.items()}
    thresholds = list(batch.thresholds)
    delays = latency.tolist()
    return [
        _dumps(
            {
                "ts": ts[i],
                "model": batch.model,
                "version": batch.version,
                "scores": scores[i],
                "thresholds": thresholds,
                "anomalies": {name: flags[i] for name, flags in groups.items()},
                "latency_ms": delays[i],
            }
        ).encode()
        for i in range(len(batch.turbines))
    ]


def status_payload(label: str) -> bytes:
    """The ``label/update`` payload."""
    return _dumps({"model_label_status": label}).encode()


def dashboard_payloads(
    ts_ms: NDArray[np.int64], means: NDArray[np.float64], samples: int
) -> list[bytes]:
    """One ``dashboard/update`` payload per row of ``means`` ``(T, 6)``.

    Non-finite means (a turbine sending NaN never gets this far, but a mean
    can still overflow) are sent as null. The bytes ``json`` writes, from one
    %-template (as ``verdict_payloads``); a row with a non-finite mean takes ``json``.
    """
    template = _dashboard_template(samples, means.shape[1])
    finite = cast("list[bool]", np.isfinite(means).all(axis=1).tolist())
    return [
        (template % (stamp, *row)).encode() if ok else _dashboard_json(stamp, row, samples)
        for stamp, row, ok in zip(ts_ms.tolist(), means.tolist(), finite, strict=True)
    ]


@functools.lru_cache(maxsize=4)
def _dashboard_template(samples: int, count: int) -> str:
    means = ",".join(f"{_dumps(name)}:%r" for name in FEATURES[:count])
    return f'{{"ts":%d,"samples":{samples},"means":{{{means}}}}}'


def _dashboard_json(stamp: int, row: list[float], samples: int) -> bytes:
    means = {
        name: (value if math.isfinite(value) else None)
        for name, value in zip(FEATURES, row, strict=True)
    }
    return _dumps({"ts": stamp, "samples": samples, "means": means}).encode()


class MqttPublisher:
    """The ``VerdictSink`` of the daemon: publishes on the device's local broker.

    Each call writes its messages with one ``publish_many`` (one socket write).
    Verdicts go at ``verdict_qos``: at 1 they wait in the client's bounded queue
    while the broker is away; labels and dashboard figures go at QoS 0 and are
    dropped (and counted) meanwhile: labels are sent again on reconnection, and
    dashboard figures are superseded within a second.
    """

    def __init__(
        self,
        *,
        client: MqttClient,
        topics: Topics,
        dashboard_samples: int = 100,
        verdict_qos: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.verdict_qos = verdict_qos
        self.topics = topics
        self.dashboard_samples = dashboard_samples
        self._clock = clock
        self._labels: dict[str, str] = {}
        self._labels_lock = threading.Lock()
        self._latencies = 0  # verdicts since take_latency(), their latency sum and max (ms)
        self._latency_sum = 0.0
        self._latency_max = 0.0

    @property
    def published(self) -> int:
        return self.client.sent

    @property
    def unpublished(self) -> int:
        """Messages lost: QoS 0 ones sent while the broker was unreachable, QoS 1 ones
        dropped from a full queue."""
        return self.client.unsent + self.client.overflowed

    @property
    def queued(self) -> int:
        """QoS 1 verdicts not acknowledged by the broker yet."""
        return self.client.queued

    def on_connected(self, client: MqttClient) -> None:
        """After a (re)connection: the labels again (the broker may have restarted)."""
        with self._labels_lock:
            labels = list(self._labels.items())
        label = self.topics.label
        client.publish_many(((label(t), status_payload(text)) for t, text in labels), retain=True)

    def forget(self, turbines: Sequence[str]) -> None:
        """Turbines gone (evicted): clear their retained label, stop re-sending it."""
        with self._labels_lock:
            for turbine in turbines:
                self._labels.pop(turbine, None)
        label = self.topics.label
        self.client.publish_many(((label(t), b"") for t in turbines), retain=True)

    def take_latency(self) -> tuple[int, float, float]:
        """``(verdicts, mean ms, max ms)`` of the verdicts since the last call."""
        count, total, top = self._latencies, self._latency_sum, self._latency_max
        self._latencies, self._latency_sum, self._latency_max = 0, 0.0, 0.0
        return count, (total / count if count else 0.0), top

    def verdicts(self, batch: VerdictBatch) -> None:
        now = self._clock()
        payloads = verdict_payloads(batch, now)
        if len(batch.arrival):
            latency = (now - batch.arrival) * 1000.0
            self._latencies += len(latency)
            self._latency_sum += float(latency.sum())
            self._latency_max = max(self._latency_max, float(latency.max()))
        anomalies = self.topics.anomalies
        self.client.publish_many(
            zip(map(anomalies, batch.turbines), payloads, strict=True), qos=self.verdict_qos
        )

    def status(self, turbines: Sequence[str], label: str) -> None:
        payload = status_payload(label)
        with self._labels_lock:
            for turbine in turbines:
                self._labels[turbine] = label
        topic = self.topics.label
        self.client.publish_many(((topic(t), payload) for t in turbines), retain=True)

    def dashboard(
        self, turbines: Sequence[str], ts_ms: NDArray[np.int64], means: NDArray[np.float64]
    ) -> None:
        payloads = dashboard_payloads(ts_ms, means, self.dashboard_samples)
        topic = self.topics.dashboard
        self.client.publish_many(zip(map(topic, turbines), payloads, strict=True))
