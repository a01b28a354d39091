"""``edgectl ota``: what the OTA updater did and is doing; ask it for jobs now.

``status`` reads the updater's files (``<state_dir>``: the update in
progress, the committed versions, the last outcomes) and asks the agent what
it serves. ``check`` sends the running updater SIGUSR1 (its pid file names
it): it asks IoT Jobs for pending jobs at once instead of waiting for a
notification or its idle timer. Signalling needs the updater's user (or
root), as ``systemctl kill`` would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from edgeagent.client import AgentClient
from edgeagent.errors import AgentError, NotFoundError
from edgectl.errors import CommandError
from ota.errors import ConfigError
from ota.settings import OtaSettings, load_settings
from ota.store import Store

DEFAULT_CONFIG = Path("/etc/windedge/ota.toml")


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
