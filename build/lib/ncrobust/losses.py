"""Training losses, each ``loss(logits, y) -> mean loss`` (and ``reduction="none"`` per sample).

``ce`` cross-entropy; ``mse`` squared error against one-hot targets, averaged over classes
(``nn.MSELoss()`` as in Han et al.'s MSE-NC study; summing over classes instead makes the
gradient C times larger and PGD training at lr 0.1 diverges); ``label_smoothing`` cross-entropy with smoothed targets; ``focal``
(Lin et al.) with focusing parameter ``gamma``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, sum, none")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction=reduction)


def mse(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return _reduce((logits - target).pow(2).mean(dim=1), reduction)


def make_label_smoothing(smoothing: float = 0.1) -> LossFn:
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")

    def label_smoothing(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=smoothing)

    return label_smoothing


def make_focal(gamma: float = 2.0) -> LossFn:
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")

    def focal(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        return _reduce(-((1 - logp.exp()) ** gamma) * logp, reduction)

    return focal


LOSSES: dict[str, Callable[..., LossFn]] = {
    "ce": lambda: cross_entropy,
    "mse": lambda: mse,
    "label_smoothing": make_label_smoothing,
    "focal": make_focal,
}


def get_loss(name: str, **options) -> LossFn:
    """The loss ``name`` with its options (``smoothing`` for label_smoothing, ``gamma`` for focal)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    return LOSSES[name](**options)
