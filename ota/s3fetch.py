"""One S3 download attempt in a short-lived child process: ``python -m ota.s3fetch``.

Why a child: boto3, botocore and an S3 client cost ~25-35 MB that Python
never gives back; loaded in ``edge-ota`` they would stay for the process
lifetime (100 MB instead of 64 MB idle). Here they live only while a download
runs. It also keeps the HTTP/XML parsing of the network's answers out of the
process that holds the device key: the parent fetches the temporary
credentials from the IoT credentials provider and hands them over; this
process never sees the key.

Protocol. stdin: one JSON line, the request (bucket, key, offset, etag, part
path, size limit, region, endpoint, timeout, credentials or null for boto3's
default chain); then stdin stays open as a lifeline: when it reaches EOF (the
parent ended, even by SIGKILL) this process exits at once, so an orphan never
writes into a file a restarted updater resumes. stdout: JSON lines,
``{"event": "opened", "start", "total", "etag"}``, then ``{"event":
"progress", "done", "total"}`` after each chunk, then ``{"event": "done",
"size", "sha256"}`` (SHA-256 of the whole part file) or ``{"event": "error",
"fatal": bool, "message"}``. The parent decides everything else (size and
hash against the job document, retries, cancellation, timeouts) and treats a
child that ends without ``done`` as a transient error.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ota.errors import FatalError, TransientError
from ota.fileio import CHUNK, content_range, hash_prefix, write_all

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

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


def _client(request: dict[str, Any]) -> S3Client:
    import boto3  # noqa: PLC0415 - loaded in this child only, after the lifeline runs
    from botocore.config import Config  # noqa: PLC0415

    creds = request.get("credentials") or {}
    session = boto3.session.Session(
        aws_access_key_id=creds.get("access_key"),
        aws_secret_access_key=creds.get("secret_key"),
        aws_session_token=creds.get("token"),
    )
    timeout = float(request["timeout"])
    return session.client(
        "s3",
        region_name=request.get("region"),
        endpoint_url=request.get("endpoint_url"),
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1},  # the parent retries, with backoff
        ),
    )


def _get(s3: S3Client, request: dict[str, Any], offset: int, etag: str | None) -> Any:
    from botocore.exceptions import ClientError  # noqa: PLC0415

    bucket, key = request["bucket"], request["key"]
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if offset:
        args["Range"] = f"bytes={offset}-"
        if etag:
            args["IfMatch"] = etag
    try:
        return s3.get_object(**args)
    except ClientError as exc:
        error: Any = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        if offset and code in ("InvalidRange", "PreconditionFailed", "412", "416"):
            return _get(s3, request, 0, None)  # changed, or complete: start over
        message = f"s3://{bucket}/{key}: {code}: {error.get('Message', '')}".rstrip(": ")
        if code in _FATAL_S3:
            raise FatalError(message) from exc
        raise TransientError(message) from exc


def run(request: dict[str, Any], out: IO[str]) -> None:
    """Fetch into the part file; every outcome but ``done`` raises."""

    def send(event: str, **fields: Any) -> None:
        out.write(json.dumps({"event": event, **fields}) + "\n")
        out.flush()

    offset = int(request["offset"])
    limit = request.get("limit")
    part = request["part"]
    resp = _get(_client(request), request, offset, request.get("etag"))
    body = resp["Body"]
    start, total = 0, int(resp.get("ContentLength", 0)) or None
    if "ContentRange" in resp:
        start, total = content_range(resp["ContentRange"])
    if start not in (offset, 0):  # neither what we asked for nor the whole object
        raise TransientError(f"asked for bytes from {offset}, got them from {start}")
    send("opened", start=start, total=total, etag=resp.get("ETag"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if start else os.O_TRUNC)
    fd = os.open(part, flags, 0o640)
    try:
        if start == 0:
            os.ftruncate(fd, 0)
        done = start
        for chunk in body.iter_chunks(CHUNK):
            write_all(fd, chunk)
            done += len(chunk)
            if limit is not None and done > limit:
                raise FatalError(
                    f"s3://{request['bucket']}/{request['key']} is longer than {limit} bytes"
                )
            send("progress", done=done, total=total)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FatalError("disk full while downloading") from exc
        raise
    finally:
        os.close(fd)
        body.close()
    if total is not None and done < total:
        raise TransientError(f"connection ended at {done} of {total}")
    send("done", size=done, sha256=hash_prefix(Path(part), done).hexdigest())


def _lifeline() -> None:
    """Exit as soon as the parent is gone (stdin reaches EOF)."""
    while os.read(0, 4096):  # unbuffered: no lock left held at interpreter exit
        pass
    os._exit(3)


def main() -> int:
    # stdout carries the protocol only: anything else printed goes to stderr
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    line = b""
    while not line.endswith(b"\n") and (data := os.read(0, 1)):  # exactly one line, unbuffered
        line += data
    try:
        request = json.loads(line)
    except ValueError:
        out.write(json.dumps({"event": "error", "fatal": True, "message": "bad request"}) + "\n")
        return 2
    threading.Thread(target=_lifeline, daemon=True).start()
    try:
        run(request, out)
    except FatalError as exc:
        fatal, message = True, str(exc)
    except TransientError as exc:
        fatal, message = False, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        fatal, message = not _is_transient(exc), f"{type(exc).__name__}: {exc}"
    else:
        return 0
    out.write(json.dumps({"event": "error", "fatal": fatal, "message": message}) + "\n")
    out.flush()
    return 1


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError  # noqa: PLC0415
    from urllib3.exceptions import HTTPError  # noqa: PLC0415

    return isinstance(exc, BotoCoreError | HTTPError | OSError)


if __name__ == "__main__":
    sys.exit(main())
