"""Neural Collapse of the training stream: penultimate NC statistics accumulated during training.

Su et al. 2024 plot NC of adversarially trained networks on the adversarial examples made during
training, every epoch. Re-attacking a checkpoint (``ncrobust.features``) gives that only at the
checkpoint epochs and with the final model; here the features that the training step computes
anyway are summed on the device as they stream by, so a per-epoch curve costs a few small float64
matrix products per batch and no host synchronisation.

State per stream (paper notation, see :mod:`ncrobust.collapse`), all float64 on the device:

- ``counts`` [C]: ``N_c``;
- ``sums`` [C, d]: ``sum_{y_i=c} (h_i - s)``;
- ``second`` [d, d]: ``sum_i (h_i - s)(h_i - s)^T``;

with a shift ``s`` (the mean of the stream's first batch) that keeps the second moment well
conditioned: features after a ReLU have a large common mean, and ``sum h h^T - N mu mu^T`` about
zero would cancel most of its digits. Per-class sums are one-hot matrix products (deterministic on
a GPU, unlike ``index_add_``, and free of host synchronisation). At the end of the epoch :meth:`StreamingCollapse.compute` gives

- ``Sigma_W = (second - sum_c N_c m_c m_c^T) / N`` with ``m_c = sums_c / N_c`` (shift-free),
- ``M~`` = the centred class means, ``Sigma_B = M~^T M~ / C``,
- ``nc1 = tr(Sigma_W Sigma_B^+) / C`` with ``Sigma_B^+`` truncated to rank ``min(C-1, d)`` and
  numpy's numerical-rank rule, and ``nc1_trace_ratio = tr(Sigma_W) / tr(Sigma_B)``: the same
  definitions as :func:`ncrobust.collapse.nc_metrics` (tested against it).

:func:`ncc_accuracy` classifies features by the nearest of given class means (the epoch's clean
means for the adversarial features: Su et al.'s "NCC with clean means").
"""

from __future__ import annotations

import math

import torch

_F64 = torch.float64


class StreamingCollapse:
    """Penultimate NC1 statistics of a stream of ``(features [n, d], labels [n])`` batches.

    :meth:`add` makes no host synchronisation (it can run inside a captured CUDA graph: it only
    updates its tensors in place); :meth:`reset` zeroes them in place for the next epoch.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str) -> None:
        if num_classes < 2 or dim < 1:
            raise ValueError(f"StreamingCollapse needs num_classes >= 2 and dim >= 1, got {num_classes}, {dim}")
        self.num_classes, self.dim = num_classes, dim
        self.counts = torch.zeros(num_classes, dtype=_F64, device=device)  # N_c: [C]
        self.sums = torch.zeros(num_classes, dim, dtype=_F64, device=device)  # sum (h - s) per class: [C, d]
        self.second = torch.zeros(dim, dim, dtype=_F64, device=device)  # sum (h - s)(h - s)^T: [d, d]
        self.shift = torch.zeros(dim, dtype=_F64, device=device)  # s: [d]
        self.classes = torch.arange(num_classes, device=device)  # for one-hot rows without F.one_hot's checks

    def reset(self) -> None:
        for t in (self.counts, self.sums, self.second, self.shift):
            t.zero_()

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold in one batch: ``features`` [n, d] (any float dtype), ``labels`` [n] in [0, C)."""
        h = features.detach().to(_F64)
        first = self.counts.sum() == 0  # the shift is the first batch's mean (decided on the device)
        self.shift.copy_(torch.where(first, h.mean(dim=0), self.shift))
        z = h - self.shift  # [n, d]
        one_hot = (labels[:, None] == self.classes).to(_F64)  # [n, C]
        self.counts.add_(one_hot.sum(dim=0))
        self.sums.addmm_(one_hot.T, z)
        self.second.addmm_(z.T, z)

    def class_means(self) -> torch.Tensor:
        """The class means ``mu_c`` [C, d] (float64; NaN rows for classes not seen)."""
        return self.sums / self.counts[:, None] + self.shift

    def compute(self) -> dict[str, float]:
        """``nc1`` and ``nc1_trace_ratio`` of everything added since the last reset; NaN when a
        class has no sample (a metric of a partial stream would not be comparable)."""
        return _nc1_from_moments(self.counts, self.sums, self.second)


def _nc1_from_moments(counts: torch.Tensor, sums: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    C, d = sums.shape
    if not bool((counts > 0).all()):
        return {"nc1": math.nan, "nc1_trace_ratio": math.nan}
    N = counts.sum()
    m = sums / counts[:, None]  # shifted class means: [C, d]
    sigma_W = (second - (m.T * counts) @ m) / N  # [d, d]
    mu_G = (counts / N) @ m  # shifted global mean: [d]
    Mc = m - mu_G  # M~ (the shift cancels): [C, d]
    _, S, Vh = torch.linalg.svd(Mc, full_matrices=False)
    tol = float(S.max()) * max(C, d) * torch.finfo(_F64).eps
    r = min(int((S > tol).sum()), C - 1, d)
    U = Vh[:r].T  # eigenvectors of Sigma_B: [d, r]
    lam = S[:r] ** 2 / C  # its eigenvalues: [r]
    projected = torch.linalg.vecdot(U.T @ sigma_W, U.T)  # diag(U^T Sigma_W U): [r]
    tr_B = float((Mc * Mc).sum()) / C
    return {
        "nc1": float((projected / lam).sum()) / C,
        "nc1_trace_ratio": float(torch.trace(sigma_W)) / tr_B,
    }


@torch.no_grad()
def ncc_accuracy(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, *, block: int = 8192) -> float:
    """Share of ``features`` [N, d] whose nearest (Euclidean) row of ``means`` [C, d] is their
    label: ``argmin_c ||h - mu_c||^2 = argmax_c (h . mu_c - ||mu_c||^2 / 2)``, in float64."""
    if features.ndim != 2 or means.ndim != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(f"ncc_accuracy needs features [N, d] and means [C, d], got {tuple(features.shape)}, {tuple(means.shape)}")
    if len(features) == 0 or not bool(torch.isfinite(means).all()):
        return math.nan
    M = means.to(device=features.device, dtype=_F64)
    half_sq = 0.5 * (M * M).sum(dim=1)  # [C]
    correct = torch.zeros((), dtype=torch.int64, device=features.device)
    for s in range(0, len(features), block):
        scores = torch.addmm(half_sq, features[s : s + block].to(_F64), M.T, beta=-1.0)  # [n, C]
        correct += (scores.argmax(dim=1) == labels[s : s + block]).sum()
    return int(correct) / len(features)
