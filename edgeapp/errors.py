"""The detection daemon's errors: one root, a few meanings.

The daemon's recovery policy follows one distinction: a *transient* condition
(the agent is down, the model is not loaded yet) is retried with backoff while
the buffers keep filling; a *configuration* error stops the process at start
with a message that says where.
"""

from __future__ import annotations


class AppError(Exception):
    """Root of every error the detection daemon raises on purpose."""


class ConfigError(AppError):
    """The configuration file or environment is invalid; the message says where."""


class ModelUnavailableError(AppError):
    """No usable model right now (agent down, model not loaded): retried with backoff."""


class ModelInvalidError(AppError):
    """The served model's package cannot drive the pipeline (manifest unreadable or
    incompatible preprocessing); retried with backoff, in case the agent swaps it."""


class ReplayError(AppError):
    """A replay file cannot be read (missing, or a CSV without the needed columns)."""
