"""The published payloads (ARCHITECTURE.md, "MQTT topics"), as pure functions."""

from __future__ import annotations

import json
import math

import numpy as np

from edgeapp.detector import VerdictBatch
from edgeapp.publisher import Topics, dashboard_payloads, status_payload, verdict_payloads


def batch() -> VerdictBatch:
    return VerdictBatch(
        turbines=["t1", "t2"],
        ts_ms=np.array([1_700_000_000_000, 1_700_000_000_050], dtype=np.int64),
        arrival=np.array([10.0, 10.2]),
        model="wind-turbine",
        version="1.0",
        scores=np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [2.0, 0.0, 0.0, 0.0, 0.0, 9.0]]),
        thresholds=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
        anomalies={
            "vibration": np.array([False, True]),
            "rotation": np.array([False, False]),
            "voltage": np.array([False, True]),
        },
    )


def test_verdict_payload_is_exactly_the_documented_one() -> None:
    first, second = (json.loads(p) for p in verdict_payloads(batch(), now=10.25))
    assert first == {
        "ts": 1_700_000_000_000,
        "model": "wind-turbine",
        "version": "1.0",
        "scores": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        "thresholds": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        "anomalies": {"vibration": False, "rotation": False, "voltage": False},
        "latency_ms": 250.0,
    }
    assert second["anomalies"] == {"vibration": True, "rotation": False, "voltage": True}
    assert math.isclose(second["latency_ms"], 50.0)
    assert list(second) == list(first)  # same key order for every message


def test_status_and_dashboard_payloads() -> None:
    assert json.loads(status_payload("Model loaded: 1.0")) == {
        "model_label_status": "Model loaded: 1.0"
    }
    means = np.array([[0.01, -0.02, 1.5, 2.1, 1.6, 47.8], [0.0, 0.0, 0.0, 0.0, np.inf, 1.0]])
    first, second = (
        json.loads(p)
        for p in dashboard_payloads(np.array([5, 6], dtype=np.int64), means, samples=100)
    )
    assert first == {
        "ts": 5,
        "samples": 100,
        "means": {"roll": 0.01, "pitch": -0.02, "yaw": 1.5, "wind_speed_rps": 2.1, "rps": 1.6,
                  "voltage": 47.8},
    }  # fmt: skip
    assert second["means"]["rps"] is None  # never invalid JSON


def test_topics() -> None:
    topics = Topics("wind-turbine")
    assert topics.anomalies("t7") == "wind-turbine/t7/anomalies"
    assert topics.label("t7") == "wind-turbine/t7/label/update"
    assert topics.dashboard("t7") == "wind-turbine/t7/dashboard/update"
