"""What the launcher tells the emulator process: ports, files, names (one JSON file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ServiceConfig"]


class ServiceConfig(BaseModel):
    """The emulator process's configuration (``python -m cloud.local --config FILE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(gt=0, lt=65536)
    admin_port: int = Field(ge=0, lt=65536)
    credentials_port: int = Field(ge=0, lt=65536)
    s3_endpoint_url: str
    region: str = "us-east-1"
    role_alias: str
    role_arn: str
    credential_duration_seconds: int = Field(default=3600, ge=900, le=43200)
    ca_path: Path
    server_cert_path: Path
    server_key_path: Path
    minute_seconds: float = Field(default=60.0, gt=0)

    @property
    def database(self) -> Path:
        return self.state_dir / "jobs.sqlite"
