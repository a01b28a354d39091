"""Deploy a model package to a fleet: upload it to S3, create the IoT job, report, clean up.

The same steps against real AWS (boto3 ``s3`` and ``iot``; ``AWS_ENDPOINT_URL``
points them elsewhere, e.g. at moto in tests) and against the local stand-in
(its S3 and the Jobs emulator's admin API). Order, so that a failure leaves
nothing half-created:

1. verify the package (every check of the agent's package module; with
   trusted keys, the signature too) and read its name and version;
2. resolve the targets (an unknown thing or thing group is an error), check
   the bucket exists and the job id is free;
3. upload (multipart above a threshold, with a progress callback), the object
   tagged as ours with its SHA-256 in the metadata;
4. create the job with the document of ARCHITECTURE.md (the original
   workshop's fields plus ``sha256``, ``size``, and optionally a presigned-URL
   placeholder). If creating the job fails, the uploaded object is deleted.

``cleanup`` removes what deploy created: the job (canceled first) and its
package object, for one job or for every job deploy made (``description``
starts with ``DESCRIPTION_PREFIX``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from cloud.local.admin import JobsAdmin
from cloud.local.jobs import AdminError
from cloud.local.launcher import LocalCloud
from edgeagent.errors import AgentError
from edgeagent.package import load_trusted_keys, sha256_of, verify_package_archive

__all__ = [
    "DESCRIPTION_PREFIX",
    "AwsBackend",
    "Backend",
    "DeployError",
    "DeployOptions",
    "Deployment",
    "ExecutionRow",
    "LocalBackend",
    "cleanup",
    "deploy",
    "job_status",
]

DESCRIPTION_PREFIX = "windedge deploy:"
OWNER_METADATA = "windedge-deploy"
DEFAULT_MULTIPART_THRESHOLD = 8 * 1024 * 1024
JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

Progress = Callable[[int], None]
"""Called with the number of bytes sent since the last call."""


class DeployError(Exception):
    """Deploy refused or failed; the message says why in one line."""


@dataclass(frozen=True)
class DeployOptions:
    package: Path
    things: Sequence[str] = ()
    thing_group: str | None = None
    bucket: str | None = None  # None: the backend's default
    key_prefix: str = "models"
    job_id: str | None = None
    trusted_keys: Path | None = None
    max_per_minute: int | None = None
    abort_failure_type: str = "FAILED"
    abort_threshold_percent: float | None = None
    abort_min_executed: int = 1
    in_progress_timeout_minutes: int | None = None
    presigned_url: bool = False
    presign_role_arn: str | None = None
    presign_expires_sec: int = 3600
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD


@dataclass(frozen=True)
class Deployment:
    job_id: str
    bucket: str
    key: str
    document: dict[str, Any]
    targets: list[str]
    size: int


@dataclass(frozen=True)
class ExecutionRow:
    thing: str
    status: str
    status_details: dict[str, str] = field(default_factory=dict)
    last_updated: str = ""


class Backend(Protocol):
    """Where jobs and objects live: real AWS, or the local stand-in."""

    name: str
    default_bucket: str | None
    region: str

    def s3(self) -> Any: ...
    def resolve_targets(self, things: Sequence[str], group: str | None) -> list[str]: ...
    def job_exists(self, job_id: str) -> bool: ...
    def create_job(self, job_id: str, targets: list[str], document: dict[str, Any],
                   description: str, extra: dict[str, Any]) -> None: ...  # fmt: skip
    def job(self, job_id: str) -> tuple[str, dict[str, Any], str]: ...
    def executions(self, job_id: str) -> list[ExecutionRow]: ...
    def remove_job(self, job_id: str) -> None: ...
    def deploy_jobs(self) -> list[str]: ...


def _stamp(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return dt.datetime.fromtimestamp(float(value), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AwsBackend:
    """boto3 against AWS IoT and S3 (or whatever ``AWS_ENDPOINT_URL*`` names)."""

    name = "aws"

    def __init__(self, *, region: str | None = None, bucket: str | None = None) -> None:
        session = boto3.session.Session(region_name=region)
        self.region = session.region_name or "us-east-1"
        self._session = session
        self._iot = session.client("iot", region_name=self.region)
        self.default_bucket = bucket

    def s3(self) -> Any:
        return self._session.client("s3", region_name=self.region)

    def resolve_targets(self, things: Sequence[str], group: str | None) -> list[str]:
        arns = []
        for thing in things:
            try:
                arns.append(self._iot.describe_thing(thingName=thing)["thingArn"])
            except ClientError as exc:
                if _code(exc) == "ResourceNotFoundException":
                    raise DeployError(f"unknown thing {thing}") from None
                raise
        if group is not None:
            try:
                arns.append(self._iot.describe_thing_group(thingGroupName=group)["thingGroupArn"])
            except ClientError as exc:
                if _code(exc) == "ResourceNotFoundException":
                    raise DeployError(f"unknown thing group {group}") from None
                raise
        return arns

    def job_exists(self, job_id: str) -> bool:
        try:
            self._iot.describe_job(jobId=job_id)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return False
            raise
        return True

    def create_job(
        self,
        job_id: str,
        targets: list[str],
        document: dict[str, Any],
        description: str,
        extra: dict[str, Any],
    ) -> None:
        self._iot.create_job(
            jobId=job_id,
            targets=targets,
            document=json.dumps(document),
            description=description,
            targetSelection="SNAPSHOT",
            **extra,
        )

    def job(self, job_id: str) -> tuple[str, dict[str, Any], str]:
        try:
            job = self._iot.describe_job(jobId=job_id)["job"]
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                raise DeployError(f"no job {job_id}") from None
            raise
        document = json.loads(self._iot.get_job_document(jobId=job_id)["document"])
        return str(job["status"]), document, str(job.get("description") or "")

    def executions(self, job_id: str) -> list[ExecutionRow]:
        rows = []
        paginator = self._iot.get_paginator("list_job_executions_for_job")
        for page in paginator.paginate(jobId=job_id):
            for item in page["executionSummaries"]:
                thing = item["thingArn"].rsplit("/", 1)[-1]
                summary = item["jobExecutionSummary"]
                details: dict[str, str] = {}
                try:
                    ex = self._iot.describe_job_execution(jobId=job_id, thingName=thing)
                    details = ex["execution"].get("statusDetails", {}).get("detailsMap", {})
                except ClientError:
                    details = {}
                rows.append(
                    ExecutionRow(
                        thing=thing,
                        status=summary["status"],
                        status_details=details,
                        last_updated=_stamp(summary.get("lastUpdatedAt")),
                    )
                )
        return rows

    def remove_job(self, job_id: str) -> None:
        status, _, _ = self.job(job_id)
        if status not in ("CANCELED", "COMPLETED"):
            self._iot.cancel_job(jobId=job_id, force=True, comment="windedge deploy cleanup")
        self._iot.delete_job(jobId=job_id, force=True)

    def deploy_jobs(self) -> list[str]:
        ids = []
        for page in self._iot.get_paginator("list_jobs").paginate():
            for job in page["jobs"]:
                desc = self._iot.describe_job(jobId=job["jobId"])["job"].get("description") or ""
                if desc.startswith(DESCRIPTION_PREFIX):
                    ids.append(job["jobId"])
        return ids


class LocalBackend:
    """The local stand-in: its S3 (moto) and the Jobs emulator's admin API."""

    name = "local"

    def __init__(self, *, admin_url: str, s3_endpoint_url: str, bucket: str, region: str) -> None:
        self._admin = JobsAdmin(admin_url)
        self._s3_endpoint = s3_endpoint_url
        self.default_bucket: str | None = bucket
        self.region = region

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> LocalBackend:
        state = LocalCloud.read_state(state_dir)
        if state is None or not all(LocalCloud.alive_pids(state).values()):
            raise DeployError(
                f"no local stand-in running with state in {state_dir}: start it with"
                " `edgectl cloud up`"
            )
        ep = state["endpoints"]
        return cls(
            admin_url=ep["admin_url"],
            s3_endpoint_url=ep["s3_endpoint_url"],
            bucket=ep["bucket"],
            region=ep["region"],
        )

    def s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self._s3_endpoint,
            region_name=self.region,
            aws_access_key_id="local-stand-in",
            aws_secret_access_key="local-stand-in",  # noqa: S106 - moto accepts any key
        )

    def resolve_targets(self, things: Sequence[str], group: str | None) -> list[str]:
        known = {t["thingName"]: t for t in self._admin.list_things()}
        out = []
        for thing in things:
            if thing not in known:
                raise DeployError(f"unknown thing {thing}")
            out.append(known[thing]["thingArn"])
        if group is not None:
            if not any(group in t.get("groups", []) for t in known.values()):
                raise DeployError(f"unknown thing group {group}")
            out.append(f"arn:aws:iot:{self.region}:123456789012:thinggroup/{group}")
        return out

    def job_exists(self, job_id: str) -> bool:
        try:
            self._admin.describe_job(job_id)
        except AdminError as exc:
            if exc.code == "ResourceNotFoundException":
                return False
            raise
        return True

    def create_job(
        self,
        job_id: str,
        targets: list[str],
        document: dict[str, Any],
        description: str,
        extra: dict[str, Any],
    ) -> None:
        self._admin.create_job(
            job_id,
            targets=targets,
            document=document,
            description=description,
            rollout_config=extra.get("jobExecutionsRolloutConfig"),
            abort_config=extra.get("abortConfig"),
            timeout_config=extra.get("timeoutConfig"),
            presigned_url_config=extra.get("presignedUrlConfig"),
        )

    def job(self, job_id: str) -> tuple[str, dict[str, Any], str]:
        try:
            job = self._admin.describe_job(job_id)
        except AdminError as exc:
            if exc.code == "ResourceNotFoundException":
                raise DeployError(f"no job {job_id}") from None
            raise
        return str(job["status"]), dict(job["document"]), str(job.get("description") or "")

    def executions(self, job_id: str) -> list[ExecutionRow]:
        return [
            ExecutionRow(
                thing=e["thingName"],
                status=e["status"],
                status_details=dict(e["statusDetails"]),
                last_updated=_stamp(e["lastUpdatedAt"]),
            )
            for e in self._admin.list_executions(job_id)
        ]

    def remove_job(self, job_id: str) -> None:
        status, _, _ = self.job(job_id)
        if status not in ("CANCELED", "COMPLETED"):
            self._admin.cancel_job(job_id, force=True, comment="windedge deploy cleanup")
        self._admin.delete_job(job_id, force=True)

    def deploy_jobs(self) -> list[str]:
        return [
            j["jobId"]
            for j in self._admin.list_jobs()
            if str(self._admin.describe_job(j["jobId"]).get("description") or "").startswith(
                DESCRIPTION_PREFIX
            )
        ]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# ------------------------------------------------------------------- operations
def deploy(
    backend: Backend, options: DeployOptions, *, progress: Progress | None = None
) -> Deployment:
    """Verify, upload, create the job (see the module docstring for the order)."""
    if not options.things and options.thing_group is None:
        raise DeployError("no targets: give --things or --thing-group")
    package = options.package
    if not package.is_file():
        raise DeployError(f"package {package} does not exist or is not a file")
    try:
        keys = load_trusted_keys(options.trusted_keys) if options.trusted_keys else None
        manifest = verify_package_archive(
            package, trusted_keys=keys, require_signature=keys is not None
        )
    except AgentError as exc:
        raise DeployError(f"package {package.name} failed verification: {exc}") from None
    bucket = options.bucket or backend.default_bucket
    if not bucket:
        raise DeployError("no bucket: give --bucket")
    job_id = options.job_id or _job_id(manifest.name, manifest.version)
    if not JOB_ID_RE.match(job_id):
        raise DeployError(f"invalid job id {job_id!r}: 1-64 of [a-zA-Z0-9_-]")
    extra = _job_configs(options)
    if options.presigned_url and backend.name == "aws" and not options.presign_role_arn:
        raise DeployError("--presigned-url on AWS needs --presign-role-arn (a role IoT assumes)")
    try:
        targets = backend.resolve_targets(list(options.things), options.thing_group)
        if backend.job_exists(job_id):
            raise DeployError(f"job {job_id} already exists")
        s3 = backend.s3()
        _check_bucket(s3, bucket)
    except (ClientError, BotoCoreError, AdminError, OSError) as exc:
        raise DeployError(f"{backend.name}: {exc}") from None
    size = package.stat().st_size
    digest = sha256_of(package)
    key = f"{options.key_prefix.strip('/')}/{manifest.name}/{manifest.version}/{package.name}"
    document: dict[str, Any] = {
        "type": "new_model",
        "model_name": manifest.name,
        "model_version": manifest.version,
        "model_package_bucket": bucket,
        "model_package_key": key,
        "sha256": digest,
        "size": size,
    }
    if options.presigned_url:
        document["model_package_url"] = (
            f"${{aws:iot:s3-presigned-url:https://s3.{backend.region}.amazonaws.com/{bucket}/{key}}}"
        )
    try:
        s3.upload_file(
            str(package),
            bucket,
            key,
            ExtraArgs={"Metadata": {OWNER_METADATA: job_id, "sha256": digest}},
            Config=TransferConfig(multipart_threshold=options.multipart_threshold),
            Callback=progress,
        )
    except (ClientError, BotoCoreError, OSError) as exc:
        raise DeployError(
            f"upload of {package.name} to s3://{bucket}/{key} failed: {exc}"
        ) from None
    description = f"{DESCRIPTION_PREFIX} {manifest.name} {manifest.version}"
    try:
        backend.create_job(job_id, targets, document, description, extra)
    except (ClientError, BotoCoreError, AdminError, OSError) as exc:
        _delete_object(s3, bucket, key)
        raise DeployError(f"creating job {job_id} failed (upload removed): {exc}") from None
    return Deployment(
        job_id=job_id, bucket=bucket, key=key, document=document, targets=targets, size=size
    )


def job_status(backend: Backend, job_id: str) -> tuple[str, list[ExecutionRow]]:
    try:
        status, _, _ = backend.job(job_id)
        return status, backend.executions(job_id)
    except (ClientError, BotoCoreError, AdminError, OSError) as exc:
        raise DeployError(f"{backend.name}: {exc}") from None


def cleanup(backend: Backend, job_ids: Sequence[str] | None) -> list[tuple[str, str | None]]:
    """Remove the jobs (all deploy made when ``job_ids`` is None) and their package objects.

    Returns ``(job_id, "s3://bucket/key" or None)`` for each removed job. An
    object is deleted only if deploy uploaded it (its metadata says so).
    """
    try:
        ids = list(job_ids) if job_ids is not None else backend.deploy_jobs()
        s3 = backend.s3()
        removed = []
        for job_id in ids:
            _, document, _ = backend.job(job_id)
            backend.remove_job(job_id)
            bucket, key = document.get("model_package_bucket"), document.get("model_package_key")
            url = None
            if isinstance(bucket, str) and isinstance(key, str) and _ours(s3, bucket, key):
                _delete_object(s3, bucket, key)
                url = f"s3://{bucket}/{key}"
            removed.append((job_id, url))
        return removed
    except (ClientError, BotoCoreError, AdminError, OSError) as exc:
        raise DeployError(f"{backend.name}: {exc}") from None


def _ours(s3: Any, bucket: str, key: str) -> bool:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return OWNER_METADATA in head.get("Metadata", {})


def _delete_object(s3: Any, bucket: str, key: str) -> None:
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError):
        return


def _check_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise DeployError(f"bucket {bucket} does not exist") from None
        raise


def _job_id(name: str, version: str) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    safe = re.sub(r"[^a-zA-Z0-9_-]", "_", f"{name}-{version}")
    return f"{safe}-{stamp}"[-64:]


def _job_configs(options: DeployOptions) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if options.max_per_minute is not None:
        if not 1 <= options.max_per_minute <= 1000:
            raise DeployError("--max-per-minute must be 1-1000")
        extra["jobExecutionsRolloutConfig"] = {"maximumPerMinute": options.max_per_minute}
    if options.abort_threshold_percent is not None:
        if not 0 < options.abort_threshold_percent <= 100:
            raise DeployError("--abort-threshold must be a percentage above 0 and at most 100")
        if options.abort_failure_type not in ("FAILED", "REJECTED", "TIMED_OUT", "ALL"):
            raise DeployError("--abort-on must be FAILED, REJECTED, TIMED_OUT or ALL")
        if options.abort_min_executed < 1:
            raise DeployError("--abort-min-executed must be at least 1")
        extra["abortConfig"] = {
            "criteriaList": [
                {
                    "failureType": options.abort_failure_type,
                    "action": "CANCEL",
                    "thresholdPercentage": options.abort_threshold_percent,
                    "minNumberOfExecutedThings": options.abort_min_executed,
                }
            ]
        }
    if options.in_progress_timeout_minutes is not None:
        if not 1 <= options.in_progress_timeout_minutes <= 10080:
            raise DeployError("--timeout-minutes must be 1-10080")
        extra["timeoutConfig"] = {"inProgressTimeoutInMinutes": options.in_progress_timeout_minutes}
    if options.presigned_url:
        if not 60 <= options.presign_expires_sec <= 3600:
            raise DeployError("--presign-expires must be 60-3600 seconds")
        config: dict[str, Any] = {"expiresInSec": options.presign_expires_sec}
        if options.presign_role_arn:
            config["roleArn"] = options.presign_role_arn
        extra["presignedUrlConfig"] = config
    return extra
