"""The parts of HTTP/2 (RFC 9113) and gRPC framing both ends share.

Frames are parsed from a byte buffer as they arrive; header blocks are
decoded by ``hpack`` (with a small cache, see ``HeaderDecoder``) and encoded
here as literals that never touch the peer's dynamic table, so an encoder
needs no state.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, unquote

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# settings
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
FRAME_HEADER = 9


class ErrorCode(enum.IntEnum):
    """HTTP/2 error codes (RST_STREAM, GOAWAY)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Status(enum.IntEnum):
    """gRPC status codes (the numbers are the wire contract)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_HEADER = struct.Struct(">BHBBI")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in values.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: ErrorCode) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id: int, code: ErrorCode, debug: str = "") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug.encode()[:256])


def parse_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % 6:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    out: dict[int, int] = {}
    for off in range(0, len(payload), 6):
        key, value = struct.unpack_from(">HI", payload, off)
        if key == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large")
        if key == MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
        if key == ENABLE_PUSH and value > 1:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad ENABLE_PUSH")
        out[key] = value
    return out


@dataclass(slots=True)
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes


class FrameReader:
    """Frames out of a byte stream, as many as have fully arrived.

    A frame that arrives in pieces is kept as a list of pieces and joined once,
    when it is complete: a 1 MB DATA frame read in 256 KB chunks is copied
    once, not once per chunk.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._pieces: list[bytes] = []
        self._have = 0
        self._need = FRAME_HEADER  # bytes the pieces must reach before parsing again

    def feed(self, data: bytes) -> list[Frame]:
        if self._pieces:
            self._pieces.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._pieces)
            self._pieces = []
        else:
            buf = data  # the usual case: parse the received bytes as they are
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        unpack = _HEADER.unpack_from
        self._need = FRAME_HEADER
        while end - pos >= FRAME_HEADER:
            hi, lo, kind, flags, sid = unpack(buf, pos)
            n = (hi << 16) | lo
            if n > self.max_frame:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {n} bytes")
            start = pos + FRAME_HEADER
            if end - start < n:
                self._need = FRAME_HEADER + n
                break
            frames.append(Frame(kind, flags, sid & 0x7FFF_FFFF, buf[start : start + n]))
            pos = start + n
        if pos < end:
            rest = buf[pos:] if pos else buf
            self._pieces = [rest]
            self._have = len(rest)
        return frames


def strip_padding(f: Frame) -> bytes:
    """A DATA or HEADERS payload without its padding (and HEADERS priority fields)."""
    p = f.payload
    start, end = 0, len(p)
    if f.flags & PADDED:
        if not p or p[0] >= len(p):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
        start, end = 1, len(p) - p[0]
    if f.kind == HEADERS and f.flags & PRIORITY_FLAG:
        start += 5
        if start > end:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS too short for priority")
    return p[start:end] if (start, end) != (0, len(p)) else p


class HeaderDecoder:
    """HPACK decoding with a cache for blocks that leave the dynamic table alone.

    A client repeating the same call sends the same few bytes of indexed
    references every time; decoding them is ~15 us of pure Python, a lookup
    is ~0.2 us. A cached result is valid while the dynamic table is the one it
    was decoded against, which is checked by a fingerprint of the table.
    """

    _CACHE_MAX = 64

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._cache: dict[bytes, tuple[object, dict[bytes, bytes]]] = {}

    def _fingerprint(self) -> object:
        table = self._decoder.header_table
        entries = table.dynamic_entries
        return (len(entries), id(entries[0]) if entries else 0, table.maxsize)

    def decode(self, block: bytes) -> dict[bytes, bytes]:
        """Name -> value (a repeated name keeps its last value). Do not modify the result:
        it may be shared with later calls."""
        hit = self._cache.get(block)
        fp = self._fingerprint()
        if hit is not None and hit[0] == fp:
            return hit[1]
        try:
            headers = {bytes(k): bytes(v) for k, v in self._decoder.decode(block, raw=True)}
        except hpack.HPACKError as exc:
            raise ProtocolError(ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        if self._fingerprint() == fp:
            if len(self._cache) >= self._CACHE_MAX:
                self._cache.clear()
            self._cache[block] = (fp, headers)
        return headers


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block of never-indexed literals: no state shared with the peer's decoder."""
    out = bytearray()
    for name, value in headers:
        out += b"\x10"  # literal never indexed, new name
        out += _hpack_int(len(name), 7, 0) + name
        out += _hpack_int(len(value), 7, 0) + value
    return bytes(out)


def encode_grpc_message(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (the gRPC HTTP/2 spec)."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def decode_grpc_message(raw: bytes) -> str:
    return unquote(raw.decode("ascii", "replace"), errors="replace")


class Message(Protocol):
    """What travels in a gRPC message: anything protobuf-like that serialises itself."""

    def SerializeToString(self) -> bytes: ...  # noqa: N802 - protobuf's name


def message(payload: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload
