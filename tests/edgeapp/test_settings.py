"""edgeapp.settings: TOML file, WINDEDGE_APP_* environment, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeapp.errors import ConfigError
from edgeapp.settings import AppSettings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("WINDEDGE_APP_"):
            monkeypatch.delenv(key)


def test_defaults_follow_the_architecture() -> None:
    s = AppSettings()
    assert s.model_name == "wind-turbine"
    assert s.mqtt_topic == "wind-turbine/+/raw-data"
    assert s.topic_prefix == "wind-turbine"
    assert (s.tick_period_s, s.buffer_length, s.source) == (0.5, 500, "mqtt")
    assert s.agent_socket == Path("/run/windedge/agent.sock")


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "app.toml"
    conf.write_text('[app]\nmqtt_port = 1884\nmax_turbines = 50\nturbines = ["a", "b"]\n')
    s = load_settings(conf)
    assert (s.mqtt_port, s.max_turbines, s.turbines) == (1884, 50, ("a", "b"))
    monkeypatch.setenv("WINDEDGE_APP_MQTT_PORT", "1999")
    monkeypatch.setenv("WINDEDGE_APP_TURBINES", '["c"]')
    s = load_settings(conf)
    assert (s.mqtt_port, s.turbines) == (1999, ("c",))
    flat = tmp_path / "flat.toml"
    flat.write_text("tick_period_s = 0.25\n")
    assert load_settings(flat).tick_period_s == 0.25


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("mqtt_topic = 'wind-turbine/#'", "mqtt_topic"),
        ("mqtt_topic = 'wind-turbine/+/+/raw'", "mqtt_topic"),
        ("mqtt_topic = 'a/b+/c'", "mqtt_topic"),
        ("topic_prefix = 'x/+'", "topic_prefix"),
        ("tick_period_s = 0", "tick_period_s"),
        ("capture_fraction = 1.5", "capture_fraction"),
        ("turbines = ['ok', 'not ok']", "turbines"),
        ("turbines = ['a', 'a']", "turbines"),
        ("source = 'replay'", "replay_file"),
        ("agent_retry_min_s = 5\nagent_retry_max_s = 1", "agent_retry_max_s"),
        ("no_such_key = 1", "no_such_key"),
        ("max_turbines = 1\nturbines = ['a', 'b']", "max_turbines"),
        ("log_level = 'LOUD'", "log_level"),
        ("mqtt_ca_file = '/x/ca.pem'", "mqtt_tls = true"),
        ("mqtt_tls = true\nmqtt_key_file = '/x/k.pem'", "mqtt_key_file needs mqtt_cert_file"),
        ("mqtt_password = 'p'", "mqtt_password needs mqtt_username"),
        ("mqtt_status_topic = 'a/#'", "mqtt_status_topic"),
        ("mqtt_verdict_qos = 2", "mqtt_verdict_qos"),
        ("mqtt_max_queued = 0", "mqtt_max_queued"),
        ("mqtt_max_queued = 70000", "mqtt_max_queued"),
        ("turbine_evict_s = 0", "turbine_evict_s"),
        ("log_summary_interval_s = -1", "log_summary_interval_s"),
    ],
)
def test_invalid_configuration_says_where(tmp_path: Path, text: str, where: str) -> None:
    conf = tmp_path / "app.toml"
    conf.write_text(text + "\n")
    with pytest.raises(ConfigError, match=where):
        load_settings(conf)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(bad)


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "app.toml"
    s = load_settings(example)
    assert s == AppSettings()  # the example documents the defaults


def test_the_example_config_documents_every_setting() -> None:
    """Each setting appears in config/app.toml as ``key = ...`` (or commented out), under a
    comment, and nothing there is unknown."""
    import re

    example = Path(__file__).resolve().parents[2] / "config" / "app.toml"
    lines = example.read_text(encoding="utf-8").splitlines()
    keys: dict[str, int] = {}
    for number, line in enumerate(lines):
        match = re.match(r"^#? ?([a-z_]+) = ", line)
        if match:
            keys.setdefault(match.group(1), number)
    missing = set(AppSettings.model_fields) - set(keys)
    assert not missing, f"config/app.toml lacks {sorted(missing)}"
    unknown = set(keys) - set(AppSettings.model_fields)
    assert not unknown, f"config/app.toml has unknown keys {sorted(unknown)}"
    for key, number in keys.items():  # a key, or a group of keys, follows its comment
        above = number - 1
        while above >= 0 and re.match(r"^[a-z_]+ = ", lines[above]):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"{key} has no comment above it"


def test_the_password_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINDEDGE_APP_MQTT_PASSWORD", "hunter2")
    s = AppSettings(mqtt_username="u")
    assert s.mqtt_password is not None
    assert s.mqtt_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
