"""ResNet-18 for 32 px images (He et al. 2016), the one of kuangliu/pytorch-cifar, Madry-lab's
``robustness`` library and RobustBench's ``ResNet18``: a 3x3 stem convolution with 64 channels ->
BatchNorm -> ReLU, no stem pooling, four stages of two ``BasicBlock`` with 64, 128, 256, 512
channels (stride 1, 2, 2, 2), then global average pool -> ``Linear(512, C)``. A block is
``conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut (the identity, or, where the
shape changes, a 1x1 convolution -> BN of the block's input), then ReLU after the sum.
11,173,962 parameters for CIFAR-10.

Taps: the output of every residual block, ``stage1_block1 .. stage4_block2`` (the stem is the
first part of ``stage1_block1``), then ``penultimate``. Block outputs are post-ReLU. The pool is
adaptive (``avg_pool2d(4)`` on 32 px inputs), so larger images work too.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .base import Normalize, TappedNet, linear_classifier
from .preact_resnet import conv3x3
from .registry import register_model


class BasicBlock(nn.Module):
    """``x -> conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut, then ReLU.

    The shortcut is the identity, or, where the shape changes, ``conv1x1(stride) -> BN`` of the
    block's input (``shortcut.0``, ``shortcut.1``: RobustBench's and kuangliu's names).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean,
        std,
        width: int = 64,
        bias: bool = True,
    ) -> None:
        """``width``: the first stage's channels (64 in the paper; the stages have 1, 2, 4, 8 x width)."""
        super().__init__()
        if num_classes < 1 or in_chans < 1 or image_size < 1 or width < 1:
            raise ValueError(
                "resnet18 needs positive num_classes, in_chans, image_size and width, got "
                f"{num_classes}, {in_chans}, {image_size}, {width}"
            )
        self.normalize = Normalize(mean, std)
        stem = nn.Sequential(conv3x3(in_chans, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: dict[str, nn.Module] = {}
        c_in = width
        for s, stride in enumerate([1, 2, 2, 2], start=1):
            c_out = width * 2 ** (s - 1)
            for b in (1, 2):
                block = BasicBlock(c_in, c_out, stride if b == 1 else 1)
                first = s == 1 and b == 1
                stages[f"stage{s}_block{b}"] = nn.Sequential(OrderedDict(stem=stem, block=block)) if first else block
                c_in = c_out
        self.stages = nn.ModuleDict(stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = linear_classifier("resnet18", c_in, num_classes, bias)


@register_model("resnet18")
def resnet18(**kwargs) -> ResNet18:
    return ResNet18(**kwargs)
