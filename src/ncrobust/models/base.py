"""The contract every model follows.

Inputs are images in [0, 1]; normalisation is the model's first layer, so attacks work in pixel
space. ``model(x)`` gives logits; ``model(x, taps=True)`` gives ``(logits, taps)`` where ``taps``
is an ordered dict ``{tap_name: activation}`` over every hidden stage, whose last entry is
``"penultimate"`` (the features fed to ``model.classifier``, the last ``nn.Linear``). Every model
takes ``bias`` (default ``True``): ``bias=False`` builds the classifier without a bias, and
``normalized_features={"temperature": t}`` (applied by :func:`ncrobust.models.create_model`, so
every family has it): :func:`normalize_features`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, training: bool = False):
    """Run the block with ``model`` in eval mode (train mode with ``training=True``: what
    training-time PGD uses); afterwards, also on error, every submodule gets back its own flag,
    so a model in a mixed state comes back as it was."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


@torch.no_grad()
def tap_activations(model: nn.Module, x: torch.Tensor, layers: list[str] | tuple[str, ...], batch_size: int = 1000):
    """``(logits, {layer: activations})`` of ``x`` through ``model`` in batches of ``batch_size``,
    each tap flattened to ``[N, features]``, in float64 on the CPU (the dense analyses of a
    checkpoint: the probe, mixup geometry). The model runs in its current mode. The evaluation
    streams its batches instead (:mod:`ncrobust.evaluation.checkpoint`): it never holds a whole split."""
    names = list(getattr(model, "tap_names", []))
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ValueError(f"{', '.join(map(repr, missing))}: not a tap of this model; taps: {', '.join(names)}")
    logits, taps = [], {layer: [] for layer in layers}
    for i in range(0, len(x), batch_size):
        out, batch_taps = model(x[i : i + batch_size], taps=True)
        logits.append(out.cpu())
        for layer in layers:
            taps[layer].append(batch_taps[layer].flatten(1).to("cpu", torch.float64))
    return torch.cat(logits), {layer: torch.cat(parts) for layer, parts in taps.items()}


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


def image_hw(image_size) -> tuple[int, int]:
    """``(height, width)`` of the constructors' ``image_size``: a side (square images) or a
    ``(height, width)`` pair (MNIST-1D's sequences are one-row images, ``(1, 40)``)."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


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


class UnitSphere(nn.Module):
    """Rows scaled to unit L2 norm (``F.normalize``: a zero row stays zero instead of NaN)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=1)


class NormalizedLinear(nn.Linear):
    """Yaras et al.'s classifier: ``logits = (W_unit h) / temperature`` with the rows of ``W`` on
    the unit sphere and no bias. ``weight`` is a parametrization (``torch.nn.utils.parametrize``),
    so ``classifier.weight`` is the unit-row matrix the network uses (what the NC2/NC3 metrics and
    the mixup geometry read); the trained tensor is ``parametrizations.weight.original``."""

    def __init__(self, in_features: int, out_features: int, temperature: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.temperature = float(temperature)
        parametrize.register_parametrization(self, "weight", UnitSphere())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight) / self.temperature

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}"


def check_normalized_features(model: str, options) -> float:
    """The temperature of a ``normalized_features`` option; a one-line error for anything else."""
    if not isinstance(options, dict) or set(options) - {"temperature"}:
        raise ValueError(f"{model} option normalized_features must be a mapping {{temperature: t}}, got {options!r}")
    t = options.get("temperature", 0.1)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{model} option normalized_features.temperature must be a finite number > 0, got {t!r}")
    return float(t)


def normalize_features(model: TappedNet, temperature: float) -> TappedNet:
    """Yaras et al.'s setting on any :class:`TappedNet`: the penultimate features (the ``head``'s
    output, so the ``penultimate`` tap too) projected on the unit sphere, and the classifier
    replaced by a bias-free :class:`NormalizedLinear` with ``temperature``. In place; returns it."""
    if not isinstance(model.head, nn.Sequential):
        model.head = nn.Sequential(model.head)
    model.head.append(UnitSphere())
    old = model.classifier
    model.classifier = NormalizedLinear(old.in_features, old.out_features, temperature)
    with torch.no_grad():  # keep the family's own initialisation of the directions
        model.classifier.parametrizations.weight.original.copy_(old.weight)
    return model
