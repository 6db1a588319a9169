"""Metrics from accumulated statistics: the NC1-NC4 formulas, the class-mean geometry and the
geometry of a set relative to its reference (notation in the package docstring).

Every function here takes validated float64 tensors (the means, the pass-2 sums and counts of a
:class:`~ncrobust.collapse.accumulate.LayerStats`) and forms no d x d matrix:
``tr(Sigma_W Sigma_B^+)`` only needs ``Sigma_W`` projected on the span of the centred means (at
most C-1 directions, :class:`_Geometry`).

Conventions (one definition each; the README repeats them):

- ``nc1 = tr(Sigma_W Sigma_B^+) / C``; ``Sigma_B^+`` is the pseudo-inverse from the eigenpairs of
  ``Sigma_B`` truncated to rank ``min(C-1, d)``, further dropping eigenvalues that are numerically
  zero (``sigma_k <= sigma_max * max(C, d) * eps`` on the singular values of ``M~``, numpy's
  ``matrix_rank`` rule; this only matters when the class means are genuinely degenerate).
  Papyan's and Su et al.'s code report ``tr(Sigma_W Sigma_B^+)`` without the ``/C``: C times ours.
- ``nc1_trace_ratio = tr(Sigma_W) / tr(Sigma_B)``
- ``cdnv`` = mean over unordered class pairs c < c' of ``(var_c + var_c') / (2 ||mu_c - mu_c'||^2)``
  with ``var_c = 1/N_c sum_{y_i=c} ||h_i - mu_c||^2`` (Galanti et al. 2022's class-distance
  normalised variance)
- ``nc2_equinorm_M`` / ``nc2_equinorm_W`` = std / mean of ``||mu_c - mu_G||`` / of ``||w_c||``
  (std with ddof=1)
- ``nc2_equiangle_M`` / ``nc2_equiangle_W`` = mean over ordered pairs c != c' of
  ``|cos(v_c, v_c') + 1/(C-1)|`` for ``v = M~`` rows / ``W`` rows (W is not centred, as in Papyan)
- ``nc3 = || W/||W||_F - M~/||M~||_F ||_F^2`` (W and the centred means both as [C, d] rows; this is
  Papyan's ``|| W^T/||W||_F - M/||M||_F ||`` with his d x C ``M``)
- imbalance geometry (:func:`imbalance_geometry`): ``orthogonality_M`` / ``_W`` = mean over
  c != c' of ``|cos(v_c, v_c')|`` for the *uncentred* means / the rows of W (Dang et al. 2023: 0
  for the orthogonal frame of bias-free imbalanced training); ``minority_cos_M`` / ``_W`` = mean
  over minority pairs c != c' of ``cos`` of the centred means / the rows of W (Fang et al. 2021's
  Minority Collapse: 1 when the minority classes collapse onto one direction); minorities are the
  classes with at most half the training samples of the largest (:func:`minority_classes`)
- ``nc4 = 1 - mean(NCC prediction == network argmax)``; ``ncc_accuracy`` and ``accuracy`` are the
  NCC prediction and the network argmax against the labels. The NCC (nearest class centre)
  prediction is the nearest *uncentred* class mean in Euclidean distance
  (:func:`~ncrobust.collapse.accumulate.nearest_mean`).
- mean displacement against the reference (:func:`mean_displacement`, every layer; primes mark the
  perturbed set): ``class_mean_distance_per_class`` = ``||mu'_c - mu_c||`` and its mean over classes
  ``class_mean_distance``; ``class_mean_distance_centred[_per_class]`` the same for the centred
  means ``||(mu'_c - mu'_G) - (mu_c - mu_G)||``; ``global_mean_distance = ||mu'_G - mu_G||`` and
  ``global_mean_angle`` = angle in degrees between ``mu'_G`` and ``mu_G`` (Su et al.'s code:
  ``clean_robust_dist_abs``, ``clean_robust_dist``, ``muG_dist``, ``muG_angle``)
- leap matrix ``L[y, k]`` = share of class-y samples whose nearest reference (clean) class mean is
  ``k`` (Su et al. 2024: perturbed features of a standard-trained network "leap" to another vertex
  of the clean simplex); rows sum to 1, ``leap_rate`` = 1 - its sample-weighted diagonal.

Degenerate geometry (for instance a dead layer whose class means coincide) does not raise: the
affected ratios follow IEEE division and come out ``inf`` or ``nan`` so that one bad layer cannot
stop a workflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .checks import _tensor

_F64 = torch.float64


class _Geometry:
    """What the class means give, in paper notation: ``mu_G``, ``M~`` and the eigenbasis of
    ``Sigma_B`` that pass 2 projects on.

    ``M~ = V S U^T`` is the thin SVD of the centred means ([C, d]). The columns of ``U`` ([d, r])
    are the eigenvectors of ``Sigma_B = M~^T M~ / C`` with eigenvalues ``lambda_k = s_k^2 / C``;
    ``r = min(C-1, d, numerical rank)``. Because ``U`` is an eigenbasis of ``Sigma_B``,

        tr(Sigma_W Sigma_B^+) = sum_k u_k^T Sigma_W u_k / lambda_k
                              = sum_k (1/N sum_i z_ik^2) / lambda_k,   z_i = U^T (h_i - mu_{y_i}),

    so only the diagonal of the r x r projected within-class scatter ``U^T Sigma_W U`` is needed
    (any orthonormal basis of a repeated eigenvalue's eigenspace gives the same sum).
    """

    def __init__(self, M: torch.Tensor, counts: torch.Tensor):
        C, d = M.shape
        self.M = M  # [C, d]
        self.counts = counts  # [C]
        self.N = int(counts.sum())
        weights = counts.to(_F64) / self.N  # N_c / N: [C]
        self.mu_G = weights @ M  # [d]
        self.Mc = M - self.mu_G  # M~: [C, d]
        _, S, Vh = torch.linalg.svd(self.Mc, full_matrices=False)  # S: [min(C,d)], Vh: [min(C,d), d]
        tol = float(S.max()) * max(C, d) * torch.finfo(_F64).eps if S.numel() else 0.0
        self.r = min(int((S > tol).sum()), C - 1, d)
        self.U = Vh[: self.r].T.contiguous()  # [d, r]
        self.lam = S[: self.r] ** 2 / C  # eigenvalues of Sigma_B: [r]
        self.tr_B = float((self.Mc * self.Mc).sum()) / C  # tr(Sigma_B)


def _div(a: float, b: float) -> float:
    """IEEE division on floats: x/0 = +-inf, 0/0 = nan (degenerate geometry never raises)."""
    if b == 0.0:
        return math.nan if a == 0.0 else math.copysign(math.inf, a)
    return a / b


def _equinorm(V: torch.Tensor) -> float:
    """std(ddof=1) / mean of the row norms of ``V`` ([C, d])."""
    norms = torch.linalg.vector_norm(V, dim=1)
    return _div(float(norms.std(correction=1)), float(norms.mean()))


def _equiangle(V: torch.Tensor) -> float:
    """Mean over c != c' of ``|cos(v_c, v_c') + 1/(C-1)|`` for the rows of ``V`` ([C, d])."""
    C = V.shape[0]
    Vn = V / torch.linalg.vector_norm(V, dim=1, keepdim=True)  # zero rows give nan, on purpose
    cos = Vn @ Vn.T  # [C, C]
    off = ~torch.eye(C, dtype=torch.bool, device=V.device)
    return float((cos[off] + 1.0 / (C - 1)).abs().mean())


def _cosines(V: torch.Tensor) -> torch.Tensor:
    """``cos(v_c, v_c')`` over ordered pairs c != c' of the rows of ``V`` ([K, d], K >= 2): [K (K-1)]."""
    Vn = V / torch.linalg.vector_norm(V, dim=1, keepdim=True)  # zero rows give nan, on purpose
    off = ~torch.eye(V.shape[0], dtype=torch.bool, device=V.device)
    return (Vn @ Vn.T)[off]


def _mean_abs_cos(V: torch.Tensor) -> float:
    """Mean over c != c' of ``|cos(v_c, v_c')|``: 0 for mutually orthogonal rows."""
    return float(_cosines(V).abs().mean())


def _mean_cos(V: torch.Tensor) -> float:
    """Mean over c != c' of ``cos(v_c, v_c')``: 1 when the rows point the same way."""
    return float(_cosines(V).mean())


def _angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Degrees between the rows of ``A`` and ``B`` ([C, d] each): ``2 atan2(||a^ - b^||, ||a^ + b^||)``
    on the unit vectors (exact near 0 and 180 degrees, unlike ``arccos``); a zero row gives nan."""
    A_n = A / torch.linalg.vector_norm(A, dim=1, keepdim=True)
    B_n = B / torch.linalg.vector_norm(B, dim=1, keepdim=True)
    rad = 2.0 * torch.atan2(torch.linalg.vector_norm(A_n - B_n, dim=1), torch.linalg.vector_norm(A_n + B_n, dim=1))
    return torch.rad2deg(rad)


def leap_matrix(joint: torch.Tensor) -> torch.Tensor:
    """``L[y, k] = joint[y, k] / sum_k' joint[y, k']`` ([C, C] float64) from the joint counts
    ``joint[y, k]`` of label y and nearest reference mean k (a row without samples gives nan)."""
    joint = joint.to(_F64)
    return joint / joint.sum(dim=1, keepdim=True)


def minority_classes(class_counts: Any) -> torch.Tensor:
    """The minority classes of a training set ([C] bool): those with at most half the samples of
    the largest class. For the ``step`` profile (ratio >= 2) these are exactly Cao et al.'s
    minorities; for ``exponential`` the tail beyond half the head's count; a nearly balanced split
    (digits: 130 to 137 per class) has none, as a balanced one."""
    counts = _tensor(class_counts, "class_counts")
    if counts.dim() != 1 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"class_counts must be 1-D integers [C], got {counts.dtype} {list(counts.shape)}")
    return 2 * counts <= counts.max()


# --------------------------------------------------------------------------------------------
# the metrics of one accumulated set
# --------------------------------------------------------------------------------------------


def within_class(
    g: _Geometry, sq: torch.Tensor, zz: torch.Tensor, own_correct: torch.Tensor, joint: torch.Tensor | None,
) -> dict[str, float]:
    """``nc1``, ``nc1_trace_ratio``, ``cdnv``, ``ncc_accuracy`` [, ``ncc_accuracy_clean_means``]
    from the pass-2 sums: ``sq`` [C] (``sum_{y_i=c} ||h_i - mu_c||^2``), ``zz`` [r]
    (``sum_i z_ik^2``), ``own_correct`` (NCC with the own means == label) and, with a reference,
    ``joint`` [C, C] (label, nearest reference mean)."""
    C, N = g.M.shape[0], g.N
    tr_W = float(sq.sum()) / N  # tr(Sigma_W)
    tr_W_Binv = float((zz / N / g.lam).sum()) if g.r > 0 else math.nan  # Sigma_B = 0: means coincide
    var = sq / g.counts.to(_F64)  # var_c: [C]
    # ||mu_c - mu_c'||^2 from explicit differences (no Gram-matrix cancellation), O(C^2 d).
    dist2 = torch.cdist(g.Mc.unsqueeze(0), g.Mc.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2
    iu = torch.triu_indices(C, C, offset=1, device=g.M.device)
    pair_var = var[iu[0]] + var[iu[1]]
    pair_d2 = dist2[iu[0], iu[1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        cdnv = float(np.mean(pair_var.cpu().numpy() / (2.0 * pair_d2.cpu().numpy())))
    out = {
        "nc1": tr_W_Binv / C,
        "nc1_trace_ratio": _div(tr_W, g.tr_B),
        "cdnv": cdnv,
        "ncc_accuracy": int(own_correct) / N,
    }
    if joint is not None:
        out["ncc_accuracy_clean_means"] = int(joint.diagonal().sum()) / N
    return out


def class_geometry(g: _Geometry, W: torch.Tensor | None) -> dict[str, float]:
    """NC2 of the centred means and, with the classifier ``W`` [C, d] float64, NC2 of its rows and NC3."""
    out = {"nc2_equinorm_M": _equinorm(g.Mc), "nc2_equiangle_M": _equiangle(g.Mc)}
    if W is not None:
        out["nc2_equinorm_W"] = _equinorm(W)
        out["nc2_equiangle_W"] = _equiangle(W)
        W_n = W / torch.linalg.matrix_norm(W)  # W / ||W||_F
        M_n = g.Mc / torch.linalg.matrix_norm(g.Mc)  # M~ / ||M~||_F
        out["nc3"] = float(((W_n - M_n) ** 2).sum())
    return out


def prediction_metrics(
    N: int, net_correct: torch.Tensor, own_agree: torch.Tensor, ref_agree: torch.Tensor | None,
) -> dict[str, float]:
    """``accuracy``, ``nc4`` and with a reference ``leap_to_prediction`` from the pass-2 counts of
    network argmax == label, NCC (own means) == argmax, nearest reference mean == argmax."""
    out = {"accuracy": int(net_correct) / N, "nc4": 1.0 - int(own_agree) / N}
    if ref_agree is not None:
        out["leap_to_prediction"] = int(ref_agree) / N
    return out


def class_accuracy(counts: torch.Tensor, net_correct_per_class: torch.Tensor) -> dict[str, torch.Tensor]:
    """``accuracy_per_class`` [C]: network argmax == label among the samples of each class."""
    return {"accuracy_per_class": net_correct_per_class.to(_F64) / counts.to(_F64)}


def imbalance_geometry(g: _Geometry, W: torch.Tensor | None, minority: torch.Tensor | None) -> dict[str, float | torch.Tensor]:
    """``mean_norm_per_class``, ``orthogonality_M`` and, with ``minority`` ([C] bool on the means'
    device) marking at least two classes, ``minority_cos_M``; with ``W`` [C, d] float64 also
    ``classifier_norm_per_class``, ``orthogonality_W`` [, ``minority_cos_W``]."""
    out: dict[str, float | torch.Tensor] = {
        "mean_norm_per_class": torch.linalg.vector_norm(g.Mc, dim=1),
        "orthogonality_M": _mean_abs_cos(g.M),
    }
    if minority is not None and int(minority.sum()) < 2:
        minority = None
    if minority is not None:
        out["minority_cos_M"] = _mean_cos(g.Mc[minority])
    if W is not None:
        out["classifier_norm_per_class"] = torch.linalg.vector_norm(W, dim=1)
        out["orthogonality_W"] = _mean_abs_cos(W)
        if minority is not None:
            out["minority_cos_W"] = _mean_cos(W[minority])
    return out


def reference_geometry(g: _Geometry, ref: _Geometry, joint: torch.Tensor) -> dict[str, float | torch.Tensor]:
    """The leap matrix and rate from ``joint`` [C, C], the alignment angles between the means of
    this set (``g``) and its reference (``ref``), and the shift of the global mean."""
    dev = ref.M.device
    M, mu_G = g.M.to(dev), g.mu_G.to(dev)
    centred = _angles(ref.M - ref.mu_G, M - mu_G)
    uncentred = _angles(ref.M, M)
    return {
        "leap": leap_matrix(joint),
        "leap_rate": 1.0 - float(joint.to(_F64).diagonal().sum()) / g.N,
        "alignment_angle": float(centred.mean()),
        "alignment_angle_per_class": centred,
        "alignment_angle_uncentred": float(uncentred.mean()),
        "alignment_angle_uncentred_per_class": uncentred,
        "mean_shift": _div(float(torch.linalg.vector_norm(mu_G - ref.mu_G)), math.sqrt(ref.tr_B)),
    }


def mean_displacement(g: _Geometry, ref: _Geometry) -> dict[str, float | torch.Tensor]:
    """How far the class means and the global mean of this set (``g``, primes) lie from those of
    its reference (``ref``), in the layer's own units:

    - ``class_mean_distance_per_class`` [C] = ``||mu'_c - mu_c||`` and ``class_mean_distance``, its
      mean over classes
    - ``class_mean_distance_centred_per_class`` [C] = ``||(mu'_c - mu'_G) - (mu_c - mu_G)||`` (the
      simplex moved, with the common translation removed) and ``class_mean_distance_centred``
    - ``global_mean_distance = ||mu'_G - mu_G||`` (``mean_shift`` is it over ``sqrt(tr Sigma_B)``)
    - ``global_mean_angle`` = angle in degrees between ``mu'_G`` and ``mu_G`` (nan when one is 0)

    Su et al.'s code reports the same (``clean_robust_dist_abs``, ``clean_robust_dist``,
    ``muG_dist``, ``muG_angle``, the angle in radians) with ``mu_G`` the unweighted mean of the
    class means; here ``mu_G`` is the mean of all samples, which is the same on balanced data.
    """
    dev = ref.M.device
    M, mu_G = g.M.to(dev), g.mu_G.to(dev)
    per_class = torch.linalg.vector_norm(M - ref.M, dim=1)
    centred = torch.linalg.vector_norm((M - mu_G) - (ref.M - ref.mu_G), dim=1)
    return {
        "class_mean_distance": float(per_class.mean()),
        "class_mean_distance_per_class": per_class,
        "class_mean_distance_centred": float(centred.mean()),
        "class_mean_distance_centred_per_class": centred,
        "global_mean_distance": float(torch.linalg.vector_norm(mu_G - ref.mu_G)),
        "global_mean_angle": float(_angles(mu_G.unsqueeze(0), ref.mu_G.unsqueeze(0))[0]),
    }
