"""Fixtures of the edge-app tests: a real broker, agent and daemon per module or test.

The processes come from ``edgeapp_harness``; each fixture ends what it started.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgeapp_harness import (
    MODEL,
    V2_THRESHOLDS,
    Agent,
    App,
    Listener,
    Mosquitto,
    NotifySocket,
    Sensors,
    Stack,
    StartApp,
    build_variant,
    extract_bundled,
    short_dir,
)

_app_numbers = itertools.count()  # log and socket names stay unique across tests


@pytest.fixture(scope="module")
def app_stack() -> Iterator[Stack]:
    base = short_dir()
    broker = Mosquitto(base)
    agent = Agent(base)
    try:
        v1 = extract_bundled(base / "wind-turbine-1.0")
        broker.start()
        agent.start().close()
        agent.load(MODEL, v1)
        yield Stack(base=base, broker=broker, agent=agent, v1=v1, packages=base)
    finally:
        agent.stop()
        broker.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def package_v2(app_stack: Stack) -> Path:
    """The bundled model as version 2.0 with thresholds far above any score."""
    return build_variant(app_stack.v1, app_stack.base, version="2.0", thresholds=V2_THRESHOLDS)


@pytest.fixture
def listener(app_stack: Stack) -> Iterator[Listener]:
    peer = Listener(app_stack.broker.port)
    try:
        yield peer
    finally:
        peer.close()


@pytest.fixture
def sensors(app_stack: Stack) -> Iterator[Sensors]:
    peer = Sensors(app_stack.broker.port)
    try:
        yield peer
    finally:
        peer.close()


@pytest.fixture
def start_app(app_stack: Stack) -> Iterator[StartApp]:
    """``start_app(**config overrides) -> (App, NotifySocket)``; stopped after the test."""
    started: list[tuple[App, NotifySocket]] = []

    def start(*, wait: bool = True, **overrides: Any) -> tuple[App, NotifySocket]:
        """``wait``: until the app subscribed (samples sent before that are lost)."""
        index = next(_app_numbers)
        notify = NotifySocket(app_stack.base / f"notify-{index}.sock")
        app = App(
            app_stack.base,
            app_stack.app_config(**overrides),
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"},
            name=f"app-{index}",
        )
        started.append((app, notify))
        if wait:
            app.wait_event("subscribed")
        return app, notify

    try:
        yield start
    finally:
        for app, notify in started:
            if app.proc.alive():
                app.proc.stop(10)
            # shown by pytest only when the test failed
            lines = [ln for ln in app.proc.output().splitlines() if '"tick"' not in ln]
            print(f"---- {app.proc.log.name} without tick lines, last 6000 characters")
            print("\n".join(lines)[-6000:])
            notify.close()
            notify.path.unlink(missing_ok=True)
