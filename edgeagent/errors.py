"""The agent's error hierarchy.

One root, one subclass per meaning, and one table (``STATUS_OF``) from each
class to its gRPC status code: the server answers with it, the typed client
reads it backwards, so callers on both sides handle the same exceptions.
"""

from __future__ import annotations

from edgeagent.wire.h2 import Status


class AgentError(Exception):
    """Root of every error the agent reports to a client."""


class NotFoundError(AgentError):
    """Unknown model name or capture id; nothing at a package url."""


class InvalidArgumentError(AgentError):
    """Malformed request: bad alias, tensor mismatch, invalid package."""


class AlreadyExistsError(AgentError):
    """Alias already loaded from the same url; capture id reused."""


class PermissionDeniedError(AgentError):
    """Package signature missing or not from a trusted key."""


class ResourceExhaustedError(AgentError):
    """Request too large, too many models, capture buffer full."""


class FailedPreconditionError(AgentError):
    """Model load, warm-up or golden check failed (the old version keeps serving)."""


class OutOfRangeError(AgentError):
    """Capture timestamp in the future."""


class UnavailableError(AgentError):
    """The agent cannot be reached (client side only)."""


class InternalError(AgentError):
    """The agent failed in a way that is its own fault."""


STATUS_OF: dict[type[AgentError], Status] = {
    NotFoundError: Status.NOT_FOUND,
    InvalidArgumentError: Status.INVALID_ARGUMENT,
    AlreadyExistsError: Status.ALREADY_EXISTS,
    PermissionDeniedError: Status.PERMISSION_DENIED,
    ResourceExhaustedError: Status.RESOURCE_EXHAUSTED,
    FailedPreconditionError: Status.FAILED_PRECONDITION,
    OutOfRangeError: Status.OUT_OF_RANGE,
    UnavailableError: Status.UNAVAILABLE,
    InternalError: Status.INTERNAL,
}


def status_of(exc: AgentError) -> Status:
    """The status code of ``exc`` (its nearest class in the table)."""
    for cls in type(exc).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    return Status.UNKNOWN


def error_of(code: Status, message: str) -> AgentError:
    """The exception a client raises for a failed call (a deadline is unavailability)."""
    if code in (Status.DEADLINE_EXCEEDED, Status.CANCELLED):
        code = Status.UNAVAILABLE
    cls = _CLASS_OF.get(code, InternalError)
    return cls(message or code.name)


_CLASS_OF: dict[Status, type[AgentError]] = {code: cls for cls, code in STATUS_OF.items()}
