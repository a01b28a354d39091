"""edge-app as a process under faults of its surroundings.

A hung agent at SIGTERM; an agent socket that does not exist; two daemons
with the same MQTT client id; the journal's share of the log (one summary
line per interval, per-tick detail at DEBUG only); junk turbine ids that
filled every slot.
"""

from __future__ import annotations

import json
import signal
import time

from edgeapp_harness import Listener, Sensors, Stack, StartApp, synthetic_samples, wait_until

SAMPLE_BODY = {k: v for k, v in synthetic_samples(1, seed=0)[0].items() if k != "ts"}


def test_sigterm_while_the_agent_hangs_ends_within_2_s(
    app_stack: Stack, start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app(agent_timeout_s=10.0)
    turbines = ["w1", "w2"]
    sensors.prefill(turbines)
    sensors.stream(turbines)
    listener.wait_for("anomalies", turbine="w2", count=2)
    agent = app_stack.agent.proc
    assert agent is not None
    agent.signal(signal.SIGSTOP)  # the agent hangs: calls wait for an answer
    try:
        time.sleep(1.0)  # a tick's call is in flight now
        stop_at = time.monotonic()
        app.proc.signal(signal.SIGTERM)
        code = app.proc.proc.wait(15)
        took = time.monotonic() - stop_at
    finally:
        agent.signal(signal.SIGCONT)
    assert code == 0
    assert took < 2.2, took
    assert app.events("edge-app stopped")


def test_a_missing_agent_socket_is_reported_with_its_reason_then_rate_limited(
    app_stack: Stack, start_app: StartApp
) -> None:
    missing = app_stack.base / "no-agent.sock"
    app, _notify = start_app(
        agent_socket=str(missing),
        agent_retry_min_s=0.1,
        agent_retry_max_s=0.2,
        agent_log_interval_s=1.0,
        log_summary_interval_s=1.0,
    )
    first = app.wait_event("agent unavailable", timeout=10)
    assert str(missing) in first["reason"]
    assert "does not exist" in first["reason"]
    started = time.monotonic()
    time.sleep(3.2)
    reports = app.events("agent unavailable")
    # ~16 attempts in 3.2 s, but at most one line per second after the first
    assert 3 <= len(reports) <= 5, reports
    assert sum(r["failures"] for r in reports[1:]) >= 8
    summary = app.wait_event("summary", timeout=5)  # log_summary_interval_s 1.0
    assert summary["status"] == "unavailable" and "does not exist" in summary["reason"]
    assert time.monotonic() - started < 5


def test_one_summary_line_per_interval_and_tick_detail_only_at_debug(
    start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app(log_summary_interval_s=1.0)
    debug_app, _ = start_app(log_level="DEBUG", mqtt_client_id="edge-app-dbg")
    turbines = ["y1", "y2"]
    sensors.prefill(turbines)
    sensors.stream(turbines)
    listener.wait_for("anomalies", turbine="y2", count=2)
    time.sleep(3.5)
    assert not app.events("tick")
    summaries = app.events("summary")
    assert 3 <= len(summaries) <= 6, len(summaries)
    last = summaries[-1]
    assert last["level"] == "info"
    assert last["interval_s"] == 1.0 or 0.8 < last["interval_s"] < 1.5
    assert 3 <= last["ticks"] <= 5  # tick_period_s 0.25
    assert last["verdicts"] >= 4 and last["turbines"] == 2
    assert last["messages"] >= 30 and last["samples"] >= 30
    assert last["published"] >= last["verdicts"]
    for key in ("tick_ms_p50", "tick_ms_max", "predict_ms_p50", "predict_ms_max",
                "verdict_latency_ms_max"):  # fmt: skip
        assert isinstance(last[key], float) and last[key] >= 0.0, key
    assert last["tick_ms_p50"] <= last["tick_ms_max"]
    # the default interval is a minute: the debug app has not summarised yet, but
    # logs every tick
    ticks = debug_app.events("tick")
    assert len(ticks) >= 10 and all(t["level"] == "debug" for t in ticks)


def test_two_daemons_with_one_client_id_are_named_as_the_likely_cause(
    start_app: StartApp,
) -> None:
    first, _ = start_app(mqtt_client_id="twin", mqtt_reconnect_min_s=1, mqtt_reconnect_max_s=1)
    second, _ = start_app(
        wait=False, mqtt_client_id="twin", mqtt_reconnect_min_s=1, mqtt_reconnect_max_s=1
    )

    def named() -> list[dict[str, object]]:
        return [
            e
            for app in (first, second)
            for e in app.events("another MQTT client is probably using this client id")
        ]

    wait_until(named, 15, what="the likely cause in a log")
    event = named()[0]
    assert event["level"] == "error"
    assert "same client id" in str(event["likely_cause"])
    assert "mqtt_client_id" in str(event["likely_cause"])
    assert str(event["client"]).startswith("twin-")


def test_the_daemon_frees_slots_of_silent_turbines(
    start_app: StartApp, listener: Listener, sensors: Sensors
) -> None:
    app, _notify = start_app(max_turbines=8, turbine_evict_s=1.0, log_summary_interval_s=0.5)
    for i in range(40):
        sensors.publish_raw(sensors.topic(f"junk{i}"), json.dumps(SAMPLE_BODY).encode())
    app.wait_event("input dropped", lambda e: e["reason"] == "too_many_turbines")
    sensors.publish_raw(sensors.topic("real1"), json.dumps(SAMPLE_BODY).encode())
    app.wait_event("summary", lambda e: (e["refused"] or {}).get("too_many_turbines", 0) > 0)
    # the junk falls silent and gives its slots back; the real turbine gets verdicts
    app.wait_event("turbines evicted", timeout=10)
    sensors.prefill(["real1"])
    sensors.stream(["real1"])
    listener.wait_for("anomalies", turbine="real1", timeout=15)
    evictions = app.events("turbines evicted")
    assert sum(e["count"] for e in evictions) == 8
    assert all(e["examples"][0].startswith("junk") for e in evictions)
