"""scripts/install-device into a staging root: tree, owners, modes, units, re-runs, uninstall."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from conftest import (
    DEV_PUBLIC_KEY,
    MOSQUITTO_UID,
    REPO,
    UNITS,
    Staged,
    device_root,
    ids,
    run_install,
)

# path -> (kind, mode, owner, group); owners are names looked up in the staged /etc/passwd
EXPECTED: dict[str, tuple[str, int, str, str]] = {
    "etc/windedge": ("d", 0o750, "root", "windedge"),
    "etc/windedge/agent.toml": ("f", 0o640, "root", "windedge"),
    "etc/windedge/app.toml": ("f", 0o640, "root", "windedge"),
    "etc/windedge/mosquitto-bridge.conf": ("f", 0o644, "root", "root"),
    "etc/windedge/keys": ("d", 0o750, "root", "windedge"),
    "etc/windedge/keys/windedge-dev.pub": ("f", 0o644, "root", "windedge"),
    "etc/windedge/certs": ("d", 0o750, "root", "windedge"),
    "etc/windedge/certs/device.pem.crt": ("f", 0o644, "root", "windedge"),
    "etc/windedge/certs/private.pem.key": ("f", 0o600, "windedge", "windedge"),
    "etc/windedge/certs/AmazonRootCA1.pem": ("f", 0o644, "root", "windedge"),
    "etc/windedge/bridge": ("d", 0o750, "mosquitto", "mosquitto"),
    "etc/windedge/bridge/device.pem.crt": ("f", 0o644, "mosquitto", "mosquitto"),
    "etc/windedge/bridge/private.pem.key": ("f", 0o600, "mosquitto", "mosquitto"),
    "etc/windedge/bridge/AmazonRootCA1.pem": ("f", 0o644, "mosquitto", "mosquitto"),
    "var/lib/windedge": ("d", 0o750, "root", "windedge"),
    "var/lib/windedge/agent": ("d", 0o750, "windedge", "windedge"),
    "var/lib/windedge/models": ("d", 0o750, "windedge", "windedge"),
    "var/lib/windedge/ota": ("d", 0o750, "windedge", "windedge"),
    "var/lib/windedge/app": ("d", 0o750, "windedge", "windedge"),
    "etc/sysusers.d/windedge.conf": ("f", 0o644, "root", "root"),
    "etc/tmpfiles.d/windedge.conf": ("f", 0o644, "root", "root"),
    **{f"etc/systemd/system/{unit}": ("f", 0o644, "root", "root") for unit in UNITS},
    "opt/windedge/bin/edge-agent": ("f", 0o755, "root", "root"),
    "opt/windedge/bin/edge-app": ("f", 0o755, "root", "root"),
    "opt/windedge/bin/edgectl": ("f", 0o755, "root", "root"),
    # the units' Documentation=
    "opt/windedge/share/doc/windedge/operations.md": ("f", 0o644, "root", "root"),
}
if (REPO / "config" / "ota.toml").exists():
    EXPECTED["etc/windedge/ota.toml"] = ("f", 0o640, "root", "windedge")


def describe(root: Path, rel: str) -> tuple[str, int, str, str]:
    st = os.lstat(root / rel)
    users = {v: k for k, v in ids(root, "passwd").items()} | {0: "root"}
    groups = {v: k for k, v in ids(root, "group").items()} | {0: "root"}
    kind = "d" if stat.S_ISDIR(st.st_mode) else "f" if stat.S_ISREG(st.st_mode) else "other"
    owner = users.get(st.st_uid, str(st.st_uid))
    group = groups.get(st.st_gid, str(st.st_gid))
    return kind, stat.S_IMODE(st.st_mode), owner, group


def snapshot(root: Path) -> dict[str, tuple[str, int, str, str]]:
    """Kind, mode and owners of everything outside the venv."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[:1] == ("opt",):
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            rel = str(rel_dir / name)
            out[rel] = describe(root, rel)
    return out


def test_tree_owners_and_modes(staged: Staged) -> None:
    wrong = {
        rel: (describe(staged.root, rel), want)
        for rel, want in EXPECTED.items()
        if not (staged.root / rel).exists() or describe(staged.root, rel) != want
    }
    assert not wrong, f"(found, expected): {wrong}"
    # nothing anyone may write, nothing readable by others under the state tree
    for rel, (_kind, mode, _o, _g) in snapshot(staged.root).items():
        assert not mode & stat.S_IWOTH or os.path.islink(staged.root / rel), rel


def test_user_group_and_files_hold_what_was_given(staged: Staged) -> None:
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (staged.root / "etc/passwd").read_text().splitlines()
    }
    user = passwd["windedge"]
    assert user[5:] == ["/var/lib/windedge", "/usr/sbin/nologin"]
    assert int(user[3]) == staged.gid("windedge")
    assert staged.uid("mosquitto") == MOSQUITTO_UID  # an existing user is left alone
    certs = staged.root / "etc/windedge/certs"
    assert (certs / "private.pem.key").read_bytes() == staged.pki.key(
        "turbine-farm-01"
    ).read_bytes()
    assert (certs / "device.pem.crt").read_bytes() == staged.pki.crt("turbine-farm-01").read_bytes()
    assert (certs / "AmazonRootCA1.pem").read_bytes() == staged.pki.ca.read_bytes()
    keys = staged.root / "etc/windedge/keys"
    assert (keys / "windedge-dev.pub").read_bytes() == DEV_PUBLIC_KEY.read_bytes()
    for kind in ("agent", "app"):
        installed = staged.root / f"etc/windedge/{kind}.toml"
        assert installed.read_text() == (REPO / "config" / f"{kind}.toml").read_text()


def test_units_are_installed_and_enabled(staged: Staged) -> None:
    wants = staged.root / "etc/systemd/system/multi-user.target.wants"
    for unit in UNITS:
        installed = staged.root / "etc/systemd/system" / unit
        assert installed.read_text() == (REPO / "systemd" / unit).read_text()
        program = next(
            line.split("=", 1)[1].split()[0]
            for line in installed.read_text().splitlines()
            if line.startswith("ExecStart=")
        )
        if (staged.root / program.lstrip("/")).exists():
            assert os.readlink(wants / unit) == f"/etc/systemd/system/{unit}"
        else:  # a unit whose program this version does not ship is not enabled
            assert not (wants / unit).exists()
            assert f"{unit} installed but not enabled" in staged.output
    for name in ("edge-agent", "edge-app"):
        assert (staged.venv / "bin" / name).exists()


def test_venv_runs_from_opt_windedge(staged: Staged) -> None:
    for name in ("edge-agent", "edge-app", "edgectl"):
        first = (staged.venv / "bin" / name).read_text().splitlines()[0]
        assert first == "#!/opt/windedge/bin/python", (name, first)
    # nothing in the environment names the staging directory (byte code included)
    found = subprocess.run(
        ["grep", "-rlF", str(staged.root), str(staged.venv)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.stdout == "", found.stdout[:2000]
    # the staged interpreter runs the installed package: the configuration it laid out is valid
    check = subprocess.run(
        [
            str(staged.venv / "bin" / "python"),
            "-m",
            "edgectl",
            "config",
            "check",
            str(staged.root / "etc/windedge/agent.toml"),
            str(staged.root / "etc/windedge/app.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": ok") == 2
    imported = subprocess.run(
        [str(staged.venv / "bin" / "python"), "-c", "import edgeagent; print(edgeagent.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert imported.stdout.startswith(str(staged.venv / "lib"))  # not this checkout


def test_running_again_changes_nothing_and_keeps_edits(staged: Staged) -> None:
    app_toml = staged.root / "etc/windedge/app.toml"
    original = app_toml.read_text()
    edited = original + "\n# edited on the device\nmax_turbines = 12\n"
    app_toml.write_text(edited)
    os.chmod(staged.root / "etc/windedge/certs/private.pem.key", 0o644)  # a careless copy
    before = snapshot(staged.root)
    before["etc/windedge/certs/private.pem.key"] = EXPECTED["etc/windedge/certs/private.pem.key"]
    run_install(staged.root)
    assert snapshot(staged.root) == before
    assert app_toml.read_text() == edited
    users = [line.split(":")[0] for line in (staged.root / "etc/passwd").read_text().splitlines()]
    assert users.count("windedge") == 1
    app_toml.write_text(original)


def test_uninstall_keeps_state_and_purge_removes_it() -> None:
    with device_root("we-uninst-") as (_base, root):
        # a device installed earlier: the tree without the (slow to build) venv
        for rel in ("etc/sysusers.d", "etc/tmpfiles.d", "etc/systemd/system"):
            (root / rel).mkdir(parents=True)
        subprocess.run(
            [
                "install",
                "-m",
                "0644",
                REPO / "systemd/windedge.sysusers",
                root / "etc/sysusers.d/windedge.conf",
            ],
            check=True,
        )
        subprocess.run(
            ["systemd-sysusers", f"--root={root}", "windedge.conf"], check=True, capture_output=True
        )
        (root / "opt/windedge/bin").mkdir(parents=True)
        for unit in UNITS:
            (root / "etc/systemd/system" / unit).write_text((REPO / "systemd" / unit).read_text())
        subprocess.run(
            ["systemctl", f"--root={root}", "enable", *UNITS], check=True, capture_output=True
        )
        (root / "etc/windedge").mkdir()
        (root / "etc/windedge/app.toml").write_text("max_turbines = 3\n")
        (root / "var/lib/windedge/agent").mkdir(parents=True)
        (root / "var/lib/windedge/agent/models.json").write_text("{}")

        proc = run_install(root, "--uninstall")
        assert "kept" in proc.stderr
        for unit in UNITS:
            assert not (root / "etc/systemd/system" / unit).exists()
            assert not (root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink()
        assert not (root / "opt/windedge").exists()
        assert not (root / "etc/sysusers.d/windedge.conf").exists()
        assert (root / "etc/windedge/app.toml").read_text() == "max_turbines = 3\n"
        assert (root / "var/lib/windedge/agent/models.json").exists()
        assert "windedge" in ids(root, "passwd")
        run_install(root, "--uninstall")  # again: nothing left to do, no error

        wrong = run_install(root, "--purge", check=False)
        assert wrong.returncode != 0 and "--purge goes with --uninstall" in wrong.stderr

        run_install(root, "--uninstall", "--purge")
        assert not (root / "etc/windedge").exists()
        assert not (root / "var/lib/windedge").exists()
        assert "windedge" not in ids(root, "passwd")
        assert "windedge" not in ids(root, "group")
        assert ids(root, "passwd")["mosquitto"] == MOSQUITTO_UID
