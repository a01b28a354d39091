"""The agent serves exactly the bytes it verified.

LoadModel reads each package file once, hashes those bytes, and builds the
ONNX Runtime session and the golden check from them. Someone who can write to
the package folder while LoadModel runs may make the load fail, never make a
model that is not the signed one serve.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.errors import AgentError, InvalidArgumentError
from edgeagent.package import load_verified_package, sign

Reference = Callable[[Path, np.ndarray[Any, Any]], np.ndarray[Any, Any]]
RACE_SECONDS = 4.0


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class Swapper:
    """Swaps model.onnx and golden/expected.npy between two pairs, atomically, in a loop."""

    def __init__(self, package: Path, side: Path, pairs: list[tuple[bytes, bytes]]) -> None:
        self.package = package
        self.side = side
        self.sources: list[tuple[Path, Path]] = []
        for i, (model, expected) in enumerate(pairs):
            m, e = side / f"model-{i}", side / f"expected-{i}"
            m.write_bytes(model)
            e.write_bytes(expected)
            self.sources.append((m, e))
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swapper")

    def _put(self, source: Path, target: Path) -> None:
        tmp = self.side / f"tmp-{target.name}"
        os.link(source, tmp)
        os.replace(tmp, target)  # same file system: atomic

    def _run(self) -> None:
        rng = random.Random(0)
        while not self._stop.is_set():
            for model, expected in self.sources:
                self._put(model, self.package / "model.onnx")
                self._put(expected, self.package / "golden" / "expected.npy")
                self.swaps += 1
                time.sleep(rng.uniform(0, 0.004))

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_files_swapped_during_load_never_serve(
    start_agent: Any, packages: Any, reference: Reference, tmp_path: Path
) -> None:
    package = tmp_path / "pkg"
    shutil.copytree(packages.v1, package)
    side = tmp_path / "side"
    side.mkdir()
    genuine = (
        (package / "model.onnx").read_bytes(),
        (package / "golden" / "expected.npy").read_bytes(),
    )
    # the tampered pair is self-consistent: another model and its own output on
    # the golden input, so the golden check alone cannot tell it apart
    golden_input = np.load(package / "golden" / "input.npy")
    tampered_expected = reference(packages.v2_model, golden_input)
    tampered = (packages.v2_model.read_bytes(), _npy(tampered_expected))

    x = np.random.default_rng(11).standard_normal((2, 6, 10, 10), dtype=np.float32)
    want = reference(packages.v1 / "model.onnx", x)
    evil = reference(packages.v2_model, x)
    assert not np.allclose(want, evil, rtol=1e-3, atol=1e-3)

    agent = start_agent()
    served_genuine = served_tampered = failed = 0
    with Swapper(package, side, [tampered, genuine]) as swapper:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            try:
                agent.client.load_model("race", package)
            except AgentError:
                failed += 1
                continue
            out = agent.client.predict("race", x)
            if np.allclose(out, want, rtol=1e-4, atol=1e-4):
                served_genuine += 1
            else:
                served_tampered += 1
            agent.client.unload_model("race")
    assert swapper.swaps > 100
    assert served_tampered == 0, (
        f"a tampered model served in {served_tampered} of "
        f"{served_tampered + served_genuine} successful loads"
    )
    assert served_genuine >= 3, (served_genuine, failed)  # the race ran with real loads
    assert failed >= 1, "the swaps never hit a load: the test proved nothing"
    assert agent.alive()


def test_verified_bytes_are_what_the_caller_gets(
    packages: Any, dev_key: Any, tmp_path: Path
) -> None:
    """Changing the files after verification changes nothing in the verified package."""
    package = tmp_path / "pkg"
    shutil.copytree(packages.v1, package)
    verified = load_verified_package(package, trusted_keys=[dev_key.public_key()])
    genuine_model = (package / "model.onnx").read_bytes()
    (package / "model.onnx").write_bytes(packages.v2_model.read_bytes())
    assert verified.model_bytes == genuine_model
    assert verified.files["model.onnx"] == genuine_model
    golden_input, expected = verified.golden_arrays()
    assert golden_input.shape == expected.shape == (golden_input.shape[0], 6, 10, 10)
    assert verified.manifest.version == "1.0"


def test_agent_refuses_hostile_models_and_deep_manifests(
    start_agent: Any, packages: Any, dev_key: Any, resign: Any, tmp_path: Path
) -> None:
    """Our own checks answer INVALID_ARGUMENT, and the agent keeps serving."""
    from onnx import TensorProto, helper

    agent = start_agent()
    custom = tmp_path / "custom"
    shutil.copytree(packages.v1, custom)
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["input"], ["output"], domain="com.microsoft")],
        "contrib",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, 10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6, 10, 10])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    (custom / "model.onnx").write_bytes(model.SerializeToString())
    resign(custom, dev_key)
    with pytest.raises(InvalidArgumentError, match=r"com\.microsoft"):
        agent.client.load_model("custom", custom)

    deep = tmp_path / "deep"
    shutil.copytree(packages.v1, deep)
    data = (deep / "manifest.json").read_bytes()
    nested = b'"deep": ' + b"[" * 200_000 + b"]" * 200_000 + b", "
    data = data.replace(b'"preprocessing": {', b'"preprocessing": {' + nested, 1)
    assert b"[[[[" in data
    (deep / "manifest.json").write_bytes(data)
    (deep / "manifest.sig").write_bytes(sign(data, dev_key))
    with pytest.raises(InvalidArgumentError, match="nested deeper than"):
        agent.client.load_model("deep", deep)

    assert agent.client.load_model("fine", packages.v1).name == "fine"
    assert agent.alive()
