"""Shared fixtures: real ``edge-agent`` processes on temporary Unix sockets, keys, packages.

Every agent a test starts is a child process in its own process group, with
its own socket and state directory under a short ``/tmp`` directory (Unix
socket paths are limited to 107 bytes, pytest's ``tmp_path`` can be longer).
The fixture that started it stops it: SIGTERM, then SIGKILL of the whole group
if it does not exit, even when the test failed half-way.

Packages: the bundled ``wind-turbine-1.0`` unpacked once per session, plus the
variants the agent tests need (another version, a broken golden output, a
model ONNX Runtime cannot load, tampered, unsigned, signed by an untrusted
key, with an unlisted file or a link out of the package), built once per
session with ``edgeagent.package.build_package``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgeagent.client import AgentClient
from edgeagent.package import (
    Manifest,
    build_package,
    extract_package,
    load_private_key,
    load_public_key,
    sign,
)
from tests.harness import read_log, short_dir, toml_text
from tests.localcloud import local_cloud, new_thing, start_local_cloud  # noqa: F401 - shared fixtures

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = REPO / "models" / "dev-keys"
DEV_PRIVATE_KEY = DEV_KEYS / "windedge-dev.key"
DEV_PUBLIC_KEY = DEV_KEYS / "windedge-dev.pub"
AGENT = [sys.executable, "-m", "edgeagent"]
START_TIMEOUT = 30.0
MAX_MESSAGE = 64 * 1024 * 1024

# variables of the test environment that must not leak into an agent
_SCRUBBED_PREFIXES = ("WINDEDGE_", "NOTIFY_SOCKET", "WATCHDOG_")


@dataclass
class Agent:
    """A running ``edge-agent`` child process and a typed client connected to it."""

    proc: subprocess.Popen[bytes]
    socket: Path
    state_dir: Path
    log: Path
    client: AgentClient
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the agent wrote to stdout and stderr so far."""
        return read_log(self.log)

    def channel(self) -> grpc.Channel:
        """A raw channel (closed with the agent), with the agent's message limits."""
        channel = grpc.insecure_channel(
            f"unix://{self.socket}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.AgentStub:
        return pb_grpc.AgentStub(self.channel())

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_clients(self) -> None:
        self.client.close()
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; SIGKILL the group when it does not exit. Returns the exit code."""
        self.close_clients()
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"agent {self.pid} ignored SIGTERM for {timeout}s:\n{self.output()[-4000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the agent's whole process group and reap it."""
        self.close_clients()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)


StartAgent = Callable[..., Agent]


def spawn_agent(
    *,
    base: Path,
    socket: Path | None = None,
    state_dir: Path | None = None,
    trusted_keys: Path | None,
    config: Mapping[str, Any] | str | Path | None = None,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    wait: bool = True,
) -> Agent:
    """Start ``edge-agent`` as a child in its own process group.

    ``config``: a mapping (written as TOML), literal file text, or a path.
    ``wait``: block until the health check answers SERVING (raise with the
    agent's output if it exits or does not answer in time).
    """
    socket = socket or base / "agent.sock"
    state_dir = state_dir or base / "state"
    argv = [*AGENT, "--socket", str(socket), "--state-dir", str(state_dir)]
    if trusted_keys is not None:
        argv += ["--trusted-keys", str(trusted_keys)]
    if config is not None:
        if isinstance(config, Path):
            conf_path = config
        else:
            conf_path = base / f"agent-{time.monotonic_ns()}.toml"
            conf_path.write_text(config if isinstance(config, str) else toml_text(config))
        argv += ["--config", str(conf_path)]
    argv += args or []
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    log = base / f"agent-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=base,
            start_new_session=True,
        )
    agent = Agent(
        proc=proc,
        socket=socket,
        state_dir=state_dir,
        log=log,
        client=AgentClient(socket, timeout=60.0),
    )
    if wait:
        try:
            wait_serving(agent)
        except BaseException:
            agent.kill()
            raise
    return agent


def wait_serving(agent: Agent, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not agent.alive():
            raise AssertionError(
                f"agent exited with {agent.proc.returncode} before serving:\n"
                f"{agent.output()[-4000:]}"
            )
        if agent.socket.exists() and agent.client.health():
            return
        time.sleep(0.05)
    raise AssertionError(f"agent not serving after {timeout}s:\n{agent.output()[-4000:]}")


def stop_all(agents: list[Agent]) -> None:
    for agent in agents:
        if agent.alive():
            # if it had to be killed, the test's own assertions say what went wrong
            with contextlib.suppress(AssertionError):
                agent.terminate(10.0)
        else:
            agent.close_clients()
            agent.proc.wait()


# -- keys ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def dev_key() -> Ed25519PrivateKey:
    """The development signing key of the bundled package."""
    return load_private_key(DEV_PRIVATE_KEY)


@pytest.fixture(scope="session")
def other_key() -> Ed25519PrivateKey:
    """A key no agent trusts (deterministic: tests only)."""
    return Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)


@pytest.fixture(scope="session")
def trusted_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the development public key."""
    folder = tmp_path_factory.mktemp("trusted-keys")
    shutil.copyfile(DEV_PUBLIC_KEY, folder / DEV_PUBLIC_KEY.name)
    return folder


# -- packages -----------------------------------------------------------------
@pytest.fixture(scope="session")
def bundled_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled wind-turbine 1.0 package, verified and unpacked."""
    dest = tmp_path_factory.mktemp("bundled") / "wind-turbine-1.0"
    extract_package(BUNDLED, dest, trusted_keys=[load_public_key(DEV_PUBLIC_KEY)])
    return dest


@dataclass(frozen=True)
class Packages:
    """Unpacked package directories, one per case."""

    v1: Path  # the bundled wind-turbine 1.0
    v1_copy: Path  # the same package in another directory (a different url)
    v2: Path  # wind-turbine 2.0: other weights (seed 1)
    v2_model: Path  # its model.onnx, for in-process reference outputs
    bad_golden: Path  # 3.0: expected output does not match the model
    unloadable: Path  # 4.0: signed and hashed, but model.onnx is not an ONNX model
    bad_framework: Path  # manifest says framework "tensorflow" (signed)
    invalid_manifest: Path  # manifest.json is not a valid manifest (signed)
    tampered: Path  # model.onnx changed after signing (same size)
    unsigned: Path  # manifest.sig removed
    untrusted: Path  # signed by a key no agent trusts
    unlisted_file: Path  # an extra file the manifest does not list
    symlink_out: Path  # golden/ is a symlink to ../<another package>/golden
    large: Path  # a model with a 64 MB initializer: a slow load
    golden_input: np.ndarray[Any, Any]


def _copy_package(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _resign(package: Path, key: Ed25519PrivateKey, **changes: Any) -> None:
    """Rewrite manifest.json with ``changes`` (and fresh file hashes) and sign it again."""
    from edgeagent.package import FileEntry, sha256_of

    manifest = Manifest.from_json_bytes((package / "manifest.json").read_bytes())
    files = {}
    for name in manifest.files:
        path = package.joinpath(*name.split("/"))
        files[name] = FileEntry(sha256=sha256_of(path), size=path.stat().st_size)
    data = manifest.model_copy(update={"files": files, **changes}).to_json_bytes()
    (package / "manifest.json").write_bytes(data)
    (package / "manifest.sig").write_bytes(sign(data, key))


@pytest.fixture(scope="session")
def resign() -> Callable[..., None]:
    """``resign(package_dir, key, **manifest changes)``: fresh hashes, signed again."""
    return _resign


def _large_onnx(path: Path, megabytes: int) -> Path:
    """input [N, 6, 10, 10] -> input + 0 * sum(big): a model that is slow to load."""
    from onnx import TensorProto, helper, numpy_helper

    big = np.full(megabytes * 1024 * 1024 // 4, 1e-3, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["input", "nothing"], ["output"]),
        ],
        "large",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, 10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6, 10, 10])],
        initializer=[
            numpy_helper.from_array(big, "big"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="session")
def packages(
    tmp_path_factory: pytest.TempPathFactory,
    bundled_package: Path,
    dev_key: Ed25519PrivateKey,
    other_key: Ed25519PrivateKey,
) -> Packages:
    from cloud.autoencoder import build_autoencoder_onnx, default_preprocessing_block

    root = tmp_path_factory.mktemp("packages")
    src = root / "src"
    src.mkdir()
    golden = np.random.default_rng(5).standard_normal((4, 6, 10, 10), dtype=np.float32)
    pre = default_preprocessing_block()

    def build(version: str, model: Path, key: Ed25519PrivateKey = dev_key, **kw: Any) -> Path:
        archive = build_package(
            model_path=model,
            name="wind-turbine",
            version=version,
            preprocessing=pre,
            golden_input=golden,
            signing_key=key,
            out_path=root / "archives",
            **kw,
        )
        dest = root / f"wind-turbine-{version}-{key is dev_key}"
        extract_package(archive, dest, trusted_keys=[key.public_key()], require_signature=True)
        return dest

    v2_model = build_autoencoder_onnx(src / "v2.onnx", seed=1)
    v2 = build("2.0", v2_model)
    bad_golden = build("3.0", v2_model, golden_expected=np.ones((4, 6, 10, 10), dtype=np.float32))

    unloadable = _copy_package(v2, root / "unloadable")
    (unloadable / "model.onnx").write_bytes(b"this is not an ONNX model\n" * 10)
    _resign(unloadable, dev_key, version="4.0")

    bad_framework = _copy_package(bundled_package, root / "bad-framework")
    raw = json.loads((bad_framework / "manifest.json").read_bytes())
    raw["framework"] = "tensorflow"
    data = json.dumps(raw, indent=2, sort_keys=True).encode()
    (bad_framework / "manifest.json").write_bytes(data)
    (bad_framework / "manifest.sig").write_bytes(sign(data, dev_key))

    invalid_manifest = _copy_package(bundled_package, root / "invalid-manifest")
    data = b'{"format_version": 1, "name": "wind-turbine"}'
    (invalid_manifest / "manifest.json").write_bytes(data)
    (invalid_manifest / "manifest.sig").write_bytes(sign(data, dev_key))

    tampered = _copy_package(bundled_package, root / "tampered")
    model = bytearray((tampered / "model.onnx").read_bytes())
    model[-100] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(model))

    unsigned = _copy_package(bundled_package, root / "unsigned")
    (unsigned / "manifest.sig").unlink()

    untrusted = build("2.0", v2_model, key=other_key)

    unlisted_file = _copy_package(bundled_package, root / "unlisted-file")
    (unlisted_file / "golden" / "extra.npy").write_bytes(b"not listed")

    symlink_out = _copy_package(bundled_package, root / "symlink-out")
    shutil.rmtree(symlink_out / "golden")
    (symlink_out / "golden").symlink_to("../unsigned/golden")

    large = build("9.0", _large_onnx(src / "large.onnx", 64))

    v1_copy = _copy_package(bundled_package, root / "v1-copy")
    shutil.rmtree(root / "archives")  # unpacked copies are all the tests use
    return Packages(
        v1=bundled_package,
        v1_copy=v1_copy,
        v2=v2,
        v2_model=v2 / "model.onnx",
        bad_golden=bad_golden,
        unloadable=unloadable,
        bad_framework=bad_framework,
        invalid_manifest=invalid_manifest,
        tampered=tampered,
        unsigned=unsigned,
        untrusted=untrusted,
        unlisted_file=unlisted_file,
        symlink_out=symlink_out,
        large=large,
        golden_input=golden,
    )


def reference_output(model: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The model's output on ``x`` in-process (ONNX Runtime, one thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out: np.ndarray[Any, Any] = session.run(None, {name: x})[0]
    return out


@pytest.fixture(scope="session")
def reference() -> Callable[[Path, np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """In-process ONNX Runtime output of a model file."""
    return reference_output


# -- agents -------------------------------------------------------------------
@contextlib.contextmanager
def _agent_factory(trusted_keys: Path) -> Iterator[StartAgent]:
    started: list[Agent] = []
    dirs: list[Path] = []

    def start(**kwargs: Any) -> Agent:
        base = kwargs.pop("base", None)
        if base is None:
            base = short_dir()
            dirs.append(base)
        kwargs.setdefault("trusted_keys", trusted_keys)
        agent = spawn_agent(base=base, **kwargs)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        stop_all(started)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_agent(trusted_keys: Path) -> Iterator[StartAgent]:
    """``start_agent(**spawn_agent kwargs) -> Agent``; every agent ends with the test.

    ``base=`` chooses the directory for socket/state/log (default: a new short
    one, removed afterwards).
    """
    with _agent_factory(trusted_keys) as start:
        yield start


@pytest.fixture(scope="module")
def module_agent_factory(trusted_keys: Path) -> Iterator[StartAgent]:
    """Like ``start_agent``, for agents shared by a whole test module."""
    with _agent_factory(trusted_keys) as start:
        yield start


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (socket paths), removed afterwards."""
    path = short_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
