"""``edgectl package``: run in-process through edgectl's real entry point."""

from __future__ import annotations

import importlib
import io
import json
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from edgeagent.package import inspect_package, load_trusted_keys, verify_package_dir

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = REPO / "models" / "dev-keys"

Main = Callable[[Sequence[str]], int]


@pytest.fixture
def edgectl(monkeypatch: pytest.MonkeyPatch) -> Main:
    """edgectl.__main__.main.

    While edgectl/commands/models.py (another command, written separately) is
    not in the tree yet, a stub stands in for it so this command can be tested
    through the real entry point; once it exists the stub is never used.
    """
    try:
        importlib.import_module("edgectl.commands.models")
    except ModuleNotFoundError as exc:
        if exc.name != "edgectl.commands.models":
            raise
        stub = types.ModuleType("edgectl.commands.models")
        stub.add_parser = lambda subparsers: None  # type: ignore[attr-defined]  # module stub
        monkeypatch.setitem(sys.modules, "edgectl.commands.models", stub)
        monkeypatch.delitem(sys.modules, "edgectl.__main__", raising=False)
    main: Main = importlib.import_module("edgectl.__main__").main
    return main


@pytest.fixture
def model(tmp_path: Path) -> Path:
    from cloud.autoencoder import build_autoencoder_onnx

    return build_autoencoder_onnx(tmp_path / "autoencoder.onnx", seed=3)


def test_keygen_build_verify_inspect_extract(
    edgectl: Main, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert edgectl(["package", "keygen", "--out", str(keys), "--name", "fleet"]) == 0
    out = capsys.readouterr().out
    assert "fleet.key" in out
    assert "key id:" in out
    assert (keys / "fleet.key").stat().st_mode & 0o777 == 0o600

    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"window": 100}))
    golden = tmp_path / "golden.npy"
    np.save(golden, np.ones((2, 6, 10, 10), dtype=np.float32))
    out_dir = tmp_path / "dist"
    code = edgectl(
        [
            "package", "build", "--model", str(model), "--name", "tiny",
            "--version", "2.1", "--signing-key", str(keys / "fleet.key"),
            "--preprocessing-json", str(pre), "--golden-input", str(golden),
            "--out", str(out_dir),
        ]
    )  # fmt: skip
    assert code == 0
    archive = out_dir / "tiny-2.1.tar.gz"
    out = capsys.readouterr().out
    assert str(archive) in out
    assert "sha256 " in out
    manifest = inspect_package(archive)
    assert manifest.preprocessing == {"window": 100}

    public_only = tmp_path / "trusted"
    public_only.mkdir()
    (public_only / "fleet.pub").write_bytes((keys / "fleet.pub").read_bytes())
    assert edgectl(["package", "verify", str(archive), "--trusted-keys", str(public_only)]) == 0
    assert capsys.readouterr().out.strip() == "tiny 2.1: OK (signature, sizes, SHA-256)"

    assert edgectl(["package", "inspect", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "name:          tiny" in out
    assert "version:       2.1" in out
    assert "input:         input float32 [-1, 6, 10, 10]" in out
    assert "NOT verified" in out

    assert edgectl(["package", "inspect", str(archive), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "2.1"

    dest = tmp_path / "installed"
    code = edgectl(["package", "extract", str(archive), str(dest), "--trusted-keys", str(keys)])
    assert code == 0
    assert "verified and extracted" in capsys.readouterr().out
    assert verify_package_dir(dest, trusted_keys=load_trusted_keys(keys)) == manifest

    assert edgectl(["package", "verify", str(dest), "--trusted-keys", str(keys), "--golden"]) == 0
    assert "golden check passed" in capsys.readouterr().out


def test_build_with_default_golden_input(
    edgectl: Main, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert edgectl(["package", "keygen", "--out", str(tmp_path / "k")]) == 0
    code = edgectl(
        [
            "package", "build", "--model", str(model), "--name", "tiny", "--version", "1.0",
            "--signing-key", str(tmp_path / "k" / "package-signing.key"),
            "--out", str(tmp_path / "dist"), "--golden-batch", "5",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    dest = tmp_path / "x"
    args = ["package", "extract", str(tmp_path / "dist" / "tiny-1.0.tar.gz"), str(dest)]
    assert edgectl([*args, "--trusted-keys", str(tmp_path / "k")]) == 0
    assert np.load(dest / "golden" / "input.npy").shape == (5, 6, 10, 10)


def test_bundled_package_verifies_with_golden(
    edgectl: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["package", "verify", str(BUNDLED), "--trusted-keys", str(DEV_KEYS), "--golden"]
    assert edgectl(args) == 0
    assert capsys.readouterr().out.startswith("wind-turbine 1.0: OK")


def test_untrusted_key_fails_cleanly(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert edgectl(["package", "keygen", "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    code = edgectl(["package", "verify", str(BUNDLED), "--trusted-keys", str(tmp_path / "other")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("edgectl: PackageSignature: ")
    assert "Traceback" not in err


def test_tampered_archive_fails_extract_and_leaves_nothing(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(BUNDLED.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    assert (
        edgectl(["package", "extract", str(bad), str(dest), "--trusted-keys", str(DEV_KEYS)]) == 1
    )
    assert "PackageInvalid" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_clean_errors(edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert edgectl(["package", "inspect", str(tmp_path / "missing.tar.gz")]) == 1
    assert "does not exist" in capsys.readouterr().err

    assert edgectl(["package", "verify", str(BUNDLED), "--trusted-keys", str(tmp_path / "no")]) == 1
    assert "trusted key directory" in capsys.readouterr().err

    keys = tmp_path / "k"
    assert edgectl(["package", "keygen", "--out", str(keys)]) == 0
    assert edgectl(["package", "keygen", "--out", str(keys)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err

    pre = tmp_path / "pre.json"
    pre.write_text("[1, 2]")
    code = edgectl(
        [
            "package", "build", "--model", str(tmp_path / "none.onnx"), "--name", "x",
            "--version", "1", "--signing-key", str(keys / "package-signing.key"),
            "--preprocessing-json", str(pre), "--out", str(tmp_path / "d"),
        ]
    )  # fmt: skip
    assert code == 1
    assert "must hold a JSON object" in capsys.readouterr().err

    existing = tmp_path / "exists"
    existing.mkdir()
    args = ["package", "extract", str(BUNDLED), str(existing), "--trusted-keys", str(DEV_KEYS)]
    assert edgectl(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_usage_errors_exit_2(edgectl: Main, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        edgectl(["package", "verify", str(BUNDLED)])  # --trusted-keys is required
    assert exc.value.code == 2
    assert "--trusted-keys" in capsys.readouterr().err


# --- errors say what happened, in one line ------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("edgectl: ")
    return err


def test_extract_creates_missing_parent_folders(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "no" / "such" / "dir" / "wind-turbine-1.0"
    args = ["package", "extract", str(BUNDLED), str(dest), "--trusted-keys", str(DEV_KEYS)]
    assert edgectl(args) == 0, capsys.readouterr().err
    assert verify_package_dir(dest, trusted_keys=load_trusted_keys(DEV_KEYS)).version == "1.0"


def test_extract_names_a_parent_that_cannot_be_created(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("not a folder")
    dest = tmp_path / "afile" / "sub" / "pkg"
    args = ["package", "extract", str(BUNDLED), str(dest), "--trusted-keys", str(DEV_KEYS)]
    assert edgectl(args) == 1
    err = _one_line_error(capsys)
    assert "NotFound" not in err
    assert "PackageDestination" in err
    assert str(tmp_path / "afile") in err


def test_extract_of_a_failed_package_leaves_no_parent_folders_behind(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.tar.gz"
    data = bytearray(BUNDLED.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    dest = tmp_path / "new" / "parents" / "pkg"
    args = ["package", "extract", str(bad), str(dest), "--trusted-keys", str(DEV_KEYS)]
    assert edgectl(args) == 1
    assert "PackageInvalid" in _one_line_error(capsys)
    assert not (tmp_path / "new").exists()


def _signed_dir(tmp_path: Path, model: bytes) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "tests" / "edgeagent"))
    try:
        from conftest_package import (
            GENUINE_FILES,
            fixed_key,
            golden_x,
            write_public_key,
            write_signed_dir,
        )
    finally:
        sys.path.remove(str(REPO / "tests" / "edgeagent"))
    from edgeagent.package.golden import npy_bytes

    key = fixed_key(9)
    keys = tmp_path / "keys"
    write_public_key(key, keys / "k.pub")
    x = golden_x()
    files = {
        **GENUINE_FILES,
        "model.onnx": model,
        "golden/input.npy": npy_bytes(x),
        "golden/expected.npy": npy_bytes(x * 2 + 1),
    }
    return write_signed_dir(tmp_path / "pkg", files, key), keys


def test_verify_golden_of_a_model_runtime_cannot_load_is_one_line(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnx import TensorProto, helper

    # standard operators only, so our own check passes it; ONNX Runtime cannot
    # load it (Add of an input that nothing produces)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root, keys = _signed_dir(tmp_path, model.SerializeToString())
    assert edgectl(["package", "verify", str(root), "--trusted-keys", str(keys)]) == 0
    capsys.readouterr()
    code = edgectl(["package", "verify", str(root), "--trusted-keys", str(keys), "--golden"])
    assert code == 1
    err = _one_line_error(capsys)
    assert "ModelLoad" in err
    assert "ONNX Runtime cannot load model.onnx" in err


def test_verify_of_a_hostile_model_is_one_line(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    root, keys = _signed_dir(tmp_path, model.SerializeToString())
    assert edgectl(["package", "verify", str(root), "--trusted-keys", str(keys)]) == 1
    err = _one_line_error(capsys)
    assert "PackageInvalid" in err
    assert "com.microsoft" in err


def test_deeply_nested_manifest_is_one_line(
    edgectl: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tarfile

    from edgeagent.package import sign
    from edgeagent.package.signing import load_private_key

    key = load_private_key(DEV_KEYS / "windedge-dev.key")
    nested = "[" * 200_000 + "]" * 200_000
    manifest = json.loads(inspect_package(BUNDLED).to_json_bytes())
    manifest["preprocessing"]["deep"] = "PLACEHOLDER"
    data = json.dumps(manifest).replace('"PLACEHOLDER"', nested).encode()
    archive = tmp_path / "deep-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in (("manifest.json", data), ("manifest.sig", sign(data, key))):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    for action in ("verify", "extract"):
        extra = [str(tmp_path / "dest")] if action == "extract" else []
        args = ["package", action, str(archive), *extra, "--trusted-keys", str(DEV_KEYS)]
        assert edgectl(args) == 1
        err = _one_line_error(capsys)
        assert "PackageInvalid" in err
        assert "nested deeper than" in err
