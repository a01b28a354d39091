"""Ed25519 signatures over the exact bytes of manifest.json.

The manifest lists the SHA-256 of every other file, so one signature covers
the whole package. Ed25519 signatures are deterministic (the same key and
manifest give the same 64 bytes) and carry no validity window, so checking
them does not depend on the device's clock.

Keys are PEM files: the private key PKCS#8 (unencrypted, mode 0600), public
keys SubjectPublicKeyInfo. A device trusts every ``*.pub`` / ``*.pem`` public
key in its key directory (``/etc/windedge/keys/``).

``cryptography`` (about 10 MB resident with OpenSSL) is imported by the
functions that use keys, not with this module: processes that only read
manifests (the detection daemon) never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.package.errors import KeyFileError, PackageSignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE_SIZE = 64
MAX_KEY_FILE_BYTES = 64 * 1024
TRUSTED_KEY_SUFFIXES = (".pub", ".pem")


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short fingerprint (first 16 hex digits of SHA-256 of the raw public key)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - lazy: see the module docstring
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415 - lazy: see the module docstring

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]
) -> Ed25519PublicKey:
    """Create a new signing key pair; never overwrites an existing file.

    The private key is written with mode 0600 (created that way, not chmodded
    afterwards), the public key 0644. Raises KeyFileError if either exists.
    """
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - lazy: see the module docstring
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415 - lazy: see the module docstring

    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_file, public_file = Path(private_path), Path(public_path)
    for path in (private_file, public_file):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    _write_new(private_file, private_pem, 0o600)
    try:
        _write_new(public_file, public_pem, 0o644)
    except BaseException:
        private_file.unlink(missing_ok=True)
        raise
    return private_key.public_key()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is too large to be a key")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an unencrypted PEM (PKCS#8) Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - lazy: see the module docstring
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415 - lazy: see the module docstring

    file = Path(path)
    data = _read_key_file(file)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{file} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{file} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a PEM (SubjectPublicKeyInfo) Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - lazy: see the module docstring
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415 - lazy: see the module docstring

    file = Path(path)
    data = _read_key_file(file)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{file} holds a private key; trusted key files must be public keys")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{file} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{file} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_trusted_keys(directory: str | os.PathLike[str]) -> list[Ed25519PublicKey]:
    """Every ``*.pub`` / ``*.pem`` public key in ``directory``, in file-name order.

    Other files are ignored. One bad key file fails the whole load with a
    KeyFileError naming it: silently skipping it would leave a fleet trusting
    fewer keys than its operator thinks. An empty directory gives ``[]``.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise KeyFileError(f"trusted key directory {folder} does not exist or is not a directory")
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.suffix in TRUSTED_KEY_SUFFIXES and not p.name.startswith(".")
    )
    return [load_public_key(p) for p in paths]


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature of ``manifest_bytes`` (the content of manifest.sig)."""
    return key.sign(manifest_bytes)


def verify_signature(
    manifest_bytes: bytes, signature: bytes, trusted_keys: Sequence[Ed25519PublicKey] | None
) -> Ed25519PublicKey:
    """Return the trusted key that signed ``manifest_bytes``; else PackageSignatureError."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - lazy: see the module docstring

    if not trusted_keys:
        raise PackageSignatureError("no trusted keys configured: cannot verify manifest.sig")
    if len(signature) != SIGNATURE_SIZE:
        raise PackageSignatureError(
            f"manifest.sig is {len(signature)} bytes, not a {SIGNATURE_SIZE}-byte Ed25519 signature"
        )
    for key in trusted_keys:
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return key
    raise PackageSignatureError(
        f"manifest.sig is not a valid signature of manifest.json by any of the "
        f"{len(trusted_keys)} trusted key(s)"
    )
