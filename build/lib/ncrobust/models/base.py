"""The contract every model follows.

Inputs are images in [0, 1]; normalisation is the model's first layer, so attacks work in pixel
space. ``model(x)`` gives logits; ``model(x, taps=True)`` gives ``(logits, taps)`` where ``taps``
is an ordered dict ``{tap_name: activation}`` over every hidden stage, whose last entry is
``"penultimate"`` (the features fed to ``model.classifier``, the last ``nn.Linear``). Every model
takes ``bias`` (default ``True``): ``bias=False`` builds the classifier without a bias.
"""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a layer so that the model takes [0, 1] inputs."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if (std <= 0).any():
            raise ValueError(f"normalisation std must be positive, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def linear_classifier(model: str, width: int, num_classes: int, bias: bool) -> nn.Linear:
    """The classifier every model ends with; ``bias=False`` drops its bias (the bias-free
    classifiers of Dang et al.'s and Fang et al.'s analyses of Neural Collapse)."""
    if not isinstance(bias, bool):
        raise ValueError(f"{model} option bias must be true or false, got {bias!r}")
    return nn.Linear(width, num_classes, bias=bias)


class TappedNet(nn.Module):
    """``normalize -> stages (each a tap) -> head (to penultimate features) -> classifier``.

    Subclasses fill ``self.stages`` (an ``nn.ModuleDict`` in forward order), ``self.head`` and
    ``self.classifier``. The penultimate features are reachable without hooks.
    """

    normalize: Normalize
    stages: nn.ModuleDict
    head: nn.Module
    classifier: nn.Linear

    def forward(self, x: torch.Tensor, taps: bool = False):
        h = self.normalize(x)
        acts: dict[str, torch.Tensor] = {}
        for name, stage in self.stages.items():
            h = stage(h)
            if taps:
                acts[name] = h
        features = self.head(h)
        logits = self.classifier(features)
        if not taps:
            return logits
        acts["penultimate"] = features
        return logits, acts

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features only."""
        h = self.normalize(x)
        for stage in self.stages.values():
            h = stage(h)
        return self.head(h)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, penultimate features)`` in one pass: what the training step needs for its
        loss and its streaming NC statistics, without collecting every tap."""
        features = self.features(x)
        return self.classifier(features), features

    @property
    def tap_names(self) -> list[str]:
        """Tap names in forward order, ``"penultimate"`` last."""
        return [*self.stages.keys(), "penultimate"]
