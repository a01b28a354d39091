"""``edgectl capture``: status of capture ids, flush the spool, read a captured batch.

``flush`` needs no RPC of its own (the wire contract stays as it is):

* agent running (it holds ``<state dir>/capture/LOCK``, which names its pid):
  edgectl sends it SIGUSR1; the agent seals its open segment and retries
  uploads at once instead of waiting out a backoff. ``--wait`` then watches
  the spool until every batch that existed at that moment is uploaded.
* agent stopped: edgectl takes the spool's lock itself and uploads every
  spooled capture with the agent's own configuration (``--config``), so a
  device's captures can be shipped before maintenance or decommissioning.
  S3 credentials come from edgectl's environment (or the IoT credentials
  provider, when configured).

Signalling needs the agent's user (or root), as ``systemctl kill`` would.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from edgeagent.capture import StatusBook
from edgeagent.capture.reader import CaptureFormatError, read_records, stack
from edgeagent.capture.spool import (
    SEGMENT_RE,
    CaptureSpool,
    SpoolLockedError,
    spool_config,
)
from edgeagent.capture.upload import Uploader, build_destination
from edgeagent.client import AgentClient
from edgeagent.errors import UnavailableError
from edgeagent.settings import AgentSettings, ConfigError, load_settings
from edgectl.commands.models import add_socket_option, default_socket
from edgectl.errors import CommandError

DEFAULT_CONFIG = Path("/etc/windedge/agent.toml")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("capture", help="captured inference data: status, flush, read")
    sub = parser.add_subparsers(dest="capture_command", required=True, metavar="ACTION")

    p = sub.add_parser("status", help="GetCaptureDataStatus of one or more capture ids")
    p.add_argument("capture_ids", nargs="+", metavar="ID")
    add_socket_option(p)
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "flush",
        help="upload the capture spool now (signals a running agent, or uploads itself)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"the agent's configuration (default: {DEFAULT_CONFIG} when it exists)",
    )
    p.add_argument("--state-dir", type=Path, default=None, help="the agent's state directory")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="running agent: wait up to this long for the spool to be uploaded",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="stopped agent: give up uploading after this long (120)",
    )
    p.set_defaults(func=_flush)

    p = sub.add_parser("read", help="summarise a captured JSON Lines batch; export it to .npz")
    p.add_argument("batch", type=Path, help="a captured .jsonl file")
    p.add_argument("--npz", type=Path, help="write inputs and outputs as arrays to this file")
    p.set_defaults(func=_read)


# -- status -------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    socket_path: Path = args.socket or default_socket()
    if not socket_path.exists():
        raise UnavailableError(f"no agent socket at {socket_path} (is edge-agent running?)")
    with AgentClient(socket_path, timeout=args.timeout) as client:
        for capture_id in args.capture_ids:
            print(f"{capture_id} {client.capture_status(capture_id).name}")
    return 0


# -- flush ----------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> AgentSettings:
    config = args.config
    if config is None and DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    try:
        return load_settings(config, state_dir=args.state_dir)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _segments(spool_dir: Path, *, sealed_only: bool = False) -> set[int]:
    """Sequence numbers of the spool's segments (optionally only the sealed ones)."""
    try:
        names = [p.name for p in spool_dir.iterdir()]
    except FileNotFoundError:
        return set()
    found = {int(m.group(1)): m.group(2) != "open" for n in names if (m := SEGMENT_RE.fullmatch(n))}
    return {seq for seq, sealed in found.items() if sealed or not sealed_only}


def _flush(args: argparse.Namespace) -> int:
    settings = _settings(args)
    directory = settings.state_dir / "capture"
    if not directory.is_dir():
        raise CommandError(f"no capture spool at {directory}")
    statuses = StatusBook(ttl_seconds=settings.capture_status_ttl_seconds)
    spool = CaptureSpool(directory=directory, statuses=statuses, config=spool_config(settings))
    try:
        spool.open()
    except SpoolLockedError as exc:
        settle = settings.capture_commit_window_seconds + 0.5
        return _signal_agent(directory, exc.pid, args.wait, settle)
    try:
        try:
            destination = build_destination(settings)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        spool.seal_all()
        before = spool.counters()["spooled"]
        uploader = Uploader(
            spool=spool,
            destination=destination,
            device_id=settings.device_id,
            prefix=settings.capture_prefix,
            retry_max=min(settings.capture_retry_max_seconds, 10.0),
        )
        done = uploader.drain(args.timeout)
        left = spool.counters()["spooled"]
    finally:
        spool.close()
    print(
        f"agent not running: uploaded {before - left} capture(s) to "
        f"{destination.describe()}; {left} left in {directory}"
    )
    if not done:
        print(
            "edgectl: upload did not finish (see the log above); run flush again", file=sys.stderr
        )
        return 1
    return 0


def _signal_agent(directory: Path, pid: int | None, wait: float, settle: float) -> int:
    if pid is None:
        raise CommandError(f"the capture spool {directory} is locked but names no process")
    spool_dir = directory / "spool"
    pending = _segments(spool_dir)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise CommandError(f"agent process {pid} (from {directory}/LOCK) is gone") from None
    except PermissionError:
        raise CommandError(
            f"not allowed to signal agent process {pid}: run as the agent's user or root"
        ) from None
    print(f"asked the agent (pid {pid}) to flush its capture spool")
    if wait <= 0:
        return 0
    # captures acknowledged just before the signal may still be in the agent's commit
    # window: the flush writes them, then seals their segment; count it in
    time.sleep(settle)
    pending |= _segments(spool_dir, sealed_only=True)
    deadline = time.monotonic() + wait
    while True:
        left = pending & _segments(spool_dir)
        if not left:
            print("flushed: every capture spooled before the request is uploaded")
            return 0
        if time.monotonic() > deadline:
            print(f"edgectl: {len(left)} segment(s) still waiting for upload", file=sys.stderr)
            return 1
        time.sleep(0.2)


# -- read -------------------------------------------------------------------------------------
def _read(args: argparse.Namespace) -> int:
    try:
        records = read_records(args.batch)
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {args.batch}: {exc}") from None
    except CaptureFormatError as exc:
        raise CommandError(f"{args.batch}: {exc}") from None
    print(f"{len(records)} record(s)")
    for record in records:
        ins = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in record.inputs.items())
        outs = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in record.outputs.items())
        print(
            f"{record.event_id}  {record.model_name} {record.model_version}  "
            f"{record.inference_time:%Y-%m-%dT%H:%M:%SZ}  in: {ins or '-'}  out: {outs or '-'}"
        )
    if args.npz is not None:
        if not records:
            raise CommandError("no records to export")
        arrays = {
            "event_id": np.array([r.event_id for r in records]),
            "input": stack(records, "input"),
            "output": stack(records, "output"),
        }
        np.savez(args.npz, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds narrowly
        print(f"wrote {args.npz}")
    return 0
