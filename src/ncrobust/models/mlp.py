"""Multilayer perceptron: ``depth`` hidden layers of Linear -> BatchNorm -> ReLU.

The last hidden layer is the penultimate representation; the taps are ``layer1 .. layer{depth-1}``
and ``penultimate``.
"""

from __future__ import annotations

import math

from torch import nn

from .base import Normalize, TappedNet, image_hw, linear_classifier
from .registry import register_model


def _hidden(d_in: int, d_out: int, *, flatten: bool) -> nn.Sequential:
    layers = [nn.Flatten()] if flatten else []
    return nn.Sequential(*layers, nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True))


class MLP(TappedNet):
    def __init__(
        self, *, num_classes: int, in_chans: int, image_size: int | tuple[int, int], mean, std, depth: int = 4, width: int = 256,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"mlp needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        self.normalize = Normalize(mean, std)
        d_in = in_chans * math.prod(image_hw(image_size))
        dims = [d_in] + [width] * depth
        self.stages = nn.ModuleDict(
            {f"layer{i + 1}": _hidden(dims[i], dims[i + 1], flatten=i == 0) for i in range(depth - 1)}
        )
        self.head = _hidden(dims[depth - 1], width, flatten=depth == 1)
        self.classifier = linear_classifier("mlp", width, num_classes, bias)


@register_model("mlp", any_shape=True)
def mlp(**kwargs) -> MLP:
    return MLP(**kwargs)
