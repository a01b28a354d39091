"""Samples per second one simulator process generates and publishes; the dashboard's CPU.

    .venv/bin/python bench/sim_rate.py [--turbines 1000] [--seconds 20]

Part 1, in this process, flat out (no pacing), for a farm of ``--turbines``:
  a. the generator alone (``FarmGenerator.step``, 0.1 s of samples a call): the baseline;
  b. a. plus the raw-data payloads (``Farm.tick``: history for the dashboard, JSON);
  c. b. plus publishing them through the simulator's MQTT client to a real
     mosquitto on loopback (batched as the simulator sends them: 2 samples a message
     at 20 Hz; and one sample a message).
  Figures: samples/s, and the ratio to a. (``x baseline``); the real-time
  share is the CPU fraction one core needs for ``--turbines`` at 20 Hz.

Part 2, the real process: ``windfarm-sim run --turbines N`` at 20 Hz against
mosquitto for ``--seconds``, its CPU (user + system, from /proc) and the
samples it published, first with no dashboard open, then with one dashboard
client following the event stream (``/api/events?turbine=...``) and polling
``/api/overview``, as an open page does: the difference is the dashboard
server's CPU at that farm size.

Every process it starts is ended before it exits. Figures measured on a shared
machine move with its load: run it a few times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simulator.farm import Farm  # noqa: E402
from simulator.generator import FarmGenerator  # noqa: E402
from simulator.mqtt_link import MqttLink  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def mosquitto(folder: Path) -> Iterator[int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def flat_out(turbines: int, seconds: float, port: int | None, per_message: int) -> float:
    """Samples/s of generate (+ payloads when per_message > 0, + publish when port)."""
    rate = 20.0
    chunk = max(1, per_message) if per_message else 2
    if per_message == 0:
        gen = FarmGenerator(turbines, seed=1, rate_hz=rate)
        gen.step(chunk)
        begin, n = time.process_time(), 0
        while time.process_time() - begin < seconds:
            gen.step(chunk)
            n += chunk * turbines
        return n / (time.process_time() - begin)
    farm = Farm([f"wt-{i:04d}" for i in range(turbines)], seed=1, rate_hz=rate)
    link = None
    if port is not None:
        link = MqttLink(farm, host="127.0.0.1", port=port, client_id=f"bench-{per_message}")
        link.start()
        if not link.connected.wait(10):
            raise SystemExit("the bench could not connect to mosquitto")
    try:
        begin, n = time.process_time(), 0
        while time.process_time() - begin < seconds:
            payloads = farm.tick(chunk)
            if link is not None:
                link.publish_samples(payloads)
            n += chunk * turbines
        # the network thread's CPU counts too: process_time covers all threads
        return n / (time.process_time() - begin)
    finally:
        if link is not None:
            link.stop()


def follow_dashboard(url: str, turbine: str, stop: threading.Event) -> None:
    """What an open page does: follow the event stream, poll nothing else."""
    with urllib.request.urlopen(f"{url}/api/events?turbine={turbine}", timeout=10) as resp:  # noqa: S310
        while not stop.is_set():
            if not resp.readline():
                return


def process_run(
    turbines: int, seconds: float, port: int, folder: Path, dashboard: bool
) -> dict[str, float]:
    http = free_port()
    argv = [
        str(Path(sys.executable).with_name("windfarm-sim")),
        "run",
        "--turbines",
        str(turbines),
        "--mqtt-port",
        str(port),
        "--http-port",
        str(http),
        "--log-level",
        "WARNING",
    ]
    log = (folder / f"sim-{turbines}-{int(dashboard)}.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/healthz", timeout=1),  # noqa: S310
            ):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("windfarm-sim did not start")
            time.sleep(0.2)
        time.sleep(3.0)  # past start-up
        if dashboard:
            threading.Thread(
                target=follow_dashboard, args=(url, "wt-0001", stop), daemon=True
            ).start()
            time.sleep(1.0)

        def published() -> int:
            with urllib.request.urlopen(url + "/api/overview", timeout=5) as resp:  # noqa: S310
                return int(json.loads(resp.read())["published"])

        cpu0, n0, t0 = cpu_seconds(proc.pid), published(), time.monotonic()
        time.sleep(seconds)
        cpu1, n1, t1 = cpu_seconds(proc.pid), published(), time.monotonic()
        return {"cores": (cpu1 - cpu0) / (t1 - t0), "samples_per_s": (n1 - n0) / (t1 - t0)}
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turbines", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    n = args.turbines
    need = 20.0 * n
    with tempfile.TemporaryDirectory(prefix="sim-rate-") as tmp, mosquitto(Path(tmp)) as port:
        folder = Path(tmp)
        short = max(3.0, args.seconds / 4)
        print(f"simulator throughput, {n} turbines, one process, flat out (CPU time)\n")
        print(f"{'path':58s} {'samples/s':>11s} {'x baseline':>10s} {'cores @20Hz':>11s}")
        base = flat_out(n, short, None, 0)
        rows = [
            ("a. generator only (baseline)", base),
            ("b. + payloads (history, JSON), 2 samples/message", flat_out(n, short, None, 2)),
            ("c. + publish to mosquitto, 2 samples/message", flat_out(n, short, port, 2)),
            ("c'. + publish to mosquitto, 1 sample/message", flat_out(n, short, port, 1)),
        ]
        for label, rate in rows:
            print(f"{label:58s} {rate:11,.0f} {rate / base:10.3f} {need / rate:11.3f}")
        print(
            f"\nwindfarm-sim run --turbines {n} (20 Hz, 10 messages/s a turbine), "
            f"{args.seconds:g} s"
        )
        print(f"{'':34s} {'CPU cores':>9s} {'samples/s sent':>15s} {'of 20 Hz':>9s}")
        quiet = process_run(n, args.seconds, port, folder, dashboard=False)
        watched = process_run(n, args.seconds, port, folder, dashboard=True)
        for label, r in (("no dashboard open", quiet), ("one dashboard following", watched)):
            print(
                f"{label:34s} {r['cores']:9.3f} {r['samples_per_s']:15,.0f} "
                f"{r['samples_per_s'] / need:9.3f}"
            )
        print(
            f"dashboard server CPU at {n} turbines: {watched['cores'] - quiet['cores']:+.3f} cores"
        )


if __name__ == "__main__":
    main()
