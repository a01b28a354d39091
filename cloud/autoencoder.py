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

``build_relational_model`` is the relational variant: the same interface, but
each feature is rebuilt by a head that sees only the features that
physically determine it (``RELATIONAL_HEADS``), so a sensor that disagrees
with the others cannot reconstruct itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    return _window_model(nodes, initializers, "wind_turbine_autoencoder", doc)


def _window_model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto],
    name: str,
    doc: str,
) -> onnx.ModelProto:
    """A checked opset-17 model from ``input`` [N, 6, 10, 10] to ``output`` of that shape."""
    io_shape: list[str | int] = ["N", CHANNELS, SIDE, SIDE]
    graph = helper.make_graph(
        nodes,
        name,
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


# --------------------------------------------------------------------------- relational


# (in channels, out channels, kernel, dilation, ReLU after); padding keeps the length
Layer1d = tuple[int, int, int, int, bool]


@dataclass(frozen=True)
class Head:
    """One part of the relational model: which input features it sees, which it reconstructs.

    Either ``sequence``, 1-D convolutions over the window's 100 time steps, or
    ``image``, the 2-D layer table of the autoencoders above over the
    [k, 10, 10] image of the features it sees.
    """

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    sequence: tuple[Layer1d, ...] = ()
    image: tuple[Layer, ...] = ()

    def layer_names(self) -> list[str]:
        """Initialiser prefixes of the head's layers: ``<head>.conv0``, ..."""
        if self.image:
            return [f"{self.name}.{n}" for n in layer_names(self.image)]
        return [f"{self.name}.conv{i}" for i in range(len(self.sequence))]

    def shapes(self) -> list[tuple[tuple[int, ...], int]]:
        """(weight shape, bias length) of each layer."""
        if self.image:
            return [(weight_shape(layer), layer[2]) for layer in self.image]
        return [((cout, cin, kernel), cout) for cin, cout, kernel, _, _ in self.sequence]

    def check(self) -> None:
        """Raise ValueError unless the layers fit the head's inputs and outputs."""
        if bool(self.image) == bool(self.sequence):
            raise ValueError(f"head {self.name}: give either sequence or image layers")
        if self.image:
            cin, cout = self.image[0][1], self.image[-1][2]
            if side_sizes(self.image)[-1] != SIDE:
                raise ValueError(f"head {self.name}: must map a {SIDE}x{SIDE} image to itself")
        else:
            cin, cout = self.sequence[0][0], self.sequence[-1][1]
        if cin != len(self.inputs) or cout != len(self.outputs):
            raise ValueError(f"head {self.name}: layers map {cin} -> {cout} channels")


def _dilated(cin: int, cout: int, width: int) -> tuple[Layer1d, ...]:
    """Four dilated 1-D convolutions (kernel 5; dilations 1, 2, 4, 8: 61 samples, 3 s
    of context) and a 1x1 output layer."""
    layers: list[Layer1d] = []
    c = cin
    for dilation in (1, 2, 4, 8):
        layers.append((c, width, 5, dilation, True))
        c = width
    layers.append((c, cout, 1, 1, False))
    return tuple(layers)


RELATIONAL_HEADS: tuple[Head, ...] = (
    # vibration: roll, pitch, yaw reconstructed from themselves and the rotor speed
    # (the 1P/3P frequencies and amplitudes follow it), by a compact image autoencoder
    Head(
        "vibration",
        inputs=(0, 1, 2, 4),
        outputs=(0, 1, 2),
        image=(
            ("Conv", 4, 8, 2, 1, True),
            ("Conv", 8, 16, 2, 0, True),
            ("Conv", 16, 32, 2, 0, True),
            ("ConvTranspose", 32, 16, 2, 0, True),
            ("ConvTranspose", 16, 8, 2, 0, True),
            ("ConvTranspose", 8, 3, 2, 1, False),
        ),
    ),
    # wind speed from what the rotor does (rotor speed, voltage): brake drag, a stuck anemometer
    Head("wind", inputs=(4, 5), outputs=(3,), sequence=_dilated(2, 1, 12)),
    # rotor speed from the wind and the voltage: a stuck or wild rotor-speed sensor
    Head("rotor", inputs=(3, 5), outputs=(4,), sequence=_dilated(2, 1, 12)),
    # voltage from the rotor speed alone: generator degradation, a stuck or wild voltage
    Head("voltage", inputs=(4,), outputs=(5,), sequence=_dilated(1, 1, 8)),
)
"""The relational variant: each feature is reconstructed from the features that physically
determine it, never from its own value when a relation exists (wind, rotor, voltage), so a
sensor that disagrees with the others cannot be copied through."""


def _check_heads(heads: Sequence[Head]) -> None:
    covered = sorted(c for head in heads for c in head.outputs)
    if covered != list(range(CHANNELS)):
        raise ValueError(f"heads must reconstruct each of the {CHANNELS} features exactly once")
    for head in heads:
        head.check()


def _conv_node(head: Head, index: int, name: str, source: str, target: str) -> onnx.NodeProto:
    """The Conv/ConvTranspose node of a head's ``index``-th layer."""
    if head.image:
        op, _, _, kernel, pad, _ = head.image[index]
        return helper.make_node(
            op,
            [source, f"{name}.weight", f"{name}.bias"],
            [target],
            name=name,
            kernel_shape=[kernel, kernel],
            pads=[pad] * 4,
            strides=[1, 1],
        )
    _, _, kernel, dilation, _ = head.sequence[index]
    pad = dilation * (kernel - 1) // 2
    return helper.make_node(
        "Conv",
        [source, f"{name}.weight", f"{name}.bias"],
        [target],
        name=name,
        kernel_shape=[kernel],
        pads=[pad, pad],
        dilations=[dilation],
        strides=[1],
    )


def build_relational_model(
    *,
    heads: Sequence[Head] = RELATIONAL_HEADS,
    weights: Mapping[str, NDArray[np.float32]] | None = None,
    seed: int = 0,
    doc: str = "wind turbine relational model (untrained, seed weights)",
) -> onnx.ModelProto:
    """The relational variant as an ONNX graph with the autoencoders' interface.

    ``input`` [N, 6, 10, 10] -> ``output`` [N, 6, 10, 10]: each head gathers
    its input features, runs its convolutions (1-D over the 100 time steps,
    or 2-D over the image), and the outputs are put back in feature order.
    Standard ONNX operators only: Reshape, Gather, Conv, ConvTranspose, Relu,
    Concat.
    """
    _check_heads(heads)
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array([0, CHANNELS, SIDE * SIDE], np.int64), "seq_shape"),
        numpy_helper.from_array(np.array([0, CHANNELS, SIDE, SIDE], np.int64), "image_shape"),
    ]
    nodes.append(helper.make_node("Reshape", ["input", "seq_shape"], ["seq"], name="to_seq"))
    by_channel: dict[int, str] = {}
    for head in heads:
        prefix = head.name
        inits.append(numpy_helper.from_array(np.array(head.inputs, np.int64), f"{prefix}.inputs"))
        current = f"{prefix}.in"
        source = "input" if head.image else "seq"
        nodes.append(
            helper.make_node(
                "Gather", [source, f"{prefix}.inputs"], [current], name=f"{prefix}.gather", axis=1
            )
        )
        relus = [layer[-1] for layer in (head.image or head.sequence)]
        for index, (name, (wshape, blen)) in enumerate(
            zip(head.layer_names(), head.shapes(), strict=True)
        ):
            if weights is None:
                # He initialisation: fan-in = input channels x kernel size
                cin = head.image[index][1] if head.image else head.sequence[index][0]
                fan_in = cin * int(np.prod(wshape[2:]))
                weight = (rng.standard_normal(wshape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
                bias = np.zeros(blen, np.float32)
            else:
                weight = np.asarray(weights[f"{name}.weight"], np.float32)
                bias = np.asarray(weights[f"{name}.bias"], np.float32)
                if weight.shape != wshape or bias.shape != (blen,):
                    raise ValueError(
                        f"{name}: weights {weight.shape} / bias {bias.shape}, "
                        f"expected {wshape} / {(blen,)}"
                    )
            inits += [
                numpy_helper.from_array(weight, f"{name}.weight"),
                numpy_helper.from_array(bias, f"{name}.bias"),
            ]
            out = f"{name}.out"
            pre = f"{name}.pre" if relus[index] else out
            nodes.append(_conv_node(head, index, name, current, pre))
            if relus[index]:
                nodes.append(helper.make_node("Relu", [pre], [out], name=f"{name}.relu"))
            current = out
        if head.image:
            nodes.append(
                helper.make_node(
                    "Reshape",
                    [current, f"{prefix}.seq_shape"],
                    [f"{prefix}.seq"],
                    name=f"{prefix}.flat",
                )
            )
            inits.append(
                numpy_helper.from_array(
                    np.array([0, len(head.outputs), SIDE * SIDE], np.int64), f"{prefix}.seq_shape"
                )
            )
            current = f"{prefix}.seq"
        for k, channel in enumerate(head.outputs):
            if len(head.outputs) == 1:
                by_channel[channel] = current
            else:
                part = f"{prefix}.out{k}"
                inits.append(numpy_helper.from_array(np.array([k], np.int64), f"{part}.index"))
                nodes.append(
                    helper.make_node(
                        "Gather", [current, f"{part}.index"], [part], name=f"{part}.pick", axis=1
                    )
                )
                by_channel[channel] = part
    nodes.append(
        helper.make_node(
            "Concat", [by_channel[c] for c in range(CHANNELS)], ["out_seq"], name="concat", axis=1
        )
    )
    nodes.append(
        helper.make_node("Reshape", ["out_seq", "image_shape"], ["output"], name="to_image")
    )
    return _window_model(nodes, inits, "wind_turbine_relational", doc)


def variant_layout(variant: str) -> list[Any]:
    """A variant's layers as plain JSON (the training record's ``variant.layers``)."""
    if variant == "relational":
        return [
            {
                "name": head.name,
                "inputs": list(head.inputs),
                "outputs": list(head.outputs),
                "layers": [list(layer) for layer in (head.image or head.sequence)],
            }
            for head in RELATIONAL_HEADS
        ]
    return [list(layer) for layer in VARIANTS[variant]]
