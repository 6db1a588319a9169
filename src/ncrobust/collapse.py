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


def _block_rows(d: int) -> int:
    return max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (8 * d))


def _blocks(n: int, d: int):
    step = _block_rows(d)
    for start in range(0, n, step):
        yield start, min(n, start + step)


# --------------------------------------------------------------------------------------------
# class means and the geometry derived from them
# --------------------------------------------------------------------------------------------


def _add_class_sums(sums: torch.Tensor, H: torch.Tensor, y: torch.Tensor) -> None:
    """``sums[c] += sum_{y_i = c} h_i`` in float64, block by block (one index_add_ per block)."""
    for s, e in _blocks(H.shape[0], H.shape[1]):
        sums.index_add_(0, y[s:e], H[s:e].to(_F64))


def _means_from(H: torch.Tensor, y: torch.Tensor, C: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(y, minlength=C)  # N_c: [C]
    _check_counts(counts, f"the labels of the {name}")
    sums = torch.zeros(C, H.shape[1], dtype=_F64, device=H.device)  # [C, d]
    _add_class_sums(sums, H, y)
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


class _Scatter:
    """Pass-2 state: sums over samples of what the within-class metrics need."""

    def __init__(self, C: int, r: int, device: torch.device, with_ref: bool):
        self.count = torch.zeros(C, dtype=torch.int64, device=device)  # samples seen per class
        self.sq = torch.zeros(C, dtype=_F64, device=device)  # sum_{y_i=c} ||h_i - mu_c||^2
        self.zz = torch.zeros(r, dtype=_F64, device=device)  # sum_i z_ik^2 = N diag(U^T Sigma_W U)
        self.ncc_correct = 0
        self.ref_correct = 0 if with_ref else None

    def add(
        self,
        H: torch.Tensor,
        y: torch.Tensor,
        g: _Geometry,
        ref: tuple[torch.Tensor, torch.Tensor] | None,
        pred_out: torch.Tensor | None = None,
        name: str = "features",
    ) -> None:
        """Add the rows of ``H`` [n, d] with labels ``y``; a batch with NaN/inf is rejected whole."""
        sq = torch.zeros_like(self.sq)
        zz = torch.zeros_like(self.zz)
        correct = torch.zeros((), dtype=torch.int64, device=H.device)
        ref_correct = torch.zeros((), dtype=torch.int64, device=H.device)
        for s, e in _blocks(H.shape[0], H.shape[1]):
            Hb, yb = H[s:e].to(_F64), y[s:e]  # [n, d], [n]
            D = torch.sub(Hb, g.M.index_select(0, yb))  # h_i - mu_{y_i}: [n, d]
            sq.index_add_(0, yb, torch.linalg.vecdot(D, D))  # ||h_i - mu_{y_i}||^2, no cancellation
            Z = D @ g.U  # z_i = U^T (h_i - mu_{y_i}): [n, r]
            zz += Z.square().sum(dim=0)
            pred = torch.addmm(g.T.index_select(0, yb), Z, g.A).argmax(dim=1)  # NCC, own means: [n]
            correct += (pred == yb).sum()
            if pred_out is not None:
                pred_out[s:e] = pred
            if ref is not None:
                M_ref, half_sq_norm_ref = ref  # [C, d], [C]
                ref_pred = torch.addmm(half_sq_norm_ref, Hb, M_ref.T, beta=-1.0).argmax(dim=1)
                ref_correct += (ref_pred == yb).sum()
        # A NaN or inf in H makes its class's sum of squared distances NaN or inf: an O(C) check.
        if not bool(torch.isfinite(sq).all()):
            _check_finite_rows(H, name)
            raise ValueError(f"{name} overflow float64 in the within-class scatter; rescale them")
        self.sq += sq
        self.zz += zz
        self.count += torch.bincount(y, minlength=self.count.numel())
        self.ncc_correct += int(correct)
        if ref is not None:
            self.ref_correct += int(ref_correct)


def _within_metrics(g: _Geometry, sc: _Scatter) -> dict[str, float]:
    """nc1, nc1_trace_ratio, cdnv and ncc_accuracy from the means and the pass-2 sums."""
    C, N = g.M.shape[0], g.N
    tr_W = float(sc.sq.sum()) / N  # tr(Sigma_W)
    if g.r > 0:
        tr_W_Binv = float((sc.zz / N / g.lam).sum())  # tr(Sigma_W Sigma_B^+)
    else:
        tr_W_Binv = math.nan  # Sigma_B = 0: the class means coincide
    var = sc.sq / g.counts.to(_F64)  # var_c: [C]
    # ||mu_c - mu_c'||^2 from explicit differences (no Gram-matrix cancellation), O(C^2 d).
    dist2 = torch.cdist(g.Mc.unsqueeze(0), g.Mc.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2
    iu = torch.triu_indices(C, C, offset=1, device=g.M.device)
    pair_var = var[iu[0]] + var[iu[1]]
    pair_d2 = dist2[iu[0], iu[1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        cdnv = float(np.mean(pair_var.cpu().numpy() / (2.0 * pair_d2.cpu().numpy())))
    return {
        "nc1": tr_W_Binv / C,
        "nc1_trace_ratio": _div(tr_W, g.tr_B),
        "cdnv": cdnv,
        "ncc_accuracy": sc.ncc_correct / N,
    }


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


# --------------------------------------------------------------------------------------------
# public functions
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
    return _ncc_predict(H, M)


def _ncc_predict(H: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    # argmin_c ||h||^2 - 2 h . mu_c + ||mu_c||^2  =  argmax_c h . mu_c - ||mu_c||^2 / 2
    half_sq_norm = 0.5 * (M * M).sum(dim=1)  # [C]
    out = torch.empty(H.shape[0], dtype=torch.int64, device=H.device)
    for s, e in _blocks(H.shape[0], H.shape[1]):
        out[s:e] = torch.addmm(half_sq_norm, H[s:e].to(_F64), M.T, beta=-1.0).argmax(dim=1)  # [n]
    return out


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
        logits: [N, C] the network's logits; take precedence over ``H W^T + b`` (pass them when
            the features were stored in fp16, so that ``accuracy`` is the network's own).

    Returns:
        dict of floats. Always: ``nc1`` = tr(Sigma_W Sigma_B^+)/C, ``nc1_trace_ratio`` =
        tr(Sigma_W)/tr(Sigma_B), ``cdnv``, ``nc2_equinorm_M``, ``nc2_equiangle_M``,
        ``ncc_accuracy``. With ``weight``: ``nc2_equinorm_W``, ``nc2_equiangle_W``, ``nc3`` =
        ||W/||W||_F - M~/||M~||_F||_F^2. With ``logits`` (or ``weight``): ``accuracy`` and ``nc4``
        = 1 - mean(NCC prediction == argmax logits). See the module docstring for the formulas.

    Two passes over the rows, O(N d C) time; no d x d matrix and no N x d float64 copy is formed.
    """
    H = _features(features)
    y = _labels(labels, H.shape[0], H.device)
    C = _num_classes(y, num_classes)
    N, d = H.shape
    if bias is not None and weight is None:
        raise ValueError("bias given without weight: pass weight too (bias is only used to compute logits)")
    W = _matrix(weight, (C, d), "weight", H.device) if weight is not None else None
    b = _matrix(bias, (C,), "bias", H.device) if bias is not None else None
    if logits is not None:
        logits_t = _tensor(logits, "logits")
        if tuple(logits_t.shape) != (N, C):
            raise ValueError(f"logits must have shape [{N}, {C}] (N, num_classes), got {list(logits_t.shape)}")
        if not _all_finite(logits_t):
            raise ValueError("logits contain non-finite values (NaN or inf)")

    M, counts = _means_from(H, y, C, "features")  # pass 1
    g = _Geometry(M, counts)
    sc = _Scatter(C, g.r, H.device, with_ref=False)
    want_pred = logits is not None or W is not None
    ncc_pred = torch.empty(N, dtype=torch.int64, device=H.device) if want_pred else None
    sc.add(H, y, g, None, ncc_pred)  # pass 2
    out = _within_metrics(g, sc)
    out["nc2_equinorm_M"] = _equinorm(g.Mc)
    out["nc2_equiangle_M"] = _equiangle(g.Mc)

    if W is not None:
        out["nc2_equinorm_W"] = _equinorm(W)
        out["nc2_equiangle_W"] = _equiangle(W)
        W_n = W / torch.linalg.matrix_norm(W)  # W / ||W||_F
        M_n = g.Mc / torch.linalg.matrix_norm(g.Mc)  # M~ / ||M~||_F
        out["nc3"] = float(((W_n - M_n) ** 2).sum())

    if want_pred:
        if logits is not None:
            net_pred = logits_t.to(H.device).argmax(dim=1)
        else:
            net_pred = torch.empty(N, dtype=torch.int64, device=H.device)
            for s, e in _blocks(N, d):
                lg = H[s:e].to(_F64) @ W.T  # [n, C]
                if b is not None:
                    lg = lg + b
                net_pred[s:e] = lg.argmax(dim=1)
        out["accuracy"] = float((net_pred == y).double().mean())
        out["nc4"] = 1.0 - float((ncc_pred == net_pred).double().mean())
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


def _leap_matrix(pred: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    joint = torch.bincount(y * C + pred, minlength=C * C).reshape(C, C).to(_F64)  # [C, C] counts
    rows = joint.sum(dim=1, keepdim=True)
    _check_counts(rows.flatten().long(), "labels")
    return joint / rows


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
    if not _all_finite(H):
        _check_finite_rows(H, "features")
    return _leap_matrix(_ncc_predict(H, M), y, C)


def perturbation_metrics(
    clean_features: Any,
    clean_labels: Any,
    features: Any,
    labels: Any,
    *,
    num_classes: int,
    logits: Any = None,
) -> dict[str, float]:
    """How a perturbation moves the features relative to the clean simplex (Su et al. 2024).

    ``clean_features``/``clean_labels`` give the clean class means ``mu_c`` and global mean
    ``mu_G`` of the same split; ``features``/``labels`` are the perturbed features (primes below)
    grouped by ``labels`` (true labels, or the targets of a targeted attack).

    Returns a dict of floats:

    - ``ncc_accuracy_clean_means``: share of perturbed samples whose nearest clean mean is their label
    - ``leap_rate`` = 1 - ``ncc_accuracy_clean_means`` (nearest clean mean is another class)
    - ``leap_to_prediction`` (only with ``logits`` [N, C]): share whose nearest clean mean equals
      the network's argmax on the perturbed input
    - ``leap[y,k]`` for all y, k: the leap matrix (see :func:`leap`), rows sum to 1
    - ``alignment_angle[c]`` and their mean ``alignment_angle``: degrees between the clean and the
      perturbed centred means ``mu_c - mu_G`` and ``mu'_c - mu'_G``
    - ``alignment_angle_uncentred[c]``, ``alignment_angle_uncentred``: the same for ``mu_c``, ``mu'_c``
    - ``mean_shift = ||mu'_G - mu_G|| / sqrt(tr Sigma_B)``: the shift of the global mean in units
      of the clean between-class spread (``sqrt(tr Sigma_B)`` is the root-mean-square length of
      the clean centred means), well defined even when ``mu_G`` is 0.
    """
    H0 = _features(clean_features, "clean_features")
    y0 = _labels(clean_labels, H0.shape[0], H0.device, "clean_labels")
    H = _features(features)
    y = _labels(labels, H.shape[0], H.device)
    if H.shape[1] != H0.shape[1]:
        raise ValueError(f"features have d={H.shape[1]} but clean_features have d={H0.shape[1]}")
    C = _num_classes(y0, num_classes, "clean_labels")
    _num_classes(y, C, "labels")
    if logits is not None:
        logits_t = _tensor(logits, "logits")
        if tuple(logits_t.shape) != (H.shape[0], C):
            raise ValueError(f"logits must have shape [{H.shape[0]}, {C}] (N, num_classes), got {list(logits_t.shape)}")
        if not _all_finite(logits_t):
            raise ValueError("logits contain non-finite values (NaN or inf)")

    M0, n0 = _means_from(H0, y0, C, "clean_features")
    M1, n1 = _means_from(H, y, C, "features")
    mu_G0 = (n0.to(_F64) / n0.sum()) @ M0  # [d]
    mu_G1 = (n1.to(_F64) / n1.sum()) @ M1  # [d]

    pred = _ncc_predict(H, M0.to(H.device))
    L = _leap_matrix(pred, y, C)
    out: dict[str, float] = {}
    acc = float((pred == y).double().mean())
    out["ncc_accuracy_clean_means"] = acc
    out["leap_rate"] = 1.0 - acc
    if logits is not None:
        net_pred = logits_t.to(H.device).argmax(dim=1)
        out["leap_to_prediction"] = float((pred == net_pred).double().mean())
    tr_B = float(((M0 - mu_G0) ** 2).sum()) / C
    out["mean_shift"] = _div(float(torch.linalg.vector_norm(mu_G1.to(mu_G0.device) - mu_G0)), math.sqrt(tr_B))

    ang = alignment(M0, M1.to(M0.device), mu_G0, mu_G1.to(M0.device)).tolist()
    ang_u = alignment(M0, M1.to(M0.device)).tolist()
    out["alignment_angle"] = float(np.mean(ang))
    out["alignment_angle_uncentred"] = float(np.mean(ang_u))
    for c in range(C):
        out[f"alignment_angle[{c}]"] = ang[c]
    for c in range(C):
        out[f"alignment_angle_uncentred[{c}]"] = ang_u[c]
    L_list = L.tolist()
    for yy in range(C):
        for k in range(C):
            out[f"leap[{yy},{k}]"] = L_list[yy][k]
    return out


# --------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------


class LayerStats:
    """Two-pass streaming NC1 statistics of one (possibly very wide) layer, O(d C) memory.

    For layers too wide for :func:`nc_metrics` (d up to 65,536 and more, N = 50,000), never
    forming a d x d matrix nor holding more than one batch::

        stats = LayerStats(C)                      # clean set
        for h, y in batches: stats.accumulate_means(h, y)     # pass 1: sums and counts
        stats.finish_means()
        for h, y in batches: stats.accumulate_scatter(h, y)   # pass 2: the same batches again
        clean = stats.compute()
        pert = LayerStats(C, ref_means=stats.means)           # a perturbed set, same split

    Pass 1 accumulates per-class sums ``sum_{y_i=c} h_i`` (float64) and counts ``N_c``.
    ``finish_means`` forms ``M``, ``mu_G``, ``M~`` and the thin SVD ``M~ = V S U^T``; ``U`` ([d, r],
    r <= C-1) is an orthonormal eigenbasis of ``Sigma_B`` on the span of the centred means with
    eigenvalues ``lambda_k = s_k^2 / C``. Pass 2 accumulates, per sample and without cancellation,
    ``||h_i - mu_{y_i}||^2`` per class (for ``tr(Sigma_W)`` and ``var_c``), the projected
    within-class scatter ``z_i = U^T (h_i - mu_{y_i})`` (its diagonal ``sum_i z_ik^2`` is all that
    ``tr(Sigma_W Sigma_B^+) = sum_k u_k^T Sigma_W u_k / lambda_k`` needs, since the ``u_k`` are
    eigenvectors of ``Sigma_B``), the NCC correct count with the own means, and with ``ref_means``
    the NCC correct count with those (``ncc_accuracy_clean_means``).

    ``compute()`` returns ``nc1``, ``nc1_trace_ratio``, ``cdnv``, ``ncc_accuracy`` (and
    ``ncc_accuracy_clean_means`` with ``ref_means``), equal to :func:`nc_metrics` up to rounding.
    Batches ``h`` of any shape [B, ...] are flattened to [B, d]; state lives on the device of the
    first batch. Pass 2 must see the same samples as pass 1 (the class counts are checked).
    """

    def __init__(self, num_classes: int, *, ref_means: Any = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int, got {num_classes!r}")
        if num_classes < 2:
            raise ValueError(f"NC metrics need at least 2 classes, got num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self._ref: torch.Tensor | None = None
        if ref_means is not None:
            R = _tensor(ref_means, "ref_means")
            if R.dim() != 2 or R.shape[0] != self.num_classes:
                raise ValueError(f"ref_means must have shape [{self.num_classes}, d], got {list(R.shape)}")
            self._ref = _matrix(R, tuple(R.shape), "ref_means", R.device)
        self._d: int | None = None
        self._sums: torch.Tensor | None = None  # sum_{y_i=c} h_i: [C, d]
        self._counts: torch.Tensor | None = None  # N_c: [C]
        self._geometry: _Geometry | None = None
        self._scatter: _Scatter | None = None
        self._ref_dev: tuple[torch.Tensor, torch.Tensor] | None = None

    def _batch(self, h: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        H = _features(h, "h", flatten=True)
        yy = _labels(y, H.shape[0], H.device, "y")
        _num_classes(yy, self.num_classes, "y")
        if self._d is None:
            self._d = H.shape[1]
            if self._ref is not None and self._ref.shape[1] != self._d:
                raise ValueError(f"ref_means have d={self._ref.shape[1]} but the batches have d={self._d}")
        elif H.shape[1] != self._d:
            raise ValueError(f"batch has d={H.shape[1]} features per sample, earlier batches had d={self._d}")
        return H, yy

    def accumulate_means(self, h: Any, y: Any) -> None:
        """Pass 1: add a batch ``h`` [B, ...] with labels ``y`` [B] to the class sums and counts."""
        if self._geometry is not None:
            raise ValueError("accumulate_means after finish_means: start a new LayerStats for new data")
        H, yy = self._batch(h, y)
        if self._sums is None:
            self._sums = torch.zeros(self.num_classes, self._d, dtype=_F64, device=H.device)
            self._counts = torch.zeros(self.num_classes, dtype=torch.int64, device=H.device)
        H, yy = H.to(self._sums.device), yy.to(self._sums.device)
        sums = torch.zeros_like(self._sums)  # this batch's class sums: [C, d]
        _add_class_sums(sums, H, yy)
        # A NaN or inf in the batch makes a class sum NaN or inf: an O(C d) check, and a bad batch
        # is rejected whole (the state stays usable).
        if not bool(torch.isfinite(sums).all()):
            _check_finite_rows(H, "h")
            raise ValueError("h overflow float64 when summed per class; rescale them")
        self._sums += sums
        self._counts += torch.bincount(yy, minlength=self.num_classes)

    def finish_means(self) -> None:
        """End pass 1: form the class means and the basis of their span."""
        if self._geometry is not None:
            return
        if self._sums is None:
            raise ValueError("finish_means before any accumulate_means: pass 1 saw no data")
        _check_counts(self._counts, "pass 1")
        M = self._sums / self._counts.unsqueeze(1).to(_F64)  # [C, d]
        self._geometry = _Geometry(M, self._counts)
        self._scatter = _Scatter(self.num_classes, self._geometry.r, M.device, with_ref=self._ref is not None)
        if self._ref is not None:
            R = self._ref.to(M.device)
            self._ref_dev = (R, 0.5 * (R * R).sum(dim=1))

    @property
    def means(self) -> torch.Tensor:
        """Class means ``M`` [C, d] float64 (after ``finish_means``), e.g. as another set's ``ref_means``."""
        if self._geometry is None:
            raise ValueError("means are known only after finish_means()")
        return self._geometry.M

    def accumulate_scatter(self, h: Any, y: Any) -> None:
        """Pass 2: add a batch (the same samples as in pass 1, any batching) to the scatter sums."""
        if self._geometry is None:
            raise ValueError("accumulate_scatter before finish_means(): run pass 1 first")
        H, yy = self._batch(h, y)
        dev = self._geometry.M.device
        self._scatter.add(H.to(dev), yy.to(dev), self._geometry, self._ref_dev, name="h")

    def compute(self) -> dict[str, float]:
        """``nc1``, ``nc1_trace_ratio``, ``cdnv``, ``ncc_accuracy`` [, ``ncc_accuracy_clean_means``]."""
        if self._geometry is None:
            raise ValueError("compute before finish_means(): run both passes first")
        seen, expected = self._scatter.count, self._geometry.counts
        if not bool(torch.equal(seen, expected)):
            raise ValueError(
                f"pass 2 saw {int(seen.sum())} samples with class counts differing from pass 1 "
                f"({int(expected.sum())} samples): both passes must see the same samples"
            )
        out = _within_metrics(self._geometry, self._scatter)
        if self._ref is not None:
            out["ncc_accuracy_clean_means"] = self._scatter.ref_correct / self._geometry.N
        return out
