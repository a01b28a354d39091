"""Building a package (off the device) and looking inside one without trusting it.

The archive is deterministic: the same model, inputs and key give the same
bytes (members in a fixed order, manifest.json and manifest.sig first, zero
timestamps and owners, fixed modes, no name in the gzip header, mtime 0).
Ed25519 signatures are deterministic too, so a release can be rebuilt and
compared byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from gzip import GzipFile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from edgeagent.package.archive import (
    HEADER_WINDOW,
    CappedGunzip,
    ExtractLimits,
    read_member_bytes,
)
from edgeagent.package.errors import PackageInvalidError, PackageNotFoundError
from edgeagent.package.golden import check_array, model_specs, npy_bytes, run_model
from edgeagent.package.manifest import (
    FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    FileEntry,
    GoldenCheck,
    Manifest,
    TensorEntry,
)
from edgeagent.package.paths import MANIFEST_NAME, SIGNATURE_NAME
from edgeagent.package.signing import sign
from edgeagent.package.verify import hash_file, read_manifest_dir, verify_package_dir
from edgeagent.tensors import TensorSpec

if TYPE_CHECKING:  # cryptography loads only where keys are used (edgeagent.package.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MODEL_FILE = "model.onnx"
GOLDEN_INPUT = "golden/input.npy"
GOLDEN_EXPECTED = "golden/expected.npy"
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


def archive_name(name: str, version: str) -> str:
    """File name of a package archive: ``<name>-<version>.tar.gz``."""
    return f"{name}-{version}.tar.gz"


def build_package(
    *,
    model_path: str | os.PathLike[str],
    name: str,
    version: str,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    preprocessing: Mapping[str, Any],
    golden_input: NDArray[Any],
    golden_expected: NDArray[Any] | None = None,
    signing_key: Ed25519PrivateKey,
    out_path: str | os.PathLike[str],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    created_at: str | None = None,
) -> Path:
    """Build and sign ``<out_path>/<name>-<version>.tar.gz``; return its path.

    ``out_path`` is a directory (created if missing); an existing archive of
    the same name is replaced atomically. ``inputs``/``outputs`` default to
    what ONNX Runtime reports for the model; when given, they must agree with
    it. ``golden_expected`` defaults to the model's output on ``golden_input``
    (single-threaded ONNX Runtime). ``created_at`` is left out by default so
    that rebuilding gives the same bytes.
    """
    model = Path(model_path)
    if not model.is_file():
        raise PackageNotFoundError(f"model file {model} does not exist")
    out_dir = Path(out_path)
    if out_dir.name.endswith(".tar.gz"):
        raise ValueError(f"out_path is the output directory, not the archive name: {out_dir}")

    model_inputs, model_outputs = model_specs(model)
    in_specs = _agreed_specs("input", inputs, model_inputs)
    out_specs = _agreed_specs("output", outputs, model_outputs)
    in_entries = tuple(TensorEntry.from_spec(s) for s in in_specs)
    out_entries = tuple(TensorEntry.from_spec(s) for s in out_specs)
    if len(in_entries) != 1:
        raise PackageInvalidError(
            f"the golden check needs a single-input model, not {len(in_entries)} inputs"
        )
    check_array("golden input", golden_input, in_entries[0])
    expected = run_model(model, golden_input) if golden_expected is None else golden_expected
    check_array("golden expected output", expected, out_entries[0])

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-{version}.build-") as tmp:
        staging = Path(tmp)
        shutil.copyfile(model, staging / MODEL_FILE)
        (staging / "golden").mkdir()
        (staging / GOLDEN_INPUT).write_bytes(npy_bytes(golden_input))
        (staging / GOLDEN_EXPECTED).write_bytes(npy_bytes(expected))
        files = {}
        for rel in (MODEL_FILE, GOLDEN_INPUT, GOLDEN_EXPECTED):
            digest, size = hash_file(staging / rel)
            files[rel] = FileEntry(sha256=digest, size=size)
        try:
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                name=name,
                version=version,
                framework="onnx",
                model_file=MODEL_FILE,
                inputs=in_entries,
                outputs=out_entries,
                files=files,
                preprocessing=dict(preprocessing),
                golden=GoldenCheck(
                    input=GOLDEN_INPUT, expected=GOLDEN_EXPECTED, rtol=rtol, atol=atol
                ),
                created_at=created_at,
            )
            manifest_bytes = manifest.to_json_bytes()
        except (ValidationError, ValueError, TypeError) as exc:
            raise PackageInvalidError(f"cannot build the manifest: {exc}") from None
        if Manifest.from_json_bytes(manifest_bytes) != manifest:
            raise PackageInvalidError("the manifest does not survive a JSON round trip")
        (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
        (staging / SIGNATURE_NAME).write_bytes(sign(manifest_bytes, signing_key))
        verify_package_dir(staging, trusted_keys=[signing_key.public_key()])
        target = out_dir / archive_name(name, version)
        write_archive(staging, manifest, target)
    return target


def _agreed_specs(
    kind: str, given: Sequence[TensorSpec] | None, actual: list[TensorSpec]
) -> list[TensorSpec]:
    if given is None:
        return actual
    given = list(given)
    if [s.name for s in given] != [s.name for s in actual]:
        raise PackageInvalidError(
            f"{kind}s {[s.name for s in given]} do not match the model's {[s.name for s in actual]}"
        )
    for mine, theirs in zip(given, actual, strict=True):
        fits = len(mine.shape) == len(theirs.shape) and all(
            t in (-1, m) for m, t in zip(mine.shape, theirs.shape, strict=True)
        )
        if mine.dtype != theirs.dtype or not fits:
            raise PackageInvalidError(
                f"{kind} {mine.name!r} is declared {mine.dtype}{list(mine.shape)}, "
                f"the model has {theirs.dtype}{list(theirs.shape)}"
            )
    return given


def _member_order(manifest: Manifest) -> list[tuple[str, bool]]:
    """(name, is_dir) in archive order: manifest, signature, then a sorted tree walk."""
    order: list[tuple[str, bool]] = [(MANIFEST_NAME, False), (SIGNATURE_NAME, False)]
    emitted: set[str] = set()
    for name in sorted(manifest.files, key=lambda n: n.split("/")):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder not in emitted:
                emitted.add(folder)
                order.append((folder, True))
        order.append((name, False))
    return order


def write_archive(source_dir: Path, manifest: Manifest, target: Path) -> None:
    """Write the deterministic .tar.gz of a package directory, atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as raw:
            with (
                GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ):
                for name, is_dir in _member_order(manifest):
                    info = tarfile.TarInfo(name)
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    path = source_dir.joinpath(*name.split("/"))
                    if is_dir:
                        info.type = tarfile.DIRTYPE
                        info.mode = 0o755
                        tar.addfile(info)
                        continue
                    info.type = tarfile.REGTYPE
                    info.mode = 0o644
                    info.size = path.stat().st_size
                    with path.open("rb") as content:
                        tar.addfile(info, content)
            raw.flush()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    tmp.replace(target)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_manifest_bytes(path: str | os.PathLike[str]) -> bytes:
    """The exact bytes of manifest.json of a package directory or archive (unverified)."""
    source = Path(path)
    if source.is_dir():
        return read_manifest_dir(source)
    if not source.exists():
        raise PackageNotFoundError(f"package {source} does not exist")
    if not stat.S_ISREG(source.stat().st_mode):
        raise PackageInvalidError(f"{source} is not a package archive or directory")
    limits = ExtractLimits()
    with source.open("rb") as raw:
        stream = CappedGunzip(raw, limits.max_stream_bytes)
        stream.limit_window(HEADER_WINDOW)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                first = tar.next()
                stream.limit_window(None)
                if first is None or first.name != MANIFEST_NAME:
                    raise PackageInvalidError("manifest.json must be the archive's first member")
                return read_member_bytes(tar, first, MAX_MANIFEST_BYTES)
        except (tarfile.TarError, EOFError) as exc:
            raise PackageInvalidError(f"{source.name} is not a valid package ({exc})") from None


def inspect_package(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of a package directory or archive, parsed but NOT verified.

    For display only: nothing here proves the package is authentic or intact.
    """
    return Manifest.from_json_bytes(read_manifest_bytes(path))


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file (e.g. an archive, for an IoT job document)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def golden_inputs_like(spec: TensorSpec, *, batch: int = 8, seed: int = 0) -> NDArray[Any]:
    """Seeded standard-normal data for a float input (dynamic first dim -> ``batch``)."""
    if not spec.dtype.startswith("float"):
        raise PackageInvalidError(
            f"cannot make random golden data for {spec.dtype} input {spec.name!r}"
        )
    shape = tuple(batch if d == -1 else d for d in spec.shape)
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float64).astype(spec.dtype)
