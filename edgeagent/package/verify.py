"""Verification of an unpacked package directory (the agent, at load time).

Order matters: the signature is checked over the exact bytes of manifest.json
before those bytes are parsed; then the directory tree is compared with the
manifest (no link, no special file, nothing unlisted); then every listed file
is read once, through descriptors opened without following links (each
folder on the way too), and hashed; the model's bytes then pass our own ONNX
check (:mod:`edgeagent.package.onnx_check`).

:func:`load_verified_package` keeps the bytes it hashed: the agent builds the
ONNX Runtime session and runs the golden check from them, never from the
paths again, so a file swapped on disk after (or while) it was hashed cannot
be what serves.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from edgeagent.package.errors import (
    PackageInvalidError,
    PackageNotFoundError,
    PackageSignatureError,
)
from edgeagent.package.golden import compare_golden, golden_arrays, run_model
from edgeagent.package.manifest import MAX_MANIFEST_BYTES, Manifest
from edgeagent.package.onnx_check import check_onnx_model
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
    return _open_regular_at(path, None)


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


@dataclass(frozen=True, slots=True)
class VerifiedPackage:
    """A verified package as bytes in memory: what was hashed is what is used."""

    path: Path
    manifest: Manifest
    files: Mapping[str, bytes]  # every listed file, exactly the bytes that were hashed

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.manifest.model_file]

    def golden_arrays(self) -> tuple[NDArray[Any], NDArray[Any]]:
        """The golden input and expected output, checked against the manifest's tensors."""
        golden = self.manifest.golden
        return golden_arrays(self.manifest, self.files[golden.input], self.files[golden.expected])

    def check_golden(self) -> float:
        """Run the golden check on these bytes (a 1-thread ONNX Runtime session).

        Returns the largest absolute difference; GoldenCheckError beyond the
        manifest's tolerances, ModelLoadError when ONNX Runtime cannot load the
        model, PackageInvalidError when the golden files do not fit.
        """
        golden_input, expected = self.golden_arrays()
        return compare_golden(run_model(self.model_bytes, golden_input), expected, self.manifest)


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
    files; each has the listed size and SHA-256; the model passes our own
    ONNX check.

    Raises PackageNotFoundError, PackageSignatureError, PackageInvalidError or
    ModelLoadError (the model file is not an ONNX model).
    """
    return _verify(Path(path), trusted_keys, require_signature, keep_all=False).manifest


def load_verified_package(
    path: str | os.PathLike[str],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool = True,
) -> VerifiedPackage:
    """:func:`verify_package_dir`, keeping every file's verified bytes in memory.

    Use the returned bytes (``model_bytes``, ``golden_arrays()``), never the
    files again: they may have changed since.
    """
    return _verify(Path(path), trusted_keys, require_signature, keep_all=True)


def _verify(
    root: Path,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool,
    *,
    keep_all: bool,
) -> VerifiedPackage:
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
    files = read_listed_files(root, manifest, keep=None if keep_all else {manifest.model_file})
    check_onnx_model(files[manifest.model_file], name=manifest.model_file)
    return VerifiedPackage(path=root, manifest=manifest, files=files)


def read_listed_files(
    root: Path,
    manifest: Manifest,
    *,
    names: Iterable[str] | None = None,
    keep: set[str] | None = None,
) -> dict[str, bytes]:
    """Read and hash the files the manifest lists; return the bytes of those in ``keep``.

    ``names``: which listed files (default: all); ``keep=None`` keeps all that
    were read. Each file is opened once, relative to descriptors of its
    folders, none of them through a link; its size and SHA-256 must be the
    manifest's (PackageInvalidError).
    """
    kept: dict[str, bytes] = {}
    chosen = sorted(manifest.files if names is None else set(names))
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in chosen:
            entry = manifest.files[name]
            wanted = keep is None or name in keep
            try:
                digest, size, data = _read_hashed(root_fd, name, entry.size, keep=wanted)
            except FileNotFoundError:
                raise PackageInvalidError(f"{name} is listed in the manifest but missing") from None
            except PackageInvalidError as exc:
                raise PackageInvalidError(f"{name}: {exc}") from None
            if size != entry.size:
                shown = f"more than {entry.size}" if size > entry.size else str(size)
                raise PackageInvalidError(
                    f"{name} is {shown} bytes, the manifest says {entry.size}"
                )
            if digest != entry.sha256:
                raise PackageInvalidError(f"{name} does not match its SHA-256 in the manifest")
            if wanted:
                kept[name] = data
    finally:
        os.close(root_fd)
    return kept


def _read_hashed(root_fd: int, name: str, limit: int, *, keep: bool) -> tuple[str, int, bytes]:
    """SHA-256, size and (if ``keep``) bytes of ``name`` under ``root_fd``.

    Reads at most ``limit + 1`` bytes: one more than the manifest allows is
    enough to know the file is too long.
    """
    parts = name.split("/")
    fds: list[int] = []
    try:
        parent = root_fd
        for part in parts[:-1]:
            try:
                parent = os.open(part, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PackageInvalidError(f"{part} is not a folder (a link?)") from None
                raise
            fds.append(parent)
        fd = _open_regular_at(parts[-1], parent)
        fds.append(fd)
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, min(CHUNK_SIZE, limit + 1 - size))):
            digest.update(chunk)
            size += len(chunk)
            if keep:
                chunks.append(chunk)
    finally:
        for opened in reversed(fds):
            os.close(opened)
    return digest.hexdigest(), size, b"".join(chunks)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_regular_at(path: str | Path, dir_fd: int | None) -> int:
    label = Path(path).name
    try:
        fd = os.open(path, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PackageInvalidError(f"{label} is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PackageInvalidError(f"{label} is not a regular file")
    return fd


def load_golden(
    package_dir: str | os.PathLike[str], manifest: Manifest
) -> tuple[NDArray[Any], NDArray[Any]]:
    """The golden input and expected output of a package directory.

    Each file is read once and must match its size and SHA-256 in
    ``manifest`` (a manifest already verified); the arrays must fit its tensors.
    """
    golden = manifest.golden
    files = read_listed_files(Path(package_dir), manifest, names={golden.input, golden.expected})
    return golden_arrays(manifest, files[golden.input], files[golden.expected])


def check_golden(package_dir: str | os.PathLike[str], manifest: Manifest) -> float:
    """Run the golden check of a package directory whose ``manifest`` was verified.

    The model and golden files are read once and checked against the
    manifest's digests, and the check runs on those bytes (see
    :meth:`VerifiedPackage.check_golden` for the errors).
    """
    root = Path(package_dir)
    package = VerifiedPackage(path=root, manifest=manifest, files=read_listed_files(root, manifest))
    return package.check_golden()


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
