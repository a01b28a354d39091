"""Safe extraction of a package archive (the OTA updater, before install).

The policy of RELIABILITY.md ("Safe extraction"), with no reliance on
``tarfile``'s extraction filters:

1. The archive is read once, as a stream. manifest.json and manifest.sig must
   be its first two members; the signature is verified, and the manifest
   parsed, before anything is written.
2. Only regular files and directories are accepted. Every name is rebuilt from
   its ``/`` components (:func:`~edgeagent.package.paths.split_relpath`), and
   must be listed in the manifest (directories: lead to a listed file), once.
3. Member count, per-file and total bytes are capped on the bytes actually
   read (:class:`~edgeagent.package.archive.ExtractLimits`); each file's size
   and SHA-256 are checked as it is written.
4. Files land in a fresh staging directory beside the destination, created
   with ``O_EXCL|O_NOFOLLOW`` relative to directory descriptors, with our own
   modes. Everything is fsynced, then the staging directory is renamed to the
   destination (which must not exist) and the parent fsynced.
5. On any failure the staging directory is removed; nothing else was written.
6. The model passes our own ONNX check (:mod:`~edgeagent.package.onnx_check`)
   on the very bytes that were hashed, and after the last member only the
   end-of-archive zeros may follow, then the end of the one gzip stream, whose
   trailer (CRC-32 and length) must match.

:func:`install_package` places a package by its signed name and version, never
by the archive's file name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.package.archive import (
    DEFAULT_LIMITS,
    HEADER_WINDOW,
    READ_CHUNK,
    REGULAR_TYPES,
    CappedGunzip,
    ExtractLimits,
    check_end_of_archive,
    member_kind,
    read_member_bytes,
)
from edgeagent.package.errors import (
    InsufficientSpaceError,
    PackageDestinationError,
    PackageExistsError,
    PackageInvalidError,
    PackageNotFoundError,
    PackageSignatureError,
    PackageVersionError,
)
from edgeagent.package.manifest import Manifest, version_key
from edgeagent.package.onnx_check import check_onnx_model
from edgeagent.package.paths import MANIFEST_NAME, RESERVED_NAMES, SIGNATURE_NAME, split_relpath
from edgeagent.package.signing import SIGNATURE_SIZE, verify_signature
from edgecommon.fsutil import free_bytes

if TYPE_CHECKING:  # cryptography loads only where keys are used (edgeagent.package.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_free_space(directory: str | os.PathLike[str], needed: int) -> None:
    """InsufficientSpaceError unless ``directory`` has ``needed`` bytes free."""
    free = free_bytes(directory)
    if free < needed:
        raise InsufficientSpaceError(
            f"not enough disk space in {directory}: {free} bytes free, {needed} needed"
        )


class _Staging:
    """A fresh directory tree written only through descriptors we opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fds: dict[tuple[str, ...], int] = {(): os.open(path, _DIR_FLAGS)}

    def directory(self, parts: tuple[str, ...]) -> int:
        """Descriptor of the directory ``parts``, created (mode 0755) if needed."""
        fd = self._fds[()]
        for depth in range(1, len(parts) + 1):
            key = parts[:depth]
            known = self._fds.get(key)
            if known is None:
                os.mkdir(key[-1], 0o755, dir_fd=fd)
                known = os.open(key[-1], _DIR_FLAGS, dir_fd=fd)
                self._fds[key] = known
            fd = known
        return fd

    def create(self, parts: tuple[str, ...]) -> int:
        """A new file (mode 0644) for writing; fails if anything has that name."""
        return os.open(parts[-1], _NEW_FILE_FLAGS, 0o644, dir_fd=self.directory(parts[:-1]))

    def write_small(self, parts: tuple[str, ...], data: bytes) -> None:
        fd = self.create(parts)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync(self) -> None:
        """fsync every directory, deepest first, so each entry is durable before its parent."""
        for key in sorted(self._fds, key=len, reverse=True):
            os.fsync(self._fds[key])

    def close(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# prepare(manifest, manifest_bytes, signature, compressed_size) -> where to write, or None
_Prepare = Callable[[Manifest, bytes, bytes | None, int], _Staging | None]


def _open_archive(tar_path: Path) -> tuple[int, int]:
    try:
        fd = os.open(tar_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PackageNotFoundError(f"package archive {tar_path} does not exist") from None
    except IsADirectoryError:
        raise PackageNotFoundError(f"{tar_path} is a directory, not a package archive") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        os.close(fd)
        raise PackageInvalidError(f"{tar_path} is not a package archive (empty or not a file)")
    return fd, st.st_size


def _process_archive(
    tar_path: Path,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool,
    limits: ExtractLimits,
    prepare: _Prepare,
) -> Manifest:
    """Read and check the whole archive; write files where ``prepare`` says."""
    fd, compressed_size = _open_archive(tar_path)
    with os.fdopen(fd, "rb") as raw:
        stream = CappedGunzip(raw, limits.max_stream_bytes)
        try:
            stream.limit_window(HEADER_WINDOW)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                return _read_members(
                    tar,
                    stream,
                    trusted_keys=trusted_keys,
                    require_signature=require_signature,
                    limits=limits,
                    prepare=lambda m, b, s: prepare(m, b, s, compressed_size),
                )
        except (tarfile.TarError, EOFError) as exc:
            raise PackageInvalidError(f"{tar_path.name} is not a valid package ({exc})") from None


def _read_members(
    tar: tarfile.TarFile,
    stream: CappedGunzip,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool,
    limits: ExtractLimits,
    prepare: Callable[[Manifest, bytes, bytes | None], _Staging | None],
) -> Manifest:
    count = 0

    def next_member() -> tarfile.TarInfo | None:
        nonlocal count
        stream.limit_window(HEADER_WINDOW)
        member = tar.next()
        stream.limit_window(None)
        if member is None:
            return None
        count += 1
        if count > limits.max_members:
            raise PackageInvalidError(f"archive has more than {limits.max_members} members")
        return member

    first = next_member()
    if first is None or first.name != MANIFEST_NAME:
        raise PackageInvalidError("manifest.json must be the first member of the archive")
    manifest_bytes = read_member_bytes(tar, first, limits.max_manifest_bytes)

    upcoming = next_member()
    signature: bytes | None = None
    if upcoming is not None and upcoming.name == SIGNATURE_NAME:
        signature = read_member_bytes(tar, upcoming, SIGNATURE_SIZE)
        upcoming = None
    if require_signature:
        if signature is None:
            raise PackageSignatureError(
                "manifest.sig is missing (it must be the second member of the archive)"
            )
        verify_signature(manifest_bytes, signature, trusted_keys)
    manifest = Manifest.from_json_bytes(manifest_bytes)
    _check_manifest_limits(manifest, limits)
    staging = prepare(manifest, manifest_bytes, signature)

    needed_dirs = {
        "/".join(parts[:i])
        for parts in (name.split("/") for name in manifest.files)
        for i in range(1, len(parts))
    }
    seen: set[str] = {MANIFEST_NAME} | ({SIGNATURE_NAME} if signature is not None else set())
    total = 0
    while (member := upcoming or next_member()) is not None:
        upcoming = None
        name = member.name
        try:
            parts = split_relpath(name)
        except ValueError as exc:
            raise PackageInvalidError(f"unsafe member name: {exc}") from None
        if name in seen:
            raise PackageInvalidError(f"duplicate member {name!r} in the archive")
        seen.add(name)
        if member.type == tarfile.DIRTYPE:
            if name not in needed_dirs:
                raise PackageInvalidError(f"directory {name}/ is not in the manifest")
            if staging is not None:
                staging.directory(parts)
            continue
        if member.type not in REGULAR_TYPES:
            raise PackageInvalidError(
                f"{name} is a {member_kind(member)}; only regular files and directories are allowed"
            )
        entry = manifest.files.get(name)
        if entry is None:
            if name in RESERVED_NAMES:
                raise PackageInvalidError(f"{name} must be one of the first two members")
            raise PackageInvalidError(f"{name} is in the archive but not in the manifest")
        if member.size != entry.size:
            raise PackageInvalidError(
                f"{name} is {member.size} bytes in the archive, the manifest says {entry.size}"
            )
        if total + member.size > limits.max_total_bytes:
            raise PackageInvalidError(f"archive holds more than {limits.max_total_bytes} bytes")
        is_model = name == manifest.model_file
        digest, size, content = _copy_member(
            tar, member, staging, parts, limits.max_member_bytes, keep=is_model
        )
        total += size
        if size != entry.size:
            raise PackageInvalidError(f"{name} is truncated ({size} of {entry.size} bytes)")
        if digest != entry.sha256:
            raise PackageInvalidError(f"{name} does not match its SHA-256 in the manifest")
        if is_model:
            check_onnx_model(content, name=name)
            del content
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise PackageInvalidError(f"missing from the archive: {', '.join(missing)}")
    check_end_of_archive(tar, stream)
    return manifest


def _check_manifest_limits(manifest: Manifest, limits: ExtractLimits) -> None:
    if len(manifest.files) + 2 > limits.max_members:
        raise PackageInvalidError(
            f"manifest lists {len(manifest.files)} files; the limit is {limits.max_members - 2}"
        )
    for name, entry in manifest.files.items():
        if entry.size > limits.max_member_bytes:
            raise PackageInvalidError(
                f"{name} is {entry.size} bytes; the limit per file is {limits.max_member_bytes}"
            )
    if manifest.total_size > limits.max_total_bytes:
        raise PackageInvalidError(
            f"package holds {manifest.total_size} bytes; the limit is {limits.max_total_bytes}"
        )


def _copy_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    staging: _Staging | None,
    parts: tuple[str, ...],
    max_bytes: int,
    *,
    keep: bool = False,
) -> tuple[str, int, bytes]:
    """Stream one member into a new file (or nowhere); its SHA-256, size and (if kept) bytes."""
    source = tar.extractfile(member)
    if source is None:
        raise PackageInvalidError(f"{member.name} has no content")
    fd = staging.create(parts) if staging is not None else None
    digest = hashlib.sha256()
    size = 0
    kept: list[bytes] = []
    try:
        while chunk := source.read(READ_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PackageInvalidError(f"{member.name} exceeds the file size limit {max_bytes}")
            digest.update(chunk)
            if keep:
                kept.append(chunk)
            if fd is not None:
                _write_all(fd, chunk)
        if fd is not None:
            os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)
    return digest.hexdigest(), size, b"".join(kept)


def verify_package_archive(
    tar_path: str | os.PathLike[str],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool = True,
    limits: ExtractLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Run every check of :func:`extract_package` on an archive, writing nothing."""
    return _process_archive(
        Path(tar_path),
        trusted_keys=trusted_keys,
        require_signature=require_signature,
        limits=limits,
        prepare=lambda _m, _b, _s, _c: None,
    )


def extract_package(
    tar_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool = True,
    limits: ExtractLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Verify and unpack a package archive into ``dest_dir``, which must not exist.

    Missing parent folders of ``dest_dir`` are created once the signature is
    verified (and removed again if the package is then refused). The package
    appears at ``dest_dir`` complete and fsynced, or not at all. Returns the
    signed manifest: its ``name`` and ``version`` are the package's, whatever
    the archive's file name says. Raises PackageNotFoundError (no archive),
    PackageSignatureError, PackageInvalidError, ModelLoadError (the model is
    not ONNX), PackageExistsError (the destination exists),
    PackageDestinationError (its folders cannot be created) or
    InsufficientSpaceError (preflight or ENOSPC).
    """
    dest = Path(dest_dir).absolute()
    _check_new(dest)
    return _extract(
        Path(tar_path),
        lambda _manifest: dest,
        trusted_keys=trusted_keys,
        require_signature=require_signature,
        limits=limits,
    )


@dataclass(frozen=True, slots=True)
class InstalledPackage:
    """Where :func:`install_package` put a package, and its signed manifest."""

    manifest: Manifest
    path: Path


def check_package_version(
    manifest: Manifest,
    *,
    expected_name: str | None = None,
    expected_version: str | None = None,
    installed_version: str | None = None,
    allow_downgrade: bool = False,
) -> None:
    """The signed manifest is the package that was asked for (PackageVersionError if not).

    ``expected_name``/``expected_version``: what the caller was told to install
    (e.g. an IoT job document); versions compare as versions (2.0 == 2.0.0).
    ``installed_version``: what runs now; the package must be newer unless
    ``allow_downgrade``.
    """
    if expected_name is not None and manifest.name != expected_name:
        raise PackageVersionError(
            f"the package's signed name {manifest.name!r} is not the expected {expected_name!r}"
        )
    signed = manifest.version_key
    if expected_version is not None and signed != _version_key_of(expected_version):
        raise PackageVersionError(
            f"the package's signed version {manifest.version} is not the expected "
            f"{expected_version}"
        )
    if (
        installed_version is not None
        and not allow_downgrade
        and signed <= _version_key_of(installed_version)
    ):
        raise PackageVersionError(
            f"the package's signed version {manifest.version} is not newer than the installed "
            f"{installed_version} (a downgrade must be allowed explicitly)"
        )


def _version_key_of(version: str) -> tuple[int, ...]:
    try:
        return version_key(version)
    except ValueError as exc:
        raise PackageVersionError(str(exc)) from None


def install_package(
    tar_path: str | os.PathLike[str],
    models_dir: str | os.PathLike[str],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool = True,
    limits: ExtractLimits = DEFAULT_LIMITS,
    expected_name: str | None = None,
    expected_version: str | None = None,
    installed_version: str | None = None,
    allow_downgrade: bool = False,
) -> InstalledPackage:
    """Verify and unpack an archive into ``models_dir/<name>/<version>/`` of its SIGNED manifest.

    The archive's file name plays no part: a ``x-2.0.tar.gz`` holding a signed
    0.9 manifest installs as 0.9 (or is refused, when ``expected_version`` is
    2.0). The version checks (:func:`check_package_version`) run once the
    signature is verified, before anything is written. Raises what
    :func:`extract_package` raises, and PackageVersionError.
    """
    root = Path(models_dir).absolute()

    def destination(manifest: Manifest) -> Path:
        check_package_version(
            manifest,
            expected_name=expected_name,
            expected_version=expected_version,
            installed_version=installed_version,
            allow_downgrade=allow_downgrade,
        )
        dest = root / manifest.name / manifest.version
        _check_new(dest)
        return dest

    manifest = _extract(
        Path(tar_path),
        destination,
        trusted_keys=trusted_keys,
        require_signature=require_signature,
        limits=limits,
    )
    return InstalledPackage(manifest=manifest, path=root / manifest.name / manifest.version)


def _check_new(dest: Path) -> None:
    if os.path.lexists(dest):
        raise PackageExistsError(f"{dest} already exists; installed packages are never overwritten")


def _extract(
    tar_path: Path,
    destination: Callable[[Manifest], Path],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    require_signature: bool,
    limits: ExtractLimits,
) -> Manifest:
    created: list[_Staging] = []  # what prepare() made, for the cleanup below
    made_dirs: list[Path] = []  # parent folders we created, outermost first
    dest_of: list[Path] = []

    def prepare(
        manifest: Manifest, manifest_bytes: bytes, signature: bytes | None, compressed: int
    ) -> _Staging:
        dest = destination(manifest)
        dest_of.append(dest)
        parent = dest.parent
        made_dirs.extend(_make_parents(parent))
        check_free_space(
            parent, compressed + manifest.total_size + len(manifest_bytes) + limits.reserve_bytes
        )
        path = parent / f".{dest.name}.staging-{secrets.token_hex(8)}"
        path.mkdir(mode=0o755)  # fails if it exists: the staging directory is always new
        try:
            created.append(_Staging(path))
        except BaseException:
            path.rmdir()
            raise
        created[0].write_small((MANIFEST_NAME,), manifest_bytes)
        if signature is not None:
            created[0].write_small((SIGNATURE_NAME,), signature)
        return created[0]

    try:
        manifest = _process_archive(
            tar_path,
            trusted_keys=trusted_keys,
            require_signature=require_signature,
            limits=limits,
            prepare=prepare,
        )
        staging = created[0]  # _process_archive returns only after prepare() ran
        staging.sync()
        staging.close()
        _rename_into_place(staging.path, dest_of[0])
        created.clear()
    except OSError as exc:
        _discard(created, made_dirs)
        if exc.errno in _NO_SPACE:
            where = dest_of[0].parent if dest_of else tar_path
            raise InsufficientSpaceError(f"disk full while extracting into {where}") from exc
        raise
    except BaseException:
        _discard(created, made_dirs)
        raise
    for folder in {dest_of[0].parent, *(d.parent for d in made_dirs)}:
        _fsync_dir(folder)
    return manifest


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors (mode 0755); return those created."""
    missing: list[Path] = []
    probe = folder
    while not probe.is_dir():
        if os.path.lexists(probe):
            raise PackageDestinationError(
                f"cannot create the destination folder {folder}: {probe} is not a folder"
            )
        missing.append(probe)
        probe = probe.parent
    made: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o755)
        except OSError as exc:
            _remove_dirs(made)
            raise PackageDestinationError(
                f"cannot create the destination folder {path}: {exc.strerror or exc}"
            ) from None
        made.append(path)
    return made


def _remove_dirs(made: list[Path]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir()  # only when still empty


def _rename_into_place(staging: Path, dest: Path) -> None:
    if os.path.lexists(dest):
        raise PackageExistsError(f"{dest} appeared while extracting; left alone")
    try:
        # rename(2) replaces only an empty directory; never a populated one
        staging.rename(dest)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise PackageExistsError(f"{dest} appeared while extracting; left alone") from None
        raise


def _discard(created: list[_Staging], made_dirs: list[Path]) -> None:
    for staging in created:
        staging.close()
        # rmtree does not follow links (and we created none); errors must not
        # hide the exception that brought us here
        shutil.rmtree(staging.path, ignore_errors=True)
    created.clear()
    _remove_dirs(made_dirs)
    made_dirs.clear()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
