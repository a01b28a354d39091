"""The autoencoder in torch, built from the same layer table as the ONNX graph.

Only training imports this module (torch is the optional ``train`` extra);
the ONNX graph is built by ``cloud.autoencoder`` from the trained weights, so
the exported model has exactly the topology the table describes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from cloud.autoencoder import CHANNELS, SIDE, Head, Layer, layer_names

__all__ = ["Autoencoder", "RelationalNet"]


class Autoencoder(nn.Module):
    """Conv/ConvTranspose layers with ReLU where the table says, stride 1."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        super().__init__()
        self.names = layer_names(layers)
        self.relu = [relu for *_, relu in layers]
        modules: list[nn.Module] = []
        for op, cin, cout, kernel, pad, _ in layers:
            conv = nn.Conv2d if op == "Conv" else nn.ConvTranspose2d
            modules.append(conv(cin, cout, kernel_size=kernel, padding=pad))
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, relu in zip(self.layers, self.relu, strict=True):
            x = layer(x)
            if relu:
                x = torch.relu(x)
        return x

    def export_weights(self) -> dict[str, NDArray[np.float32]]:
        """``<prefix>.weight``/``.bias`` -> float32 arrays, the ONNX initialiser names."""
        out: dict[str, NDArray[np.float32]] = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            if not isinstance(layer, nn.Conv2d | nn.ConvTranspose2d) or layer.bias is None:
                raise TypeError(f"{name}: expected a convolution with a bias")
            out[f"{name}.weight"] = layer.weight.detach().cpu().numpy().astype(np.float32)
            out[f"{name}.bias"] = layer.bias.detach().cpu().numpy().astype(np.float32)
        return out


class RelationalNet(nn.Module):
    """``cloud.autoencoder.build_relational_model`` in torch: the same heads, the same names."""

    def __init__(self, heads: Sequence[Head]) -> None:
        super().__init__()
        self.heads = list(heads)
        self.names = [head.layer_names() for head in heads]
        self.relus = [[layer[-1] for layer in (head.image or head.sequence)] for head in heads]
        self.parts = nn.ModuleList()  # registers the parameters under <head index>.<layer index>
        self.convs: list[list[nn.Module]] = []
        for head in heads:
            modules: list[nn.Module] = []
            for op, cin, cout, kernel, pad, _ in head.image:
                conv = nn.Conv2d if op == "Conv" else nn.ConvTranspose2d
                modules.append(conv(cin, cout, kernel_size=kernel, padding=pad))
            for cin, cout, kernel, dilation, _ in head.sequence:
                pad = dilation * (kernel - 1) // 2
                modules.append(nn.Conv1d(cin, cout, kernel, padding=pad, dilation=dilation))
            self.parts.append(nn.ModuleList(modules))
            self.convs.append(modules)
        # built once, not per batch: each head's input features, and where the heads'
        # concatenated outputs go back to feature order
        self.inputs = [torch.tensor(head.inputs) for head in heads]
        order = [c for head in heads for c in head.outputs]
        self.inverse = torch.tensor([order.index(c) for c in range(CHANNELS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        seq = x.reshape(n, CHANNELS, SIDE * SIDE)
        outs: list[torch.Tensor] = []
        for head, index, part, relus in zip(
            self.heads, self.inputs, self.convs, self.relus, strict=True
        ):
            h = (x if head.image else seq).index_select(1, index)
            for layer, relu in zip(part, relus, strict=True):
                h = layer(h)
                if relu:
                    h = torch.relu(h)
            outs.append(h.reshape(n, len(head.outputs), SIDE * SIDE))
        joined = torch.cat(outs, 1)
        return joined.index_select(1, self.inverse).reshape(n, CHANNELS, SIDE, SIDE)

    def export_weights(self) -> dict[str, NDArray[np.float32]]:
        """``<head>.<layer>.weight``/``.bias`` -> float32 arrays, the ONNX initialiser names."""
        out: dict[str, NDArray[np.float32]] = {}
        for names, part in zip(self.names, self.convs, strict=True):
            for name, layer in zip(names, part, strict=True):
                if not isinstance(layer, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d):
                    raise TypeError(f"{name}: expected a convolution")
                if layer.bias is None:
                    raise TypeError(f"{name}: expected a convolution with a bias")
                out[f"{name}.weight"] = layer.weight.detach().cpu().numpy().astype(np.float32)
                out[f"{name}.bias"] = layer.bias.detach().cpu().numpy().astype(np.float32)
        return out
