"""The publisher thread: keeps the farm's streams on time and hands them to MQTT.

At each wake-up it generates exactly the samples that are due by the wall
clock (``rate_hz`` per turbine since the start), so the stream's rate is exact
whatever the jitter: a late wake-up sends a longer batch, never fewer samples.
After a stall longer than ``MAX_CATCH_UP_S`` (the machine suspended, say) the
generator still advances through the whole gap, but only the last second is
sent: a gap in the stream, as a real sensor link would show, rather than a
backlog in messages too large for the app.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import structlog

from simulator.farm import Farm

__all__ = ["Publisher"]

log = structlog.get_logger("simulator.publisher")

Sink = Callable[[Iterable[tuple[str, bytes]]], int]
MAX_CATCH_UP_S = 1.0


class Publisher:
    def __init__(self, farm: Farm, sink: Sink, *, publish_hz: float = 10.0) -> None:
        self._farm = farm
        self._sink = sink
        self._period = 1.0 / publish_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.messages = 0
        self.busy_s = 0.0  # time spent generating and publishing

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        rate = self._farm.rate_hz
        t0 = time.monotonic()
        generated = 0
        while not self._stop.is_set():
            began = time.monotonic()
            due = int((began - t0) * rate) - generated
            if due > 0:
                try:
                    keep = max(1, int(rate * MAX_CATCH_UP_S))
                    if due > keep:
                        log.warning("publisher fell behind: a gap in the streams", samples=due)
                    payloads = self._farm.tick(due, keep=keep)
                    self.messages += self._sink(payloads)
                except Exception:  # the thread must keep the stream going
                    log.exception("publishing failed")
                generated += due
            self.busy_s += time.monotonic() - began
            # next wake-up on the period grid
            elapsed = time.monotonic() - t0
            self._stop.wait(self._period - (elapsed % self._period))
