"""The simulator's settings: one typed object from flags, the environment and defaults.

Command-line flags win over ``WINDEDGE_SIM_*`` environment variables, which
win over the defaults.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgecommon.settings import validation_problems

__all__ = ["SimSettings", "SettingsError", "load_settings"]

_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
_PREFIX_PATTERN: Final = r"^[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*$"
_ID_RE: Final = re.compile(_ID_PATTERN)


class SettingsError(ValueError):
    """An invalid simulator configuration (the message names every problem)."""


class SimSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WINDEDGE_SIM_", extra="forbid", frozen=True)

    turbines: int = Field(5, ge=1, le=100_000, description="Number of simulated turbines.")
    ids: tuple[str, ...] | None = Field(
        None, description="Turbine ids (default wt-001 ...); their number wins over turbines."
    )
    id_prefix: str = Field(
        "wt", pattern=_ID_PATTERN, description="Prefix of the generated turbine ids."
    )
    rate_hz: float = Field(20.0, gt=0, le=1000, description="Samples per second per turbine.")
    seed: int = Field(0, description="Seed of the streams and of each turbine's site.")
    publish_hz: float = Field(
        10.0, gt=0, le=1000, description="Messages per second per turbine (samples are batched)."
    )
    stopped: bool = Field(False, description="Start with every turbine stopped.")
    mqtt_host: str = Field("127.0.0.1", min_length=1)
    mqtt_port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field(
        "wind-turbine", pattern=_PREFIX_PATTERN, description="<prefix>/<id>/raw-data and the rest."
    )
    control_prefix: str = Field(
        "windedge-sim",
        pattern=_PREFIX_PATTERN,
        description="Commands arrive on <control_prefix>/<id|all>/control.",
    )
    http_host: str = Field("127.0.0.1", description="The dashboard's address (loopback).")
    http_port: int = Field(8080, ge=1, le=65535)
    events_period_s: float = Field(0.5, gt=0, le=10, description="Live update period.")
    duration_s: float | None = Field(None, gt=0, description="Stop after this many seconds.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("ids")
    @classmethod
    def _valid_ids(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        bad = [t for t in value if not _ID_RE.match(t) or t == "all"]
        if bad:
            raise ValueError(f"invalid turbine ids {bad[:5]} (letters, digits, _ . : -)")
        if len(set(value)) != len(value):
            raise ValueError("turbine ids must be distinct")
        if not value:
            raise ValueError("at least one turbine id")
        return value

    @field_validator("http_host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if value == "localhost":
            return value
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r}: expected an IP address") from None
        if not address.is_loopback:
            raise ValueError("the dashboard serves on loopback only (127.0.0.1 or ::1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SimSettings:
        if self.publish_hz > self.rate_hz:
            raise ValueError("publish_hz cannot exceed rate_hz (at least one sample a message)")
        return self

    def turbine_ids(self) -> list[str]:
        if self.ids is not None:
            return list(self.ids)
        width = max(3, len(str(self.turbines)))
        return [f"{self.id_prefix}-{i + 1:0{width}d}" for i in range(self.turbines)]


def load_settings(**values: object) -> SimSettings:
    """Validated settings: the given values (None: not given), else ``WINDEDGE_SIM_*``."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return SimSettings(**given)  # type: ignore[arg-type]  # validated by pydantic
    except ValidationError as exc:
        raise SettingsError(
            f"invalid simulator configuration: {validation_problems(exc)}"
        ) from None
