"""The base of every process's settings class: environment over file.

Each process reads its configuration file itself and passes the values in
as constructor arguments; ``WINDEDGE_<PROCESS>_*`` environment variables
(the subclass's ``env_prefix``) override them.
"""

from __future__ import annotations

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
