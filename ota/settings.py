"""The updater's settings: one typed object, parsed once at start.

Sources, highest priority first: ``WINDEDGE_OTA_*`` environment variables
(e.g. ``WINDEDGE_OTA_THING_NAME=turbine-7``), the TOML file
(``/etc/windedge/ota.toml``: flat, or keys under an ``[ota]`` table),
defaults. ``config/ota.toml`` is the commented example; it mirrors the field
descriptions below.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edgecommon.settings import (
    EnvOverFileSettings,
    known_log_level,
    read_toml_table,
    validation_problems,
)
from ota.errors import ConfigError

_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")


class OtaSettings(EnvOverFileSettings):
    """Settings of ``edge-ota``."""

    model_config = SettingsConfigDict(env_prefix="WINDEDGE_OTA_", extra="forbid", frozen=True)

    # -- who this device is ------------------------------------------------------------
    thing_name: str = Field(
        "windedge-device", description="AWS IoT thing name of this device (its jobs topics)."
    )
    model_name: str = Field(
        "wind-turbine",
        min_length=1,
        description="The model this device runs; a job for another model is REJECTED.",
    )

    # -- AWS IoT Core (or the local stand-in) ----------------------------------------------
    iot_endpoint: str = Field(
        "127.0.0.1", min_length=1, description="MQTT endpoint host (the account's IoT endpoint)."
    )
    iot_port: int = Field(
        8883, ge=1, le=65535, description="MQTT port with mutual TLS (8883, or 443 with ALPN)."
    )
    iot_plain_port: int = Field(
        1883, ge=1, le=65535, description="MQTT port without TLS (used only when tls = false)."
    )
    tls: bool = Field(
        True,
        description=(
            "Mutual TLS with the device certificate. false = plain TCP: local development only."
        ),
    )
    cert_path: Path | None = Field(None, description="Device certificate (PEM).")
    key_path: Path | None = Field(None, description="Device private key (PEM, mode 0600).")
    ca_path: Path | None = Field(
        None, description="CA that signed the endpoint's certificate (Amazon Root CA 1 on AWS)."
    )
    client_id: str | None = Field(None, description="MQTT client id (default: the thing name).")
    keep_alive_s: int = Field(60, ge=5, le=1200, description="MQTT keep-alive interval.")
    operation_timeout_s: int = Field(
        20, ge=1, description="How long one IoT Jobs request waits for its reply."
    )
    idle_query_s: float = Field(
        900.0,
        gt=0,
        description="While idle, ask for pending jobs this often (covers a lost notification).",
    )
    step_timeout_minutes: int = Field(
        15,
        ge=1,
        le=10080,
        description="Step timer set with every IN_PROGRESS update: a dead attempt times out.",
    )
    progress_interval_s: float = Field(
        5.0, gt=0, description="Least time between two progress updates to the job."
    )

    # -- downloads ------------------------------------------------------------------------
    region: str = Field("us-east-1", description="Region of the package bucket.")
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint URL (a local stand-in); None uses AWS."
    )
    credentials_endpoint: str | None = Field(
        None,
        description=(
            "IoT credentials provider: host[:port] or its full role-aliases URL. None: "
            "boto3's default credential chain."
        ),
    )
    role_alias: str | None = Field(
        None, description="Role alias whose credentials read the package bucket."
    )
    download_ca_file: Path | None = Field(
        None, description="CA bundle for HTTPS package URLs (None: the system's trust store)."
    )
    allow_http_urls: bool = Field(
        False,
        description="Accept plain http:// package URLs (a local stand-in's S3): development only.",
    )
    download_timeout_s: float = Field(
        30.0, gt=0, description="Connect and read timeout of one download request."
    )
    download_attempts: int = Field(
        6, ge=1, description="Attempts at a download before the job FAILS (transient errors)."
    )
    retry_min_s: float = Field(0.5, gt=0, description="First retry delay (doubles each time).")
    retry_max_s: float = Field(30.0, gt=0, description="Longest retry delay.")
    disk_reserve_bytes: int = Field(
        16 * 1024 * 1024, ge=0, description="Free space kept beyond what a package needs."
    )

    # -- the device's files ----------------------------------------------------------------
    state_dir: Path = Field(
        Path("/var/lib/windedge/ota"),
        description="The update record, download staging and outcome history.",
    )
    models_dir: Path = Field(
        Path("/var/lib/windedge/models"),
        description="Installed packages: <models_dir>/<name>/<version>/, immutable once there.",
    )
    trusted_keys: Path = Field(
        Path("/etc/windedge/keys"),
        description="Directory of trusted Ed25519 package-signing public keys.",
    )
    keep_versions: int = Field(
        3,
        ge=2,
        description="Installed versions kept; older ones are pruned (never the serving one "
        "or its predecessor).",
    )

    # -- the agent ------------------------------------------------------------------------
    agent_socket: Path = Field(
        Path("/run/windedge/agent.sock"), description="Unix socket of the agent's gRPC API."
    )
    agent_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one agent call (LoadModel gets at least 120 s)."
    )
    agent_wait_s: float = Field(
        60.0,
        gt=0,
        description="How long activation and check wait for an unavailable agent before the "
        "update rolls back.",
    )
    check_predictions: int = Field(
        5, ge=1, description="Live predictions through the new version before it is committed."
    )

    # -- the state machine ----------------------------------------------------------------
    max_resumes: int = Field(
        5,
        ge=1,
        description="Restarts in the middle of one update before it is rolled back "
        "(breaks restart loops).",
    )
    history_size: int = Field(20, ge=1, description="Final outcomes kept for `edgectl ota status`.")
    log_level: str = Field("INFO", description="Log level (DEBUG, INFO, WARNING, ERROR).")

    @field_validator("thing_name")
    @classmethod
    def _thing(cls, value: str) -> str:
        if not _THING_RE.fullmatch(value):
            raise ValueError(f"invalid thing name {value!r}: 1-128 of [a-zA-Z0-9:_-]")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return known_log_level(value)

    @model_validator(mode="after")
    def _consistent(self) -> OtaSettings:
        if self.tls and (self.cert_path is None or self.key_path is None):
            raise ValueError("tls = true needs cert_path and key_path (the device certificate)")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be >= retry_min_s")
        if self.credentials_endpoint and (self.cert_path is None or self.key_path is None):
            raise ValueError("credentials_endpoint needs cert_path and key_path")
        return self

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or self.thing_name


def load_settings(config_file: Path | None = None) -> OtaSettings:
    """Settings from the file and the environment, validated once; ConfigError otherwise."""
    try:
        values = read_toml_table(config_file, "ota") if config_file is not None else {}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return OtaSettings(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid ota configuration: {validation_problems(exc)}") from exc
