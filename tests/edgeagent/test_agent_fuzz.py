"""Property-based fuzzing of Predict over the socket: every request gets a status.

Random model names, data types (unknown enum numbers too), shapes (negative,
zero, huge), byte lengths, shared memory ids, offsets and sizes, any number of
tensors. The agent must answer each with OK or a client-error status (never
UNKNOWN or INTERNAL, never a dropped connection), and afterwards still answer
health checks and a valid Predict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import sysv_ipc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_helpers import predict_request

from edgeagent._proto import agent_pb2 as pb

ROW = 6 * 10 * 10 * 4
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
U64 = 2**64 - 1
I32 = 2**31 - 1


@pytest.fixture(scope="module")
def agent(module_agent_factory: Any, packages: Any) -> Any:
    agent = module_agent_factory(config={"max_batch": 64, "max_message_bytes": 4 * 1024 * 1024})
    agent.client.load_model("wt", packages.v1)
    return agent


@pytest.fixture(scope="module")
def segments() -> Iterator[dict[str, int]]:
    """Real segments to aim at: two good rows, a tiny one, and an id that is gone."""
    made = []
    data = np.random.default_rng(0).standard_normal((2, 6, 10, 10), dtype=np.float32)
    for content in (data.tobytes(), b"\1" * 10):
        seg = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=len(content))
        seg.write(content)
        seg.mode = 0o400
        made.append(seg)
    gone = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=16)
    gone.detach()
    gone.remove()
    try:
        yield {"rows": made[0].id, "tiny": made[1].id, "gone": gone.id}
    finally:
        for seg in made:
            with contextlib.suppress(sysv_ipc.Error):
                seg.detach()
            with contextlib.suppress(sysv_ipc.Error):
                seg.remove()


dims = st.one_of(
    st.sampled_from([-1, 6, 10, 1, 2]),
    st.integers(-(2**31), I32),
    st.sampled_from([0, -2, I32, -(2**31)]),
)
shapes = st.one_of(
    st.just([-1, 6, 10, 10]),
    st.lists(dims, min_size=4, max_size=4),
    st.lists(dims, max_size=7),
)
dtypes = st.one_of(st.just(pb.FLOAT32), st.integers(0, 6), st.integers(-(2**31), I32), st.just(7))
byte_lengths = st.one_of(
    st.sampled_from([0, 1, 3, 4, ROW, ROW - 1, ROW + 1, 2 * ROW, 65 * ROW]),
    st.integers(0, 3 * ROW),
)


@st.composite
def wild_tensor(draw: st.DrawFn, segment_ids: dict[str, int]) -> pb.Tensor:
    """Anything at all."""
    t = pb.Tensor()
    t.tensor_metadata.name = draw(st.sampled_from(["input", "", "output"]) | st.text(max_size=8))
    t.tensor_metadata.data_type = draw(dtypes)  # type: ignore[assignment]  # unknown values too
    t.tensor_metadata.shape.extend(draw(shapes))
    kind = draw(st.sampled_from(["bytes", "shm", "none"]))
    if kind == "bytes":
        t.byte_data = bytes(draw(byte_lengths))
    elif kind == "shm":
        h = t.shared_memory_handle
        h.segment_id = draw(
            st.sampled_from(list(segment_ids.values())) | st.integers(0, U64) | st.just(0)
        )
        h.offset = draw(st.sampled_from([0, 4, ROW, U64, 2**63]) | st.integers(0, U64))
        h.size = draw(st.sampled_from([0, ROW, 2 * ROW, U64, 1]) | st.integers(0, U64))
    return t


@st.composite
def near_valid_tensor(draw: st.DrawFn, segment_ids: dict[str, int]) -> pb.Tensor:
    """A valid input of 1-2 rows, then at most one field changed."""
    rows = draw(st.integers(1, 2))
    t = pb.Tensor()
    t.tensor_metadata.name = "input"
    t.tensor_metadata.data_type = pb.FLOAT32
    t.tensor_metadata.shape.extend([draw(st.sampled_from([-1, rows])), 6, 10, 10])
    if draw(st.booleans()):
        t.byte_data = bytes(rows * ROW)
    else:
        t.shared_memory_handle.segment_id = segment_ids["rows"]
        t.shared_memory_handle.size = draw(st.sampled_from([0, rows * ROW]))
    mutation = draw(
        st.sampled_from(["none", "dtype", "dim", "bytes", "offset", "size", "segment", "name"])
    )
    if mutation == "dtype":
        t.tensor_metadata.data_type = draw(dtypes)  # type: ignore[assignment]  # any int
    elif mutation == "dim":
        t.tensor_metadata.shape[draw(st.integers(0, 3))] = draw(dims)
    elif mutation == "bytes" and t.WhichOneof("data") == "byte_data":
        t.byte_data = bytes(draw(byte_lengths))
    elif mutation == "offset" and t.WhichOneof("data") == "shared_memory_handle":
        t.shared_memory_handle.offset = draw(st.integers(0, 3 * ROW) | st.integers(0, U64))
    elif mutation == "size" and t.WhichOneof("data") == "shared_memory_handle":
        t.shared_memory_handle.size = draw(byte_lengths | st.integers(0, U64))
    elif mutation == "segment" and t.WhichOneof("data") == "shared_memory_handle":
        t.shared_memory_handle.segment_id = draw(
            st.sampled_from([segment_ids["tiny"], segment_ids["gone"]]) | st.integers(0, U64)
        )
    elif mutation == "name":
        t.tensor_metadata.name = draw(st.text(max_size=8))
    return t


@st.composite
def predict_requests(draw: st.DrawFn, segment_ids: dict[str, int]) -> pb.PredictRequest:
    name = "wt"
    if draw(st.integers(0, 9)) >= 7:  # mostly the loaded model, so the tensors get checked
        name = draw(st.sampled_from(["", "nope", "WT"]) | st.text())
    one = near_valid_tensor(segment_ids) | wild_tensor(segment_ids)
    count = draw(st.sampled_from([1, 1, 1, 0, 2, 3]))
    return pb.PredictRequest(name=name, tensors=[draw(one) for _ in range(count)])


def test_fuzzed_predict_requests_always_get_a_status(agent: Any, segments: dict[str, int]) -> None:
    stub = agent.stub()
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(request=predict_requests(segments))
    def one(request: pb.PredictRequest) -> None:
        try:
            stub.Predict(request, timeout=30)
            code, detail = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, detail = exc.code(), exc.details()  # type: ignore[attr-defined]  # a grpc.Call
        seen[code] = seen.get(code, 0) + 1
        assert code in ALLOWED, f"{code}: {detail}\nrequest: {request}"[:2000]
        assert agent.alive()

    one()
    print(f"statuses: { {c.name: n for c, n in seen.items()} }")  # for -s runs
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= set(seen)
    # and the agent is still fine
    assert agent.client.health()
    x = np.random.default_rng(1).standard_normal((3, 6, 10, 10), dtype=np.float32)
    assert agent.client.predict("wt", x).shape == (3, 6, 10, 10)
    assert agent.client.predict("wt", x, shared_memory=True).shape == (3, 6, 10, 10)


def test_fuzzed_valid_requests_match_the_model(agent: Any, packages: Any, reference: Any) -> None:
    """The other side of the fuzz: any legal batch, via either path, gives the model's output."""
    model = packages.v1 / "model.onnx"
    stub = agent.stub()

    @settings(max_examples=25, deadline=None, database=None)
    @given(
        batch=st.integers(1, 64),
        seed=st.integers(0, 2**16),
        shm=st.booleans(),
        declare_batch=st.booleans(),
    )
    def one(batch: int, seed: int, shm: bool, declare_batch: bool) -> None:
        x = np.random.default_rng(seed).standard_normal((batch, 6, 10, 10), dtype=np.float32)
        y = agent.client.predict("wt", x, shared_memory=shm)
        np.testing.assert_allclose(y, reference(model, x), rtol=1e-5, atol=1e-5)
        if declare_batch:  # the same through the raw stub with a -1 batch
            stub_resp = stub.Predict(predict_request(x), timeout=30)
            assert list(stub_resp.tensors[0].tensor_metadata.shape) == [batch, 6, 10, 10]

    one()
