"""The package format: manifest, signing, build, directory verification, golden check."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest_package import (
    GENUINE_FILES,
    REPO,
    build_tiny,
    fixed_key,
    golden_x,
    manifest_for,
    write_private_key,
    write_public_key,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from edgeagent.errors import (
    AgentError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from edgeagent.package import (
    GoldenCheckError,
    InsufficientSpaceError,
    KeyFileError,
    Manifest,
    PackageError,
    PackageExistsError,
    PackageInvalidError,
    PackageNotFoundError,
    PackageSignatureError,
    TensorEntry,
    build_package,
    check_golden,
    extract_package,
    generate_keypair,
    inspect_package,
    load_private_key,
    load_trusted_keys,
    read_manifest_bytes,
    sign,
    split_relpath,
    verify_package_archive,
    verify_package_dir,
    verify_signature,
    version_key,
)
from edgeagent.tensors import TensorSpec

KEY = fixed_key(1)
OTHER_KEY = fixed_key(2)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One genuine archive of the tiny model, signed by KEY (read-only for tests)."""
    return build_tiny(tmp_path_factory.mktemp("built"), KEY)


@pytest.fixture
def unpacked(built: Path, tmp_path: Path) -> Path:
    """A fresh, writable extraction of the genuine archive."""
    dest = tmp_path / "pkg"
    extract_package(built, dest, trusted_keys=[KEY.public_key()])
    return dest


# --- errors --------------------------------------------------------------------


def test_errors_carry_the_agent_meaning() -> None:
    assert issubclass(PackageError, AgentError)
    assert issubclass(PackageNotFoundError, NotFoundError)
    assert issubclass(PackageInvalidError, InvalidArgumentError)
    assert issubclass(PackageSignatureError, PermissionDeniedError)
    assert issubclass(KeyFileError, InvalidArgumentError)
    assert issubclass(PackageExistsError, AlreadyExistsError)
    assert issubclass(InsufficientSpaceError, ResourceExhaustedError)
    assert issubclass(GoldenCheckError, FailedPreconditionError)
    for cls in (PackageNotFoundError, PackageInvalidError, PackageSignatureError):
        assert issubclass(cls, PackageError)


# --- round trip ----------------------------------------------------------------


def test_round_trip_build_verify_extract(built: Path, tmp_path: Path) -> None:
    keys = [KEY.public_key()]
    manifest = verify_package_archive(built, trusted_keys=keys)
    assert built.name == "tiny-1.0.tar.gz"
    assert (manifest.name, manifest.version, manifest.framework) == ("tiny", "1.0", "onnx")
    assert manifest.input_specs() == (TensorSpec("x", "float32", (-1, 3)),)
    assert manifest.output_specs() == (TensorSpec("y", "float32", (-1, 3)),)
    assert sorted(manifest.files) == ["golden/expected.npy", "golden/input.npy", "model.onnx"]
    assert manifest.golden.rtol == 1e-4
    assert manifest.golden.atol == 1e-5

    dest = tmp_path / "installed" / "tiny" / "1.0"
    dest.parent.mkdir(parents=True)
    assert extract_package(built, dest, trusted_keys=keys) == manifest
    assert verify_package_dir(dest, trusted_keys=keys) == manifest
    assert inspect_package(built) == manifest
    assert inspect_package(dest) == manifest
    assert read_manifest_bytes(built) == (dest / "manifest.json").read_bytes()
    assert sorted(os.listdir(dest.parent)) == ["1.0"]  # no staging left beside it
    expected = np.load(dest / "golden" / "expected.npy")
    np.testing.assert_allclose(expected, golden_x() * 2 + 1, rtol=1e-6)
    assert check_golden(dest, manifest) == 0.0


def test_archive_layout_is_deterministic(built: Path, tmp_path: Path) -> None:
    again = build_tiny(tmp_path, KEY)
    assert again.read_bytes() == built.read_bytes()
    with tarfile.open(built) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "manifest.json",
        "manifest.sig",
        "golden",
        "golden/expected.npy",
        "golden/input.npy",
        "model.onnx",
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)
    raw = built.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert raw[3] & 0x08 == 0  # no file name in the gzip header


def test_manifest_bytes_are_canonical(built: Path) -> None:
    data = read_manifest_bytes(built)
    manifest = Manifest.from_json_bytes(data)
    assert manifest.to_json_bytes() == data
    assert data.endswith(b"\n")
    assert json.dumps(json.loads(data), sort_keys=True, indent=2).encode() + b"\n" == data
    assert "created_at" not in json.loads(data)


def test_build_replaces_archive_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    first = build_tiny(tmp_path, KEY)
    second = build_tiny(tmp_path, KEY, created_at="2024-05-01T00:00:00Z")
    assert first == second
    assert inspect_package(second).created_at == "2024-05-01T00:00:00Z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "tiny-1.0.tar.gz"]


def test_build_checks_declared_tensors_against_the_model(tmp_path: Path) -> None:
    with pytest.raises(PackageInvalidError, match="the model has float32"):
        build_tiny(tmp_path, KEY, inputs=[TensorSpec("x", "float32", (-1, 4))])
    with pytest.raises(PackageInvalidError, match="do not match"):
        build_tiny(tmp_path, KEY, outputs=[TensorSpec("z", "float32", (-1, 3))])
    with pytest.raises(PackageInvalidError, match="golden input is float64"):
        build_tiny(tmp_path, KEY, golden_input=golden_x().astype(np.float64))
    with pytest.raises(PackageInvalidError, match="golden input has shape"):
        build_tiny(tmp_path, KEY, golden_input=np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(PackageInvalidError, match="name"):
        build_tiny(tmp_path, KEY, name="bad_name")
    with pytest.raises(PackageInvalidError, match="version"):
        build_tiny(tmp_path, KEY, version="1.0-beta")
    with pytest.raises(PackageNotFoundError, match="does not exist"):
        build_tiny(tmp_path, KEY, model_path=tmp_path / "missing.onnx")
    assert not list(tmp_path.glob("*.tar.gz"))
    assert not list(tmp_path.glob(".*"))


# --- directory verification --------------------------------------------------------


def test_tampered_model_byte_is_invalid(unpacked: Path) -> None:
    model = unpacked / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(PackageInvalidError, match=r"model\.onnx does not match its SHA-256"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_size_change_is_invalid(unpacked: Path) -> None:
    with (unpacked / "golden" / "input.npy").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageInvalidError, match="bytes, the manifest says"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_tampered_manifest_fails_the_signature(unpacked: Path) -> None:
    path = unpacked / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"rtol": 0.0001', b'"rtol": 1000.0'))
    with pytest.raises(PackageSignatureError, match="not a valid signature"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_unsigned_package_is_refused_unless_allowed(unpacked: Path) -> None:
    (unpacked / "manifest.sig").unlink()
    with pytest.raises(PackageSignatureError, match=r"manifest\.sig is missing"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])
    manifest = verify_package_dir(unpacked, trusted_keys=None, require_signature=False)
    assert manifest.name == "tiny"


def test_untrusted_signer_is_refused(unpacked: Path) -> None:
    with pytest.raises(PackageSignatureError, match="any of the 1 trusted key"):
        verify_package_dir(unpacked, trusted_keys=[OTHER_KEY.public_key()])
    # trusting several keys, one of them the signer's, is fine
    verify_package_dir(unpacked, trusted_keys=[OTHER_KEY.public_key(), KEY.public_key()])


@pytest.mark.parametrize("keys", [None, []])
def test_no_trusted_keys_configured(unpacked: Path, keys: list[Ed25519PublicKey] | None) -> None:
    with pytest.raises(PackageSignatureError, match="no trusted keys configured"):
        verify_package_dir(unpacked, trusted_keys=keys)


def test_malformed_signature_is_refused(unpacked: Path) -> None:
    (unpacked / "manifest.sig").write_bytes(b"short")
    with pytest.raises(PackageSignatureError, match="not a 64-byte"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_extra_unlisted_file_is_invalid(unpacked: Path) -> None:
    (unpacked / "golden" / "extra.npy").write_bytes(b"x")
    with pytest.raises(PackageInvalidError, match=r"golden/extra\.npy is not listed"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_extra_directory_is_invalid(unpacked: Path) -> None:
    (unpacked / "cache").mkdir()
    with pytest.raises(PackageInvalidError, match="directory cache/ is not in the manifest"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_missing_listed_file_is_invalid(unpacked: Path) -> None:
    (unpacked / "golden" / "expected.npy").unlink()
    with pytest.raises(PackageInvalidError, match=r"golden/expected\.npy is listed .* missing"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_symlinked_file_is_invalid(unpacked: Path, tmp_path: Path) -> None:
    model = unpacked / "model.onnx"
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(model, outside)
    model.unlink()
    model.symlink_to(outside)  # same bytes, but a link: refused all the same
    with pytest.raises(PackageInvalidError, match="symbolic link"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_symlinked_manifest_is_invalid(unpacked: Path, tmp_path: Path) -> None:
    manifest = unpacked / "manifest.json"
    outside = tmp_path / "m.json"
    shutil.copyfile(manifest, outside)
    manifest.unlink()
    manifest.symlink_to(outside)
    with pytest.raises(PackageInvalidError, match="symbolic link"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_fifo_in_package_is_invalid(unpacked: Path) -> None:
    os.mkfifo(unpacked / "golden" / "pipe")
    with pytest.raises(PackageInvalidError, match="not a regular file"):
        verify_package_dir(unpacked, trusted_keys=[KEY.public_key()])


def test_missing_package_dir_or_manifest(tmp_path: Path) -> None:
    keys = [KEY.public_key()]
    with pytest.raises(PackageNotFoundError, match="does not exist"):
        verify_package_dir(tmp_path / "nope", trusted_keys=keys)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PackageNotFoundError, match="is not a directory"):
        verify_package_dir(tmp_path / "file", trusted_keys=keys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageNotFoundError, match=r"empty/manifest\.json does not exist"):
        verify_package_dir(tmp_path / "empty", trusted_keys=keys)


def test_golden_check_detects_a_wrong_expected_output(tmp_path: Path) -> None:
    wrong = golden_x() * 2 + 1.01
    archive = build_tiny(tmp_path, KEY, golden_expected=wrong.astype(np.float32))
    dest = tmp_path / "pkg"
    manifest = extract_package(archive, dest, trusted_keys=[KEY.public_key()])
    with pytest.raises(GoldenCheckError, match="golden check failed"):
        check_golden(dest, manifest)


# --- manifest schema -------------------------------------------------------------


def _manifest_json(**changes: object) -> bytes:
    data = json.loads(manifest_for(GENUINE_FILES).to_json_bytes())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


def test_manifest_parses_and_exposes_specs() -> None:
    manifest = Manifest.from_json_bytes(_manifest_json())
    assert manifest.inputs[0].spec() == TensorSpec("x", "float32", (-1, 3))
    assert manifest.total_size == sum(len(d) for d in GENUINE_FILES.values())
    assert manifest.version_key == (1,)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"framework": "tensorflow"}, "framework"),
        ({"format_version": 2}, "unsupported format_version 2"),
        ({"format_version": "1"}, "format_version"),
        ({"surprise": True}, "surprise"),
        ({"name": "bad_name"}, "name"),
        ({"name": "-lead"}, "name"),
        ({"name": "trail-"}, "name"),
        ({"name": "a" * 64}, "name"),
        ({"version": "1.x"}, "invalid version"),
        ({"model_file": "other.onnx"}, "model_file 'other.onnx' is not listed"),
        ({"model_file": "../model.onnx"}, r"'\.\.' component"),
        (
            {"golden": {"input": "golden/input.npy", "expected": "nope.npy", "rtol": 0, "atol": 0}},
            "golden.expected",
        ),
        (
            {
                "golden": {
                    "input": "golden/input.npy",
                    "expected": "golden/expected.npy",
                    "rtol": -1,
                    "atol": 0,
                }
            },
            "rtol",
        ),
        ({"inputs": [{"name": "x", "dtype": "complex64", "shape": [-1, 3]}]}, "complex64"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [3, -1]}]}, "only the first"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [0, 3]}]}, "first dimension"),
        ({"inputs": []}, "inputs"),
        ({"files": {"model.onnx": {"sha256": "AB", "size": 1}}}, "sha256"),
        ({"files": {"/abs": {"sha256": "0" * 64, "size": 1}}}, "absolute"),
        ({"files": {"manifest.sig": {"sha256": "0" * 64, "size": 1}}}, "must not be listed"),
        ({"golden": None}, "golden"),
    ],
)
def test_manifest_schema_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PackageInvalidError, match=message):
        Manifest.from_json_bytes(_manifest_json(**changes))


def test_manifest_rejects_file_that_is_also_a_directory() -> None:
    files = dict(GENUINE_FILES, golden=b"x")
    with pytest.raises(ValueError, match="used as a directory"):
        manifest_for(files)


@pytest.mark.parametrize(
    "data",
    [
        b'{"name": "a", "name": "b"}',
        b'{"rtol": NaN}',
        b"\xff\xfe",
        b"[]",
        b"",
    ],
)
def test_manifest_rejects_non_json_and_ambiguous_json(data: bytes) -> None:
    with pytest.raises(PackageInvalidError, match=r"manifest\.json is invalid"):
        Manifest.from_json_bytes(data)


def test_manifest_is_frozen() -> None:
    manifest = Manifest.from_json_bytes(_manifest_json())
    field = "name"
    with pytest.raises(ValueError, match="frozen"):
        setattr(manifest, field, "other")


def test_tensor_entry_round_trips_a_spec() -> None:
    spec = TensorSpec("input", "float32", (-1, 6, 10, 10))
    assert TensorEntry.from_spec(spec).spec() == spec


# --- versions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("newer", "older"),
    [
        ("1.10", "1.9"),
        ("2.0", "1.99"),
        ("1.0.1", "1.0"),
        ("10", "9.9.9"),
        ("2024.01.15", "2024.1.9"),
    ],
)
def test_version_order(newer: str, older: str) -> None:
    assert version_key(newer) > version_key(older)


@pytest.mark.parametrize(("a", "b"), [("1", "1.0"), ("1.0", "1.0.0"), ("1.01", "1.1")])
def test_equal_versions(a: str, b: str) -> None:
    assert version_key(a) == version_key(b)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1.",
        ".1",
        "1..0",
        "v1",
        "1.0a",
        "-1",
        " 1",
        "1 ",
        "1,0",
        "\u0661.\u0660",
        "1e3",
        "9" * 65,
    ],
)
def test_invalid_versions(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid version"):
        version_key(bad)


# --- signing -------------------------------------------------------------------


def test_generate_keypair_modes_and_no_overwrite(tmp_path: Path) -> None:
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(private, public)
    assert private.stat().st_mode & 0o777 == 0o600
    key = load_private_key(private)
    assert load_trusted_keys(tmp_path)[0] == key.public_key()
    before = private.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(private, tmp_path / "other.pub")
    assert private.read_bytes() == before
    assert not (tmp_path / "other.pub").exists()


def test_signatures_are_deterministic_and_checked() -> None:
    data = b'{"x": 1}\n'
    sig = sign(data, KEY)
    assert sig == sign(data, KEY)
    assert len(sig) == 64
    assert (
        verify_signature(data, sig, [OTHER_KEY.public_key(), KEY.public_key()]) == KEY.public_key()
    )
    with pytest.raises(PackageSignatureError):
        verify_signature(data + b" ", sig, [KEY.public_key()])


def test_load_trusted_keys_reads_pub_and_pem_only(tmp_path: Path) -> None:
    write_public_key(KEY, tmp_path / "a.pub")
    write_public_key(OTHER_KEY, tmp_path / "b.pem")
    (tmp_path / "README.md").write_text("not a key")
    write_private_key(fixed_key(3), tmp_path / "signing.key")  # ignored: not *.pub/*.pem
    assert load_trusted_keys(tmp_path) == [KEY.public_key(), OTHER_KEY.public_key()]


def test_load_trusted_keys_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad.pub").write_text(
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(KeyFileError, match=r"bad\.pub is not a PEM public key"):
        load_trusted_keys(tmp_path)
    (tmp_path / "bad.pub").unlink()
    write_private_key(KEY, tmp_path / "oops.pem")
    with pytest.raises(KeyFileError, match=r"oops\.pem holds a private key"):
        load_trusted_keys(tmp_path)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_trusted_keys(tmp_path / "missing")
    (tmp_path / "oops.pem").unlink()
    assert load_trusted_keys(tmp_path) == []


def test_load_private_key_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_private_key(tmp_path / "none.key")
    write_public_key(KEY, tmp_path / "pub.key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "pub.key")


# --- safe names (property test) ----------------------------------------------------

_ALPHABET = st.sampled_from(["a", "b", "é", ".", "..", "/", "\\", "\x00", "\n", " ", "-", "\ud800"])


@given(st.lists(_ALPHABET, max_size=12).map("".join) | st.text(max_size=30))
def test_split_relpath_accepts_only_names_that_stay_inside(name: str) -> None:
    try:
        parts = split_relpath(name)
    except ValueError:
        return
    assert "/".join(parts) == name
    assert not name.startswith("/")
    assert all(p not in ("", ".", "..") and "\\" not in p and "\x00" not in p for p in parts)
    base = "/srv/pkg"
    joined = posixpath.normpath(posixpath.join(base, name))
    assert joined.startswith(base + "/")
    assert joined == posixpath.join(base, name)  # already canonical
    name.encode("utf-8")


@given(
    st.lists(
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/\\"),
            min_size=1,
            max_size=20,
        ).filter(lambda c: c not in (".", "..")),
        min_size=1,
        max_size=5,
    )
)
def test_split_relpath_accepts_plain_names(parts: list[str]) -> None:
    assert split_relpath("/".join(parts)) == tuple(parts)


# --- the bundled model ---------------------------------------------------------------


def test_bundled_package_verifies_with_dev_keys_and_passes_golden(tmp_path: Path) -> None:
    archive = REPO / "models" / "wind-turbine-1.0.tar.gz"
    keys = load_trusted_keys(REPO / "models" / "dev-keys")
    dev_private = load_private_key(REPO / "models" / "dev-keys" / "windedge-dev.key")
    assert keys == [dev_private.public_key()]
    dest = tmp_path / "wind-turbine"
    manifest = extract_package(archive, dest, trusted_keys=keys)
    assert (manifest.name, manifest.version) == ("wind-turbine", "1.0")
    assert manifest.input_specs() == (TensorSpec("input", "float32", (-1, 6, 10, 10)),)
    assert manifest.output_specs() == (TensorSpec("output", "float32", (-1, 6, 10, 10)),)
    assert (manifest.golden.rtol, manifest.golden.atol) == (1e-4, 1e-4)
    assert np.load(dest / "golden" / "input.npy").shape == (8, 6, 10, 10)
    check_golden(dest, manifest)

    # trained: the block is the training run's own (its record beside the package)
    record = json.loads((REPO / "models" / "wind-turbine-1.0.training.json").read_text())
    block = manifest.preprocessing
    assert block == record["preprocessing"]
    assert set(block) == {
        "features",
        "raw_std",
        "mean",
        "std",
        "thresholds",
        "window",
        "step",
        "buffer",
        "wavelet",
        "max_level",
        "fault_groups",
    }
    assert block["features"] == ["roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage"]
    assert block["fault_groups"] == {"vibration": [0, 1, 2], "rotation": [3, 4], "voltage": [5]}
    assert (block["window"], block["step"], block["buffer"]) == (100, 10, 500)
    assert (block["wavelet"], block["max_level"]) == ("db6", 5)
    assert record["package"]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_bundled_preprocessing_block_is_what_the_daemon_parses() -> None:
    """Contract with edgeapp: the block parses and round-trips through the daemon's params."""
    from edgeapp.features import PreprocessingParams

    block = inspect_package(REPO / "models" / "wind-turbine-1.0.tar.gz").preprocessing
    params = PreprocessingParams.from_block(block)
    assert params.to_block() == block
    # statistics recomputed by training, not the seed statistics
    assert params.thresholds != PreprocessingParams.default().thresholds


def test_bundled_package_is_reproducible(tmp_path: Path) -> None:
    """Packaging its own contents again with the dev key reproduces the committed package.

    (Training reproducibility is tests/cloud/test_training.py's.) The expected
    output comes from ONNX Runtime, whose float kernels may round differently
    on another CPU: it must then agree within the golden tolerance, and where
    it is bit-identical (as on the machine that built the release) the whole
    tar stream must be too. The gzip layer is compared decompressed.
    """
    committed = REPO / "models" / "wind-turbine-1.0.tar.gz"
    keys = load_trusted_keys(REPO / "models/dev-keys")
    dest = tmp_path / "committed"
    theirs = extract_package(committed, dest, trusted_keys=keys)
    rebuilt = build_package(
        model_path=dest / "model.onnx",
        name="wind-turbine",
        version="1.0",
        preprocessing=theirs.preprocessing,
        golden_input=np.load(dest / "golden" / "input.npy"),
        signing_key=load_private_key(REPO / "models" / "dev-keys" / "windedge-dev.key"),
        out_path=tmp_path / "out",
        rtol=theirs.golden.rtol,
        atol=theirs.golden.atol,
    )
    ours = inspect_package(rebuilt)
    for name in ("model.onnx", "golden/input.npy"):
        assert ours.files[name] == theirs.files[name]
    assert ours.model_copy(update={"files": theirs.files}) == theirs
    if ours.files["golden/expected.npy"] == theirs.files["golden/expected.npy"]:
        assert gzip.decompress(rebuilt.read_bytes()) == gzip.decompress(committed.read_bytes())
    else:
        check_golden(dest, theirs)


def test_autoencoder_shapes_and_determinism(tmp_path: Path) -> None:
    from cloud.autoencoder import build_autoencoder_model, build_autoencoder_onnx

    model = build_autoencoder_model(seed=0)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    sides = [
        vi.type.tensor_type.shape.dim[2].dim_value
        for vi in inferred.graph.value_info
        if vi.name.endswith(".out")
    ]
    assert sides == [11, 12, 15, 12, 11]
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["N", 6, 10, 10]
    assert model.opset_import[0].version == 17
    a = build_autoencoder_onnx(tmp_path / "a.onnx", seed=0).read_bytes()
    b = build_autoencoder_onnx(tmp_path / "b.onnx", seed=0).read_bytes()
    c = build_autoencoder_onnx(tmp_path / "c.onnx", seed=1).read_bytes()
    assert a == b != c
