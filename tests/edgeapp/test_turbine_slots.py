"""Turbine slots: junk ids must not lock real turbines out until a restart.

Learned turbines silent for ``turbine_evict_s`` give their slot back; a fixed
allow-list keeps its slots; every refusal is counted under its reason.
"""

from __future__ import annotations

import json

import numpy as np
from edgeapp_harness import Listener, Sensors, StartApp

from edgeapp.buffers import TurbineBuffers
from edgeapp.ingest import DropCounter, DropReason, Ingestor
from edgeapp.sources import TopicPattern

SAMPLE = {
    "qx": 0.01, "qy": -0.02, "qz": 0.99, "qw": -0.1, "wind_speed_rps": 2.06, "rps": 2.19,
    "voltage": 70.5,
}  # fmt: skip
BODY = json.dumps(SAMPLE).encode()


def make(max_turbines: int, fixed: list[str] | None = None) -> Ingestor:
    buffers = TurbineBuffers(
        max_turbines=max_turbines, capacity=20, gap_reset_s=5.0, fixed_ids=fixed
    )
    return Ingestor(
        buffers=buffers,
        topics=TopicPattern("wind-turbine/+/raw-data"),
        drops=DropCounter(interval_s=10.0),
        max_payload_bytes=4096,
        max_samples_per_message=100,
        max_abs_quaternion=1.5,
        max_abs_value=1e5,
    )


def send(ingestor: Ingestor, turbine: str, at: float) -> None:
    ingestor.on_message(f"wind-turbine/{turbine}/raw-data", BODY, at)


def test_silent_junk_turbines_give_their_slots_back() -> None:
    ingestor = make(max_turbines=8)
    buffers = ingestor.buffers
    for i in range(1000):
        send(ingestor, f"junk{i}", at=1.0)
    assert len(buffers) == 8
    send(ingestor, "real", at=2.0)
    assert buffers.find("real") is None
    assert ingestor.drops.counts == {DropReason.TOO_MANY_TURBINES: 993}

    assert buffers.evict_idle(now=30.0, idle_s=60.0) == []  # not silent long enough
    evicted = buffers.evict_idle(now=62.0, idle_s=60.0)
    assert sorted(evicted) == sorted(f"junk{i}" for i in range(8))
    assert len(buffers) == 0 and buffers.evicted == 8

    for k in range(25):
        send(ingestor, "real", at=62.0 + 0.05 * k)
    slot = buffers.find("real")
    assert slot is not None and buffers.ids == ["real"]
    counts, arrival = buffers.state()
    assert counts[slot] == 25 and arrival[slot] == 62.0 + 0.05 * 24
    # the ring holds only the new turbine's samples
    gathered = buffers.gather(np.array([slot]), 20)
    assert np.allclose(gathered.features[0], gathered.features[0, -1])
    assert buffers.take_added()[-1] == "real"


def test_a_cached_topic_of_an_evicted_turbine_gets_a_new_slot() -> None:
    ingestor = make(max_turbines=2)
    buffers = ingestor.buffers
    send(ingestor, "a", at=1.0)
    send(ingestor, "a", at=1.1)  # now cached topic -> slot
    send(ingestor, "b", at=100.0)
    assert buffers.evict_idle(now=100.0, idle_s=60.0) == ["a"]
    send(ingestor, "c", at=100.1)  # takes a's old slot
    send(ingestor, "a", at=100.2)  # a is back: refused (table full), not written into c's slot
    counts, _arrival = buffers.state()
    slot_c = buffers.find("c")
    assert slot_c is not None and counts[slot_c] == 1
    assert buffers.find("a") is None
    assert ingestor.drops.counts == {DropReason.TOO_MANY_TURBINES: 1}


def test_a_fixed_allow_list_keeps_its_slots_and_refusals_are_counted_by_reason() -> None:
    ingestor = make(max_turbines=4, fixed=["f1", "f2"])
    buffers = ingestor.buffers
    send(ingestor, "f1", at=1.0)
    send(ingestor, "stranger", at=1.0)
    ingestor.on_message("wind-turbine/bad id/raw-data", BODY, 1.0)
    assert buffers.evict_idle(now=1000.0, idle_s=60.0) == []
    assert buffers.ids == ["f1", "f2"]
    send(ingestor, "f1", at=1000.0)
    assert ingestor.drops.counts == {DropReason.UNKNOWN_TURBINE: 1, DropReason.BAD_TOPIC: 1}


def test_the_daemon_frees_slots_of_silent_turbines(
    start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app(max_turbines=8, turbine_evict_s=1.0, log_summary_interval_s=0.5)
    for i in range(40):
        sensors.publish_raw(sensors.topic(f"junk{i}"), BODY)
    app.wait_event("input dropped", lambda e: e["reason"] == "too_many_turbines")
    sensors.publish_raw(sensors.topic("real1"), BODY)
    app.wait_event("summary", lambda e: (e["refused"] or {}).get("too_many_turbines", 0) > 0)
    # the junk falls silent and gives its slots back; the real turbine gets verdicts
    app.wait_event("turbines evicted", timeout=10)
    sensors.prefill(["real1"])
    sensors.stream(["real1"])
    listener.wait_for("anomalies", turbine="real1", timeout=15)
    evictions = app.events("turbines evicted")
    assert sum(e["count"] for e in evictions) == 8
    assert all(e["examples"][0].startswith("junk") for e in evictions)
