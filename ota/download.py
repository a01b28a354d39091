"""Fetch a package archive: S3 (ranged GET) or an HTTPS URL (Range), resumable.

The archive grows at ``<dest>.part``; a sidecar ``<dest>.part.json`` remembers
the source and its ETag, so a restarted updater resumes with ``Range`` and
``If-Range`` / ``IfMatch`` (a changed object starts over). HTTPS bytes are
hashed as they arrive (SHA-256; the bytes already on disk are hashed once at
resume). S3 objects are fetched by a short-lived child process
(``ota.s3fetch``: boto3's memory is never paid by the long-lived updater);
this process hashes the file it wrote. When complete, size and digest are
checked against the job document and ``<dest>.part`` is renamed to
``<dest>``. A download child that dies, hangs or says something unexpected
is a transient error; cancellation or stopping kills it.

Errors: a connection cut, a timeout, a 5xx or a throttled request is a
:class:`~ota.errors.TransientError` (the caller retries, resuming); a missing
object, a refused request, a size or hash mismatch, a full disk is a
:class:`~ota.errors.FatalError`. ``progress(done, total)`` is called after
each chunk and may raise :class:`~ota.errors.CanceledError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from edgeagent.package import check_free_space
from edgeagent.package.errors import InsufficientSpaceError
from edgecommon.fsutil import atomic_write_json, fsync_dir
from edgecommon.iot_credentials import CredentialsError, IotCredentialsConfig, fetch_credentials
from ota.document import JobDocument
from ota.errors import FatalError, TransientError
from ota.fileio import CHUNK, content_range, hash_prefix, write_all

if TYPE_CHECKING:
    from urllib3 import PoolManager

log = structlog.get_logger(__name__)

_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
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


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Access:
    """Where the package bucket is and whose credentials read it (None: boto3's chain)."""

    region: str | None
    endpoint_url: str | None
    iot: IotCredentialsConfig | None


class Downloader:
    """Fetches what a job document names, into a destination path.

    HTTPS URLs stream in this process (urllib3, ~2 MB). S3 objects are fetched
    by a short-lived child, ``python -m ota.s3fetch`` (see there why): it
    writes the part file and reports over a pipe; this side keeps the
    decisions (size, resume metadata, progress and cancellation, a watchdog on
    a silent child) and hashes the result itself before trusting it.
    """

    def __init__(
        self,
        *,
        s3: S3Access | None,
        ca_file: Path | None,
        timeout: float,
        disk_reserve_bytes: int,
        child_silence_s: float | None = None,
    ) -> None:
        self._s3 = s3
        self._ca_file = ca_file
        self._timeout = timeout
        self._reserve = disk_reserve_bytes
        self._pool: PoolManager | None = None
        # a child says something at least once per chunk or read timeout; allow for
        # its start (importing boto3 takes seconds on a busy device) and the credentials
        self._silence = child_silence_s if child_silence_s is not None else 3 * timeout + 30
        self.child_pid: int | None = None  # the running S3 download child, if any

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
        if doc.model_package_url is None:
            reported = self._fetch_s3(doc, dest, offset, etag, progress)
            self._complete(dest)
            got = self._finish(doc, dest, None)  # hashed here: the child is not trusted
            if got.sha256 != reported:
                self.discard(dest)
                raise TransientError(f"{doc.source}: the file changed while it was downloaded")
            return got
        opened = self._open_https(doc.model_package_url, offset, etag)
        try:
            offset = self._accept(
                doc,
                dest=dest,
                offset=offset,
                start=opened.start,
                total=opened.total,
                etag=opened.etag,
            )
            digest = hash_prefix(part, offset)
            done = offset
            flags = (
                os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if offset else os.O_TRUNC)
            )
            fd = os.open(part, flags, 0o640)
            try:
                if offset == 0:
                    os.ftruncate(fd, 0)
                for chunk in opened.chunks:
                    write_all(fd, chunk)
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
        self._complete(dest)
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

    # -- steps shared by both transports ---------------------------------------------------
    def _accept(
        self,
        doc: JobDocument,
        *,
        dest: Path,
        offset: int,
        start: int,
        total: int | None,
        etag: str | None,
    ) -> int:
        """An answer arrived: check its size, remember its ETag; the offset it resumes at."""
        if start != offset:
            offset = 0  # the server sent the whole object (Range ignored, or object changed)
        if total is not None:
            if doc.size is not None and total != doc.size:
                raise FatalError(f"{doc.source} is {total} bytes, the job document says {doc.size}")
            self._check_space(dest.parent, total - offset)
        atomic_write_json(
            dest.with_name(dest.name + ".part.json"), {"source": doc.source, "etag": etag}
        )
        return offset

    def _complete(self, dest: Path) -> None:
        os.replace(dest.with_name(dest.name + ".part"), dest)
        with contextlib.suppress(FileNotFoundError):
            dest.with_name(dest.name + ".part.json").unlink()
        fsync_dir(dest.parent)

    # -- checks --------------------------------------------------------------------------
    def _finish(self, doc: JobDocument, dest: Path, sha256: str | None) -> Downloaded:
        if sha256 is None:
            sha256 = hash_prefix(dest, dest.stat().st_size).hexdigest()
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
            start, total = content_range(resp.headers.get("Content-Range"))

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

    def _fetch_s3(
        self, doc: JobDocument, dest: Path, offset: int, etag: str | None, progress: Progress
    ) -> str:
        """One attempt by a child process; the SHA-256 it reports for the whole file."""
        if self._s3 is None:
            raise FatalError("this device has no S3 access configured")
        if doc.model_package_bucket is None or doc.model_package_key is None:
            raise FatalError("the job document names no package")  # validation prevents it
        where = f"s3://{doc.model_package_bucket}/{doc.model_package_key}"
        request = {
            "bucket": doc.model_package_bucket,
            "key": doc.model_package_key,
            "offset": offset,
            "etag": etag,
            "part": str(dest.with_name(dest.name + ".part")),
            "limit": doc.size,
            "region": self._s3.region,
            "endpoint_url": self._s3.endpoint_url,
            "timeout": self._timeout,
            "credentials": self._credentials(where),
        }
        reported: str | None = None
        proc = subprocess.Popen(
            [sys.executable, "-m", "ota.s3fetch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.child_pid = proc.pid
        assert proc.stdin is not None and proc.stdout is not None  # noqa: S101 - PIPE above
        try:
            # stdin stays open while we live: the child exits when it reaches EOF
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            for message in _messages(proc.stdout.fileno(), self._silence, where):
                event = message.get("event")
                if event == "opened":
                    total = message.get("total")
                    self._accept(
                        doc,
                        dest=dest,
                        offset=offset,
                        start=int(message["start"]),
                        total=total,
                        etag=message.get("etag"),
                    )
                elif event == "progress":
                    done = int(message["done"])
                    if doc.size is not None and done > doc.size:
                        raise FatalError(f"{doc.source} is longer than {doc.size} bytes")
                    progress(done, message.get("total"))
                elif event == "done":
                    reported = str(message["sha256"])
                elif event == "error":
                    error = FatalError if message.get("fatal") else TransientError
                    raise error(f"{where}: {message.get('message')}")
            proc.wait(timeout=self._silence)  # it said all it had: let it exit on its own
        except subprocess.TimeoutExpired as exc:
            raise TransientError(f"{where}: the download process does not exit") from exc
        except BrokenPipeError:
            pass  # the child is gone before reading its request: its exit status says how
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a broken pipe, a bad line
            raise TransientError(f"{where}: download process: {exc}") from exc
        finally:
            if proc.poll() is None:
                proc.kill()  # cancelled, timed out, or we are stopping: never leave it running
            code = proc.wait()
            self.child_pid = None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.stdout.close()
        if reported is None or code != 0:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise TransientError(f"{where}: the download process ended ({how}) before finishing")
        return reported

    def _credentials(self, where: str) -> dict[str, str] | None:
        """Temporary credentials for the child (it never sees the device key)."""
        if self._s3 is None or self._s3.iot is None:
            return None  # boto3's default chain, in the child
        try:
            creds = fetch_credentials(self._s3.iot)
        except CredentialsError as exc:
            raise TransientError(f"{where}: {exc}") from exc
        return {key: creds[key] for key in ("access_key", "secret_key", "token")}


def _messages(fd: int, silence: float, where: str) -> Iterator[dict[str, Any]]:
    """The child's JSON lines until it closes stdout; TransientError after ``silence`` s of none."""
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if not selector.select(silence):
                raise TransientError(
                    f"{where}: no word from the download process for {silence:g} s"
                )
            data = os.read(fd, 65536)
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError(f"unexpected message {line[:80]!r}")
                yield message


def _safe(url: str) -> str:
    """A URL without its query string (a presigned URL's signature stays out of logs)."""
    return url.split("?", 1)[0]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
