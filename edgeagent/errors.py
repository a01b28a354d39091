"""The agent's error hierarchy.

One root, one subclass per meaning. The gRPC adapter maps each class to its
status code in one table (``edgeagent.grpc_server.STATUS_OF``); the typed
client maps status codes back to these classes, so callers on both sides
handle the same exceptions.
"""

from __future__ import annotations


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
