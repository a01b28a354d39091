"""CaptureData through a real agent to a local directory (the Disk destination).

What a device application and a data scientist see: the exact record schema,
tensors captured by value (shared memory too), side files, every status
transition, statuses and duplicate ids across a restart, a full spool, the
spool surviving a crash, ``edgectl capture`` and the reader, and parsing the
way the original workshop's notebook did.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sysv_ipc
from capture_helpers import (
    Agents,
    agents,
    disk_objects,
    event_ids,
    extract_model,
    records_of,
    short_dir,
    windows,
)

from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc
from edgeagent.capture import AuxEncoding
from edgeagent.capture.reader import read_records, stack
from edgeagent.errors import AlreadyExistsError, ResourceExhaustedError
from edgectl.commands import capture as capture_cmd

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def model() -> Iterator[Path]:
    base = short_dir("wecap-model-")
    yield extract_model(base / "wind-turbine-1.0")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pool() -> Iterator[Agents]:
    with agents() as started:
        yield started


def edgectl(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edgectl")
    capture_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["capture", *argv])
    code: int = args.func(args)
    return code


def tensor(data: bytes | pb.SharedMemoryHandle, name: str) -> pb.Tensor:
    t = pb.Tensor(
        tensor_metadata=pb.TensorMetadata(name=name, data_type=pb.FLOAT32, shape=[-1, 6, 10, 10])
    )
    if isinstance(data, pb.SharedMemoryHandle):
        t.shared_memory_handle.CopyFrom(data)
    else:
        t.byte_data = data
    return t


def test_disk_capture_is_the_original_record_and_statuses_follow_it(
    pool: Agents, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = pool.base / "captured"
    config = {
        "capture_destination": "Disk",
        "capture_disk_path": str(out),
        "capture_prefix": "demo-capture",
        "capture_batch_size": 100,
        "capture_push_period_seconds": 1.0,
        "capture_base64_embed_limit": 64,
        "device_id": "turbine-7",
        "fleet_name": "farm-north",
    }
    agent = pool.start(config)
    agent.client.load_model("wt", model)
    agent.client.load_model("wt-b", model)
    channel = grpc.insecure_channel(f"unix://{agent.socket}")
    stub = pb_grpc.AgentStub(channel)
    sent: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
    try:
        # the workshop's pattern: predict, then capture input and output by byte_data
        for i in range(4):
            x = windows(1, seed=i)
            y = agent.client.predict("wt" if i % 2 else "wt-b", x)
            cid = str(uuid.uuid4())
            agent.client.capture_data(
                model_name="wt" if i % 2 else "wt-b",
                capture_id=cid,
                inputs=[x],
                outputs=[y],
                inference_time=time.time() - 30,
                aux_inputs=[("note", AuxEncoding.JSON, b'{"turbine": 7}')],
                aux_outputs=[("trace", AuxEncoding.NONE, bytes(range(256)))],
            )
            sent[cid] = (x, y)
        # shared memory: the client removes its segment right after the call returns
        x = windows(3, seed=9)
        seg = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=x.nbytes)
        seg.write(x.tobytes())
        seg.mode = 0o400
        shm_id = str(uuid.uuid4())
        handle = pb.SharedMemoryHandle(segment_id=seg.id, offset=0, size=0)
        stub.CaptureData(
            pb.CaptureDataRequest(
                model_name="wt",
                capture_id=shm_id,
                input_tensors=[tensor(handle, "input")],
                output_tensors=[tensor((-x).tobytes(), "output")],
            ),
            timeout=10,
        )
        seg.detach()
        seg.remove()
        sent[shm_id] = (x, -x)

        ids = list(sent)
        assert agent.statuses(ids) == {"IN_PROGRESS": len(ids)}  # spooled, push period not over
        edgectl("status", *ids, "--socket", str(agent.socket))
        assert capsys.readouterr().out.split() == [w for i in ids for w in (i, "IN_PROGRESS")]

        # errors the service keeps: reused id, future timestamp, invalid tensor, unknown id
        def code_of(req: pb.CaptureDataRequest) -> grpc.StatusCode:
            try:
                stub.CaptureData(req, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return,attr-defined]  # a Call too
            return CODE.OK

        ok = tensor(windows(1).tobytes(), "input")
        assert code_of(pb.CaptureDataRequest(model_name="wt", capture_id=ids[0])) == (
            CODE.ALREADY_EXISTS
        )
        future = pb.CaptureDataRequest(model_name="wt", capture_id=str(uuid.uuid4()))
        future.inference_timestamp.seconds = int(time.time()) + 3600
        assert code_of(future) == CODE.OUT_OF_RANGE
        bad = pb.CaptureDataRequest(
            model_name="wt", capture_id=str(uuid.uuid4()), input_tensors=[ok]
        )
        bad.input_tensors[0].byte_data = b"\0" * 10
        assert code_of(bad) == CODE.INVALID_ARGUMENT
        assert agent.client.capture_status(str(uuid.uuid4())).name == "NOT_FOUND"

        agent.wait_statuses(ids, "SUCCESS", timeout=15)
    finally:
        channel.close()

    objects = disk_objects(out)
    assert event_ids(objects) == dict.fromkeys(sent, 1)  # each capture exactly once
    keys = [k for k in objects if k.endswith(".jsonl")]
    pattern = re.compile(
        r"demo-capture/farm-north/(wt|wt-b)/\d{4}/\d{2}/\d{2}/\d{2}/"
        r"turbine-7-\d{8}T\d{6}Z-[0-9a-f]{16}\.jsonl"
    )
    assert all(pattern.fullmatch(k) for k in keys), keys
    assert {k.split("/")[2] for k in keys} == {"wt", "wt-b"}  # one object per model

    for record in records_of(objects):
        meta = record["eventMetadata"]
        assert record["eventVersion"] == "0"
        assert set(meta) == {
            "deviceFleetName",
            "deviceId",
            "eventId",
            "inferenceTime",
            "modelName",
            "modelVersion",
        }
        assert (meta["deviceId"], meta["deviceFleetName"], meta["modelVersion"]) == (
            "turbine-7",
            "farm-north",
            "1.0",
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["inferenceTime"])
        x, y = sent[meta["eventId"]]
        # the original workshop notebook's way of reading a capture
        for entry, expected in (
            (record["deviceFleetInputs"][0], x),
            (record["deviceFleetOutputs"][0], y),
        ):
            m = re.search(r"Tensor\[(\w+); ([\d, ]+)\]", entry["observedContentType"])
            assert m is not None
            assert m.group(1) == "FLOAT32"
            shape = [int(d) for d in m.group(2).split(",")]
            arr = np.frombuffer(base64.b64decode(entry["data"]), dtype=np.float32).reshape(shape)
            np.testing.assert_array_equal(arr, expected)
        if record["deviceFleetAuxiliaryInputs"]:
            (note,) = record["deviceFleetAuxiliaryInputs"]
            assert note["mode"] == "Input"
            assert note["encoding"] == "JSON"
            assert base64.b64decode(note["data"]) == b'{"turbine": 7}'
            (trace,) = record["deviceFleetAuxiliaryOutputs"]
            assert trace["mode"] == "Output"
            assert "data" not in trace
            assert trace["data-ref"].startswith(f"file://{out}/demo-capture/farm-north/")
            assert Path(trace["data-ref"].removeprefix("file://")).read_bytes() == bytes(range(256))

    # the reader and `edgectl capture read`
    batch = out / keys[0]
    records = read_records(batch)
    for rec in records:
        np.testing.assert_array_equal(rec.inputs[next(iter(rec.inputs))], sent[rec.event_id][0])
    assert stack(records, "input").shape[1:] == (6, 10, 10)
    assert edgectl("read", str(batch), "--npz", str(pool.base / "b.npz")) == 0
    with np.load(pool.base / "b.npz") as npz:
        assert npz["input"].shape == stack(records, "input").shape

    # restart: statuses and used ids are remembered
    assert agent.terminate() == 0
    again = pool.start(config, state_dir=agent.state_dir, name="again")
    assert again.statuses(list(sent)) == {"SUCCESS": len(sent)}
    with pytest.raises(AlreadyExistsError):
        again.client.capture_data(
            model_name="wt", capture_id=ids[0], inputs=[windows(1)], outputs=[windows(1)]
        )


def test_full_spool_refuses_then_everything_is_delivered_after_a_crash(
    pool: Agents, model: Path
) -> None:
    blocked = pool.base / "not-a-directory"
    blocked.write_text("the destination is a file: every upload fails (ENOTDIR)\n")
    config = {
        "capture_destination": "Disk",
        "capture_disk_path": str(blocked / "out"),
        "capture_buffer_size": 5,
        "capture_batch_size": 2,
        "capture_push_period_seconds": 0.2,
        "capture_retry_max_seconds": 0.5,
    }
    agent = pool.start(config)
    agent.client.load_model("wt", model)
    x = windows(1)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for cid in ids:
        agent.client.capture_data(model_name="wt", capture_id=cid, inputs=[x], outputs=[x])
    dropped = str(uuid.uuid4())
    with pytest.raises(ResourceExhaustedError):
        agent.client.capture_data(model_name="wt", capture_id=dropped, inputs=[x], outputs=[x])
    assert agent.client.capture_status(dropped).name == "FAILURE"
    time.sleep(1.0)  # several push periods and retries: nothing delivered, nothing lost
    assert agent.statuses(ids) == {"IN_PROGRESS": 5}
    assert any(e.get("event") == "capture upload failed; will retry" for e in agent.log_events())

    agent.kill()  # a crash while the spool is full
    again = pool.start(config, state_dir=agent.state_dir, name="again")
    assert again.statuses(ids) == {"IN_PROGRESS": 5}  # recovered from the spool
    blocked.unlink()  # the destination comes back
    again.wait_statuses(ids, "SUCCESS", timeout=15)
    assert event_ids(disk_objects(blocked / "out")) == dict.fromkeys(ids, 1)
    # the dropped capture never reached the destination, and room is back
    again.client.capture_data(model_name="wt", capture_id=dropped + "-2", inputs=[x], outputs=[x])


def test_edgectl_flush_signals_a_running_agent_or_uploads_itself(
    pool: Agents, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = pool.base / "captured"
    config = {
        "capture_destination": "Disk",
        "capture_disk_path": str(out),
        "capture_push_period_seconds": 3600.0,  # only a flush sends anything
    }
    agent = pool.start(config)
    agent.client.load_model("wt", model)
    x = windows(1)

    def capture(n: int) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(n)]
        for cid in ids:
            agent.client.capture_data(model_name="wt", capture_id=cid, inputs=[x], outputs=[x])
        return ids

    first = capture(3)
    assert edgectl("flush", "--state-dir", str(agent.state_dir), "--wait", "15") == 0
    assert f"asked the agent (pid {agent.pid})" in capsys.readouterr().out
    assert agent.statuses(first) == {"SUCCESS": 3}

    second = capture(2)
    assert agent.terminate() == 0  # stopped with captures still spooled
    conf = pool.base / "flush.toml"
    conf.write_text(f'capture_disk_path = "{out}"\n')
    assert edgectl("flush", "--config", str(conf), "--state-dir", str(agent.state_dir)) == 0
    assert "agent not running: uploaded 2 capture(s)" in capsys.readouterr().out
    assert event_ids(disk_objects(out)) == dict.fromkeys(first + second, 1)

    again = pool.start(config, state_dir=agent.state_dir, name="again")
    assert again.statuses(second) == {"SUCCESS": 2}
