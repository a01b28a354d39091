"""config/mosquitto-bridge.conf forwards verdicts to a mutual-TLS broker standing in for AWS IoT.

Two real mosquitto processes on loopback: the "cloud" one accepts only TLS
clients with a certificate of its CA (as AWS IoT Core does); the device's
own broker loads the bridge template, rendered with the cloud's port and
the test's certificates in place of /etc/windedge/bridge/. A verdict
published on the device arrives in the cloud; topics the bridge does not
name stay on the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import REPO
from paho.mqtt.enums import CallbackAPIVersion

from tests.edgeapp.edgeapp_harness import MOSQUITTO, Mosquitto
from tests.harness import short_dir, wait_until
from tests.tls import Pki, make_pki

TEMPLATE = REPO / "config" / "mosquitto-bridge.conf"
THING = "turbine-farm-01"
# where install-device lays the bridge's certificate files out
INSTALLED = {
    "/etc/windedge/bridge/AmazonRootCA1.pem": "ca",
    "/etc/windedge/bridge/device.pem.crt": "crt",
    "/etc/windedge/bridge/private.pem.key": "key",
}


def render(template: str, *, cloud_port: int, pki: Pki) -> str:
    """The template with the cloud's address and the test's certificates."""
    files = {"ca": pki.ca, "crt": pki.crt(THING), "key": pki.key(THING)}
    lines = []
    replaced: set[str] = set()
    for line in template.splitlines():
        words = line.split()
        if words[:1] == ["address"]:
            lines.append(f"address 127.0.0.1:{cloud_port}")
            replaced.add("address")
        elif len(words) == 2 and words[1] in INSTALLED:
            lines.append(f"{words[0]} {files[INSTALLED[words[1]]]}")
            replaced.add(words[1])
        else:
            lines.append(line)
    assert replaced == {"address", *INSTALLED}, f"the template lacks {set(INSTALLED) - replaced}"
    return "\n".join(lines) + "\n"


class Peer:
    """A paho client of the cloud broker that keeps what it receives."""

    def __init__(self, port: int, pki: Pki, client: str | None = "dashboard") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{client}")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.load_verify_locations(pki.ca)
        if client is not None:
            context.load_cert_chain(pki.crt(client), pki.key(client))
        self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.port = port

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused.append(str(reason))
            return
        client.subscribe("wind-turbine/#", qos=1)
        self.connected.set()

    def start(self) -> Peer:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def brokers() -> Iterator[tuple[Mosquitto, Mosquitto, Pki]]:
    if not shutil.which(MOSQUITTO) and not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto missing: scripts/setup.sh installs it")
    base = short_dir("we-bridge-")
    pki = make_pki(base / "pki", servers=("cloud",), clients=(THING, "dashboard"))
    (base / "cloud").mkdir()
    (base / "device").mkdir()
    if os.geteuid() == 0:
        # started as root, mosquitto reads certificates as its own user (as the
        # bridge's files in /etc/windedge/bridge are owned by it)
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("mosquitto")
            for path in [base, *base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
    cloud = Mosquitto(base / "cloud")
    cloud.conf.write_text(
        f"listener {cloud.port} 127.0.0.1\n"
        f"cafile {pki.ca}\ncertfile {pki.crt('cloud')}\nkeyfile {pki.key('cloud')}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        "allow_anonymous false\npersistence false\nconnection_messages true\n"
        "log_type all\n"
    )
    device = Mosquitto(base / "device")
    device.conf.write_text(
        f"listener {device.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        + render(TEMPLATE.read_text(), cloud_port=cloud.port, pki=pki)
    )
    try:
        cloud.start()
        device.start()
        yield cloud, device, pki
    finally:
        device.stop()
        cloud.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_verdict_reaches_the_cloud_over_mutual_tls(
    brokers: tuple[Mosquitto, Mosquitto, Pki],
) -> None:
    cloud, device, pki = brokers
    peer = Peer(cloud.port, pki).start()
    local = paho.Client(CallbackAPIVersion.VERSION2, client_id="edge-app-pub")
    local.connect("127.0.0.1", device.port)
    local.loop_start()
    try:
        assert peer.connected.wait(15), peer.refused
        assert cloud.proc is not None
        wait_until(
            lambda: f"as {THING}-bridge" in cloud.proc.output(),  # type: ignore[union-attr]
            30,
            "the bridge connected to the cloud broker",
        )
        verdict = {
            "ts": 1764680000000,
            "model": "wind-turbine",
            "version": "1.0",
            "scores": [0.1, 0.2, 0.1, 0.3, 0.2, 0.1],
            "thresholds": [0.5] * 6,
            "anomalies": {"vibration": False, "rotation": False, "voltage": False},
            "latency_ms": 4.2,
        }
        label = {"model_label_status": "Model loaded: 1.0"}

        def published() -> bool:
            # the bridge subscribes on the device when it connects: publish until it carries
            local.publish("wind-turbine/t1/raw-data", b'{"qx": 0}', qos=1)
            local.publish("wind-turbine/t1/dashboard/update", b"{}", qos=1)
            local.publish("wind-turbine/t1/anomalies", json.dumps(verdict), qos=1)
            local.publish("wind-turbine/t1/label/update", json.dumps(label), qos=1)
            return any(t == "wind-turbine/t1/label/update" for t, _ in peer.messages)

        wait_until(published, 30, "a verdict on the cloud broker", interval=0.5)
        topics = {t for t, _ in peer.messages}
        assert topics == {"wind-turbine/t1/anomalies", "wind-turbine/t1/label/update"}
        payloads = dict(peer.messages)
        assert json.loads(payloads["wind-turbine/t1/anomalies"]) == verdict
        assert json.loads(payloads["wind-turbine/t1/label/update"]) == label
        # the cloud knew the bridge by its certificate
        assert f"u'{THING}'" in cloud.proc.output()
    finally:
        local.disconnect()
        local.loop_stop()
        peer.close()


def test_the_cloud_broker_refuses_a_client_without_a_certificate(
    brokers: tuple[Mosquitto, Mosquitto, Pki],
) -> None:
    cloud, _device, pki = brokers
    anonymous = Peer(cloud.port, pki, client=None)
    try:
        with contextlib.suppress(ssl.SSLError, OSError):  # TLS 1.3 may fail only later
            anonymous.start()
        assert not anonymous.connected.wait(3)
    finally:
        anonymous.close()
    authorised = Peer(cloud.port, pki).start()  # the same broker, with a certificate
    try:
        assert authorised.connected.wait(15), authorised.refused
    finally:
        authorised.close()
