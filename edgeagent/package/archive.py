"""Reading a package archive as a bounded stream.

The gzip layer is decompressed here, not by :mod:`tarfile`, so that every byte
tarfile reads (member data, skipped data, and the pax or GNU long-name headers
that tarfile buffers whole in memory) counts against one cap on decompressed
bytes. A gzip bomb stops at the cap instead of filling memory or disk.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from edgeagent.package.errors import PackageInvalidError
from edgeagent.package.manifest import MAX_MANIFEST_BYTES

MiB = 1024 * 1024
READ_CHUNK = 64 * 1024
_MAX_DECOMPRESS_STEP = 1 * MiB
# bytes tarfile may read while parsing one member's headers: the previous
# member's padding, the header blocks, and its read-ahead of one record
HEADER_WINDOW = 64 * 1024 + 2 * tarfile.RECORDSIZE
# bytes already handed to tarfile that stay readable again: tarfile's stream
# reader buffers at most a record ahead of the block it parses
_HISTORY = 4 * tarfile.RECORDSIZE

MEMBER_KINDS: dict[bytes, str] = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}
REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExtractLimits:
    """Caps on what one package archive may hold, enforced on bytes actually read.

    The defaults leave room for a model a hundred times the bundled one; a
    device with a bigger model raises them in its configuration.
    """

    max_members: int = 256
    """Archive members, manifest.json and manifest.sig included."""
    max_member_bytes: int = 256 * MiB
    """Size of one file."""
    max_total_bytes: int = 512 * MiB
    """Sum of all files' sizes."""
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    """Size of manifest.json."""
    reserve_bytes: int = 32 * MiB
    """Free space that must remain on the destination's file system."""

    def __post_init__(self) -> None:
        for field in ("max_members", "max_member_bytes", "max_total_bytes", "max_manifest_bytes"):
            if getattr(self, field) < 1:
                raise ValueError(f"ExtractLimits.{field} must be positive")
        if self.reserve_bytes < 0:
            raise ValueError("ExtractLimits.reserve_bytes must not be negative")

    @property
    def max_stream_bytes(self) -> int:
        """Cap on the decompressed tar stream: contents plus header and padding overhead."""
        # header, pax or long-name header and its data, padding
        per_member = 4 * tarfile.BLOCKSIZE
        return (
            self.max_total_bytes
            + self.max_manifest_bytes
            + (self.max_members + 2) * per_member
            + 2 * tarfile.RECORDSIZE
        )


DEFAULT_LIMITS = ExtractLimits()


class CappedGunzip:
    """A read-only stream of the gunzipped bytes of ``raw``, at most ``limit`` of them.

    Raises PackageInvalidError past the limit, on a truncated gzip stream, on
    a gzip trailer whose CRC-32 or length does not match (zlib checks both at
    the end of the stream), and on bytes after its end (a package is one gzip
    member). The last bytes handed out stay readable with :meth:`since`.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header required
        self._pending = b""
        self._eof = False
        self._window_end: int | None = None
        self._history = bytearray()  # the last bytes read() returned, ending at tell()
        self.bytes_read = 0

    def limit_window(self, size: int | None) -> None:
        """Allow at most ``size`` more bytes until the next call (None: no window).

        Around ``tarfile``'s header parsing: it buffers a pax or GNU long-name
        header whole, and a header has no business being large.
        """
        self._window_end = None if size is None else self.bytes_read + size

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            size = self._limit + 1
        out = bytearray()
        while len(out) < size:
            if not self._pending and not self._fill(size - len(out)):
                break
            take = self._pending[: size - len(out)]
            self._pending = self._pending[len(take) :]
            out += take
        self._history += out
        del self._history[: max(0, len(self._history) - _HISTORY)]
        return bytes(out)

    def since(self, offset: int) -> bytes:
        """The bytes read() returned from ``offset`` on (only the recent ones are kept)."""
        start = len(self._history) - (self.tell() - offset)
        if start < 0 or offset > self.tell():
            raise ValueError(f"offset {offset} is no longer (or not yet) in the history")
        return bytes(self._history[start:])

    def _fill(self, want: int) -> bool:
        while not self._eof:
            data = self._inflater.unconsumed_tail or self._raw.read(READ_CHUNK)
            if not data:
                raise PackageInvalidError("archive is truncated: the gzip stream ends early")
            try:
                chunk = self._inflater.decompress(data, min(want, _MAX_DECOMPRESS_STEP))
            except zlib.error as exc:
                raise PackageInvalidError(f"archive is not valid gzip data ({exc})") from None
            self.bytes_read += len(chunk)
            if self.bytes_read > self._limit:
                raise PackageInvalidError(
                    f"archive expands to more than {self._limit} bytes (limit); refusing it"
                )
            if self._window_end is not None and self.bytes_read > self._window_end:
                raise PackageInvalidError("archive has an oversized member header; refusing it")
            if self._inflater.eof:
                self._eof = True
                if self._inflater.unused_data or self._raw.read(1):
                    raise PackageInvalidError("archive has data after the end of its gzip stream")
            if chunk:
                self._pending = chunk
                return True
        return False

    def write(self, b: bytes, /) -> int:
        raise OSError("read-only stream")

    def tell(self) -> int:
        return self.bytes_read - len(self._pending)

    def seek(self, pos: int, /) -> int:
        raise OSError("stream is not seekable")

    def close(self) -> None:
        self._pending = b""


def check_end_of_archive(tar: tarfile.TarFile, stream: CappedGunzip) -> None:
    """After the last member: only zero bytes to the end of the gzip stream.

    ``tarfile`` ends an archive at the first zero block, and also, silently,
    at the first block that is not a valid header; what follows is never read.
    A package is one tar: the end-of-archive marker and zero padding, then the
    end of the gzip stream (whose trailer and end :class:`CappedGunzip` checks
    while this reads to it). A second archive or any other data is refused.
    """
    # the block that ended the archive, and what tarfile read ahead after it
    if _nonzero(stream.since(tar.offset)):
        raise PackageInvalidError("archive has data after the end of the tar archive")
    while chunk := stream.read(READ_CHUNK):
        if _nonzero(chunk):
            raise PackageInvalidError("archive has data after the end of the tar archive")


def _nonzero(data: bytes) -> bool:
    return data.count(0) != len(data)


def member_kind(member: tarfile.TarInfo) -> str:
    """Human name of a member's type, for error messages."""
    if member.type in REGULAR_TYPES:
        return "regular file"
    if member.type == tarfile.DIRTYPE:
        return "directory"
    return MEMBER_KINDS.get(member.type, f"type {member.type!r}")


def read_member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    """The whole content of a small regular member (manifest.json, manifest.sig)."""
    if member.type not in REGULAR_TYPES:
        raise PackageInvalidError(f"{member.name} is a {member_kind(member)}, not a regular file")
    if member.size > limit:
        raise PackageInvalidError(f"{member.name} is {member.size} bytes; the limit is {limit}")
    source = tar.extractfile(member)
    if source is None:
        raise PackageInvalidError(f"{member.name} has no content")
    data = source.read(member.size + 1)
    if len(data) != member.size:
        raise PackageInvalidError(f"{member.name} is truncated")
    return data
