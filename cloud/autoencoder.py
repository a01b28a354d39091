"""The wind turbine autoencoder as an ONNX graph, and the preprocessing it expects.

The topology is the original workshop's convolutional autoencoder, built with
``onnx.helper`` (no deep learning framework needed): input ``input`` float32
[N, 6, 10, 10] (one window of 100 samples of 6 features), output ``output`` of
the same shape, the reconstruction. Spatial size 10 -> 11 -> 12 -> 15 -> 12 ->
11 -> 10 through three Conv/ReLU and three ConvTranspose layers.

The weights here are He-initialised from a seeded RNG: the graph is right, the
model is untrained. Training replaces the initialisers, not the topology.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeapp.features import FEATURES, PreprocessingParams

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17; older ONNX Runtimes load it too
CHANNELS = len(FEATURES)
SIDE = 10  # a window of 100 samples is a 10 x 10 image per feature

# (op, in channels, out channels, kernel, pad, ReLU after)
LAYERS: tuple[tuple[str, int, int, int, int, bool], ...] = (
    ("Conv", 6, 32, 2, 1, True),
    ("Conv", 32, 64, 2, 1, True),
    ("Conv", 64, 128, 2, 2, True),
    ("ConvTranspose", 128, 64, 2, 2, True),
    ("ConvTranspose", 64, 32, 2, 1, True),
    ("ConvTranspose", 32, 6, 2, 1, False),
)


def build_autoencoder_model(*, seed: int = 0) -> onnx.ModelProto:
    """The autoencoder graph with seeded He-initialised weights and zero biases."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "input"
    for index, (op, cin, cout, kernel, pad, relu) in enumerate(LAYERS):
        prefix = f"{op.lower()}{index}"
        # Conv weights are [out, in, k, k]; ConvTranspose weights [in, out, k, k]
        wshape = (cout, cin, kernel, kernel) if op == "Conv" else (cin, cout, kernel, kernel)
        std = np.sqrt(2.0 / (cin * kernel * kernel))
        weight = (rng.standard_normal(wshape) * std).astype(np.float32)
        bias = np.zeros(cout, dtype=np.float32)
        initializers += [
            numpy_helper.from_array(weight, name=f"{prefix}.weight"),
            numpy_helper.from_array(bias, name=f"{prefix}.bias"),
        ]
        out = "output" if index == len(LAYERS) - 1 else f"{prefix}.out"
        conv_out = f"{prefix}.pre" if relu else out
        nodes.append(
            helper.make_node(
                op,
                [current, f"{prefix}.weight", f"{prefix}.bias"],
                [conv_out],
                name=prefix,
                kernel_shape=[kernel, kernel],
                pads=[pad, pad, pad, pad],
                strides=[1, 1],
            )
        )
        if relu:
            nodes.append(helper.make_node("Relu", [conv_out], [out], name=f"{prefix}.relu"))
        current = out

    io_shape: list[str | int] = ["N", CHANNELS, SIDE, SIDE]
    graph = helper.make_graph(
        nodes,
        "wind_turbine_autoencoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, io_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, io_shape)],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="windedge",
        doc_string="wind turbine convolutional autoencoder (untrained, seed weights)",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_autoencoder_onnx(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the autoencoder to ``path`` (same seed, same bytes); return the path."""
    target = Path(path)
    target.write_bytes(build_autoencoder_model(seed=seed).SerializeToString())
    return target


def default_preprocessing_block() -> dict[str, Any]:
    """The preprocessing block of model version 1: the seed statistics.

    Training prepares data exactly as the device does, so the block comes from
    the detection daemon's own ``PreprocessingParams.default()`` (one copy of
    the statistics in the repository). Fault groups: vibration = roll, pitch,
    yaw; rotation = wind speed, rotor speed; voltage = voltage.
    """
    return PreprocessingParams.default().to_block()
