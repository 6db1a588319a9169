"""A small convolutional network for small images (digits, MNIST): conv blocks, then one
fully-connected hidden layer whose output is the penultimate representation.

Each conv block is Conv3x3 -> BatchNorm -> ReLU, with a 2x2 max-pool after every block but the
first; taps are ``conv1 .. convK`` and ``penultimate``.
"""

from __future__ import annotations

from torch import nn

from .base import Normalize, TappedNet, linear_classifier
from .registry import register_model


class ConvNet(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean,
        std,
        channels: tuple[int, ...] | list[int] = (32, 64),
        width: int = 128,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not channels or min(channels) < 1 or width < 1:
            raise ValueError(f"convnet needs non-empty positive channels and width, got {channels}, {width}")
        self.normalize = Normalize(mean, std)
        stages: dict[str, nn.Module] = {}
        c_in, size = in_chans, image_size
        for i, c_out in enumerate(channels):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            stages[f"conv{i + 1}"] = nn.Sequential(*layers)
            c_in = c_out
        if size < 1:
            raise ValueError(f"convnet: {len(channels)} blocks pool a {image_size}px image to nothing")
        self.stages = nn.ModuleDict(stages)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * size * size, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)
        )
        self.classifier = linear_classifier("convnet", width, num_classes, bias)


@register_model("convnet")
def convnet(**kwargs) -> ConvNet:
    return ConvNet(**kwargs)
