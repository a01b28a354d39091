"""``edgectl deploy``: upload a model package and create the IoT job; status; cleanup.

``edgectl deploy --package F (--things a,b | --thing-group G) [--local | --aws]``
verifies the package, uploads it to S3 (multipart above a threshold, a
progress bar for large files) and creates the job; ``deploy status JOB`` shows
each device's execution (a table, or ``--json``); ``deploy cleanup [JOB ...]``
removes what deploy created (jobs and package objects; all of them without a
job id). ``--local`` (the default) uses the local stand-in of ``--state-dir``,
``--aws`` uses boto3's usual configuration (profile, region, credentials,
``AWS_ENDPOINT_URL``). Thin handlers over :mod:`cloud.deploy`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cloud.deploy import (
    DEFAULT_MULTIPART_THRESHOLD,
    AwsBackend,
    Backend,
    DeployError,
    DeployOptions,
    LocalBackend,
    cleanup,
    deploy,
    job_status,
)
from edgectl.commands.cloud import add_state_dir, default_state_dir
from edgectl.errors import CommandError


def _backend_args(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--local",
        dest="target",
        action="store_const",
        const="local",
        default=default,
        help="the local stand-in (default)",
    )
    where.add_argument(
        "--aws", dest="target", action="store_const", const="aws", help="real AWS via boto3"
    )
    add_state_dir(parser, suppress=suppress)
    parser.add_argument(
        "--region", default=default, help="AWS region (--aws; default: boto3's configuration)"
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "deploy", help="upload a model package and create the IoT job (AWS or local stand-in)"
    )
    _backend_args(parser, suppress=False)
    parser.add_argument("--package", type=Path, metavar="FILE", help="<name>-<version>.tar.gz")
    parser.add_argument("--things", default="", metavar="A,B", help="target thing names")
    parser.add_argument("--thing-group", metavar="G", help="target thing group")
    parser.add_argument("--bucket", help="S3 bucket (local default: the stand-in's bucket)")
    parser.add_argument("--key-prefix", default="models", help="S3 key prefix (models)")
    parser.add_argument("--job-id", help="job id (default: <name>-<version>-<UTC time>)")
    parser.add_argument(
        "--trusted-keys", type=Path, metavar="DIR", help="also check the signature with these keys"
    )
    parser.add_argument("--max-per-minute", type=int, help="rollout: executions per minute")
    parser.add_argument(
        "--abort-threshold", type=float, metavar="PCT", help="cancel at this failure percentage"
    )
    parser.add_argument(
        "--abort-on", default="FAILED", help="FAILED, REJECTED, TIMED_OUT or ALL (FAILED)"
    )
    parser.add_argument(
        "--abort-min-executed", type=int, default=1, help="things that must end first (1)"
    )
    parser.add_argument("--timeout-minutes", type=int, help="in-progress timeout per device")
    parser.add_argument(
        "--presigned-url",
        action="store_true",
        help="put an IoT presigned-URL placeholder for the package in the document",
    )
    parser.add_argument("--presign-role-arn", help="role IoT assumes to presign (--aws)")
    parser.add_argument("--presign-expires", type=int, default=3600, help="seconds (3600)")
    parser.add_argument(
        "--multipart-threshold",
        type=int,
        default=DEFAULT_MULTIPART_THRESHOLD,
        metavar="BYTES",
        help=f"multipart upload above this size ({DEFAULT_MULTIPART_THRESHOLD})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_deploy)
    sub = parser.add_subparsers(dest="deploy_command", metavar="[status|cleanup]")

    status = sub.add_parser("status", help="per-device status of a job")
    status.add_argument("job_id", metavar="JOB")
    status.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    _backend_args(status, suppress=True)
    status.set_defaults(func=_status)

    clean = sub.add_parser("cleanup", help="remove the jobs and objects deploy created")
    clean.add_argument("job_ids", nargs="*", metavar="JOB", help="default: every deploy job")
    _backend_args(clean, suppress=True)
    clean.set_defaults(func=_cleanup)


def _backend(args: argparse.Namespace) -> Backend:
    try:
        if args.target == "aws":
            return AwsBackend(region=args.region)
        return LocalBackend.from_state_dir(
            Path(args.state_dir) if args.state_dir else default_state_dir()
        )
    except DeployError as exc:
        raise CommandError(str(exc)) from None


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.sent, self._last = name, max(total, 1), 0, 0.0

    def __call__(self, chunk: int) -> None:
        self.sent += chunk
        now = time.monotonic()
        if now - self._last < 0.1 and self.sent < self.total:
            return
        self._last = now
        share = min(1.0, self.sent / self.total)
        bar = "#" * int(share * 30)
        print(
            f"\rupload {self.name} [{bar:<30}] {share * 100:5.1f}% "
            f"{self.sent / 1e6:.1f}/{self.total / 1e6:.1f} MB",
            end="" if self.sent < self.total else "\n",
            file=sys.stderr,
            flush=True,
        )


def _deploy(args: argparse.Namespace) -> int:
    if args.package is None:
        raise CommandError("--package is required (or use `deploy status` / `deploy cleanup`)")
    things = [t.strip() for t in args.things.split(",") if t.strip()]
    options = DeployOptions(
        package=args.package,
        things=things,
        thing_group=args.thing_group,
        bucket=args.bucket,
        key_prefix=args.key_prefix,
        job_id=args.job_id,
        trusted_keys=args.trusted_keys,
        max_per_minute=args.max_per_minute,
        abort_failure_type=args.abort_on,
        abort_threshold_percent=args.abort_threshold,
        abort_min_executed=args.abort_min_executed,
        in_progress_timeout_minutes=args.timeout_minutes,
        presigned_url=args.presigned_url,
        presign_role_arn=args.presign_role_arn,
        presign_expires_sec=args.presign_expires,
        multipart_threshold=args.multipart_threshold,
    )
    if not things and args.thing_group is None:
        raise CommandError("no targets: give --things or --thing-group")
    backend = _backend(args)
    size = args.package.stat().st_size if args.package.is_file() else 0
    bar = _ProgressBar(args.package.name, size) if size >= args.multipart_threshold else None
    try:
        result = deploy(backend, options, progress=bar)
    except DeployError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(
            json.dumps(
                {
                    "jobId": result.job_id,
                    "bucket": result.bucket,
                    "key": result.key,
                    "targets": result.targets,
                    "document": result.document,
                    "backend": backend.name,
                },
                indent=2,
            )
        )
    else:
        where = "the local stand-in (not AWS)" if backend.name == "local" else "AWS"
        print(f"uploaded s3://{result.bucket}/{result.key} ({result.size} bytes)")
        print(f"created job {result.job_id} on {where} for {', '.join(result.targets)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    backend = _backend(args)
    try:
        status, rows = job_status(backend, args.job_id)
    except DeployError as exc:
        raise CommandError(str(exc)) from None
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "jobId": args.job_id,
                    "status": status,
                    "executions": [
                        {
                            "thing": r.thing,
                            "status": r.status,
                            "statusDetails": r.status_details,
                            "lastUpdated": r.last_updated,
                        }
                        for r in rows
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(f"job {args.job_id}: {status}")
    width = max([5, *(len(r.thing) for r in rows)])
    print(f"{'THING':<{width}}  {'STATUS':<11}  {'UPDATED':<20}  DETAILS")
    for r in rows:
        details = ", ".join(f"{k}={v}" for k, v in sorted(r.status_details.items()))
        print(f"{r.thing:<{width}}  {r.status:<11}  {r.last_updated:<20}  {details}")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    backend = _backend(args)
    try:
        removed = cleanup(backend, args.job_ids or None)
    except DeployError as exc:
        raise CommandError(str(exc)) from None
    if not removed:
        print("nothing to clean up")
    for job_id, url in removed:
        print(f"removed job {job_id}" + (f" and {url}" if url else ""))
    return 0
