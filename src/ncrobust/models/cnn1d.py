"""The 1D CNN of the MNIST-1D paper (Greydanus & Kobak 2024, ``ConvBase``): three convolutions
of ``channels`` (25) maps, kernel 5 then 3 and 3, stride 2, padding 1, each followed by ReLU,
then the flattened maps (25 x 5 = 125 features for length 40) feed the linear classifier.

``batch_norm`` (default true) puts a BatchNorm after each convolution (whose bias it then
replaces), as the project's other networks: SGD at the workflow's learning rates trains it
without the paper's Adam. ``batch_norm: false`` is the paper's network exactly.

An input ``(N, C, H, W)`` is read as ``C`` channels of a sequence of length ``H * W`` (MNIST-1D
is ``(N, 1, 1, 40)``; an image is read row by row). Taps: ``conv1``, ``conv2`` and
``penultimate`` (the flattened output of ``conv3``, what the classifier reads).
"""

from __future__ import annotations

import math

from torch import nn

from .base import Normalize, TappedNet, image_hw, linear_classifier
from .registry import register_model

KERNELS = (5, 3, 3)
"""The kernel sizes of ``ConvBase``'s three convolutions (stride 2, padding 1 each)."""


class Sequence(nn.Module):
    """``(N, C, H, W)`` -> ``(N, C, H * W)``: the rows of an input as one sequence."""

    def forward(self, x):
        return x.flatten(2)


def _block(c_in: int, c_out: int, kernel: int, batch_norm: bool) -> list[nn.Module]:
    conv = nn.Conv1d(c_in, c_out, kernel, stride=2, padding=1, bias=not batch_norm)
    return [conv, nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]


class CNN1d(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int | tuple[int, int],
        mean,
        std,
        channels: int = 25,
        batch_norm: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"cnn1d option channels must be an integer >= 1, got {channels!r}")
        if not isinstance(batch_norm, bool):
            raise ValueError(f"cnn1d option batch_norm must be true or false, got {batch_norm!r}")
        length = math.prod(image_hw(image_size))
        for k in KERNELS:
            length = (length + 2 - k) // 2 + 1
        if length < 1:
            raise ValueError(f"cnn1d: inputs of {math.prod(image_hw(image_size))} values are too short for its three "
                             "stride-2 convolutions; give sequences of length >= 3")
        self.normalize = Normalize(mean, std)
        self.stages = nn.ModuleDict({
            "conv1": nn.Sequential(Sequence(), *_block(in_chans, channels, KERNELS[0], batch_norm)),
            "conv2": nn.Sequential(*_block(channels, channels, KERNELS[1], batch_norm)),
        })
        self.head = nn.Sequential(*_block(channels, channels, KERNELS[2], batch_norm), nn.Flatten())
        self.classifier = linear_classifier("cnn1d", channels * length, num_classes, bias)


@register_model("cnn1d", any_shape=True)
def cnn1d(**kwargs) -> CNN1d:
    return CNN1d(**kwargs)
