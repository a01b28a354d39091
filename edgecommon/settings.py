"""The base of every process's settings class: environment over file.

Each process reads its configuration file itself and passes the values in
as constructor arguments; ``WINDEDGE_<PROCESS>_*`` environment variables
(the subclass's ``env_prefix``) override them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource


class EnvOverFileSettings(BaseSettings):
    """Settings whose environment variables beat the file's values (given as init arguments)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def read_toml_table(path: Path, table: str) -> dict[str, Any]:
    """The settings of a TOML file: flat, or under a ``[table]`` table.

    Raises ValueError with the file name and what is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    section = data.get(table, data)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: [{table}] must be a table")
    return dict(section)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def known_log_level(value: str) -> str:
    """A log level name, upper-cased; ValueError for an unknown one (a field validator)."""
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {value!r}")
    return value.upper()


def validation_problems(exc: ValidationError, whole: str = "settings") -> str:
    """One line from a ValidationError: ``field: message; ...`` (``whole`` names an
    error about the object as a whole, which has no field)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or whole}: {err['msg']}" for err in exc.errors()
    )
