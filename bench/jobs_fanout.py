"""How fast the local AWS stand-in starts, and how long a job takes to reach 100 devices.

Prints, measured in one run on this machine:

- ``edgectl cloud up`` readiness: ``LocalCloud.start()`` until mosquitto, moto's
  S3 and the Jobs emulator all answer (median of ``--starts`` runs);
- fan-out of one job to N devices (``--devices``, 100), each its own MQTT
  connection speaking the device-side Jobs protocol (notify-next ->
  start-next -> update SUCCEEDED): time from CreateJob until every device got
  its notify-next, and until every execution is SUCCEEDED (median of ``--jobs``);
- the baseline: the same N connections receiving one plain MQTT message each
  from one publisher through the same broker, so the ratio says what the
  emulator adds over the broker itself.

Run: .venv/bin/python bench/jobs_fanout.py [--devices 100] [--jobs 3] [--starts 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.local import LocalCloud


class Device:
    """One device: its own MQTT connection, answering jobs like an updater would."""

    def __init__(self, port: int, thing: str, bench: Fanout) -> None:
        self.thing = thing
        self.bench = bench
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-{thing}"
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        base = f"$aws/things/{thing}/jobs"
        self.base = base
        self.client.subscribe(
            [
                (f"{base}/notify-next", 1),
                (f"{base}/start-next/accepted", 1),
                (f"{base}/+/update/accepted", 1),
                (f"bench/{thing}", 1),
            ]
        )
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if msg.topic.startswith("bench/"):
            self.bench.mark("baseline", self.thing, now)
            return
        body = json.loads(msg.payload)
        if msg.topic.endswith("/notify-next"):
            if "execution" in body:
                self.bench.mark("notified", self.thing, now)
                client.publish(f"{self.base}/start-next", json.dumps({"clientToken": "s"}), qos=1)
        elif msg.topic.endswith("/start-next/accepted"):
            ex = body.get("execution")
            if ex:
                client.publish(
                    f"{self.base}/{ex['jobId']}/update",
                    json.dumps(
                        {
                            "status": "SUCCEEDED",
                            "expectedVersion": ex["versionNumber"],
                            "statusDetails": {"stage": "committed"},
                            "clientToken": "u",
                        }
                    ),
                    qos=1,
                )
        elif msg.topic.endswith("/update/accepted"):
            self.bench.mark("done", self.thing, now)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Fanout:
    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.seen: dict[str, dict[str, float]] = {}
        self.all_in: dict[str, threading.Event] = {}

    def reset(self, *kinds: str) -> None:
        with self.lock:
            for kind in kinds:
                self.seen[kind] = {}
                self.all_in[kind] = threading.Event()

    def mark(self, kind: str, thing: str, when: float) -> None:
        with self.lock:
            seen = self.seen.get(kind)
            if seen is None or thing in seen:
                return
            seen[thing] = when
            if len(seen) == self.n:
                self.all_in[kind].set()

    def last(self, kind: str, timeout: float) -> float:
        if not self.all_in[kind].wait(timeout):
            raise SystemExit(f"only {len(self.seen[kind])}/{self.n} devices reached {kind}")
        return max(self.seen[kind].values())


def bench_start(starts: int) -> list[float]:
    times = []
    for _ in range(starts):
        base = Path(tempfile.mkdtemp(prefix="lcb-"))
        cloud = LocalCloud(state_dir=base / "cloud")
        t0 = time.perf_counter()
        cloud.start()
        times.append(time.perf_counter() - t0)
        cloud.stop()
        shutil.rmtree(base, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()

    starts = bench_start(args.starts)
    print(
        f"cloud up ready: median {statistics.median(starts):.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in starts)})"
    )

    things = [f"turbine-{i:03d}" for i in range(args.devices)]
    base = Path(tempfile.mkdtemp(prefix="lcb-"))
    cloud = LocalCloud(state_dir=base / "cloud", things=things)
    t0 = time.perf_counter()
    cloud.start()
    print(f"cloud up with {args.devices} things registered: {time.perf_counter() - t0:.2f} s")
    bench = Fanout(args.devices)
    devices = [Device(cloud.endpoints.mqtt_port, t, bench) for t in things]
    publisher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench")
    publisher.connect("127.0.0.1", cloud.endpoints.mqtt_port)
    publisher.loop_start()
    try:
        time.sleep(1.0)  # every subscription acknowledged
        baseline, notified, done = [], [], []
        for run in range(args.jobs):
            bench.reset("baseline")
            t0 = time.perf_counter()
            for thing in things:
                publisher.publish(f"bench/{thing}", b'{"x": 1}', qos=1)
            baseline.append(bench.last("baseline", 30) - t0)

            bench.reset("notified", "done")
            t0 = time.perf_counter()
            cloud.jobs.create_job(
                f"fanout-{run}", targets=things, document={"type": "new_model", "run": run}
            )
            notified.append(bench.last("notified", 60) - t0)
            done.append(bench.last("done", 60) - t0)
            status = cloud.jobs.describe_job(f"fanout-{run}")["status"]
            if status != "COMPLETED":
                raise SystemExit(f"job fanout-{run} ended {status}, not COMPLETED")
        b, nt, d = (statistics.median(x) for x in (baseline, notified, done))
        print(f"{args.devices} devices, median of {args.jobs} jobs:")
        print(f"  baseline: one plain MQTT message to each device  {b * 1000:8.1f} ms")
        print(
            f"  job created -> every device notified (notify-next) {nt * 1000:8.1f} ms"
            f"  ({nt / b:.1f}x baseline)"
        )
        print(
            f"  job created -> every execution SUCCEEDED           {d * 1000:8.1f} ms"
            f"  ({d / b:.1f}x baseline)"
        )
        print(
            f"  per execution (start-next + update, end to end)    "
            f"{d / args.devices * 1000:8.2f} ms"
        )
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        for dev in devices:
            dev.close()
        cloud.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
