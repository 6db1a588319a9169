"""Accumulation: the per-batch float64 arithmetic of the collapse package and the streaming
accumulator :class:`LayerStats` built from it.

Each quantity has one computation here, used by :class:`LayerStats`, by the dense functions of
:mod:`ncrobust.collapse.dense` and by the training-time measurement (:mod:`ncrobust.training.epoch_collapse`):

- class sums and counts ``sum_{y_i=c} h_i``, ``N_c`` (:func:`add_class_sums_`) and the class means
  ``mu_c = sums_c / N_c`` (:func:`class_means_from`);
- the nearest class centre (NCC) of features against given means (:func:`nearest_mean`):
  ``argmin_c ||h - mu_c||^2 = argmax_c (h . mu_c - ||mu_c||^2 / 2)`` in float64, ties to the
  smallest class index;
- the joint counts ``(label y, nearest mean k)`` (:func:`add_confusion_`), whose rows normalised
  are the leap matrix (:func:`ncrobust.collapse.measure.leap_matrix`).

Pass 2 of :class:`LayerStats` takes the NCC decision with a set's own means and with its
reference's means through the same :func:`nearest_mean`.

Everything is accumulated in float64 whatever the input dtype (fp16 features included), a block
of rows at a time (:mod:`ncrobust.collapse.blocks`), with no host synchronisation per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .blocks import _blocks
from .checks import _all_finite, _check_counts, _check_finite_rows, _features, _labels, _matrix, _num_classes, _tensor
from .measure import (
    _Geometry,
    class_accuracy,
    class_geometry,
    imbalance_geometry,
    mean_displacement,
    prediction_metrics,
    reference_geometry,
    within_class,
)

_F64 = torch.float64


# --------------------------------------------------------------------------------------------
# the per-batch arithmetic
# --------------------------------------------------------------------------------------------


def _count_(counts: torch.Tensor, index: torch.Tensor) -> None:
    """``counts[k] += #{i: index_i = k}`` in place. Not ``torch.bincount``: it reads the input's
    minimum and maximum back to the host to size its output, two synchronisations per call on a
    GPU, which would stall the per-batch loops."""
    counts.index_add_(0, index, torch.ones_like(index))


def _one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[C, n]``: entry ``(c, i)`` is 1 where ``y_i = c``."""
    return (y == torch.arange(num_classes, device=y.device)[:, None]).to(dtype)


def _add_per_class_(sums: torch.Tensor, y: torch.Tensor, values: torch.Tensor) -> None:
    """``sums[c] += sum_{y_i = c} values_i`` in place (``values`` [n, ...] float64). On a GPU a
    one-hot matmul: deterministic, on the matrix units, where ``index_add_``'s float atomics pile
    onto C rows in a run-dependent order. On the CPU ``index_add_``: 2.3x faster at C = 10, 6x at
    C = 100 (``benchmarks/collapse.py``)."""
    if _sums_by_matmul(sums.device):
        sums.add_(_one_hot(y, sums.shape[0], values.dtype) @ values)
    else:
        sums.index_add_(0, y, values)


def _sums_by_matmul(device: torch.device) -> bool:
    """Whether :func:`_add_per_class_` uses the one-hot matmul on ``device`` (tests force it on the CPU)."""
    return device.type != "cpu"


def add_class_sums_(sums: torch.Tensor, counts: torch.Tensor, H: torch.Tensor, y: torch.Tensor) -> None:
    """``sums[c] += sum_{y_i=c} h_i`` ([C, d] float64) and ``counts[c] += N_c`` ([C] int64) in
    place, for ``H`` [n, d] of any float dtype (cast to float64 a block at a time) and ``y`` [n]
    int64 in range on the same device. No checks, no host synchronisation."""
    for s, e in _blocks(H.shape[0], H.shape[1], H.device):
        _add_per_class_(sums, y[s:e], H[s:e].to(_F64))
    _count_(counts, y)


def class_sums(H: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [C, d] float64, counts [C] int64)`` of a whole feature matrix ``H`` [N, d] (see
    :func:`add_class_sums_`)."""
    sums = torch.zeros(num_classes, H.shape[1], dtype=_F64, device=H.device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=H.device)
    add_class_sums_(sums, counts, H, y)
    return sums, counts


def class_means_from(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``mu_c = sums_c / N_c`` ([C, d] float64); a class without samples gives a NaN row."""
    return sums / counts.unsqueeze(1).to(_F64)


def half_sq_norms(M: torch.Tensor) -> torch.Tensor:
    """``||mu_c||^2 / 2`` ([C]) of the rows of ``M`` [C, d] float64: the class term of the NCC score."""
    return 0.5 * (M * M).sum(dim=1)


def nearest_mean(H: torch.Tensor, M: torch.Tensor, half_sq_norm: torch.Tensor) -> torch.Tensor:
    """The NCC decision: for each row ``h`` of ``H`` [n, d] the index of its nearest row of ``M``
    [C, d] float64 in Euclidean distance ([n] int64), with ``half_sq_norm = half_sq_norms(M)``.

    ``||h - mu_c||^2 = ||h||^2 - 2 h . mu_c + ||mu_c||^2`` and ``||h||^2`` is the same for every
    class, so the decision is ``argmax_c (h . mu_c - ||mu_c||^2 / 2)``: one float64 ``addmm``;
    ties go to the smallest class index. ``H`` is cast to float64; callers pass a block of rows."""
    return torch.addmm(half_sq_norm, H.to(_F64), M.T, beta=-1.0).argmax(dim=1)


def add_confusion_(joint: torch.Tensor, y: torch.Tensor, nearest: torch.Tensor) -> None:
    """``joint[y_i, k_i] += 1`` in place ([C, C] int64, contiguous) for labels ``y`` [n] and
    decisions ``nearest`` [n]: the counts behind the leap matrix."""
    _count_(joint.view(-1), y * joint.shape[0] + nearest)


# --------------------------------------------------------------------------------------------
# the streaming accumulator
# --------------------------------------------------------------------------------------------


class LayerStats:
    """Two-pass streaming collapse statistics of one feature set (one layer, one split, one
    perturbation), O(d C) memory. The dense :func:`~ncrobust.collapse.nc_metrics` and
    :func:`~ncrobust.collapse.perturbation_metrics` run it on one batch.

    For layers too wide for one tensor (d up to 65,536 and more, N = 50,000), never forming a
    d x d matrix nor holding more than one batch::

        clean = LayerStats(C)                                   # the clean set of a split
        for h, y in batches: clean.accumulate_means(h, y)       # pass 1: class sums and counts
        clean.finish_means()
        for h, y in batches: clean.accumulate_scatter(h, y)     # pass 2: the same samples again
        clean.compute()                                         # nc1, nc1_trace_ratio, cdnv, ncc_accuracy
        pert = LayerStats(C, reference=clean)                   # a perturbed set of the same split
        ...                                                     # same two passes
        pert.compute()["ncc_accuracy_clean_means"], pert.reference_geometry()["leap"]

    Pass 1 accumulates per-class sums ``sum_{y_i=c} h_i`` (float64) and counts ``N_c``.
    ``finish_means`` forms ``M``, ``mu_G``, ``M~`` and the thin SVD ``M~ = V S U^T``; ``U`` ([d, r],
    r <= C-1) is an orthonormal eigenbasis of ``Sigma_B`` on the span of the centred means with
    eigenvalues ``lambda_k = s_k^2 / C``. Pass 2 accumulates, per sample and without
    cancellation, ``||h_i - mu_{y_i}||^2`` per class (``tr(Sigma_W)``, ``var_c``), the projected
    within-class scatter ``z_i = U^T (h_i - mu_{y_i})`` (its diagonal ``sum_i z_ik^2`` is all that
    ``tr(Sigma_W Sigma_B^+) = sum_k u_k^T Sigma_W u_k / lambda_k`` needs, since the ``u_k`` are
    eigenvectors of ``Sigma_B``), the NCC prediction with the own means, and with a
    ``reference`` (the clean set) the joint counts of label and nearest reference mean (the leap
    matrix). With ``predictions`` (the network's argmax) pass 2 also counts the agreement with
    both NCC predictions (``nc4``, ``leap_to_prediction``) and the accuracy. The metrics
    themselves are the formulas of :mod:`ncrobust.collapse.measure`.

    ``accumulate_means`` / ``accumulate_scatter`` validate each batch (shape, labels, NaN/inf,
    naming the first bad row) and reject a bad batch whole. ``accumulate_means_unchecked`` /
    ``accumulate_scatter_unchecked`` take batches whose labels the caller has validated (int64 in
    range, on the features' device): no host synchronisation per batch, state stays on the device
    of the first batch, and non-finite features are reported by ``finish_means`` / ``compute``.
    """

    def __init__(self, num_classes: int, *, reference: "LayerStats | None" = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int, got {num_classes!r}")
        if num_classes < 2:
            raise ValueError(f"NC metrics need at least 2 classes, got num_classes={num_classes}")
        if reference is not None:
            if not isinstance(reference, LayerStats) or reference._geometry is None:
                raise ValueError("reference must be a LayerStats after finish_means() (the clean set of the split)")
            if reference.num_classes != num_classes:
                raise ValueError(f"reference has {reference.num_classes} classes, this set {num_classes}")
        self.num_classes = int(num_classes)
        self.reference = reference
        self._d: int | None = None
        self._sums: torch.Tensor | None = None  # sum_{y_i=c} h_i: [C, d]
        self._counts: torch.Tensor | None = None  # N_c: [C]
        self._geometry: _Geometry | None = None
        # the NCC tables of the own means (finish_means)
        self._half_sq_norm: torch.Tensor | None = None  # ||mu_c||^2 / 2: [C]
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None  # reference (M, ||mu_c||^2/2) on our device
        # pass-2 sums (device tensors, read once in compute)
        self._seen: torch.Tensor | None = None  # samples per class: [C]
        self._sq: torch.Tensor | None = None  # sum_{y_i=c} ||h_i - mu_c||^2: [C]
        self._zz: torch.Tensor | None = None  # sum_i z_ik^2 = N diag(U^T Sigma_W U): [r]
        self._own_correct: torch.Tensor | None = None  # NCC (own means) == label
        self._confusion: torch.Tensor | None = None  # [C, C]: label y, nearest reference mean k
        self._with_predictions: bool | None = None
        self._net_correct: torch.Tensor | None = None  # network argmax == label
        self._net_correct_per_class: torch.Tensor | None = None  # network argmax == label, per label: [C]
        self._own_agree: torch.Tensor | None = None  # NCC (own means) == network argmax
        self._ref_agree: torch.Tensor | None = None  # NCC (reference means) == network argmax

    # ---------------------------------------------------------------------------- validation
    def _batch(self, h: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        H = _features(h, "h", flatten=True)
        yy = _labels(y, H.shape[0], H.device, "y")
        _num_classes(yy, self.num_classes, "y")
        d = self._d if self._d is not None else H.shape[1]
        if H.shape[1] != d:
            raise ValueError(f"batch has d={H.shape[1]} features per sample, earlier batches had d={d}")
        if self.reference is not None and self.reference._d != H.shape[1]:
            raise ValueError(f"reference has d={self.reference._d} but the batches have d={H.shape[1]}")
        if not _all_finite(H):
            _check_finite_rows(H, "h")
        return H, yy

    # ---------------------------------------------------------------------------- pass 1
    def accumulate_means(self, h: Any, y: Any) -> None:
        """Pass 1: add a batch ``h`` [B, ...] with labels ``y`` [B] to the class sums and counts."""
        self.accumulate_means_unchecked(*self._batch(h, y))

    def accumulate_means_unchecked(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Pass 1 without checks or host synchronisation: ``H`` [B, ...] (flattened per sample),
        ``y`` [B] int64 in range on ``H``'s device, validated by the caller."""
        if self._geometry is not None:
            raise ValueError("accumulate_means after finish_means: start a new LayerStats for new data")
        H = H.reshape(H.shape[0], -1)
        if self._sums is None:
            self._d = H.shape[1]
            self._sums = torch.zeros(self.num_classes, self._d, dtype=_F64, device=H.device)
            self._counts = torch.zeros(self.num_classes, dtype=torch.int64, device=H.device)
        add_class_sums_(self._sums, self._counts, H, y)

    def finish_means(self) -> None:
        """End pass 1: form the class means, the basis of their span and the NCC tables."""
        if self._geometry is not None:
            return
        if self._sums is None:
            raise ValueError("finish_means before any accumulate_means: pass 1 saw no data")
        _check_counts(self._counts, "pass 1")
        if not bool(torch.isfinite(self._sums).all()):
            raise ValueError("features contain non-finite values (NaN or inf) or overflow float64 when summed per class")
        M = class_means_from(self._sums, self._counts)  # [C, d]
        g = self._geometry = _Geometry(M, self._counts)
        self._half_sq_norm = half_sq_norms(M)  # [C]: the NCC with these means (own, and of the sets that take them as reference)
        C, dev = self.num_classes, M.device
        self._seen = torch.zeros(C, dtype=torch.int64, device=dev)
        self._sq = torch.zeros(C, dtype=_F64, device=dev)
        self._zz = torch.zeros(g.r, dtype=_F64, device=dev)
        self._own_correct = torch.zeros((), dtype=torch.int64, device=dev)
        if self.reference is not None:
            self._ref = (self.reference.means.to(dev), self.reference._half_sq_norm.to(dev))
            self._confusion = torch.zeros(C, C, dtype=torch.int64, device=dev)

    @property
    def means(self) -> torch.Tensor:
        """Class means ``M`` [C, d] float64 (after ``finish_means``)."""
        return self._finished().M

    @property
    def global_mean(self) -> torch.Tensor:
        """``mu_G`` [d] float64, the mean of all samples (after ``finish_means``)."""
        return self._finished().mu_G

    @property
    def counts(self) -> torch.Tensor:
        """Class counts ``N_c`` [C] int64 (after ``finish_means``)."""
        return self._finished().counts

    def _finished(self) -> _Geometry:
        if self._geometry is None:
            raise ValueError("means are known only after finish_means()")
        return self._geometry

    # ---------------------------------------------------------------------------- pass 2
    def accumulate_scatter(self, h: Any, y: Any, predictions: Any = None) -> None:
        """Pass 2: add a batch (the same samples as in pass 1, any batching) to the scatter sums;
        ``predictions`` [B]: the network's argmax on these samples (for ``nc4``, ``accuracy``,
        ``leap_to_prediction``), given for every batch or for none."""
        H, yy = self._batch(h, y)
        pred = None if predictions is None else _labels(predictions, H.shape[0], H.device, "predictions")
        self.accumulate_scatter_unchecked(H, yy, pred)

    def accumulate_scatter_unchecked(self, H: torch.Tensor, y: torch.Tensor, predictions: torch.Tensor | None = None) -> None:
        """Pass 2 without checks or host synchronisation: ``H`` [B, ...], ``y`` [B] int64 in
        range and ``predictions`` [B] int64 (or None, for every batch), validated by the caller."""
        g = self._geometry
        if g is None:
            raise ValueError("accumulate_scatter before finish_means(): run pass 1 first")
        if self._with_predictions is None:
            self._with_predictions = predictions is not None
            if self._with_predictions:
                zero = torch.zeros((), dtype=torch.int64, device=g.M.device)
                self._net_correct, self._own_agree = zero.clone(), zero.clone()
                self._net_correct_per_class = torch.zeros(self.num_classes, dtype=torch.int64, device=g.M.device)
                self._ref_agree = zero.clone() if self._ref is not None else None
        elif self._with_predictions != (predictions is not None):
            raise ValueError("pass predictions for every batch of pass 2 or for none")
        H = H.reshape(H.shape[0], -1).to(g.M.device)
        y = y.to(g.M.device)
        for s, e in _blocks(H.shape[0], H.shape[1], H.device):
            Hb, yb = H[s:e].to(_F64), y[s:e]  # [n, d], [n]
            D = torch.sub(Hb, g.M.index_select(0, yb))  # h_i - mu_{y_i}: [n, d]
            _add_per_class_(self._sq, yb, torch.linalg.vecdot(D, D))  # ||h_i - mu_{y_i}||^2, no cancellation
            Z = D @ g.U  # z_i = U^T (h_i - mu_{y_i}): [n, r]
            self._zz += Z.square().sum(dim=0)
            own = nearest_mean(Hb, g.M, self._half_sq_norm)  # NCC, own means: [n]
            self._own_correct += (own == yb).sum()
            if self._ref is not None:
                nearest = nearest_mean(Hb, *self._ref)  # NCC, reference means: [n]
                add_confusion_(self._confusion, yb, nearest)
            if predictions is not None:
                pb = predictions[s:e]
                hit = pb == yb
                self._net_correct += hit.sum()
                self._net_correct_per_class.index_add_(0, yb, hit.long())  # integer: exact in any order
                self._own_agree += (own == pb).sum()
                if self._ref is not None:
                    self._ref_agree += (nearest == pb).sum()
        _count_(self._seen, y)

    # ---------------------------------------------------------------------------- results
    def _scattered(self) -> _Geometry:
        g = self._geometry
        if g is None:
            raise ValueError("compute before finish_means(): run both passes first")
        if not bool(torch.equal(self._seen, g.counts)):
            raise ValueError(
                f"pass 2 saw {int(self._seen.sum())} samples with class counts differing from pass 1 "
                f"({g.N} samples): both passes must see the same samples"
            )
        if not bool(torch.isfinite(self._sq).all()):
            raise ValueError("features contain non-finite values (NaN or inf) or overflow float64 in the within-class scatter")
        return g

    def compute(self) -> dict[str, float]:
        """``nc1``, ``nc1_trace_ratio``, ``cdnv``, ``ncc_accuracy`` [, ``ncc_accuracy_clean_means``]."""
        g = self._scattered()
        return within_class(g, self._sq, self._zz, self._own_correct, self._confusion)

    def class_geometry(self, weight: Any = None) -> dict[str, float]:
        """NC2 of the centred means (``nc2_equinorm_M``, ``nc2_equiangle_M``) and, with the
        classifier ``weight`` [C, d], NC2 of its rows and NC3 (self-duality)."""
        g = self._finished()
        W = None if weight is None else _matrix(weight, tuple(g.M.shape), "weight", g.M.device)
        return class_geometry(g, W)

    def prediction_metrics(self) -> dict[str, float]:
        """With predictions in pass 2: ``accuracy`` (network argmax == label), ``nc4`` = 1 -
        agreement of the NCC prediction (own means) with the network, and with a reference
        ``leap_to_prediction`` (nearest reference mean == network argmax)."""
        g = self._scattered()
        if not self._with_predictions:
            raise ValueError("prediction_metrics needs the network's predictions in pass 2 (accumulate_scatter(..., predictions))")
        return prediction_metrics(g.N, self._net_correct, self._own_agree, self._ref_agree)

    def class_accuracy(self) -> dict[str, torch.Tensor]:
        """With predictions in pass 2: ``accuracy_per_class`` [C], the share of class-c samples
        (grouped as in pass 2) whose network argmax is c; on a perturbed set the per-class robust
        accuracy. Its count-weighted mean is ``accuracy``."""
        g = self._scattered()
        if not self._with_predictions:
            raise ValueError("class_accuracy needs the network's predictions in pass 2 (accumulate_scatter(..., predictions))")
        return class_accuracy(g.counts, self._net_correct_per_class)

    def imbalance_geometry(self, weight: Any = None, minority: Any = None) -> dict[str, float | torch.Tensor]:
        """The geometry that class imbalance and bias-free classifiers change (Dang et al. 2023,
        Fang et al. 2021), after ``finish_means``:

        - ``mean_norm_per_class`` [C]: ``||mu_c - mu_G||``, to plot against class size
        - ``orthogonality_M``: mean over c != c' of ``|cos(mu_c, mu_c')|`` for the *uncentred*
          means (0 for an orthogonal frame, 1/(C-1) for a simplex ETF centred at the origin)
        - with ``minority`` ([C] bool, at least two True): ``minority_cos_M``, the mean over
          minority pairs c != c' of ``cos(mu_c - mu_G, mu_c' - mu_G)`` (Minority Collapse of the
          means: tends to 1); absent with fewer than two minorities (balanced data)
        - with ``weight`` [C, d]: ``classifier_norm_per_class`` [C] (``||w_c||``),
          ``orthogonality_W`` (the same mean |cos| for the rows ``w_c``) and, with minorities,
          ``minority_cos_W`` (the mean cos between minority rows: Fang et al.'s Minority Collapse)

        A zero-length vector gives ``nan`` in the cosines that involve it (never raises).
        """
        g = self._finished()
        C = self.num_classes
        mask = None
        if minority is not None:
            mask = _tensor(minority, "minority")
            if mask.dtype != torch.bool or tuple(mask.shape) != (C,):
                raise ValueError(f"minority must be a bool mask of shape [{C}], got {mask.dtype} {list(mask.shape)}")
            mask = mask.to(g.M.device)
        W = None if weight is None else _matrix(weight, tuple(g.M.shape), "weight", g.M.device)
        return imbalance_geometry(g, W, mask)

    def mean_displacement(self) -> dict[str, float | torch.Tensor]:
        """How far this set's class means and global mean lie from the reference's, after
        ``finish_means`` (:func:`ncrobust.collapse.measure.mean_displacement`; primes mark this set):

        - ``class_mean_distance_per_class`` [C] = ``||mu'_c - mu_c||``, its mean ``class_mean_distance``
        - ``class_mean_distance_centred_per_class`` [C] = ``||(mu'_c - mu'_G) - (mu_c - mu_G)||``,
          its mean ``class_mean_distance_centred``
        - ``global_mean_distance = ||mu'_G - mu_G||``, ``global_mean_angle`` = angle(mu'_G, mu_G) in degrees
        """
        g = self._finished()
        if self.reference is None:
            raise ValueError("mean_displacement needs a LayerStats built with reference=<the clean set>")
        return mean_displacement(g, self.reference._geometry)

    def reference_geometry(self) -> dict[str, float | torch.Tensor]:
        """How this set sits relative to its reference (the clean set of the split; Su et al. 2024):

        - ``leap`` [C, C]: ``L[y, k]`` = share of class-y samples whose nearest reference mean is k
          (rows sum to 1; for a targeted attack the rows are the targets), ``leap_rate`` = 1 - its
          sample-weighted diagonal
        - ``alignment_angle_per_class`` [C] (degrees) between the centred means ``mu_c - mu_G`` of
          the reference and of this set, and its mean ``alignment_angle``; the same uncentred
          (``alignment_angle_uncentred[_per_class]``)
        - ``mean_shift = ||mu'_G - mu_G|| / sqrt(tr Sigma_B)`` (reference's between-class spread)
        """
        g = self._scattered()
        if self._confusion is None:
            raise ValueError("reference_geometry needs a LayerStats built with reference=<the clean set>")
        return reference_geometry(g, self.reference._geometry, self._confusion)
