"""What every sample source is, and the topic pattern that names turbines.

A source (the MQTT subscription, a replay file) owns one thread that hands
samples to the ``Ingestor``; the composition root starts and stops it. Sources
know nothing of buffers, models or verdicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from edgeapp.settings import TURBINE_ID_PATTERN

__all__ = ["Source", "TopicPattern", "valid_turbine_id"]

_TURBINE_ID_RE = re.compile(TURBINE_ID_PATTERN)


def valid_turbine_id(turbine: str) -> bool:
    """Whether ``turbine`` can name a turbine (and so a topic level)."""
    return _TURBINE_ID_RE.fullmatch(turbine) is not None


class Source(Protocol):
    """A running producer of samples."""

    name: str

    def start(self) -> None:
        """Start the source's thread; returns at once."""

    def stop(self, timeout: float) -> None:
        """Stop producing and join the thread (within ``timeout`` seconds)."""

    def alive(self) -> bool:
        """Whether the source's thread is running (or finished its work normally)."""


@dataclass(frozen=True)
class TopicPattern:
    """A subscription with one ``+`` level, which names the turbine.

    ``TopicPattern("wind-turbine/+/raw-data").turbine_of("wind-turbine/t7/raw-data")``
    is ``"t7"``; a topic that does not fit, or whose id is not a valid turbine id,
    gives None.
    """

    pattern: str
    _prefix: str = field(init=False, repr=False)
    _suffix: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        levels = self.pattern.split("/")
        if levels.count("+") != 1 or "#" in self.pattern:
            raise ValueError(f"topic pattern {self.pattern!r} needs exactly one '+' and no '#'")
        at = levels.index("+")
        prefix = "/".join(levels[:at])
        suffix = "/".join(levels[at + 1 :])
        object.__setattr__(self, "_prefix", f"{prefix}/" if at else "")
        object.__setattr__(self, "_suffix", f"/{suffix}" if suffix else "")

    def turbine_of(self, topic: str) -> str | None:
        """The turbine id a topic names, or None."""
        prefix, suffix = self._prefix, self._suffix
        if len(topic) <= len(prefix) + len(suffix):
            return None
        if not topic.startswith(prefix) or not topic.endswith(suffix):
            return None
        turbine = topic[len(prefix) : len(topic) - len(suffix)]
        return turbine if valid_turbine_id(turbine) else None

    def topic_of(self, turbine: str) -> str:
        """The topic a turbine's samples arrive on."""
        return f"{self._prefix}{turbine}{self._suffix}"
