"""Loading and unloading hundreds of times must not grow the agent's memory."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

WARM_UP = 30
CYCLES = 300
SLACK_KB = 10 * 1024


def settled_rss_kb(agent: Any) -> int:
    """VmRSS after a short pause (freed pages go back asynchronously in places)."""
    time.sleep(0.2)
    return min(agent.rss_kb() for _ in range(3))


@pytest.mark.slow
def test_load_unload_cycles_do_not_grow_rss(start_agent: Any, packages: Any) -> None:
    agent = start_agent(config={"log_level": "WARNING"})
    client = agent.client
    x = np.random.default_rng(0).standard_normal((8, 6, 10, 10), dtype=np.float32)
    urls = [packages.v1, packages.v2]
    client.load_model("resident", packages.v1)  # a model that stays, as on a device

    def cycle(i: int) -> None:
        client.load_model("cycled", urls[i % 2])
        assert client.predict("cycled", x).shape == x.shape
        if i % 3 == 0:  # some hot swaps too
            client.load_model("cycled", urls[(i + 1) % 2])
        client.unload_model("cycled")

    for i in range(WARM_UP):
        cycle(i)
    before = settled_rss_kb(agent)
    started = time.monotonic()
    for i in range(CYCLES):
        cycle(i)
    elapsed = time.monotonic() - started
    after = settled_rss_kb(agent)
    print(  # the figures, for -s runs
        f"RSS {before / 1024:.1f} MB after {WARM_UP} warm-up cycles, {after / 1024:.1f} MB "
        f"after {CYCLES} more ({elapsed:.1f} s)"
    )
    assert after - before < SLACK_KB, (
        f"RSS grew {(after - before) / 1024:.1f} MB over {CYCLES} load/unload cycles "
        f"({before / 1024:.1f} -> {after / 1024:.1f} MB)"
    )
    assert [m.name for m in client.list_models()] == ["resident"]
