"""CPU of edge-app's MQTT client against paho-mqtt, at a farm's message rates.

    .venv/bin/python bench/mqtt_client.py [--turbines 1500] [--seconds 8]

Starts mosquitto on loopback (a plain listener, and a TLS one with throw-away
certificates) and measures, each in its own process so CPU is counted per
client:

- receiving: a sender publishes ``--turbines`` turbines at 20 Hz, one sample
  per message (30,000 messages/s at 1,500 turbines) and then 10 samples per
  ``{"samples": [...]}`` message (3,000/s); a subscriber only counts them.
  Subscribers: ``edgeapp.mqtt`` over plain TCP and over TLS, paho-mqtt over
  plain TCP. Figure: CPU microseconds per message (from the first message on),
  and the cores that makes at the offered rate.
- publishing: one verdict per turbine every 0.5 s, as the daemon does (one
  ``publish_many`` per tick for edgeapp; one ``publish`` per verdict for paho),
  QoS 0 and QoS 1 (with the PUBACKs back). Figure: CPU cores.

The ratio paho / edgeapp is the figure that decides which client the daemon
uses; both were measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.farm_scale import (  # noqa: E402
    MOSQUITTO,
    Child,
    _varint,
    mqtt_connect,
    run_counting_subscriber,
    sample_pool,
)
from edgeapp.mqtt import BrokerConfig, MqttClient, tls_context  # noqa: E402
from tests.tls import make_pki  # noqa: E402

RATE_HZ = 20.0
TICK_S = 0.5
VERDICT = json.dumps(
    {"ts": 1764000000000, "model": "wind-turbine", "version": "1.0",
     "scores": [0.1234567, 0.2345678, 0.3456789, 0.4567891, 0.5678912, 0.6789123],
     "thresholds": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
     "anomalies": {"vibration": False, "rotation": False, "voltage": False},
     "latency_ms": 123.456},
    separators=(",", ":"),
).encode()  # fmt: skip


# ---------------------------------------------------------------- roles (child processes)


def run_sender(port: int, turbines: int, per_message: int) -> None:
    """Publish every turbine at 20 Hz, ``per_message`` samples per message, until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    sock = mqtt_connect(port, f"bench-sender-{per_message}")
    pool = sample_pool(400)
    topics = [f"wind-turbine/t{i:05d}/raw-data".encode() for i in range(turbines)]
    headers = [struct.pack("!H", len(t)) + t for t in topics]
    if per_message == 1:
        bodies = [json.dumps(s, separators=(",", ":")).encode() for s in pool]
    else:
        bodies = [
            json.dumps({"samples": [pool[(k + j) % len(pool)] for j in range(per_message)]},
                       separators=(",", ":")).encode()
            for k in range(0, len(pool), per_message)
        ]  # fmt: skip
    period = per_message / RATE_HZ
    next_at = time.monotonic()
    k = 0
    while not stop.is_set():
        parts = []
        for i in range(turbines):
            payload = bodies[(i + k) % len(bodies)]
            parts.append(b"\x30" + _varint(len(headers[i]) + len(payload)) + headers[i] + payload)
        sock.sendall(b"".join(parts))
        k += 1
        next_at += period
        stop.wait(max(0.0, next_at - time.monotonic()))
    sock.close()


def run_receiver(port: int, impl: str, out: Path, certs: Path | None) -> None:
    """Count the sender's messages (every one: no prefill here) with ``impl``."""
    tls = None
    if certs is not None:
        tls = tls_context(certs / "ca.crt", certs / "device.crt", certs / "device.key")
    run_counting_subscriber(port, impl.removesuffix("-tls"), out, tls=tls, stream_max_bytes=1 << 20)


def run_publisher(
    port: int, impl: str, qos: int, *, turbines: int, seconds: float, out: Path
) -> None:
    """Publish one verdict per turbine per tick for ``seconds``; write the CPU seconds."""
    topics = [f"bench-out/t{i:05d}/anomalies" for i in range(turbines)]
    ticks = int(seconds / TICK_S)
    if impl == "paho":
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-paho-pub-{qos}")
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(65535)
        client.connect("127.0.0.1", port)
        client.loop_start()
        time.sleep(0.5)
        started = time.process_time()
        infos = []
        next_at = time.monotonic()
        for _ in range(ticks):
            infos = [client.publish(t, VERDICT, qos=qos) for t in topics]
            next_at += TICK_S
            time.sleep(max(0.0, next_at - time.monotonic()))
        infos[-1].wait_for_publish(10)
        cpu = time.process_time() - started
        client.disconnect()
        client.loop_stop()
    else:
        pub = MqttClient(broker=BrokerConfig(host="127.0.0.1", port=port), client_id="bench-pub")
        pub.start()
        pub.wait_connected(10)
        started = time.process_time()
        next_at = time.monotonic()
        for _ in range(ticks):
            pub.publish_many(((t, VERDICT) for t in topics), qos=qos)
            next_at += TICK_S
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + 10
        while pub.queued and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = time.process_time() - started
        pub.stop()
    out.write_text(json.dumps({"cpu_s": cpu, "messages": ticks * turbines}))


# ---------------------------------------------------------------- the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def me(*args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turbines", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--role", choices=["sender", "receiver", "publisher"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--impl", default="edgeapp")
    parser.add_argument("--per-message", type=int, default=1)
    parser.add_argument("--qos", type=int, default=0)
    parser.add_argument("--certs", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.role == "sender":
        run_sender(args.port, args.turbines, args.per_message)
        return
    if args.role == "receiver":
        run_receiver(args.port, args.impl, args.out, args.certs)
        return
    if args.role == "publisher":
        run_publisher(
            args.port, args.impl, args.qos, turbines=args.turbines, seconds=args.seconds,
            out=args.out,
        )  # fmt: skip
        return

    n, seconds = args.turbines, args.seconds
    with tempfile.TemporaryDirectory(prefix="windedge-mqtt-") as name:
        tmp = Path(name)
        pki = make_pki(tmp, servers=("server",), clients=("device",))
        plain, secure = free_port(), free_port()
        (tmp / "mosquitto.conf").write_text(
            f"listener {plain} 127.0.0.1\nallow_anonymous true\n"
            f"listener {secure} 127.0.0.1\ncafile {pki.ca}\ncertfile {pki.crt('server')}\n"
            f"keyfile {pki.key('server')}\nrequire_certificate true\n"
            "persistence false\nuser root\n"
        )
        broker = Child([MOSQUITTO, "-c", str(tmp / "mosquitto.conf")], tmp / "mosquitto.log")
        try:
            time.sleep(0.5)
            print(f"{n} turbines at {RATE_HZ:.0f} Hz, {seconds:.0f} s per figure; CPU in cores")
            for per_message in (1, 10):
                rate = n * RATE_HZ / per_message
                print(f"\nreceiving {per_message} sample(s) per message ({rate:,.0f} messages/s):")
                base = None
                for impl, port, certs in (
                    ("edgeapp", plain, None),
                    ("edgeapp-tls", secure, tmp),
                    ("paho", plain, None),
                ):
                    out = tmp / f"recv-{impl}-{per_message}.json"
                    argv = me("--role", "receiver", "--port", port, "--impl", impl, "--out", out)
                    receiver = Child(argv + (["--certs", certs] if certs else []), tmp / "r.log")
                    time.sleep(1.0)
                    sender = Child(
                        me("--role", "sender", "--port", plain, "--turbines", n,
                           "--per-message", per_message),
                        tmp / "s.log",
                    )  # fmt: skip
                    time.sleep(seconds)
                    sender.stop()
                    time.sleep(0.5)
                    receiver.stop()
                    stats = json.loads(out.read_text())
                    if stats["messages"] < 100:
                        print(f"  {impl:12s} too few messages ({stats['messages']}): longer run")
                        continue
                    us = stats["cpu_s"] / stats["messages"] * 1e6
                    base = base or us
                    print(
                        f"  {impl:12s} {us:5.1f} us/message ({stats['messages']:,} counted), "
                        f"{us * rate / 1e6:5.3f} cores at {rate:,.0f}/s, x{us / base:.2f}"
                    )
            print(f"\npublishing one verdict per turbine every {TICK_S} s ({n / TICK_S:,.0f}/s):")
            base = None
            for impl, qos in (("edgeapp", 0), ("edgeapp", 1), ("paho", 0), ("paho", 1)):
                out = tmp / f"pub-{impl}-{qos}.json"
                publisher = Child(
                    me("--role", "publisher", "--port", plain, "--impl", impl, "--qos", qos,
                       "--turbines", n, "--seconds", seconds, "--out", out),
                    tmp / "p.log",
                )  # fmt: skip
                publisher.proc.wait(seconds + 60)
                stats = json.loads(out.read_text())
                cores = stats["cpu_s"] / seconds
                base = base or cores
                us = stats["cpu_s"] / stats["messages"] * 1e6
                print(
                    f"  {impl:8s} QoS {qos}  {cores:5.3f} cores, "
                    f"{us:5.1f} us/verdict, x{cores / base:.2f}"
                )
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
