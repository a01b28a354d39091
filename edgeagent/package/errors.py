"""Errors of the model package format.

One root, :class:`PackageError`, under the agent's :class:`~edgeagent.errors.AgentError`.
Each subclass also derives from the agent error that carries its meaning, so
the gRPC adapter's one status table maps it without knowing this module
(a tampered package is INVALID_ARGUMENT, an untrusted one PERMISSION_DENIED).
"""

from __future__ import annotations

from edgeagent.errors import (
    AgentError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)


class PackageError(AgentError):
    """Root of every model package error."""


class PackageNotFoundError(PackageError, NotFoundError):
    """The package (directory, archive or its manifest.json) is not there."""


class PackageInvalidError(PackageError, InvalidArgumentError):
    """The package is malformed, tampered with, or a hostile archive.

    Manifest schema errors, size or SHA-256 mismatches, missing or unlisted
    files, links and special files, unsafe names, limits exceeded.
    """


class PackageSignatureError(PackageError, PermissionDeniedError):
    """manifest.sig is missing, malformed, or not made by a trusted key."""


class KeyFileError(PackageError, InvalidArgumentError):
    """A signing or trusted key file is missing, unreadable or not an Ed25519 key."""


class PackageExistsError(PackageError, AlreadyExistsError):
    """The extraction destination already exists (installed packages are immutable)."""


class InsufficientSpaceError(PackageError, ResourceExhaustedError):
    """Not enough free disk space to extract the package (checked before writing)."""


class GoldenCheckError(PackageError, FailedPreconditionError):
    """The model's output on the golden input differs from the expected output."""


class ModelLoadError(PackageError, FailedPreconditionError):
    """The model cannot be loaded: not an ONNX model, or ONNX Runtime refuses it."""


class PackageDestinationError(PackageError, FailedPreconditionError):
    """The extraction destination's folders cannot be created (the package is not at fault)."""


class PackageVersionError(PackageError, FailedPreconditionError):
    """The signed manifest's name or version is not the one expected, or is a downgrade."""
