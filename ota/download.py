"""Fetch a package archive: S3 (ranged GET) or an HTTPS URL (Range), resumable.

The archive grows at ``<dest>.part``; a sidecar ``<dest>.part.json`` remembers
the source and its ETag, so a restarted updater resumes with ``Range`` and
``If-Range`` / ``IfMatch`` (a changed object starts over). Bytes are hashed
as they arrive (SHA-256; the bytes already on disk are hashed once at
resume). When complete, size and digest are checked against the job document
and ``<dest>.part`` is renamed to ``<dest>``.

Errors: a connection cut, a timeout, a 5xx or a throttled request is a
:class:`~ota.errors.TransientError` (the caller retries, resuming); a missing
object, a refused request, a size or hash mismatch, a full disk is a
:class:`~ota.errors.FatalError`. ``progress(done, total)`` is called after
each chunk and may raise :class:`~ota.errors.CanceledError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from edgeagent.package import check_free_space
from edgeagent.package.errors import InsufficientSpaceError
from edgecommon.fsutil import atomic_write_json, fsync_dir
from ota.document import JobDocument
from ota.errors import FatalError, TransientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from urllib3 import PoolManager

log = structlog.get_logger(__name__)

CHUNK = 1024 * 1024
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_FATAL_S3 = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "InvalidObjectState",
        "NotFound",
        "403",
        "404",
    }
)

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class Downloaded:
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class _Opened:
    """One response: where its body starts, the object's total size and ETag."""

    start: int
    total: int | None
    etag: str | None
    chunks: Iterator[bytes]
    close: Callable[[], None]


class Downloader:
    """Fetches what a job document names, into a destination path."""

    def __init__(
        self,
        *,
        s3_client: Callable[[], S3Client],
        ca_file: Path | None,
        timeout: float,
        disk_reserve_bytes: int,
    ) -> None:
        self._s3_factory = s3_client
        self._s3: S3Client | None = None
        self._ca_file = ca_file
        self._timeout = timeout
        self._reserve = disk_reserve_bytes
        self._pool: PoolManager | None = None

    # -- the one public call -------------------------------------------------------------
    def fetch(self, doc: JobDocument, dest: Path, progress: Progress) -> Downloaded:
        """One attempt; resumes what an earlier attempt (or process) left at ``dest``.part."""
        if dest.exists():  # complete from an earlier run: check it again, never trust it
            return self._finish(doc, dest, None)
        part = dest.with_name(dest.name + ".part")
        meta_path = dest.with_name(dest.name + ".part.json")
        meta = _read_meta(meta_path)
        offset = part.stat().st_size if part.exists() else 0
        if offset and meta.get("source") != doc.source:
            offset = 0  # another job's bytes: start over
        if offset and doc.size is not None and offset > doc.size:
            offset = 0
        etag = meta.get("etag") if offset else None
        if doc.size is not None:
            self._check_space(dest.parent, doc.size - offset)
        opened = self._open(doc, offset, etag)
        try:
            if opened.start != offset:
                offset = 0  # the server sent the whole object (Range ignored, or object changed)
            if opened.total is not None:
                if doc.size is not None and opened.total != doc.size:
                    raise FatalError(
                        f"{doc.source} is {opened.total} bytes, the job document says {doc.size}"
                    )
                self._check_space(dest.parent, opened.total - offset)
            atomic_write_json(meta_path, {"source": doc.source, "etag": opened.etag})
            digest = _hash_prefix(part, offset)
            done = offset
            flags = (
                os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if offset else os.O_TRUNC)
            )
            fd = os.open(part, flags, 0o640)
            try:
                if offset == 0:
                    os.ftruncate(fd, 0)
                for chunk in opened.chunks:
                    _write_all(fd, chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if doc.size is not None and done > doc.size:
                        raise FatalError(f"{doc.source} is longer than {doc.size} bytes")
                    progress(done, opened.total)
                os.fsync(fd)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise FatalError(f"disk full while downloading into {dest.parent}") from exc
                raise
            finally:
                os.close(fd)
        finally:
            opened.close()
        if opened.total is not None and done < opened.total:
            raise TransientError(f"{doc.source}: connection ended at {done} of {opened.total}")
        os.replace(part, dest)
        with contextlib.suppress(FileNotFoundError):
            meta_path.unlink()
        fsync_dir(dest.parent)
        return self._finish(doc, dest, digest.hexdigest())

    def discard(self, dest: Path) -> None:
        """Remove the archive and any partial download of it."""
        for path in (
            dest,
            dest.with_name(dest.name + ".part"),
            dest.with_name(dest.name + ".part.json"),
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- checks --------------------------------------------------------------------------
    def _finish(self, doc: JobDocument, dest: Path, sha256: str | None) -> Downloaded:
        if sha256 is None:
            sha256 = _hash_prefix(dest, dest.stat().st_size).hexdigest()
        size = dest.stat().st_size
        if doc.size is not None and size != doc.size:
            self.discard(dest)
            raise FatalError(f"downloaded {size} bytes, the job document says {doc.size}")
        if doc.sha256 is not None and sha256 != doc.sha256:
            self.discard(dest)
            raise FatalError(
                f"SHA-256 mismatch: the download is {sha256[:16]}..., "
                f"the job document says {doc.sha256[:16]}..."
            )
        return Downloaded(path=dest, size=size, sha256=sha256)

    def _check_space(self, folder: Path, needed: int) -> None:
        try:
            check_free_space(folder, needed + self._reserve)
        except InsufficientSpaceError as exc:
            raise FatalError(str(exc)) from None

    # -- transports ------------------------------------------------------------------------
    def _open(self, doc: JobDocument, offset: int, etag: str | None) -> _Opened:
        if doc.model_package_url is not None:
            return self._open_https(doc.model_package_url, offset, etag)
        if doc.model_package_bucket is None or doc.model_package_key is None:
            raise FatalError("the job document names no package")  # validation prevents it
        return self._open_s3(doc.model_package_bucket, doc.model_package_key, offset, etag)

    def _open_https(self, url: str, offset: int, etag: str | None) -> _Opened:
        import urllib3  # noqa: PLC0415 - only devices whose jobs carry URLs pay for it

        if self._pool is None:
            self._pool = urllib3.PoolManager(
                cert_reqs="CERT_REQUIRED",
                ca_certs=str(self._ca_file) if self._ca_file else None,
                timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout),
                retries=False,
            )
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if etag:
                headers["If-Range"] = etag
        try:
            resp = self._pool.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientError(f"{_safe(url)}: {exc}") from exc
        if resp.status == 416 and offset:
            resp.release_conn()
            # our part is as long as the object, or the object changed: start over
            return self._open_https(url, 0, None)
        if resp.status in _TRANSIENT_HTTP:
            resp.release_conn()
            raise TransientError(f"{_safe(url)}: HTTP {resp.status}")
        if resp.status not in (200, 206):
            resp.release_conn()
            raise FatalError(f"{_safe(url)}: HTTP {resp.status}")
        start, total = 0, _int(resp.headers.get("Content-Length"))
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))

        def chunks() -> Iterator[bytes]:
            try:  # read1: what has arrived, so a cut keeps every byte before it
                while data := resp.read1(CHUNK):
                    yield data
                if total is not None and resp.tell() < total - start:
                    raise TransientError(f"{_safe(url)}: connection ended early")
            except urllib3.exceptions.HTTPError as exc:
                raise TransientError(f"{_safe(url)}: {exc}") from exc

        return _Opened(
            start=start,
            total=total,
            etag=resp.headers.get("ETag"),
            chunks=chunks(),
            close=resp.release_conn,
        )

    def _open_s3(self, bucket: str, key: str, offset: int, etag: str | None) -> _Opened:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415 - lazy boto

        where = f"s3://{bucket}/{key}"
        if self._s3 is None:
            try:
                self._s3 = self._s3_factory()
            except (BotoCoreError, ValueError) as exc:
                raise FatalError(f"cannot reach S3: {exc}") from exc
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if offset:
            args["Range"] = f"bytes={offset}-"
            if etag:
                args["IfMatch"] = etag
        try:
            resp = self._s3.get_object(**args)
        except ClientError as exc:
            error: Any = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            if offset and code in ("InvalidRange", "PreconditionFailed", "412", "416"):
                return self._open_s3(bucket, key, 0, None)  # changed, or complete: start over
            message = f"{where}: {code}: {error.get('Message', '')}".rstrip(": ")
            if code in _FATAL_S3:
                raise FatalError(message) from exc
            raise TransientError(message) from exc
        except Exception as exc:
            if _is_transient_boto(exc):
                raise TransientError(f"{where}: {exc}") from exc
            raise
        body = resp["Body"]
        start, total = 0, int(resp.get("ContentLength", 0)) or None
        if "ContentRange" in resp:
            start, total = _content_range(resp["ContentRange"])

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            except Exception as exc:
                if _is_transient_boto(exc):
                    raise TransientError(f"{where}: {exc}") from exc
                raise

        return _Opened(
            start=start, total=total, etag=resp.get("ETag"), chunks=chunks(), close=body.close
        )


def _is_transient_boto(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError  # noqa: PLC0415 - lazy boto
    from urllib3.exceptions import HTTPError  # noqa: PLC0415

    from edgecommon.iot_credentials import CredentialsError  # noqa: PLC0415

    return isinstance(exc, BotoCoreError | HTTPError | CredentialsError | OSError)


def _safe(url: str) -> str:
    """A URL without its query string (a presigned URL's signature stays out of logs)."""
    return url.split("?", 1)[0]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _content_range(text: str | None) -> tuple[int, int | None]:
    """``bytes 100-199/200`` -> (100, 200); TransientError when unusable."""
    try:
        if text is None:
            raise ValueError("missing")
        unit, rest = text.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
        return start, None if total == "*" else int(total)
    except ValueError as exc:
        raise TransientError(f"unusable Content-Range {text!r}") from exc


def _hash_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    if length == 0:
        return digest
    with path.open("rb") as f:
        remaining = length
        while remaining and (chunk := f.read(min(CHUNK, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
