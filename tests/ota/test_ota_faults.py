"""S3 faults end to end: 5xx answers and cut bodies through boto3, and a disk that fills up.

A fault-injecting HTTP proxy on loopback sits in front of the stand-in's S3
(moto's server) and the device's S3 endpoint points at it: it answers the
first GETs of the package object with 5xx errors, cuts a body short, or
pauses in the middle of a body while the test fills the device's disk (a
small tmpfs holding the updater's state and staging folder). Each case ends
with its final status in the emulator, one accepted final update on the wire,
and the version that should serve serving.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from ota_devices import MODEL, Archive, Archives, Device, MakeDevice

from cloud.local import LocalCloud
from tests.harness import small_filesystem, wait_until

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection"})
_CODES = {500: "InternalError", 503: "SlowDown"}


@dataclass
class S3Faults:
    """What the proxy does to the GETs of one object key (the rest passes through)."""

    key: str = ""
    errors: int = 0  # the first N GETs answered with error_status
    error_status: int = 503
    cuts: int = 0  # then N bodies cut after cut_at bytes (the connection closed)
    cut_at: int = 0
    pause_at: int = 0  # pause the next body after pause_at bytes, run on_pause, go on
    on_pause: Callable[[], None] | None = None
    gets: list[str | None] = field(default_factory=list)  # the Range of every GET of key


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that drops a cut or an erroring connection is what the tests cause


class S3Proxy:
    """A plain HTTP proxy on a free loopback port in front of an S3 endpoint."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults = S3Faults()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            def do_HEAD(self) -> None:
                proxy.handle(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> S3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(req.path).path)
        ours = req.command == "GET" and bool(self.faults.key) and path.endswith(self.faults.key)
        error = cut = pause = 0
        hook = None
        if ours:
            with self.lock:
                f = self.faults
                f.gets.append(req.headers.get("Range"))
                if f.errors:
                    f.errors -= 1
                    error = f.error_status
                elif f.cuts:
                    f.cuts -= 1
                    cut = f.cut_at
                elif f.pause_at:
                    pause, hook, f.pause_at, f.on_pause = f.pause_at, f.on_pause, 0, None
        if error:
            body = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{_CODES.get(error, 'Error')}"
                "</Code><Message>injected by the test proxy</Message></Error>"
            ).encode()
            req.send_response(error)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=10)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
            conn.request(req.command, req.path, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            req.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP and name.lower() != "content-length":
                    req.send_header(name, value)
            req.send_header("Content-Length", str(len(data)))
            if cut:
                req.send_header("Connection", "close")
            req.end_headers()
            if req.command == "HEAD":
                return
            if cut:
                req.wfile.write(data[:cut])
                req.wfile.flush()
                req.close_connection = True
                with contextlib.suppress(OSError):
                    req.connection.shutdown(2)
                return
            if pause and hook is not None:
                req.wfile.write(data[:pause])
                req.wfile.flush()
                hook()
                data = data[pause:]
            req.wfile.write(data)
        finally:
            conn.close()


@pytest.fixture(scope="module")
def s3_proxy(cloud: LocalCloud) -> Iterator[S3Proxy]:
    proxy = S3Proxy(cloud.endpoints.s3_endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def proxy(s3_proxy: S3Proxy) -> Iterator[S3Proxy]:
    s3_proxy.faults = S3Faults()
    yield s3_proxy
    s3_proxy.faults = S3Faults()


def _ends_with(dev: Device, job: str, status: str, serving: str) -> dict[str, object]:
    final = dev.wait_final(job)
    assert final["status"] == status, final
    assert dev.watch.finals(job) == [status]
    assert dev.serving() == serving
    try:
        wait_until(lambda: dev.ota_record() is None, 5, "the record to clear")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{dev.processes[-1].output()[-4000:]}") from None
    log = dev.processes[-1].output()[-4000:]
    assert list((dev.state / "downloads").iterdir()) == [], log
    assert dev.processes[-1].alive(), f"edge-ota exited:\n{log}"
    return final


# -- S3 errors then success, through boto3 -------------------------------------------------
def test_s3_errors_and_a_cut_then_success(
    device: MakeDevice, archives: Archives, proxy: S3Proxy
) -> None:
    v2 = archives.get("2.0")
    dev = device(s3_endpoint_url=proxy.url)
    proxy.faults.key = v2.key
    proxy.faults.errors = 2  # two 503s (SlowDown),
    proxy.faults.error_status = 503
    proxy.faults.cuts = 1  # then a body cut at a third, resumed with a ranged GET
    proxy.faults.cut_at = v2.size // 3
    dev.start_ota()
    job = dev.deploy(v2, sha256=v2.sha256)
    _ends_with(dev, job, "SUCCEEDED", "2.0")
    assert (dev.models / MODEL / "2.0" / "manifest.json").is_file()
    gets = proxy.faults.gets
    assert len(gets) == 4, gets  # two errors, the cut one, the rest
    assert gets[-1] == f"bytes={v2.size // 3}-", gets


def test_s3_errors_beyond_the_attempts_fail_the_job(
    device: MakeDevice, archives: Archives, proxy: S3Proxy
) -> None:
    v2 = archives.get("2.0")
    dev = device(s3_endpoint_url=proxy.url)
    proxy.faults.key = v2.key
    proxy.faults.errors = 1000
    proxy.faults.error_status = 500
    dev.start_ota()
    job = dev.deploy(v2)
    final = _ends_with(dev, job, "FAILED", "1.0")
    details = final["statusDetails"]
    assert isinstance(details, dict)
    assert "downloading" in details["step"], details
    assert "InternalError" in details["reason"], details
    assert len(proxy.faults.gets) == dev.settings["download_attempts"]
    assert sorted(p.name for p in (dev.models / MODEL).iterdir()) == ["1.0"]


# -- a disk that fills up during the download ----------------------------------------------
def fill(folder: Path) -> Path:
    """Another writer takes every free byte of ``folder``'s file system."""
    filler = folder / "other-writer.log"
    block = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return filler


def test_disk_filling_up_during_the_download_fails_cleanly_and_recovers(
    device: MakeDevice, archives: Archives, proxy: S3Proxy
) -> None:
    v2: Archive = archives.get("2.0")
    with small_filesystem(4) as disk:
        dev = device(s3_endpoint_url=proxy.url, state_dir=str(disk / "ota"))
        dev.state = disk / "ota"
        filled: list[Path] = []
        proxy.faults.key = v2.key
        downloads = disk / "ota" / "downloads"

        def fill_once_writing() -> None:  # past the free-space checks, into the .part
            wait_until(lambda: any(downloads.glob("*.part")), 10, "the download to start")
            filled.append(fill(disk))

        proxy.faults.pause_at = v2.size // 2  # half the body arrives, then the disk is full
        proxy.faults.on_pause = fill_once_writing
        ota = dev.start_ota()
        job = dev.deploy(v2, sha256=v2.sha256, size=v2.size)  # the pre-check passes
        final = _ends_with(dev, job, "FAILED", "1.0")
        assert filled, "the disk was never filled"
        details = final["statusDetails"]
        assert isinstance(details, dict)
        assert "downloading" in details["step"], details
        assert "disk full" in details["reason"], details
        assert sorted(p.name for p in (dev.models / MODEL).iterdir()) == ["1.0"]
        # the operator frees the space; the same updater takes the next job
        filled[0].unlink()
        job = dev.deploy(v2, sha256=v2.sha256, size=v2.size)
        _ends_with(dev, job, "SUCCEEDED", "2.0")
        assert ota.alive() and dev.processes == [ota]
        assert (dev.models / MODEL / "2.0" / "manifest.json").is_file()
        ota.stop()
