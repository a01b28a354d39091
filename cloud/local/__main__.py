"""The local stand-in's emulator process: IoT Jobs over MQTT, admin HTTP, credentials HTTPS.

Started by ``cloud.local.LocalCloud`` (``python -m cloud.local --config FILE``);
runs until SIGTERM or SIGINT. It is a local stand-in for AWS IoT, never AWS.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import boto3
import structlog

from cloud.local.admin import AdminServer
from cloud.local.config import ServiceConfig
from cloud.local.credentials import CredentialsServer, sts_issuer
from cloud.local.jobs import JobsEngine, Presigner, Sink
from cloud.local.jobs_mqtt import JobsMqttAdapter
from cloud.local.store import Store
from edgecommon.logging import configure_logging

log = structlog.get_logger("cloud.local")


def _presigner(config: ServiceConfig) -> Presigner:
    s3 = boto3.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        region_name=config.region,
        aws_access_key_id="local-stand-in",
        aws_secret_access_key="local-stand-in",  # noqa: S106 - moto accepts any key
    )

    def presign(bucket: str, key: str, expires: int) -> str:
        url: str = s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )
        return url

    return presign


def run(config: ServiceConfig, stop: threading.Event) -> None:
    store = Store(config.database)
    presign = _presigner(config)

    def make_engine(sink: Sink) -> JobsEngine:
        return JobsEngine(
            store,
            sink=sink,
            minute_seconds=config.minute_seconds,
            presigner=presign,
        )

    adapter = JobsMqttAdapter(
        make_engine,
        host=config.mqtt_host,
        port=config.mqtt_port,
        client_id=f"local-stand-in-jobs-{os.getpid()}",
    )
    engine = adapter.engine
    admin = AdminServer(engine, port=config.admin_port, ready=adapter.ready.is_set)
    credentials = CredentialsServer(
        port=config.credentials_port,
        ca_path=config.ca_path,
        cert_path=config.server_cert_path,
        key_path=config.server_key_path,
        role_alias=config.role_alias,
        issuer=sts_issuer(config.s3_endpoint_url, config.region, config.role_arn),
        is_thing=engine.has_thing,
        duration_seconds=config.credential_duration_seconds,
    )
    adapter.start()
    admin.start()
    credentials.start()
    log.info(
        "local stand-in: IoT Jobs emulator running (not AWS)",
        mqtt=f"{config.mqtt_host}:{config.mqtt_port}",
        admin=f"http://127.0.0.1:{admin.port}",
        credentials=f"127.0.0.1:{credentials.port}",
        minute_seconds=config.minute_seconds,
    )
    try:
        while not stop.is_set():
            due = engine.next_due()
            wait = 0.5 if due is None else min(0.5, max(0.02, due - time.time()))
            stop.wait(wait)
            engine.tick()
    finally:
        credentials.stop()
        admin.stop()
        adapter.stop()
        store.close()
        log.info("local stand-in: IoT Jobs emulator stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.local", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging(json=True)
    config = ServiceConfig.model_validate_json(args.config.read_text())
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run(config, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
