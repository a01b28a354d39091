"""``edgectl config check``: every process's file validated, problems by line, key and type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def check(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["config", "check", *map(str, args)])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out.splitlines()


def test_the_shipped_templates_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    templates = sorted((REPO / "config").glob("*.toml"))
    assert {"agent.toml", "app.toml"} <= {t.name for t in templates}
    code, lines = check(capsys, *templates)
    assert code == 0, lines
    assert lines == [f"{t}: ok" for t in templates]


def test_problems_are_reported_by_line_key_and_expected_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = tmp_path / "agent.toml"
    agent.write_text(
        "# comment\n"
        "[agent]\n"
        'max_batch = "lots"\n'
        "workers = 8\n"
        'capture_destination = "Tape"\n'
        "max_batchh = 3\n"
    )
    code, lines = check(capsys, agent)
    assert code == 1
    assert lines[0].startswith(f"{agent}:3: max_batch: expected int (")
    assert lines[1].startswith(f"{agent}:5: capture_destination: expected one of 'Disk', 'Cloud'")
    assert lines[2] == f"{agent}:6: max_batchh: unknown key"
    assert len(lines) == 3


def test_the_kind_comes_from_the_table_the_name_or_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    by_table = tmp_path / "site.toml"
    by_table.write_text("[app]\nmqtt_port = 70000\n")
    by_name = tmp_path / "app.toml"
    by_name.write_text("tick_period_s = -1\n")
    by_option = tmp_path / "other.toml"
    by_option.write_text('source = "replay"\n')
    unknown = tmp_path / "mystery.toml"
    unknown.write_text("x = 1\n")
    code, lines = check(capsys, by_table, by_name, unknown)
    assert code == 1
    assert lines[0].startswith(f"{by_table}:2: mqtt_port: expected int (Input should be less")
    assert lines[1].startswith(f"{by_name}:1: tick_period_s: expected float (")
    assert lines[2].startswith(f"{unknown}: cannot tell which process")
    code, lines = check(capsys, "--kind", "app", by_option)
    assert code == 1
    # a rule across keys has no single line: reported for the file
    assert lines == [f"{by_option}: Value error, source = 'replay' needs replay_file"]


def test_unreadable_and_malformed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "agent.toml"
    broken.write_text('[agent]\nsocket = "/run/x.sock"\nworkers = \n')
    missing = tmp_path / "app.toml"
    code, lines = check(capsys, broken, missing)
    assert code == 1
    assert lines[0].startswith(f"{broken}:3: invalid TOML")
    assert lines[1] == f"{missing}: cannot read: No such file or directory"


def test_a_sagemaker_edge_agent_json_config_is_checked_in_its_own_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edge_config.json"
    config.write_text(
        json.dumps(
            {
                "sagemaker_edge_core_device_name": "turbine-3",
                "sagemaker_edge_core_capture_data_buffer_size": "many",
            },
            indent=1,
        )
    )
    code, lines = check(capsys, config)
    assert code == 1
    assert lines == [
        f"{config}:3: sagemaker_edge_core_capture_data_buffer_size: expected int "
        "(Input should be a valid integer, unable to parse string as an integer)"
    ]
    config.write_text(json.dumps({"sagemaker_edge_core_device_name": "turbine-3"}))
    assert check(capsys, config) == (0, [f"{config}: ok"])


def test_the_environment_is_not_applied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINDEDGE_APP_MQTT_PORT", "not a port")
    app = tmp_path / "app.toml"
    app.write_text("mqtt_port = 1884\n")
    assert check(capsys, app) == (0, [f"{app}: ok"])


def test_the_installed_command_exits_1_on_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "app.toml"
    bad.write_text("max_turbines = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edgectl", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{bad}:1: max_turbines: expected int (")
    assert "Traceback" not in proc.stderr


def test_without_files_every_process_file_of_the_device_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgectl.commands import config

    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    for kind in config.PROCESSES:
        template = REPO / "config" / f"{kind}.toml"
        if template.exists():
            (tmp_path / f"{kind}.toml").write_text(template.read_text())
    (tmp_path / "app.toml").write_text("[app]\nmax_batch = 0\n")
    code, lines = check(capsys)
    assert code == 1
    by_file = {line.split(":")[0]: line for line in lines}
    assert set(by_file) == {str(tmp_path / f"{kind}.toml") for kind in config.PROCESSES}
    assert by_file[str(tmp_path / "app.toml")].startswith(
        f"{tmp_path / 'app.toml'}:2: max_batch: expected int ("
    )
    assert by_file[str(tmp_path / "agent.toml")] == f"{tmp_path / 'agent.toml'}: ok"
