"""Verification of an unpacked package directory (the agent, at load time).

Order matters: the signature is checked over the exact bytes of manifest.json
before those bytes are parsed; then the directory tree is compared with the
manifest (no link, no special file, nothing unlisted); then every listed file
is hashed, streamed, through a descriptor opened without following links.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.package.errors import (
    PackageInvalidError,
    PackageNotFoundError,
    PackageSignatureError,
)
from edgeagent.package.manifest import MAX_MANIFEST_BYTES, Manifest
from edgeagent.package.paths import MANIFEST_NAME, SIGNATURE_NAME
from edgeagent.package.signing import SIGNATURE_SIZE, verify_signature

if TYPE_CHECKING:  # cryptography loads only where keys are used (edgeagent.package.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CHUNK_SIZE = 1024 * 1024


def open_regular(path: Path) -> int:
    """Open ``path`` read-only without following a final symlink; must be a regular file.

    Raises FileNotFoundError when absent, PackageInvalidError for a link or a
    special file (O_NONBLOCK keeps a FIFO from blocking the open).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PackageInvalidError(f"{path.name} is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PackageInvalidError(f"{path.name} is not a regular file")
    return fd


def read_small_file(path: Path, limit: int) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise PackageInvalidError(f"{path.name} is larger than {limit} bytes")
    return data


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and byte count of a regular file, read in chunks."""
    fd = open_regular(path)
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := os.read(fd, CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def read_manifest_dir(root: Path) -> bytes:
    """The exact bytes of ``root/manifest.json``; PackageNotFoundError if missing."""
    if not root.exists():
        raise PackageNotFoundError(f"package directory {root} does not exist")
    if not root.is_dir():
        raise PackageNotFoundError(f"{root} is not a directory")
    try:
        return read_small_file(root / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise PackageNotFoundError(f"{root / MANIFEST_NAME} does not exist") from None


def verify_package_dir(
    path: str | os.PathLike[str],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool = True,
) -> Manifest:
    """Verify an unpacked package and return its manifest.

    Checks, in this order: manifest.json present; (when ``require_signature``)
    manifest.sig is a signature of its exact bytes by one of ``trusted_keys``;
    the manifest is valid; the tree holds exactly the listed files (plus
    manifest.json and manifest.sig), as regular files, no links or special
    files; each has the listed size and SHA-256.

    Raises PackageNotFoundError, PackageSignatureError or PackageInvalidError.
    """
    root = Path(path)
    manifest_bytes = read_manifest_dir(root)
    if require_signature:
        if not trusted_keys:
            raise PackageSignatureError("no trusted keys configured: cannot verify manifest.sig")
        try:
            signature = read_small_file(root / SIGNATURE_NAME, SIGNATURE_SIZE)
        except FileNotFoundError:
            raise PackageSignatureError(f"{root / SIGNATURE_NAME} is missing") from None
        except PackageInvalidError as exc:
            raise PackageSignatureError(f"manifest.sig is unusable: {exc}") from None
        verify_signature(manifest_bytes, signature, trusted_keys)
    manifest = Manifest.from_json_bytes(manifest_bytes)
    check_tree(root, manifest)
    for name, entry in sorted(manifest.files.items()):
        try:
            digest, size = hash_file(root.joinpath(*name.split("/")))
        except FileNotFoundError:
            raise PackageInvalidError(f"{name} is listed in the manifest but missing") from None
        except PackageInvalidError as exc:
            raise PackageInvalidError(f"{name}: {exc}") from None
        if size != entry.size:
            raise PackageInvalidError(f"{name} is {size} bytes, the manifest says {entry.size}")
        if digest != entry.sha256:
            raise PackageInvalidError(f"{name} does not match its SHA-256 in the manifest")
    return manifest


def check_tree(root: Path, manifest: Manifest) -> None:
    """Every entry under ``root`` is a listed file or a directory on the way to one."""
    listed = set(manifest.files)
    needed_dirs = {
        "/".join(parts[:i])
        for parts in (name.split("/") for name in listed)
        for i in range(1, len(parts))
    }
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if not prefix and entry.name in (MANIFEST_NAME, SIGNATURE_NAME):
                    if not entry.is_file(follow_symlinks=False):
                        raise PackageInvalidError(f"{rel} is not a regular file")
                    continue
                if entry.is_symlink():
                    raise PackageInvalidError(f"{rel} is a symbolic link")
                if entry.is_dir(follow_symlinks=False):
                    if rel not in needed_dirs:
                        raise PackageInvalidError(f"directory {rel}/ is not in the manifest")
                    pending.append((Path(entry.path), rel + "/"))
                elif not entry.is_file(follow_symlinks=False):
                    raise PackageInvalidError(f"{rel} is not a regular file")
                elif rel not in listed:
                    raise PackageInvalidError(f"{rel} is not listed in the manifest")
