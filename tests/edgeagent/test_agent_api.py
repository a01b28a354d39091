"""The Edge Agent API over a real agent's Unix socket: every RPC, every error status.

One agent serves the whole module (the bundled wind-turbine 1.0 as ``wt``,
``max_batch`` raised to 2048 so that a 4.8 MB request is legal); after every
test an autouse check proves it still answers health checks and a valid
Predict, so each error case below is also a "the agent keeps serving" case.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sysv_ipc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgeagent.client import AgentClient
from edgeagent.errors import NotFoundError

MAX_BATCH = 2048
ROW = 6 * 10 * 10 * 4  # bytes of one float32 [6, 10, 10] window
CODE = grpc.StatusCode

Reference = Callable[[Path, np.ndarray[Any, Any]], np.ndarray[Any, Any]]


def windows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 6, 10, 10), dtype=np.float32)


def tensor(
    data: bytes | pb.SharedMemoryHandle,
    shape: list[int],
    *,
    dtype: int = pb.FLOAT32,
    name: str = "input",
) -> pb.Tensor:
    t = pb.Tensor(tensor_metadata=pb.TensorMetadata(name=name, shape=shape))
    t.tensor_metadata.data_type = dtype  # type: ignore[assignment]  # unknown values on purpose
    if isinstance(data, pb.SharedMemoryHandle):
        t.shared_memory_handle.CopyFrom(data)
    else:
        t.byte_data = data
    return t


def call(method: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, Any]:
    """(status, detail, response) of a unary call."""
    try:
        response = method(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None  # type: ignore[attr-defined]  # a grpc.Call
    return CODE.OK, "", response


def decode(t: pb.Tensor) -> np.ndarray[Any, Any]:
    return np.frombuffer(t.byte_data, dtype="<f4").reshape(tuple(t.tensor_metadata.shape))


# -- fixtures -------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent(module_agent_factory: Any, packages: Any) -> Any:
    agent = module_agent_factory(config={"max_batch": MAX_BATCH})
    agent.client.load_model("wt", packages.v1)
    return agent


@pytest.fixture(scope="module")
def stub(agent: Any) -> pb_grpc.AgentStub:
    return agent.stub()


@pytest.fixture(scope="module")
def v1_model(packages: Any) -> Path:
    return Path(packages.v1) / "model.onnx"


@pytest.fixture(autouse=True)
def still_serving(
    request: pytest.FixtureRequest, agent: Any, v1_model: Path, reference: Reference
) -> Iterator[None]:
    """After every test: the agent is alive, healthy and predicts correctly on ``wt``."""
    yield
    assert agent.alive(), agent.output()[-3000:]
    assert agent.client.health()
    x = windows(2, seed=99)
    np.testing.assert_allclose(
        agent.client.predict("wt", x), reference(v1_model, x), rtol=1e-5, atol=1e-5
    )


class Segments:
    """SysV segments made the way device applications make them; removed at teardown."""

    def __init__(self) -> None:
        self.made: list[sysv_ipc.SharedMemory] = []

    def make(self, data: bytes, *, size: int | None = None) -> sysv_ipc.SharedMemory:
        seg = sysv_ipc.SharedMemory(
            None, sysv_ipc.IPC_CREX, mode=0o600, size=size or max(len(data), 1)
        )
        self.made.append(seg)
        if data:
            seg.write(data)
        seg.mode = 0o400  # read-only, as the original clients did
        return seg

    def gone_id(self) -> int:
        """The id of a segment that no longer exists."""
        seg = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=64)
        seg.detach()
        seg.remove()
        return int(seg.id)

    def remove_all(self) -> None:
        for seg in self.made:
            with contextlib.suppress(sysv_ipc.Error):
                seg.detach()
            with contextlib.suppress(sysv_ipc.Error):
                seg.remove()


@pytest.fixture
def segments() -> Iterator[Segments]:
    made = Segments()
    try:
        yield made
    finally:
        made.remove_all()


# -- health and the happy path of every RPC ---------------------------------------
def test_health_service_answers_serving_on_the_socket(agent: Any) -> None:
    health = health_pb2_grpc.HealthStub(agent.channel())
    for service in ("", "AWS.SageMaker.Edge.Agent"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    code, _, _ = call(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert code == CODE.NOT_FOUND


def test_every_rpc_round_trip(
    agent: Any, stub: pb_grpc.AgentStub, packages: Any, reference: Reference
) -> None:
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert listed["wt"].url == str(packages.v1)
    (inp,) = listed["wt"].input_tensor_metadatas
    (out,) = listed["wt"].output_tensor_metadatas
    assert (inp.name, inp.data_type, list(inp.shape)) == ("input", pb.FLOAT32, [-1, 6, 10, 10])
    assert (out.name, out.data_type, list(out.shape)) == ("output", pb.FLOAT32, [-1, 6, 10, 10])

    loaded = stub.LoadModel(pb.LoadModelRequest(url=str(packages.v2), name="rpc-v2"), timeout=60)
    try:
        assert loaded.model.name == "rpc-v2"
        assert loaded.model.url == str(packages.v2)
        assert list(loaded.model.input_tensor_metadatas[0].shape) == [-1, 6, 10, 10]
        described = stub.DescribeModel(pb.DescribeModelRequest(name="rpc-v2"), timeout=10)
        assert described.model == loaded.model

        x = windows(3)
        resp = stub.Predict(
            pb.PredictRequest(name="rpc-v2", tensors=[tensor(x.tobytes(), [-1, 6, 10, 10])]),
            timeout=30,
        )
        (t,) = resp.tensors
        assert t.WhichOneof("data") == "byte_data"  # outputs always travel as byte_data
        assert (t.tensor_metadata.name, t.tensor_metadata.data_type) == ("output", pb.FLOAT32)
        assert list(t.tensor_metadata.shape) == [3, 6, 10, 10]  # the true shape, not -1
        np.testing.assert_allclose(decode(t), reference(packages.v2_model, x), rtol=1e-5, atol=1e-5)

        capture_id = str(uuid.uuid4())
        now = time.time()
        stub.CaptureData(
            pb.CaptureDataRequest(
                model_name="rpc-v2",
                capture_id=capture_id,
                inference_timestamp=pb.Timestamp(seconds=int(now), nanos=0),
                input_tensors=[tensor(x.tobytes(), [3, 6, 10, 10])],
                output_tensors=[tensor(t.byte_data, [3, 6, 10, 10], name="output")],
            ),
            timeout=10,
        )
        status = stub.GetCaptureDataStatus(
            pb.GetCaptureDataStatusRequest(capture_id=capture_id), timeout=10
        )
        assert status.status in (pb.IN_PROGRESS, pb.SUCCESS)
    finally:
        stub.UnLoadModel(pb.UnLoadModelRequest(name="rpc-v2"), timeout=10)
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
    assert "rpc-v2" not in names
    code, _, _ = call(stub.DescribeModel, pb.DescribeModelRequest(name="rpc-v2"))
    assert code == CODE.NOT_FOUND


def test_workshop_device_application(
    agent: Any, packages: Any, reference: Reference, segments: Segments
) -> None:
    """The original wind turbine workshop's helper, step by step, on the raw stubs."""
    channel = grpc.insecure_channel(f"unix://{agent.socket}")  # no options, as it did
    try:
        client = pb_grpc.AgentStub(channel)

        def model_map() -> dict[str, dict[str, Any]]:
            models = client.ListModels(pb.ListModelsRequest())
            return {
                m.name: {"in": m.input_tensor_metadatas, "out": m.output_tensor_metadatas}
                for m in models.models
            }

        assert "wind-turbine" not in model_map()
        req = pb.LoadModelRequest()
        req.url = str(packages.v1_copy)
        req.name = "wind-turbine"
        client.LoadModel(req)
        mmap = model_map()
        assert "wind-turbine" in mmap

        x = windows(5, seed=11)
        expected = reference(Path(packages.v1_copy) / "model.onnx", x)

        # Predict with byte_data, metadata copied from ListModels (-1 batch and all)
        req = pb.PredictRequest()
        req.name = "wind-turbine"
        in_tensor = pb.Tensor()
        meta = mmap["wind-turbine"]["in"][0]
        in_tensor.tensor_metadata.name = meta.name
        in_tensor.tensor_metadata.data_type = meta.data_type
        for s in meta.shape:
            in_tensor.tensor_metadata.shape.append(s)
        in_tensor.byte_data = x.tobytes()
        req.tensors.append(in_tensor)
        resp = client.Predict(req)
        shape = list(resp.tensors[0].tensor_metadata.shape)
        y = np.frombuffer(resp.tensors[0].byte_data, dtype=np.float32).reshape(shape)
        assert y.shape == x.shape
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

        # Predict through a SysV segment: created, filled, made 0400; offset 0, size 0
        seg = segments.make(x.tobytes())
        req = pb.PredictRequest()
        req.name = "wind-turbine"
        shm_tensor = pb.Tensor()
        shm_tensor.tensor_metadata.name = meta.name
        shm_tensor.tensor_metadata.data_type = meta.data_type
        shm_tensor.tensor_metadata.shape.extend(meta.shape)
        shm_tensor.shared_memory_handle.segment_id = seg.id
        shm_tensor.shared_memory_handle.offset = 0
        shm_tensor.shared_memory_handle.size = 0
        req.tensors.append(shm_tensor)
        resp_shm = client.Predict(req)
        shape = list(resp_shm.tensors[0].tensor_metadata.shape)
        y_shm = np.frombuffer(resp_shm.tensors[0].byte_data, dtype=np.float32).reshape(shape)
        np.testing.assert_allclose(y_shm, expected, rtol=1e-5, atol=1e-5)

        # CaptureData: a fresh uuid4, the input tensor as sent, the output as received
        out_tensor = pb.Tensor()
        out_tensor.tensor_metadata.name = resp.tensors[0].tensor_metadata.name
        out_tensor.tensor_metadata.data_type = resp.tensors[0].tensor_metadata.data_type
        out_tensor.tensor_metadata.shape.extend(resp.tensors[0].tensor_metadata.shape)
        out_tensor.byte_data = bytes(resp.tensors[0].byte_data)
        cap = pb.CaptureDataRequest()
        cap.model_name = "wind-turbine"
        cap.capture_id = str(uuid.uuid4())
        cap.input_tensors.append(in_tensor)
        cap.output_tensors.append(out_tensor)
        client.CaptureData(cap)
        status = client.GetCaptureDataStatus(
            pb.GetCaptureDataStatusRequest(capture_id=cap.capture_id)
        )
        assert status.status in (pb.IN_PROGRESS, pb.SUCCESS)

        req = pb.UnLoadModelRequest()
        req.name = "wind-turbine"
        client.UnLoadModel(req)
        assert "wind-turbine" not in model_map()
    finally:
        channel.close()


# -- NOT_FOUND for unknown models ---------------------------------------------------
def _unknown_model_requests() -> list[Any]:
    x = windows(1).tobytes()
    return [
        pytest.param(
            "Predict",
            pb.PredictRequest(name="nope", tensors=[tensor(x, [1, 6, 10, 10])]),
            id="Predict",
        ),
        pytest.param("DescribeModel", pb.DescribeModelRequest(name="nope"), id="DescribeModel"),
        pytest.param("UnLoadModel", pb.UnLoadModelRequest(name="nope"), id="UnLoadModel"),
        pytest.param(
            "CaptureData",
            pb.CaptureDataRequest(
                model_name="nope",
                capture_id=str(uuid.uuid4()),
                input_tensors=[tensor(x, [1, 6, 10, 10])],
                output_tensors=[tensor(x, [1, 6, 10, 10], name="output")],
            ),
            id="CaptureData",
        ),
    ]


@pytest.mark.parametrize(("method", "request_"), _unknown_model_requests())
def test_unknown_model_is_not_found(stub: pb_grpc.AgentStub, method: str, request_: Any) -> None:
    code, detail, _ = call(getattr(stub, method), request_)
    assert code == CODE.NOT_FOUND
    assert "nope" in detail


# -- LoadModel errors -------------------------------------------------------------
def _load_error_cases() -> list[Any]:
    """(url from the packages, expected codes, a fragment the detail must hold)."""
    return [
        pytest.param(lambda p: str(p.v1 / "missing"), {CODE.NOT_FOUND}, "missing", id="missing"),
        pytest.param(
            lambda p: str(p.v1 / "model.onnx"),
            {CODE.NOT_FOUND, CODE.INVALID_ARGUMENT},
            "model.onnx",
            id="not-a-directory",
        ),
        pytest.param(
            lambda p: str(p.v1 / "golden"),
            {CODE.NOT_FOUND, CODE.INVALID_ARGUMENT},
            "manifest.json",
            id="no-manifest",
        ),
        pytest.param(
            lambda p: str(p.v1 / ("x" * 5000)),
            {CODE.INVALID_ARGUMENT},
            "too long",
            id="name-too-long",
        ),
        pytest.param(
            lambda p: "/" + "a/" * 3000,
            {CODE.INVALID_ARGUMENT},
            "too long",
            id="path-too-long",
        ),
        pytest.param(
            lambda p: "s3://bucket/wind-turbine-1.0",
            {CODE.INVALID_ARGUMENT},
            "local",
            id="remote-url",
        ),
        pytest.param(
            lambda p: str(p.invalid_manifest),
            {CODE.INVALID_ARGUMENT},
            "",
            id="invalid-manifest",
        ),
        pytest.param(
            lambda p: str(p.bad_framework), {CODE.INVALID_ARGUMENT}, "", id="bad-framework"
        ),
        pytest.param(
            lambda p: str(p.tampered),
            {CODE.INVALID_ARGUMENT},
            "model.onnx",
            id="checksum-mismatch",
        ),
        pytest.param(
            lambda p: str(p.unlisted_file),
            {CODE.INVALID_ARGUMENT},
            "extra.npy",
            id="unlisted-file",
        ),
        pytest.param(
            lambda p: str(p.symlink_out),
            {CODE.INVALID_ARGUMENT},
            "golden",
            id="symlink-out-of-package",
        ),
        pytest.param(
            lambda p: str(p.unsigned),
            {CODE.PERMISSION_DENIED},
            "manifest.sig",
            id="signature-missing",
        ),
        pytest.param(
            lambda p: str(p.untrusted),
            {CODE.PERMISSION_DENIED},
            "trusted",
            id="untrusted-key",
        ),
        pytest.param(
            lambda p: str(p.unloadable),
            {CODE.FAILED_PRECONDITION},
            "",
            id="model-cannot-load",
        ),
        pytest.param(
            lambda p: str(p.bad_golden),
            {CODE.FAILED_PRECONDITION},
            "golden",
            id="golden-check-fails",
        ),
    ]


@pytest.mark.parametrize(("url_of", "codes", "fragment"), _load_error_cases())
def test_load_errors(
    stub: pb_grpc.AgentStub,
    packages: Any,
    url_of: Callable[[Any], str],
    codes: set[grpc.StatusCode],
    fragment: str,
) -> None:
    url = url_of(packages)
    code, detail, _ = call(stub.LoadModel, pb.LoadModelRequest(url=url, name="broken"))
    assert code in codes, detail
    assert fragment in detail
    assert "Traceback" not in detail
    assert "broken" not in [
        m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    ]


@pytest.mark.parametrize(
    "bad", ["bad_golden", "unloadable", "tampered", "unsigned", "untrusted", "symlink_out"]
)
def test_failed_swap_keeps_the_old_version_serving(
    agent: Any, stub: pb_grpc.AgentStub, packages: Any, reference: Reference, bad: str
) -> None:
    """A refused new version of ``wt`` leaves 1.0 serving under the same name."""
    code, _, _ = call(
        stub.LoadModel, pb.LoadModelRequest(url=str(getattr(packages, bad)), name="wt")
    )
    assert code in (CODE.FAILED_PRECONDITION, CODE.INVALID_ARGUMENT, CODE.PERMISSION_DENIED)
    if bad in ("bad_golden", "unloadable"):
        assert code == CODE.FAILED_PRECONDITION
    described = stub.DescribeModel(pb.DescribeModelRequest(name="wt"), timeout=10)
    assert described.model.url == str(packages.v1)
    x = windows(2, seed=3)
    np.testing.assert_allclose(
        agent.client.predict("wt", x),
        reference(Path(packages.v1) / "model.onnx", x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_same_name_same_url_already_exists(stub: pb_grpc.AgentStub, packages: Any) -> None:
    code, detail, _ = call(stub.LoadModel, pb.LoadModelRequest(url=str(packages.v1), name="wt"))
    assert code == CODE.ALREADY_EXISTS
    assert "wt" in detail
    # the same directory spelt differently is still the same package
    code, _, _ = call(stub.LoadModel, pb.LoadModelRequest(url=f"{packages.v1}/./", name="wt"))
    assert code == CODE.ALREADY_EXISTS


@pytest.mark.parametrize(
    "alias",
    ["a_b", "a.b", "-a", "a-", "", "a b", "a/b", "wind\u00e9", "a\nb", "x" * 300],
)
def test_bad_alias_is_invalid_argument(stub: pb_grpc.AgentStub, packages: Any, alias: str) -> None:
    code, detail, _ = call(stub.LoadModel, pb.LoadModelRequest(url=str(packages.v1), name=alias))
    assert code == CODE.INVALID_ARGUMENT
    assert "pattern" in detail


@pytest.mark.parametrize("alias", ["a", "A1", "a-b", "wind--turbine-2", "9"])
def test_good_aliases_load(stub: pb_grpc.AgentStub, packages: Any, alias: str) -> None:
    stub.LoadModel(pb.LoadModelRequest(url=str(packages.v1), name=alias), timeout=60)
    try:
        assert (
            stub.DescribeModel(pb.DescribeModelRequest(name=alias), timeout=10).model.name == alias
        )
    finally:
        stub.UnLoadModel(pb.UnLoadModelRequest(name=alias), timeout=10)


# -- Predict: tensor validation -------------------------------------------------------
def _predict_error_cases() -> list[Any]:
    one = windows(1).tobytes()
    two = windows(2).tobytes()
    shape = [-1, 6, 10, 10]
    cases: list[tuple[str, list[pb.Tensor], grpc.StatusCode]] = [
        ("no-tensors", [], CODE.INVALID_ARGUMENT),
        ("two-tensors", [tensor(one, shape), tensor(one, shape)], CODE.INVALID_ARGUMENT),
        (
            "dtype-float64",
            [tensor(one * 2, [1, 6, 10, 10], dtype=pb.FLOAT64)],
            CODE.INVALID_ARGUMENT,
        ),
        ("dtype-uint8", [tensor(one, shape, dtype=pb.UINT8)], CODE.INVALID_ARGUMENT),
        ("dtype-unknown-enum", [tensor(one, shape, dtype=42)], CODE.INVALID_ARGUMENT),
        ("dtype-negative-enum", [tensor(one, shape, dtype=-3)], CODE.INVALID_ARGUMENT),
        ("rank-3", [tensor(one, [6, 10, 10])], CODE.INVALID_ARGUMENT),
        ("rank-5", [tensor(one, [1, 1, 6, 10, 10])], CODE.INVALID_ARGUMENT),
        ("rank-0", [tensor(one, [])], CODE.INVALID_ARGUMENT),
        ("element-count", [tensor(one, [2, 6, 10, 10])], CODE.INVALID_ARGUMENT),
        ("fixed-dim-differs", [tensor(one, [1, 6, 10, 11])], CODE.INVALID_ARGUMENT),
        ("zero-batch", [tensor(b"", [0, 6, 10, 10])], CODE.INVALID_ARGUMENT),
        ("negative-dim", [tensor(one, [-2, 6, 10, 10])], CODE.INVALID_ARGUMENT),
        ("two-dynamic-dims", [tensor(one, [-1, -1, 10, 10])], CODE.INVALID_ARGUMENT),
        ("bytes-not-multiple-of-4", [tensor(one + b"\0", shape)], CODE.INVALID_ARGUMENT),
        ("bytes-not-whole-rows", [tensor(one + two[:4], shape)], CODE.INVALID_ARGUMENT),
        ("no-bytes", [tensor(b"", shape)], CODE.INVALID_ARGUMENT),
        (
            "no-data-at-all",
            [
                pb.Tensor(
                    tensor_metadata=pb.TensorMetadata(
                        name="input", data_type=pb.FLOAT32, shape=shape
                    )
                )
            ],
            CODE.INVALID_ARGUMENT,
        ),
        ("unknown-input-name", [tensor(one, shape, name="nope")], CODE.INVALID_ARGUMENT),
        ("huge-declared-shape", [tensor(one, [2**31 - 1, 6, 10, 10])], CODE.INVALID_ARGUMENT),
        (
            "batch-over-max",
            [tensor(windows(MAX_BATCH + 1).tobytes(), shape)],
            CODE.RESOURCE_EXHAUSTED,
        ),
    ]
    return [pytest.param(tensors, code, id=name) for name, tensors, code in cases]


@pytest.mark.parametrize(("tensors", "code"), _predict_error_cases())
def test_predict_errors(
    stub: pb_grpc.AgentStub, tensors: list[pb.Tensor], code: grpc.StatusCode
) -> None:
    got, detail, _ = call(stub.Predict, pb.PredictRequest(name="wt", tensors=tensors))
    assert got == code, detail
    assert detail
    assert "Traceback" not in detail


def test_predict_fully_specified_and_named_inputs(
    stub: pb_grpc.AgentStub, packages: Any, reference: Reference
) -> None:
    x = windows(3, seed=4)
    expected = reference(Path(packages.v1) / "model.onnx", x)
    for t in (
        tensor(x.tobytes(), [3, 6, 10, 10]),  # fully specified, as the original required
        tensor(x.tobytes(), [-1, 6, 10, 10], name=""),  # positional
    ):
        resp = stub.Predict(pb.PredictRequest(name="wt", tensors=[t]), timeout=30)
        np.testing.assert_allclose(decode(resp.tensors[0]), expected, rtol=1e-5, atol=1e-5)


# -- Predict: shared memory ---------------------------------------------------------
def handle(segment_id: int, offset: int = 0, size: int = 0) -> pb.SharedMemoryHandle:
    return pb.SharedMemoryHandle(segment_id=segment_id, offset=offset, size=size)


def test_shared_memory_offset_and_size(
    stub: pb_grpc.AgentStub, packages: Any, reference: Reference, segments: Segments
) -> None:
    x = windows(2, seed=8)
    expected = reference(Path(packages.v1) / "model.onnx", x)
    seg = segments.make(b"\xff" * 16 + x.tobytes() + b"\xee" * 8)
    cases = [
        (handle(seg.id, offset=16, size=2 * ROW), [-1, 6, 10, 10]),
        (handle(seg.id, offset=16, size=0), [2, 6, 10, 10]),  # size 0: what the shape needs
        (handle(seg.id, offset=16, size=2 * ROW), [2, 6, 10, 10]),
    ]
    for h, shape in cases:
        resp = stub.Predict(pb.PredictRequest(name="wt", tensors=[tensor(h, shape)]), timeout=30)
        np.testing.assert_allclose(decode(resp.tensors[0]), expected, rtol=1e-5, atol=1e-5)


def test_shared_memory_errors(stub: pb_grpc.AgentStub, segments: Segments) -> None:
    x = windows(2).tobytes()
    exact = segments.make(x)  # 2 rows exactly
    small = segments.make(b"\0" * 100)
    odd = segments.make(x + b"\0" * 6)  # not a whole number of rows from offset 0
    shape = [-1, 6, 10, 10]
    cases = {
        "segment-gone": (handle(segments.gone_id()), shape),
        "segment-id-huge": (handle(2**63), shape),
        "segment-id-max": (handle(2**64 - 1), shape),
        "segment-too-small": (handle(small.id), [1, 6, 10, 10]),
        "segment-too-small-dynamic": (handle(small.id), shape),
        "offset-plus-size-beyond": (handle(exact.id, offset=4, size=2 * ROW), shape),
        "offset-beyond": (handle(exact.id, offset=2 * ROW + 1), shape),
        "offset-huge": (handle(exact.id, offset=2**64 - 1, size=ROW), shape),
        "size-huge": (handle(exact.id, size=2**64 - 1), shape),
        "size-disagrees-with-shape": (handle(exact.id, size=ROW), [2, 6, 10, 10]),
        "size-not-whole-rows": (handle(exact.id, size=ROW + 4), shape),
        "segment-not-whole-rows": (handle(odd.id), shape),
    }
    for name, (h, tshape) in cases.items():
        code, detail, _ = call(
            stub.Predict, pb.PredictRequest(name="wt", tensors=[tensor(h, tshape)])
        )
        assert code == CODE.INVALID_ARGUMENT, f"{name}: {code} {detail}"


def test_shared_memory_batch_over_max(stub: pb_grpc.AgentStub, segments: Segments) -> None:
    seg = segments.make(b"", size=(MAX_BATCH + 1) * ROW)
    code, detail, _ = call(
        stub.Predict,
        pb.PredictRequest(name="wt", tensors=[tensor(handle(seg.id), [-1, 6, 10, 10])]),
    )
    assert code == CODE.RESOURCE_EXHAUSTED, detail


# -- message size -------------------------------------------------------------------
def test_batch_2000_above_grpc_default_message_cap(
    agent: Any, packages: Any, reference: Reference
) -> None:
    """~4.8 MB each way: above grpc's 4 MiB default; the agent and AgentClient raise it."""
    x = windows(2000, seed=12)
    assert x.nbytes > 4 * 1024 * 1024
    expected = reference(Path(packages.v1) / "model.onnx", x)
    with AgentClient(agent.socket) as client:
        y = client.predict("wt", x)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        y_shm = client.predict("wt", x, shared_memory=True)
        np.testing.assert_allclose(y_shm, expected, rtol=1e-5, atol=1e-5)


# -- CaptureData and GetCaptureDataStatus -------------------------------------------
def capture_request(capture_id: str, *, model: str = "wt", when: float | None = None) -> Any:
    x = windows(1).tobytes()
    req = pb.CaptureDataRequest(
        model_name=model,
        capture_id=capture_id,
        input_tensors=[tensor(x, [1, 6, 10, 10])],
        output_tensors=[tensor(x, [1, 6, 10, 10], name="output")],
    )
    if when is not None:
        req.inference_timestamp.seconds = int(when)
    return req


def test_capture_accepted_and_tracked(stub: pb_grpc.AgentStub, agent: Any) -> None:
    capture_id = str(uuid.uuid4())
    code, detail, _ = call(stub.CaptureData, capture_request(capture_id, when=time.time() - 60))
    assert code == CODE.OK, detail
    status = stub.GetCaptureDataStatus(
        pb.GetCaptureDataStatusRequest(capture_id=capture_id), timeout=10
    ).status
    assert status in (pb.IN_PROGRESS, pb.SUCCESS)
    # the typed client reports the same
    assert agent.client.capture_status(capture_id).value in (pb.IN_PROGRESS, pb.SUCCESS)
    # no timestamp: the agent uses its own clock
    code, detail, _ = call(stub.CaptureData, capture_request(str(uuid.uuid4())))
    assert code == CODE.OK, detail


def test_capture_errors(stub: pb_grpc.AgentStub) -> None:
    used = str(uuid.uuid4())
    assert call(stub.CaptureData, capture_request(used))[0] == CODE.OK
    cases = {
        "reused-id": (capture_request(used), CODE.ALREADY_EXISTS),
        "future": (capture_request(str(uuid.uuid4()), when=time.time() + 3600), CODE.OUT_OF_RANGE),
        "empty-id": (capture_request(""), CODE.INVALID_ARGUMENT),
        "id-with-space": (capture_request("a b"), CODE.INVALID_ARGUMENT),
        "id-too-long": (capture_request("a" * 500), CODE.INVALID_ARGUMENT),
        "unknown-model": (capture_request(str(uuid.uuid4()), model="nope"), CODE.NOT_FOUND),
    }
    for name, (req, want) in cases.items():
        code, detail, _ = call(stub.CaptureData, req)
        assert code == want, f"{name}: {code} {detail}"
    unknown_dtype = capture_request(str(uuid.uuid4()))
    unknown_dtype.input_tensors[0].tensor_metadata.data_type = 42  # type: ignore[assignment]  # not an enum value
    assert call(stub.CaptureData, unknown_dtype)[0] == CODE.INVALID_ARGUMENT
    wrong_size = capture_request(str(uuid.uuid4()))
    wrong_size.output_tensors[0].byte_data = b"\0" * 10
    assert call(stub.CaptureData, wrong_size)[0] == CODE.INVALID_ARGUMENT


def test_capture_status_of_unknown_and_bad_ids(stub: pb_grpc.AgentStub) -> None:
    resp = stub.GetCaptureDataStatus(
        pb.GetCaptureDataStatusRequest(capture_id=str(uuid.uuid4())), timeout=10
    )
    assert resp.status == pb.NOT_FOUND
    code, _, _ = call(stub.GetCaptureDataStatus, pb.GetCaptureDataStatusRequest(capture_id=""))
    assert code == CODE.INVALID_ARGUMENT


# -- the typed client maps statuses to the agent's exception classes ------------------
def test_typed_client_raises_agent_errors(agent: Any) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        agent.client.describe_model("nope")


# -- a second agent with tight limits ----------------------------------------------
@pytest.fixture(scope="module")
def small_agent(module_agent_factory: Any) -> Any:
    return module_agent_factory(config={"max_models": 2, "max_message_bytes": 1024 * 1024})


def test_too_many_models_is_resource_exhausted(small_agent: Any, packages: Any) -> None:
    stub = small_agent.stub()
    for name in ("one", "two"):
        stub.LoadModel(pb.LoadModelRequest(url=str(packages.v1), name=name), timeout=60)
    code, detail, _ = call(stub.LoadModel, pb.LoadModelRequest(url=str(packages.v2), name="three"))
    assert code == CODE.RESOURCE_EXHAUSTED, detail
    # a hot swap of a loaded name does not add a model: allowed when full
    stub.LoadModel(pb.LoadModelRequest(url=str(packages.v2), name="two"), timeout=60)
    stub.UnLoadModel(pb.UnLoadModelRequest(name="one"), timeout=10)
    stub.LoadModel(pb.LoadModelRequest(url=str(packages.v2), name="three"), timeout=60)
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
    assert names == ["three", "two"]
    assert small_agent.client.predict("three", windows(1)).shape == (1, 6, 10, 10)


def test_request_over_message_limit_is_resource_exhausted(small_agent: Any, packages: Any) -> None:
    stub = small_agent.stub()
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
    if "two" not in names:
        stub.LoadModel(pb.LoadModelRequest(url=str(packages.v1), name="two"), timeout=60)
    big = windows(500)  # 1.2 MB > 1 MiB
    code, _, _ = call(
        stub.Predict,
        pb.PredictRequest(name="two", tensors=[tensor(big.tobytes(), [-1, 6, 10, 10])]),
    )
    assert code == CODE.RESOURCE_EXHAUSTED
    assert small_agent.client.predict("two", windows(2)).shape == (2, 6, 10, 10)
    assert small_agent.alive()
