"""Helpers of the OTA tests: signed package archives, hostile ones, and a package server.

``PackageServer`` is a real HTTPS server on loopback (its own CA) that serves
files with ``Range``/``If-Range`` like S3 presigned URLs do, and can be told
to misbehave: answer 5xx a few times, cut the body short, ignore ``Range``,
stall until released. The tests use it for the presigned-URL path and, in
front of moto's S3 server, as a fault-injecting proxy is not needed: S3
faults are staged the same way through a URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import ssl
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.package import build_package, sign

GOLDEN = np.random.default_rng(5).standard_normal((4, 6, 10, 10), dtype=np.float32)


def build_archive(
    out_dir: Path,
    version: str,
    key: Ed25519PrivateKey,
    *,
    name: str = "wind-turbine",
    seed: int = 1,
    golden_expected: np.ndarray[Any, Any] | None = None,
    model: Path | None = None,
) -> Path:
    """A signed ``<name>-<version>.tar.gz`` of the wind-turbine autoencoder (seeded weights)."""
    from cloud.autoencoder import build_autoencoder_onnx, default_preprocessing_block

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model or build_autoencoder_onnx(out_dir / f"model-{seed}.onnx", seed=seed)
    return build_package(
        model_path=onnx_path,
        name=name,
        version=version,
        preprocessing=default_preprocessing_block(),
        golden_input=GOLDEN,
        golden_expected=golden_expected,
        signing_key=key,
        out_path=out_dir / f"{name}-{version}-{seed}",
    )


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hostile_archive(src: Path, dest: Path, *, kind: str) -> Path:
    """A copy of ``src`` (same signed manifest) with a hostile member added.

    kind: ``traversal`` (a member ``../../escaped``) or ``symlink`` (a
    symlink member pointing out of the package).
    """
    out = io.BytesIO()
    with tarfile.open(src, "r:gz") as tin, tarfile.open(fileobj=out, mode="w:gz") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member) if member.isfile() else None
            tout.addfile(member, data)
        if kind == "traversal":
            info = tarfile.TarInfo("../../escaped")
            payload = b"escaped\n"
            info.size = len(payload)
            tout.addfile(info, io.BytesIO(payload))
        elif kind == "symlink":
            info = tarfile.TarInfo("golden/link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tout.addfile(info)
        else:
            raise ValueError(kind)
    dest.write_bytes(out.getvalue())
    return dest


def resigned_with_version(src: Path, dest: Path, version: str, key: Ed25519PrivateKey) -> Path:
    """``src`` with its manifest's version changed and signed again (a file name that lies)."""
    out = io.BytesIO()
    with tarfile.open(src, "r:gz") as tin, tarfile.open(fileobj=out, mode="w:gz") as tout:
        members = tin.getmembers()
        manifest = json.loads(tin.extractfile("manifest.json").read())  # type: ignore[union-attr]
        manifest["version"] = version
        data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        for member in members:
            if member.name == "manifest.json":
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
            elif member.name == "manifest.sig":
                sig = sign(data, key)
                member.size = len(sig)
                tout.addfile(member, io.BytesIO(sig))
            else:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    dest.write_bytes(out.getvalue())
    return dest


# -- TLS ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls(folder: Path) -> LocalTls:
    """A CA and a server certificate for 127.0.0.1 (the stand-in's own PKI code)."""
    from cloud.local.pki import Pki

    pki = Pki(folder)
    pki.ensure()
    return LocalTls(pki.ca_path, pki.server_cert_path, pki.server_key_path)


# -- the package server ----------------------------------------------------------------------
@dataclass
class Faults:
    """What the next requests suffer (each counter is consumed per request)."""

    errors: int = 0  # answer 503 this many times
    error_status: int = 503
    truncate: int = 0  # cut the body after `cut_at` bytes this many times
    cut_at: int = 4096
    ignore_range: bool = False  # always answer 200 with the whole object
    hold: threading.Event | None = None  # block each body (after `cut_at` bytes) until set
    on_complete: Any = None  # called after a whole body was sent


@dataclass
class PackageServer:
    """HTTPS on 127.0.0.1 serving ``files`` (URL path -> file) with Range and If-Range."""

    tls: LocalTls
    files: dict[str, Path] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    requests: list[dict[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> PackageServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append({"path": self.path, **dict(self.headers.items())})
                path = owner.files.get(self.path.split("?", 1)[0])
                if path is None:
                    self.send_error(404)
                    return
                f = owner.faults
                if f.errors > 0:
                    f.errors -= 1
                    self.send_response(f.error_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                etag = '"' + hashlib.md5(data).hexdigest() + '"'  # noqa: S324 - an ETag
                start = 0
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                partial = (
                    rng is not None
                    and not f.ignore_range
                    and (if_range is None or if_range == etag)
                )
                if partial:
                    assert rng is not None
                    start = int(rng.removeprefix("bytes=").split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.end_headers()
                if f.truncate > 0:
                    f.truncate -= 1
                    self.wfile.write(body[: f.cut_at])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if f.hold is not None:
                    self.wfile.write(body[: f.cut_at])
                    self.wfile.flush()
                    f.hold.wait(60)
                    body = body[f.cut_at :]
                self.wfile.write(body)
                self.wfile.flush()
                if f.on_complete is not None:
                    f.on_complete()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.tls.cert_file), str(self.tls.key_file))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            if self.faults.hold is not None:
                self.faults.hold.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def served(tls: LocalTls) -> Iterator[PackageServer]:
    server = PackageServer(tls).start()
    try:
        yield server
    finally:
        server.stop()
