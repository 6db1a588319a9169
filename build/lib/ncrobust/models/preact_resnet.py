"""Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks"), as in
Su et al. 2024's code (github.com/JingtongSu/robust_neural_collapse), in two variants:

``variant="cifar"`` (``preactresnet.py`` there, Rice et al. 2020's network): a 3x3 stem convolution
with 64 channels, no stem pooling, four stages of two ``PreActBlock`` with 64, 128, 256, 512
channels (stride 1, 2, 2, 2), then BatchNorm -> ReLU -> global average pool -> ``Linear(512, C)``.
11,172,170 parameters for CIFAR-10. (kuangliu/pytorch-cifar's PreActResNet18, often quoted at
11,171,146, lacks the final 512-channel BatchNorm: 1,024 parameters fewer.)

``variant="imagenet"`` (``preactresnet_imagenet.py`` there, used for 160 px ImageNette): the
ImageNet stem, 7x7 stride-2 convolution -> BatchNorm -> ReLU -> 3x3 stride-2 max-pool, whose
output feeds the first block without a second pre-activation; the same four stages, final
BatchNorm -> ReLU, global average pool (a 5x5 map at 160 px) -> ``Linear(512, C)``. 11,179,850
parameters for 10 classes. It costs about 1/16 of the CIFAR variant's compute at 160 px.

``variant="auto"`` (the default) picks ``imagenet`` for ``image_size >= 64`` and ``cifar`` below,
which is what Su et al. do. The pool is adaptive, so either variant takes any image size.

Taps: the output of every residual block, ``stage1_block1 .. stage4_block2`` (the stem is the
first part of ``stage1_block1``), then ``penultimate``. Block outputs are pre-activation sums.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .base import Normalize, TappedNet, linear_classifier
from .registry import register_model

VARIANTS = ("auto", "cifar", "imagenet")
IMAGENET_MIN_SIZE = 64  # "auto" picks the ImageNet layout from this image size up


def resolve_variant(name: str, variant: str, image_size: int) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"{name} variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "auto":
        return "imagenet" if image_size >= IMAGENET_MIN_SIZE else "cifar"
    return variant


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """``x -> [BN -> ReLU] -> conv3x3(stride) -> BN -> ReLU -> [dropout] -> conv3x3``, plus the shortcut.

    The shortcut is the identity, or, where the shape changes, a 1x1 convolution of the
    *activated* input (Rice et al.'s ``PreActBlock``; Zagoruyko & Komodakis's WRN block is the
    same with dropout between the convolutions). ``preactivate=False`` drops the first
    BN -> ReLU, for a block whose input is already activated (after the ImageNet stem).
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0, preactivate: bool = True
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in) if preactivate else None
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.bn1 is None else F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


def residual_stages(
    *,
    stem: nn.Module,
    stem_width: int,
    widths: list[int],
    strides: list[int],
    blocks_per_stage: int,
    dropout: float = 0.0,
    preactivate_first: bool = True,
) -> nn.ModuleDict:
    """``stage{s}_block{b}`` -> one ``PreActBlock`` each; ``stem`` opens ``stage1_block1``."""
    stages: dict[str, nn.Module] = {}
    c_in = stem_width
    for s, (width, stride) in enumerate(zip(widths, strides), start=1):
        for b in range(1, blocks_per_stage + 1):
            first = s == 1 and b == 1
            block = PreActBlock(
                c_in, width, stride if b == 1 else 1, dropout, preactivate=preactivate_first or not first
            )
            stages[f"stage{s}_block{b}"] = nn.Sequential(OrderedDict(stem=stem, block=block)) if first else block
            c_in = width
    return nn.ModuleDict(stages)


def pooled_head(channels: int) -> nn.Sequential:
    """Final pre-activation ``BN -> ReLU``, global average pool, flatten: the penultimate features."""
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


class PreActResNet18(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean,
        std,
        width: int = 64,
        variant: str = "auto",
        bias: bool = True,
    ) -> None:
        """``width``: the first stage's channels (64 in the paper; the stages have 1, 2, 4, 8 x width).
        ``variant``: ``"cifar"``, ``"imagenet"`` or ``"auto"`` (see the module docstring)."""
        super().__init__()
        if num_classes < 1 or in_chans < 1 or image_size < 1 or width < 1:
            raise ValueError(
                "preact_resnet18 needs positive num_classes, in_chans, image_size and width, got "
                f"{num_classes}, {in_chans}, {image_size}, {width}"
            )
        self.variant = resolve_variant("preact_resnet18", variant, image_size)
        self.normalize = Normalize(mean, std)
        if self.variant == "cifar":
            stem: nn.Module = conv3x3(in_chans, width)
        else:
            stem = nn.Sequential(
                nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stages = residual_stages(
            stem=stem,
            stem_width=width,
            widths=widths,
            strides=[1, 2, 2, 2],
            blocks_per_stage=2,
            preactivate_first=self.variant == "cifar",
        )
        self.head = pooled_head(widths[-1])
        self.classifier = linear_classifier("preact_resnet18", widths[-1], num_classes, bias)
        if self.variant == "imagenet":  # Su et al.'s preactresnet_imagenet.py initialisation
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)


@register_model("preact_resnet18")
def preact_resnet18(**kwargs) -> PreActResNet18:
    return PreActResNet18(**kwargs)
