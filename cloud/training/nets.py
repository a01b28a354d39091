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

from cloud.autoencoder import Layer, layer_names

__all__ = ["Autoencoder"]


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
