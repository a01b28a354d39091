"""``edgectl ota``: what the OTA updater did and is doing; ask it for jobs now.

``demo-deploy`` is for the local demo: it takes the next released model
version of ``models/`` (newer than what the devices serve), uploads it to the
demo's stand-in and creates the IoT job for every device. When no release is
newer, it re-signs the best detector of ``models/`` (``wind-turbine-relational``,
else the newest ``wind-turbine`` release: same weights, preprocessing and
thresholds) under the next major version, so the update can be shown again and
the second one visibly improves detection.

``status`` reads the updater's files (``<state_dir>``: the update in
progress, the committed versions, the last outcomes) and asks the agent what
it serves. ``check`` sends the running updater SIGUSR1 (its pid file names
it): it asks IoT Jobs for pending jobs at once instead of waiting for a
notification or its idle timer. Signalling needs the updater's user (or
root), as ``systemctl kill`` would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent.client import AgentClient
from edgeagent.errors import AgentError, NotFoundError
from edgeagent.package import (
    PackageError,
    build_package,
    extract_package,
    load_private_key,
    load_trusted_keys,
    version_key,
)
from edgectl.errors import CommandError
from ota.errors import ConfigError
from ota.settings import OtaSettings, load_settings
from ota.store import Store

DEFAULT_CONFIG = Path("/etc/windedge/ota.toml")
_REPO = Path(__file__).resolve().parents[2]
_MODEL = "wind-turbine"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("ota", help="the OTA updater: status, check for jobs now")
    sub = parser.add_subparsers(dest="ota_command", required=True, metavar="ACTION")

    p = sub.add_parser("status", help="serving version, update in progress, last outcomes")
    _common(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_status)

    p = sub.add_parser("check", help="ask the running updater to look for pending jobs now")
    _common(p)
    p.set_defaults(func=_check)

    p = sub.add_parser(
        "demo-deploy",
        help="deploy the next released model version to every device of a running demo",
    )
    p.add_argument(
        "--run-dir", type=Path, help="the demo's run directory (default: the running demo's)"
    )
    p.add_argument(
        "--version",
        help="version to deploy (default: the next release in models/, else the served major + 1)",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        default=_REPO / "models" / "dev-keys" / "windedge-dev.key",
        help="package signing key (default: the demo's development key)",
    )
    p.set_defaults(func=_demo_deploy)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"edge-ota's configuration (default: {DEFAULT_CONFIG} when it exists)",
    )
    p.add_argument("--state-dir", type=Path, help="the updater's state directory (overrides)")


def _settings(args: argparse.Namespace) -> OtaSettings:
    config: Path | None = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if args.state_dir is not None:
        settings = settings.model_copy(update={"state_dir": args.state_dir})
    return settings


def _store(settings: OtaSettings) -> Store:
    if not settings.state_dir.is_dir():
        raise CommandError(f"no OTA state directory at {settings.state_dir}")
    return Store(settings.state_dir, history_size=settings.history_size, create=False)


def _serving(settings: OtaSettings) -> dict[str, Any]:
    if not settings.agent_socket.exists():
        return {"error": f"no agent socket at {settings.agent_socket}"}
    try:
        with AgentClient(settings.agent_socket, timeout=5.0) as client:
            info = client.describe_model(settings.model_name)
    except NotFoundError:
        return {"version": None, "url": None}
    except AgentError as exc:
        return {"error": f"agent unavailable: {exc}"}
    version = None
    try:
        manifest = json.loads((Path(info.url) / "manifest.json").read_bytes())
        version = str(manifest.get("version"))
    except (OSError, ValueError):
        pass
    return {"version": version, "url": info.url}


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    record = store.load_record(quiet=True)
    installed = store.installed(settings.model_name)
    report: dict[str, Any] = {
        "model": settings.model_name,
        "thing": settings.thing_name,
        "serving": _serving(settings),
        "committed": installed.model_dump() if installed else None,
        "in_progress": (
            {
                "job_id": record.job_id,
                "execution_number": record.execution_number,
                "state": record.state,
                "from_version": record.from_version,
                "to_version": record.to_version,
                "outcome": record.outcome,
                "reason": record.reason,
                "since": record.started_at,
                "resumes": record.resumes,
            }
            if record
            else None
        ),
        "updater_pid": _pid(store),
        "history": [h.model_dump() for h in store.history()],
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    serving = report["serving"]
    print(f"model      {settings.model_name} on thing {settings.thing_name}")
    if "error" in serving:
        print(f"serving    ? ({serving['error']})")
    else:
        print(f"serving    {serving['version'] or 'nothing'}  {serving['url'] or ''}".rstrip())
    if installed:
        before = installed.previous_version or "none"
        print(f"committed  {installed.version} (before it: {before})")
    pid = report["updater_pid"]
    print(f"updater    {'running, pid ' + str(pid) if pid else 'not running'}")
    if record:
        print(
            f"updating   job {record.job_id}: {record.state}, "
            f"{record.from_version or '-'} -> {record.to_version or '?'}"
            + (f" (restarted {record.resumes}x)" if record.resumes else "")
        )
    else:
        print("updating   nothing")
    if report["history"]:
        print("last outcomes:")
        for h in store.history():
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.finished_at))
            line = f"  {when}  {h.job_id:<24} {h.outcome:<9} {h.from_version or '-'} -> "
            line += f"{h.to_version or '?'}"
            if h.reason and h.outcome != "SUCCEEDED":
                line += f"  ({h.reason[:100]})"
            print(line)
    return 0


def _pid(store: Store) -> int | None:
    try:
        pid = int(store.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid


def _check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pid = _pid(_store(settings))
    if pid is None:
        raise CommandError(f"edge-ota is not running (no live pid in {settings.state_dir})")
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        raise CommandError(f"not allowed to signal edge-ota (pid {pid}): run as its user") from None
    print(f"asked edge-ota (pid {pid}) to look for pending jobs")
    return 0


# -- the demo --------------------------------------------------------------------------
def _running_demo() -> Path:
    """The run directory of the demo whose stand-in is alive (the newest, if several)."""
    from cloud.local import LocalCloud  # noqa: PLC0415 - off-device code, loaded on demand

    found = []
    for folder in Path(tempfile.gettempdir()).glob("windedge-demo-*"):
        state = LocalCloud.read_state(folder / "cloud")
        if state is not None and all(LocalCloud.alive_pids(state).values()):
            found.append((folder.stat().st_mtime, folder))
    if not found:
        raise CommandError("no running demo found: start one with scripts/demo.sh (or --run-dir)")
    return max(found)[1]


def _served_versions(run_dir: Path, devices: list[Path]) -> list[str]:
    versions = []
    for device in devices:
        with contextlib.suppress(AgentError, OSError, ValueError):
            with AgentClient(device / "agent.sock", timeout=5.0) as client:
                url = client.describe_model(_MODEL).url
            versions.append(json.loads((Path(url) / "manifest.json").read_bytes())["version"])
    if not versions:
        raise CommandError(f"no device of the demo in {run_dir} answers (is it running?)")
    return versions


def _demo_package(args: argparse.Namespace, run_dir: Path, devices: list[Path]) -> Path:
    """The package to deploy: a release of ``models/``, or the best detector re-signed."""
    from edgectl.demo import released_packages  # noqa: PLC0415 - off-device code, on demand

    releases = released_packages(_REPO / "models")
    best = released_packages(_REPO / "models", model=f"{_MODEL}-relational") or releases
    if not releases:
        raise CommandError(f"no released {_MODEL} package in {_REPO / 'models'}")
    if args.version is not None:
        try:
            version_key(args.version)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for path, version in releases:
            if version == args.version:
                return path
        version = args.version
    else:
        newest = max(_served_versions(run_dir, devices), key=version_key)
        newer = [(p, v) for p, v in releases if version_key(v) > version_key(newest)]
        if newer:
            return newer[0][0]
        version = f"{version_key(newest)[0] + 1}.0"
    print(f"no newer release in models/: {best[-1][0].name}'s model re-signed as {version}")
    return _resign(best[-1][0], version, args.signing_key, run_dir / "packages" / version)


def _resign(release: Path, version: str, signing_key: Path, work: Path) -> Path:
    """``release``'s verified model, preprocessing and golden input, signed as ``version``."""
    import numpy as np  # noqa: PLC0415 - only this path builds a package

    try:
        key = load_private_key(signing_key)
        unpacked = work / "release"
        if unpacked.exists():
            shutil.rmtree(unpacked)
        manifest = extract_package(
            release, unpacked, trusted_keys=load_trusted_keys(signing_key.parent)
        )
        return build_package(
            model_path=unpacked / manifest.model_file,
            name=_MODEL,
            version=version,
            preprocessing=manifest.preprocessing,
            golden_input=np.load(unpacked / manifest.golden.input, allow_pickle=False),
            signing_key=key,
            out_path=work,
        )
    except (ValueError, PackageError, OSError) as exc:
        raise CommandError(f"cannot build {_MODEL} {version} from {release.name}: {exc}") from None


def _demo_deploy(args: argparse.Namespace) -> int:
    from cloud.deploy import DeployError, DeployOptions, LocalBackend, deploy  # noqa: PLC0415

    run_dir: Path = (args.run_dir or _running_demo()).resolve()
    try:
        backend = LocalBackend.from_state_dir(run_dir / "cloud")
    except DeployError as exc:
        raise CommandError(f"the demo's local stand-in is not running in {run_dir}") from exc
    devices = sorted((run_dir / "devices").glob("device-*"), key=lambda p: (len(p.name), p.name))
    if not devices:
        raise CommandError(f"no devices in {run_dir}")
    archive = _demo_package(args, run_dir, devices)
    try:
        result = deploy(
            backend,
            DeployOptions(
                package=archive,
                things=[d.name for d in devices],
                trusted_keys=args.signing_key.parent,
            ),
        )
    except DeployError as exc:
        raise CommandError(str(exc)) from None
    print(f"{archive.name} (signed) uploaded to s3://{result.bucket}/{result.key}")
    print(f"job {result.job_id} created for {', '.join(result.targets)}")
    print(f"follow it: edgectl deploy status {result.job_id} --state-dir {run_dir / 'cloud'}")
    return 0
