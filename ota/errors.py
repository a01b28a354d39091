"""The updater's errors: transient ones are retried, the others end the step.

The split decides the whole recovery policy (as in mender): a
:class:`TransientError` is retried with backoff inside its step; a
:class:`FatalError` ends the step and the table says what follows (failure,
or rollback after activation); a :class:`RejectError` means the job cannot
apply to this device and ends REJECTED; :class:`CanceledError` means the job
was cancelled (or removed) in the cloud.
"""

from __future__ import annotations


class OtaError(Exception):
    """Root of every updater error."""


class ConfigError(OtaError, ValueError):
    """The configuration file or environment is invalid."""


class TransientError(OtaError):
    """Worth another try: a connection cut, a 5xx, a throttled request, the agent restarting."""


class FatalError(OtaError):
    """Retrying will not help: a bad package, a hash mismatch, a full disk, a 403."""


class RejectError(OtaError):
    """The job does not apply to this device (invalid document, other model, older version)."""


class CanceledError(OtaError):
    """The job execution was cancelled or removed in the cloud: stop and clean up."""


class JobGoneError(OtaError):
    """The job execution is terminal in the cloud already (its status is ``status``)."""

    def __init__(self, message: str, status: str | None) -> None:
        super().__init__(message)
        self.status = status
