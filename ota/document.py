"""The IoT job document: validated once, at the boundary.

The original workshop's document is accepted as it is::

    {"type": "new_model", "model_name": "wind-turbine", "model_version": "2.0",
     "model_package_bucket": "...", "model_package_key": "..."}

Optional fields: ``model_package_url`` (an HTTPS URL; plain HTTP only where
the device allows it, for a local stand-in, e.g. what IoT makes of a
presigned-URL placeholder), ``sha256``, ``size``, ``allow_downgrade``.
Unknown extra fields are ignored (a newer cloud may add some). Whether a valid
document applies to this device is :func:`check_applicable`'s question.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeagent.package import version_key
from edgecommon.settings import validation_problems
from ota.errors import RejectError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class JobDocument(BaseModel):
    """A model update job document."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    type: Literal["new_model"]
    model_name: str = Field(min_length=1, max_length=128)
    model_version: str
    model_package_bucket: str | None = Field(None, min_length=3, max_length=63)
    model_package_key: str | None = Field(None, min_length=1, max_length=1024)
    model_package_url: str | None = Field(None, max_length=8192)
    sha256: str | None = None
    size: int | None = Field(None, gt=0)
    allow_downgrade: bool = False

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if "/" in value or value in (".", "..") or any(ord(c) < 0x20 for c in value):
            raise ValueError(f"invalid model name {value!r}")
        return value

    @field_validator("model_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # the workshop's tooling sometimes wrote numbers; a float is a
            # version only in its written form ("2.0"), which JSON kept for us
            value = str(value)
        if isinstance(value, str):
            version_key(value)  # ValueError: not dotted numbers
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.lower()
            if not _SHA256_RE.fullmatch(value):
                raise ValueError("sha256 must be 64 hexadecimal digits")
        return value

    @field_validator("model_package_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError("model_package_url must be an https:// URL")
        return value

    @model_validator(mode="after")
    def _source(self) -> JobDocument:
        has_s3 = self.model_package_bucket is not None and self.model_package_key is not None
        if not has_s3 and self.model_package_url is None:
            raise ValueError(
                "the document names no package: model_package_bucket and model_package_key, "
                "or model_package_url"
            )
        return self

    @property
    def version_key(self) -> tuple[int, ...]:
        return version_key(self.model_version)

    @property
    def source(self) -> str:
        """Where the package comes from, for logs (no presigned query string)."""
        if self.model_package_url is not None:
            parts = urllib.parse.urlsplit(self.model_package_url)
            return f"{parts.scheme}://{parts.netloc}{parts.path}"
        return f"s3://{self.model_package_bucket}/{self.model_package_key}"


def parse_document(raw: object) -> JobDocument:
    """The validated document, or RejectError with one line saying why."""
    if not isinstance(raw, dict):
        raise RejectError(f"job document must be a JSON object, not {type(raw).__name__}")
    try:
        return JobDocument.model_validate(raw)
    except ValidationError as exc:
        raise RejectError(f"invalid job document: {validation_problems(exc)}") from None


def check_applicable(
    doc: JobDocument, *, device_model: str, installed: str | None, allow_http: bool = False
) -> None:
    """RejectError unless ``doc`` is for this device's model and newer than ``installed``."""
    url = doc.model_package_url
    if url is not None and url.startswith("http://") and not allow_http:
        raise RejectError("plain http:// package URLs are refused (allow_http_urls is off)")
    if doc.model_name != device_model:
        raise RejectError(f"job is for model {doc.model_name!r}, this device runs {device_model!r}")
    if installed is None:
        return
    if doc.version_key == version_key(installed):
        raise RejectError(f"version {doc.model_version} is already installed")
    if doc.version_key < version_key(installed) and not doc.allow_downgrade:
        raise RejectError(
            f"version {doc.model_version} is older than the installed {installed} "
            "(allow_downgrade is not set)"
        )


def check_signed_manifest(doc: JobDocument, *, name: str, version: str) -> None:
    """RejectError unless the signed manifest names the model and version the job promised."""
    if name != doc.model_name:
        raise RejectError(
            f"the signed package is model {name!r}, the job promised {doc.model_name!r}"
        )
    if version_key(version) != doc.version_key:
        raise RejectError(
            f"the signed package is version {version}, the job promised {doc.model_version}"
        )
