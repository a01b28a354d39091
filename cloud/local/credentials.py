"""The local stand-in's IoT credentials provider: temporary AWS credentials for a device.

Like ``<prefix>.credentials.iot.<region>.amazonaws.com``: HTTPS with mutual TLS
(the stand-in's CA must have signed the client's certificate), ``GET
/role-aliases/<alias>/credentials``, an optional ``x-amzn-iot-thingname``
header that must name the thing of the certificate (its common name), and the
answer ``{"credentials": {"accessKeyId", "secretAccessKey", "sessionToken",
"expiration"}}``. The credentials come from moto's STS (``AssumeRole`` on the
stand-in's S3 endpoint), so moto accepts them.

Refusals: no or untrusted client certificate -> the TLS handshake fails;
unknown role alias -> 404; a thing header that does not match the
certificate, or a certificate of no registered thing -> 403.

The TLS handshake runs on the request's own thread (a client that never
finishes it holds only that thread, with a timeout).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import structlog

from cloud.local.httpd import JsonHandler, LoopbackServer, ServerThread

__all__ = ["CredentialsServer", "sts_issuer"]

log = structlog.get_logger("cloud.local.credentials")

Issuer = Callable[[str, int], dict[str, str]]
"""``(thing_name, duration_seconds) -> credentials`` in the provider's JSON shape."""

_HANDSHAKE_TIMEOUT = 10.0


def sts_issuer(s3_endpoint_url: str, region: str, role_arn: str) -> Issuer:
    """Credentials from moto's STS at the stand-in's endpoint."""
    sts = boto3.client(
        "sts",
        endpoint_url=s3_endpoint_url,
        region_name=region,
        aws_access_key_id="local-stand-in",
        aws_secret_access_key="local-stand-in",  # noqa: S106 - moto accepts any key
    )

    def issue(thing: str, duration: int) -> dict[str, str]:
        answer = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=thing[:64], DurationSeconds=duration
        )["Credentials"]
        expiration = answer["Expiration"].astimezone(dt.UTC)
        return {
            "accessKeyId": answer["AccessKeyId"],
            "secretAccessKey": answer["SecretAccessKey"],
            "sessionToken": answer["SessionToken"],
            "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    return issue


def _common_name(cert: Any) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _Handler(JsonHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the stdlib handler names
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        if len(parts) != 3 or parts[0] != "role-aliases" or parts[2] != "credentials":
            self.send_json(404, {"message": "not found"})
            return
        alias = parts[1]
        if alias != self.server.role_alias:
            self.send_json(404, {"message": f"role alias {alias} does not exist"})
            return
        assert isinstance(self.connection, ssl.SSLSocket)  # noqa: S101 - finish_request wraps it
        cert_thing = _common_name(self.connection.getpeercert())
        header = self.headers.get("x-amzn-iot-thingname")
        if cert_thing is None or not self.server.is_thing(cert_thing):
            self.send_json(403, {"message": "the certificate belongs to no registered thing"})
            return
        if header is not None and header != cert_thing:
            self.send_json(403, {"message": "x-amzn-iot-thingname does not match the certificate"})
            return
        try:
            creds = self.server.issuer(cert_thing, self.server.duration)
        except Exception as exc:  # noqa: BLE001 - any STS failure is a 500 for this request
            log.warning("local stand-in: credentials not issued", error=str(exc))
            self.send_json(500, {"message": "could not issue credentials"})
            return
        log.info("local stand-in: credentials issued", thing=cert_thing)
        self.send_json(200, {"credentials": creds})


class _Server(LoopbackServer):
    tls: ssl.SSLContext
    role_alias: str
    duration: int
    issuer: Issuer
    is_thing: Callable[[str], bool]

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        sock.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            tls_sock = self.tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("local stand-in: credentials TLS handshake refused", error=str(exc))
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            tls_sock.close()


class CredentialsServer(ServerThread):
    """HTTPS on ``127.0.0.1:port`` with client-certificate authentication (a thread)."""

    def __init__(
        self,
        *,
        port: int,
        ca_path: Path,
        cert_path: Path,
        key_path: Path,
        role_alias: str,
        issuer: Issuer,
        is_thing: Callable[[str], bool],
        duration_seconds: int = 3600,
    ) -> None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(cert_path, key_path)
        tls.load_verify_locations(cafile=str(ca_path))
        tls.verify_mode = ssl.CERT_REQUIRED
        server = _Server(("127.0.0.1", port), _Handler)
        server.tls = tls
        server.role_alias = role_alias
        server.duration = duration_seconds
        server.issuer = issuer
        server.is_thing = is_thing
        super().__init__(server, "credentials-https")
