"""Closing the typed client ends the calls it has in flight, at once.

A daemon stopping while the agent hangs must not wait out the call's
deadline: ``close()`` from another thread ends every call in flight with an
error, and calls after it fail at once without touching the socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.client import AgentClient
from edgeagent.errors import AgentError
from edgeagent.wire.h2 import Status
from edgeagent.wire.server import Method, Server
from tests.harness import short_dir


@pytest.fixture
def hung_server() -> Iterator[tuple[Path, threading.Event]]:
    """A real wire server whose every call hangs until the event is set."""
    folder = short_dir()
    path = folder / "hung.sock"
    release = threading.Event()

    def hang(_request: bytes) -> bytes:
        release.wait(30)
        return b""

    server = Server(
        {
            "/AWS.SageMaker.Edge.Agent/DescribeModel": Method(parse=bytes, unary=hang),
            "/AWS.SageMaker.Edge.Agent/ListModels": Method(parse=bytes, unary=hang),
        },
        workers=4,
        max_message_bytes=1 << 20,
    )
    server.bind(path)
    server.start()
    try:
        yield path, release
    finally:
        release.set()
        server.stop(2.0)
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_close_cancels_calls_in_flight(hung_server: tuple[Path, threading.Event]) -> None:
    path, _release = hung_server
    client = AgentClient(path, timeout=8.0)
    outcomes: list[tuple[str, float]] = []

    def call(method: str) -> None:
        started = time.monotonic()
        try:
            if method == "describe":
                client.describe_model("wt")
            else:
                client.list_models()
        except AgentError as exc:
            outcomes.append((type(exc).__name__, time.monotonic() - started))
        else:
            outcomes.append(("answered", time.monotonic() - started))

    threads = [threading.Thread(target=call, args=(m,)) for m in ("describe", "list")]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # both calls are waiting for the hung server now
    closed = time.monotonic()
    client.close()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - closed < 1.0
    assert len(outcomes) == 2
    assert all(name == "UnavailableError" and took < 1.5 for name, took in outcomes), outcomes

    # after close, a call fails at once
    started = time.monotonic()
    with pytest.raises(AgentError, match="closed"):
        client.list_models()
    assert time.monotonic() - started < 0.1


def test_channel_close_reports_cancelled(hung_server: tuple[Path, threading.Event]) -> None:
    from edgeagent.wire.client import CallError, Channel

    path, _release = hung_server
    channel = Channel(path, max_message_bytes=1 << 20)
    errors: list[CallError] = []

    def call() -> None:
        try:
            channel.unary("/AWS.SageMaker.Edge.Agent/ListModels", b"", timeout=8.0)
        except CallError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    channel.close()
    thread.join(5)
    assert not thread.is_alive()
    assert [e.code for e in errors] == [Status.CANCELLED]
    assert "closed" in errors[0].message
