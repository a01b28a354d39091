"""The wind turbine autoencoder as an ONNX graph, and the preprocessing it expects.

The topology is the original workshop's convolutional autoencoder, built with
``onnx.helper`` (no deep learning framework needed): input ``input`` float32
[N, 6, 10, 10] (one window of 100 samples of 6 features), output ``output`` of
the same shape, the reconstruction. Spatial size 10 -> 11 -> 12 -> 15 -> 12 ->
11 -> 10 through three Conv/ReLU and three ConvTranspose layers.

Without trained weights the initialisers are He-initialised from a seeded RNG
(an untrained model, which the tests use as a second version). Training
(``cloud.training``) hands its weights to the same builder, so a released
model has exactly this graph. ``COMPACT_LAYERS`` is the cheaper variant:
fewer channels and no padding blow-up (10 -> 11 -> 10 -> 9 and back).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from edgeapp.features import FEATURES, PreprocessingParams

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17; older ONNX Runtimes load it too
CHANNELS = len(FEATURES)
SIDE = 10  # a window of 100 samples is a 10 x 10 image per feature

# (op, in channels, out channels, kernel, pad, ReLU after)
Layer = tuple[str, int, int, int, int, bool]

LAYERS: tuple[Layer, ...] = (
    ("Conv", 6, 32, 2, 1, True),
    ("Conv", 32, 64, 2, 1, True),
    ("Conv", 64, 128, 2, 2, True),
    ("ConvTranspose", 128, 64, 2, 2, True),
    ("ConvTranspose", 64, 32, 2, 1, True),
    ("ConvTranspose", 32, 6, 2, 1, False),
)
"""The original workshop's topology: 17.3M multiply-adds per window."""

COMPACT_LAYERS: tuple[Layer, ...] = (
    ("Conv", 6, 16, 2, 1, True),
    ("Conv", 16, 32, 2, 0, True),
    ("Conv", 32, 64, 2, 0, True),
    ("ConvTranspose", 64, 32, 2, 0, True),
    ("ConvTranspose", 32, 16, 2, 0, True),
    ("ConvTranspose", 16, 6, 2, 1, False),
)
"""The compact variant: 1.8M multiply-adds per window (9.4x fewer)."""

VARIANTS: Mapping[str, tuple[Layer, ...]] = {"original": LAYERS, "compact": COMPACT_LAYERS}


def weight_shape(layer: Layer) -> tuple[int, int, int, int]:
    """Conv weights are [out, in, k, k]; ConvTranspose weights [in, out, k, k] (as in torch)."""
    op, cin, cout, kernel, _, _ = layer
    return (cout, cin, kernel, kernel) if op == "Conv" else (cin, cout, kernel, kernel)


def layer_names(layers: Sequence[Layer]) -> list[str]:
    """The initialiser prefix of each layer: ``conv0``, ..., ``convtranspose5``."""
    return [f"{op.lower()}{index}" for index, (op, *_) in enumerate(layers)]


def side_sizes(layers: Sequence[Layer], side: int = SIDE) -> list[int]:
    """The spatial side after each layer (stride 1)."""
    sides = []
    for op, _, _, kernel, pad, _ in layers:
        side = side + 2 * pad - kernel + 1 if op == "Conv" else side - 2 * pad + kernel - 1
        sides.append(side)
    return sides


def multiply_adds(layers: Sequence[Layer], side: int = SIDE) -> int:
    """Multiply-adds of one window through ``layers`` (biases and ReLUs not counted)."""
    total = 0
    for layer, out_side in zip(layers, side_sizes(layers, side), strict=True):
        op, cin, cout, kernel, _, _ = layer
        # a Conv computes every output pixel; a ConvTranspose scatters every input pixel
        pixels = out_side**2 if op == "Conv" else side**2
        total += pixels * cin * cout * kernel * kernel
        side = out_side
    return total


def build_autoencoder_model(
    *,
    seed: int = 0,
    layers: Sequence[Layer] = LAYERS,
    weights: Mapping[str, NDArray[np.float32]] | None = None,
    doc: str = "wind turbine convolutional autoencoder (untrained, seed weights)",
) -> onnx.ModelProto:
    """The autoencoder graph; ``weights`` (``<prefix>.weight``/``.bias`` -> array)
    are trained initialisers, else seeded He-initialised weights and zero biases."""
    if side_sizes(layers)[-1] != SIDE or layers[0][1] != CHANNELS or layers[-1][2] != CHANNELS:
        raise ValueError(f"layers must map [N, {CHANNELS}, {SIDE}, {SIDE}] to itself")
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "input"
    for index, (layer, prefix) in enumerate(zip(layers, layer_names(layers), strict=True)):
        op, cin, cout, kernel, pad, relu = layer
        wshape = weight_shape(layer)
        if weights is None:
            std = np.sqrt(2.0 / (cin * kernel * kernel))
            weight = (rng.standard_normal(wshape) * std).astype(np.float32)
            bias = np.zeros(cout, dtype=np.float32)
        else:
            weight = np.asarray(weights[f"{prefix}.weight"], dtype=np.float32)
            bias = np.asarray(weights[f"{prefix}.bias"], dtype=np.float32)
            if weight.shape != wshape or bias.shape != (cout,):
                raise ValueError(
                    f"{prefix}: weights {weight.shape} / bias {bias.shape}, "
                    f"expected {wshape} / {(cout,)}"
                )
        initializers += [
            numpy_helper.from_array(weight, name=f"{prefix}.weight"),
            numpy_helper.from_array(bias, name=f"{prefix}.bias"),
        ]
        out = "output" if index == len(layers) - 1 else f"{prefix}.out"
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
        doc_string=doc,
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
