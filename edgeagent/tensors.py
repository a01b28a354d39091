"""Tensor data types and metadata, independent of the wire format.

The wire enum ``DataType`` numbers (UINT8=0 ... FLOAT64=6) map to NumPy dtypes
here; ONNX type strings map too, so a package manifest, an ONNX Runtime
session and a gRPC message all describe tensors the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# wire enum number -> numpy dtype name (AGENT_API.md, enum DataType)
WIRE_DTYPES: dict[int, str] = {
    0: "uint8",
    1: "int16",
    2: "int32",
    3: "int64",
    4: "float16",
    5: "float32",
    6: "float64",
}
DTYPE_TO_WIRE: dict[str, int] = {name: number for number, name in WIRE_DTYPES.items()}

# ONNX Runtime's type strings -> numpy dtype name
ORT_DTYPES: dict[str, str] = {
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}

SUPPORTED_DTYPES: frozenset[str] = frozenset(WIRE_DTYPES.values())
ITEMSIZE: dict[str, int] = {name: np.dtype(name).itemsize for name in SUPPORTED_DTYPES}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: name, NumPy dtype name and shape (-1 = dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r} for tensor {self.name!r}")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"invalid shape {self.shape} for tensor {self.name!r}")

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the agent says about a loaded model (the wire ``Model`` message)."""

    name: str
    url: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
