"""``load_settings``: TOML file, environment override, flags, SageMaker JSON, errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.settings import AgentSettings, ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No WINDEDGE_AGENT_* variable of the test environment leaks in."""
    for key in list(os.environ):
        if key.startswith("WINDEDGE_AGENT_"):
            monkeypatch.delenv(key)
    yield


def test_defaults() -> None:
    settings = load_settings(None)
    assert settings.socket == Path("/run/windedge/agent.sock")
    assert settings.state_dir == Path("/var/lib/windedge/agent")
    assert settings.trusted_keys == Path("/etc/windedge/keys")
    assert settings.require_signature is True
    assert settings.golden_check is True
    assert settings.max_message_bytes == 64 * 1024 * 1024


def test_toml_file_values(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'socket = "/tmp/x.sock"\nmax_models = 3\nintra_op_threads = 2\ngolden_check = false\n'
    )
    settings = load_settings(config)
    assert settings.socket == Path("/tmp/x.sock")
    assert settings.max_models == 3
    assert settings.intra_op_threads == 2
    assert settings.golden_check is False


def test_toml_agent_table(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nmax_batch = 16\nworkers = 2\n")
    settings = load_settings(config)
    assert (settings.max_batch, settings.workers) == (16, 2)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("max_models = 3\nmax_batch = 16\n")
    monkeypatch.setenv("WINDEDGE_AGENT_MAX_MODELS", "5")
    monkeypatch.setenv("WINDEDGE_AGENT_STATE_DIR", str(tmp_path / "state"))
    settings = load_settings(config)
    assert settings.max_models == 5  # environment wins
    assert settings.max_batch == 16  # the file still counts where the environment is silent
    assert settings.state_dir == tmp_path / "state"


def test_flags_override_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('socket = "/from/file.sock"\n')
    monkeypatch.setenv("WINDEDGE_AGENT_SOCKET", "/from/env.sock")
    monkeypatch.setenv("WINDEDGE_AGENT_MAX_MODELS", "4")
    settings = load_settings(config, socket=Path("/from/flag.sock"), state_dir=None)
    assert settings.socket == Path("/from/flag.sock")
    assert settings.max_models == 4  # a flag for one field does not undo the others


def test_sagemaker_json_config_is_mapped(tmp_path: Path) -> None:
    config = tmp_path / "sagemaker_edge_config.json"
    config.write_text(
        json.dumps(
            {
                "sagemaker_edge_core_device_name": "turbine-7",
                "sagemaker_edge_core_device_fleet_name": "farm-north",
                "sagemaker_edge_core_region": "eu-west-1",
                "sagemaker_edge_core_root_certs_path": "/agent/certificates/root",
                "sagemaker_edge_provider_provider": "Aws",
                "sagemaker_edge_provider_provider_path": "/agent/lib/libprovider_aws.so",
                "sagemaker_edge_provider_aws_iot_cred_endpoint": "https://x.iot/credentials",
                "sagemaker_edge_provider_s3_bucket_name": "capture-bucket",
                "sagemaker_edge_core_capture_data_destination": "Cloud",
                "sagemaker_edge_core_capture_data_buffer_size": 30,
                "sagemaker_edge_core_capture_data_batch_size": 10,
                "sagemaker_edge_core_capture_data_push_period_seconds": 4,
                "sagemaker_edge_core_capture_data_base64_embed_limit": 2048,
                "sagemaker_edge_core_capture_data_disk_path": "/agent/captures",
                "sagemaker_edge_core_folder_prefix": "demo-capture",
                "sagemaker_edge_log_verbose": True,
            }
        )
    )
    s = load_settings(config)
    assert (s.device_id, s.fleet_name) == ("turbine-7", "farm-north")
    assert s.capture_destination == "Cloud"
    assert s.capture_s3_bucket == "capture-bucket"
    assert (s.capture_buffer_size, s.capture_batch_size) == (30, 10)
    assert s.capture_push_period_seconds == 4
    assert s.capture_base64_embed_limit == 2048
    assert s.capture_disk_path == Path("/agent/captures")
    assert s.capture_prefix == "demo-capture"
    assert s.log_level == "DEBUG"


def test_sagemaker_json_recognised_by_content(tmp_path: Path) -> None:
    config = tmp_path / "agent.conf"  # no .json suffix
    config.write_text('  {"sagemaker_edge_core_device_name": "t1"}')
    assert load_settings(config).device_id == "t1"


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("agent.toml", 'max_models = "lots"\n', "max_models"),
        ("agent.toml", "max_models = 0\n", "max_models"),
        ("agent.toml", "no_such_setting = 1\n", "no_such_setting"),
        ("agent.toml", "max_models = \n", "invalid TOML"),
        ("agent.toml", "agent = 3\n", "[agent] must be a table"),
        ("agent.json", "{not json", "invalid JSON"),
        ("agent.json", "[1, 2]", "expected a JSON object"),
        ("agent.json", '{"sagemaker_edge_core_bogus": 1}', "sagemaker_edge_core_bogus"),
        ("agent.json", '{"sagemaker_edge_core_capture_data_destination": "Tape"}', "capture"),
    ],
)
def test_invalid_config_is_a_config_error(
    tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    config = tmp_path / name
    config.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert fragment in str(caught.value)


def test_invalid_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINDEDGE_AGENT_MAX_BATCH", "many")
    with pytest.raises(ConfigError, match="max_batch"):
        load_settings(None)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.toml")


def test_settings_are_frozen() -> None:
    settings = AgentSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.max_models = 3  # type: ignore[misc]  # the point of the test
