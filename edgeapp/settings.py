"""The detection daemon's settings: one typed object, parsed once at start.

Sources, highest priority first: ``WINDEDGE_APP_*``
environment variables (e.g. ``WINDEDGE_APP_MQTT_PORT=1884``), the TOML file
(``/etc/windedge/app.toml``: flat, or keys under an ``[app]`` table), defaults.
``config/app.toml`` is the commented example; it mirrors the field docs below.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edgeapp.errors import ConfigError
from edgecommon.settings import EnvOverFileSettings, validation_problems

TURBINE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
"""A turbine id: it becomes a topic level, so no ``/``, ``+``, ``#`` or blanks."""
_TURBINE_ID_RE = re.compile(TURBINE_ID_PATTERN)
_TOPIC_PREFIX_RE = re.compile(r"[^+#\s]+(?:/[^+#\s/]+)*")


class AppSettings(EnvOverFileSettings):
    """Settings of ``edge-app``."""

    model_config = SettingsConfigDict(env_prefix="WINDEDGE_APP_", extra="forbid", frozen=True)

    # -- the model the daemon follows ------------------------------------------------
    model_name: str = Field(
        "wind-turbine",
        min_length=1,
        description="Model alias served by the agent; the daemon follows whatever version it is.",
    )
    agent_socket: Path = Field(
        Path("/run/windedge/agent.sock"), description="Unix socket of the agent's gRPC API."
    )
    agent_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one call to the agent (Predict included)."
    )
    agent_retry_min_s: float = Field(
        0.5, gt=0, description="First retry delay when the agent is down or has no model."
    )
    agent_retry_max_s: float = Field(
        5.0, gt=0, description="Longest retry delay (the delay doubles up to this)."
    )
    agent_log_interval_s: float = Field(
        60.0,
        gt=0,
        description=(
            "The agent unreachable or without the model: said at once with the reason, "
            "then at most once per interval while it lasts."
        ),
    )

    # -- where samples come from -------------------------------------------------------
    source: Literal["mqtt", "replay"] = Field(
        "mqtt", description="mqtt: the local broker; replay: a CSV or JSON-lines file."
    )
    mqtt_host: str = Field("127.0.0.1", min_length=1, description="Broker host.")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    mqtt_topic: str = Field(
        "wind-turbine/+/raw-data",
        description="Subscription; its single '+' level is the turbine id.",
    )
    mqtt_client_id: str = Field(
        "edge-app",
        min_length=1,
        max_length=20,
        description="Client id prefix; the daemon connects as <id>-src and <id>-pub.",
    )
    mqtt_tls: bool = Field(False, description="TLS to the broker (its certificate verified).")
    mqtt_ca_file: Path | None = Field(
        None,
        description="CA certificate(s) (PEM) the broker's certificate must chain to; "
        "unset: the system's CAs.",
    )
    mqtt_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for brokers that require one."
    )
    mqtt_key_file: Path | None = Field(
        None, description="Its private key (PEM); unset: the key is in mqtt_cert_file."
    )
    mqtt_username: str | None = Field(None, min_length=1, description="Broker user name.")
    mqtt_password: SecretStr | None = Field(
        None, description="Its password (better: WINDEDGE_APP_MQTT_PASSWORD)."
    )
    mqtt_status_topic: str = Field(
        "edge-app/status",
        description=(
            'Retained "online" after every connection; "offline" at a clean stop and, as '
            "the will, when the connection is lost. Empty: none."
        ),
    )
    mqtt_verdict_qos: Literal[0, 1] = Field(
        1, description="QoS of verdicts; 1: kept (bounded) while the broker is away, re-sent."
    )
    mqtt_max_queued: int = Field(
        10_000,
        ge=1,
        le=60_000,  # edgeapp.mqtt.MAX_QUEUED: MQTT packet ids are 16 bits
        description="QoS 1 verdicts kept unacknowledged at most; beyond, the oldest are dropped.",
    )
    mqtt_keepalive_s: int = Field(30, ge=5, description="MQTT keep-alive interval.")
    mqtt_reconnect_min_s: int = Field(1, ge=1, description="First reconnect delay.")
    mqtt_reconnect_max_s: int = Field(
        30, ge=1, description="Longest reconnect delay (doubles up to this)."
    )
    topic_prefix: str = Field(
        "wind-turbine",
        description=(
            "Output topics are <prefix>/<id>/anomalies, <prefix>/<id>/label/update and "
            "<prefix>/<id>/dashboard/update."
        ),
    )
    replay_file: Path | None = Field(
        None, description="CSV or JSON-lines file for source = replay (format by extension)."
    )
    replay_speed: float = Field(
        1.0,
        ge=0,
        description="1 = recorded speed, 10 = ten times faster, 0 = as fast as possible.",
    )
    replay_rate_hz: float = Field(
        20.0, gt=0, description="Per-turbine sample rate assumed for rows without a ts."
    )
    replay_loop: bool = Field(False, description="Start the file again when it ends.")

    # -- buffers and input validation --------------------------------------------------
    turbines: tuple[str, ...] | None = Field(
        None,
        description=(
            "Fixed list of turbine ids; samples of other ids are dropped. "
            "Unset: turbines are learned from the stream, up to max_turbines."
        ),
    )
    max_turbines: int = Field(
        1000, ge=1, le=100_000, description="Turbines buffered at most (memory is preallocated)."
    )
    buffer_length: int = Field(
        500,
        ge=2,
        le=100_000,
        description="Samples kept per turbine; at least the model's preprocessing buffer.",
    )
    turbine_evict_s: float = Field(
        600.0,
        gt=0,
        description=(
            "A learned turbine silent for longer gives its slot back (junk ids cannot fill "
            "the table for good); fixed turbines keep theirs."
        ),
    )
    gap_reset_s: float = Field(
        10.0,
        gt=0,
        description=(
            "A turbine silent for longer starts a new buffer: a window never spans a gap."
        ),
    )
    max_payload_bytes: int = Field(65536, ge=256, description="Larger messages are dropped unread.")
    max_samples_per_message: int = Field(
        1000, ge=1, description='Longest {"samples": [...]} list accepted.'
    )
    max_abs_quaternion: float = Field(
        1.5, gt=0, description="Quaternion components beyond this magnitude are absurd."
    )
    max_abs_value: float = Field(
        1e5, gt=0, description="wind_speed_rps, rps and voltage beyond this magnitude are absurd."
    )
    drop_log_interval_s: float = Field(
        10.0, gt=0, description="At most one log line per drop reason per interval."
    )

    # -- detection ---------------------------------------------------------------------
    tick_period_s: float = Field(
        0.5, gt=0, le=60, description="Every tick scores all turbines with new samples."
    )
    max_batch: int = Field(
        256,
        ge=1,
        description="Windows per Predict call; a tick sends its turbines in chunks of this size.",
    )
    max_inflight: int = Field(
        2,
        ge=1,
        le=16,
        description=(
            "Predict calls of one tick in flight at once (the agent runs them in parallel); "
            "about the device's core count."
        ),
    )
    stuck_after_samples: int = Field(
        200,
        ge=0,
        description=(
            "A feature whose reading stays exactly the same for this many samples in a row "
            "is a stuck sensor and raises its fault group (200: 10 s at 20 Hz; 0: off). "
            "Wind, rotor speed and voltage reading exactly 0 are a machine at rest, not stuck."
        ),
    )
    relation_learn_samples: int = Field(
        12_000,
        ge=0,
        description=(
            "Each turbine's voltage per rotor speed and rotor speed per wind are learned from "
            "its first samples (12,000: 10 min at 20 Hz); then a departure beyond "
            "generator_tolerance or power_curve_tolerance raises the voltage or rotation "
            "group (0: off)."
        ),
    )
    generator_tolerance: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Relative departure of the voltage from the turbine's learned line that "
        "is a fault (a weak generator).",
    )
    power_curve_tolerance: float = Field(
        0.08,
        gt=0,
        lt=1,
        description="Relative departure of the rotor speed from the turbine's learned line "
        "that is a fault (a dragging brake).",
    )
    noise_limit: float = Field(
        12.0,
        ge=0,
        description=(
            "Wind, rotor speed or voltage whose sample-to-sample steps over a tick grow beyond "
            "this many times the turbine's learned level is a failing sensor or link and "
            "raises its fault group at once (0: off)."
        ),
    )
    noise_learn_samples: int = Field(
        1_200,
        ge=1,
        description="Samples of each turbine the noise check learns its levels from "
        "(1,200: 1 min at 20 Hz).",
    )
    learned_file: Path | None = Field(
        Path("/var/lib/windedge/app/learned.json"),
        description=(
            "Where the relation and noise checks keep what they learned per turbine, so a "
            "restart does not learn it again (written atomically when it changed, every "
            "learned_save_period_s and on shutdown). Empty: in memory only."
        ),
    )
    learned_save_period_s: float = Field(
        60.0, gt=0, description="How often the learned baselines are written when they changed."
    )
    capture_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of model inputs/outputs sent to the agent's CaptureData.",
    )
    dashboard_period_s: float = Field(
        1.0, gt=0, description="How often each turbine's recent feature means are published."
    )
    dashboard_samples: int = Field(
        100, ge=1, description="Samples the dashboard's feature means are taken over."
    )
    status_period_s: float = Field(
        10.0, gt=0, description="How often a STATUS= line (counters) goes to systemd."
    )
    log_summary_interval_s: float = Field(
        60.0,
        gt=0,
        description=(
            "One INFO summary line per interval (counts, latencies); per-tick lines at DEBUG."
        ),
    )
    log_level: str = Field("INFO", description="Log level (DEBUG, INFO, WARNING, ERROR).")

    @field_validator("mqtt_topic")
    @classmethod
    def _one_wildcard(cls, value: str) -> str:
        levels = value.split("/")
        if levels.count("+") != 1 or "#" in value or any(not level for level in levels):
            raise ValueError(
                f"{value!r}: expected exactly one '+' level (the turbine id), no '#', "
                "no empty level"
            )
        if any("+" in level for level in levels if level != "+"):
            raise ValueError(f"{value!r}: '+' must be a whole level")
        return value

    @field_validator("mqtt_status_topic")
    @classmethod
    def _status_topic(cls, value: str) -> str:
        if value and not _TOPIC_PREFIX_RE.fullmatch(value):
            raise ValueError(f"{value!r}: not a topic (no wildcards, blanks, empty levels)")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not _TOPIC_PREFIX_RE.fullmatch(value):
            raise ValueError(f"{value!r}: not a topic prefix (no wildcards, blanks, empty levels)")
        return value

    @field_validator("turbines")
    @classmethod
    def _valid_ids(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        bad = [t for t in value if not _TURBINE_ID_RE.fullmatch(t)]
        if bad:
            raise ValueError(f"invalid turbine ids {bad[:5]}: expected {TURBINE_ID_PATTERN}")
        if len(set(value)) != len(value):
            raise ValueError("turbine ids must be distinct")
        return value

    @field_validator("stuck_after_samples")
    @classmethod
    def _flat_line(cls, value: int) -> int:
        if value == 1:
            raise ValueError("a flat line needs at least 2 samples (0 turns the check off)")
        return value

    @field_validator("learned_file", mode="before")
    @classmethod
    def _memory_only(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("noise_limit")
    @classmethod
    def _noise_limit(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("noise_limit is a multiple of the learned level: above 1 (0: off)")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> AppSettings:
        if self.agent_retry_max_s < self.agent_retry_min_s:
            raise ValueError("agent_retry_max_s must be >= agent_retry_min_s")
        if self.mqtt_reconnect_max_s < self.mqtt_reconnect_min_s:
            raise ValueError("mqtt_reconnect_max_s must be >= mqtt_reconnect_min_s")
        files = (self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)
        if not self.mqtt_tls and any(f is not None for f in files):
            raise ValueError("mqtt_ca_file, mqtt_cert_file and mqtt_key_file need mqtt_tls = true")
        if self.mqtt_key_file is not None and self.mqtt_cert_file is None:
            raise ValueError("mqtt_key_file needs mqtt_cert_file")
        if self.mqtt_password is not None and self.mqtt_username is None:
            raise ValueError("mqtt_password needs mqtt_username")
        if self.source == "replay" and self.replay_file is None:
            raise ValueError("source = 'replay' needs replay_file")
        if self.turbines is not None and len(self.turbines) > self.max_turbines:
            raise ValueError(
                f"{len(self.turbines)} turbines listed but max_turbines is {self.max_turbines}"
            )
        return self


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML file: flat, or under an ``[app]`` table."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    app = data.get("app", data)
    if not isinstance(app, dict):
        raise ConfigError(f"{path}: [app] must be a table")
    return dict(app)


def load_settings(config_file: Path | None = None) -> AppSettings:
    """Settings from the file and the environment, validated once."""
    values = read_config_file(config_file) if config_file is not None else {}
    try:
        return AppSettings(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid app configuration: {validation_problems(exc)}") from exc
