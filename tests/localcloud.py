"""Fixtures around the local AWS stand-in (``cloud.local.LocalCloud``), for any test folder.

``tests/conftest.py`` re-exports them, so every test can ask for:

- ``local_cloud``: one stand-in per test module (fast "minute": 1 s), with
  things ``dev-1`` .. ``dev-3``; stopped at the end of the module;
- ``start_local_cloud(**LocalCloud kwargs)``: a stand-in of the test's own,
  stopped after the test (persistence, ports, restarts);
- ``new_thing()``: a fresh, registered thing name on ``local_cloud`` (tests that
  share the module's stand-in never see each other's jobs).

Each stand-in lives in a short temporary directory removed afterwards; every
process it started is ended even when the test failed.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.local import LocalCloud
from tests.harness import short_dir

FAST_MINUTE = 1.0  # a "minute" of job timeouts and rollout rates, in seconds

StartLocalCloud = Callable[..., LocalCloud]
NewThing = Callable[[], str]

_thing_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def local_cloud() -> Iterator[LocalCloud]:
    base = short_dir("lc-")
    cloud = LocalCloud(
        state_dir=base / "cloud", things=["dev-1", "dev-2", "dev-3"], minute_seconds=FAST_MINUTE
    )
    try:
        cloud.start()
        yield cloud
    finally:
        cloud.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def start_local_cloud() -> Iterator[StartLocalCloud]:
    started: list[tuple[LocalCloud, Path]] = []

    def start(**kwargs: Any) -> LocalCloud:
        base = short_dir("lc-")
        kwargs.setdefault("state_dir", base / "cloud")
        kwargs.setdefault("minute_seconds", FAST_MINUTE)
        cloud = LocalCloud(**kwargs)
        started.append((cloud, base))
        cloud.start()
        return cloud

    try:
        yield start
    finally:
        for cloud, base in started:
            cloud.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def new_thing(local_cloud: LocalCloud) -> NewThing:
    def make() -> str:
        name = f"thing-{next(_thing_numbers)}"
        local_cloud.provision_thing(name)
        return name

    return make
