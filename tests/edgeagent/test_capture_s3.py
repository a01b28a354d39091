"""Capture to S3 through moto's server (a real HTTP endpoint on loopback).

Object layout, an S3 outage of several push periods, an agent killed
mid-upload (at named crash points, and from outside under continuous load)
and restarted: no record lost, none duplicated (records counted by eventId in
the bucket); and the AWS IoT credentials provider over mutual TLS.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from capture_helpers import (
    BUCKET,
    Agents,
    Moto,
    agents,
    event_ids,
    extract_model,
    free_port,
    s3_keys,
    s3_objects,
    short_dir,
    wait_for,
    windows,
)

from edgeagent.capture.spool import CRASH_POINT_ENV
from edgeagent.errors import AgentError
from tests.tls import make_pki


@pytest.fixture(scope="module")
def model() -> Iterator[Path]:
    base = short_dir("wecap-model-")
    yield extract_model(base / "wind-turbine-1.0")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = Moto().start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture
def pool() -> Iterator[Agents]:
    with agents() as started:
        yield started


def cloud_config(moto: Moto, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "capture_destination": "Cloud",
        "capture_s3_bucket": BUCKET,
        "capture_s3_endpoint": moto.endpoint,
        "capture_s3_region": "us-east-1",
        "capture_prefix": prefix,
        "capture_push_period_seconds": 0.3,
        "capture_retry_max_seconds": 0.5,
        "capture_upload_timeout_seconds": 5.0,
        "device_id": "turbine-3",
        "fleet_name": "farm-south",
        **extra,
    }


def capture_some(agent: Any, models: list[str], n: int) -> list[str]:
    x = windows(1)
    ids = []
    for i in range(n):
        cid = str(uuid.uuid4())
        agent.client.capture_data(
            model_name=models[i % len(models)], capture_id=cid, inputs=[x], outputs=[x]
        )
        ids.append(cid)
    return ids


def test_capture_to_s3(pool: Agents, model: Path, moto: Moto) -> None:
    agent = pool.start(cloud_config(moto, "plain", capture_base64_embed_limit=16))
    agent.client.load_model("wt", model)
    agent.client.load_model("wt-b", model)
    ids = capture_some(agent, ["wt", "wt-b"], 6)
    agent.client.capture_data(
        model_name="wt",
        capture_id="with-side-file",
        inputs=[windows(1)],
        outputs=[windows(1)],
        aux_outputs=[("image", 2, b"\x89PNG" + b"\0" * 100)],
    )
    ids.append("with-side-file")
    agent.wait_statuses(ids, "SUCCESS")
    objects = s3_objects(moto.client(), prefix="plain/")
    assert event_ids(objects) == dict.fromkeys(ids, 1)
    hour = r"\d{4}/\d{2}/\d{2}/\d{2}"
    jsonl = [k for k in objects if k.endswith(".jsonl")]
    assert all(
        re.fullmatch(
            rf"plain/farm-south/(wt|wt-b)/{hour}/turbine-3-\d{{8}}T\d{{6}}Z-\w{{16}}\.jsonl", k
        )
        for k in jsonl
    ), jsonl
    (record,) = [
        json.loads(line)
        for k in jsonl
        for line in objects[k].decode().splitlines()
        if json.loads(line)["eventMetadata"]["eventId"] == "with-side-file"
    ]
    ref = record["deviceFleetAuxiliaryOutputs"][0]["data-ref"]
    assert ref.startswith(f"s3://{BUCKET}/plain/farm-south/wt/")
    assert objects[ref.removeprefix(f"s3://{BUCKET}/")] == b"\x89PNG" + b"\0" * 100


def test_s3_outage_keeps_records_and_delivers_them_later(pool: Agents, model: Path) -> None:
    moto = Moto(free_port()).start()
    try:
        moto.client().create_bucket(Bucket=BUCKET)
        agent = pool.start(cloud_config(moto, "outage"))
        agent.client.load_model("wt", model)
        before = capture_some(agent, ["wt"], 3)
        agent.wait_statuses(before, "SUCCESS")

        moto.stop()  # S3 unreachable: connection refused
        during = capture_some(agent, ["wt"], 8)
        time.sleep(1.5)  # five push periods
        assert agent.statuses(during) == {"IN_PROGRESS": 8}
        spool = agent.state_dir / "capture" / "spool"
        assert len(list(spool.iterdir())) >= 1  # kept on disk
        retries = [
            e for e in agent.log_events() if e.get("event", "").startswith("capture upload failed")
        ]
        assert len(retries) >= 2

        moto.start()  # the same port, the same bucket
        agent.wait_statuses(during, "SUCCESS", timeout=20)
        assert event_ids(s3_objects(moto.client(), prefix="outage/")) == dict.fromkeys(
            before + during, 1
        )
        assert not list(spool.iterdir())
    finally:
        moto.stop()


@pytest.mark.parametrize(
    "point", ["upload-after-first-put", "upload-before-commit", "seal-before-rename"]
)
def test_killed_mid_upload_nothing_lost_nothing_duplicated(
    pool: Agents, model: Path, moto: Moto, point: str
) -> None:
    prefix = f"crash-{point}"
    # one batch holding both models' captures: two objects, so a kill can fall between them
    config = cloud_config(moto, prefix, capture_batch_size=100, capture_push_period_seconds=0.5)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        CRASH_POINT_ENV: point,
    }
    agent = pool.start(config, env=env)
    agent.client.load_model("wt", model)
    agent.client.load_model("wt-b", model)
    ids = capture_some(agent, ["wt", "wt-b"], 10)
    assert agent.proc.wait(15) == -signal.SIGKILL
    assert any(e.get("point") == point for e in agent.log_events())
    partial = event_ids(s3_objects(moto.client(), prefix=f"{prefix}/"))
    if point == "upload-after-first-put":
        assert 0 < sum(partial.values()) < 10  # one of the two objects made it

    again = pool.start(config, state_dir=agent.state_dir, name="again")
    assert again.statuses(ids) == {"IN_PROGRESS": 10}
    again.wait_statuses(ids, "SUCCESS")
    assert event_ids(s3_objects(moto.client(), prefix=f"{prefix}/")) == dict.fromkeys(ids, 1)


def test_sigkill_under_load_loses_no_acknowledged_capture(
    pool: Agents, model: Path, moto: Moto
) -> None:
    config = cloud_config(
        moto,
        "load",
        capture_batch_size=5,
        capture_push_period_seconds=0.2,
        capture_sync_ack=True,  # acknowledged = fsynced: a kill may lose nothing
    )
    agent = pool.start(config)
    agent.client.load_model("wt", model)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load() -> None:
        x = windows(1)
        while not stop.is_set():
            cid = str(uuid.uuid4())
            try:
                agent.client.capture_data(model_name="wt", capture_id=cid, inputs=[x], outputs=[x])
            except AgentError:
                return  # the agent is gone
            acknowledged.append(cid)
            time.sleep(0.002)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        client = moto.client()
        wait_for(
            lambda: len(s3_keys(client, prefix="load/")) >= 4,
            20,
            "four batches uploaded",
            interval=0.1,
        )
        # SIGKILL while captures arrive and batches upload (the client stays open, so
        # the load thread sees the agent vanish as UNAVAILABLE)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.proc.wait(10)
    finally:
        stop.set()
        thread.join(10)
    agent.kill()
    again = pool.start(config, state_dir=agent.state_dir, name="again")
    again.wait_statuses(acknowledged, "SUCCESS", timeout=30)
    counts = event_ids(s3_objects(moto.client(), prefix="load/"))
    assert all(counts[cid] == 1 for cid in acknowledged)  # none lost, none twice
    assert max(counts.values()) == 1  # and nothing at all duplicated
    assert len(acknowledged) > 20


# -- the AWS IoT credentials provider, over mutual TLS -----------------------------------------
class FakeCredentialsProvider:
    """An HTTPS server that demands a client certificate, like credentials.iot.*.amazonaws.com."""

    def __init__(self, folder: Path) -> None:
        pki = make_pki(folder, servers=("server",), clients=("turbine-3",))
        self.ca = pki.ca
        self.device_cert, self.device_key = pki.crt("turbine-3"), pki.key("turbine-3")
        self.requests: list[dict[str, Any]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]  # an SSLSocket
                seen.append({"path": self.path, "headers": dict(self.headers), "peer": peer})
                expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
                body = json.dumps(
                    {
                        "credentials": {
                            "accessKeyId": "ASIAIOTTEST",
                            "secretAccessKey": "iot-secret",
                            "sessionToken": "iot-token",
                            "expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        }
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / "server.crt", folder / "server.key")
        context.load_verify_locations(self.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_iot_credentials_provider_over_mutual_tls(pool: Agents, model: Path, moto: Moto) -> None:
    provider = FakeCredentialsProvider(pool.base)
    try:
        config = cloud_config(
            moto,
            "iot",
            capture_iot_credentials_endpoint=(
                f"https://127.0.0.1:{provider.port}/role-aliases/windedge-capture/credentials"
            ),
            capture_iot_cert_file=str(provider.device_cert),
            capture_iot_key_file=str(provider.device_key),
            capture_iot_ca_file=str(provider.ca),
        )
        # no AWS credentials in the environment or in files: only the IoT provider has any
        env = {
            "AWS_SHARED_CREDENTIALS_FILE": str(pool.base / "none"),
            "AWS_CONFIG_FILE": str(pool.base / "none"),
        }
        agent = pool.start(config, env=env)
        agent.client.load_model("wt", model)
        ids = capture_some(agent, ["wt"], 3)
        agent.wait_statuses(ids, "SUCCESS")
        assert event_ids(s3_objects(moto.client(), prefix="iot/")) == dict.fromkeys(ids, 1)
        first = provider.requests[0]
        assert first["path"] == "/role-aliases/windedge-capture/credentials"
        assert first["headers"]["x-amzn-iot-thingname"] == "turbine-3"  # device_id by default
        assert first["peer"]["subject"] == ((("commonName", "turbine-3"),),)
    finally:
        provider.close()
