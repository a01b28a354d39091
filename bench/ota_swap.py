"""OTA on the local stand-in: job creation -> new version serving, under continuous load.

    .venv/bin/python -m bench.ota_swap [--sizes 1,50] [--rounds 3]

Starts the local AWS stand-in (mosquitto with mutual TLS, moto S3, the IoT
Jobs emulator, the credentials provider), a real agent serving the bundled
1.0 and a real ``edge-ota`` connected as a thing. For each package size it
builds signed packages whose model carries that many MB of incompressible
weights, uploads them, and times, from ``create_job``:

- for presigned-URL jobs first (``edge-ota`` fetches with urllib3), then
  for S3 jobs (boto3, in a child process, with credentials from the IoT
  credentials provider):
  until the agent serves the new version (``DescribeModel`` names its
  directory), and until the job is SUCCEEDED in the emulator;

while a client predicts without pause (failed predictions are counted). The
baseline, measured in the same run, is the agent's own hot swap of the same
package (``LoadModel`` of an unpacked copy): what the updater adds on top is
download, verification, extraction, reporting and its live check. Finally
``edge-ota``'s resident memory (VmRSS, and the high-water mark VmHWM), and
the peak of its short-lived S3 download children (``python -m ota.s3fetch``,
which alone load boto3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._agent import DEV_KEYS, running_agent
from cloud.local import LocalCloud
from edgeagent.client import AgentClient
from edgeagent.package import build_package, extract_package, load_private_key, load_trusted_keys

ROOT = Path(__file__).resolve().parent.parent
MODEL = "wt"


def heavy_onnx(path: Path, megabytes: float, seed: int) -> Path:
    """input [N,6,10,10] -> input + 0 * sum(weights): ``megabytes`` of random float32 weights."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).standard_normal(
        int(megabytes * 1024 * 1024 / 4), dtype=np.float32
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["w"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["input", "nothing"], ["output"]),
        ],
        "heavy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, 10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6, 10, 10])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def build(folder: Path, megabytes: float, version: str, seed: int) -> Path:
    from cloud.autoencoder import default_preprocessing_block

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = heavy_onnx(folder / f"heavy-{version}.onnx", megabytes, seed)
    return build_package(
        model_path=onnx_path,
        name=MODEL,
        version=version,
        preprocessing=default_preprocessing_block(),
        golden_input=np.random.default_rng(5).standard_normal((4, 6, 10, 10), dtype=np.float32),
        signing_key=load_private_key(DEV_KEYS / "windedge-dev.key"),
        out_path=folder / version,
    )


class Load:
    """Predictions without pause on their own connection."""

    def __init__(self, socket: Path) -> None:
        self.ok = 0
        self.failed = 0
        self._stop = threading.Event()
        self._client = AgentClient(socket, timeout=10)
        self._x = np.zeros((1, 6, 10, 10), dtype=np.float32)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.predict(MODEL, self._x)
                self.ok += 1
            except Exception:  # noqa: BLE001 - every failure counts, whatever it is
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


class ChildPeak:
    """The highest VmHWM of ``edge-ota``'s S3 download children (``python -m ota.s3fetch``)."""

    def __init__(self, parent: int) -> None:
        self.peak_mb = 0
        self._parent = parent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    status = (entry / "status").read_text()
                    if f"\nPPid:\t{self._parent}\n" not in status:
                        continue
                    if b"ota.s3fetch" in (entry / "cmdline").read_bytes():
                        self.peak_mb = max(self.peak_mb, memory(int(entry.name))["VmHWM"])
                except (OSError, KeyError):
                    continue  # it ended meanwhile

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,50", help="package sizes in MB (1,50)")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per size (3)")
    parser.add_argument(
        "--sources",
        default="url,s3",
        help="presigned URL jobs first (no boto3 in the updater), then S3 jobs (url,s3)",
    )
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="windedge-ota-bench-"))
    ota: subprocess.Popen[bytes] | None = None
    try:
        with LocalCloud(state_dir=work / "cloud") as cloud, running_agent() as (agent, _pid, _pkg):
            thing = "bench-turbine"
            ep = cloud.endpoints
            env_values = {
                k.removeprefix("WINDEDGE_OTA_").lower(): v
                for k, v in cloud.env_for(thing).items()
                if k.startswith("WINDEDGE_OTA_")
            }
            config = {
                **env_values,
                "model_name": MODEL,
                "state_dir": str(work / "ota"),
                "models_dir": str(work / "models"),
                "trusted_keys": str(DEV_KEYS),
                "agent_socket": str(agent.socket_path),
                "allow_http_urls": True,
                "progress_interval_s": 1.0,
                "log_level": "WARNING",
            }
            conf = work / "ota.toml"
            conf.write_text(
                "[ota]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("WINDEDGE_")}
            ota = subprocess.Popen(
                [sys.executable, "-m", "ota", "--config", str(conf)],
                env=env,
                stdout=(work / "ota.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            time.sleep(3.0)
            print(f"edge-ota idle: {memory(ota.pid)} MB (loaded machine: 2 cores shared)")
            version = 1
            results: list[dict[str, Any]] = []
            for source, megabytes in [(src, mb) for src in args.sources.split(",") for mb in sizes]:
                serve_s, done_s, base_s, failed, ok = [], [], [], 0, 0
                children = ChildPeak(ota.pid)
                for _ in range(args.rounds):
                    version += 1
                    tag = f"{version}.0"
                    archive = build(work / "pkgs", megabytes, tag, seed=version)
                    key = f"models/{archive.name}"
                    cloud.s3_client().put_object(
                        Bucket=ep.bucket, Key=key, Body=archive.read_bytes()
                    )
                    # baseline: the agent's own hot swap of the same package, then back
                    unpacked = work / "baseline" / tag
                    unpacked.parent.mkdir(parents=True, exist_ok=True)
                    extract_package(archive, unpacked, trusted_keys=load_trusted_keys(DEV_KEYS))
                    before = agent.describe_model(MODEL).url
                    t = time.perf_counter()
                    agent.load_model(MODEL, unpacked)
                    base_s.append(time.perf_counter() - t)
                    agent.load_model(MODEL, before)
                    shutil.rmtree(unpacked)

                    load = Load(agent.socket_path)
                    target = str(work / "models" / MODEL / tag)
                    job = f"bench-{version}"
                    t0 = time.perf_counter()
                    document = {
                        "type": "new_model",
                        "model_name": MODEL,
                        "model_version": tag,
                        "model_package_bucket": ep.bucket,
                        "model_package_key": key,
                    }
                    presigned = None
                    if source == "url":
                        placeholder = f"https://s3.{ep.region}.amazonaws.com/{ep.bucket}/{key}"
                        document["model_package_url"] = (
                            "${aws:iot:s3-presigned-url:" + placeholder + "}"
                        )
                        presigned = {"expiresInSec": 600}
                    cloud.jobs.create_job(
                        job, targets=[thing], document=document, presigned_url_config=presigned
                    )
                    served_at = None
                    while True:
                        if served_at is None and agent.describe_model(MODEL).url == target:
                            served_at = time.perf_counter() - t0
                        status = cloud.jobs.describe_execution(job, thing)["status"]
                        if status not in ("QUEUED", "IN_PROGRESS"):
                            break
                        if time.perf_counter() - t0 > 300:
                            raise RuntimeError(f"job {job} still {status} after 300 s")
                        time.sleep(0.01)
                    done_s.append(time.perf_counter() - t0)
                    load.stop()
                    if status != "SUCCEEDED" or served_at is None:
                        raise RuntimeError(f"job {job} ended {status}; see {work / 'ota.log'}")
                    serve_s.append(served_at)
                    failed += load.failed
                    ok += load.ok
                mem = memory(ota.pid)
                child_peak = children.stop()
                row = {
                    "source": source,
                    "package_MB": round(archive.stat().st_size / 1e6, 1),
                    "job_to_serving_s": round(statistics.median(serve_s), 2),
                    "job_to_succeeded_s": round(statistics.median(done_s), 2),
                    "agent_hot_swap_s": round(statistics.median(base_s), 2),
                    "ratio_vs_hot_swap": round(
                        statistics.median(serve_s) / statistics.median(base_s), 1
                    ),
                    "predictions_ok": ok,
                    "predictions_failed": failed,
                    "ota_VmRSS_MB": mem["VmRSS"],
                    "ota_VmHWM_MB": mem["VmHWM"],
                    "s3_child_peak_MB": child_peak or None,
                }
                results.append(row)
                print(json.dumps(row))
            print()
            print(
                "| source | package | job -> serving | job -> SUCCEEDED | agent hot swap alone | "
                "ratio | predictions failed / ok | edge-ota RSS (peak) | S3 download child peak |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for r in results:
                print(
                    f"| {r['source']} | {r['package_MB']} MB | {r['job_to_serving_s']} s | "
                    f"{r['job_to_succeeded_s']} s | {r['agent_hot_swap_s']} s | "
                    f"{r['ratio_vs_hot_swap']}x | {r['predictions_failed']} / "
                    f"{r['predictions_ok']} | {r['ota_VmRSS_MB']} MB ({r['ota_VmHWM_MB']} MB) | "
                    + (f"{r['s3_child_peak_MB']} MB |" if r["s3_child_peak_MB"] else "- |")
                )
    finally:
        if ota is not None and ota.poll() is None:
            ota.terminate()
            ota.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
