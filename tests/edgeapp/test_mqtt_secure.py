"""edgeapp.mqtt against a site broker: TLS with a client certificate, a password file,
the will / online status topic, and QoS 1 verdicts kept while the broker is away.

The broker is a real mosquitto with certificates generated here (``cryptography``)
and a password file made by ``mosquitto_passwd``; paho-mqtt is the other party.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from edgeapp_harness import App, Mosquitto, Stack, short_dir, synthetic_samples, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edgeapp.mqtt import BrokerConfig, MqttClient, tls_context
from tests.tls import Pki, make_pki

USER, PASSWORD = "edge-app", "s3cret pass"
STATUS = "edge-app/status"


class SecureMosquitto(Mosquitto):
    """A mosquitto that wants TLS, a client certificate, and a user name and password."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.pki = make_pki(base / "pki", servers=("server",), clients=("device",))
        passwords = base / "passwords"
        subprocess.run(
            [shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", "-c",
             str(passwords), USER, PASSWORD],
            check=True, capture_output=True,
        )  # fmt: skip
        passwords.chmod(0o600)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {passwords}\n"
            f"cafile {self.pki.ca}\n"
            f"certfile {self.pki.crt('server')}\n"
            f"keyfile {self.pki.key('server')}\n"
            "require_certificate true\n"
            "persistence false\n"
            # run as root (as the tests may), mosquitto would read the password file as
            # the user "mosquitto", which cannot enter this private folder
            "user root\n"
        )


@pytest.fixture
def secure_broker() -> Iterator[SecureMosquitto]:
    base = short_dir()
    broker = SecureMosquitto(base)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(base, ignore_errors=True)


def config(broker: SecureMosquitto, **kw: Any) -> BrokerConfig:
    pki = broker.pki
    options: dict[str, Any] = {
        "tls": tls_context(pki.ca, pki.crt("device"), pki.key("device")),
        "username": USER,
        "password": PASSWORD,
        "reconnect_min_s": 1,
        "reconnect_max_s": 2,
        "keepalive_s": 5,
    }
    options.update(kw)
    return BrokerConfig(host="127.0.0.1", port=broker.port, **options)


class Peer:
    """paho-mqtt over TLS with the same credentials, subscribed to ``topics``."""

    def __init__(self, port: int, pki: Pki, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{time.monotonic_ns()}")
        client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.crt("device")),
                       keyfile=str(pki.key("device")))  # fmt: skip
        client.username_pw_set(USER, PASSWORD)
        client.on_connect = lambda c, *_a: c.subscribe([(t, 1) for t in topics])
        client.on_subscribe = lambda *_a: self.subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        if not self.subscribed.wait(10):
            raise AssertionError("paho peer did not subscribe")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _r in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_tls_client_certificate_and_password(secure_broker: SecureMosquitto) -> None:
    peer = Peer(secure_broker.port, secure_broker.pki, ["sensors/#"])
    received: list[bytes] = []
    sub = MqttClient(
        broker=config(secure_broker),
        client_id="sec-sub",
        subscription="sensors/+/raw",
        qos=1,
        on_message=lambda _t, p, _a: received.append(bytes(p)),
    )
    pub = MqttClient(broker=config(secure_broker), client_id="sec-pub")
    sub.start()
    pub.start()
    try:
        assert sub.wait_subscribed(10) and pub.wait_connected(10)
        # both directions, many messages, through TLS records of every size
        for i in range(200):
            peer.client.publish(f"sensors/t{i % 3}/raw", b"x" * (i * 97), qos=1)
        wait_until(lambda: len(received) == 200, 10, what="200 messages over TLS")
        assert [len(p) for p in received] == [i * 97 for i in range(200)]
        assert pub.publish_many([("sensors/t1/raw", b"%d" % i) for i in range(50)], qos=1) == 50
        wait_until(lambda: len(peer.payloads("sensors/t1/raw")) >= 50 + 67, 10, what="peer")
        wait_until(lambda: pub.queued == 0, 5, what="PUBACKs")
        assert pub.acked == 50
    finally:
        sub.stop()
        pub.stop()
        peer.close()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"password": "wrong"}, "not authorised"),
        ({"username": None, "password": None}, "not authorised"),
        ({"tls": "other-ca"}, "CERTIFICATE_VERIFY_FAILED"),
        ({"tls": "no-client-cert"}, "certificate"),  # TLS 1.3: an alert, or just an EOF
    ],
)
def test_refusals_are_reported_and_retried(
    secure_broker: SecureMosquitto, tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    from structlog.testing import capture_logs

    if change.get("tls") == "other-ca":
        change = {"tls": tls_context(make_pki(tmp_path).ca)}  # another CA
    elif change.get("tls") == "no-client-cert":
        change = {"tls": tls_context(secure_broker.pki.ca)}
    client = MqttClient(broker=config(secure_broker, **change), client_id="refused")
    with capture_logs() as logs:
        client.start()
        try:
            wait_until(
                lambda: sum(e["event"] == "cannot connect to the broker" for e in logs) >= 2,
                10,
                what="two refused attempts",
            )
            assert not client.connected and client.alive()
        finally:
            client.stop()
    errors = [e["error"] for e in logs if e["event"] == "cannot connect to the broker"]
    assert all(expected in error for error in errors), errors


def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent-ca.pem"
    with pytest.raises(ValueError, match=r"absent-ca\.pem"):
        tls_context(missing)
    pki = make_pki(tmp_path, servers=("server",), clients=("device",))
    with pytest.raises(ValueError, match="client certificate"):
        tls_context(pki.ca, pki.crt("device"), pki.key("server"))  # another certificate's key


def test_status_topic_online_will_and_clean_offline(secure_broker: SecureMosquitto) -> None:
    peer = Peer(secure_broker.port, secure_broker.pki, [STATUS])
    client = MqttClient(broker=config(secure_broker), client_id="status-a", status_topic=STATUS)
    client.start()
    try:
        wait_until(lambda: peer.payloads(STATUS) == [b"online"], 10, what="online")
        # the connection dies without DISCONNECT: the broker sends the will
        sock = client._sock  # cutting the wire under the client
        assert sock is not None
        sock.shutdown(2)
        wait_until(lambda: b"offline" in peer.payloads(STATUS), 10, what="the will")
        # it reconnects and says so again
        wait_until(lambda: peer.payloads(STATUS)[-1:] == [b"online"], 10, what="online again")
    finally:
        client.stop()
    wait_until(lambda: peer.payloads(STATUS)[-1:] == [b"offline"], 5, what="offline at stop")
    peer.close()
    # retained: a dashboard that connects later learns the state
    late = Peer(secure_broker.port, secure_broker.pki, [STATUS])
    try:
        wait_until(lambda: late.payloads(STATUS) == [b"offline"], 5, what="retained status")
        assert late.messages[0][2] is True
    finally:
        late.close()


def test_qos1_messages_wait_for_the_broker_bounded_and_in_order(
    secure_broker: SecureMosquitto,
) -> None:
    client = MqttClient(
        broker=config(secure_broker, reconnect_min_s=2, reconnect_max_s=2),
        client_id="queue",
        max_queued=30,
    )
    client.start()
    try:
        assert client.wait_connected(10)
        secure_broker.stop()
        wait_until(lambda: not client.connected, 5, what="the client to notice")
        for i in range(10):  # one at a time, then a batch: 20 more than the queue holds
            client.publish("out/verdicts", b"%d" % i, qos=1)
        batch = [("out/verdicts", b"%d" % i) for i in range(10, 50)]
        assert client.publish_many(batch, qos=1) == 30  # its 10 oldest went too
        assert client.queued == 30 and client.overflowed == 20
        assert client.publish("out/dashboard", b"qos0") is False  # QoS 0: dropped, counted
        secure_broker.start()
        peer = Peer(secure_broker.port, secure_broker.pki, ["out/#"])
        try:
            wait_until(lambda: len(peer.payloads("out/verdicts")) >= 30, 15, what="the queue")
            time.sleep(0.3)
            assert peer.payloads("out/verdicts") == [b"%d" % i for i in range(20, 50)]
            wait_until(lambda: client.queued == 0, 5, what="PUBACKs")
        finally:
            peer.close()
    finally:
        client.stop()
    assert client.unsent == 1


def test_the_daemon_through_tls_and_a_password(
    app_stack: Stack, secure_broker: SecureMosquitto
) -> None:
    pki = secure_broker.pki
    peer = Peer(secure_broker.port, pki, ["wind-turbine/+/anomalies", STATUS])
    app = App(
        app_stack.base,
        app_stack.app_config(
            mqtt_port=secure_broker.port,
            mqtt_tls=True,
            mqtt_ca_file=str(pki.ca),
            mqtt_cert_file=str(pki.crt("device")),
            mqtt_key_file=str(pki.key("device")),
            mqtt_username=USER,
            mqtt_client_id="edge-app-tls",
        ),
        env={"WINDEDGE_APP_MQTT_PASSWORD": PASSWORD},
        name="app-tls",
    )
    try:
        app.wait_event("subscribed")
        wait_until(lambda: peer.payloads(STATUS)[-1:] == [b"online"], 10, what="online")
        for begin in range(0, 500, 100):
            body = json.dumps({"samples": synthetic_samples(500, seed=3)[begin : begin + 100]})
            peer.client.publish("wind-turbine/tls1/raw-data", body, qos=1).wait_for_publish(5)
        wait_until(
            lambda: peer.payloads("wind-turbine/tls1/anomalies"), 20, what="a verdict over TLS"
        )
        verdict = json.loads(peer.payloads("wind-turbine/tls1/anomalies")[0])
        assert verdict["model"] == "wind-turbine" and len(verdict["scores"]) == 6
        started = app.events("edge-app started")[0]
        assert started["tls"] is True and "password" not in json.dumps(started)
        assert PASSWORD not in app.proc.output()
        assert app.proc.stop(10) == 0
        wait_until(lambda: peer.payloads(STATUS)[-1:] == [b"offline"], 5, what="offline")
    finally:
        if app.proc.alive():
            app.proc.kill()
        peer.close()


def test_an_unusable_tls_file_stops_the_daemon_with_exit_2(app_stack: Stack) -> None:
    app = App(
        app_stack.base,
        app_stack.app_config(mqtt_tls=True, mqtt_ca_file=str(app_stack.base / "absent.pem")),
        name="app-badtls",
    )
    assert app.proc.proc.wait(30) == 2
    assert "absent.pem" in app.proc.output()
