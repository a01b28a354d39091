"""edge-app as a process under faults of its surroundings.

A hung agent at SIGTERM; an agent socket that does not exist; two daemons
with the same MQTT client id; the journal's share of the log (one summary
line per interval, per-tick detail at DEBUG only).
"""

from __future__ import annotations

import signal
import time

from edgeapp_harness import Listener, Sensors, Stack, StartApp


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
