"""Helpers shared by the package-format tests (imported, not a pytest conftest).

Everything is built in the test's tmp_path: a tiny ONNX model, deterministic
keys, genuine packages, and hand-made tar archives for the hostile cases.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgeagent.package import (
    FileEntry,
    GoldenCheck,
    Manifest,
    TensorEntry,
    build_package,
    sign,
)

REPO = Path(__file__).resolve().parents[2]


def fixed_key(seed: int) -> Ed25519PrivateKey:
    """A deterministic test key (never use such keys outside tests)."""
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def write_private_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def tiny_onnx(path: Path) -> Path:
    """y = 2 * x + 1, x float32 [N, 3]: loads and runs in milliseconds."""
    path.write_bytes(tiny_onnx_bytes())
    return path


def golden_x(rows: int = 4) -> np.ndarray[Any, Any]:
    return np.random.default_rng(1).standard_normal((rows, 3)).astype(np.float32)


def build_tiny(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    name: str = "tiny",
    version: str = "1.0",
    **overrides: Any,
) -> Path:
    """A genuine signed package of the tiny model; returns the .tar.gz path."""
    model = out_dir / "src" / "tiny.onnx"
    model.parent.mkdir(parents=True, exist_ok=True)
    if not model.exists():
        tiny_onnx(model)
    kwargs: dict[str, Any] = {
        "model_path": model,
        "name": name,
        "version": version,
        "preprocessing": {"window": 100, "features": ["a", "b", "c"]},
        "golden_input": golden_x(),
        "golden_expected": None,
        "signing_key": key,
        "out_path": out_dir,
    }
    kwargs.update(overrides)
    return build_package(**kwargs)


# --- hand-made archives ------------------------------------------------------


def tiny_onnx_bytes() -> bytes:
    """The serialised tiny model (y = 2 * x + 1), built in memory."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["twice"]),
        helper.make_node("Add", ["twice", "one"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# content of a package whose golden files are arbitrary bytes: extraction never
# runs the model (it only parses it), so the hostile-archive tests need no golden data
GENUINE_FILES: dict[str, bytes] = {
    "model.onnx": tiny_onnx_bytes(),
    "golden/input.npy": b"input bytes",
    "golden/expected.npy": b"expected bytes",
}


def manifest_for(files: dict[str, bytes], **overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "format_version": 1,
        "name": "hostile",
        "version": "1.0",
        "framework": "onnx",
        "model_file": "model.onnx",
        "inputs": (TensorEntry(name="x", dtype="float32", shape=(-1, 3)),),
        "outputs": (TensorEntry(name="y", dtype="float32", shape=(-1, 3)),),
        "files": {
            name: FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
            for name, data in files.items()
        },
        "golden": GoldenCheck(
            input="golden/input.npy", expected="golden/expected.npy", rtol=1e-4, atol=1e-5
        ),
    }
    fields.update(overrides)
    return Manifest(**fields)


def signed_head(
    manifest: Manifest, key: Ed25519PrivateKey
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """manifest.json and manifest.sig members, as a genuine build writes them first."""
    data = manifest.to_json_bytes()
    return [reg("manifest.json", data), reg("manifest.sig", sign(data, key))]


def write_signed_dir(
    root: Path, files: dict[str, bytes], key: Ed25519PrivateKey, **overrides: Any
) -> Path:
    """An unpacked package directory of exactly ``files``, its manifest signed by ``key``."""
    root.mkdir(parents=True)
    for name, data in files.items():
        path = root.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for info, data in signed_head(manifest_for(files, **overrides), key):
        assert data is not None
        (root / info.name).write_bytes(data)
    return root


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o777
    return info, None


def directory(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o777
    return info, None


def genuine_body(
    files: dict[str, bytes] | None = None,
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    files = GENUINE_FILES if files is None else files
    return [reg(name, data) for name, data in sorted(files.items())]


def write_tar(
    path: Path,
    members: Iterable[tuple[tarfile.TarInfo, bytes | None]],
    *,
    fmt: int = tarfile.PAX_FORMAT,
) -> Path:
    """A .tar.gz of exactly these members, in this order (no checks at all)."""
    with tarfile.open(path, "w:gz", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read lazily (for a gzip-bomb member)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) with a digest or kind."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out
