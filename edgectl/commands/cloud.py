"""``edgectl cloud up|down|status``: the local AWS stand-in (see :mod:`cloud.local`).

``up`` starts it in the background (it keeps running after edgectl exits) and
prints its endpoints and the environment a device process needs; ``down``
stops what ``up`` started; ``status`` prints every endpoint and whether each
process still runs. It is a local stand-in, never AWS.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

from cloud.local import LocalCloud, LocalCloudError, Ports
from cloud.local.jobs import AdminError
from edgectl.errors import CommandError

BANNER = "local AWS stand-in (not AWS)"


def default_state_dir() -> Path:
    """``$WINDEDGE_CLOUD_STATE_DIR``, else ``$XDG_STATE_HOME/windedge/local-cloud``."""
    explicit = os.environ.get("WINDEDGE_CLOUD_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "windedge" / "local-cloud"


def add_state_dir(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS if suppress else None,
        metavar="DIR",
        help="the stand-in's state (default: $WINDEDGE_CLOUD_STATE_DIR or"
        " ~/.local/state/windedge/local-cloud)",
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("cloud", help="start, stop and show the local AWS stand-in")
    sub = parser.add_subparsers(dest="cloud_command", required=True, metavar="ACTION")

    up = sub.add_parser("up", help="start mosquitto, S3, the IoT Jobs emulator, credentials")
    add_state_dir(up)
    up.add_argument("--things", default="", metavar="A,B", help="things to register")
    up.add_argument("--bucket", default=None, help="the S3 bucket to create")
    up.add_argument("--mqtt-port", type=int, default=0, help="plain MQTT port (0: free one)")
    up.add_argument("--mqtt-tls-port", type=int, default=0, help="mutual-TLS port (0: free one)")
    up.add_argument("--s3-port", type=int, default=0, help="S3 port (0: a free one)")
    up.add_argument("--credentials-port", type=int, default=0, help="HTTPS credentials port")
    up.add_argument("--admin-port", type=int, default=0, help="jobs admin API port")
    up.add_argument(
        "--minute-seconds",
        type=float,
        default=60.0,
        help="real seconds in a 'minute' of job timeouts and rollout rates (60)",
    )
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop what `up` started")
    add_state_dir(down)
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="print every endpoint and process state")
    add_state_dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _things(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _up(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    things = _things(args.things)
    kwargs: dict[str, Any] = {}
    if args.bucket:
        kwargs["bucket"] = args.bucket
    if args.minute_seconds <= 0:
        raise CommandError("--minute-seconds must be above 0")
    try:
        cloud = LocalCloud(
            state_dir=state_dir,
            things=things,
            ports=Ports(
                mqtt=args.mqtt_port,
                mqtt_tls=args.mqtt_tls_port,
                s3=args.s3_port,
                credentials=args.credentials_port,
                admin=args.admin_port,
            ),
            minute_seconds=args.minute_seconds,
            **kwargs,
        )
        cloud.start()
    except (LocalCloudError, AdminError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{BANNER} is up; state in {cloud.state_dir}")
    _print_endpoints(cloud.endpoints.to_json())
    for thing in cloud.things:
        print(f"\nenvironment of a device process for thing {thing} ({BANNER}):")
        for key, value in cloud.env_for(thing).items():
            print(f"  export {key}={shlex.quote(value)}")
    print("\nstop it with: edgectl cloud down" + _dir_flag(args))
    cloud.detach()
    return 0


def _dir_flag(args: argparse.Namespace) -> str:
    return f" --state-dir {shlex.quote(str(args.state_dir))}" if args.state_dir else ""


def _print_endpoints(ep: dict[str, Any]) -> None:
    rows = [
        ("MQTT (plain)", f"{ep['mqtt_host']}:{ep['mqtt_port']}"),
        ("MQTT (mutual TLS)", f"{ep['mqtt_host']}:{ep['mqtt_tls_port']}"),
        ("CA certificate", ep["ca_path"]),
        ("S3 (moto)", f"{ep['s3_endpoint_url']}  bucket {ep['bucket']}"),
        (
            "credentials provider",
            f"https://{ep['credentials_endpoint']}/role-aliases/{ep['role_alias']}/credentials",
        ),
        ("jobs admin API", ep["admin_url"]),
        ("region", ep["region"]),
    ]
    for name, value in rows:
        print(f"  {name:<22} {value}")


def _down(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    stopped = LocalCloud.stop_detached(state_dir)
    if not stopped:
        print(f"no {BANNER} was running with state in {state_dir}")
    else:
        print(f"{BANNER} stopped: {', '.join(stopped)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    state = LocalCloud.read_state(state_dir)
    if state is None:
        raise CommandError(f"no {BANNER} running with state in {state_dir}")
    alive = LocalCloud.alive_pids(state)
    if args.json:
        print(
            json.dumps(
                {
                    "stand_in": BANNER,
                    "state_dir": str(state_dir),
                    "endpoints": state["endpoints"],
                    "processes": {
                        n: {"pid": state["pids"][n], "running": up} for n, up in alive.items()
                    },
                    "things": state.get("things", []),
                },
                indent=2,
            )
        )
    else:
        print(f"{BANNER}; state in {state_dir}")
        _print_endpoints(state["endpoints"])
        for name, up in alive.items():
            print(f"  {name:<22} pid {state['pids'][name]} {'running' if up else 'NOT RUNNING'}")
        if state.get("things"):
            print(f"  {'things':<22} {', '.join(state['things'])}")
    return 0 if all(alive.values()) else 1
