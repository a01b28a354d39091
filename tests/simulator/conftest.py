"""Fixtures of the simulator tests: a real broker, the simulator, headless chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edgeapp.edgeapp_harness import Mosquitto
from tests.harness import short_dir
from tests.simulator.sim_harness import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = short_dir("we-sim-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(base: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(base)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: scripts/setup.sh installs it")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
