"""The package manifest: what a model package holds, as a self-validating value.

``manifest.json`` is parsed into a frozen :class:`Manifest`; anything that does
not fit the schema (unknown keys included) raises
:class:`~edgeagent.package.errors.PackageInvalidError` at the boundary, so the
rest of the agent can trust the value. :meth:`Manifest.to_json_bytes` gives the
one canonical encoding that the build signs.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeagent.package.errors import PackageInvalidError
from edgeagent.package.paths import RESERVED_NAMES, split_relpath
from edgeagent.tensors import SUPPORTED_DTYPES, TensorSpec

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024
# objects and arrays inside one another; a real manifest needs about 5, and
# Python's JSON parser recurses once per level (a RecursionError past ~1,000)
MAX_MANIFEST_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = np.zeros(256, dtype=np.int8)
_OPENERS[[ord("["), ord("{")]] = 1
_OPENERS[[ord("]"), ord("}")]] = -1

# the SageMaker Edge Agent's model alias pattern (AGENT_API.md)
NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$"
MAX_NAME_LENGTH = 63
_VERSION_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_VERSION_LENGTH = 64
MAX_TENSOR_RANK = 8


def json_depth(data: bytes) -> int:
    """How deeply objects and arrays nest in the JSON text ``data`` (strings skipped).

    Linear and non-recursive, so it can run on hostile input before a parser does.
    """
    bare = _JSON_STRING.sub(b'""', data)
    if not bare:
        return 0
    steps = _OPENERS[np.frombuffer(bare, dtype=np.uint8)].astype(np.int64)
    return max(0, int(np.cumsum(steps).max()))


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a dotted numeric version ("1.0", "1.10", "2024.01.15").

    Components compare as integers, so ``1.10 > 1.9``. Trailing zero components
    are insignificant (``1 == 1.0 == 1.0.0``), as in PEP 440, so a version
    cannot look newer just by being spelled longer. Raises ValueError for
    anything else (empty, letters, signs, blanks, non-ASCII digits, too long).
    """
    if not isinstance(version, str):
        raise ValueError(f"version must be a string, not {type(version).__name__}")
    if len(version) > MAX_VERSION_LENGTH or _VERSION_RE.fullmatch(version) is None:
        raise ValueError(
            f"invalid version {version[:MAX_VERSION_LENGTH]!r}: expected dotted numbers like 1.0"
        )
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class TensorEntry(_Frozen):
    """A model input or output as the manifest states it."""

    name: str = Field(min_length=1, max_length=256)
    dtype: str
    shape: tuple[int, ...] = Field(min_length=1, max_length=MAX_TENSOR_RANK)

    @field_validator("dtype")
    @classmethod
    def _dtype_supported(cls, value: str) -> str:
        if value not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {sorted(SUPPORTED_DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _shape_valid(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        first, *rest = value
        if first != -1 and first < 1:
            raise ValueError(f"shape {list(value)}: the first dimension is -1 (dynamic) or > 0")
        if any(d < 1 for d in rest):
            raise ValueError(f"shape {list(value)}: only the first dimension may be dynamic")
        return value

    def spec(self) -> TensorSpec:
        return TensorSpec(name=self.name, dtype=self.dtype, shape=self.shape)

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> TensorEntry:
        return cls(name=spec.name, dtype=spec.dtype, shape=tuple(spec.shape))


class FileEntry(_Frozen):
    """Digest and size of one file of the package."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class GoldenCheck(_Frozen):
    """The golden check: the model's output on ``input`` must match ``expected``.

    ``numpy.allclose(actual, expected, rtol=rtol, atol=atol)`` semantics.
    """

    input: str
    expected: str
    rtol: float = Field(ge=0.0)
    atol: float = Field(ge=0.0)

    @field_validator("input", "expected")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        split_relpath(value)
        return value

    @field_validator("rtol", "atol")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("tolerance must be finite")
        return value


class Manifest(_Frozen):
    """The parsed, validated ``manifest.json`` of a model package (format 1)."""

    format_version: int
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)
    version: str
    framework: Literal["onnx"]
    model_file: str
    inputs: tuple[TensorEntry, ...] = Field(min_length=1)
    outputs: tuple[TensorEntry, ...] = Field(min_length=1)
    files: dict[str, FileEntry]
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    golden: GoldenCheck
    created_at: str | None = None

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {value} (supported: {FORMAT_VERSION})")
        return value

    @field_validator("version")
    @classmethod
    def _valid_version(cls, value: str) -> str:
        version_key(value)
        return value

    @field_validator("model_file")
    @classmethod
    def _safe_model_file(cls, value: str) -> str:
        split_relpath(value)
        return value

    @field_validator("files")
    @classmethod
    def _safe_file_names(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        dirs: set[tuple[str, ...]] = set()
        for name in value:
            parts = split_relpath(name)
            if name in RESERVED_NAMES:
                raise ValueError(f"{name} must not be listed in files")
            dirs.update(parts[:i] for i in range(1, len(parts)))
        for name in value:
            if tuple(name.split("/")) in dirs:
                raise ValueError(f"{name!r} is listed as a file and used as a directory")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for role, path in (
            ("model_file", self.model_file),
            ("golden.input", self.golden.input),
            ("golden.expected", self.golden.expected),
        ):
            if path not in self.files:
                raise ValueError(f"{role} {path!r} is not listed in files")
        for kind, entries in (("input", self.inputs), ("output", self.outputs)):
            names = [e.name for e in entries]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names {names}")
        return self

    @property
    def version_key(self) -> tuple[int, ...]:
        return version_key(self.version)

    @property
    def total_size(self) -> int:
        """Bytes of every listed file (manifest and signature not included)."""
        return sum(entry.size for entry in self.files.values())

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(e.spec() for e in self.inputs)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(e.spec() for e in self.outputs)

    def to_json_bytes(self) -> bytes:
        """The canonical encoding: sorted keys, two-space indent, ASCII, final newline."""
        data = self.model_dump(mode="json")
        if data.get("created_at") is None:
            data.pop("created_at", None)
        text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False)
        return text.encode("ascii") + b"\n"

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest.json; PackageInvalidError says what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise PackageInvalidError(f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
        depth = json_depth(data)
        if depth > MAX_MANIFEST_DEPTH:
            raise PackageInvalidError(
                f"manifest.json is nested deeper than {MAX_MANIFEST_DEPTH} levels ({depth})"
            )
        try:
            # a first pass with the stdlib rejects what pydantic's parser would
            # silently accept: duplicate keys (last one wins) and NaN/Infinity
            json.loads(data, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
            return cls.model_validate_json(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PackageInvalidError(f"manifest.json is invalid: {_describe(exc)}") from None
        except RecursionError:  # the depth check above should make this unreachable
            raise PackageInvalidError("manifest.json is nested too deeply") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _describe(exc: Exception, limit: int = 3) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
