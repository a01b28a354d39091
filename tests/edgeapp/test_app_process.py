"""edge-app as a process, against a real mosquitto and a real edge-agent.

Samples in -> verdicts out; malformed bursts; the agent killed and restarted;
a hot swap; the broker restarted; no model at start; sd_notify and a clean
shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from pathlib import Path

import pytest
from edgeapp_harness import (
    MODEL,
    V2_THRESHOLDS,
    App,
    Listener,
    Received,
    Sensors,
    Stack,
    StartApp,
    short_dir,
    write_csv,
)

from edgeagent.client import AgentClient
from edgeagent.package import Manifest
from edgeapp.features import FEATURES

VERDICT_KEYS = {"ts", "model", "version", "scores", "thresholds", "anomalies", "latency_ms"}
GROUPS = {"vibration", "rotation", "voltage"}


def v1_thresholds(stack: Stack) -> list[float]:
    manifest = Manifest.from_json_bytes((stack.v1 / "manifest.json").read_bytes())
    return [float(t) for t in manifest.preprocessing["thresholds"]]


def check_verdict(message: Received) -> dict[str, object]:
    body = message.json()
    assert set(body) == VERDICT_KEYS, body
    assert isinstance(body["ts"], int)
    assert body["model"] == MODEL
    assert isinstance(body["version"], str)
    scores, thresholds = body["scores"], body["thresholds"]
    assert len(scores) == 6 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(thresholds) == 6
    anomalies = body["anomalies"]
    assert set(anomalies) == GROUPS and all(isinstance(v, bool) for v in anomalies.values())
    # fault groups: vibration = roll, pitch, yaw; rotation = wind, rotor; voltage = voltage
    flags = [s > t for s, t in zip(scores, thresholds, strict=True)]
    assert anomalies["vibration"] == any(flags[0:3])
    assert anomalies["rotation"] == any(flags[3:5])
    assert anomalies["voltage"] == flags[5]
    assert isinstance(body["latency_ms"], float) and 0.0 <= body["latency_ms"] < 2000.0
    return dict(body)


def test_samples_in_verdicts_out(
    app_stack: Stack, start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app()
    turbines = ["t1", "t2", "t3"]
    sensors.prefill(turbines)
    sensors.stream(turbines)
    thresholds = v1_thresholds(app_stack)
    for turbine in turbines:
        (verdict,) = listener.wait_for("anomalies", turbine=turbine)[:1]
        body = check_verdict(verdict)
        assert body["version"] == "1.0"
        assert body["thresholds"] == thresholds
        assert abs(int(body["ts"]) - time.time() * 1000) < 10_000  # the sample's own ts
        (label,) = listener.wait_for("label/update", turbine=turbine)[:1]
        assert label.json() == {"model_label_status": "Model loaded: 1.0"}
        (dash,) = listener.wait_for("dashboard/update", turbine=turbine)[:1]
        body = dash.json()
        assert set(body) == {"ts", "samples", "means"}
        assert list(body["means"]) == list(FEATURES)
        assert 20.0 < body["means"]["voltage"] < 80.0
        assert 1.0 < body["means"]["rps"] < 2.5

    # every tick (0.25 s) gives every turbine a verdict
    since = time.monotonic()
    time.sleep(2.0)
    for turbine in turbines:
        count = len(listener.select("anomalies", turbine, since))
        assert 6 <= count <= 10, (turbine, count)

    # the label is retained for dashboards that connect later
    late = Listener(app_stack.broker.port, topics=("wind-turbine/+/label/update",))
    try:
        (label,) = late.wait_for("label/update", turbine="t2")[:1]
        assert label.retain and label.json() == {"model_label_status": "Model loaded: 1.0"}
    finally:
        late.close()
    assert app.proc.alive()


def test_malformed_burst_is_counted_and_good_turbines_keep_their_verdicts(
    start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app(max_turbines=4, max_payload_bytes=8192)
    good = ["g1", "g2"]
    sensors.prefill(good, batch=25)
    sensors.stream(good)
    listener.wait_for("anomalies", turbine="g2")
    sample = {
        "qx": 0.0, "qy": 0.0, "qz": 0.0, "qw": 1.0, "wind_speed_rps": 2.0, "rps": 1.5,
        "voltage": 48.0,
    }  # fmt: skip
    topic = sensors.topic("bad")
    burst: dict[str, list[tuple[str, bytes]]] = {
        "not_json": [(topic, b"not json"), (topic, b'{"qx": 1'), (topic, b"\xff\xfe")],
        "not_object": [(topic, b"[1, 2, 3]"), (topic, b"42"), (topic, b'"text"')],
        "missing_field": [(topic, json.dumps({"qx": 0.1}).encode())],
        "extra_field": [(topic, json.dumps({**sample, "temperature": 20}).encode())],
        "wrong_type": [
            (topic, json.dumps({**sample, "rps": "1.5"}).encode()),
            (topic, json.dumps({**sample, "voltage": True}).encode()),
            (topic, json.dumps({**sample, "qx": None}).encode()),
        ],
        "non_finite": [(topic, json.dumps({**sample, "voltage": math.nan}).encode())],
        "out_of_range": [
            (topic, json.dumps({**sample, "voltage": 1e300}).encode()),
            (topic, json.dumps({**sample, "qw": 7.0}).encode()),
        ],
        "oversized": [(topic, b" " * 9000)],
        "bad_samples": [
            (topic, b'{"samples": 5}'),
            (topic, b'{"samples": []}'),
        ],
        "bad_topic": [("wind-turbine/bad id/raw-data", json.dumps(sample).encode())],
    }
    # a flood of new turbines beyond max_turbines (two slots are left)
    flood = [(sensors.topic(f"new{i}"), json.dumps(sample).encode()) for i in range(12)]
    for _ in range(20):
        for items in burst.values():
            for t, payload in items:
                sensors.publish_raw(t, payload)
    for t, payload in flood:
        sensors.publish_raw(t, payload)
    sent_at = time.monotonic()
    time.sleep(1.5)
    for turbine in good:
        assert len(listener.select("anomalies", turbine, sent_at)) >= 4
    assert app.proc.alive()
    # a nesting bomb on a good turbine's topic: dropped, the turbine unaffected
    sensors.publish_raw(sensors.topic("g1"), b"[" * 3000)
    time.sleep(0.3)
    assert app.proc.stop(5) == 0
    (stopped,) = app.events("edge-app stopped")
    dropped = stopped["dropped"]
    expected = {reason: 20 * len(items) for reason, items in burst.items()}
    expected["not_json"] += 1
    expected["too_many_turbines"] = 10
    assert dropped == expected
    reasons = {e["reason"] for e in app.events("input dropped")}
    assert reasons == set(expected)


def test_agent_killed_and_restarted_verdicts_resume(
    app_stack: Stack, start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app()
    sensors.prefill(["k1"])
    sensors.stream(["k1"])
    listener.wait_for("anomalies", turbine="k1")
    try:
        killed = time.monotonic()  # before: the app may notice before kill() returns here
        app_stack.agent.kill()
        listener.wait_for(
            "label/update",
            lambda m: m.json() == {"model_label_status": "Agent unavailable"},
            turbine="k1",
            since=killed,
        )
        quiet = time.monotonic() + 0.3
        time.sleep(1.0)
        assert not listener.select("anomalies", "k1", quiet)
        assert app.proc.alive()
    finally:
        restarted = time.monotonic()
        app_stack.agent.start().close()  # restores wind-turbine 1.0 from its state dir
    listener.wait_for(
        "label/update",
        lambda m: m.json() == {"model_label_status": "Model loaded: 1.0"},
        turbine="k1",
        since=restarted,
    )
    listener.wait_for("anomalies", turbine="k1", since=restarted, count=3)


def test_hot_swap_uses_the_new_thresholds(
    app_stack: Stack,
    package_v2: Path,
    start_app: StartApp,
    listener: Listener,
    sensors: Sensors,
) -> None:
    start_app()
    sensors.prefill(["h1"])
    sensors.stream(["h1"])
    listener.wait_for("anomalies", turbine="h1")
    v1 = v1_thresholds(app_stack)
    try:
        swapped = time.monotonic()  # before: the app may see 2.0 before load() returns here
        app_stack.agent.load(MODEL, package_v2)
        new = listener.wait_for(
            "anomalies", lambda m: m.json()["version"] == "2.0", turbine="h1", count=3
        )
        assert all(m.json()["thresholds"] == V2_THRESHOLDS for m in new)
        assert not any(any(m.json()["anomalies"].values()) for m in new)
        listener.wait_for(
            "label/update",
            lambda m: m.json() == {"model_label_status": "Model loaded: 2.0"},
            turbine="h1",
            since=swapped,
        )
    finally:
        app_stack.agent.load(MODEL, app_stack.v1)
    # a version always comes with its own thresholds, and 1.0 never follows 2.0
    versions = []
    for message in listener.select("anomalies", "h1"):
        body = message.json()
        assert body["thresholds"] == (V2_THRESHOLDS if body["version"] == "2.0" else v1)
        versions.append(body["version"])
    first_v2 = versions.index("2.0")
    assert "1.0" not in versions[first_v2 : first_v2 + len(new)]


def test_broker_restart_reconnects_and_resubscribes(
    app_stack: Stack, start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app()
    sensors.prefill(["b1"])
    sensors.stream(["b1"])
    listener.wait_for("anomalies", turbine="b1")
    app_stack.broker.restart()
    restarted = time.monotonic()
    # the app subscribes again and publishes again; the retained label comes back
    listener.wait_for("anomalies", turbine="b1", since=restarted, count=3, timeout=30)
    listener.wait_for("label/update", turbine="b1", since=restarted, timeout=30)
    reconnects = [e for e in app.events("connected to the broker") if e["reconnect"]]
    assert {e["client"] for e in reconnects} == {"edge-app-src", "edge-app-pub"}


def test_no_model_at_start_then_loaded(
    app_stack: Stack, start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    start_app(model_name="later-model")
    sensors.prefill(["n1"])
    sensors.stream(["n1"])
    listener.wait_for(
        "label/update",
        lambda m: m.json() == {"model_label_status": "Model not loaded"},
        turbine="n1",
    )
    time.sleep(0.5)
    assert not listener.select("anomalies", "n1")
    try:
        app_stack.agent.load("later-model", app_stack.v1)
        (verdict,) = listener.wait_for("anomalies", turbine="n1")[:1]
        assert verdict.json()["model"] == "later-model"
    finally:
        with AgentClient(app_stack.agent.socket) as client:
            client.unload_model("later-model")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sd_notify_and_clean_shutdown(
    start_app: StartApp, listener: Listener, sensors: Sensors, signum: int
) -> None:
    app, notify = start_app()
    turbines = [f"s{i}" for i in range(8)]
    sensors.prefill(turbines)
    sensors.stream(turbines)
    listener.wait_for("anomalies", turbine="s7", count=4)
    assert notify.times_of("READY=1")
    pings = notify.times_of("WATCHDOG=1")
    assert len(pings) >= 4
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0  # WATCHDOG_USEC 2 s
    assert any(line.startswith("STATUS=Model loaded: 1.0") for _at, line in notify.lines())

    stop_at = time.monotonic()
    app.proc.signal(signum)
    code = app.proc.proc.wait(5)
    took = time.monotonic() - stop_at
    assert code == 0
    assert took < 2.0, took
    assert notify.times_of("STOPPING=1")
    assert app.events("edge-app stopped")
    time.sleep(0.3)
    for message in listener.select("anomalies"):  # nothing half-published
        check_verdict(message)


def test_bad_configuration_exits_2() -> None:
    base = short_dir()
    try:
        app = App(base, {"mqtt_topic": "wind-turbine/#", "tick_period_s": -1})
        assert app.proc.proc.wait(30) == 2
        output = app.proc.output()
        assert "mqtt_topic" in output and "tick_period_s" in output
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_replay_run_scores_the_file_and_exits_0(
    app_stack: Stack, start_app: StartApp, listener: Listener
) -> None:
    recording = app_stack.base / "recording.csv"
    write_csv(recording, ["r1", "r2"], 520)
    app, notify = start_app(wait=False, source="replay", replay_file=str(recording), replay_speed=0)
    assert app.proc.proc.wait(30) == 0
    for turbine in ("r1", "r2"):
        (verdict,) = listener.wait_for("anomalies", turbine=turbine, timeout=5)[:1]
        check_verdict(verdict)
    assert notify.times_of("READY=1") and notify.times_of("STOPPING=1")
    (stopped,) = app.events("edge-app stopped")
    assert stopped["samples"] == 1040 and stopped["verdicts"] == 2
