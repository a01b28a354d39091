"""The one rule for file names inside a package.

Manifest keys and archive member names go through :func:`split_relpath`.
A name is accepted only in its canonical form: relative, ``/``-separated,
no empty, ``.`` or ``..`` component, no backslash, NUL or other control
character, valid UTF-8. So two different accepted names never denote the same
file, and an accepted name joined to a directory never leaves it.
"""

from __future__ import annotations

MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})


def split_relpath(name: str) -> tuple[str, ...]:
    """Return the components of a safe relative package path, or raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"path must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("empty path")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"path {name[:40]!r}... is longer than {MAX_PATH_BYTES} bytes")
    if name.startswith("/"):
        raise ValueError(f"path {name!r} is absolute")
    if "\\" in name:
        raise ValueError(f"path {name!r} contains a backslash")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ValueError(f"path {name!r} contains NUL or a control character")
    parts = tuple(name.split("/"))
    for part in parts:
        if part == "":
            raise ValueError(f"path {name!r} has an empty component")
        if part in (".", ".."):
            raise ValueError(f"path {name!r} has a {part!r} component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(f"path {name!r} has a component longer than {MAX_COMPONENT_BYTES}")
    return parts


def is_safe_relpath(name: str) -> bool:
    """True when :func:`split_relpath` accepts ``name``."""
    try:
        split_relpath(name)
    except ValueError:
        return False
    return True
