"""Errors edgectl explains to the operator."""


class CommandError(Exception):
    """A command failed for a reason the message states in full."""
