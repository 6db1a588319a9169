"""Mixup (Zhang et al. 2018) for the training step: inputs and one-hot targets mixed in pairs.

A step draws ``lam ~ Beta(alpha, alpha)`` (one per batch, as Zhang et al.) and a permutation
``perm`` of the batch, and trains on ``x_mix = lam * x + (1 - lam) * x[perm]`` with the loss
``lam * L(out, y) + (1 - lam) * L(out, y[perm])`` for any loss ``L`` of :mod:`ncrobust.losses`
(for CE and label smoothing this is CE against the mixed soft target; for MSE it is the MSE to
the mixed one-hot target up to a constant).

Both draws come from the epoch's seeded generator on the training device, outside the step (like
the attack's random start: :meth:`ncrobust.training.train.TrainStep.draw_noise`), so a captured CUDA graph
takes them as inputs and a chain of segments draws the same values as one run. The Beta draw is
``Dirichlet(alpha, alpha)``'s first coordinate: ``torch._sample_dirichlet`` is the one Gamma-based
sampler that takes a generator (``torch.distributions.Beta`` draws from the global RNG).

With adversarial training (see the README, "Related questions"):
- PGD-AT attacks every clean example against its own label in its own threat ball, then mixes
  the adversarial examples and their labels (Lamb et al.'s Interpolated Adversarial Training,
  adversarial half): by convexity of the ball, ``mix(x_adv) - mix(x)`` stays within eps, so the
  mixed adversarial input is a valid perturbation of the mixed clean one, and every attack has
  one unambiguous label.
- TRADES mixes the clean inputs, trains the natural term on the mixed targets, and crafts its
  label-free KL attack on the mixed inputs (the KL term needs no label to mix).
"""

from __future__ import annotations

import math

import torch

from ncrobust.losses import LossFn


def check_alpha(alpha) -> float:
    """``alpha`` of ``training.mixup`` as a float (0 = off); a one-line error otherwise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"training.mixup.alpha = {alpha!r}: must be a finite number >= 0 (0 = no mixup)")
    return float(alpha)


def draw_mixup(alpha: float, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam, perm)``: a 0-d float32 ``lam ~ Beta(alpha, alpha)`` and a permutation of ``n``, both
    on the generator's device, without a host synchronisation."""
    device = generator.device
    concentration = torch.full((2,), float(alpha), dtype=torch.float64, device=device)
    lam = torch._sample_dirichlet(concentration, generator=generator)[0].float()
    perm = torch.randperm(n, generator=generator, device=device)
    return lam, perm


def mix(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` (stays in [0, 1] for images in [0, 1])."""
    lam = lam.to(x.dtype)
    return lam * x + (1 - lam) * x[perm]


def mixed_loss(loss: LossFn, logits: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``lam * loss(logits, y) + (1 - lam) * loss(logits, y[perm])``."""
    return lam * loss(logits, y) + (1 - lam) * loss(logits, y[perm])


def majority_label(y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The label with weight >= 1/2 in each mix (``y`` when ``lam >= 0.5``): what the training log
    counts a mixed example's prediction against."""
    return torch.where(lam >= 0.5, y, y[perm])
