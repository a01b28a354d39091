"""The dashboard in headless chromium, against a real broker and simulator process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edgeapp.edgeapp_harness import Listener, Mosquitto
from tests.harness import wait_until
from tests.simulator.sim_harness import Sim, browser_page, wait_text

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sim(base: Path, broker: Mosquitto) -> Iterator[Sim]:
    sim = Sim(base, broker.port, ["--turbines", "6", "--stopped", "--seed", "3"])
    yield sim
    assert sim.stop() == 0


def test_the_page_loads_with_no_console_error_and_nothing_fetched_from_elsewhere(
    browser, sim: Sim
) -> None:
    with browser_page(browser, "load") as watch:
        page = watch.page
        page.goto(sim.url + "/")
        page.wait_for_selector("#conn.on", timeout=10_000)
        assert page.locator("#overview .cell").count() == 6
        assert page.locator("#cards .card").count() == 6
        assert page.locator("#charts canvas").count() >= 5  # uPlot drew its charts
        assert page.inner_text("#n-turbines") == "6"
        cards = page.locator("#cards .card")
        for i in range(6):
            card = cards.nth(i)
            assert card.locator("input.fault").count() == 8
            assert card.locator(".light").count() == 3
        time.sleep(1.0)  # a few live updates
        watch.screenshot("loaded")
        assert watch.errors == []
        assert watch.remote == []


def test_starting_a_turbine_makes_data_flow_and_stopping_ends_it(
    browser, sim: Sim, broker: Mosquitto
) -> None:
    listener = Listener(broker.port, ["wind-turbine/+/raw-data"])
    try:
        with browser_page(browser, "start") as watch:
            page = watch.page
            page.goto(sim.url + "/#wt-002")
            page.wait_for_selector("#conn.on", timeout=10_000)
            time.sleep(1.0)
            assert page.inner_text("#samples-count") == "0"
            assert listener.select("raw-data", "wt-002") == []
            card = page.locator('.card[data-turbine="wt-002"]')
            card.locator(".startstop").click()
            wait_text(page, "#samples-count", lambda t: int(t) > 40, 10, "samples in the page")
            wait_until(
                lambda: float(card.locator(".rps").inner_text()) > 0.2, 15, what="rotor speed"
            )
            assert card.locator(".startstop").inner_text() == "Stop"
            assert "cell" in page.locator('#overview .cell[data-turbine="wt-002"]').get_attribute(
                "class"
            )
            listener.wait_for("raw-data", turbine="wt-002", timeout=5)
            received = listener.select("raw-data", "wt-002")
            samples = received[-1].json()
            body = samples.get("samples", [samples])
            assert set(body[0]) >= {"ts", "qx", "qy", "qz", "qw", "wind_speed_rps", "rps"}
            assert listener.select("raw-data", "wt-001") == []  # the others stay stopped
            watch.screenshot("running")

            # a fault toggled in the page reaches the simulator
            card.locator('input.fault[data-kind="bearing_wear"]').check()
            wait_until(
                lambda: (
                    [f["kind"] for f in sim.get("/api/turbines/wt-002")["faults"]]
                    == ["bearing_wear"]
                ),
                5,
                what="fault applied",
            )
            page.wait_for_selector('#overview .cell.faulted[data-turbine="wt-002"]', timeout=5000)
            card.locator('input.fault[data-kind="bearing_wear"]').uncheck()
            wait_until(lambda: sim.get("/api/turbines/wt-002")["faults"] == [], 5, what="cleared")

            card.locator(".startstop").click()
            wait_until(lambda: card.locator(".startstop").inner_text() == "Start", 5)
            time.sleep(0.5)
            count = len(listener.select("raw-data", "wt-002"))
            time.sleep(1.0)
            assert len(listener.select("raw-data", "wt-002")) == count
            assert watch.errors == [] and watch.remote == []
    finally:
        listener.close()


def test_bad_commands_are_clear_errors_and_the_simulator_keeps_running(sim: Sim) -> None:
    assert sim.post("/api/turbines/wt-009/command", {"action": "start"})[0] == 404
    status, body = sim.post("/api/turbines/wt-001/command", {"action": "explode"})
    assert status == 400 and "action" in body["error"]
    status, body = sim.post("/api/turbines/wt-001/command", b"{not json")
    assert status == 400
    status, body = sim.post(
        "/api/turbines/wt-001/command", {"action": "fault", "kind": "brake_drag", "intensity": 3}
    )
    assert status == 400 and "fraction" in body["error"]
    status, body = sim.post(
        "/api/turbines/wt-001/command", {"action": "fault", "kind": "stuck_sensor", "field": "x"}
    )
    assert status == 400
    assert sim.get("/api/turbines/wt-001")["faults"] == []
    assert sim.proc.alive()
    health = sim.get("/healthz")
    assert health["ok"] is True and health["broker_connected"] is True


def test_a_farm_of_1000_turbines_gets_an_overview_not_1000_cards(
    browser, base: Path, broker: Mosquitto
) -> None:
    big = Sim(base, broker.port, ["--turbines", "1000", "--publish-hz", "2"])
    try:
        with browser_page(browser, "farm-1000") as watch:
            page = watch.page
            page.goto(big.url + "/")
            page.wait_for_selector("#conn.on", timeout=15_000)
            assert page.locator("#overview .cell").count() == 1000
            assert page.locator("#cards .card").count() == 1  # the selected turbine's
            page.wait_for_selector("#overview .cell.waiting", timeout=10_000)
            page.locator('#overview .cell[data-turbine="wt-0777"]').click()
            page.wait_for_selector('.card[data-turbine="wt-0777"]', timeout=5000)
            assert page.inner_text("#selected-id") == "wt-0777"
            wait_text(page, "#samples-count", lambda t: int(t) > 20, 10, "samples of wt-0777")
            assert page.inner_text("#n-running") == "1000"
            watch.screenshot("overview")
            assert watch.errors == [] and watch.remote == []
    finally:
        assert big.stop() == 0


def test_mqtt_control_topics_start_stop_and_inject_faults(sim: Sim, broker: Mosquitto) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="control-test")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:

        def send(turbine: str, body: bytes) -> None:
            client.publish(f"windedge-sim/{turbine}/control", body, qos=1).wait_for_publish(5)

        send("wt-005", b'{"action": "start"}')
        wait_until(lambda: sim.get("/api/turbines/wt-005")["running"], 5, what="started")
        send("wt-005", b'{"action": "fault", "kind": "rotor_imbalance", "intensity": 4}')
        wait_until(
            lambda: (
                sim.get("/api/turbines/wt-005")["faults"]
                == [{"kind": "rotor_imbalance", "intensity": 4.0, "field": "rps"}]
            ),
            5,
            what="fault by MQTT",
        )
        send("wt-005", b"{garbage")  # refused, logged; the simulator carries on
        send("wt-404", b'{"action": "start"}')
        send("all", b'{"action": "clear"}')
        send("wt-005", b'{"action": "stop"}')
        wait_until(lambda: not sim.get("/api/turbines/wt-005")["running"], 5, what="stopped")
        assert sim.get("/api/turbines/wt-005")["faults"] == []
        assert sim.proc.alive()
        assert "command rejected" in sim.proc.output()
    finally:
        client.disconnect()
        client.loop_stop()
