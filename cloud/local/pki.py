"""The local stand-in's certificates: one CA, a server certificate, one certificate per device.

Everything is generated with ``cryptography`` (EC P-256, SHA-256). Private keys
are written 0600, certificates 0644, every file atomically; the directory is
0700. The CA and the server certificate are made once per state directory and
reused afterwards, so devices provisioned earlier keep working after a
restart. A device certificate's subject common name is its thing name (the
credentials endpoint and mosquitto's ``use_identity_as_username`` read it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgecommon.fsutil import atomic_write_bytes

__all__ = ["DeviceIdentity", "Pki"]

_VALIDITY = dt.timedelta(days=3650)
_ORG = "windedge local stand-in"


@dataclass(frozen=True)
class DeviceIdentity:
    """What a device needs to authenticate: its thing name, certificate, key and the CA."""

    thing_name: str
    cert_path: Path
    key_path: Path
    ca_path: Path


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class Pki:
    """A CA in ``directory`` (created on first use) that signs server and device certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_path = directory / "ca.crt"
        self.ca_key_path = directory / "ca.key"
        self.server_cert_path = directory / "server.crt"
        self.server_key_path = directory / "server.key"
        self._ca_cert: x509.Certificate | None = None
        self._ca_key: ec.EllipticCurvePrivateKey | None = None

    def ensure(self) -> None:
        """Create the CA and the server certificate unless they exist."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if not (self.ca_path.exists() and self.ca_key_path.exists()):
            self._make_ca()
        self._load_ca()
        if not (self.server_cert_path.exists() and self.server_key_path.exists()):
            self._issue(
                "localhost",
                self.server_cert_path,
                self.server_key_path,
                server=True,
            )

    def device(self, thing_name: str) -> DeviceIdentity:
        """The device's identity; its certificate is issued on first use."""
        self.ensure()
        folder = self.directory / "things" / thing_name
        cert, key = folder / "device.crt", folder / "device.key"
        if not (cert.exists() and key.exists()):
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            self._issue(thing_name, cert, key, server=False)
        return DeviceIdentity(
            thing_name=thing_name, cert_path=cert, key_path=key, ca_path=self.ca_path
        )

    def issue_unknown(self, common_name: str, folder: Path) -> DeviceIdentity:
        """A certificate signed by another CA (one this stand-in does not trust)."""
        other = Pki(folder)
        other.ensure()
        return other.device(common_name)

    # -- internals ---------------------------------------------------------------
    def _make_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = _name("windedge local stand-in CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        atomic_write_bytes(self.ca_key_path, _key_bytes(key), mode=0o600)
        atomic_write_bytes(self.ca_path, _cert_bytes(cert), mode=0o644)

    def _load_ca(self) -> None:
        cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.ca_key_path} is not an EC private key")
        self._ca_cert, self._ca_key = cert, key

    def _issue(self, common_name: str, cert_path: Path, key_path: Path, *, server: bool) -> None:
        assert self._ca_cert is not None and self._ca_key is not None  # noqa: S101 - ensure() ran
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        cert = builder.sign(self._ca_key, hashes.SHA256())
        atomic_write_bytes(key_path, _key_bytes(key), mode=0o600)
        atomic_write_bytes(cert_path, _cert_bytes(cert), mode=0o644)
