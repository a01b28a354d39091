"""Certificates for mutual-TLS tests: a throw-away CA and the certificates it signs."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    """A certificate for ``key``, self-signed or signed by ``issuer`` (name, key), valid 1 h."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]) if issuer else name
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
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
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address(ip))]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_pem(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """``path.crt`` and ``path.key`` (PKCS#8, unencrypted)."""
    path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass(frozen=True)
class Pki:
    """A CA (``ca.crt``) and, for each name, ``<name>.crt`` / ``<name>.key`` in ``folder``."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def crt(self, name: str) -> Path:
        return self.folder / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def make_pki(folder: Path, *, servers: tuple[str, ...] = (), clients: tuple[str, ...] = ()) -> Pki:
    """A fresh CA; server certificates for 127.0.0.1 and client certificates, signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = ("windedge test CA", ca_key)
    (folder / "ca.crt").write_bytes(
        cert(issuer[0], ca_key, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    for name in servers:
        key = ec.generate_private_key(ec.SECP256R1())
        write_pem(folder / name, cert(name, key, issuer, ip="127.0.0.1"), key)
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        write_pem(folder / name, cert(name, key, issuer), key)
    return Pki(folder)
