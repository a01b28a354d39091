"""The capture uploader: sealed spool segments to a directory or to S3.

One sealed segment is one batch. Its records are grouped by model and each
group becomes one JSON Lines object at

    <prefix>/<fleet>/<model>/YYYY/MM/DD/HH/<batch-id>.jsonl

where ``YYYY/MM/DD/HH`` is the (UTC) hour the segment was sealed and
``<batch-id>`` = ``<device>-<sealed at>-<sha256 of the segment's bytes>``:
both are fixed once the segment is sealed, so an upload that is retried or
repeated after a crash writes the same keys again (an overwrite with the same
records) and never duplicates a record in the destination. Auxiliary payloads
above the embed limit go first, to
``<prefix>/<fleet>/<model>/YYYY/MM/DD/HH/auxiliary/<capture id>/<mode>-<n>-<name>``
(hour of the inference), and the record's ``data-ref`` is their URL
(``s3://bucket/key`` or ``file:///path``).

Errors: a *transient* failure (network, 5xx, throttling, credentials, a full
disk) is retried with exponential backoff and jitter, forever, capped at
``capture_retry_max_seconds``; the records stay in the spool meanwhile (and
new captures are refused once it is full). A *permanent* refusal (the
destination says the object itself is invalid) marks the batch's captures
FAILURE and moves the segment to ``capture/rejected/``.
"""

from __future__ import annotations

import base64
import errno
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from edgeagent.capture import hour_path, path_segment
from edgeagent.capture.credentials import (
    CredentialsError,
    IotCredentialsConfig,
    make_s3_client,
)
from edgeagent.capture.spool import CaptureSpool, Segment, SegmentContent, crash_point
from edgecommon.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from edgeagent.settings import AgentSettings

log = structlog.get_logger(__name__)

JSONL_CONTENT_TYPE = "application/jsonl"
SIDE_CONTENT_TYPE = "application/octet-stream"

# S3 error codes that say "this object can never be stored": everything else
# (auth, missing bucket, throttling, 5xx) may heal and is retried.
PERMANENT_S3_CODES = frozenset(
    {
        "EntityTooLarge",
        "InvalidArgument",
        "InvalidObjectName",
        "InvalidRequest",
        "KeyTooLongError",
        "MetadataTooLarge",
    }
)
# a name the file system can never hold; anything else (permissions, a full disk, a
# file where a directory should be) can be fixed on the device, and is retried
PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL})


class CaptureConfigError(OSError):
    """The capture destination is configured incompletely (the agent cannot start)."""


class UploadError(Exception):
    """An object could not be stored."""


class TransientUploadError(UploadError):
    """Worth retrying: the destination may accept it later."""


class PermanentUploadError(UploadError):
    """The destination will never accept this object."""


class _StoppedError(Exception):
    """The uploader was asked to stop while waiting to retry."""


# -- destinations ----------------------------------------------------------------------
class Destination(Protocol):
    def put(self, key: str, body: bytes, content_type: str) -> None:
        """Store ``body`` at ``key`` (overwriting), or raise an UploadError."""

    def ref(self, key: str) -> str:
        """The URL a record's ``data-ref`` gives for ``key``."""

    def describe(self) -> str: ...


class DiskDestination:
    """A local directory, laid out like the bucket; every file written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise PermanentUploadError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, body: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, body, mode=0o640)
        except OSError as exc:
            kind = PermanentUploadError if exc.errno in PERMANENT_ERRNOS else TransientUploadError
            raise kind(f"{path}: {exc.strerror or exc}") from exc

    def ref(self, key: str) -> str:
        return self._path(key).absolute().as_uri()

    def describe(self) -> str:
        return str(self.root)


class S3Destination:
    """An S3 bucket (or an S3 stand-in at ``endpoint_url``), through boto3."""

    def __init__(
        self,
        *,
        bucket: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        iot: IotCredentialsConfig | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.bucket = bucket
        self._region = region
        self._endpoint_url = endpoint_url
        self._iot = iot
        self._timeout = timeout
        self._client: S3Client | None = None

    def _s3(self) -> S3Client:
        if self._client is None:
            self._client = make_s3_client(
                region=self._region,
                endpoint_url=self._endpoint_url,
                iot=self._iot,
                timeout=self._timeout,
            )
        return self._client

    def put(self, key: str, body: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415 - as above

        try:
            self._s3().put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except ClientError as exc:
            error: Any = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = f"s3://{self.bucket}/{key}: {code}: {error.get('Message', '')}"
            if code in PERMANENT_S3_CODES:
                raise PermanentUploadError(message) from exc
            raise TransientUploadError(message) from exc
        except (BotoCoreError, CredentialsError) as exc:
            raise TransientUploadError(f"s3://{self.bucket}/{key}: {exc}") from exc

    def ref(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def describe(self) -> str:
        where = f" at {self._endpoint_url}" if self._endpoint_url else ""
        creds = " (IoT credentials provider)" if self._iot else ""
        return f"s3://{self.bucket}{where}{creds}"


def iot_config(settings: AgentSettings) -> IotCredentialsConfig | None:
    """The IoT credentials provider settings, or None when not configured."""
    if not settings.capture_iot_credentials_endpoint:
        return None
    return IotCredentialsConfig.parse(
        endpoint=settings.capture_iot_credentials_endpoint,
        role_alias=settings.capture_iot_role_alias,
        thing_name=settings.capture_iot_thing_name or settings.device_id,
        cert_file=settings.capture_iot_cert_file,
        key_file=settings.capture_iot_key_file,
        ca_file=settings.capture_iot_ca_file,
        timeout=settings.capture_upload_timeout_seconds,
    )


def build_destination(settings: AgentSettings) -> Destination:
    """The configured destination (ValueError on an incomplete configuration)."""
    if settings.capture_destination == "Disk":
        return DiskDestination(settings.capture_disk_path or settings.state_dir / "captured")
    if not settings.capture_s3_bucket:
        raise ValueError("capture_destination Cloud needs capture_s3_bucket")
    return S3Destination(
        bucket=settings.capture_s3_bucket,
        region=settings.capture_s3_region,
        endpoint_url=settings.capture_s3_endpoint,
        iot=iot_config(settings),
        timeout=settings.capture_upload_timeout_seconds,
    )


# -- batches ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UploadObject:
    key: str
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    captures: int
    side_files: list[UploadObject]
    objects: list[UploadObject]  # one JSON Lines object per (fleet, model)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def render_batch(
    segment: Segment,
    content: SegmentContent,
    *,
    device_id: str,
    prefix: str,
    destination: Destination,
) -> Batch:
    """The objects of one sealed segment: deterministic keys, final records."""
    if segment.sealed_at is None:
        raise ValueError("only sealed segments are uploaded")
    batch_id = segment.batch_id(path_segment(device_id), content.data)
    hour = hour_path(segment.sealed_at)
    side: list[UploadObject] = []
    groups: dict[str, list[bytes]] = {}
    for entry in content.entries:
        line = entry.record_json
        if entry.side_files:
            refs = {}
            for rel, data in entry.side_files.items():
                key = _join(prefix, rel)
                refs[rel] = destination.ref(key)
                side.append(UploadObject(key, base64.b64decode(data), SIDE_CONTENT_TYPE))
            record = entry.record()
            for group in ("deviceFleetAuxiliaryInputs", "deviceFleetAuxiliaryOutputs"):
                for item in record.get(group, []):
                    if "data-ref" in item:
                        item["data-ref"] = refs.get(item["data-ref"], item["data-ref"])
            line = json.dumps(record, separators=(",", ":")).encode("ascii")
        key = _join(
            prefix,
            path_segment(entry.fleet),
            path_segment(entry.model),
            hour,
            f"{batch_id}.jsonl",
        )
        groups.setdefault(key, []).append(line + b"\n")
    objects = [UploadObject(k, b"".join(v), JSONL_CONTENT_TYPE) for k, v in groups.items()]
    return Batch(batch_id=batch_id, captures=len(content.entries), side_files=side, objects=objects)


# -- the uploader -------------------------------------------------------------------------
class Uploader:
    """Uploads sealed segments oldest first, in a thread of its own."""

    def __init__(
        self,
        *,
        spool: CaptureSpool,
        destination: Destination,
        device_id: str,
        prefix: str,
        retry_initial: float = 0.5,
        retry_max: float = 60.0,
    ) -> None:
        self._spool = spool
        self._destination = destination
        self._device_id = device_id
        self._prefix = prefix
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._stop = threading.Event()
        self._sealed = threading.Event()  # a segment was sealed
        self._kick = threading.Event()  # cut a backoff short (flush, stop)
        spool.listeners.append(self._sealed)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    @property
    def destination(self) -> Destination:
        return self._destination

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="capture-upload", daemon=True)
            self._thread.start()
            log.info("capture uploader started", destination=self._destination.describe())

    def kick(self) -> None:
        """Retry now instead of waiting out the backoff (after ``flush``)."""
        self._kick.set()
        self._sealed.set()

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.kick()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("capture uploader did not stop in time")

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def drain(self, timeout: float) -> bool:
        """Upload every sealed segment from this thread (edgectl); True when none is left."""
        deadline = time.monotonic() + timeout
        while (segment := self._spool.next_sealed()) is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                self._upload(segment, stop_after_delay(remaining))
            except (TransientUploadError, _StoppedError):
                return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sealed.clear()
            segment = self._spool.next_sealed()
            if segment is None:
                self._sealed.wait(5.0)
                continue
            try:
                self._upload(segment, stop_never)
            except (TransientUploadError, _StoppedError):
                return  # only when stopping
            except Exception:  # the thread must outlive a bug of ours; logged with its traceback
                log.exception("capture uploader failed; retrying", segment=segment.name)
                if self._stop.wait(self._retry_max):
                    return

    def _upload(self, segment: Segment, stop: stop_base) -> None:
        started = time.monotonic()
        retrying = Retrying(
            retry=retry_if_exception_type(TransientUploadError),
            wait=wait_exponential_jitter(multiplier=self._retry_initial, max=self._retry_max),
            stop=stop,
            sleep=self._sleep,
            before_sleep=self._log_retry(segment),
            reraise=True,
        )
        try:
            batch = retrying(self._attempt, segment)
        except PermanentUploadError as exc:
            self._spool.reject(segment, str(exc))
            self._count("batches_rejected")
            return
        self._spool.complete(segment)
        self._count("batches_uploaded")
        self._count("captures_uploaded", batch.captures)
        log.info(
            "capture batch uploaded",
            batch_id=batch.batch_id,
            captures=batch.captures,
            objects=len(batch.objects),
            side_files=len(batch.side_files),
            destination=self._destination.describe(),
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _attempt(self, segment: Segment) -> Batch:
        try:
            content = self._spool.read(segment)
        except OSError as exc:
            raise PermanentUploadError(f"spool segment {segment.name} unreadable: {exc}") from exc
        batch = render_batch(
            segment,
            content,
            device_id=self._device_id,
            prefix=self._prefix,
            destination=self._destination,
        )
        for obj in batch.side_files:
            self._destination.put(obj.key, obj.body, obj.content_type)
        for index, obj in enumerate(batch.objects):
            self._destination.put(obj.key, obj.body, obj.content_type)
            if index == 0:
                crash_point("upload-after-first-put")
        crash_point("upload-before-commit")
        return batch

    def _sleep(self, seconds: float) -> None:
        self._kick.wait(seconds)
        self._kick.clear()
        if self._stop.is_set():
            raise _StoppedError

    def _log_retry(self, segment: Segment) -> Any:
        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            self._count("upload_errors")
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "capture upload failed; will retry",
                segment=segment.name,
                attempt=state.attempt_number,
                retry_in_s=round(wait, 2),
                error=str(error),
            )

        return before_sleep

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n


__all__ = [
    "Batch",
    "CaptureConfigError",
    "Destination",
    "DiskDestination",
    "PermanentUploadError",
    "S3Destination",
    "TransientUploadError",
    "UploadError",
    "Uploader",
    "build_destination",
    "iot_config",
    "render_batch",
]
