"""The downloader against real servers: moto's S3 and an HTTPS server with Range.

Resume after a cut (the second request asks for the rest, and the hash covers
both halves), Range ignored (starts over), 5xx then success, a hash or size
that does not match, a disk too small, a missing object, a changed object.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ota_harness import LocalTls, PackageServer, make_tls, sha256_file

from ota.document import JobDocument
from ota.download import Downloader, S3Access
from ota.errors import CanceledError, FatalError, TransientError
from tests.edgeagent.capture_helpers import Moto
from tests.harness import short_dir

BUCKET = "models"
SIZE = 300_000


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = short_dir("weota-dl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def blob(base: Path) -> Path:
    path = base / "pkg.tar.gz"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture(scope="module")
def tls(base: Path) -> LocalTls:
    return make_tls(base / "tls")


@pytest.fixture
def server(tls: LocalTls, blob: Path) -> Iterator[PackageServer]:
    srv = PackageServer(tls, files={"/pkg.tar.gz": blob}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def moto(blob: Path) -> Iterator[Moto]:
    server = Moto().start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="pkg.tar.gz", Body=blob.read_bytes())
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for moto through boto3's default chain (the S3 download child inherits them)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def downloader(
    moto: Moto | None, tls: LocalTls, reserve: int = 0, silence: float | None = None
) -> Downloader:
    return Downloader(
        s3=S3Access(region="us-east-1", endpoint_url=moto.endpoint if moto else None, iot=None),
        ca_file=tls.ca_file,
        timeout=5.0,
        disk_reserve_bytes=reserve,
        child_silence_s=silence,
    )


def url_doc(server: PackageServer, **extra: object) -> JobDocument:
    return JobDocument.model_validate(
        {
            "type": "new_model",
            "model_name": "wind-turbine",
            "model_version": "2.0",
            "model_package_url": server.url("/pkg.tar.gz") + "?X-Amz-Signature=abc",
            **extra,
        }
    )


def s3_doc(**extra: object) -> JobDocument:
    return JobDocument.model_validate(
        {
            "type": "new_model",
            "model_name": "wind-turbine",
            "model_version": "2.0",
            "model_package_bucket": BUCKET,
            "model_package_key": "pkg.tar.gz",
            **extra,
        }
    )


def no_progress(done: int, total: int | None) -> None:
    pass


def test_https_download_resumes_with_range_after_a_cut(
    server: PackageServer, tls: LocalTls, blob: Path, base: Path, tmp_path: Path
) -> None:
    server.faults.truncate = 1
    server.faults.cut_at = 100_000
    dest = tmp_path / "a.tar.gz"
    dl = downloader(None, tls)
    doc = url_doc(server, sha256=sha256_file(blob), size=SIZE)
    with pytest.raises(TransientError):
        dl.fetch(doc, dest, no_progress)
    assert (tmp_path / "a.tar.gz.part").stat().st_size == 100_000
    got = dl.fetch(doc, dest, no_progress)
    assert got.sha256 == sha256_file(blob) and got.size == SIZE
    assert dest.read_bytes() == blob.read_bytes()
    assert server.requests[-1]["Range"] == "bytes=100000-"
    assert server.requests[-1]["If-Range"]  # the ETag of the first response
    assert not (tmp_path / "a.tar.gz.part").exists()


def test_range_ignored_starts_over(
    server: PackageServer, tls: LocalTls, blob: Path, tmp_path: Path
) -> None:
    server.faults.truncate = 1
    server.faults.ignore_range = True
    dest = tmp_path / "b.tar.gz"
    dl = downloader(None, tls)
    doc = url_doc(server, sha256=sha256_file(blob))
    with pytest.raises(TransientError):
        dl.fetch(doc, dest, no_progress)
    got = dl.fetch(doc, dest, no_progress)  # a 200 to a Range request: the partial is dropped
    assert got.sha256 == sha256_file(blob)
    assert dest.read_bytes() == blob.read_bytes()


def test_server_errors_are_transient_then_succeed(
    server: PackageServer, tls: LocalTls, blob: Path, tmp_path: Path
) -> None:
    server.faults.errors = 2
    dl = downloader(None, tls)
    doc = url_doc(server)
    dest = tmp_path / "c.tar.gz"
    for _ in range(2):
        with pytest.raises(TransientError, match="HTTP 503"):
            dl.fetch(doc, dest, no_progress)
    assert dl.fetch(doc, dest, no_progress).size == SIZE


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"sha256": "0" * 64}, "SHA-256 mismatch"),
        ({"size": SIZE + 1}, "job document says"),
    ],
)
def test_hash_or_size_mismatch_is_fatal_and_leaves_nothing(
    server: PackageServer, tls: LocalTls, tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    dest = tmp_path / "d.tar.gz"
    with pytest.raises(FatalError, match=message):
        downloader(None, tls).fetch(url_doc(server, **extra), dest, no_progress)
    assert list(tmp_path.iterdir()) == [] or all(
        not p.name.startswith("d.tar.gz") or p.name.endswith(".json") for p in tmp_path.iterdir()
    )
    assert not dest.exists()


def test_missing_object_and_refused_url_are_fatal(
    server: PackageServer, tls: LocalTls, tmp_path: Path
) -> None:
    doc = url_doc(server).model_copy(update={"model_package_url": server.url("/nothing")})
    with pytest.raises(FatalError, match="HTTP 404"):
        downloader(None, tls).fetch(doc, tmp_path / "e.tar.gz", no_progress)
    server.faults.errors, server.faults.error_status = 1, 403
    with pytest.raises(FatalError, match="HTTP 403"):
        downloader(None, tls).fetch(url_doc(server), tmp_path / "e.tar.gz", no_progress)


def test_not_enough_disk_is_fatal_before_anything_is_written(
    server: PackageServer, tls: LocalTls, tmp_path: Path
) -> None:
    dl = downloader(None, tls, reserve=1 << 60)
    with pytest.raises(FatalError, match="not enough disk space"):
        dl.fetch(url_doc(server, size=SIZE), tmp_path / "f.tar.gz", no_progress)
    assert not (tmp_path / "f.tar.gz.part").exists()


def test_untrusted_certificate_is_refused(server: PackageServer, tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other")
    with pytest.raises(TransientError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        downloader(None, other).fetch(url_doc(server), tmp_path / "g.tar.gz", no_progress)


def test_s3_download_and_ranged_resume(
    moto: Moto, tls: LocalTls, blob: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "h.tar.gz"
    part = tmp_path / "h.tar.gz.part"
    dl = downloader(moto, tls)
    doc = s3_doc(sha256=sha256_file(blob), size=SIZE)
    # a previous attempt left the first 123,456 bytes (and the object's ETag)
    head = moto.client().head_object(Bucket=BUCKET, Key="pkg.tar.gz")
    part.write_bytes(blob.read_bytes()[:123_456])
    (tmp_path / "h.tar.gz.part.json").write_text(
        '{"source": "s3://models/pkg.tar.gz", "etag": '
        + f'"{head["ETag"].replace(chr(34), "")}"'
        + "}"
    )
    seen: list[int] = []
    got = dl.fetch(doc, dest, lambda done, total: seen.append(done))
    assert got.sha256 == sha256_file(blob)
    assert seen[0] > 123_456  # resumed, not restarted
    assert dest.read_bytes() == blob.read_bytes()


def test_s3_missing_key_is_fatal(moto: Moto, tls: LocalTls, tmp_path: Path) -> None:
    doc = s3_doc().model_copy(update={"model_package_key": "absent.tar.gz"})
    with pytest.raises(FatalError, match=r"NoSuchKey|404"):
        downloader(moto, tls).fetch(doc, tmp_path / "i.tar.gz", no_progress)


def test_s3_unreachable_is_transient(tls: LocalTls, tmp_path: Path) -> None:
    from tests.harness import free_port

    dead = Moto(free_port())  # never started: nothing listens there
    dl = downloader(dead, tls)
    with pytest.raises(TransientError):
        dl.fetch(s3_doc(), tmp_path / "j.tar.gz", no_progress)


def test_s3_child_dead_before_its_request_reports_how_it_ended(
    moto: Moto, tls: LocalTls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child killed before it reads its request: the reason is its end, not a broken pipe."""
    suicide = tmp_path / "dies.sh"
    suicide.write_text("#!/bin/sh\nkill -9 $$\n")
    suicide.chmod(0o755)
    real_popen = subprocess.Popen

    def popen_then_wait(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        proc.wait()  # the request is written only once the child is gone: EPIPE every time
        return proc

    monkeypatch.setattr(sys, "executable", str(suicide))  # the downloader's child command
    monkeypatch.setattr(subprocess, "Popen", popen_then_wait)
    with pytest.raises(TransientError, match=r"download process ended \(signal 9\)"):
        downloader(moto, tls).fetch(s3_doc(), tmp_path / "k.tar.gz", no_progress)


# -- S3 downloads run in a child process (boto3's memory is never kept by edge-ota) --------

BIG = 24 * 1024 * 1024  # 24 chunks: the child is still downloading at the first progress


@pytest.fixture(scope="module")
def big(moto: Moto, base: Path) -> Path:
    path = base / "big.tar.gz"
    path.write_bytes(os.urandom(BIG))
    moto.client().put_object(Bucket=BUCKET, Key="big.tar.gz", Body=path.read_bytes())
    return path


def big_doc(big: Path) -> JobDocument:
    return s3_doc(sha256=sha256_file(big), size=BIG).model_copy(
        update={"model_package_key": "big.tar.gz"}
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def signal_child_once(
    dl: Downloader, signum: int, signalled: list[int]
) -> Callable[[int, int | None], None]:
    """A progress callback that sends ``signum`` to the download child at the first chunk."""

    def progress(done: int, total: int | None) -> None:
        if not signalled:
            assert dl.child_pid is not None
            signalled.append(dl.child_pid)
            os.kill(dl.child_pid, signum)

    return progress


def test_s3_download_never_loads_boto3_into_the_updater(
    moto: Moto, tls: LocalTls, blob: Path, tmp_path: Path
) -> None:
    """The download happens in a child: the calling process has no boto3 afterwards."""
    script = f"""
import sys
from pathlib import Path
from ota.document import JobDocument
from ota.download import Downloader, S3Access
doc = JobDocument.model_validate({{
    "type": "new_model", "model_name": "m", "model_version": "2.0",
    "model_package_bucket": "{BUCKET}", "model_package_key": "pkg.tar.gz",
    "sha256": "{sha256_file(blob)}", "size": {SIZE}}})
dl = Downloader(s3=S3Access(region="us-east-1", endpoint_url="{moto.endpoint}", iot=None),
                ca_file=None, timeout=5.0, disk_reserve_bytes=0)
pids = set()
got = dl.fetch(doc, Path("{tmp_path}") / "p.tar.gz", lambda d, t: pids.add(dl.child_pid))
print(got.sha256, sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore")),
      len(pids - {{None}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == [sha256_file(blob), "[]", "1"]  # right bytes, no boto in here, one child


def test_killed_download_child_is_transient_and_the_retry_resumes(
    moto: Moto, tls: LocalTls, big: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "k.tar.gz"
    dl = downloader(moto, tls)
    doc = big_doc(big)
    killed: list[int] = []
    with pytest.raises(TransientError, match="signal 9"):
        dl.fetch(doc, dest, signal_child_once(dl, signal.SIGKILL, killed))
    assert gone(killed[0])  # reaped, not a zombie
    kept = (tmp_path / "k.tar.gz.part").stat().st_size
    assert 0 < kept < BIG
    seen: list[int] = []
    got = dl.fetch(doc, dest, lambda done, total: seen.append(done))
    assert seen[0] > kept  # resumed where the killed child stopped
    assert got.sha256 == sha256_file(big) and dest.read_bytes() == big.read_bytes()


def test_silent_download_child_is_killed_and_transient(
    moto: Moto, tls: LocalTls, big: Path, tmp_path: Path
) -> None:
    dl = downloader(moto, tls, silence=1.5)
    stopped: list[int] = []
    with pytest.raises(TransientError, match="no word from the download process"):
        dl.fetch(
            big_doc(big), tmp_path / "s.tar.gz", signal_child_once(dl, signal.SIGSTOP, stopped)
        )
    assert gone(stopped[0])


def test_cancellation_kills_the_download_child(
    moto: Moto, tls: LocalTls, big: Path, tmp_path: Path
) -> None:
    dl = downloader(moto, tls)
    pids: list[int] = []

    def cancel(done: int, total: int | None) -> None:
        assert dl.child_pid is not None
        pids.append(dl.child_pid)
        raise CanceledError("job cancelled")

    with pytest.raises(CanceledError):
        dl.fetch(big_doc(big), tmp_path / "c.tar.gz", cancel)
    assert gone(pids[0]) and dl.child_pid is None


def test_download_child_exits_when_the_updater_dies(tmp_path: Path) -> None:
    """Its stdin is a lifeline: an orphan never writes into a file a restarted updater resumes."""
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        request = {
            "bucket": BUCKET,
            "key": "pkg.tar.gz",
            "offset": 0,
            "etag": None,
            "part": str(tmp_path / "o.part"),
            "limit": None,
            "region": "us-east-1",
            "endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "timeout": 60.0,
            "credentials": {"access_key": "testing", "secret_key": "testing", "token": None},
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "ota.s3fetch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert child.stdin is not None
            child.stdin.write(json.dumps(request).encode() + b"\n")
            child.stdin.flush()
            conn, _ = silent.accept()  # the child is waiting for S3's answer, which never comes
            with conn:
                child.stdin.close()  # what the kernel does when the updater is SIGKILLed
                assert child.wait(timeout=10) == 3
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            assert child.stdout is not None
            child.stdout.close()
