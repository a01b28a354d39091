"""The published payloads (ARCHITECTURE.md, "MQTT topics"), as pure functions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- the templates against json itself: the same bytes for any value

NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e16, 1e-5, 1e22, 123456789.125]
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(NUMBERS, min_size=6, max_size=6),
            st.integers(min_value=0, max_value=10**14),
            st.lists(st.booleans(), min_size=3, max_size=3),
            st.floats(min_value=-1e6, max_value=1e6),
        ),
        max_size=5,
    ),
    model=st.text(max_size=8),
    version=st.text(max_size=5),
    thresholds=st.lists(NUMBERS, min_size=6, max_size=6),
)
def test_verdict_payloads_are_the_bytes_json_writes(
    rows: list[tuple[list[float], int, list[bool], float]],
    model: str,
    version: str,
    thresholds: list[float],
) -> None:
    groups = ("vibration", "rotation", "voltage")
    verdicts = VerdictBatch(
        turbines=[f"t{i}" for i in range(len(rows))],
        ts_ms=np.array([r[1] for r in rows], dtype=np.int64),
        arrival=np.array([r[3] for r in rows], dtype=np.float64),
        model=model,
        version=version,
        scores=np.array([r[0] for r in rows], dtype=np.float64).reshape(len(rows), 6),
        thresholds=tuple(thresholds),
        anomalies={
            g: np.array([r[2][k] for r in rows], dtype=np.bool_) for k, g in enumerate(groups)
        },
    )
    latency = np.round((5.0 - verdicts.arrival) * 1000.0, 3).tolist()
    expected = [
        json.dumps(
            {
                "ts": r[1],
                "model": model,
                "version": version,
                "scores": r[0],
                "thresholds": thresholds,
                "anomalies": dict(zip(groups, r[2], strict=True)),
                "latency_ms": latency[i],
            },
            separators=(",", ":"),
        ).encode()
        for i, r in enumerate(rows)
    ]
    assert verdict_payloads(verdicts, now=5.0) == expected


def test_a_verdict_with_a_non_finite_score_is_refused_as_json_refuses_it() -> None:
    verdicts = batch()
    verdicts.scores[1, 2] = math.nan
    with pytest.raises(ValueError, match="JSON"):
        verdict_payloads(verdicts, now=10.25)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats() | NUMBERS, min_size=6, max_size=6),
        max_size=5,
    ),
    samples=st.integers(min_value=1, max_value=1000),
)
def test_dashboard_payloads_are_the_bytes_json_writes(
    rows: list[list[float]], samples: int
) -> None:
    means = np.array(rows, dtype=np.float64).reshape(len(rows), 6)
    stamps = np.arange(len(rows), dtype=np.int64) * 50
    expected = [
        json.dumps(
            {
                "ts": int(stamps[i]),
                "samples": samples,
                "means": {
                    name: (v if math.isfinite(v) else None)
                    for name, v in zip(
                        ("roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage"),
                        row,
                        strict=True,
                    )
                },
            },
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        for i, row in enumerate(rows)
    ]
    assert dashboard_payloads(stamps, means, samples) == expected
