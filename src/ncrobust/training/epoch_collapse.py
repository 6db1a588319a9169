"""In-step Neural Collapse of the training stream (``training.track_collapse``): penultimate NC of
every epoch's training batches as the training steps computed them.

The penultimate features that the training step computes anyway (clean and adversarial,
BatchNorm in the mode of the step, the model changing within the epoch) are kept on the device as
they stream by, and the epoch's numbers come from the collapse package at its end, with no host
synchronisation per step and no extra forward pass. These are not Su et al.'s per-epoch numbers:
their code measures the epoch's stored clean and adversarial images with the end-of-epoch model
in eval mode, which is ``training.epoch_measure`` (:mod:`ncrobust.training.epoch_measure`).
Here: NC1 and the NCC accuracy from :func:`ncrobust.collapse.nc_metrics` (the evaluation's
:class:`~ncrobust.collapse.LayerStats` on one batch), the class means and the nearest-class-centre
decision from :mod:`ncrobust.collapse.accumulate`.

Why keep the features rather than sum moments: the epoch's NC1 needs ``Sigma_W`` only projected on
the span of the class means (:mod:`ncrobust.collapse.measure`), which costs ``O(N d C)`` once the
means are known, while a streaming ``sum h h^T`` costs ``O(N d^2)`` (50x more at d = 512, C = 10:
a third of a small CPU training step); and the NCC accuracy of the adversarial features with the
epoch's clean means needs the features after the means exist anyway. Memory: ``N x d`` float32 per
stream on the training device (50,000 x 512: 102 MB; two streams for adversarial training).
"""

from __future__ import annotations

import math

import torch

from ncrobust.collapse import nc_metrics
from ncrobust.collapse.accumulate import class_means_from, class_sums, half_sq_norms, nearest_mean

_F64 = torch.float64


class EpochFeatures:
    """The penultimate features of one epoch's training stream, in the order they were trained on.

    :meth:`store` copies a batch at host-known rows (a slice: no index kernel, no synchronisation);
    :meth:`metrics` turns the epoch into numbers (once per epoch, synchronising).
    """

    def __init__(self, n: int, dim: int, device: torch.device | str) -> None:
        if n < 1 or dim < 1:
            raise ValueError(f"EpochFeatures needs n >= 1 and dim >= 1, got {n}, {dim}")
        self.features = torch.zeros(n, dim, dtype=torch.float32, device=device)  # [N, d]

    @torch.no_grad()
    def store(self, offset: int, features: torch.Tensor) -> None:
        """Rows ``offset : offset + len(features)`` of the epoch."""
        self.features[offset : offset + features.shape[0]].copy_(features)

    def metrics(self, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
        """``nc1``, ``nc1_trace_ratio`` and ``ncc_accuracy`` of the epoch (``labels`` [N] in the
        stored order); NaN when a class has no sample or a feature is not finite (a partial or
        diverged stream: the training log must not stop the job for it)."""
        counts = torch.bincount(labels, minlength=num_classes)
        if len(counts) != num_classes or not bool((counts > 0).all()) or not bool(torch.isfinite(self.features).all()):
            return {"nc1": math.nan, "nc1_trace_ratio": math.nan, "ncc_accuracy": math.nan}
        m = nc_metrics(self.features, labels, num_classes=num_classes)
        return {k: m[k] for k in ("nc1", "nc1_trace_ratio", "ncc_accuracy")}

    def class_means(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``mu_c`` [C, d] in float64 (NaN rows for classes without a sample); ``labels`` [N]
        int64 in [0, C), in the stored order."""
        return class_means_from(*class_sums(self.features, labels, num_classes))


@torch.no_grad()
def ncc_accuracy(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, *, block: int = 8192) -> float:
    """Share of ``features`` [N, d] whose nearest (Euclidean) row of ``means`` [C, d] is their
    label (:func:`~ncrobust.collapse.accumulate.nearest_mean`, in float64, ``block`` rows at a
    time to bound the float64 copy of a whole epoch). With the clean class means and adversarial
    features: Su et al.'s "NCC accuracy with clean means". NaN when a mean is not finite (a class
    without a sample)."""
    if features.ndim != 2 or means.ndim != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(f"ncc_accuracy needs features [N, d] and means [C, d], got {tuple(features.shape)}, {tuple(means.shape)}")
    if len(features) == 0 or not bool(torch.isfinite(means).all()):
        return math.nan
    M = means.to(device=features.device, dtype=_F64)
    half_sq = half_sq_norms(M)  # [C]
    correct = torch.zeros((), dtype=torch.int64, device=features.device)
    for s in range(0, len(features), block):
        correct += (nearest_mean(features[s : s + block], M, half_sq) == labels[s : s + block]).sum()
    return int(correct) / len(features)
