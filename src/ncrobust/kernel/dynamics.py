"""What a kernel and its trajectory over training say: pure functions on float64 tensors.

Kernels are symmetric ``[N, N]`` matrices (a trace NTK, or the ``[N * C, N * C]`` full one where no
labels are involved); every function computes in float64 whatever the input dtype. Notation: the
Frobenius inner product ``<A, B> = Tr(A B^T)``, ``sim(A, B) = <A, B> / (||A||_F ||B||_F)`` (the
cosine of the angle between two kernels), eigenvalues ``lambda_1 >= lambda_2 >= ...`` with
orthonormal eigenvectors ``v_i`` (ranks are 1-based, as in the papers: rank 1 is the top one).

- The kernel distance of Fort et al. 2020 ("Deep learning versus kernel learning", NeurIPS), used
  by Tsilivis & Kempe 2022 ("What Can the Neural Tangent Kernel Tell Us About Adversarial
  Robustness?", NeurIPS): ``S(K, K') = 1 - sim(K, K')``.
- Tsilivis & Kempe's polar view of the kernel's trajectory ``K_0 .. K_T`` (:func:`polar_view`).
- The top-eigenvalue mass ``sum_{i<=k} lambda_i^2 / sum_i lambda_i^2`` (the share of
  ``||K||_F^2`` in the top-k eigenspace).
- Kernel-target alignment (Cristianini et al. 2002; centred: Cortes, Mohri & Rostamizadeh 2012).
- Tsilivis & Kempe's eigen-features ``f_i(x) = lambda_i^-1 K(x, X) v_i v_i^T Y`` and the accuracy
  of each alone (:func:`eigen_feature_accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _square(K, name: str = "K") -> torch.Tensor:
    if not isinstance(K, torch.Tensor) or K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got {type(K).__name__} {tuple(getattr(K, 'shape', ()))}")
    K = K.detach().to(torch.float64)
    if not torch.isfinite(K).all():
        raise ValueError(f"{name} holds NaN or inf")
    return K


def _pair(K1, K2) -> tuple[torch.Tensor, torch.Tensor]:
    K1, K2 = _square(K1, "K1"), _square(K2, "K2")
    if K1.shape != K2.shape:
        raise ValueError(f"K1 and K2 must have one shape, got {tuple(K1.shape)} and {tuple(K2.shape)}")
    return K1, K2.to(K1.device)


def _similarity(A: torch.Tensor, B: torch.Tensor) -> float:
    """``<A, B> / (||A|| ||B||)`` in [-1, 1] (clamped against rounding); NaN if either is zero."""
    na, nb = torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(B)
    if na == 0 or nb == 0:
        return math.nan
    return float(((A / na) * (B / nb)).sum().clamp(-1.0, 1.0))


def _angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """``arccos sim(A, B)`` in radians, as ``2 atan2(||a - b||, ||a + b||)`` of the normalised
    kernels (Kahan's form: exact 0 for equal kernels, accurate for small angles, where ``arccos``
    of a rounded cosine is off by ~1e-8); NaN if either is zero."""
    na, nb = torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(B)
    if na == 0 or nb == 0:
        return math.nan
    a, b = A / na, B / nb
    return 2.0 * math.atan2(float(torch.linalg.matrix_norm(a - b)), float(torch.linalg.matrix_norm(a + b)))


def kernel_similarity(K1: torch.Tensor, K2: torch.Tensor) -> float:
    """``sim(K1, K2) = Tr(K1 K2^T) / sqrt(Tr(K1 K1^T) Tr(K2 K2^T))``: 1 for proportional kernels."""
    return _similarity(*_pair(K1, K2))


def kernel_distance(K1: torch.Tensor, K2: torch.Tensor) -> float:
    """Fort et al.'s kernel distance ``S = 1 - sim(K1, K2)``: 0 for equal or proportional kernels
    (positive factor), symmetric, in [0, 1] for positive semi-definite kernels (their inner product
    is >= 0), 2 at most. NaN if either kernel is zero."""
    return 1.0 - kernel_similarity(K1, K2)


def eigendecomposition(K: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues [N] descending, eigenvectors [N, k])`` of the symmetric part of ``K``, float64;
    ``k=None``: all ``N`` eigenvectors. Column ``i`` is the eigenvector of rank ``i + 1``; each is
    signed so that its largest-magnitude entry (the first, on ties) is positive, so the result does
    not depend on the solver's sign choice."""
    K = _square(K)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K.shape[0]):
        raise ValueError(f"k must be None or an integer in [1, {K.shape[0]}], got {k!r}")
    values, vectors = torch.linalg.eigh((K + K.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    if k is not None:
        vectors = vectors[:, :k]
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, pivot[None]))
    signs[signs == 0] = 1
    return values, vectors * signs


def top_eigenvalue_mass(eigenvalues: torch.Tensor, k: int) -> float:
    """``sum_{i<=k} lambda_i^2 / sum_i lambda_i^2`` over the eigenvalues sorted descending: the
    share of ``||K||_F^2`` that the top-k eigenspace holds (Tsilivis & Kempe's measure of how much
    the kernel concentrates on its top eigenspace)."""
    lam = torch.as_tensor(eigenvalues).detach().to(torch.float64).flatten()
    if lam.numel() == 0 or not torch.isfinite(lam).all():
        raise ValueError(f"eigenvalues must be a non-empty finite vector, got {lam.numel()} values")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= lam.numel():
        raise ValueError(f"k must be an integer in [1, {lam.numel()}], got {k!r}")
    sq = lam.sort(descending=True).values ** 2
    total = sq.sum()
    return math.nan if total == 0 else float(sq[:k].sum() / total)


def _one_hot(labels, num_classes, n: int, name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"{name} must be an integer vector, got {type(labels).__name__} {getattr(labels, 'dtype', '')}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries, got {labels.shape[0]}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)


def kernel_target_alignment(K: torch.Tensor, labels: torch.Tensor, num_classes: int, *, centered: bool = True) -> float:
    """Alignment of ``K`` with the ideal kernel ``Y Y^T`` of the one-hot labels ``Y`` [N, C]:
    ``sim(H K H, H Y Y^T H)`` with the centring ``H = I - 1 1^T / N`` (Cortes, Mohri & Rostamizadeh
    2012, "Algorithms for Learning Kernels Based on Centered Alignment", JMLR; Kornblith et al.
    2019's linear CKA when ``K`` is a Gram matrix), or ``sim(K, Y Y^T)`` with ``centered=False``
    (Cristianini et al. 2002). Centring removes the constant offset that makes every NTK look
    aligned with any balanced labels. 1 for ``K = c Y Y^T``; computed as
    ``tr(Yc^T K Yc) / (||H K H||_F ||Yc^T Yc||_F)`` with ``Yc = H Y``, no ``N x N`` target."""
    K = _square(K)
    Y = _one_hot(labels, num_classes, K.shape[0], "labels").to(K.device)
    if centered:
        Y = Y - Y.mean(dim=0, keepdim=True)
        K = K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()
    nk, ny = torch.linalg.matrix_norm(K), torch.linalg.matrix_norm(Y.T @ Y)
    if nk == 0 or ny == 0:
        return math.nan
    return float((Y * (K @ Y)).sum() / (nk * ny))


def _stack(kernels, name: str = "kernels") -> list[torch.Tensor]:
    kernels = list(kernels)
    if len(kernels) < 2:
        raise ValueError(f"{name} needs at least two kernels (a trajectory), got {len(kernels)}")
    out = [_square(K, f"{name}[{i}]") for i, K in enumerate(kernels)]
    if any(K.shape != out[0].shape for K in out):
        raise ValueError(f"{name} must all have one shape, got {sorted({tuple(K.shape) for K in out})}")
    return [K.to(out[0].device) for K in out]


def polar_view(kernels: Sequence[torch.Tensor], *, k: int = 10) -> dict[str, torch.Tensor]:
    """Tsilivis & Kempe's polar coordinates of a kernel trajectory ``K_0 .. K_T`` (``kernels[0]``
    at initialisation, ``kernels[-1]`` at the end), each a float64 vector over ``t = 0 .. T``:

    - ``r``: ``||K_t - K_0||_F / ||K_T - K_0||_F`` (0 at ``t = 0``, 1 at ``t = T``; NaN if ``K_T = K_0``);
    - ``theta``: ``arccos sim(K_t, K_0)`` in radians (0 at ``t = 0``): how far the kernel has rotated;
    - ``theta_top``: the same angle within the top-``k`` eigenspace of ``K_t``:
      ``arccos sim(V^T K_t V, V^T K_0 V)`` with ``V`` [N, k] the top-``k`` eigenvectors of ``K_t``
      (equivalently, both kernels projected by ``P = V V^T``, since ``||P A P||_F = ||V^T A V||_F``);
    - ``theta_bottom``: the same within the rest of ``K_t``'s spectrum, eigenvectors ``k+1 .. N``.

    A kernel that keeps rotating in its top eigenspace while its bottom one stays put learns its
    top features; Tsilivis & Kempe see adversarial training do so more, and earlier."""
    Ks = _stack(kernels)
    n = Ks[0].shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an integer in [1, {n - 1}] (a top and a bottom eigenspace), got {k!r}")
    K0 = Ks[0]
    span = torch.linalg.matrix_norm(Ks[-1] - K0)
    r, theta, top, bottom = [], [], [], []
    for K in Ks:
        r.append(float(torch.linalg.matrix_norm(K - K0) / span) if span > 0 else math.nan)
        theta.append(_angle(K, K0))
        _, V = eigendecomposition(K)
        for part, out in ((V[:, :k], top), (V[:, k:], bottom)):
            out.append(_angle(part.T @ K @ part, part.T @ K0 @ part))
    series = {"r": r, "theta": theta, "theta_top": top, "theta_bottom": bottom}
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in series.items()}


def kernel_velocity(kernels: Sequence[torch.Tensor], epochs: Sequence[float]) -> torch.Tensor:
    """Fort et al.'s kernel velocity between consecutive checkpoints: ``S(K_{i-1}, K_i) / (e_i -
    e_{i-1})``, float64 [T] for ``T + 1`` kernels at increasing epochs ``e_0 < .. < e_T`` (the
    distance per epoch, so that unevenly spaced checkpoints compare)."""
    Ks = _stack(kernels)
    e = [float(v) for v in epochs]
    if len(e) != len(Ks):
        raise ValueError(f"epochs must give one epoch per kernel ({len(Ks)}), got {len(e)}")
    if any(not math.isfinite(v) for v in e) or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"epochs must be finite and strictly increasing, got {e}")
    return torch.tensor([_distance(a, b) / (eb - ea) for a, b, ea, eb in zip(Ks, Ks[1:], e, e[1:])], dtype=torch.float64)


def _distance(A: torch.Tensor, B: torch.Tensor) -> float:
    return 1.0 - _similarity(A, B)


def eigen_feature_accuracy(
    K_test_train: torch.Tensor,
    eigvals: torch.Tensor,
    eigvecs: torch.Tensor,
    Y_train: torch.Tensor,
    y_test: torch.Tensor,
    indices: Sequence[int],
) -> torch.Tensor:
    """Accuracy on ``y_test`` of each eigen-feature alone (Tsilivis & Kempe 2022, Section 4):
    ``f_i(x) = lambda_i^-1 K(x, X) v_i v_i^T Y``, the kernel predictor restricted to the eigenvector
    of rank ``i`` (1-based: ``indices=[1]`` is the top one) of the train kernel ``K(X, X)``;
    prediction ``argmax_c f_i(x)_c``. Float64 [len(indices)]; NaN where ``lambda_i <= 0`` (the
    feature is undefined there).

    ``K_test_train`` [M, N] is ``K(x, X)`` (``empirical_ntk(model, x_test, x_train)``); for the
    attacked accuracy pass the kernel of the attacked inputs, ``K(x_adv, X)``, with the clean
    train kernel's eigenpairs. ``eigvals`` [>= max index] and ``eigvecs`` [N, >= max index] come from
    :func:`eigendecomposition` of ``K(X, X)``; ``Y_train`` is the integer labels [N] (one-hot with
    ``C = max label + 1`` over both sets) or the targets [N, C] themselves. Being rank one in the
    classes, a single eigen-feature separates at most two classes: its accuracy falls with rank
    as the feature stops carrying the labels."""
    if not isinstance(K_test_train, torch.Tensor) or K_test_train.ndim != 2:
        raise ValueError(f"K_test_train must be a matrix [M, N], got {tuple(getattr(K_test_train, 'shape', ()))}")
    K = K_test_train.detach().to(torch.float64)
    m, n = K.shape
    V = eigvecs.detach().to(K.device, torch.float64)
    lam = eigvals.detach().to(K.device, torch.float64).flatten()
    if V.ndim != 2 or V.shape[0] != n:
        raise ValueError(f"eigvecs must be [N={n}, k], got {tuple(V.shape)}")
    ranks = [int(i) for i in indices]
    top = min(V.shape[1], lam.numel())
    if not ranks or any(not 1 <= i <= top for i in ranks):
        raise ValueError(f"indices must be 1-based ranks in [1, {top}], got {ranks}")
    if not isinstance(y_test, torch.Tensor) or y_test.is_floating_point() or y_test.ndim != 1 or y_test.shape[0] != m:
        raise ValueError(f"y_test must be integer labels [M={m}], got {tuple(getattr(y_test, 'shape', ()))}")
    if isinstance(Y_train, torch.Tensor) and Y_train.is_floating_point():
        if Y_train.shape[0] != n or Y_train.ndim != 2:
            raise ValueError(f"Y_train targets must be [N={n}, C], got {tuple(Y_train.shape)}")
        Y = Y_train.detach().to(K.device, torch.float64)
    else:
        classes = int(max(int(Y_train.max()), int(y_test.max()))) + 1
        Y = _one_hot(Y_train, max(classes, 2), n, "Y_train").to(K.device)
    idx = torch.tensor([i - 1 for i in ranks], device=K.device)
    Vi = V[:, idx]  # [N, k]
    features = (K @ Vi)[:, :, None] * (Vi.T @ Y)[None] / lam[idx][None, :, None]  # [M, k, C]
    correct = (features.argmax(dim=2) == y_test.to(K.device)[:, None]).to(torch.float64).mean(dim=0)
    return torch.where(lam[idx] > 0, correct, torch.full_like(correct, math.nan)).cpu()
