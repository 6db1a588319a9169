"""Deep linear network: ``depth`` linear layers of width ``width`` with no activation between them,
then the classifier (Dang et al. 2023, "Neural Collapse in Deep Linear Networks: From Balanced to
Imbalanced Data": with a bias-free classifier the class means and classifier rows of such a network
converge to orthogonal vectors whose lengths depend on the class sizes).

The input is flattened; layer ``k`` is ``Linear(d_{k-1}, width, bias=False)``, followed by
``BatchNorm1d(width)`` only with ``batch_norm=True`` (off by default: BatchNorm's affine shift and
batch statistics make the map affine and batch-dependent, not linear). The classifier is the
usual ``Linear(width, C)`` (``bias=False`` for the bias-free setting). The whole network is linear
(affine with batch norm in eval mode), so its taps are every layer: ``layer1 .. layer{depth-1}``,
then ``penultimate`` (the output of layer ``depth``).
"""

from __future__ import annotations

import math

from torch import nn

from .base import Normalize, TappedNet, image_hw, linear_classifier
from .registry import register_model


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"deep_linear option {name} must be an integer >= 1, got {value!r}")
    return value


class DeepLinear(TappedNet):
    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        image_size: int | tuple[int, int],
        mean,
        std,
        depth: int = 3,
        width: int = 64,
        batch_norm: bool = False,
        bias: bool = True,
    ) -> None:
        """``depth``: linear layers before the classifier (>= 1); ``width``: their width d;
        ``batch_norm``: a BatchNorm1d after each; ``bias``: the classifier's bias."""
        super().__init__()
        depth, width = _positive_int("depth", depth), _positive_int("width", width)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"deep_linear option batch_norm must be true or false, got {batch_norm!r}")
        self.normalize = Normalize(mean, std)
        dims = [in_chans * math.prod(image_hw(image_size))] + [width] * depth

        def layer(i: int) -> nn.Sequential:
            parts: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            parts.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            if batch_norm:
                parts.append(nn.BatchNorm1d(dims[i + 1]))
            return nn.Sequential(*parts)

        self.stages = nn.ModuleDict({f"layer{i + 1}": layer(i) for i in range(depth - 1)})
        self.head = layer(depth - 1)
        self.classifier = linear_classifier("deep_linear", width, num_classes, bias)


@register_model("deep_linear", any_shape=True)
def deep_linear(**kwargs) -> DeepLinear:
    return DeepLinear(**kwargs)
