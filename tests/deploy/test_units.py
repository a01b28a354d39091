"""The systemd units: exposure scores, offline verification, and what each must declare."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, UNITS, Staged

SYSTEMD = REPO / "systemd"
MAX_EXPOSURE = 1.5
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze missing: scripts/setup.sh installs the systemd package"
)


def directives(path: Path) -> dict[str, list[str]]:
    """Section.Key -> every value given (a key may repeat), in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    values = d.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def security(unit: Path) -> tuple[float, str, str]:
    proc = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found[1]), proc.stdout, proc.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_exposure_score_and_no_unknown_key(unit: str) -> None:
    score, report, warnings = security(SYSTEMD / unit)
    print(f"{unit}: exposure {score}")  # the figure the issue asks to see
    assert "Unknown" not in warnings, warnings  # a typo would silently score worse
    assert warnings.strip() == "", warnings
    assert score <= MAX_EXPOSURE, report


@needs_analyze
def test_the_unknown_key_check_can_fail(tmp_path: Path) -> None:
    typo = (SYSTEMD / UNITS[0]).read_text().replace("ProtectHome=yes", "ProtectHom=yes")
    (tmp_path / "typo.service").write_text(typo)
    score, _report, warnings = security(tmp_path / "typo.service")
    assert "Unknown key" in warnings and "ProtectHom" in warnings
    assert score <= MAX_EXPOSURE  # the score alone would not have caught it


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, staged: Staged, tmp_path: Path) -> None:
    """Offline verification, with /opt/windedge pointing at the staged install."""
    text = (SYSTEMD / unit).read_text()
    program = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert program
    if not (staged.root / program[1].lstrip("/")).exists():
        pytest.skip(f"{program[1]} is not part of this version: {unit} cannot be verified")
    (tmp_path / unit).write_text(text.replace("/opt/windedge/", f"{staged.venv}/"))
    proc = subprocess.run(
        [str(ANALYZE), "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_every_unit_runs_as_windedge_hardened_and_notifies() -> None:
    for unit in UNITS:
        d = directives(SYSTEMD / unit)
        assert one(d, "Service.Type") == "notify", unit
        assert one(d, "Service.User") == one(d, "Service.Group") == "windedge", unit
        assert one(d, "Service.Restart") == "on-failure", unit
        assert int(one(d, "Unit.StartLimitBurst")) >= 1, unit
        assert int(one(d, "Unit.StartLimitIntervalSec")) > 0, unit
        assert one(d, "Service.UMask") == "0027", unit
        assert one(d, "Service.CapabilityBoundingSet") == "", unit
        assert one(d, "Service.ConfigurationDirectory") == "windedge", unit
        for key in (
            "NoNewPrivileges",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "RestrictSUIDSGID",
        ):
            assert one(d, f"Service.{key}") == "yes", (unit, key)
        assert one(d, "Service.ProtectSystem") == "strict", unit
        assert d["Service.SystemCallFilter"][0] == "@system-service", unit
        assert one(d, "Install.WantedBy") == "multi-user.target", unit


def test_each_unit_has_what_its_process_needs() -> None:
    agent, app, ota = (directives(SYSTEMD / u) for u in UNITS)
    # the agent: its socket in /run/windedge, its state, Unix + TCP (capture uploads)
    assert one(agent, "Service.ExecStart") == (
        "/opt/windedge/bin/edge-agent --config /etc/windedge/agent.toml"
    )
    assert one(agent, "Service.RuntimeDirectory") == "windedge"
    assert one(agent, "Service.StateDirectory") == "windedge/agent"
    assert one(agent, "Service.RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    # the app: watched, started with and after the agent, without stopping with it
    assert one(app, "Service.ExecStart") == (
        "/opt/windedge/bin/edge-app --config /etc/windedge/app.toml"
    )
    assert int(one(app, "Service.WatchdogSec")) > 0
    assert "windedge-agent.service" in one(app, "Unit.Wants").split()
    assert "windedge-agent.service" in one(app, "Unit.After").split()
    assert "Unit.Requires" not in app and "Unit.BindsTo" not in app
    # SysV shared memory between app and agent: IPC must not be private to either
    for d in (agent, app):
        assert d.get("Service.PrivateIPC", ["no"]) == ["no"]
    # the updater: its state and the model store; only ordering towards the others
    assert one(ota, "Service.ExecStart") == (
        "/opt/windedge/bin/edge-ota --config /etc/windedge/ota.toml"
    )
    assert one(ota, "Service.StateDirectory").split() == ["windedge/ota", "windedge/models"]
    for strong in ("Requires", "BindsTo", "PartOf", "Requisite", "Upholds"):
        for target in ota.get(f"Unit.{strong}", []):
            assert "windedge-" not in target, (strong, target)


def test_the_units_run_the_programs_the_project_installs() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for unit in UNITS:
        program = one(directives(SYSTEMD / unit), "Service.ExecStart").split()[0]
        name = Path(program).name
        if name == "edge-ota" and name not in scripts:
            continue  # the updater's unit is ready before its program
        assert name in scripts, f"{unit} runs {name}, which pyproject.toml does not install"
