"""Wide residual networks WRN-depth-k (Zagoruyko & Komodakis 2016), as used for adversarial
training by Madry et al., TRADES (Zhang et al. 2019) and RobustBench: a 3x3 stem with 16 channels,
three stages of ``n = (depth - 4) / 6`` pre-activation basic blocks with 16k, 32k, 64k channels
(stride 1, 2, 2), then BatchNorm -> ReLU -> global average pool -> ``Linear(64k, C)``.

Parameter counts for CIFAR-10 (the same as RobustBench's ``WideResNet`` with ``sub_block1=False``,
i.e. without TRADES's unused extra block): WRN-28-10 36,479,194; WRN-34-10 46,160,474.
Dropout between the two convolutions of a block is 0 by default (as in the adversarial-training
literature). Weights are initialised as in the reference code: He-normal (fan-out) convolutions,
unit BatchNorm scales, zero biases.

Registered as ``wrn28_10``, ``wrn34_10`` and the generic ``wide_resnet`` (``depth=``,
``widen_factor=``, ``dropout=``). Taps: every block, ``stage1_block1 .. stage3_block{n}`` (the stem
convolution opens ``stage1_block1``), then ``penultimate``. The pool is adaptive (``avg_pool2d(8)``
on 32 px inputs), so larger images work too.
"""

from __future__ import annotations

from torch import nn

from .base import Normalize, TappedNet, linear_classifier
from .preact_resnet import conv3x3, pooled_head, residual_stages
from .registry import register_model


class WideResNet(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean,
        std,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"wide_resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"wide_resnet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"wide_resnet dropout must be in [0, 1), got {dropout}")
        if num_classes < 1 or in_chans < 1 or image_size < 1:
            raise ValueError(
                "wide_resnet needs positive num_classes, in_chans, image_size, "
                f"got {num_classes}, {in_chans}, {image_size}"
            )
        self.normalize = Normalize(mean, std)
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stages = residual_stages(
            stem=conv3x3(in_chans, 16),
            stem_width=16,
            widths=widths,
            strides=[1, 2, 2],
            blocks_per_stage=(depth - 4) // 6,
            dropout=dropout,
        )
        self.head = pooled_head(widths[-1])
        self.classifier = linear_classifier("wide_resnet", widths[-1], num_classes, bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


def _fixed(name: str, depth: int, widen_factor: int, kwargs: dict) -> WideResNet:
    clash = sorted({"depth", "widen_factor"} & kwargs.keys())
    if clash:
        raise ValueError(f"{name} fixes {', '.join(clash)}; use model 'wide_resnet' to choose them")
    return WideResNet(depth=depth, widen_factor=widen_factor, **kwargs)


@register_model("wide_resnet")
def wide_resnet(**kwargs) -> WideResNet:
    return WideResNet(**kwargs)


@register_model("wrn28_10")
def wrn28_10(**kwargs) -> WideResNet:
    return _fixed("wrn28_10", 28, 10, kwargs)


@register_model("wrn34_10")
def wrn34_10(**kwargs) -> WideResNet:
    return _fixed("wrn34_10", 34, 10, kwargs)
