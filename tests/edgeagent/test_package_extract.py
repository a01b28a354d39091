"""Safe extraction: genuine archives install; hostile ones leave no trace.

Each hostile archive carries a genuinely signed manifest (an attacker can
replay a real one) plus the hostile part, so the refusal comes from the
extraction policy, not merely from the signature check.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_package import (
    GENUINE_FILES,
    Zeros,
    build_tiny,
    directory,
    fixed_key,
    genuine_body,
    manifest_for,
    reg,
    signed_head,
    special,
    tree,
    write_tar,
)

import edgeagent.package.extract as extract_module
from edgeagent.package import (
    ExtractLimits,
    InsufficientSpaceError,
    Manifest,
    PackageDestinationError,
    PackageExistsError,
    PackageInvalidError,
    PackageNotFoundError,
    PackageSignatureError,
    extract_package,
    verify_package_archive,
    verify_package_dir,
)
from edgeagent.package.errors import PackageError

KEY = fixed_key(7)
KEYS = [KEY.public_key()]
MiB = 1024 * 1024
SMALL = ExtractLimits(max_members=16, max_member_bytes=1 * MiB, max_total_bytes=2 * MiB)


class Site:
    """A test's file system: an install parent, an outside victim, an archive folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.install = root / "install"
        self.install.mkdir()
        self.outside = root / "outside"
        self.outside.mkdir()
        self.victim = self.outside / "victim.txt"
        self.victim.write_bytes(b"precious\n")
        self.archives = root / "archives"
        self.archives.mkdir()
        self.dest = self.install / "pkg"

    def archive(self, members: list[tuple[tarfile.TarInfo, bytes | None]], **kw: int) -> Path:
        return write_tar(self.archives / f"a{len(os.listdir(self.archives))}.tar.gz", members, **kw)

    def refuse(
        self,
        archive: Path,
        error: type[PackageError] = PackageInvalidError,
        match: str | None = None,
        limits: ExtractLimits = SMALL,
    ) -> None:
        """Extraction fails with ``error`` and changes nothing but what tests made."""
        before = tree(self.root)
        with pytest.raises(error, match=match):
            extract_package(archive, self.dest, trusted_keys=KEYS, limits=limits)
        assert tree(self.root) == before  # no staging dir, no dest, nothing outside
        assert self.victim.read_bytes() == b"precious\n"
        # the write-nothing check refuses it the same way
        with pytest.raises(error, match=match):
            verify_package_archive(archive, trusted_keys=KEYS, limits=limits)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield Site(tmp_path)


def head() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return signed_head(manifest_for(GENUINE_FILES), KEY)


# --- genuine archives --------------------------------------------------------------


def test_genuine_hand_made_archive_extracts(site: Site) -> None:
    archive = site.archive([*head(), directory("golden"), *genuine_body()])
    manifest = extract_package(archive, site.dest, trusted_keys=KEYS, limits=SMALL)
    assert manifest.name == "hostile"
    assert (site.dest / "model.onnx").read_bytes() == GENUINE_FILES["model.onnx"]
    assert verify_package_dir(site.dest, trusted_keys=KEYS) == manifest
    assert sorted(os.listdir(site.install)) == ["pkg"]


def test_modes_are_ours_not_the_archives(site: Site) -> None:
    info, data = reg("model.onnx", GENUINE_FILES["model.onnx"])
    info.mode = 0o4777  # setuid, world-writable: must not survive
    info.uid, info.gid = 12345, 54321
    members = [*head(), directory("golden"), *genuine_body()[:2], (info, data)]
    old = os.umask(0o022)
    try:
        extract_package(site.archive(members), site.dest, trusted_keys=KEYS, limits=SMALL)
    finally:
        os.umask(old)
    assert (site.dest / "model.onnx").stat().st_mode & 0o7777 == 0o644
    assert (site.dest / "golden").stat().st_mode & 0o7777 == 0o755
    assert (site.dest / "model.onnx").stat().st_uid == os.getuid()


def test_directories_may_be_implicit(site: Site) -> None:
    archive = site.archive(head() + genuine_body())  # no "golden" directory member
    extract_package(archive, site.dest, trusted_keys=KEYS, limits=SMALL)
    assert (site.dest / "golden" / "input.npy").is_file()


def test_unsigned_archive_only_when_allowed(site: Site) -> None:
    manifest = manifest_for(GENUINE_FILES).to_json_bytes()
    archive = site.archive([reg("manifest.json", manifest), *genuine_body()])
    site.refuse(archive, PackageSignatureError, "manifest.sig is missing")
    extract_package(archive, site.dest, trusted_keys=None, require_signature=False, limits=SMALL)
    assert not (site.dest / "manifest.sig").exists()


# --- destination and space -----------------------------------------------------------


def test_existing_destination_is_never_touched(site: Site, tmp_path: Path) -> None:
    archive = build_tiny(tmp_path / "b", KEY)
    site.dest.mkdir()
    (site.dest / "old").write_text("old version")
    before = tree(site.root)
    with pytest.raises(PackageExistsError, match="already exists"):
        extract_package(archive, site.dest, trusted_keys=KEYS)
    assert tree(site.root) == before


def test_missing_destination_parents_are_created(site: Site, tmp_path: Path) -> None:
    archive = build_tiny(tmp_path / "b", KEY)
    dest = site.root / "no" / "such" / "dir"
    assert extract_package(archive, dest, trusted_keys=KEYS).name == "tiny"
    assert verify_package_dir(dest, trusted_keys=KEYS).name == "tiny"


def test_parents_created_for_a_refused_package_are_removed(site: Site, tmp_path: Path) -> None:
    archive = site.archive(signed_head(manifest_for(GENUINE_FILES), fixed_key(8)) + genuine_body())
    with pytest.raises(PackageSignatureError):
        extract_package(archive, site.root / "no" / "such" / "dir", trusted_keys=KEYS)
    assert not (site.root / "no").exists()


def test_destination_parent_that_cannot_be_created(site: Site) -> None:
    archive = site.archive(head() + genuine_body())
    (site.root / "afile").write_text("x")
    with pytest.raises(PackageDestinationError, match=r"cannot create .*afile"):
        extract_package(archive, site.root / "afile" / "sub" / "pkg", trusted_keys=KEYS)


def test_missing_archive(site: Site) -> None:
    with pytest.raises(PackageNotFoundError, match="does not exist"):
        extract_package(site.root / "none.tar.gz", site.dest, trusted_keys=KEYS)


def test_disk_preflight_refuses_before_writing(site: Site) -> None:
    archive = site.archive(head() + genuine_body())
    greedy = ExtractLimits(reserve_bytes=1 << 62)
    before = tree(site.root)
    with pytest.raises(InsufficientSpaceError, match="not enough disk space"):
        extract_package(archive, site.dest, trusted_keys=KEYS, limits=greedy)
    assert tree(site.root) == before


def test_disk_full_midway_cleans_up(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = site.archive(head() + genuine_body())
    calls = 0
    real = extract_module._write_all

    def fill_up(fd: int, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:  # manifest, signature, first file, then the disk is full
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(extract_module, "_write_all", fill_up)
    before = tree(site.root)
    with pytest.raises(InsufficientSpaceError, match="disk full"):
        extract_package(archive, site.dest, trusted_keys=KEYS, limits=SMALL)
    assert tree(site.root) == before


# --- signature-level refusals ----------------------------------------------------------


def test_untrusted_signer(site: Site) -> None:
    archive = site.archive(signed_head(manifest_for(GENUINE_FILES), fixed_key(8)) + genuine_body())
    site.refuse(archive, PackageSignatureError, "trusted key")


def test_tampered_manifest_in_archive(site: Site) -> None:
    (_m_info, m_data), sig = head()
    assert m_data is not None
    forged = m_data.replace(b'"hostile"', b'"hostilf"')
    archive = site.archive([reg("manifest.json", forged), sig, *genuine_body()])
    site.refuse(archive, PackageSignatureError, "not a valid signature")


def test_no_trusted_keys(site: Site) -> None:
    archive = site.archive(head() + genuine_body())
    with pytest.raises(PackageSignatureError, match="no trusted keys configured"):
        extract_package(archive, site.dest, trusted_keys=[])
    assert os.listdir(site.install) == []


# --- hostile archives --------------------------------------------------------------


def test_manifest_not_first(site: Site) -> None:
    body = genuine_body()
    site.refuse(site.archive([body[0], *head(), *body[1:]]), match="first member")


def test_signature_not_second(site: Site) -> None:
    (m, sig) = head()
    site.refuse(site.archive([m, *genuine_body(), sig]), PackageSignatureError, "second member")


def test_absolute_path(site: Site) -> None:
    evil = str(site.outside / "evil")
    site.refuse(site.archive(head() + genuine_body() + [reg(evil, b"pwned")]), match="absolute")


@pytest.mark.parametrize(
    "name", ["../outside/evil", "golden/../../outside/evil", "..", "golden/..", "./model.onnx"]
)
def test_dot_dot_and_dot(site: Site, name: str) -> None:
    site.refuse(site.archive([*head(), reg(name, b"pwned"), *genuine_body()]), match="component")


def test_traversal_through_a_pax_path_record(site: Site) -> None:
    info, data = reg("innocent", b"pwned")
    info.pax_headers = {"path": "../outside/evil"}
    site.refuse(site.archive([*head(), (info, data)]), match="component")


@pytest.mark.parametrize("name", ["golden\\input.npy", "golden//input.npy", "golden/input.npy/"])
def test_odd_separators(site: Site, name: str) -> None:
    site.refuse(site.archive([*head(), reg(name, b"x")]), match="unsafe member name")


def test_symlink_member(site: Site) -> None:
    members = [*head(), special("model.onnx", tarfile.SYMTYPE, str(site.victim))]
    site.refuse(site.archive(members), match="symbolic link")


def test_symlink_directory_then_file_through_it(site: Site) -> None:
    members = [
        *head(),
        special("golden", tarfile.SYMTYPE, str(site.outside)),
        reg("golden/input.npy", GENUINE_FILES["golden/input.npy"]),
    ]
    site.refuse(site.archive(members), match="symbolic link")


def test_hardlink_to_outside_then_regular_member_of_same_name(site: Site) -> None:
    # the filter='tar' bypass: link to the victim, then "overwrite" through it
    members = [
        *head(),
        special("model.onnx", tarfile.LNKTYPE, str(site.victim)),
        reg("model.onnx", b"overwritten\n"),
    ]
    site.refuse(site.archive(members), match="hard link")


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CONTTYPE, "contiguous file"),
    ],
)
def test_special_files(site: Site, kind: bytes, label: str) -> None:
    info, _ = special("model.onnx", kind)
    info.devmajor, info.devminor = 1, 3
    site.refuse(site.archive([*head(), (info, None)]), match=label)


def test_duplicate_file(site: Site) -> None:
    body = genuine_body()
    site.refuse(site.archive(head() + body + [body[-1]]), match="duplicate member")


def test_duplicate_directory(site: Site) -> None:
    members = [*head(), directory("golden"), directory("golden"), *genuine_body()]
    site.refuse(site.archive(members), match="duplicate member")


def test_manifest_twice(site: Site) -> None:
    members = head() + genuine_body() + [head()[0]]
    site.refuse(site.archive(members), match="duplicate member")


def test_member_not_in_manifest(site: Site) -> None:
    members = head() + genuine_body() + [reg("extra.txt", b"surprise")]
    site.refuse(
        site.archive(members), match=r"extra\.txt is in the archive but not in the manifest"
    )


def test_directory_not_in_manifest(site: Site) -> None:
    site.refuse(site.archive([*head(), directory("cache"), *genuine_body()]), match="cache/")


def test_listed_file_missing(site: Site) -> None:
    site.refuse(site.archive(head() + genuine_body()[:-1]), match="missing from the archive")


def test_content_does_not_match_manifest(site: Site) -> None:
    body = genuine_body()
    flipped = bytearray(GENUINE_FILES["model.onnx"])
    flipped[-1] ^= 0x01  # same size, one bit different
    bad = bytes(flipped)
    site.refuse(site.archive(head() + body[:2] + [reg("model.onnx", bad)]), match="SHA-256")


def test_declared_size_differs_from_manifest(site: Site) -> None:
    body = genuine_body()
    site.refuse(
        site.archive(head() + body[:2] + [reg("model.onnx", b"short")]), match="bytes in the"
    )


def test_many_members(site: Site) -> None:
    # a (validly signed) manifest listing 200 files is refused before any member is read
    files = dict(GENUINE_FILES) | {f"data/{i}": b"" for i in range(200)}
    members = signed_head(manifest_for(files), KEY) + genuine_body(files)
    site.refuse(site.archive(members), match="manifest lists 203 files; the limit is 14")


def test_many_unlisted_members_stop_at_the_first(site: Site) -> None:
    members = [*head(), *genuine_body(), *(reg(f"junk{i}", b"") for i in range(2000))]
    site.refuse(site.archive(members), match="junk0 is in the archive but not in the manifest")


@pytest.fixture(scope="module")
def bomb_member() -> tuple[int, str]:
    """Size and SHA-256 of 300 MiB of zeros (a signer who listed them)."""
    size = 300 * MiB
    digest = hashlib.sha256()
    chunk = bytes(MiB)
    for _ in range(300):
        digest.update(chunk)
    return size, digest.hexdigest()


def _bomb_archive(path: Path, manifest: Manifest, size: int) -> Path:
    """manifest + signature, then a real 300 MiB zero member, gzip level 1."""
    with (
        path.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for info, data in signed_head(manifest, KEY):
            tar.addfile(info, io.BytesIO(data or b""))
        info = tarfile.TarInfo("model.onnx")
        info.size = size
        tar.addfile(info, Zeros(size))
    return path


def test_gzip_bomb_listed_in_a_signed_manifest(site: Site, bomb_member: tuple[int, str]) -> None:
    size, digest = bomb_member
    files = dict(GENUINE_FILES)
    manifest = manifest_for(files)
    manifest = manifest.model_copy(
        update={
            "files": {
                **manifest.files,
                "model.onnx": type(manifest.files["model.onnx"])(sha256=digest, size=size),
            }
        }
    )
    archive = _bomb_archive(site.archives / "bomb.tar.gz", manifest, size)
    assert archive.stat().st_size < 2 * MiB
    site.refuse(archive, match="the limit per file is 1048576")


def test_gzip_bomb_member_against_a_small_manifest(site: Site) -> None:
    # the manifest (genuinely signed) lists a small model; the member claims 300 MiB
    manifest = manifest_for(GENUINE_FILES)
    archive = _bomb_archive(site.archives / "bomb.tar.gz", manifest, 300 * MiB)
    site.refuse(archive, match="bytes in the archive, the manifest says")


def test_oversized_pax_header_stops_at_the_window(site: Site) -> None:
    # tarfile buffers a pax header whole: 8 MiB of it must not be read into memory
    info, data = reg("model.onnx", GENUINE_FILES["model.onnx"])
    info.pax_headers = {"comment": "x" * (8 * MiB)}
    site.refuse(site.archive([*head(), (info, data)]), match="oversized member header")


def test_stream_cap_counts_bytes_actually_read(site: Site) -> None:
    # small limits: the whole decompressed stream may not exceed about 50 KiB,
    # and header bytes that tarfile reads on its own count too
    tiny = ExtractLimits(
        max_members=8, max_member_bytes=2048, max_total_bytes=2048, max_manifest_bytes=4096
    )
    assert tiny.max_stream_bytes < 60 * 1024
    info, data = reg("model.onnx", GENUINE_FILES["model.onnx"])
    info.pax_headers = {"comment": "x" * (60 * 1024)}
    archive = site.archive([*head(), (info, data)])
    assert archive.stat().st_size < 4096  # compresses to almost nothing
    site.refuse(archive, match="expands to more than", limits=tiny)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"not gzip at all", "not valid gzip"),
        (gzip.compress(b"not a tar archive" * 100), "not a valid package"),
    ],
)
def test_garbage_archives(site: Site, content: bytes, match: str) -> None:
    path = site.archives / "junk.tar.gz"
    path.write_bytes(content)
    site.refuse(path, match=match)


def test_truncated_archive(site: Site, tmp_path: Path) -> None:
    good = build_tiny(tmp_path / "b", KEY).read_bytes()
    path = site.archives / "cut.tar.gz"
    path.write_bytes(good[: len(good) // 2])
    site.refuse(path, match="truncated")


def test_trailing_garbage_after_gzip(site: Site, tmp_path: Path) -> None:
    good = build_tiny(tmp_path / "b", KEY)
    path = site.archives / "trailing.tar.gz"
    path.write_bytes(good.read_bytes() + gzip.compress(b"\0" * 10240))
    with pytest.raises(PackageInvalidError, match="after the end"):
        verify_package_archive(path, trusted_keys=KEYS)
