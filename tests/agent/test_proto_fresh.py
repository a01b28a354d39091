"""The wire contract: committed stubs are fresh, and the proto says what AGENT_API.md says.

1. ``scripts/gen-proto.sh <tmpdir>`` regenerates the stubs; they must equal the
   committed ones in ``edgeagent/_proto`` byte for byte.
2. The facts of the SageMaker Edge Agent interface (package, service, method
   paths, messages, field numbers and types, oneofs, enum numbers), written
   out below as tables copied from AGENT_API.md, must be exactly what the
   compiled descriptor holds: nothing missing, nothing extra, nothing renumbered.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from edgeagent._proto import agent_pb2, agent_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "AWS.SageMaker.Edge"
F = descriptor_pb2.FieldDescriptorProto

# -- AGENT_API.md, "Interface facts" -------------------------------------------------
METHODS = {  # name: (request, response); all unary
    "Predict": ("PredictRequest", "PredictResponse"),
    "LoadModel": ("LoadModelRequest", "LoadModelResponse"),
    "UnLoadModel": ("UnLoadModelRequest", "UnLoadModelResponse"),
    "ListModels": ("ListModelsRequest", "ListModelsResponse"),
    "DescribeModel": ("DescribeModelRequest", "DescribeModelResponse"),
    "CaptureData": ("CaptureDataRequest", "CaptureDataResponse"),
    "GetCaptureDataStatus": ("GetCaptureDataStatusRequest", "GetCaptureDataStatusResponse"),
}

ENUMS = {
    "DataType": {
        "UINT8": 0,
        "INT16": 1,
        "INT32": 2,
        "INT64": 3,
        "FLOAT16": 4,
        "FLOAT32": 5,
        "FLOAT64": 6,
    },
    "Encoding": {"CSV": 0, "JSON": 1, "NONE": 2, "BASE64": 3},
    "CaptureDataStatus": {"FAILURE": 0, "SUCCESS": 1, "IN_PROGRESS": 2, "NOT_FOUND": 3},
}

STRING, BYTES, UINT64 = F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_UINT64
INT32, INT64 = F.TYPE_INT32, F.TYPE_INT64
MSG, ENUM = F.TYPE_MESSAGE, F.TYPE_ENUM
REPEATED = "repeated"

# message: {field: (number, type, type name or None, "repeated" or "", oneof or None)}
MESSAGES: dict[str, dict[str, tuple[int, int, str | None, str, str | None]]] = {
    "TensorMetadata": {
        "name": (1, STRING, None, "", None),
        "data_type": (2, ENUM, "DataType", "", None),
        "shape": (3, INT32, None, REPEATED, None),
    },
    "SharedMemoryHandle": {
        "size": (1, UINT64, None, "", None),
        "offset": (2, UINT64, None, "", None),
        "segment_id": (3, UINT64, None, "", None),
    },
    "Tensor": {
        "tensor_metadata": (1, MSG, "TensorMetadata", "", None),
        "byte_data": (4, BYTES, None, "", "data"),
        "shared_memory_handle": (5, MSG, "SharedMemoryHandle", "", "data"),
    },
    "Model": {
        "url": (1, STRING, None, "", None),
        "name": (2, STRING, None, "", None),
        "input_tensor_metadatas": (3, MSG, "TensorMetadata", REPEATED, None),
        "output_tensor_metadatas": (4, MSG, "TensorMetadata", REPEATED, None),
    },
    "PredictRequest": {
        "name": (1, STRING, None, "", None),
        "tensors": (2, MSG, "Tensor", REPEATED, None),
    },
    "PredictResponse": {"tensors": (1, MSG, "Tensor", REPEATED, None)},
    "LoadModelRequest": {
        "url": (1, STRING, None, "", None),
        "name": (2, STRING, None, "", None),
    },
    "LoadModelResponse": {"model": (1, MSG, "Model", "", None)},
    "UnLoadModelRequest": {"name": (1, STRING, None, "", None)},
    "UnLoadModelResponse": {},
    "ListModelsRequest": {},
    "ListModelsResponse": {"models": (1, MSG, "Model", REPEATED, None)},
    "DescribeModelRequest": {"name": (1, STRING, None, "", None)},
    "DescribeModelResponse": {"model": (1, MSG, "Model", "", None)},
    "AuxilaryData": {
        "name": (1, STRING, None, "", None),
        "encoding": (2, ENUM, "Encoding", "", None),
        "byte_data": (3, BYTES, None, "", "data"),
        "shared_memory_handle": (4, MSG, "SharedMemoryHandle", "", "data"),
    },
    "CaptureDataRequest": {
        "model_name": (1, STRING, None, "", None),
        "capture_id": (2, STRING, None, "", None),
        "inference_timestamp": (3, MSG, "Timestamp", "", None),
        "input_tensors": (4, MSG, "Tensor", REPEATED, None),
        "output_tensors": (5, MSG, "Tensor", REPEATED, None),
        "inputs": (6, MSG, "AuxilaryData", REPEATED, None),
        "outputs": (7, MSG, "AuxilaryData", REPEATED, None),
    },
    "CaptureDataResponse": {},
    "GetCaptureDataStatusRequest": {"capture_id": (1, STRING, None, "", None)},
    "GetCaptureDataStatusResponse": {
        "status": (1, ENUM, "CaptureDataStatus", "", None),
    },
    "Timestamp": {
        "seconds": (1, INT64, None, "", None),
        "nanos": (2, INT32, None, "", None),
    },
}


def file_proto() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    agent_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


# -- 1. generated stubs are fresh ---------------------------------------------------------
def test_committed_stubs_equal_regenerated(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    env = dict(os.environ, PYTHON=str(REPO / ".venv" / "bin" / "python"))
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-proto.sh"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    committed_dir = REPO / "edgeagent" / "_proto"
    generated = {p.name for p in out.iterdir() if p.is_file()}
    committed = {p.name for p in committed_dir.iterdir() if p.suffix in (".py", ".pyi")}
    assert generated == committed
    stale = [
        name
        for name in sorted(generated)
        if (out / name).read_bytes() != (committed_dir / name).read_bytes()
    ]
    assert not stale, f"stale generated stubs {stale}: run scripts/gen-proto.sh and commit"


# -- 2. the descriptor holds exactly the interface facts --------------------------------
def test_package_and_syntax() -> None:
    proto = file_proto()
    assert proto.package == PACKAGE
    assert proto.syntax == "proto3"
    assert list(proto.dependency) == []  # Timestamp is the contract's own message


def test_service_methods() -> None:
    (service,) = file_proto().service
    assert service.name == "Agent"
    got = {
        m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        for m in service.method
    }
    want = {
        name: (f".{PACKAGE}.{req}", f".{PACKAGE}.{resp}", False, False)
        for name, (req, resp) in METHODS.items()
    }
    assert got == want
    assert [m.name for m in service.method] == list(METHODS)  # declaration order too


def test_method_paths_in_the_stub() -> None:
    """The generated client calls exactly /AWS.SageMaker.Edge.Agent/<Method>, unary-unary."""
    calls: list[tuple[str, str]] = []

    class Recorder:
        def __getattr__(self, kind: str) -> Any:
            def register(path: str, *args: Any, **kwargs: Any) -> None:
                calls.append((kind, path))

            return register

    agent_pb2_grpc.AgentStub(Recorder())  # type: ignore[arg-type]  # records, never calls
    assert sorted(calls) == sorted(("unary_unary", f"/{PACKAGE}.Agent/{name}") for name in METHODS)


def test_enums() -> None:
    got = {e.name: {v.name: v.number for v in e.value} for e in file_proto().enum_type}
    assert got == ENUMS


def test_messages_fields_numbers_types_and_oneofs() -> None:
    proto = file_proto()
    got: dict[str, dict[str, tuple[int, int, str | None, str, str | None]]] = {}
    for message in proto.message_type:
        assert not message.nested_type
        assert not message.enum_type
        oneofs = [o.name for o in message.oneof_decl]
        fields = {}
        for f in message.field:
            assert not f.proto3_optional, f"{message.name}.{f.name} must not be optional"
            fields[f.name] = (
                f.number,
                f.type,
                f.type_name.removeprefix(f".{PACKAGE}.") if f.type_name else None,
                REPEATED if f.label == F.LABEL_REPEATED else "",
                oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            )
        got[message.name] = fields
    assert set(got) == set(MESSAGES)
    for name, fields in MESSAGES.items():
        assert got[name] == fields, name


def test_python_enum_values_used_by_the_agent() -> None:
    """The generated module exposes the enum numbers the agent's tables rely on."""
    from edgeagent.capture import AuxEncoding, CaptureStatus
    from edgeagent.tensors import WIRE_DTYPES

    assert {agent_pb2.DataType.Name(n): n for n in WIRE_DTYPES} == ENUMS["DataType"]
    assert {s.name: s.value for s in CaptureStatus} == ENUMS["CaptureDataStatus"]
    assert {e.name: e.value for e in AuxEncoding} == ENUMS["Encoding"]
