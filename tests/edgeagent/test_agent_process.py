"""The agent as a process: restart and restore, signals, its socket, sd_notify, config."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgeagent._proto import agent_pb2 as pb
from edgeagent.errors import AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError

Reference = Callable[[Path, np.ndarray[Any, Any]], np.ndarray[Any, Any]]


def windows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 6, 10, 10), dtype=np.float32)


def assert_predicts(agent: Any, name: str, model: Path, reference: Reference) -> None:
    x = windows(3, seed=31)
    np.testing.assert_allclose(
        agent.client.predict(name, x), reference(model, x), rtol=1e-5, atol=1e-5
    )


# -- restart ----------------------------------------------------------------------
def test_restart_after_sigkill_restores_models(
    start_agent: Any, packages: Any, short_tmp: Path, reference: Reference
) -> None:
    first = start_agent(base=short_tmp)
    first.client.load_model("wt", packages.v1)
    first.client.load_model("wt-next", packages.v2)
    first.kill()  # a crash: no cleanup at all, the socket file stays behind
    assert first.socket.exists()

    second = start_agent(base=short_tmp)  # same socket path and state directory
    listed = {m.name: m.url for m in second.client.list_models()}
    assert listed == {"wt": str(packages.v1), "wt-next": str(packages.v2)}
    assert_predicts(second, "wt", Path(packages.v1) / "model.onnx", reference)
    assert_predicts(second, "wt-next", packages.v2_model, reference)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_an_app_that_loads_at_start_survives_an_agent_restart(
    start_agent: Any, packages: Any, short_tmp: Path, reference: Reference, how: str
) -> None:
    """The original agent forgot its models on restart, so device apps call LoadModel at
    their start and treat any error as fatal: the first load of a restored model with
    the same url adopts it; after that a duplicate is ALREADY_EXISTS as in the original."""
    first = start_agent(base=short_tmp)
    stub = first.stub()
    stub.LoadModel(pb.LoadModelRequest(name="wt", url=str(packages.v1)), timeout=60)
    if how == "SIGTERM":
        assert first.terminate() == 0
    else:
        first.kill()

    second = start_agent(base=short_tmp)
    stub = second.stub()  # the app starts again: load, as it always does
    loaded = stub.LoadModel(pb.LoadModelRequest(name="wt", url=str(packages.v1)), timeout=60)
    assert (loaded.model.name, loaded.model.url) == ("wt", str(packages.v1))
    assert [list(t.shape) for t in loaded.model.input_tensor_metadatas] == [[-1, 6, 10, 10]]
    x = windows(2, seed=33)
    reply = stub.Predict(
        pb.PredictRequest(
            name="wt",
            tensors=[
                pb.Tensor(
                    tensor_metadata=loaded.model.input_tensor_metadatas[0], byte_data=x.tobytes()
                )
            ],
        ),
        timeout=30,
    )
    out = reply.tensors[0]
    np.testing.assert_allclose(
        np.frombuffer(out.byte_data, "<f4").reshape(tuple(out.tensor_metadata.shape)),
        reference(Path(packages.v1) / "model.onnx", x),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(grpc.RpcError) as again:  # adopted once: now a duplicate, as before
        stub.LoadModel(pb.LoadModelRequest(name="wt", url=str(packages.v1)), timeout=60)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    swapped = stub.LoadModel(pb.LoadModelRequest(name="wt", url=str(packages.v2)), timeout=60)
    assert swapped.model.url == str(packages.v2)  # another url is still a hot swap
    assert "restored model adopted" in second.output()


def test_a_restored_model_swapped_or_unloaded_is_not_adopted_later(
    start_agent: Any, packages: Any, short_tmp: Path
) -> None:
    first = start_agent(base=short_tmp)
    first.client.load_model("wt", packages.v1)
    first.client.load_model("other", packages.v1)
    first.kill()
    second = start_agent(base=short_tmp)
    second.client.load_model("wt", packages.v2)  # hot swap away from the restored one
    with pytest.raises(AlreadyExistsError):
        second.client.load_model("wt", packages.v2)
    second.client.unload_model("other")
    second.client.load_model("other", packages.v1)  # a fresh load after the unload
    with pytest.raises(AlreadyExistsError):
        second.client.load_model("other", packages.v1)


def test_sigterm_exits_zero_quickly(start_agent: Any, packages: Any) -> None:
    agent = start_agent()
    agent.client.load_model("wt", packages.v1)
    agent.client.predict("wt", windows(1))
    agent.close_clients()
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - started < 3.0
    assert "agent stopped" in agent.output()


def test_restore_skips_a_deleted_package(
    start_agent: Any, packages: Any, short_tmp: Path, reference: Reference
) -> None:
    gone = shutil.copytree(packages.v1, short_tmp / "pkg-gone")
    kept = shutil.copytree(packages.v2, short_tmp / "pkg-kept")
    first = start_agent(base=short_tmp)
    first.client.load_model("gone", gone)
    first.client.load_model("kept", kept)
    assert first.terminate() == 0
    shutil.rmtree(gone)

    second = start_agent(base=short_tmp)
    assert [m.name for m in second.client.list_models()] == ["kept"]
    assert_predicts(second, "kept", kept / "model.onnx", reference)
    assert "could not restore model" in second.output()
    persisted = json.loads((second.state_dir / "models.json").read_text())["models"]
    assert persisted == {"kept": str(kept)}


def test_unreadable_state_record_starts_empty(start_agent: Any, short_tmp: Path) -> None:
    (short_tmp / "state").mkdir()
    (short_tmp / "state" / "models.json").write_text("{ not json")
    agent = start_agent(base=short_tmp)
    assert agent.client.list_models() == []


# -- the socket ---------------------------------------------------------------------
def test_socket_is_created_0660(start_agent: Any) -> None:
    agent = start_agent()
    mode = agent.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_stale_socket_file_is_replaced(start_agent: Any, packages: Any, short_tmp: Path) -> None:
    path = short_tmp / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(path.lstat().st_mode)
    agent = start_agent(base=short_tmp)
    agent.client.load_model("wt", packages.v1)
    assert agent.client.predict("wt", windows(1)).shape == (1, 6, 10, 10)


def test_second_agent_on_a_live_socket_exits_and_the_first_keeps_serving(
    start_agent: Any, packages: Any, short_tmp: Path, reference: Reference
) -> None:
    first = start_agent()
    first.client.load_model("wt", packages.v1)
    second = start_agent(base=short_tmp, socket=first.socket, wait=False)
    code = second.wait(30)
    assert code != 0
    assert f"another agent is already serving on {first.socket}" in second.output()
    assert first.alive()
    assert first.client.health()
    assert_predicts(first, "wt", Path(packages.v1) / "model.onnx", reference)


def test_second_agent_leaves_the_first_agents_state_alone(
    start_agent: Any, packages: Any, short_tmp: Path
) -> None:
    first = start_agent(base=short_tmp)
    first.client.load_model("wt", packages.v1)
    record = first.state_dir / "models.json"
    written = record.stat().st_mtime_ns
    second = start_agent(base=short_tmp, wait=False)  # same socket, same state directory
    assert second.wait(30) != 0
    assert first.client.health()
    assert "model loaded" not in second.output()
    assert record.stat().st_mtime_ns == written


def test_a_file_that_is_not_a_socket_is_left_alone(start_agent: Any, short_tmp: Path) -> None:
    path = short_tmp / "agent.sock"
    path.write_text("precious")
    agent = start_agent(base=short_tmp, wait=False)
    assert agent.wait(30) != 0
    assert "not a socket" in agent.output()
    assert path.read_text() == "precious"


# -- sd_notify ----------------------------------------------------------------------
class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (with SO_PASSCRED)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[tuple[str, int]] = []  # (text, sender pid)

    def wait_for(self, line: str, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            for message, pid in self.messages:
                if line in message.splitlines():
                    return message, pid
            left = deadline - time.monotonic()
            assert left > 0, f"no {line} within {timeout}s; got {self.messages}"
            self.sock.settimeout(left)
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            self.messages.append((data.decode(), pid))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_address(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[tuple[str, str]]:
    """(address to bind, NOTIFY_SOCKET value): a path, or an abstract name ('@...')."""
    if request.param == "path":
        path = str(short_tmp / "notify.sock")
        yield path, path
    else:
        name = f"windedge-test-{uuid.uuid4().hex}"
        yield "\0" + name, "@" + name


def test_sd_notify_ready_when_serving_and_stopping_on_sigterm(
    start_agent: Any, notify_address: tuple[str, str]
) -> None:
    bind_to, env_value = notify_address
    listener = NotifyListener(bind_to)
    try:
        agent = start_agent(env={"NOTIFY_SOCKET": env_value}, wait=False)
        message, pid = listener.wait_for("READY=1", timeout=30)
        assert agent.client.health()  # ready means serving, already
        assert pid == agent.pid
        assert any(line.startswith("STATUS=") for line in message.splitlines())
        agent.close_clients()
        agent.signal(signal.SIGTERM)
        _, pid = listener.wait_for("STOPPING=1", timeout=10)
        assert pid == agent.pid
        assert agent.wait(10) == 0
        ready = [m for m, _ in listener.messages if "READY=1" in m.splitlines()]
        assert len(ready) == 1
    finally:
        listener.close()


# -- configuration, end to end --------------------------------------------------------
def test_toml_values_and_environment_override(start_agent: Any, packages: Any) -> None:
    agent = start_agent(
        config={"max_models": 1, "max_batch": 4, "golden_check": False},
        env={"WINDEDGE_AGENT_MAX_BATCH": "8", "WINDEDGE_AGENT_REQUIRE_SIGNATURE": "false"},
    )
    client = agent.client
    client.load_model("one", packages.v1)
    with pytest.raises(ResourceExhaustedError):  # max_models = 1, from the file
        client.load_model("two", packages.v2)
    assert client.predict("one", windows(8)).shape == (8, 6, 10, 10)  # 8, from the environment
    with pytest.raises(ResourceExhaustedError):
        client.predict("one", windows(9))
    client.load_model("one", packages.bad_golden)  # golden_check = false, from the file
    client.load_model("one", packages.unsigned)  # require_signature = false, from the environment
    assert client.describe_model("one").url == str(packages.unsigned)


def test_sagemaker_json_config_is_accepted(
    start_agent: Any, packages: Any, short_tmp: Path
) -> None:
    config = short_tmp / "sagemaker_edge_config.json"
    config.write_text(
        json.dumps(
            {
                "sagemaker_edge_core_device_name": "turbine-7",
                "sagemaker_edge_core_device_fleet_name": "farm-north",
                "sagemaker_edge_core_region": "eu-west-1",
                "sagemaker_edge_core_root_certs_path": "/agent/certificates/root",
                "sagemaker_edge_provider_aws_ca_cert_file": "/agent/iot/AmazonRootCA1.pem",
                "sagemaker_edge_provider_provider": "Aws",
                "sagemaker_edge_provider_s3_bucket_name": "my-bucket",
                "sagemaker_edge_core_capture_data_destination": "Disk",
                "sagemaker_edge_core_capture_data_buffer_size": 30,
                "sagemaker_edge_core_capture_data_batch_size": 10,
                "sagemaker_edge_core_capture_data_push_period_seconds": 4,
                "sagemaker_edge_core_folder_prefix": "demo-capture",
                "sagemaker_edge_log_verbose": False,
            }
        )
    )
    agent = start_agent(base=short_tmp, config=config)
    agent.client.load_model("wt", packages.v1)
    assert agent.client.predict("wt", windows(1)).shape == (1, 6, 10, 10)


@pytest.mark.parametrize(
    ("content", "env", "fragment"),
    [
        pytest.param('max_models = "lots"\n', {}, "max_models", id="wrong-type"),
        pytest.param("no_such_setting = 1\n", {}, "no_such_setting", id="unknown-key"),
        pytest.param("max_models = \n", {}, "invalid TOML", id="bad-toml"),
        pytest.param(
            '{"sagemaker_edge_core_no_such_key": 1}',
            {},
            "sagemaker_edge_core_no_such_key",
            id="unknown-sagemaker-key",
        ),
        pytest.param("", {"WINDEDGE_AGENT_MAX_MODELS": "0"}, "max_models", id="bad-env"),
        pytest.param(None, {}, "cannot read config file", id="missing-file"),
    ],
)
def test_invalid_config_exits_2_with_a_clear_message(
    start_agent: Any, short_tmp: Path, content: str | None, env: dict[str, str], fragment: str
) -> None:
    config = short_tmp / "agent.conf"
    if content is not None:
        config.write_text(content)
    agent = start_agent(base=short_tmp, config=config, env=env, wait=False)
    assert agent.wait(30) == 2
    output = agent.output()
    assert "Traceback" not in output
    (line,) = [ln for ln in output.splitlines() if ln.startswith("edge-agent:")]
    assert fragment in line
    assert not agent.socket.exists()


def test_bad_trusted_key_file_stops_the_start(start_agent: Any, short_tmp: Path) -> None:
    keys = short_tmp / "keys"
    keys.mkdir()
    (keys / "broken.pub").write_text("not a key")
    agent = start_agent(base=short_tmp, trusted_keys=keys, wait=False)
    assert agent.wait(30) == 1
    assert "broken.pub" in agent.output()


def test_no_trusted_keys_refuses_every_package(start_agent: Any, packages: Any) -> None:
    agent = start_agent(trusted_keys=Path("/nonexistent-windedge-keys"))
    with pytest.raises(PermissionDeniedError):
        agent.client.load_model("wt", packages.v1)


def test_sigterm_lets_in_flight_predictions_finish(
    start_agent: Any, packages: Any, reference: Reference
) -> None:
    agent = start_agent(config={"max_batch": 2048})
    agent.client.load_model("wt", packages.v1)
    x = windows(2000, seed=32)
    results: list[Any] = []

    def predict() -> None:
        try:
            results.append(agent.client.predict("wt", x))
        except Exception as exc:
            results.append(exc)

    worker = threading.Thread(target=predict)
    worker.start()
    time.sleep(0.25)  # the request has arrived and runs (one takes ~0.4 s)
    agent.signal(signal.SIGTERM)
    worker.join(30)
    assert agent.wait(10) == 0
    (result,) = results
    assert not isinstance(result, Exception), result
    np.testing.assert_allclose(
        result, reference(Path(packages.v1) / "model.onnx", x), rtol=1e-5, atol=1e-5
    )
