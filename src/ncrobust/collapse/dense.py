"""The collapse metrics of whole feature matrices: input checks, then the accumulator's arithmetic
(:mod:`ncrobust.collapse.accumulate`) on one batch and the formulas of
:mod:`ncrobust.collapse.measure`. Shapes: features ``H`` [N, d], labels ``y`` [N], class means
``M`` [C, d], classifier ``W`` [C, d] and ``b`` [C], logits [N, C].
"""

from __future__ import annotations

from typing import Any

import torch

from .accumulate import LayerStats, add_confusion_, class_means_from, class_sums, half_sq_norms, nearest_mean
from .blocks import _blocks
from .checks import (
    _all_finite,
    _check_counts,
    _check_finite_rows,
    _checked_logits,
    _checked_set,
    _features,
    _labels,
    _matrix,
    _num_classes,
    _tensor,
)
from .measure import _angles, leap_matrix

_F64 = torch.float64


def class_means(features: Any, labels: Any, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``mu_c = 1/N_c sum_{y_i=c} h_i`` and counts ``N_c``.

    Args:
        features: [N, d] real array (any float dtype; accumulated in float64).
        labels: [N] integers in [0, num_classes).
        num_classes: C; defaults to ``max(labels) + 1``.

    Returns:
        ``(M, counts)``: ``M`` [C, d] float64 (row c is ``mu_c``), ``counts`` [C] int64.

    Raises:
        ValueError: on bad shapes, non-finite features, labels out of range, C < 2, or a class
        without any sample.
    """
    H = _features(features)
    y = _labels(labels, H.shape[0], H.device)
    C = _num_classes(y, num_classes)
    sums, counts = class_sums(H, y, C)
    _check_counts(counts, "the labels of the features")
    # A NaN or inf anywhere in H makes its class sum NaN or inf: an O(C d) test instead of O(N d).
    if not bool(torch.isfinite(sums).all()):
        _check_finite_rows(H, "features")
        raise ValueError("features overflow float64 when summed per class; rescale them")
    return class_means_from(sums, counts), counts


def ncc_predict(features: Any, means: Any) -> torch.Tensor:
    """Nearest class centre: ``argmin_c ||h_i - mu_c||^2`` for every row of ``features``
    (:func:`~ncrobust.collapse.accumulate.nearest_mean`, float64, ties to the smallest class index).

    Args:
        features: [N, d] real array. means: [C, d] class means (uncentred), one per row.

    Returns:
        [N] int64 tensor of predicted classes.
    """
    H = _features(features)
    M_t = _tensor(means, "means")
    if M_t.dim() != 2 or M_t.shape[1] != H.shape[1] or M_t.shape[0] < 1:
        raise ValueError(f"means must have shape [C, {H.shape[1]}] to match the features, got {list(M_t.shape)}")
    M = _matrix(M_t, tuple(M_t.shape), "means", H.device)
    if not _all_finite(H):
        _check_finite_rows(H, "features")
    half_sq_norm = half_sq_norms(M)  # [C]
    out = torch.empty(H.shape[0], dtype=torch.int64, device=H.device)
    for s, e in _blocks(H.shape[0], H.shape[1], H.device):
        out[s:e] = nearest_mean(H[s:e], M, half_sq_norm)  # [n]
    return out


def _dense_stats(H: torch.Tensor, y: torch.Tensor, C: int, *, reference=None, predictions=None) -> LayerStats:
    """Both passes of a :class:`LayerStats` over one validated feature matrix."""
    stats = LayerStats(C, reference=reference)
    stats.accumulate_means_unchecked(H, y)
    stats.finish_means()
    stats.accumulate_scatter_unchecked(H, y, predictions)
    stats._scattered()
    return stats


def nc_metrics(
    features: Any,
    labels: Any,
    *,
    num_classes: int | None = None,
    weight: Any = None,
    bias: Any = None,
    logits: Any = None,
) -> dict[str, float]:
    """Neural Collapse metrics NC1-NC4 of one feature set (Papyan et al. 2020; Su et al. 2024).

    Args:
        features: [N, d] penultimate features ``h_i`` (any float dtype, fp16 included).
        labels: [N] integer labels in [0, C). On a perturbed set pass the perturbed features with
            their labels: the metrics then use the perturbed set's own means (Su et al.'s
            "robust NC"); for the targeted attack pass the targets to group by target.
        num_classes: C; defaults to ``max(labels) + 1``. Every class needs a sample.
        weight: [C, d] classifier weights ``W`` (rows ``w_c``): adds ``nc2_equinorm_W``,
            ``nc2_equiangle_W`` and ``nc3``.
        bias: [C] classifier bias ``b``; only used with ``weight`` and without ``logits``, to
            compute ``logits = H W^T + b`` (float64, from the given features).
        logits: [N, C] the network's logits; take precedence over ``H W^T + b``.

    Returns:
        dict of floats. Always: ``nc1`` = tr(Sigma_W Sigma_B^+)/C, ``nc1_trace_ratio`` =
        tr(Sigma_W)/tr(Sigma_B), ``cdnv``, ``nc2_equinorm_M``, ``nc2_equiangle_M``,
        ``ncc_accuracy``. With ``weight``: ``nc2_equinorm_W``, ``nc2_equiangle_W``, ``nc3`` =
        ||W/||W||_F - M~/||M~||_F||_F^2. With ``logits`` (or ``weight``): ``accuracy`` and ``nc4``
        = 1 - mean(NCC prediction == argmax logits). See :mod:`ncrobust.collapse.measure` for the
        formulas.

    The whole matrix is one batch of :class:`LayerStats` (the evaluation streams the same code):
    two passes over the rows, O(N d C) time, no d x d matrix and no N x d float64 copy.
    """
    H, y, C = _checked_set(features, labels, num_classes)
    N, d = H.shape
    if bias is not None and weight is None:
        raise ValueError("bias given without weight: pass weight too (bias is only used to compute logits)")
    W = _matrix(weight, (C, d), "weight", H.device) if weight is not None else None
    b = _matrix(bias, (C,), "bias", H.device) if bias is not None else None
    predictions = None
    if logits is not None:
        predictions = _checked_logits(logits, N, C, H.device).argmax(dim=1)
    elif W is not None:
        predictions = torch.empty(N, dtype=torch.int64, device=H.device)
        for s, e in _blocks(N, d, H.device):
            lg = H[s:e].to(_F64) @ W.T  # [n, C]
            predictions[s:e] = (lg + b if b is not None else lg).argmax(dim=1)
    stats = _dense_stats(H, y, C, predictions=predictions)
    out = {**stats.compute(), **stats.class_geometry(W)}
    if predictions is not None:
        out.update(stats.prediction_metrics())
    return out


def alignment(
    clean_means: Any,
    perturbed_means: Any,
    mu_G_clean: Any = None,
    mu_G_pert: Any = None,
) -> torch.Tensor:
    """Per-class angle in degrees between clean and perturbed (centred) class means.

    ``angle_c = angle(mu_c - mu_G, mu'_c - mu'_G)`` where primes mark the perturbed set (Su et al.
    2024, Sec. 4: the clean and perturbed simplices of an adversarially trained network are aligned).
    Without ``mu_G_clean``/``mu_G_pert`` the means are compared uncentred. Computed as
    ``2 atan2(||a^ - b^||, ||a^ + b^||)`` on the unit vectors (exact near 0 and 180 degrees,
    unlike ``arccos``). A zero-length (centred) mean gives ``nan`` for its class.

    Args:
        clean_means, perturbed_means: [C, d]. mu_G_clean, mu_G_pert: [d] global means, or None.

    Returns:
        [C] float64 tensor of angles in [0, 180].
    """
    A_t = _tensor(clean_means, "clean_means")
    if A_t.dim() != 2:
        raise ValueError(f"clean_means must have shape [C, d], got {list(A_t.shape)}")
    shape = tuple(A_t.shape)
    A = _matrix(A_t, shape, "clean_means", A_t.device)
    B = _matrix(perturbed_means, shape, "perturbed_means", A.device)
    if (mu_G_clean is None) != (mu_G_pert is None):
        raise ValueError("pass both mu_G_clean and mu_G_pert (centred angles) or neither (uncentred)")
    if mu_G_clean is not None:
        A = A - _matrix(mu_G_clean, (shape[1],), "mu_G_clean", A.device)
        B = B - _matrix(mu_G_pert, (shape[1],), "mu_G_pert", A.device)
    return _angles(A, B)


def leap(clean_means: Any, features: Any, labels: Any, num_classes: int | None = None) -> torch.Tensor:
    """Leap matrix ``L[y, k]`` = share of class-y samples whose nearest clean class mean is ``k``.

    Su et al. 2024: perturbed features of a standard-trained network "leap" to another vertex of
    the clean simplex. Rows sum to 1; the diagonal is the per-class NCC accuracy with clean means.
    The same counts as :meth:`LayerStats.reference_geometry`'s ``leap``.

    Args:
        clean_means: [C, d] clean class means. features: [N, d] (perturbed) features.
        labels: [N] in [0, C) (for a targeted attack, the targets). num_classes: C (defaults to
            the number of rows of ``clean_means``). Every class needs a sample.

    Returns:
        [C, C] float64 tensor.
    """
    H = _features(features)
    y = _labels(labels, H.shape[0], H.device)
    M_t = _tensor(clean_means, "clean_means")
    C = _num_classes(y, num_classes if num_classes is not None else (M_t.shape[0] if M_t.dim() == 2 else None))
    M = _matrix(M_t, (C, H.shape[1]), "clean_means", H.device)
    if not _all_finite(H):
        _check_finite_rows(H, "features")
    half_sq_norm = half_sq_norms(M)  # [C]
    joint = torch.zeros(C, C, dtype=torch.int64, device=H.device)  # [C, C] counts
    for s, e in _blocks(H.shape[0], H.shape[1], H.device):
        add_confusion_(joint, y[s:e], nearest_mean(H[s:e], M, half_sq_norm))
    _check_counts(joint.sum(dim=1), "labels")
    return leap_matrix(joint)


def perturbation_metrics(
    clean_features: Any,
    clean_labels: Any,
    features: Any,
    labels: Any,
    *,
    num_classes: int,
    logits: Any = None,
) -> dict[str, float | torch.Tensor]:
    """How a perturbation moves the features relative to the clean simplex (Su et al. 2024).

    ``clean_features``/``clean_labels`` give the clean class means ``mu_c`` and global mean
    ``mu_G`` of the same split; ``features``/``labels`` are the perturbed features (primes below)
    grouped by ``labels`` (true labels, or the targets of a targeted attack).

    Returns floats and tensors:

    - ``ncc_accuracy_clean_means``: share of perturbed samples whose nearest clean mean is their label
    - ``leap_rate`` = 1 - ``ncc_accuracy_clean_means`` (nearest clean mean is another class)
    - ``leap_to_prediction`` (only with ``logits`` [N, C]): share whose nearest clean mean equals
      the network's argmax on the perturbed input
    - ``leap`` [C, C]: the leap matrix (see :func:`leap`), rows sum to 1
    - ``alignment_angle_per_class`` [C] and their mean ``alignment_angle``: degrees between the
      clean and the perturbed centred means ``mu_c - mu_G`` and ``mu'_c - mu'_G``
    - ``alignment_angle_uncentred_per_class``, ``alignment_angle_uncentred``: the same for ``mu_c``, ``mu'_c``
    - ``mean_shift = ||mu'_G - mu_G|| / sqrt(tr Sigma_B)``: the shift of the global mean in units
      of the clean between-class spread (``sqrt(tr Sigma_B)`` is the root-mean-square length of
      the clean centred means), well defined even when ``mu_G`` is 0.
    - ``class_mean_distance[_per_class]`` (``||mu'_c - mu_c||``), ``class_mean_distance_centred[_per_class]``,
      ``global_mean_distance`` (``||mu'_G - mu_G||``) and ``global_mean_angle`` (degrees between
      ``mu'_G`` and ``mu_G``): :meth:`LayerStats.mean_displacement`
    """
    H0, y0, C = _checked_set(clean_features, clean_labels, num_classes, "clean_features", "clean_labels")
    H, y, _ = _checked_set(features, labels, C)
    if H.shape[1] != H0.shape[1]:
        raise ValueError(f"features have d={H.shape[1]} but clean_features have d={H0.shape[1]}")
    predictions = None if logits is None else _checked_logits(logits, H.shape[0], C, H.device).argmax(dim=1)
    clean = LayerStats(C)
    clean.accumulate_means_unchecked(H0, y0)
    clean.finish_means()
    stats = _dense_stats(H, y, C, reference=clean, predictions=predictions)
    out: dict[str, float | torch.Tensor] = {"ncc_accuracy_clean_means": stats.compute()["ncc_accuracy_clean_means"]}
    geometry = stats.reference_geometry()
    out["leap_rate"] = geometry.pop("leap_rate")
    if predictions is not None:
        out["leap_to_prediction"] = stats.prediction_metrics()["leap_to_prediction"]
    out.update(geometry)
    out.update(stats.mean_displacement())
    return out
