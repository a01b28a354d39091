"""End to end: simulator -> broker -> edge-app -> edge-agent (the model in models/) -> dashboard.

A vibration fault toggled in the page must turn that turbine's vibration light
red within 5 s, and clearing it must turn it green again; the other lights and
turbines stay as they were.

The model is the newest package in ``models/``. Its thresholds are used as
released when they keep this simulated farm's normal operation below them
(scored offline first, through the app's own feature pipeline and ONNX
Runtime); a model that flags normal operation (random weights) gets a variant
with thresholds at twice the highest normal score, signed with the development
key, so the test still checks the path from the page to the verdict and back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeagent.package import extract_package, load_trusted_keys
from edgeapp.features import PreprocessingParams, prepare_windows, score
from edgectl.demo import newest_package as newest_released
from simulator.generator import FarmGenerator
from tests.edgeapp.edgeapp_harness import DEV_KEYS, MODEL, Agent, App, Mosquitto, build_variant
from tests.harness import wait_until
from tests.simulator.sim_harness import Sim, browser_page

pytestmark = pytest.mark.timeout(240)

IDS = ["wt-001", "wt-002", "wt-003"]
SEED = 1
REPO = Path(__file__).resolve().parents[2]


def newest_package(dest: Path) -> Path:
    """The newest ``models/wind-turbine-<version>.tar.gz``, verified and unpacked at ``dest``."""
    archive, _version = newest_released(REPO / "models")
    extract_package(archive, dest, trusted_keys=load_trusted_keys(DEV_KEYS))
    return dest


def normal_scores(package: Path, seconds: float = 120.0) -> np.ndarray:
    """Scores of this farm's normal operation, one row per tick and turbine."""
    manifest = json.loads((package / "manifest.json").read_text())
    params = PreprocessingParams.from_block(manifest["preprocessing"])
    session = ort.InferenceSession(str(package / manifest["model_file"]))
    raw = FarmGenerator(len(IDS), seed=SEED).step(int(seconds * 20)).raw()
    rows = []
    for end in range(500, raw.shape[1] + 1, 10):  # a tick every 0.5 s
        windows = prepare_windows(raw[:, end - 500 : end], params)  # (T, W, 6, 10, 10)
        flat = windows.reshape(-1, *windows.shape[2:])
        out = session.run(None, {manifest["inputs"][0]["name"]: flat})[0]
        rows.append(score(windows, out.reshape(windows.shape), params).scores)
    return np.concatenate(rows)


def serving_package(base: Path) -> Path:
    released = newest_package(base / "released")
    manifest = json.loads((released / "manifest.json").read_text())
    thresholds = np.asarray(manifest["preprocessing"]["thresholds"])
    highest = normal_scores(released).max(axis=0)
    if np.all(highest < thresholds):
        return released
    print(f"released thresholds {thresholds} flag normal operation (max {highest}): recalibrated")
    return build_variant(
        released, base / "variant", version=f"{manifest['version']}.1", thresholds=2 * highest
    )


@pytest.fixture(scope="module")
def stack(base: Path, broker: Mosquitto) -> Iterator[Sim]:
    agent = Agent(base)
    app: App | None = None
    sim: Sim | None = None
    try:
        agent.start().close()
        agent.load(MODEL, serving_package(base))
        config = {
            "agent_socket": str(agent.socket),
            "mqtt_port": broker.port,
            "model_name": MODEL,
            "turbines": IDS,
            "tick_period_s": 0.5,
            "status_period_s": 1.0,
            "log_level": "INFO",
        }
        app = App(base, config)
        sim = Sim(base, broker.port, ["--ids", ",".join(IDS), "--seed", str(SEED)])
        yield sim
    finally:
        if sim is not None:
            sim.stop()
        if app is not None:
            app.proc.stop(15)
        agent.stop()


def light(page, turbine: str, group: str) -> str:
    cls = page.locator(f'.card[data-turbine="{turbine}"] .light[data-group="{group}"]')
    return cls.get_attribute("class") or ""


def test_a_vibration_fault_turns_the_vibration_light_red_and_clearing_it_green(
    browser, stack: Sim
) -> None:
    with browser_page(browser, "e2e") as watch:
        page = watch.page
        page.goto(stack.url + "/#wt-001")
        page.wait_for_selector("#conn.on", timeout=10_000)
        # the app scores a turbine once it holds 500 samples (25 s at 20 Hz)
        wait_until(
            lambda: all("ok" in light(page, t, "vibration").split() for t in IDS),
            60,
            what="every vibration light green",
            interval=0.2,
        )
        assert "Model loaded" in page.inner_text('.card[data-turbine="wt-001"] .label')
        watch.screenshot("normal")

        box = page.locator('.card[data-turbine="wt-001"] input.fault[data-kind="vibration"]')
        box.check()
        clicked = time.monotonic()
        wait_until(
            lambda: "on" in light(page, "wt-001", "vibration").split(),
            5.0,
            what="the vibration light red within 5 s",
            interval=0.1,
        )
        took = time.monotonic() - clicked
        watch.screenshot("fault")
        assert all("ok" in light(page, t, "vibration").split() for t in IDS[1:])
        assert page.locator('#overview .cell.anomalous[data-turbine="wt-001"]').count() == 1

        box.uncheck()
        wait_until(
            lambda: "ok" in light(page, "wt-001", "vibration").split(),
            40.0,
            what="the vibration light green again",
            interval=0.2,
        )
        watch.screenshot("cleared")
        assert int(page.inner_text("#verdicts-count")) > 10
        assert watch.errors == [] and watch.remote == []
        print(f"vibration light red {took:.2f} s after the click")
