"""Verify, install, remove and prune packages under ``<models_dir>/<name>/<version>/``.

Verification and extraction are the package module's (the agent verifies
with the same code at load time). Installing is idempotent, for the resume
table: a version directory that is already there is verified again (digests,
never sizes or existence) and kept when sound and made from the same signed
manifest (another package under an installed version's name is refused);
staging directories a crash left behind are removed, they never carry a
version's name.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from edgeagent.package import (
    Manifest,
    PackageError,
    PackageExistsError,
    extract_package,
    load_trusted_keys,
    read_manifest_bytes,
    verify_package_archive,
    verify_package_dir,
    version_key,
)
from edgecommon.fsutil import fsync_dir
from ota.errors import FatalError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = structlog.get_logger(__name__)


class Installer:
    def __init__(self, *, models_dir: Path, trusted_keys_dir: Path) -> None:
        self.models_dir = models_dir
        self._keys_dir = trusted_keys_dir

    def _keys(self) -> Sequence[Ed25519PublicKey]:
        try:
            return load_trusted_keys(self._keys_dir)
        except PackageError as exc:
            raise FatalError(f"trusted keys: {exc}") from None

    def version_dir(self, name: str, version: str) -> Path:
        return self.models_dir / name / version

    def verify(self, archive: Path) -> Manifest:
        """Signature, manifest, every member's size and hash; nothing written."""
        try:
            return verify_package_archive(archive, trusted_keys=self._keys())
        except PackageError as exc:
            raise FatalError(f"package refused: {exc}") from None

    def install(self, archive: Path, name: str, version: str) -> Path:
        """Extract into the version directory (or keep a sound one already there)."""
        dest = self.version_dir(name, version)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.clean_staging(name)
        if dest.exists():
            if self.is_sound(dest):
                if read_manifest_bytes(dest) != read_manifest_bytes(archive):
                    # installed versions are immutable: never serve other bytes under its name
                    raise FatalError(
                        f"{name} {version} is installed already with a different package"
                    )
                return dest
            log.warning("installed directory fails verification; replaced", path=str(dest))
            self.remove(name, version)
        try:
            extract_package(archive, dest, trusted_keys=self._keys())
        except PackageExistsError:
            if not self.is_sound(dest):
                raise FatalError(f"{dest} appeared during install and is not sound") from None
        except PackageError as exc:
            raise FatalError(f"install failed: {exc}") from None
        except OSError as exc:
            raise FatalError(f"install failed: {exc}") from None
        return dest

    def is_sound(self, path: Path) -> bool:
        try:
            verify_package_dir(path, trusted_keys=self._keys())
        except (PackageError, OSError):
            return False
        return True

    def remove(self, name: str, version: str) -> None:
        """Delete a version directory: renamed away first, so it is never half there."""
        dest = self.version_dir(name, version)
        if not dest.exists():
            return
        trash = dest.with_name(f".{version}.removing")
        shutil.rmtree(trash, ignore_errors=True)
        dest.rename(trash)
        fsync_dir(dest.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_staging(self, name: str) -> None:
        folder = self.models_dir / name
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            if entry.name.startswith(".") and (
                ".staging-" in entry.name or entry.name.endswith(".removing")
            ):
                shutil.rmtree(entry, ignore_errors=True)

    def versions(self, name: str) -> list[str]:
        """Installed versions of ``name``, oldest first."""
        folder = self.models_dir / name
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in folder.iterdir():
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                with contextlib.suppress(ValueError):
                    found.append((version_key(entry.name), entry.name))
        return [v for _, v in sorted(found)]

    def prune(self, name: str, *, keep: int, protect: Sequence[str | None]) -> list[str]:
        """Remove the oldest versions beyond ``keep``, never one in ``protect``."""
        kept = {p for p in protect if p}
        removable = [v for v in self.versions(name) if v not in kept]
        excess = len(self.versions(name)) - keep
        removed = []
        for version in removable[: max(0, excess)]:
            self.remove(name, version)
            removed.append(version)
        return removed
