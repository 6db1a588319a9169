"""The near-collapse probe: how much within-class variability a last, regularised step can remove
from given features (Tirer, Huang & Niles-Weed 2023, "Perturbation Analysis of Neural Collapse").

Tirer et al. model features that must stay near a given feature matrix ``H0`` (in their
experiments an intermediate layer's features) by an unconstrained-features problem with a
proximity term. Our reading of their model (MSE, regularised last layer, no bias), with ``H`` and
``H0`` as d x N matrices (one column per sample), one-hot targets ``Y`` (C x N)::

    min_{W, H}  1/(2N) ||W H - Y||_F^2  +  lambda_W / 2 ||W||_F^2  +  lambda / (2N) ||H - H0||_F^2

``lambda -> infinity`` pins ``H = H0`` (NC1 unchanged); ``lambda -> 0`` frees ``H`` at a vanishing
cost, so the scale of ``H`` grows, the regularised ``W`` shrinks, and the minimiser tends to the
collapsed frame of the plain unconstrained-features model (NC1 -> 0). In between, NC1 of the
solution against NC1 of ``H0`` is the reduction the model predicts for one more layer.

Solver: for a fixed ``W`` the ``H`` problem is a ridge regression with the closed form
``H(W) = H0 + W^T A (Y - W H0)``, ``A = (W W^T + lambda I_C)^{-1}``, and the reduced objective
is ``F(W) = min_H Phi(W, H) = lambda/2 tr(A Q) + lambda_W/2 ||W||^2`` with
``Q = (Y - W H0)(Y - W H0)^T / N`` (C x C). ``W``'s rows stay in the span of the features (outside
it only the weight decay acts), so in the basis of ``H0``'s right singular vectors (``H0 = K S U^T``
as N x d rows, ``W = V U^T``) every quantity is a C x r product with r = rank(H0) <= min(N, d)
and ``Q`` needs only ``diag(S^2)/N`` and ``Y K S / N``. We minimise over ``V`` by L-BFGS (a
gradient method with a memory of past gradients; float64, CPU, autograd for the gradient),
preconditioned by the curvature of the plain ridge problem, ``1 / (s_k^2 / N + lambda_W)`` per
direction (without it the spread of the feature spectrum makes plain gradient descent crawl: it
took 270 s on digits features, unconverged), with Armijo backtracking, from the ``W`` optimal for
``H = H0``, warm-started along the lambdas from large to small. Seconds for digits-sized inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ncrobust.collapse import nc_metrics
from ncrobust.models.base import eval_mode, tap_activations

PROBE_COLUMNS = ["lam", "nc1_input", "nc1_solution", "nc1_ratio", "relative_distance", "objective", "iterations",
                 "converged"]


@dataclass(frozen=True)
class ProbeSolution:
    """One solved problem: ``W`` [C, d], ``H`` [N, d] (rows are samples, as the input)."""

    W: torch.Tensor
    H: torch.Tensor
    objective: float
    iterations: int
    converged: bool
    V: torch.Tensor  # W in the singular basis of H0 (a warm start for the next lambda)


def _check(H0, labels, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    H0 = torch.as_tensor(H0).detach().to("cpu", torch.float64)
    if H0.ndim != 2 or H0.shape[0] < 2:
        raise ValueError(f"probe: features must be [N, d] with N >= 2, got shape {tuple(H0.shape)}")
    if not torch.isfinite(H0).all():
        raise ValueError("probe: features contain NaN or infinity")
    y = torch.as_tensor(labels).to("cpu", torch.int64).flatten()
    if len(y) != len(H0):
        raise ValueError(f"probe: {len(y)} labels for {len(H0)} feature rows")
    C = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"probe: labels must be in [0, {C}), got [{int(y.min())}, {int(y.max())}]")
    if torch.bincount(y, minlength=C).min() == 0:
        raise ValueError("probe: every class needs at least one sample")
    return H0, y, C


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"probe: {name} must be a finite number > 0, got {value!r}")
    return float(value)


class _Reduced:
    """``F`` in the singular basis of ``H0``: ``V`` [C, r] with ``W = V U^T``."""

    def __init__(self, H0: torch.Tensor, y: torch.Tensor, C: int, lam: float, weight_decay: float) -> None:
        N = H0.shape[0]
        K, S, Uh = torch.linalg.svd(H0, full_matrices=False)  # H0 = K diag(S) Uh; Uh = U^T
        keep = S > S.max() * max(H0.shape) * torch.finfo(H0.dtype).eps
        self.K, self.S, self.Uh = K[:, keep], S[keep], Uh[keep]
        self.Y = torch.nn.functional.one_hot(y, C).to(H0.dtype)  # [N, C]
        self.g = self.S.pow(2) / N  # eigenvalues of H0^T H0 / N
        self.B = (self.Y.T @ self.K) * self.S / N  # Y H0 U / N, [C, r]
        self.P = self.Y.T @ self.Y / N  # diag of class shares
        self.lam, self.wd, self.C = lam, weight_decay, C
        self.eye = torch.eye(C, dtype=H0.dtype)
        self.precondition = 1.0 / (self.g + weight_decay)

    def value(self, V: torch.Tensor) -> torch.Tensor:
        Q = self.P - V @ self.B.T - self.B @ V.T + (V * self.g) @ V.T
        A_Q = torch.linalg.solve(V @ V.T + self.lam * self.eye, Q)
        return self.lam / 2 * torch.trace(A_Q) + self.wd / 2 * V.pow(2).sum()

    def value_and_grad(self, V: torch.Tensor) -> tuple[float, torch.Tensor]:
        V = V.detach().requires_grad_(True)
        f = self.value(V)
        (grad,) = torch.autograd.grad(f, V)
        return float(f.detach()), grad

    def start(self) -> torch.Tensor:
        """``W`` optimal for ``H = H0``: ``V = B / (g + wd)`` (a ridge regression, diagonal here)."""
        return self.B * self.precondition

    def features(self, V: torch.Tensor) -> torch.Tensor:
        """``H(W)`` as [N, r] rows in the basis U (NC1 and distances are rotation invariant)."""
        Z = self.K * self.S  # H0 U
        A = torch.linalg.inv(V @ V.T + self.lam * self.eye)
        return Z + (self.Y - Z @ V.T) @ A @ V


def solve(
    H0, labels, *, lam: float, weight_decay: float = 5e-3, num_classes: int | None = None, V0: torch.Tensor | None = None,
    max_iter: int = 2000, tol: float = 1e-6, memory: int = 10, _reduced: _Reduced | None = None,
) -> ProbeSolution:
    """Minimise Tirer et al.'s objective (module docstring) for one ``lam``; ``H0`` is [N, d].

    L-BFGS (gradient steps corrected by the last ``memory`` gradient differences; Nocedal &
    Wright's two-loop recursion) in the preconditioned coordinates ``V / sqrt(P)``, with Armijo
    backtracking from the unit step, stopping when the gradient norm in those coordinates falls
    below ``tol * max(1, its value at the start)``, when no step decreases the objective any more
    (float64 rounding), or after ``max_iter`` steps (``converged`` says whether the first held).
    ``V0``: a start in the singular basis (warm start); default the ``W`` optimal for ``H = H0``.
    The returned ``W`` [C, d] and ``H`` [N, d] are in the input's coordinates."""
    H0, y, C = _check(H0, labels, num_classes)
    lam, weight_decay = _check_positive("lambda", lam), _check_positive("weight_decay", weight_decay)
    red = _reduced if _reduced is not None else _Reduced(H0, y, C, lam, weight_decay)
    red.lam = lam
    root = red.precondition.sqrt()  # V = Z * root: the ridge curvature becomes the identity in Z

    def evaluate(Z: torch.Tensor) -> tuple[float, torch.Tensor]:
        f, g = red.value_and_grad(Z * root)
        return f, g * root

    Z = (red.start() if V0 is None else V0.clone()) / root
    f, g = evaluate(Z)
    threshold = tol * max(1.0, float(g.norm()))
    history: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    it, converged = 0, float(g.norm()) <= threshold
    while not converged and it < max_iter:
        q, alphas = g.clone(), []
        for s_k, y_k, rho in reversed(history):
            a_k = rho * float((s_k * q).sum())
            q -= a_k * y_k
            alphas.append(a_k)
        if history:
            s_k, y_k, _ = history[-1]
            q *= float((s_k * y_k).sum()) / float((y_k * y_k).sum())
        for (s_k, y_k, rho), a_k in zip(history, reversed(alphas)):
            q += (a_k - rho * float((y_k * q).sum())) * s_k
        slope = float((g * q).sum())
        if slope <= 0:  # not a descent direction (curvature pairs gone stale): restart from the gradient
            history, q, slope = [], g.clone(), float((g * g).sum())
        step = 1.0
        while True:
            Z_new = Z - step * q
            f_new = float(red.value(Z_new * root))
            if f_new <= f - 1e-4 * step * slope or step < 1e-20:
                break
            step /= 2
        if step < 1e-20 or not f_new < f:  # no decrease left within float64 rounding: as stationary as it gets
            break
        f_new, g_new = evaluate(Z_new)
        s_k, y_k = Z_new - Z, g_new - g
        sy = float((s_k * y_k).sum())
        if sy > 1e-12 * float(s_k.norm()) * float(y_k.norm()):
            history = [*history[-(memory - 1):], (s_k, y_k, 1.0 / sy)]
        Z, f, g = Z_new, f_new, g_new
        it += 1
        converged = float(g.norm()) <= threshold
    V = Z * root
    with torch.no_grad():
        H = red.features(V) @ red.Uh
        W = V @ red.Uh
    return ProbeSolution(W=W, H=H, objective=f, iterations=it, converged=converged, V=V.detach())


def probe(
    H0, labels, lambdas, *, weight_decay: float = 5e-3, num_classes: int | None = None, max_iter: int = 2000,
    tol: float = 1e-6, rescale: bool = True,
) -> pd.DataFrame:
    """NC1 of Tirer et al.'s solution against NC1 of ``H0`` [N, d] for each of ``lambdas``: one row
    per lambda with :data:`PROBE_COLUMNS` (``nc1_ratio`` = solution / input: the predicted
    reduction; ``relative_distance`` = ||H - H0||_F / ||H0||_F). Solved from the largest lambda
    down, each warm-started from the previous solution's ``W``.

    ``rescale``: divide ``H0`` by its root-mean-square row norm first. NC1 is scale-invariant but
    the problem is not (the fit term is pinned by the one-hot targets), so without it a lambda means
    something else for a network with unit-norm features than for one with features of norm 10."""
    H0, y, C = _check(H0, labels, num_classes)
    if rescale:
        H0 = H0 / H0.pow(2).sum(1).mean().sqrt().clamp_min(torch.finfo(H0.dtype).tiny)
    lams = [_check_positive("lambda", lam) for lam in lambdas]
    if not lams:
        raise ValueError("probe: lambdas is empty")
    nc1_input = nc_metrics(H0, y, num_classes=C)["nc1"]
    weight_decay = _check_positive("weight_decay", weight_decay)
    reduced = _Reduced(H0, y, C, lams[0], weight_decay)
    rows, V = {}, None
    for lam in sorted(set(lams), reverse=True):
        sol = solve(H0, y, lam=lam, weight_decay=weight_decay, num_classes=C, V0=V, max_iter=max_iter, tol=tol,
                    _reduced=reduced)
        V = sol.V
        nc1 = nc_metrics(sol.H, y, num_classes=C)["nc1"]
        rows[lam] = {
            "lam": lam, "nc1_input": nc1_input, "nc1_solution": nc1, "nc1_ratio": nc1 / nc1_input if nc1_input else math.nan,
            "relative_distance": float((sol.H - H0).norm() / H0.norm()), "objective": sol.objective,
            "iterations": sol.iterations, "converged": sol.converged,
        }
    return pd.DataFrame([rows[lam] for lam in sorted(rows)], columns=PROBE_COLUMNS)


def layer_features(model: torch.nn.Module, x: torch.Tensor, layer: str, batch_size: int = 1000) -> torch.Tensor:
    """Activations of tap ``layer`` (``penultimate`` or a tap name), flattened, float64 on the CPU,
    in eval mode (the model's mode is restored)."""
    names = list(getattr(model, "tap_names", []))
    if layer not in names:
        raise ValueError(f"probe.layer = {layer!r}: not a tap of this model; taps: {', '.join(names)}")
    with eval_mode(model):
        return tap_activations(model, x, [layer], batch_size)[1][layer]


def probe_model(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, layer: str, lambdas, threat, loss, seed: int,
    num_classes: int, weight_decay: float = 5e-3, perturbations=("clean", "pgd"), batch_size: int = 1000,
) -> pd.DataFrame:
    """:func:`probe` on the features of tap ``layer`` of clean inputs and of their PGD examples
    (``threat``, ascending ``loss``, eval mode, seeded by ``(seed, "probe")``): one row per
    (perturbation, lambda), labels the true classes."""
    from ncrobust.attacks import pgd
    from ncrobust.seeding import generator

    frames = []
    for perturbation in perturbations:
        if perturbation == "clean":
            inputs = x
        elif perturbation == "pgd":
            inputs = torch.cat([
                pgd(model, x[i : i + batch_size], y[i : i + batch_size], norm=threat.norm, eps=threat.eps,
                    step_size=threat.step_size, steps=threat.steps, loss=loss,
                    generator=generator(seed, "probe", i, device=x.device))
                for i in range(0, len(x), batch_size)
            ])
        else:
            raise ValueError(f"probe perturbation {perturbation!r}: allowed: clean, pgd")
        H0 = layer_features(model, inputs, layer, batch_size)
        frame = probe(H0, y, lambdas, weight_decay=weight_decay, num_classes=num_classes)
        frames.append(frame.assign(perturbation=perturbation, layer=layer))
    return pd.concat(frames, ignore_index=True)
