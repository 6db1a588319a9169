"""The covariance eigenspectrum of a representation and its power-law exponent.

Nassar et al. 2020 ("On 1/n neural representation and robustness", NeurIPS) relate robustness to
how fast a representation's covariance eigenspectrum decays, ``lambda_n ~ n^-alpha``: ``alpha``
near 1 is the 1/n spectrum Stringer et al. 2019 ("High-dimensional geometry of population
responses in visual cortex", Nature) found in mouse V1. The exponent is Stringer et al.'s
estimator (``get_powerlaw`` in their code): the least-squares fit of ``log lambda_n`` against
``log n`` weighted by ``1/n``, over a fixed range of ranks kept well below the feature dimension
and the sample count, where the sample spectrum is still an unbiased picture of the population's
(near the rank, Marchenko-Pastur spreading bends the sample spectrum down and steepens the fit).

Ranks ``n`` are 1-based (``lambda_1`` the largest). Stringer et al.'s scripts pass the 0-based
indices ``np.arange(11, 500)``, i.e. ``n = 12 .. 500``; ``index_range=(12, 500)`` reproduces that.
"""

from __future__ import annotations

import math

import torch

DEFAULT_INDEX_RANGE = (11, 500)
_BLOCK_BYTES = 1 << 26  # the float64 column block of the Gram route: 64 MiB


def power_law_exponent(eigenvalues: torch.Tensor, index_range: tuple[int, int] = DEFAULT_INDEX_RANGE) -> float:
    """``alpha`` of ``lambda_n ~ n^-alpha``: minimises ``sum_n (log lambda_n - c + alpha log n)^2 / n``
    over ranks ``n`` in ``index_range`` (1-based, both ends included) of the eigenvalues sorted
    descending (Stringer et al. 2019's estimator, used by Nassar et al. 2020).

    Raises a one-line ``ValueError`` when the range asks for more eigenvalues than there are, or
    holds one that is not positive (beyond the representation's rank)."""
    lam = torch.as_tensor(eigenvalues).detach().to("cpu", torch.float64).flatten()
    lo, hi = _check_range(index_range)
    if hi > lam.numel():
        raise ValueError(f"index_range {(lo, hi)} needs {hi} eigenvalues but the spectrum has {lam.numel()} "
                         f"(at most min(N, d) for N samples of d features); choose an upper rank well below {lam.numel()}")
    lam = lam.sort(descending=True).values[lo - 1 : hi]
    if not torch.isfinite(lam).all() or (lam <= 0).any():
        bad = int(torch.nonzero(~(lam > 0) | ~torch.isfinite(lam))[0]) + lo
        raise ValueError(f"eigenvalue of rank {bad} is {float(lam[bad - lo]):g}: the range {(lo, hi)} must hold positive "
                         f"finite eigenvalues (stay below the representation's rank)")
    n = torch.arange(lo, hi + 1, dtype=torch.float64)
    X = torch.stack([-n.log(), torch.ones_like(n)], dim=1)  # [n, 2]: (-log n, 1)
    w = 1.0 / n
    coef = torch.linalg.solve(X.T @ (X * w[:, None]), X.T @ (w * lam.log()))
    return float(coef[0])


def _check_range(index_range) -> tuple[int, int]:
    try:
        lo, hi = index_range
    except (TypeError, ValueError):
        raise ValueError(f"index_range must be a pair (first, last) of 1-based ranks, got {index_range!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)) or not 1 <= lo < hi:
        raise ValueError(f"index_range must be integer ranks 1 <= first < last, got {index_range!r}")
    return lo, hi


def representation_spectrum(features: torch.Tensor, *, route: str = "auto") -> torch.Tensor:
    """Eigenvalues of the covariance ``Xc^T Xc / N`` of the centred features ``Xc`` [N, d] (any
    trailing shape is flattened to d), float64, descending, ``min(N, d)`` of them (negative rounding
    clamped to 0; after centring the rank is at most ``N - 1``).

    ``route="auto"`` takes the ``N x N`` Gram matrix ``Xc Xc^T / N`` when ``d > N`` (the same nonzero
    eigenvalues), accumulated a block of columns at a time in float64, so a wide convolutional tap
    never builds a ``d x d`` matrix nor a float64 copy of itself; ``"covariance"`` or ``"gram"``
    force one route."""
    if route not in ("auto", "covariance", "gram"):
        raise ValueError(f"route must be auto, covariance or gram, got {route!r}")
    if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] < 2:
        raise ValueError(f"features must be a tensor [N >= 2, d, ...], got {tuple(getattr(features, 'shape', ()))}")
    X = features.detach().flatten(1)
    n, d = X.shape
    if d == 0:
        raise ValueError("features have no dimension")
    gram = route == "gram" or (route == "auto" and d > n)
    if gram:
        G = torch.zeros(n, n, dtype=torch.float64, device=X.device)
        step = max(1, _BLOCK_BYTES // (8 * n))
        for a in range(0, d, step):
            block = X[:, a : a + step].to(torch.float64)
            block = block - block.mean(dim=0, keepdim=True)
            G.addmm_(block, block.T)
        M = G / n
    else:
        Xc = X.to(torch.float64)
        Xc = Xc - Xc.mean(dim=0, keepdim=True)
        M = Xc.T @ Xc / n
    if not torch.isfinite(M).all():
        raise ValueError("features hold NaN or inf")
    values = torch.linalg.eigvalsh(M).flip(0)[: min(n, d)]
    return values.clamp_min(0).cpu()


def layer_exponents(taps: dict[str, torch.Tensor], index_range: tuple[int, int] = DEFAULT_INDEX_RANGE) -> dict[str, float]:
    """``{tap: alpha}`` of :func:`power_law_exponent` on :func:`representation_spectrum` of each tap
    (``[N, ...]`` activations, e.g. ``model(x, taps=True)[1]`` or ``tap_activations``); a tap whose
    spectrum is too short for ``index_range`` raises, naming the tap."""
    out = {}
    for name, features in taps.items():
        try:
            out[name] = power_law_exponent(representation_spectrum(features), index_range)
        except ValueError as err:
            raise ValueError(f"tap {name!r}: {err}") from None
    return out


def power_law_spectrum(alpha: float, count: int) -> torch.Tensor:
    """``lambda_n = n^-alpha`` for ``n = 1 .. count``, float64: the reference spectrum of a given
    exponent (tests, and synthetic features ``Z diag(sqrt(lambda))``)."""
    if not math.isfinite(alpha) or isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"need a finite alpha and an integer count >= 1, got {alpha!r}, {count!r}")
    return torch.arange(1, count + 1, dtype=torch.float64) ** -alpha
