"""The agent's settings: one typed object, parsed once at start.

Sources, highest priority first: command-line flags, ``WINDEDGE_AGENT_*``
environment variables, the configuration file, defaults. The file is TOML
(``/etc/windedge/agent.toml``) or a SageMaker Edge Agent JSON config
(``sagemaker_edge_core_*`` / ``sagemaker_edge_provider_*`` keys), which is
mapped onto the same fields so an existing device's configuration keeps
working.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from edgecommon.settings import EnvOverFileSettings, validation_problems

log = structlog.get_logger(__name__)

MIB = 1024 * 1024


class ConfigError(ValueError):
    """The configuration file or environment is invalid; the message says where."""


class AgentSettings(EnvOverFileSettings):
    """Settings of ``edge-agent``."""

    model_config = SettingsConfigDict(env_prefix="WINDEDGE_AGENT_", extra="forbid", frozen=True)

    socket: Path = Field(
        Path("/run/windedge/agent.sock"), description="Unix socket the gRPC API listens on."
    )
    socket_group: str | None = Field(
        None, description="Group that owns the socket (mode 0660); None keeps the process group."
    )
    state_dir: Path = Field(
        Path("/var/lib/windedge/agent"),
        description="Where the record of loaded models (and the capture spool) lives.",
    )
    trusted_keys: Path | None = Field(
        Path("/etc/windedge/keys"),
        description="Directory of trusted Ed25519 package-signing public keys.",
    )
    require_signature: bool = Field(
        True, description="Refuse packages whose manifest is not signed by a trusted key."
    )
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads per operator.")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads across operators.")
    inference_chunk: int = Field(
        16,
        ge=1,
        description=(
            "Largest batch handed to ONNX Runtime at once; bigger requests run in chunks, "
            "which bounds the agent's memory at any batch size."
        ),
    )
    memory_arena: bool = Field(
        True,
        description=(
            "ONNX Runtime's CPU memory arena: faster (buffers are reused), and bounded "
            "because batches run in chunks of inference_chunk."
        ),
    )
    max_batch: int = Field(
        1024,
        ge=1,
        description=(
            "Largest batch one Predict may carry (the wind-turbine model: 2.4 MB in, 2.4 MB out)."
        ),
    )
    max_message_bytes: int = Field(
        64 * MIB, ge=MIB, description="Largest gRPC message, in and out."
    )
    max_models: int = Field(16, ge=1, description="How many models may be loaded at once.")
    workers: int = Field(8, ge=1, description="gRPC worker threads (concurrent requests).")
    connection_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "Calls one connection may run on the workers at once (None: half the workers), "
            "so that one client cannot hold them all."
        ),
    )
    max_connections: int = Field(
        256, ge=1, description="Connections served at once; more are refused with GOAWAY."
    )
    handshake_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Time a new connection has for its HTTP/2 preface and first SETTINGS.",
    )
    send_stall_seconds: float = Field(
        10.0,
        gt=0,
        description=(
            "Time a response may wait in all for a client's flow-control window (then its "
            "stream is reset), and one blocked write (then the connection is dropped)."
        ),
    )
    golden_check: bool = Field(
        True, description="Run the package's golden input before a model serves."
    )
    log_level: str = Field("INFO", description="Log level (DEBUG, INFO, WARNING, ERROR).")

    # identity used in captured records
    device_id: str = Field("windedge-device", description="Device name in captured records.")
    fleet_name: str = Field("windedge-fleet", description="Device fleet name in captured records.")

    # data capture (the original agent's sagemaker_edge_core_capture_data_* keys)
    capture_destination: Literal["Disk", "Cloud"] = Field(
        "Disk", description="Where captured data goes: a local directory or S3."
    )
    capture_disk_path: Path | None = Field(
        None, description="Destination directory for Disk captures (default: state_dir/captured)."
    )
    capture_buffer_size: int = Field(
        1024, ge=1, description="Captures the spool holds before new ones are refused."
    )
    capture_batch_size: int = Field(64, ge=1, description="Records per uploaded batch.")
    capture_push_period_seconds: float = Field(
        4.0, gt=0, description="Longest a capture waits in the spool before a push."
    )
    capture_base64_embed_limit: int = Field(
        3072, ge=0, description="Auxiliary payloads larger than this go to a side file."
    )
    capture_s3_bucket: str | None = Field(None, description="S3 bucket for Cloud captures.")
    capture_prefix: str = Field("", description="Folder prefix of captured objects.")
    capture_s3_endpoint: str | None = Field(
        None, description="S3 endpoint URL (a local stand-in); None uses AWS."
    )
    capture_status_ttl_seconds: float = Field(
        3600.0, gt=0, description="How long statuses of finished captures are remembered."
    )
    # the spool (state_dir/capture) and its durability budget
    capture_spool_max_bytes: int = Field(
        256 * MIB,
        ge=MIB,
        description=(
            "Bytes the spool may hold on disk; past this (or capture_buffer_size captures) "
            "a new capture is refused with RESOURCE_EXHAUSTED."
        ),
    )
    capture_max_unsynced: int = Field(
        64,
        ge=1,
        description=(
            "Captures queued but not yet fsynced to the spool, at most; with capture_sync_ack "
            "false, the most a crash or power loss can lose. Past it, CaptureData answers "
            "RESOURCE_EXHAUSTED until the disk catches up."
        ),
    )
    capture_commit_window_seconds: float = Field(
        0.02,
        ge=0,
        le=1.0,
        description=(
            "Group commit: captures arriving within this window share one write and one "
            "fsync (fewer wake-ups beside Predict). Adds at most this much to the time an "
            "acknowledged capture is not yet on disk; ignored with capture_sync_ack."
        ),
    )
    capture_sync_ack: bool = Field(
        True,
        description=(
            "Answer CaptureData only once its record is fsynced (the default): nothing "
            "acknowledged is ever lost. Group commit (one fsync serves every capture that "
            "arrived while the previous one ran) shares the flushes; the cost is a few "
            "milliseconds of latency, and with few concurrent callers some throughput "
            "(README: capture durability). false: answer once queued (see "
            "capture_max_unsynced)."
        ),
    )
    capture_spool_reserve_bytes: int = Field(
        16 * MIB,
        ge=0,
        description=(
            "Free space the spool always leaves on its file system: a capture that would "
            "cut into it is refused at once with RESOURCE_EXHAUSTED 'spool disk full'."
        ),
    )
    capture_retry_max_seconds: float = Field(
        60.0, gt=0, description="Longest wait between two upload attempts (exponential backoff)."
    )
    capture_upload_timeout_seconds: float = Field(
        20.0, gt=0, description="Connect and read timeout of one upload request."
    )
    capture_s3_region: str | None = Field(
        None, description="AWS region of the capture bucket; None uses the default chain's."
    )
    # AWS IoT credentials provider (IOT_JOBS.md section 3): when an endpoint is
    # set, S3 uploads use temporary credentials obtained with the device
    # certificate instead of the default credential chain.
    capture_iot_credentials_endpoint: str | None = Field(
        None,
        description=(
            "IoT credentials provider: a host name (<prefix>.credentials.iot.<region>."
            "amazonaws.com, optionally :port), or the full URL "
            "https://<host>/role-aliases/<alias>/credentials."
        ),
    )
    capture_iot_role_alias: str | None = Field(
        None, description="IoT role alias (needed unless the endpoint URL names it)."
    )
    capture_iot_thing_name: str | None = Field(
        None, description="Thing name sent as x-amzn-iot-thingname (default: device_id)."
    )
    capture_iot_cert_file: Path | None = Field(
        None, description="Device certificate (PEM) for the credentials provider's mutual TLS."
    )
    capture_iot_key_file: Path | None = Field(
        None, description="Device private key (PEM) for the credentials provider."
    )
    capture_iot_ca_file: Path | None = Field(
        None, description="CA bundle that signs the credentials endpoint (Amazon Root CA 1)."
    )

    @model_validator(mode="after")
    def _cloud_needs_a_bucket(self) -> AgentSettings:
        if self.capture_destination == "Cloud" and not self.capture_s3_bucket:
            raise ValueError("capture_destination Cloud needs capture_s3_bucket")
        return self


# SageMaker Edge Agent JSON keys -> our fields. Keys the original needed for
# services that no longer exist are accepted and ignored (logged once).
SAGEMAKER_KEYS: dict[str, str] = {
    "sagemaker_edge_core_device_name": "device_id",
    "sagemaker_edge_core_device_fleet_name": "fleet_name",
    "sagemaker_edge_core_capture_data_destination": "capture_destination",
    "sagemaker_edge_core_capture_data_buffer_size": "capture_buffer_size",
    "sagemaker_edge_core_capture_data_batch_size": "capture_batch_size",
    "sagemaker_edge_core_capture_data_push_period_seconds": "capture_push_period_seconds",
    "sagemaker_edge_core_capture_data_base64_embed_limit": "capture_base64_embed_limit",
    "sagemaker_edge_core_capture_data_disk_path": "capture_disk_path",
    "sagemaker_edge_provider_s3_bucket_name": "capture_s3_bucket",
    "sagemaker_edge_core_folder_prefix": "capture_prefix",
    "sagemaker_edge_core_region": "capture_s3_region",
    "sagemaker_edge_provider_aws_iot_cred_endpoint": "capture_iot_credentials_endpoint",
    "sagemaker_edge_provider_aws_cert_file": "capture_iot_cert_file",
    "sagemaker_edge_provider_aws_cert_pk_file": "capture_iot_key_file",
    "sagemaker_edge_provider_aws_ca_cert_file": "capture_iot_ca_file",
}
SAGEMAKER_IGNORED: frozenset[str] = frozenset(
    {
        "sagemaker_edge_core_root_certs_path",
        "sagemaker_edge_provider_provider",
        "sagemaker_edge_provider_provider_path",
        "sagemaker_edge_log_verbose",
        "sagemaker_edge_telemetry_libsystemd_path",
    }
)


def map_sagemaker_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Translate a SageMaker Edge Agent JSON config into our field names."""
    values: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if key in SAGEMAKER_KEYS:
            values[SAGEMAKER_KEYS[key]] = value
        elif key == "sagemaker_edge_log_verbose":
            values["log_level"] = "DEBUG" if value in (True, "true", "True") else "INFO"
        elif key in SAGEMAKER_IGNORED:
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"unknown SageMaker Edge Agent config keys: {', '.join(sorted(unknown))}")
    return values


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML file, or a SageMaker Edge Agent JSON file (by content)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        if any(k.startswith("sagemaker_edge_") for k in raw):
            return map_sagemaker_config(raw)
        return raw
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    # accept both a flat file and one with an [agent] table
    agent = data.get("agent", data)
    if not isinstance(agent, dict):
        raise ConfigError(f"{path}: [agent] must be a table")
    return dict(agent)


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from file, environment and explicit overrides (flags), validated."""
    values = read_config_file(config_file) if config_file is not None else {}
    try:
        settings = AgentSettings(**values)
        flags = {k: v for k, v in overrides.items() if v is not None}
        if flags:
            settings = AgentSettings.model_validate({**settings.model_dump(), **flags})
            # model_validate re-reads the environment; the flags must win.
            settings = settings.model_copy(update=flags)
    except ValidationError as exc:
        raise ConfigError(f"invalid agent configuration: {validation_problems(exc)}") from exc
    return settings
