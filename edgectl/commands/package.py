"""``edgectl package``: make, sign, check, inspect and unpack model packages.

Thin handlers over :mod:`edgeagent.package`; every check lives there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.package import (
    Manifest,
    archive_name,
    build_package,
    extract_package,
    generate_keypair,
    golden_inputs_like,
    inspect_package,
    key_id,
    load_private_key,
    load_trusted_keys,
    load_verified_package,
    model_specs,
    read_manifest_bytes,
    sha256_of,
    verify_package_archive,
    verify_package_dir,
)
from edgectl.errors import CommandError

DEFAULT_KEY_NAME = "package-signing"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "package", help="build, sign, verify, inspect and extract model packages"
    )
    sub = parser.add_subparsers(dest="package_command", required=True, metavar="ACTION")

    keygen = sub.add_parser("keygen", help="create an Ed25519 package-signing key pair")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    keygen.add_argument(
        "--name",
        default=DEFAULT_KEY_NAME,
        help=f"file names NAME.key/NAME.pub ({DEFAULT_KEY_NAME})",
    )
    keygen.set_defaults(func=_keygen)

    build = sub.add_parser("build", help="build and sign <name>-<version>.tar.gz")
    build.add_argument("--model", type=Path, required=True, metavar="M.onnx")
    build.add_argument("--name", required=True, help="model name (letters, digits, hyphens)")
    build.add_argument("--version", required=True, help="dotted numeric version, e.g. 1.0")
    build.add_argument("--signing-key", type=Path, required=True, metavar="KEY")
    build.add_argument(
        "--preprocessing-json", type=Path, metavar="F", help="JSON object for 'preprocessing'"
    )
    build.add_argument(
        "--golden-input",
        type=Path,
        metavar="F.npy",
        help="golden input (default: seeded standard-normal data, --golden-batch rows)",
    )
    build.add_argument("--golden-batch", type=int, default=8, help="rows of default golden data")
    build.add_argument("--golden-seed", type=int, default=0, help="seed of default golden data")
    build.add_argument("--rtol", type=float, default=1e-4, help="golden check rtol (1e-4)")
    build.add_argument("--atol", type=float, default=1e-5, help="golden check atol (1e-5)")
    build.add_argument("--out", type=Path, required=True, metavar="DIR")
    build.set_defaults(func=_build)

    verify = sub.add_parser("verify", help="verify a package archive or directory")
    verify.add_argument("path", type=Path, metavar="PATH")
    verify.add_argument("--trusted-keys", type=Path, required=True, metavar="DIR")
    verify.add_argument(
        "--golden", action="store_true", help="also run the golden check with ONNX Runtime"
    )
    verify.set_defaults(func=_verify)

    inspect = sub.add_parser("inspect", help="show a package's manifest (NOT verified)")
    inspect.add_argument("path", type=Path, metavar="PATH")
    inspect.add_argument("--json", action="store_true", help="print manifest.json as it is")
    inspect.set_defaults(func=_inspect)

    extract = sub.add_parser("extract", help="verify and unpack an archive into DEST")
    extract.add_argument("path", type=Path, metavar="PATH")
    extract.add_argument("dest", type=Path, metavar="DEST", help="must not exist yet")
    extract.add_argument("--trusted-keys", type=Path, required=True, metavar="DIR")
    extract.set_defaults(func=_extract)


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    name: str = args.name
    if not name or "/" in name or name.startswith("."):
        raise CommandError(f"--name {name!r} must be a plain file name")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create {out}: {exc.strerror}") from None
    private, public = out / f"{name}.key", out / f"{name}.pub"
    key = generate_keypair(private, public)
    _out(f"private key: {private} (mode 0600; keep it off devices and out of git)")
    _out(f"public key:  {public} (copy to each device's /etc/windedge/keys/)")
    _out(f"key id:      {key_id(key)}")
    return 0


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CommandError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{path} must hold a JSON object")
    return value


def _load_npy(path: Path) -> np.ndarray[Any, Any]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CommandError(f"cannot load {path} as a .npy array: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise CommandError(f"{path} must hold a single array")
    return array


def _build(args: argparse.Namespace) -> int:
    key = load_private_key(args.signing_key)
    preprocessing = _load_json_object(args.preprocessing_json) if args.preprocessing_json else {}
    if args.golden_input is not None:
        golden_input = _load_npy(args.golden_input)
    else:
        if not args.model.is_file():
            raise CommandError(f"model file {args.model} does not exist")
        inputs, _ = model_specs(args.model)
        if len(inputs) != 1:
            raise CommandError("the model has several inputs: pass --golden-input")
        golden_input = golden_inputs_like(inputs[0], batch=args.golden_batch, seed=args.golden_seed)
    try:
        path = build_package(
            model_path=args.model,
            name=args.name,
            version=args.version,
            preprocessing=preprocessing,
            golden_input=golden_input,
            signing_key=key,
            out_path=args.out,
            rtol=args.rtol,
            atol=args.atol,
        )
    except (OSError, ValueError) as exc:
        raise CommandError(f"build failed: {exc}") from None
    _out(str(path))
    _out(f"sha256 {sha256_of(path)}  size {path.stat().st_size}  signed by key {key_id(key)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = load_trusted_keys(args.trusted_keys)
    path: Path = args.path
    if path.is_dir():
        if args.golden:
            package = load_verified_package(path, trusted_keys=keys)
            package.check_golden()
            manifest = package.manifest
        else:
            manifest = verify_package_dir(path, trusted_keys=keys)
    elif args.golden:
        with tempfile.TemporaryDirectory(prefix="edgectl-verify-") as tmp:
            unpacked = Path(tmp) / "package"
            extract_package(path, unpacked, trusted_keys=keys)
            package = load_verified_package(unpacked, trusted_keys=keys)
            package.check_golden()
            manifest = package.manifest
    else:
        manifest = verify_package_archive(path, trusted_keys=keys)
    golden = ", golden check passed" if args.golden else ""
    _out(f"{manifest.name} {manifest.version}: OK (signature, sizes, SHA-256{golden})")
    _warn_if_misnamed(path, manifest)
    return 0


def _warn_if_misnamed(path: Path, manifest: Manifest) -> None:
    """Say so when an archive's file name claims another name or version than it signs."""
    if path.is_dir() or path.name == archive_name(manifest.name, manifest.version):
        return
    sys.stderr.write(
        f"edgectl: note: {path.name} holds {manifest.name} {manifest.version} (the signed "
        "manifest's name and version are the ones that count)\n"
    )


def _summary(manifest: Manifest) -> list[str]:
    lines = [
        f"name:          {manifest.name}",
        f"version:       {manifest.version}",
        f"framework:     {manifest.framework} (format {manifest.format_version})",
        f"model file:    {manifest.model_file}",
    ]
    for kind, entries in (("input", manifest.inputs), ("output", manifest.outputs)):
        for e in entries:
            lines.append(f"{kind + ':':<15}{e.name} {e.dtype} {list(e.shape)}")
    g = manifest.golden
    lines.append(f"golden check:  {g.input} -> {g.expected} (rtol {g.rtol:g}, atol {g.atol:g})")
    lines.append(f"preprocessing: {', '.join(sorted(manifest.preprocessing)) or '(none)'}")
    if manifest.created_at:
        lines.append(f"created at:    {manifest.created_at}")
    lines.append(f"files:         {len(manifest.files)}, {manifest.total_size} bytes")
    for name, entry in sorted(manifest.files.items()):
        lines.append(f"  {entry.sha256[:16]}  {entry.size:>10}  {name}")
    lines.append("NOT verified: use 'edgectl package verify' to check signature and digests")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    if args.json:
        sys.stdout.write(read_manifest_bytes(args.path).decode("utf-8", errors="replace"))
        return 0
    for line in _summary(inspect_package(args.path)):
        _out(line)
    return 0


def _extract(args: argparse.Namespace) -> int:
    keys = load_trusted_keys(args.trusted_keys)
    manifest = extract_package(args.path, args.dest, trusted_keys=keys)
    _out(f"{manifest.name} {manifest.version}: verified and extracted to {args.dest}")
    _warn_if_misnamed(args.path, manifest)
    return 0
