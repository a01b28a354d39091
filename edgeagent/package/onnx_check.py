"""Our own check of an ONNX model, before any ONNX Runtime sees it.

A signed package proves who made a model, not that a device should run it.
Three things are refused here, whatever the installed ONNX Runtime would do
with them:

- **external data**: a tensor whose bytes live in another file (any
  ``data_location = EXTERNAL`` or ``external_data`` entry). The runtime would
  open a path the model names, outside what was hashed;
- **operators outside the standard ONNX domains** (``""``/``ai.onnx`` and
  ``ai.onnx.ml``): contrib and custom operators (``com.microsoft``, ...) are
  code paths of one runtime build, not of the ONNX standard;
- **tensors whose declared size does not match their data**: the element
  count from ``dims`` and ``data_type`` must equal what ``raw_data`` or the
  one typed field for that type carries, and no other data field is set.

Every graph is visited: the main graph, subgraphs in node attributes (``If``,
``Loop``, ``Scan``), local functions and training graphs; every tensor:
initializers, sparse initializers, and tensor attributes (``Constant``).

The model is parsed with a minimal descriptor of ``onnx.proto`` built here
(field numbers and types from the ONNX IR spec, only the fields read below),
on the protobuf runtime the agent already uses for its gRPC messages: the
``onnx`` package (about 15 MB installed, with its own protobuf build and
ml_dtypes) is not needed on a device. Fields this descriptor does not name
are kept as unknown fields and ignored, which is what ONNX Runtime does with
fields newer than itself.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from edgeagent.package.errors import ModelLoadError, PackageInvalidError

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_REPORTED_NAME = 80

# TensorProto.DataType -> (bits per element in raw_data, the typed field for it,
# values per element in that field; 0.5 for 4-bit types packed two per int32)
_STRING = 8
_TYPES: dict[int, tuple[int, str, float]] = {
    1: (32, "float_data", 1),  # FLOAT
    2: (8, "int32_data", 1),  # UINT8
    3: (8, "int32_data", 1),  # INT8
    4: (16, "int32_data", 1),  # UINT16
    5: (16, "int32_data", 1),  # INT16
    6: (32, "int32_data", 1),  # INT32
    7: (64, "int64_data", 1),  # INT64
    _STRING: (0, "string_data", 1),  # STRING: no raw_data form
    9: (8, "int32_data", 1),  # BOOL
    10: (16, "int32_data", 1),  # FLOAT16
    11: (64, "double_data", 1),  # DOUBLE
    12: (32, "uint64_data", 1),  # UINT32
    13: (64, "uint64_data", 1),  # UINT64
    14: (64, "float_data", 2),  # COMPLEX64
    15: (128, "double_data", 2),  # COMPLEX128
    16: (16, "int32_data", 1),  # BFLOAT16
    17: (8, "int32_data", 1),  # FLOAT8E4M3FN
    18: (8, "int32_data", 1),  # FLOAT8E4M3FNUZ
    19: (8, "int32_data", 1),  # FLOAT8E5M2
    20: (8, "int32_data", 1),  # FLOAT8E5M2FNUZ
    21: (4, "int32_data", 0.5),  # UINT4
    22: (4, "int32_data", 0.5),  # INT4
    23: (4, "int32_data", 0.5),  # FLOAT4E2M1
    24: (8, "int32_data", 1),  # FLOAT8E8M0
}
_DATA_FIELDS = (
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)

_F = descriptor_pb2.FieldDescriptorProto
# message -> [(field name, number, type, label, message type name)]
_SCHEMA: dict[str, list[tuple[str, int, int, int, str]]] = {
    "StringStringEntryProto": [
        ("key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("value", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ],
    "TensorProto": [
        ("dims", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
        ("data_type", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
        ("segment", 3, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),  # a message; only its presence
        ("float_data", 4, _F.TYPE_FLOAT, _F.LABEL_REPEATED, ""),
        ("int32_data", 5, _F.TYPE_INT32, _F.LABEL_REPEATED, ""),
        ("string_data", 6, _F.TYPE_BYTES, _F.LABEL_REPEATED, ""),
        ("int64_data", 7, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
        ("name", 8, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("raw_data", 9, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),
        ("double_data", 10, _F.TYPE_DOUBLE, _F.LABEL_REPEATED, ""),
        ("uint64_data", 11, _F.TYPE_UINT64, _F.LABEL_REPEATED, ""),
        ("external_data", 13, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "StringStringEntryProto"),
        ("data_location", 14, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
    ],
    "SparseTensorProto": [
        ("values", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "TensorProto"),
        ("indices", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "TensorProto"),
        ("dims", 3, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
    ],
    "AttributeProto": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("t", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "TensorProto"),
        ("g", 6, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "GraphProto"),
        ("tensors", 10, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "TensorProto"),
        ("graphs", 11, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "GraphProto"),
        ("sparse_tensor", 22, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "SparseTensorProto"),
        ("sparse_tensors", 23, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "SparseTensorProto"),
    ],
    "NodeProto": [
        ("name", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("op_type", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("attribute", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "AttributeProto"),
        ("domain", 7, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ],
    "GraphProto": [
        ("node", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "NodeProto"),
        ("name", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("initializer", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "TensorProto"),
        ("sparse_initializer", 15, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "SparseTensorProto"),
    ],
    "FunctionProto": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("node", 7, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "NodeProto"),
        ("domain", 10, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ],
    "TrainingInfoProto": [
        ("initialization", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "GraphProto"),
        ("algorithm", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "GraphProto"),
    ],
    "ModelProto": [
        ("ir_version", 1, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("graph", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "GraphProto"),
        ("training_info", 20, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "TrainingInfoProto"),
        ("functions", 25, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "FunctionProto"),
    ],
}
_PACKAGE = "windedge.onnxcheck"


def _model_class() -> Any:
    proto = descriptor_pb2.FileDescriptorProto(
        name="windedge_onnx_check.proto", package=_PACKAGE, syntax="proto2"
    )
    for message, fields in _SCHEMA.items():
        msg = proto.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            field = msg.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


_MODEL_CLASS = _model_class()


def check_onnx_model(data: bytes, *, name: str = "model.onnx") -> None:
    """Refuse a model a device must not run (PackageInvalidError says why).

    ModelLoadError (a model that cannot load) when ``data`` is not an ONNX
    model at all.
    """
    model = _MODEL_CLASS()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        raise ModelLoadError(f"{name} is not a valid ONNX model ({exc})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelLoadError(f"{name} is not a valid ONNX model (no ir_version or no graph)")
    _Walker(name).model(model)


class _Walker:
    def __init__(self, name: str) -> None:
        self._name = name

    def _refuse(self, where: str, why: str) -> PackageInvalidError:
        return PackageInvalidError(f"{self._name}: {where}: {why}")

    def model(self, model: Any) -> None:
        self.graph(model.graph, "graph")
        for function in model.functions:
            self.nodes(function.node, f"function {_short(function.domain)}.{_short(function.name)}")
        for i, info in enumerate(model.training_info):
            for part in ("initialization", "algorithm"):
                if info.HasField(part):
                    self.graph(getattr(info, part), f"training_info[{i}].{part}")

    def graph(self, graph: Any, where: str) -> None:
        for tensor in graph.initializer:
            self.tensor(tensor, f"{where}: initializer {_short(tensor.name)!r}")
        for sparse in graph.sparse_initializer:
            self.sparse(sparse, f"{where}: sparse initializer {_short(sparse.values.name)!r}")
        self.nodes(graph.node, where)

    def nodes(self, nodes: Any, where: str) -> None:
        for node in nodes:
            label = f"{where}: node {_short(node.name or node.op_type)!r}"
            if node.domain not in STANDARD_DOMAINS:
                raise self._refuse(
                    label,
                    f"operator {_short(node.op_type)} of domain {_short(node.domain)!r} is not "
                    "a standard ONNX operator (allowed domains: ai.onnx, ai.onnx.ml)",
                )
            for attr in node.attribute:
                at = f"{label} attribute {_short(attr.name)!r}"
                if attr.HasField("t"):
                    self.tensor(attr.t, at)
                for tensor in attr.tensors:
                    self.tensor(tensor, at)
                if attr.HasField("sparse_tensor"):
                    self.sparse(attr.sparse_tensor, at)
                for sparse in attr.sparse_tensors:
                    self.sparse(sparse, at)
                if attr.HasField("g"):
                    self.graph(attr.g, at)
                for sub in attr.graphs:
                    self.graph(sub, at)

    def sparse(self, sparse: Any, where: str) -> None:
        if any(d < 0 for d in sparse.dims):
            raise self._refuse(where, f"negative dimension in {list(sparse.dims)}")
        self.tensor(sparse.values, f"{where} values")
        self.tensor(sparse.indices, f"{where} indices")

    def tensor(self, tensor: Any, where: str) -> None:
        if tensor.data_location == EXTERNAL or len(tensor.external_data):
            raise self._refuse(where, "external data (tensor bytes in another file) is refused")
        if tensor.HasField("segment"):
            raise self._refuse(where, "segmented tensors are not supported")
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            raise self._refuse(where, f"negative dimension in {dims}")
        spec = _TYPES.get(tensor.data_type)
        if spec is None:
            raise self._refuse(where, f"unknown tensor data type {tensor.data_type}")
        bits, field, per_element = spec
        count = 1
        for d in dims:
            count *= d
        present = [f for f in _DATA_FIELDS if len(getattr(tensor, f))]
        if tensor.HasField("raw_data"):
            if tensor.data_type == _STRING:
                raise self._refuse(where, "a string tensor cannot use raw_data")
            if present:
                raise self._refuse(where, f"both raw_data and {present[0]} are set")
            want = (count * bits + 7) // 8
            got = len(tensor.raw_data)
            if got != want:
                raise self._refuse(
                    where,
                    f"dims {dims} declare {want} bytes of data, raw_data holds {got} bytes",
                )
            return
        wrong = [f for f in present if f != field]
        if wrong:
            raise self._refuse(
                where, f"values of data type {tensor.data_type} are in {wrong[0]}, not {field}"
            )
        want_values = int(count * per_element + 0.5)  # 4-bit types: two per value, rounded up
        got_values = len(getattr(tensor, field))
        if got_values != want_values:
            raise self._refuse(
                where,
                f"dims {dims} declare {want_values} values, {field} holds {got_values} values",
            )


def _short(text: str) -> str:
    return text if len(text) <= MAX_REPORTED_NAME else text[:MAX_REPORTED_NAME] + "..."
