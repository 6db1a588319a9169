"""Neural Collapse (NC) metrics: pure math on features, labels and classifier weights, no I/O.

Notation (Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of
deep learning training", PNAS; Su, Zhang, Tsilivis & Kempe 2024, "On the Robustness of Neural
Collapse and the Neural Collapse of Robustness", TMLR, arXiv 2311.07444):

- features ``h_i`` in R^d (``H``: [N, d]), labels ``y_i`` in {0..C-1}, class counts ``N_c``
- class means ``mu_c = 1/N_c sum_{y_i=c} h_i`` (``M``: [C, d], one mean per row)
- global mean ``mu_G = 1/N sum_i h_i`` (the mean of all samples, = sum_c N_c/N mu_c)
- centred means ``M~ = [mu_c - mu_G]`` ([C, d], one centred mean per row)
- ``Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T``      (within-class covariance, [d, d])
- ``Sigma_B = 1/C sum_c (mu_c - mu_G)(mu_c - mu_G)^T``             (between-class covariance, [d, d])
- classifier weights ``W`` ([C, d], one row ``w_c`` per class) and bias ``b`` ([C])

Everything is accumulated in float64 whatever the input dtype (fp16 features included). No
function here forms a d x d matrix: ``tr(Sigma_W Sigma_B^+)`` only needs ``Sigma_W`` projected on
the span of the centred means (at most C-1 directions), so the dense :func:`nc_metrics` and the
streaming :class:`LayerStats` both cost O(N d C) time and O(d C) extra memory.

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
- imbalance geometry (:meth:`LayerStats.imbalance_geometry`): ``orthogonality_M`` / ``_W`` = mean
  over c != c' of ``|cos(v_c, v_c')|`` for the *uncentred* means / the rows of W (Dang et al.
  2023: 0 for the orthogonal frame of bias-free imbalanced training); ``minority_cos_M`` / ``_W`` =
  mean over minority pairs c != c' of ``cos`` of the centred means / the rows of W (Fang et al.
  2021's Minority Collapse: 1 when the minority classes collapse onto one direction); minorities
  are the classes with at most half the training samples of the largest (:func:`minority_classes`)
- ``nc4 = 1 - mean(NCC prediction == network argmax)``; ``ncc_accuracy`` and ``accuracy`` are
  the NCC prediction and the network argmax against the labels. The NCC (nearest class centre)
  prediction is the nearest *uncentred* class mean in Euclidean distance.

Degenerate geometry (for instance a dead layer whose class means coincide) does not raise: the
affected ratios follow IEEE division and come out ``inf`` or ``nan`` so that one bad layer cannot
stop a workflow. Bad *input* (an empty class, a single class, NaN/inf features, labels out of
range, mismatched shapes) raises :class:`ValueError` with a one-line message.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "LayerStats",
    "alignment",
    "class_means",
    "leap",
    "minority_classes",
    "nc_metrics",
    "ncc_predict",
    "perturbation_metrics",
]

_F64 = torch.float64
# Rows are processed in blocks of about this many bytes of float64, so that the float64 copy of a
# block and its difference to the class means stay in cache and no N x d float64 copy is made.
_BLOCK_BYTES = 1 << 20
_MIN_BLOCK_ROWS = 16


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be an array of numbers, got {type(x).__name__}: {err}") from None


def _features(x: Any, name: str = "features", *, flatten: bool = False) -> torch.Tensor:
    """A real-valued [N, d] tensor (not yet cast: blocks are cast to float64 when used)."""
    t = _tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    if flatten and t.dim() >= 2:
        t = t.reshape(t.shape[0], -1)
    if t.dim() != 2:
        want = "[N, ...] (at least 2-D)" if flatten else "[N, d]"
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def _labels(x: Any, n: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    t = _tensor(x, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be integers, got dtype {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the features have {n} rows")
    return t.to(device=device, dtype=torch.int64)


def _num_classes(y: torch.Tensor, num_classes: int | None, name: str = "labels") -> int:
    lo, hi = int(y.min()), int(y.max())
    if num_classes is None:
        num_classes = hi + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"NC metrics need at least 2 classes, got num_classes={num_classes}")
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), found {bad}")
    return num_classes


def _check_counts(counts: torch.Tensor, name: str = "labels") -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ValueError(
            f"{len(empty)} class(es) have no sample in {name} (class {shown}); "
            f"every class 0..{counts.numel() - 1} needs at least one"
        )


def _check_finite_rows(H: torch.Tensor, name: str) -> None:
    """Raise naming the first non-finite row of ``H``; called once a cheap check has failed."""
    bad = (~torch.isfinite(H)).any(dim=1).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"{name} contain non-finite values (NaN or inf) in {bad.numel()} row(s), first at row {int(bad[0])}"
        )


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t`` ([N, ...]): a float64 sum per block of rows (NaN and inf propagate;
    memory bounded by the block), and the exact elementwise test only if a sum is not finite."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    for s, e in _blocks(flat.shape[0], max(1, flat.shape[1])):
        block = flat[s:e]
        if not math.isfinite(float(block.to(_F64).sum())) and not bool(torch.isfinite(block).all()):
            return False
    return True


def _matrix(x: Any, shape: tuple[int, ...], name: str, device: torch.device) -> torch.Tensor:
    t = _tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    t = t.to(device=device, dtype=_F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return t


def _block_rows(d: int, device: torch.device | None = None) -> int:
    """Rows per block: about ``_BLOCK_BYTES`` of float64 on the CPU (cache-sized); on a GPU the
    whole batch at once (the batch already bounds memory, and each block costs kernel launches)."""
    if device is not None and device.type != "cpu":
        return 1 << 62
    return max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (8 * d))


def _blocks(n: int, d: int, device: torch.device | None = None):
    step = _block_rows(d, device)
    for start in range(0, n, step):
        yield start, min(n, start + step)


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


# --------------------------------------------------------------------------------------------
# class means and the geometry derived from them
# --------------------------------------------------------------------------------------------


def _means_from(H: torch.Tensor, y: torch.Tensor, C: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(y, minlength=C)  # N_c: [C]
    _check_counts(counts, f"the labels of the {name}")
    sums = torch.zeros(C, H.shape[1], dtype=_F64, device=H.device)  # [C, d]
    for s, e in _blocks(H.shape[0], H.shape[1], H.device):
        _add_per_class_(sums, y[s:e], H[s:e].to(_F64))
    # A NaN or inf anywhere in H makes its class sum NaN or inf: an O(C d) test instead of O(N d).
    if not bool(torch.isfinite(sums).all()):
        _check_finite_rows(H, name)
        raise ValueError(f"{name} overflow float64 when summed per class; rescale them")
    M = sums / counts.unsqueeze(1).to(_F64)  # [C, d]
    return M, counts


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
    return _means_from(H, y, C, "features")


class _Geometry:
    """Everything pass 2 needs from the class means, in paper notation.

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
        # NCC with the own means through z_i: for mu~_c in span(U) (true up to rounding),
        #   h_i . mu~_c = (h_i - mu_{y_i}) . mu~_c + mu_{y_i} . mu~_c = z_i . A[:, c] + (M M~^T)[y_i, c]
        # and argmin_c ||h - mu_c||^2 = argmax_c ( h . mu~_c - ||mu_c||^2 / 2 )   (h . mu_G is common),
        # so the scores are z_i A + T[y_i] with T = M M~^T - ||mu_c||^2 / 2 (an r-column product).
        self.A = self.U.T @ self.Mc.T  # coordinates of the centred means in U: [r, C]
        self.T = M @ self.Mc.T - 0.5 * (M * M).sum(dim=1)  # [C, C]
        self.half_sq_norm = 0.5 * (M * M).sum(dim=1)  # ||mu_c||^2 / 2: [C], for NCC of other sets


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
# the accumulator: one definition of every metric, streamed or dense
# --------------------------------------------------------------------------------------------


class LayerStats:
    """Two-pass streaming collapse statistics of one feature set (one layer, one split, one
    perturbation), O(d C) memory: the single implementation behind every metric of this module.

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
    ``reference`` (the clean set) the confusion matrix of the NCC prediction with the reference
    means (the leap matrix). With ``predictions`` (the network's argmax) pass 2 also counts the
    agreement with both NCC predictions (``nc4``, ``leap_to_prediction``) and the accuracy.

    The public ``accumulate_*`` validate each batch (shape, labels, NaN/inf, naming the first bad
    row) and reject a bad batch whole. The evaluation core validates its labels once per pass and
    uses the unchecked ``_add_means`` / ``_add_scatter``: no host synchronisation per batch, state
    stays on the device of the first batch, and non-finite features are reported by
    ``finish_means`` / ``compute``.
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
        if self._geometry is not None:
            raise ValueError("accumulate_means after finish_means: start a new LayerStats for new data")
        self._add_means(*self._batch(h, y))

    def _add_means(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Pass 1 without checks or host syncs: ``H`` [B, ...], ``y`` [B] int64 in range."""
        H = H.reshape(H.shape[0], -1)
        if self._sums is None:
            self._d = H.shape[1]
            self._sums = torch.zeros(self.num_classes, self._d, dtype=_F64, device=H.device)
            self._counts = torch.zeros(self.num_classes, dtype=torch.int64, device=H.device)
        for s, e in _blocks(H.shape[0], H.shape[1], H.device):
            _add_per_class_(self._sums, y[s:e], H[s:e].to(_F64))
        _count_(self._counts, y)

    def finish_means(self) -> None:
        """End pass 1: form the class means and the basis of their span."""
        if self._geometry is not None:
            return
        if self._sums is None:
            raise ValueError("finish_means before any accumulate_means: pass 1 saw no data")
        _check_counts(self._counts, "pass 1")
        if not bool(torch.isfinite(self._sums).all()):
            raise ValueError("features contain non-finite values (NaN or inf) or overflow float64 when summed per class")
        M = self._sums / self._counts.unsqueeze(1).to(_F64)  # [C, d]
        g = self._geometry = _Geometry(M, self._counts)
        C, dev = self.num_classes, M.device
        self._seen = torch.zeros(C, dtype=torch.int64, device=dev)
        self._sq = torch.zeros(C, dtype=_F64, device=dev)
        self._zz = torch.zeros(g.r, dtype=_F64, device=dev)
        self._own_correct = torch.zeros((), dtype=torch.int64, device=dev)
        if self.reference is not None:
            ref = self.reference._geometry
            self._ref = (ref.M.to(dev), ref.half_sq_norm.to(dev))
            self._confusion = torch.zeros(C * C, dtype=torch.int64, device=dev)

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
        if self._geometry is None:
            raise ValueError("accumulate_scatter before finish_means(): run pass 1 first")
        H, yy = self._batch(h, y)
        pred = None if predictions is None else _labels(predictions, H.shape[0], H.device, "predictions")
        self._add_scatter(H, yy, pred)

    def _add_scatter(self, H: torch.Tensor, y: torch.Tensor, predictions: torch.Tensor | None = None) -> None:
        """Pass 2 without checks or host syncs."""
        g = self._geometry
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
        C = self.num_classes
        for s, e in _blocks(H.shape[0], H.shape[1], H.device):
            Hb, yb = H[s:e].to(_F64), y[s:e]  # [n, d], [n]
            D = torch.sub(Hb, g.M.index_select(0, yb))  # h_i - mu_{y_i}: [n, d]
            _add_per_class_(self._sq, yb, torch.linalg.vecdot(D, D))  # ||h_i - mu_{y_i}||^2, no cancellation
            Z = D @ g.U  # z_i = U^T (h_i - mu_{y_i}): [n, r]
            self._zz += Z.square().sum(dim=0)
            own = torch.addmm(g.T.index_select(0, yb), Z, g.A).argmax(dim=1)  # NCC, own means: [n]
            self._own_correct += (own == yb).sum()
            if self._ref is not None:
                M_ref, half_sq_norm_ref = self._ref
                nearest = torch.addmm(half_sq_norm_ref, Hb, M_ref.T, beta=-1.0).argmax(dim=1)  # [n]
                _count_(self._confusion, yb * C + nearest)
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
        C, N = self.num_classes, g.N
        tr_W = float(self._sq.sum()) / N  # tr(Sigma_W)
        tr_W_Binv = float((self._zz / N / g.lam).sum()) if g.r > 0 else math.nan  # Sigma_B = 0: means coincide
        var = self._sq / g.counts.to(_F64)  # var_c: [C]
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
            "ncc_accuracy": int(self._own_correct) / N,
        }
        if self._confusion is not None:
            out["ncc_accuracy_clean_means"] = int(self._confusion.reshape(C, C).diagonal().sum()) / N
        return out

    def class_geometry(self, weight: Any = None) -> dict[str, float]:
        """NC2 of the centred means (``nc2_equinorm_M``, ``nc2_equiangle_M``) and, with the
        classifier ``weight`` [C, d], NC2 of its rows and NC3 (self-duality)."""
        g = self._finished()
        out = {"nc2_equinorm_M": _equinorm(g.Mc), "nc2_equiangle_M": _equiangle(g.Mc)}
        if weight is not None:
            W = _matrix(weight, tuple(g.M.shape), "weight", g.M.device)
            out["nc2_equinorm_W"] = _equinorm(W)
            out["nc2_equiangle_W"] = _equiangle(W)
            W_n = W / torch.linalg.matrix_norm(W)  # W / ||W||_F
            M_n = g.Mc / torch.linalg.matrix_norm(g.Mc)  # M~ / ||M~||_F
            out["nc3"] = float(((W_n - M_n) ** 2).sum())
        return out

    def prediction_metrics(self) -> dict[str, float]:
        """With predictions in pass 2: ``accuracy`` (network argmax == label), ``nc4`` = 1 -
        agreement of the NCC prediction (own means) with the network, and with a reference
        ``leap_to_prediction`` (nearest reference mean == network argmax)."""
        g = self._scattered()
        if not self._with_predictions:
            raise ValueError("prediction_metrics needs the network's predictions in pass 2 (accumulate_scatter(..., predictions))")
        out = {"accuracy": int(self._net_correct) / g.N, "nc4": 1.0 - int(self._own_agree) / g.N}
        if self._ref_agree is not None:
            out["leap_to_prediction"] = int(self._ref_agree) / g.N
        return out

    def class_accuracy(self) -> dict[str, torch.Tensor]:
        """With predictions in pass 2: ``accuracy_per_class`` [C], the share of class-c samples
        (grouped as in pass 2) whose network argmax is c; on a perturbed set the per-class robust
        accuracy. Its count-weighted mean is ``accuracy``."""
        g = self._scattered()
        if not self._with_predictions:
            raise ValueError("class_accuracy needs the network's predictions in pass 2 (accumulate_scatter(..., predictions))")
        return {"accuracy_per_class": self._net_correct_per_class.to(_F64) / g.counts.to(_F64)}

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
        out: dict[str, float | torch.Tensor] = {
            "mean_norm_per_class": torch.linalg.vector_norm(g.Mc, dim=1),
            "orthogonality_M": _mean_abs_cos(g.M),
        }
        mask = None
        if minority is not None:
            mask = _tensor(minority, "minority")
            if mask.dtype != torch.bool or tuple(mask.shape) != (C,):
                raise ValueError(f"minority must be a bool mask of shape [{C}], got {mask.dtype} {list(mask.shape)}")
            mask = mask.to(g.M.device)
            if int(mask.sum()) < 2:
                mask = None
        if mask is not None:
            out["minority_cos_M"] = _mean_cos(g.Mc[mask])
        if weight is not None:
            W = _matrix(weight, tuple(g.M.shape), "weight", g.M.device)
            out["classifier_norm_per_class"] = torch.linalg.vector_norm(W, dim=1)
            out["orthogonality_W"] = _mean_abs_cos(W)
            if mask is not None:
                out["minority_cos_W"] = _mean_cos(W[mask])
        return out

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
        ref = self.reference._geometry
        C = self.num_classes
        joint = self._confusion.reshape(C, C).to(_F64)
        L = joint / joint.sum(dim=1, keepdim=True)
        dev = ref.M.device
        centred = alignment(ref.M, g.M.to(dev), ref.mu_G, g.mu_G.to(dev))
        uncentred = alignment(ref.M, g.M.to(dev))
        return {
            "leap": L,
            "leap_rate": 1.0 - float(joint.diagonal().sum()) / g.N,
            "alignment_angle": float(centred.mean()),
            "alignment_angle_per_class": centred,
            "alignment_angle_uncentred": float(uncentred.mean()),
            "alignment_angle_uncentred_per_class": uncentred,
            "mean_shift": _div(float(torch.linalg.vector_norm(g.mu_G.to(dev) - ref.mu_G)), math.sqrt(ref.tr_B)),
        }


def _dense_stats(H: torch.Tensor, y: torch.Tensor, C: int, *, reference=None, predictions=None) -> LayerStats:
    """Both passes of a :class:`LayerStats` over one validated feature matrix."""
    stats = LayerStats(C, reference=reference)
    stats._add_means(H, y)
    stats.finish_means()
    stats._add_scatter(H, y, predictions)
    stats._scattered()
    return stats


# --------------------------------------------------------------------------------------------
# public functions on whole feature matrices
# --------------------------------------------------------------------------------------------


def ncc_predict(features: Any, means: Any) -> torch.Tensor:
    """Nearest class centre: ``argmin_c ||h_i - mu_c||^2`` for every row of ``features``.

    Computed in float64 from ``||h||^2 - 2 h . mu_c + ||mu_c||^2`` with one matmul per block of
    rows: the ``||h||^2`` term is the same for every class and is left out, so the prediction is
    ``argmax_c (h . mu_c - ||mu_c||^2 / 2)``. Ties go to the smallest class index.

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
    half_sq_norm = 0.5 * (M * M).sum(dim=1)  # [C]
    out = torch.empty(H.shape[0], dtype=torch.int64, device=H.device)
    for s, e in _blocks(H.shape[0], H.shape[1], H.device):
        out[s:e] = torch.addmm(half_sq_norm, H[s:e].to(_F64), M.T, beta=-1.0).argmax(dim=1)  # [n]
    return out


def _checked_logits(logits: Any, N: int, C: int, device) -> torch.Tensor:
    t = _tensor(logits, "logits")
    if tuple(t.shape) != (N, C):
        raise ValueError(f"logits must have shape [{N}, {C}] (N, num_classes), got {list(t.shape)}")
    if not _all_finite(t):
        raise ValueError("logits contain non-finite values (NaN or inf)")
    return t.to(device)


def _checked_set(features: Any, labels: Any, num_classes, name: str = "features", labels_name: str = "labels"):
    H = _features(features, name)
    y = _labels(labels, H.shape[0], H.device, labels_name)
    C = _num_classes(y, num_classes, labels_name)
    _check_counts(torch.bincount(y, minlength=C), f"the labels of the {name}")
    if not _all_finite(H):
        _check_finite_rows(H, name)
    return H, y, C


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
        = 1 - mean(NCC prediction == argmax logits). See the module docstring for the formulas.

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
    A_n = A / torch.linalg.vector_norm(A, dim=1, keepdim=True)
    B_n = B / torch.linalg.vector_norm(B, dim=1, keepdim=True)
    rad = 2.0 * torch.atan2(torch.linalg.vector_norm(A_n - B_n, dim=1), torch.linalg.vector_norm(A_n + B_n, dim=1))
    return torch.rad2deg(rad)


def leap(clean_means: Any, features: Any, labels: Any, num_classes: int | None = None) -> torch.Tensor:
    """Leap matrix ``L[y, k]`` = share of class-y samples whose nearest clean class mean is ``k``.

    Su et al. 2024: perturbed features of a standard-trained network "leap" to another vertex of
    the clean simplex. Rows sum to 1; the diagonal is the per-class NCC accuracy with clean means.

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
    pred = ncc_predict(H, M)
    joint = torch.bincount(y * C + pred, minlength=C * C).reshape(C, C).to(_F64)  # [C, C] counts
    rows = joint.sum(dim=1, keepdim=True)
    _check_counts(rows.flatten().long(), "labels")
    return joint / rows


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
    """
    H0, y0, C = _checked_set(clean_features, clean_labels, num_classes, "clean_features", "clean_labels")
    H, y, _ = _checked_set(features, labels, C)
    if H.shape[1] != H0.shape[1]:
        raise ValueError(f"features have d={H.shape[1]} but clean_features have d={H0.shape[1]}")
    predictions = None if logits is None else _checked_logits(logits, H.shape[0], C, H.device).argmax(dim=1)
    clean = LayerStats(C)
    clean._add_means(H0, y0)
    clean.finish_means()
    stats = _dense_stats(H, y, C, reference=clean, predictions=predictions)
    out: dict[str, float | torch.Tensor] = {"ncc_accuracy_clean_means": stats.compute()["ncc_accuracy_clean_means"]}
    geometry = stats.reference_geometry()
    out["leap_rate"] = geometry.pop("leap_rate")
    if predictions is not None:
        out["leap_to_prediction"] = stats.prediction_metrics()["leap_to_prediction"]
    out.update(geometry)
    return out
