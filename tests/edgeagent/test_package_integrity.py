"""What a signed package may hold, checked by our own code before anything runs it.

- the model: no external data, no operator outside the standard ONNX domains,
  no tensor whose declared size differs from its data (refused by the package
  API itself, not by whichever ONNX Runtime is installed);
- the manifest: bounded in size and nesting depth;
- the archive: one gzip stream holding one tar, nothing after either;
- the version that counts is the signed manifest's, not the file name's.

Every hostile package carries a genuine signature: an attacker who can sign
(or who replays a signed manifest) must still be refused.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest_package import (
    GENUINE_FILES,
    REPO,
    build_tiny,
    fixed_key,
    genuine_body,
    manifest_for,
    signed_head,
    tree,
    write_signed_dir,
    write_tar,
)
from onnx import TensorProto, helper, numpy_helper

from edgeagent.package import (
    Manifest,
    ModelLoadError,
    PackageInvalidError,
    PackageVersionError,
    check_onnx_model,
    extract_package,
    install_package,
    load_public_key,
    load_verified_package,
    sign,
    verify_package_archive,
    verify_package_dir,
)

KEY = fixed_key(7)
KEYS = [KEY.public_key()]
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = [load_public_key(REPO / "models" / "dev-keys" / "windedge-dev.pub")]


# --- hostile models ---------------------------------------------------------------------


def _model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto] | None = None,
    *,
    extra_opsets: list[onnx.OperatorSetIdProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=initializers or [],
    )
    opsets = [helper.make_opsetid("", 17), *(extra_opsets or [])]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _add_initializer(tensor: onnx.TensorProto) -> onnx.ModelProto:
    return _model([helper.make_node("Add", ["x", tensor.name], ["y"])], [tensor])


def external_initializer() -> bytes:
    tensor = numpy_helper.from_array(np.ones(3, dtype=np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/hostname"
    return _add_initializer(tensor).SerializeToString()


def external_constant_in_subgraph() -> bytes:
    """External data hidden in a Constant node inside an If branch."""
    tensor = numpy_helper.from_array(np.ones(3, dtype=np.float32), "c")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=tensor)],
        "branch",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["x", "z"], ["y"]),
    ]
    return _model(nodes, [cond]).SerializeToString()


def custom_domain(domain: str, op: str) -> Callable[[], bytes]:
    def make() -> bytes:
        node = helper.make_node(op, ["x"], ["y"], domain=domain)
        return _model([node], extra_opsets=[helper.make_opsetid(domain, 1)]).SerializeToString()

    return make


def custom_op_in_loop_body() -> bytes:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Evil", ["v_in"], ["v_out"], domain="com.example"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 3]),
        ],
    )
    inits = [
        numpy_helper.from_array(np.array(1, dtype=np.int64), "n"),
        numpy_helper.from_array(np.array(True), "t"),
    ]
    node = helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body)
    return _model(
        [node], inits, extra_opsets=[helper.make_opsetid("com.example", 1)]
    ).SerializeToString()


def short_raw_data() -> bytes:
    """Declares 1,000,000 floats, carries 12 bytes."""
    tensor = numpy_helper.from_array(np.ones(3, dtype=np.float32), "w")
    del tensor.dims[:]
    tensor.dims.extend([1_000_000])
    return _add_initializer(tensor).SerializeToString()


def long_float_data() -> bytes:
    """Declares 3 floats in float_data, carries 5."""
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0] * 3)
    tensor.float_data.extend([1.0, 1.0])
    return _add_initializer(tensor).SerializeToString()


def wrong_field() -> bytes:
    """A float tensor whose values sit in int64_data."""
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    tensor.ClearField("float_data")
    tensor.int64_data.extend([1, 2, 3])
    return _add_initializer(tensor).SerializeToString()


def negative_dim() -> bytes:
    tensor = numpy_helper.from_array(np.ones(3, dtype=np.float32), "w")
    del tensor.dims[:]
    tensor.dims.extend([-1, -3])
    return _add_initializer(tensor).SerializeToString()


def sparse_initializer_mismatch() -> bytes:
    values = numpy_helper.from_array(np.ones(2, dtype=np.float32), "w")
    indices = numpy_helper.from_array(np.array([0, 1, 2], dtype=np.int64), "w_idx")
    values_short = onnx.TensorProto()
    values_short.CopyFrom(values)
    del values_short.dims[:]
    values_short.dims.extend([3])  # three values declared, two carried
    sparse = helper.make_sparse_tensor(values_short, indices, [3])
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])])
    model.graph.sparse_initializer.append(sparse)
    return model.SerializeToString()


HOSTILE_MODELS: list[Any] = [
    pytest.param(external_initializer, "external data", id="external-initializer"),
    pytest.param(external_constant_in_subgraph, "external data", id="external-in-subgraph"),
    pytest.param(custom_domain("com.microsoft", "Gelu"), "com.microsoft", id="ort-contrib-op"),
    pytest.param(custom_domain("com.example", "Evil"), "com.example", id="custom-domain"),
    pytest.param(custom_op_in_loop_body, "com.example", id="custom-op-in-loop-body"),
    pytest.param(short_raw_data, "4000000 bytes", id="raw-data-too-short"),
    pytest.param(long_float_data, "5 values", id="float-data-too-long"),
    pytest.param(wrong_field, "int64_data", id="data-in-the-wrong-field"),
    pytest.param(negative_dim, "negative", id="negative-dimension"),
    pytest.param(sparse_initializer_mismatch, "holds 8 bytes", id="sparse-values-mismatch"),
]


def _files_with(model: bytes) -> dict[str, bytes]:
    return {**GENUINE_FILES, "model.onnx": model}


@pytest.mark.parametrize(("make", "match"), HOSTILE_MODELS)
def test_hostile_model_refused_by_our_own_check(
    make: Callable[[], bytes], match: str, tmp_path: Path
) -> None:
    model = make()
    with pytest.raises(PackageInvalidError, match=match):
        check_onnx_model(model)

    # an unpacked package, signed: the agent's load-time verification
    root = write_signed_dir(tmp_path / "pkg", _files_with(model), KEY)
    with pytest.raises(PackageInvalidError, match=match):
        verify_package_dir(root, trusted_keys=KEYS)
    with pytest.raises(PackageInvalidError, match=match):
        load_verified_package(root, trusted_keys=KEYS)

    # an archive, signed: the OTA updater's verification writes nothing
    files = _files_with(model)
    archive = write_tar(
        tmp_path / "a.tar.gz", signed_head(manifest_for(files), KEY) + genuine_body(files)
    )
    with pytest.raises(PackageInvalidError, match=match):
        verify_package_archive(archive, trusted_keys=KEYS)
    before = tree(tmp_path)
    with pytest.raises(PackageInvalidError, match=match):
        extract_package(archive, tmp_path / "dest", trusted_keys=KEYS)
    assert tree(tmp_path) == before


def test_standard_models_pass_our_check() -> None:
    check_onnx_model(GENUINE_FILES["model.onnx"])
    check_onnx_model(custom_domain("ai.onnx.ml", "Normalizer")())
    check_onnx_model(custom_domain("ai.onnx", "Relu")())
    with tarfile.open(BUNDLED) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None
        check_onnx_model(member.read())
    # every tensor type numpy_helper can encode, in raw_data and in typed fields
    for dtype in (np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32,
                  np.int64, np.uint32, np.uint64, np.bool_, np.float16, np.complex64):  # fmt: skip
        array = np.arange(6).reshape(2, 3).astype(dtype)
        raw = numpy_helper.from_array(array, "w")
        typed = helper.make_tensor(
            "w", helper.np_dtype_to_tensor_dtype(array.dtype), [2, 3], array.flatten().tolist()
        )
        for tensor in (raw, typed):
            check_onnx_model(_add_initializer(tensor).SerializeToString())
    strings = helper.make_tensor("w", TensorProto.STRING, [2], [b"a", b"b"])
    check_onnx_model(_add_initializer(strings).SerializeToString())


def test_a_model_that_is_not_onnx_cannot_load() -> None:
    """Not an ONNX file at all: a model that cannot load (FAILED_PRECONDITION), said plainly."""
    for junk in (b"this is not an ONNX model\n" * 10, b"\xff" * 64, b""):
        with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
            check_onnx_model(junk)


# --- bounded manifest parsing -------------------------------------------------------------


def deep_manifest(depth: int) -> bytes:
    data = json.loads(manifest_for(GENUINE_FILES).to_json_bytes())
    text = json.dumps(data)
    nested = "[" * depth + "]" * depth
    return text.replace('"preprocessing": {}', f'"preprocessing": {{"deep": {nested}}}').encode()


@pytest.mark.parametrize("depth", [65, 200_000])
def test_deeply_nested_manifest_is_invalid(depth: int, tmp_path: Path) -> None:
    data = deep_manifest(depth)
    assert b'"deep"' in data
    with pytest.raises(PackageInvalidError, match="nested deeper than"):
        Manifest.from_json_bytes(data)
    head = [
        (info, data if info.name == "manifest.json" else sign(data, KEY))
        for info, _ in signed_head(manifest_for(GENUINE_FILES), KEY)
    ]
    head[0][0].size = len(data)
    archive = write_tar(tmp_path / "deep.tar.gz", head + genuine_body())
    with pytest.raises(PackageInvalidError, match="nested deeper than"):
        verify_package_archive(archive, trusted_keys=KEYS)


def test_nesting_inside_strings_does_not_count() -> None:
    data = json.loads(manifest_for(GENUINE_FILES).to_json_bytes())
    data["preprocessing"] = {"note": "[" * 10_000 + '{\\"', "deep": [[[[1]]]]}
    manifest = Manifest.from_json_bytes(json.dumps(data).encode())
    assert manifest.preprocessing["deep"] == [[[[1]]]]


# --- the archive is one gzip stream holding one tar -------------------------------------


def _refused(path: Path, match: str, tmp_path: Path) -> None:
    with pytest.raises(PackageInvalidError, match=match):
        verify_package_archive(path, trusted_keys=DEV_KEYS)
    dest = tmp_path / "dest"
    before = tree(tmp_path)
    with pytest.raises(PackageInvalidError, match=match):
        extract_package(path, dest, trusted_keys=DEV_KEYS)
    assert tree(tmp_path) == before


def test_garbage_after_the_gzip_stream_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "wind-turbine-1.0.tar.gz"
    bad.write_bytes(BUNDLED.read_bytes() + b"GARBAGE" * 10)
    _refused(bad, "after the end of its gzip stream", tmp_path)


def test_second_gzip_member_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "wind-turbine-1.0.tar.gz"
    bad.write_bytes(BUNDLED.read_bytes() + gzip.compress(b"\0" * 1024))
    _refused(bad, "after the end of its gzip stream", tmp_path)


def test_second_tar_after_end_of_archive_is_refused(tmp_path: Path) -> None:
    tar_bytes = gzip.decompress(BUNDLED.read_bytes())
    extra = tmp_path / "extra.tar"
    with tarfile.open(extra, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("evil.txt")
        payload = b"appended after the end-of-archive marker\n"
        info.size = len(payload)
        tar.addfile(info, __import__("io").BytesIO(payload))
    bad = tmp_path / "wind-turbine-1.0.tar.gz"
    bad.write_bytes(gzip.compress(tar_bytes + extra.read_bytes(), mtime=0))
    extra.unlink()
    _refused(bad, "after the end of the tar archive", tmp_path)


def test_corrupt_gzip_trailer_is_refused(tmp_path: Path) -> None:
    for offset, what in ((-8, "data check"), (-3, "length check")):
        data = bytearray(BUNDLED.read_bytes())
        data[offset] ^= 0x01
        bad = tmp_path / "wind-turbine-1.0.tar.gz"
        bad.write_bytes(bytes(data))
        _refused(bad, what, tmp_path)
        bad.unlink()


def test_zero_padding_to_a_full_record_is_fine(tmp_path: Path) -> None:
    tar_bytes = gzip.decompress(BUNDLED.read_bytes())
    padded = tmp_path / "wind-turbine-1.0.tar.gz"
    padded.write_bytes(gzip.compress(tar_bytes + b"\0" * 20 * 512, mtime=0))
    assert verify_package_archive(padded, trusted_keys=DEV_KEYS).version == "1.0"


# --- the signed version is the one that counts ----------------------------------------------


@pytest.fixture
def misnamed(tmp_path: Path) -> Path:
    """A genuine signed tiny 0.9 package, renamed as if it were 2.0."""
    real = build_tiny(tmp_path / "build", KEY, version="0.9")
    fake = tmp_path / "tiny-2.0.tar.gz"
    shutil.move(real, fake)
    return fake


def test_the_api_reports_the_signed_version_not_the_file_name(
    misnamed: Path, tmp_path: Path
) -> None:
    assert verify_package_archive(misnamed, trusted_keys=KEYS).version == "0.9"
    installed = install_package(misnamed, tmp_path / "models", trusted_keys=KEYS)
    assert (installed.manifest.name, installed.manifest.version) == ("tiny", "0.9")
    assert installed.path == tmp_path / "models" / "tiny" / "0.9"
    assert verify_package_dir(installed.path, trusted_keys=KEYS).version == "0.9"
    assert not (tmp_path / "models" / "tiny" / "2.0").exists()


def test_install_refuses_a_version_other_than_expected(misnamed: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    with pytest.raises(PackageVersionError, match=r"signed version 0\.9.*expected 2\.0"):
        install_package(misnamed, root, trusted_keys=KEYS, expected_version="2.0")
    with pytest.raises(PackageVersionError, match=r"signed name 'tiny'.*expected 'wind-turbine'"):
        install_package(misnamed, root, trusted_keys=KEYS, expected_name="wind-turbine")
    assert not root.exists() or not any(root.rglob("*"))
    # 2.0 == 2.0.0: versions compare as versions
    ok = install_package(misnamed, root, trusted_keys=KEYS, expected_version="0.9.0")
    assert ok.manifest.version == "0.9"


def test_install_refuses_a_downgrade_unless_allowed(misnamed: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for current in ("1.0", "0.9", "0.10"):
        with pytest.raises(PackageVersionError, match="not newer than the installed"):
            install_package(misnamed, root, trusted_keys=KEYS, installed_version=current)
    assert not root.exists() or not any(root.rglob("*"))
    installed = install_package(
        misnamed, root, trusted_keys=KEYS, installed_version="1.0", allow_downgrade=True
    )
    assert installed.manifest.version == "0.9"
    newer = install_package(
        build_tiny(tmp_path / "b2", KEY, version="1.1"), root, trusted_keys=KEYS,
        installed_version="1.0",
    )  # fmt: skip
    assert newer.path == root / "tiny" / "1.1"
