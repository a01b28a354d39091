"""What the transport tests send by hand: Predict requests and their header block."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeagent._proto import agent_pb2 as pb
from edgeagent.wire import h2

PREDICT_HEADERS = h2.encode_headers(
    [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/AWS.SageMaker.Edge.Agent/Predict"),
        (b"content-type", b"application/grpc"),
    ]
)


def windows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 6, 10, 10), dtype=np.float32)


def predict_request(x: np.ndarray[Any, Any]) -> pb.PredictRequest:
    return pb.PredictRequest(
        name="wt",
        tensors=[
            pb.Tensor(
                tensor_metadata=pb.TensorMetadata(
                    name="input", data_type=pb.FLOAT32, shape=[-1, 6, 10, 10]
                ),
                byte_data=x.tobytes(),
            )
        ],
    )
