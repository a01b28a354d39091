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

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    """One ``anomalies`` payload per turbine of the batch; ``now`` is monotonic time."""
    latency = np.round((now - batch.arrival) * 1000.0, 3).tolist()
    scores = batch.scores.tolist()
    ts = batch.ts_ms.tolist()
    groups = {name: flags.tolist() for name, flags in batch.anomalies.items()}
    thresholds = list(batch.thresholds)
    return [
        _dumps(
            {
                "ts": ts[i],
                "model": batch.model,
                "version": batch.version,
                "scores": scores[i],
                "thresholds": thresholds,
                "anomalies": {name: flags[i] for name, flags in groups.items()},
                "latency_ms": latency[i],
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
    can still overflow) are sent as null.
    """
    rows = means.tolist()
    stamps = ts_ms.tolist()
    return [
        _dumps(
            {
                "ts": stamps[i],
                "samples": samples,
                "means": {
                    name: (value if math.isfinite(value) else None)
                    for name, value in zip(FEATURES, rows[i], strict=True)
                },
            }
        ).encode()
        for i in range(len(rows))
    ]


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
