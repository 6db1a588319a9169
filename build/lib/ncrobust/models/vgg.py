"""VGG11 with BatchNorm (Simonyan & Zisserman 2015, configuration "A"; Ioffe & Szegedy 2015), as in
Su et al. 2024's code (github.com/JingtongSu/robust_neural_collapse), in two variants that differ
only in pooling, so both have 9,231,114 parameters for 3-channel inputs and 10 classes (the count
of the common CIFAR VGG11-BN, kuangliu/pytorch-cifar ``VGG('VGG11')``):

- ``variant="cifar"`` (``vgg.py`` there): conv blocks ``[64, M, 128, M, 256, 256, M, 512, 512, M,
  512, 512]`` of Conv3x3(bias) -> BatchNorm -> ReLU, four 2x2 max-pools (the last block is not
  pooled), then global average pooling (Su et al.'s ``AvgPool2d(2)`` on the 2x2 map of a 32 px
  image) and a single ``Linear(512, C)``. Needs ``image_size >= 16`` (28 px MNIST works).
- ``variant="imagenet"`` (``vgg_imagenet.py::vgg11_bn_pool`` there, used for 160 px ImageNette):
  the last block is max-pooled too (five pools: a 5x5x512 map at 160 px), then global average
  pooling (their ``AvgPool2d(5)``) and ``Linear(512, C)``. Needs ``image_size >= 32``.
- ``variant="auto"`` (the default) picks ``imagenet`` for ``image_size >= 64``, else ``cifar``.

The penultimate features are 512-dimensional at every resolution. Weights are initialised as in
Su et al.'s code: He-normal convolutions (fan-in for ``cifar``, fan-out for ``imagenet``) with zero
biases, unit BatchNorm scales, classifier weights N(0, 0.01^2) with zero bias.

Taps (``taps=``): ``"block"`` (default) one per conv block, ``block1 .. block5`` (each after its
max-pool, where it has one), then ``penultimate`` (the globally pooled ``block5`` output);
``"conv"`` the resolution of Su et al.'s code, the input of every convolution after the first and
of the classifier: ``conv1 .. conv7`` (the output of conv unit k, after its max-pool where a block
ends, is the input of convolution k+1) and ``penultimate``: 8 taps for VGG11. The two layouts have
the same parameters under different names (a checkpoint belongs to one of them).
"""

from __future__ import annotations

from torch import nn

from .base import Normalize, TappedNet, linear_classifier
from .preact_resnet import resolve_variant
from .registry import register_model

VGG11_CFG: list[list[int]] = [[64], [128], [256, 256], [512, 512], [512, 512]]


def _block(c_in: int, widths: list[int], *, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    if pool:
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGG(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean,
        std,
        variant: str = "auto",
        cfg: list[list[int]] | None = None,
        taps: str = "block",
        bias: bool = True,
    ) -> None:
        """``cfg``: output channels of the convolutions of each block (default VGG11); ``taps``:
        ``block`` or ``conv`` (see the module docstring)."""
        super().__init__()
        if taps not in ("block", "conv"):
            raise ValueError(f"vgg taps={taps!r}; allowed: block, conv")
        cfg = VGG11_CFG if cfg is None else [list(block) for block in cfg]
        if not cfg or any(not block or min(block) < 1 for block in cfg):
            raise ValueError(f"vgg cfg must be a non-empty list of non-empty lists of positive widths, got {cfg}")
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"vgg needs positive num_classes and in_chans, got {num_classes}, {in_chans}")
        self.variant = resolve_variant("vgg", variant, image_size)
        n_pools = len(cfg) if self.variant == "imagenet" else len(cfg) - 1
        if image_size < 2**n_pools:
            raise ValueError(
                f"vgg ({self.variant} variant, {n_pools} max-pools) needs image_size >= {2**n_pools}, got {image_size}"
            )
        self.normalize = Normalize(mean, std)
        stages: dict[str, nn.Module] = {}
        c_in = in_chans
        for i, widths in enumerate(cfg, start=1):
            if taps == "block":
                stages[f"block{i}"] = _block(c_in, widths, pool=i <= n_pools)
            else:  # one stage per conv unit; the block's pool ends its last unit
                for j, width in enumerate(widths):
                    stages[f"conv{len(stages) + 1}"] = _block(c_in, [width], pool=i <= n_pools and j == len(widths) - 1)
                    c_in = width
            c_in = widths[-1]
        last = []
        if taps == "conv":  # the last convolution's output feeds the pooling directly: not a tap
            last_name = next(reversed(stages))
            last = [stages.pop(last_name)]
        self.stages = nn.ModuleDict(stages)
        self.head = nn.Sequential(*last, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = linear_classifier("vgg", c_in, num_classes, bias)
        fan_mode = "fan_in" if self.variant == "cifar" else "fan_out"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=fan_mode, nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


@register_model("vgg11_bn")
def vgg11_bn(**kwargs) -> VGG:
    if "cfg" in kwargs:
        raise ValueError("vgg11_bn has a fixed configuration; build ncrobust.models.vgg.VGG(cfg=...) for another")
    return VGG(**kwargs)
