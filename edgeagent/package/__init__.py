"""The model package format: manifest, signing, verification, safe extraction.

A package is ``<name>-<version>.tar.gz`` holding manifest.json, manifest.sig
(Ed25519 over the exact manifest bytes), model.onnx and golden/{input,expected}.npy.
See docs/ARCHITECTURE.md, "Model package format".

- The agent verifies an unpacked directory at load time and keeps the bytes
  it hashed: :func:`load_verified_package` (or :func:`verify_package_dir` for
  the manifest only).
- The OTA updater checks and unpacks an archive: :func:`install_package`
  (into ``<models>/<name>/<version>`` of the signed manifest, with
  :func:`check_package_version`), :func:`extract_package` (to a given
  folder) or :func:`verify_package_archive` (to check without writing). Each
  returns the signed manifest: its ``name`` and ``version`` are the ones that
  count, never the archive's file name.
- The build side makes packages: :func:`build_package`, :func:`generate_keypair`.
"""

from edgeagent.package.archive import DEFAULT_LIMITS, ExtractLimits
from edgeagent.package.build import (
    archive_name,
    build_package,
    golden_inputs_like,
    inspect_package,
    read_manifest_bytes,
    sha256_of,
)
from edgeagent.package.errors import (
    GoldenCheckError,
    InsufficientSpaceError,
    KeyFileError,
    ModelLoadError,
    PackageDestinationError,
    PackageError,
    PackageExistsError,
    PackageInvalidError,
    PackageNotFoundError,
    PackageSignatureError,
    PackageVersionError,
)
from edgeagent.package.extract import (
    InstalledPackage,
    check_free_space,
    check_package_version,
    extract_package,
    install_package,
    verify_package_archive,
)
from edgeagent.package.golden import model_specs, run_model
from edgeagent.package.manifest import (
    FORMAT_VERSION,
    MAX_MANIFEST_DEPTH,
    FileEntry,
    GoldenCheck,
    Manifest,
    TensorEntry,
    version_key,
)
from edgeagent.package.onnx_check import check_onnx_model
from edgeagent.package.paths import MANIFEST_NAME, SIGNATURE_NAME, is_safe_relpath, split_relpath
from edgeagent.package.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_keys,
    sign,
    verify_signature,
)
from edgeagent.package.verify import (
    VerifiedPackage,
    check_golden,
    load_golden,
    load_verified_package,
    verify_package_dir,
)
from edgecommon.fsutil import free_bytes

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_DEPTH",
    "SIGNATURE_NAME",
    "ExtractLimits",
    "FileEntry",
    "GoldenCheck",
    "GoldenCheckError",
    "InstalledPackage",
    "InsufficientSpaceError",
    "KeyFileError",
    "Manifest",
    "ModelLoadError",
    "PackageDestinationError",
    "PackageError",
    "PackageExistsError",
    "PackageInvalidError",
    "PackageNotFoundError",
    "PackageSignatureError",
    "PackageVersionError",
    "TensorEntry",
    "VerifiedPackage",
    "archive_name",
    "build_package",
    "check_free_space",
    "check_golden",
    "check_onnx_model",
    "check_package_version",
    "extract_package",
    "free_bytes",
    "generate_keypair",
    "golden_inputs_like",
    "inspect_package",
    "install_package",
    "is_safe_relpath",
    "key_id",
    "load_golden",
    "load_private_key",
    "load_public_key",
    "load_verified_package",
    "load_trusted_keys",
    "model_specs",
    "read_manifest_bytes",
    "run_model",
    "sha256_of",
    "sign",
    "split_relpath",
    "verify_package_archive",
    "verify_package_dir",
    "verify_signature",
    "version_key",
]
