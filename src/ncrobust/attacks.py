"""Adversarial and random perturbations of images in [0, 1].

Conventions:

- ``model(x)`` returns logits for inputs in [0, 1] (normalisation is the model's first layer).
- Every attack returns a *detached* tensor with the dtype and device of ``x``, clamped to [0, 1]
  and (for the norm-bounded attacks) projected on the threat ball around ``x``.
- Gradients are taken only with respect to the input (``torch.autograd.grad``); parameter
  ``.grad`` fields are never touched.
- ``l_inf``: random start uniform in the ball, step ``step_size * sign(grad)``, projection by
  clamping to ``[max(x - eps, 0), min(x + eps, 1)]``.
- ``l_2``: random start as in Rice et al. 2020 (Gaussian direction, normalised, radius uniform in
  ``[0, eps]``, then clamp to [0, 1]); step along the per-example normalised gradient
  ``g / (||g||_2 + 1e-10)``; the perturbation is renormed to the eps-ball
  (``delta * min(1, eps / ||delta||)``) and the result clamped to [0, 1] (torchattacks' ``PGDL2``).
- The gradient is that of the *summed* per-example loss, i.e. the per-example gradient in eval
  mode. torchattacks differentiates the batch *mean*, so its gradient is ``1/N`` of ours; the
  ``l_inf`` step (a sign) is identical, the ``l_2`` step differs only through the ``1e-10`` zero-norm
  guard, which acts on a gradient ``N`` times smaller there (``|difference| <= 1e-10 * N / ||g_i||``
  relative, far below float32 resolution unless a gradient is numerically zero).
- ``targeted``: the attack *descends* the loss to the targets (:func:`target_labels` of the true
  labels in the registry; :func:`pgd` takes the targets themselves).
- ``restarts > 1``: each restart draws a fresh random start; per example the worst case is kept
  (highest final loss, or lowest final loss to the target when targeted).
- Mode: evaluation attacks (the registry's, and :func:`pgd` with ``train_mode=False``) run the
  model in ``eval()``; training-time PGD (``train_mode=True``) runs it in ``train()`` so BatchNorm
  uses (and updates) batch statistics, as in Madry et al., Rice et al. and Su et al. Every attack
  restores the training flag of every submodule afterwards, also on error
  (:func:`ncrobust.models.base.eval_mode`).
- ``autocast_dtype`` (bf16 on a GPU) autocasts the model's passes; the loss is taken on fp32
  logits, and TRADES' clean prediction and first step run in fp32 (what bf16 cannot resolve).
- Randomness: the attacks that draw with torch take ``generator`` (a ``torch.Generator``; ``None``
  means the global RNG); noise is drawn on the generator's device and moved to ``x``'s device, so
  a fixed seed gives the same perturbation. The attacks marked ``seeded`` (``pgd-strong`` and
  torchattacks' APGD, which seeds the global RNG itself) take an integer ``seed`` instead.
- Bad arguments raise ``ValueError`` with a one-line message.

One registry, :data:`ATTACKS`, maps every name to an :class:`Attack`; every attack is called with
the one signature of :class:`Attack`, through :func:`perturb`. :data:`PERTURBATIONS` are the
evaluation's names, :data:`STRONG_ATTACKS` the stronger attacks that check that PGD is not a weak
evaluation (``pgd-strong``, and APGD-CE / APGD-T of Croce & Hein 2020 through ``torchattacks``
with AutoAttack's "standard" settings). The training step uses :class:`PGD`'s and
:class:`TradesKL`'s own pieces: ``draw_start`` (the random draws of a start) outside a captured
CUDA graph, ``from_start`` (the iterations) inside it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ncrobust.models.base import eval_mode

LossFn = Callable[..., torch.Tensor]

NORMS = ("linf", "l2")

# pgd-strong: 5 restarts of 50 steps with step eps/4 (both norms). Large steps move far in few
# iterations and the restarts cover the ball; keeping the worst case per example over restarts
# makes it at least as strong as one restart with the same first random start.
PGD_STRONG_STEPS = 50
PGD_STRONG_RESTARTS = 5
PGD_STRONG_STEP_FRACTION = 0.25

# AutoAttack "standard" (Croce & Hein 2020, fra31/auto-attack): APGD-CE with 100 iterations and
# 1 restart; APGD-T (targeted DLR) with 100 iterations, 1 restart, 9 target classes; rho = 0.75.
# torchattacks' APGD/APGDT default to steps=10, which is *not* AutoAttack's setting.
APGD_STEPS = 100
APGD_RESTARTS = 1
APGD_RHO = 0.75
APGDT_TARGET_CLASSES = 9

_L2_GRAD_GUARD = 1e-10  # as torchattacks.PGDL2 (eps_for_division) and Rice et al.
_NORM_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball and the PGD schedule used on it: ``norm`` in {"linf", "l2"}, radius ``eps``,
    ``steps`` steps of size ``step_size``. Validated on construction."""

    norm: str
    eps: float
    step_size: float
    steps: int

    def __post_init__(self) -> None:
        _check_norm(self.norm)
        _check_eps(self.eps)
        _check_step_size(self.step_size)
        _check_steps(self.steps)


def _check_norm(norm) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_eps(eps) -> None:
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_step_size(step_size) -> None:
    if not _is_real(step_size) or not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")


def _check_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_restarts(restarts) -> None:
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ValueError(f"x must lie in [0, 1], got values in [{lo:g}, {hi:g}]")


def _check_labels_shape(x: torch.Tensor, y) -> None:
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be an integer tensor, got {type(y).__name__} {getattr(y, 'dtype', '')}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape [{x.shape[0]}] to match x {tuple(x.shape)}, got {tuple(y.shape)}")


def _check_labels_range(y: torch.Tensor, num_classes: int) -> None:
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")


def _check_batch(x, y, num_classes, batch_size) -> None:
    """The inputs of every registry attack: images in [0, 1], labels in range, a valid chunk size."""
    _check_num_classes(num_classes)
    _check_batch_size(batch_size)
    _check_images(x)
    _check_labels_shape(x, y)
    _check_labels_range(y, num_classes)


def _cross_entropy_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _summed(loss_fn: LossFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The summed per-example loss (the default cross-entropy sums in one kernel)."""
    if loss_fn is F.cross_entropy:
        return _cross_entropy_sum
    return lambda logits, y: loss_fn(logits, y, reduction="none").sum()


def _resolve_loss(loss) -> LossFn:
    if loss is None:
        return F.cross_entropy
    if isinstance(loss, str):
        from ncrobust.losses import get_loss

        return get_loss(loss)
    if not callable(loss):
        raise ValueError(f"loss must be None, a loss name or a callable, got {type(loss).__name__}")
    return loss


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _autocast(x: torch.Tensor, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def _fp32(x: torch.Tensor):
    """Autocast off, also inside a caller's autocast (the captured training step's)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _noise(kind: str, x: torch.Tensor, generator) -> torch.Tensor:
    """``rand`` (U[0,1)) or ``randn`` noise shaped like ``x``, drawn from ``generator``."""
    fn = torch.rand if kind == "rand" else torch.randn
    if generator is None:
        return fn(x.shape, dtype=x.dtype, device=x.device)
    return fn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-example vector ``[N]`` viewed as ``[N, 1, 1, ...]`` to broadcast against ``x``."""
    return v.view(-1, *([1] * (x.ndim - 1)))


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def _renorm_l2_(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x + delta * min(1, eps / ||delta||_2)`` per example, clamped to [0, 1]: the perturbation
    ``delta`` renormed to the l_2 ball and added back, in place on ``delta``."""
    factor = torch.clamp(eps / _l2_norms(delta).clamp_min_(_NORM_FLOOR), max=1.0)
    return delta.mul_(_bcast(factor, x)).add_(x).clamp_(0.0, 1.0)


def _linf_bounds(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


@torch.no_grad()
def _step_(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, bounds, *, norm: str, eps: float,
           step_size: float) -> None:
    """One ascent step along ``grad`` (in place on ``x_adv``), then projection; ``grad`` is consumed."""
    if norm == "linf":
        x_adv.add_(grad.sign_(), alpha=step_size)
        x_adv.clamp_(min=bounds[0], max=bounds[1])
    else:
        scale = _l2_norms(grad).add_(_L2_GRAD_GUARD).reciprocal_().mul_(step_size)
        x_adv.addcmul_(grad, _bcast(scale, x))
        _renorm_l2_(x_adv.sub_(x), x, eps)  # x_adv holds delta, then the projected point


def _project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Projection on the ball and [0, 1] (in place); a no-op up to rounding on PGD's iterates."""
    if norm == "linf":
        lo, hi = _linf_bounds(x, eps)
        return x_adv.clamp_(min=lo, max=hi)
    return _renorm_l2_(x_adv.sub_(x), x, eps)


@torch.no_grad()
def _per_example_loss(model, x_adv, y, loss_fn, autocast_dtype) -> torch.Tensor:
    with _autocast(x_adv, autocast_dtype):
        logits = model(x_adv)
    return loss_fn(logits.float(), y, reduction="none")


def _chunked(fn, x: torch.Tensor, y: torch.Tensor | None, batch_size: int | None) -> torch.Tensor:
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return fn(x, y)
    out = torch.empty_like(x)
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        out[i:j] = fn(x[i:j], None if y is None else y[i:j])
    return out


def _sized_noise(kind: str, x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """Noise of the threat model's size in its own norm: ``linf`` per pixel (``eps * z``), ``l2`` a
    random direction ``z / ||z||_2`` of length ``eps`` per example (``z`` Gaussian, or its signs)."""
    z = _noise("randn", x, generator)
    if kind == "sign":
        z.sign_()
    if norm == "l2":
        z.mul_(_bcast(_l2_norms(z).clamp_min_(_NORM_FLOOR).reciprocal_(), z))
    return z.mul_(float(eps)).add_(x.detach()).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The attack protocol
# --------------------------------------------------------------------------------------------


class Attack(abc.ABC):
    """An attack of the registry (:data:`ATTACKS`). Every attack is called alike, by
    :func:`perturb` on checked arguments::

        attack(model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size)

    ``x``: a detached batch in [0, 1]; ``y``: its true labels, on ``x``'s device; ``threat``: the
    norm ball and the step schedule; ``loss_fn``: the loss that loss-based attacks ascend (any
    :mod:`ncrobust.losses` function); ``autocast_dtype``: the attack's autocast (None: none);
    ``batch_size``: chunks of that many examples (None: one), the random stream continuing from
    chunk to chunk. Randomness comes from ``generator`` (a ``torch.Generator``, None for the
    global RNG), or from the integer ``seed`` for the attacks marked ``seeded``; the other one is
    None. Returns a detached tensor like ``x``; the model's modes are as they were.
    """

    seeded = False
    """Randomness from the integer ``seed`` instead of ``generator``."""

    def check(self, x: torch.Tensor, num_classes: int) -> None:
        """The attack's own checks of its inputs (beyond those :func:`perturb` makes for all)."""

    def with_restarts(self, restarts: int) -> Attack:
        """This attack with ``restarts`` random restarts; an attack without restarts ignores them."""
        return self

    def with_l2_step(self, l2_step: str) -> Attack:
        """This attack with the ``l2`` step ``l2_step`` (:class:`TradesKL`); the others ignore it."""
        return self

    @abc.abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, num_classes: int,
                 generator: torch.Generator | None, seed: int | None, loss_fn: LossFn, autocast_dtype: torch.dtype | None,
                 batch_size: int | None) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class Clean(Attack):
    """``x`` unchanged."""

    def __call__(self, model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size):
        return x


@dataclass(frozen=True)
class Noise(Attack):
    """Random noise (``kind`` ``gaussian`` or ``sign``) of the threat model's size in its norm:
    :func:`gaussian`, :func:`random_sign`."""

    kind: str

    def __call__(self, model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size):
        return _chunked(lambda xb, _: _sized_noise(self.kind, xb, threat.eps, threat.norm, generator), x, None, batch_size)


# --------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) in the threat's ball, with its step size and
    number of steps.

    Ascends ``loss_fn(model(x_adv), y)``, or with ``targeted`` descends it to the targets
    (:func:`target_labels` of the labels in the registry call; :meth:`run` takes the labels to
    ascend or descend). ``restarts``: independent random starts, the worst case per example kept
    (judged by the final loss). ``random_start``: start at a random point of the ball, else at
    ``x``. ``train_mode``: the attack runs the model in train mode (training-time PGD: BatchNorm
    uses, and updates, batch statistics), else in eval mode.

    The training step uses the pieces: :meth:`draw_start` outside its captured graph and
    :meth:`from_start` inside it, in the model's current mode.
    """

    targeted: bool = False
    restarts: int = 1
    random_start: bool = True
    train_mode: bool = False

    def __post_init__(self) -> None:
        _check_restarts(self.restarts)

    def with_restarts(self, restarts: int) -> PGD:
        return dataclasses.replace(self, restarts=restarts)

    def __call__(self, model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size):
        labels = (y + 1) % num_classes if self.targeted else y  # target_labels, on labels perturb checked

        def run(xb, yb):
            return self.run(model, xb, yb, threat, generator=generator, loss_fn=loss_fn, autocast_dtype=autocast_dtype)

        return _chunked(run, x, labels, batch_size)

    def run(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, threat: ThreatModel, *,
            generator: torch.Generator | None, loss_fn: LossFn, autocast_dtype: torch.dtype | None,
            check_labels: bool = False) -> torch.Tensor:
        """The attack on one batch, in its mode, every restart; ``check_labels``: check the labels
        against the width of the model's output at the first step (for callers that do not know
        the number of classes)."""

        def restart(check: bool) -> torch.Tensor:
            start = self.draw_start(x, threat, generator)
            return self.from_start(model, x, labels, start, threat, loss_fn=loss_fn, autocast_dtype=autocast_dtype,
                                   check_labels=check)

        with eval_mode(model, training=self.train_mode):
            best = restart(check_labels)
            if self.restarts == 1:
                return best
            sign = -1.0 if self.targeted else 1.0  # maximise sign * loss
            best_loss = sign * _per_example_loss(model, best, labels, loss_fn, autocast_dtype)
            for _ in range(self.restarts - 1):
                cand = restart(False)
                cand_loss = sign * _per_example_loss(model, cand, labels, loss_fn, autocast_dtype)
                better = cand_loss > best_loss
                best[better] = cand[better]
                best_loss = torch.where(better, cand_loss, best_loss)
            return best

    def draw_start(self, x: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """The random draws that start one restart on ``x``, from ``generator`` (the global RNG if
        None): a uniform offset in the l_inf ball, or a Gaussian direction and a uniform radius for
        l_2 (Rice et al.); none without ``random_start``. Drawn apart from the iterations so that
        a captured training step takes them as inputs (:mod:`ncrobust.training.train`)."""
        if not self.random_start:
            return ()
        eps = threat.eps
        if threat.norm == "linf":
            if generator is None or generator.device == x.device:
                return (torch.empty_like(x).uniform_(-eps, eps, generator=generator),)
            return (_noise("rand", x, generator).mul_(2 * eps).sub_(eps),)  # U[-eps, eps)
        direction = _noise("randn", x, generator)
        if generator is None:
            radius = torch.rand(x.shape[0], dtype=x.dtype, device=x.device)
        else:
            radius = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
        return direction, radius

    def from_start(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, start: tuple[torch.Tensor, ...],
                   threat: ThreatModel, *, loss_fn: LossFn = F.cross_entropy, autocast_dtype: torch.dtype | None = None,
                   check_labels: bool = False) -> torch.Tensor:
        """One restart from the draws of :meth:`draw_start` (consumed), in the model's current
        mode, without input checks (they read values back to the host)."""
        norm, eps, step_size = threat.norm, threat.eps, threat.step_size
        x_adv = self._start_point(x, start, threat) if self.random_start else x.clone()
        x_adv.requires_grad_(True)
        bounds = _linf_bounds(x, eps) if norm == "linf" else None
        summed = _summed(loss_fn)
        for i in range(threat.steps):
            with torch.enable_grad():
                with _autocast(x, autocast_dtype):
                    logits = model(x_adv)
                if check_labels and i == 0:
                    _check_labels_range(labels, logits.shape[1])
                loss = summed(logits.float(), labels)  # fp32 loss: p - onehot of a confident example rounds to 0 in bf16
                if self.targeted:
                    loss = -loss
                (grad,) = torch.autograd.grad(loss, x_adv)
            _step_(x_adv, grad, x, bounds, norm=norm, eps=eps, step_size=step_size)
        return x_adv.detach()

    @staticmethod
    def _start_point(x: torch.Tensor, start: tuple[torch.Tensor, ...], threat: ThreatModel) -> torch.Tensor:
        """The random start in the ball and [0, 1], from the draws (consumed)."""
        if threat.norm == "linf":
            (delta,) = start
        else:
            delta, radius = start
            n = _l2_norms(delta).clamp_min_(_NORM_FLOOR)
            delta.mul_(_bcast(radius.mul(threat.eps).div_(n), x))
        return delta.add_(x).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class StrongPGD(Attack):
    """``pgd-strong``: :class:`PGD` with ``PGD_STRONG_RESTARTS`` = 5 restarts of
    ``PGD_STRONG_STEPS`` = 50 steps of size ``eps / 4`` (both norms; the threat's step schedule is
    not used), the worst case per example kept; the random starts come from
    ``torch.Generator(x.device).manual_seed(seed)``."""

    seeded = True

    def __call__(self, model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size):
        if threat.eps == 0:
            return x
        eps = float(threat.eps)
        schedule = ThreatModel(threat.norm, eps, float(PGD_STRONG_STEP_FRACTION * eps), PGD_STRONG_STEPS)
        return PGD(restarts=PGD_STRONG_RESTARTS)(
            model, x, y, schedule, num_classes=num_classes, generator=torch.Generator(device=x.device).manual_seed(seed),
            seed=None, loss_fn=loss_fn, autocast_dtype=autocast_dtype, batch_size=batch_size,
        )


# --------------------------------------------------------------------------------------------
# TRADES
# --------------------------------------------------------------------------------------------


TRADES_L2_STEPS = ("threat", "authors")
"""The ``l2`` step of :class:`TradesKL`: the threat model's, or TRADES' and Su et al.'s code's."""


@dataclass(frozen=True)
class TradesKL(Attack):
    """The TRADES inner maximisation (Zhang et al. 2019) against the model itself, crafted in
    eval mode; it needs no labels.

    Maximises ``KL(softmax(model(x_adv)) || softmax(model(x)))`` computed as
    ``kl_div(log_softmax(model(x_adv)), softmax(model(x)), reduction="sum")`` from the start
    ``x + 0.001 * N(0, I)`` (as TRADES' code). ``linf``: sign steps of ``step_size``, clamp to the
    ball and [0, 1]. ``l2``: a step along the per-example normalised gradient, then clamp to [0, 1]
    and renorm the perturbation to the eps-ball, with ``l2_step``:

    - ``threat`` (default): steps of the threat model's ``step_size``; a zero gradient gives no step;
    - ``authors``: TRADES' code (``trades.py``) and Su et al.'s ``attack_trades``, which run SGD on
      the perturbation with learning rate ``2 * eps / steps`` (the threat's ``step_size`` is not
      used); where an example's gradient is zero its step is ``-2 eps / steps * r`` with ``r`` a
      fresh ``N(0, I)`` draw (their ``randn_like`` in place of the undefined normalised gradient).
      The draws of every step come with the start (:meth:`draw_start`), so the attack stays
      a function of tensors (a captured CUDA graph), also where no gradient is zero.

    ``softmax(model(x))`` is a constant in eval mode and is computed once.

    The training step uses the pieces: :meth:`draw_start` outside its captured graph and
    :meth:`from_start` inside it.
    """

    l2_step: str = "threat"

    def __post_init__(self) -> None:
        if self.l2_step not in TRADES_L2_STEPS:
            raise ValueError(f"trades l2_step {self.l2_step!r}; allowed: {', '.join(TRADES_L2_STEPS)}")

    def with_l2_step(self, l2_step: str) -> TradesKL:
        return dataclasses.replace(self, l2_step=l2_step)

    def _authors_l2(self, threat: ThreatModel) -> bool:
        return threat.norm == "l2" and self.l2_step == "authors"

    def __call__(self, model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size):
        return _chunked(lambda xb, _: self.run(model, xb, threat, generator=generator, autocast_dtype=autocast_dtype),
                        x, None, batch_size)

    def run(self, model: nn.Module, x: torch.Tensor, threat: ThreatModel, *, generator: torch.Generator | None,
            autocast_dtype: torch.dtype | None) -> torch.Tensor:
        """The attack on one batch, in eval mode."""
        with eval_mode(model):
            return self.from_start(model, x, self.draw_start(x, threat, generator), threat, autocast_dtype=autocast_dtype)

    def draw_start(self, x: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """The Gaussian noise of TRADES' start, from ``generator`` (the global RNG if None); with
        the authors' ``l2`` step also one ``N(0, I)`` draw per step, for the examples whose
        gradient is zero."""
        start = (_noise("randn", x, generator),)
        if self._authors_l2(threat):
            start += tuple(_noise("randn", x, generator) for _ in range(threat.steps))
        return start

    def from_start(self, model: nn.Module, x: torch.Tensor, start: tuple[torch.Tensor, ...], threat: ThreatModel, *,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The KL iterations from the start ``x + 0.001 * z`` (``start`` = ``(z, ...)`` of
        :meth:`draw_start`, consumed) in the model's current mode, without input checks."""
        norm, eps, step_size = threat.norm, threat.eps, threat.step_size
        authors = self._authors_l2(threat)
        if authors:
            step_size = 2.0 * eps / threat.steps
        x_adv = start[0].mul_(0.001).add_(x)
        bounds = _linf_bounds(x, eps) if norm == "linf" else None
        # The start lies 0.001 from x, below bf16's resolution of a normalised pixel, and the KL is
        # zero at x: under autocast the first gradient would be rounding noise (a random first step).
        # So the clean prediction and the first step run in fp32, even inside a caller's autocast;
        # the later iterates are a step size away and bf16 resolves them.
        with torch.no_grad(), _fp32(x):
            p_nat = F.softmax(model(x).float(), dim=1)
        x_adv.requires_grad_(True)
        for i in range(threat.steps):
            with torch.enable_grad(), _fp32(x) if i == 0 else contextlib.nullcontext():  # the first step's backward too
                with _autocast(x, autocast_dtype if i else None):
                    logits = model(x_adv)
                kl = F.kl_div(F.log_softmax(logits.float(), dim=1), p_nat, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
            if norm == "linf":
                _step_(x_adv, grad, x, bounds, norm=norm, eps=eps, step_size=step_size)
            else:
                with torch.no_grad():
                    norms = _l2_norms(grad)
                    scale = torch.where(norms > 0, step_size / norms.clamp_min(_NORM_FLOOR), 0.0)
                    if authors:  # a zero gradient: SGD's step on the authors' random "gradient" r
                        grad = torch.where(_bcast(norms > 0, x), grad, -start[1 + i])
                        scale = torch.where(norms > 0, scale, step_size)
                    # threat: a zero gradient gives no step
                    _renorm_l2_(x_adv.addcmul_(grad, _bcast(scale, x)).clamp_(0.0, 1.0).sub_(x), x, eps)
        return x_adv.detach()


# --------------------------------------------------------------------------------------------
# APGD (torchattacks)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class APGD(Attack):
    """``apgd-ce``: ``torchattacks.APGD`` with AutoAttack's standard settings: 100 iterations (the
    torchattacks default is 10), 1 restart, ``rho = 0.75``, CE loss. ``apgd-t`` (``targeted``):
    ``torchattacks.APGDT`` (targeted DLR loss), 100 iterations, 1 restart, 9 target classes
    (``min(9, C - 1)``), ``rho = 0.75``; needs ``C >= 4`` (the DLR loss uses the 4th logit). In eval
    mode, in the threat's norm and eps (its step schedule is not used; ``loss_fn`` neither).
    torchattacks seeds the global RNG with ``seed``; it is forked so the caller's RNG state is
    unchanged."""

    targeted: bool = False
    seeded = True

    @property
    def name(self) -> str:
        return "apgd-t" if self.targeted else "apgd-ce"

    def check(self, x: torch.Tensor, num_classes: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"{self.name} (torchattacks) needs images [N, C, H, W], got shape {tuple(x.shape)}")
        if self.targeted and num_classes < 4:
            raise ValueError(f"{self.name} needs at least 4 classes (targeted DLR loss), got {num_classes}")

    def __call__(self, model, x, y, threat, *, num_classes, generator, seed, loss_fn, autocast_dtype, batch_size):
        def run(xb, yb):
            out = self._torchattacks(model, xb, yb, threat, num_classes=num_classes, seed=seed)
            return _project(out, xb, threat.norm, threat.eps)  # remove torchattacks' 1e-12 slack

        with eval_mode(model):
            return _chunked(run, x, y, batch_size)

    def _torchattacks(self, model, x, y, threat, *, num_classes, seed):
        import torchattacks

        norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
        if not self.targeted:
            attack = torchattacks.APGD(model, norm=norm, eps=threat.eps, steps=APGD_STEPS, n_restarts=APGD_RESTARTS,
                                       seed=seed, loss="ce", eot_iter=1, rho=APGD_RHO, verbose=False)
        else:
            # torchattacks attacks the top-(n_classes - 1) other classes: AutoAttack's 9 target
            # classes are n_classes = 10 (fewer when the dataset has fewer classes).
            attack = torchattacks.APGDT(model, norm=norm, eps=threat.eps, steps=APGD_STEPS, n_restarts=APGD_RESTARTS,
                                        seed=seed, eot_iter=1, rho=APGD_RHO, verbose=False,
                                        n_classes=min(num_classes, APGDT_TARGET_CLASSES + 1))
        attack.set_device(x.device)
        # torchattacks seeds the *global* RNG (torch.random.manual_seed); keep the caller's RNG intact.
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = attack(x, y)
        return out.detach().to(dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


ATTACKS: dict[str, Attack] = {
    "clean": Clean(),
    "pgd": PGD(),
    "pgd-targeted": PGD(targeted=True),
    "gaussian": Noise("gaussian"),
    "sign": Noise("sign"),
    "trades-kl": TradesKL(),
    "pgd-strong": StrongPGD(),
    "apgd-ce": APGD(),
    "apgd-t": APGD(targeted=True),
}
PERTURBATIONS = ("clean", "pgd", "pgd-targeted", "gaussian", "sign", "trades-kl")
"""The attacks of the evaluation."""
STRONG_ATTACKS = ("pgd-strong", "apgd-ce", "apgd-t")
"""The stronger attacks of the strong evaluation (:mod:`ncrobust.evaluation.robustness`)."""


def perturb(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: ThreatModel,
    num_classes: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    loss: LossFn | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    restarts: int | None = None,
    eps: float | None = None,
    l2_step: str | None = None,
) -> torch.Tensor:
    """Apply attack ``name`` of :data:`ATTACKS` under ``threat`` to ``x`` with true labels ``y``.

    - ``clean``: ``x`` unchanged (detached).
    - ``pgd``: untargeted :class:`PGD` in eval mode with the threat's norm, eps, step size and steps.
    - ``pgd-targeted``: targeted PGD to ``target_labels(y, num_classes)``.
    - ``gaussian`` / ``sign``: :func:`gaussian` / :func:`random_sign` of size ``threat.eps`` in the
      threat's norm (per pixel for ``linf``, the l2 length for ``l2``).
    - ``trades-kl``: TRADES's KL inner maximisation (:class:`TradesKL`) against the model itself.
    - ``pgd-strong``, ``apgd-ce``, ``apgd-t``: :class:`StrongPGD`, :class:`APGD`; seeded by ``seed``.

    ``loss`` (cross-entropy by default, a loss name or function) is what the PGD attacks ascend.
    ``steps``, ``step_size``, ``eps`` override the threat's values for this call, ``restarts`` the
    attack's (attacks without restarts ignore it); ``l2_step`` the ``l2`` step of ``trades-kl``
    (:data:`TRADES_L2_STEPS`; the other attacks ignore it). ``batch_size`` processes ``x`` in chunks of
    that many examples (bounded memory for any split size); the random stream then continues from
    chunk to chunk, so results depend on it.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    attack = ATTACKS[name]
    if not isinstance(threat, ThreatModel):
        raise ValueError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if attack.seeded:
        _check_seed(seed)
        if generator is not None:
            raise ValueError(f"{name} is seeded by seed=, not by a generator")
    elif seed is not None:
        raise ValueError(f"{name} draws from generator=, not from seed=")
    if restarts is not None:
        _check_restarts(restarts)
        attack = attack.with_restarts(restarts)
    if l2_step is not None:
        attack = attack.with_l2_step(l2_step)
    _check_batch(x, y, num_classes, batch_size)
    attack.check(x, num_classes)
    threat = ThreatModel(threat.norm, threat.eps if eps is None else eps, threat.step_size if step_size is None else step_size,
                         threat.steps if steps is None else steps)
    return attack(model, x.detach(), y.to(x.device), threat, num_classes=num_classes, generator=generator, seed=seed,
                  loss_fn=_resolve_loss(loss), autocast_dtype=autocast_dtype, batch_size=batch_size)


def target_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The targets of ``pgd-targeted``: ``(y + 1) mod C``."""
    _check_num_classes(num_classes)
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must be an integer tensor, got {type(y).__name__} {getattr(y, 'dtype', '')}")
    if y.numel():
        _check_labels_range(y, num_classes)
    return (y + 1) % num_classes


# --------------------------------------------------------------------------------------------
# The attacks with explicit arguments
# --------------------------------------------------------------------------------------------


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    loss: LossFn | str | None = None,
    generator: torch.Generator | None = None,
    train_mode: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:class:`PGD` in the ``norm`` ball of radius ``eps``, its arguments checked.

    Ascends ``loss(model(x_adv), y)`` (cross-entropy by default; any ``ncrobust.losses`` function),
    or descends it when ``targeted`` (``y`` then holds the targets). With ``restarts > 1`` the
    worst case per example over the restarts is returned (judged by the final loss).
    ``train_mode`` selects the model mode during the attack: ``False`` for evaluation attacks
    (eval mode), ``True`` for training-time PGD (BatchNorm in train mode, as Madry/Rice/Su; the
    BatchNorm running statistics are then updated by the attack's forward passes).
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) wraps the attack's forward passes in
    ``torch.autocast``. Returns detached inputs in [0, 1] within the ball, dtype/device of ``x``.
    """
    threat = ThreatModel(norm, float(eps), float(step_size), steps)
    attack = PGD(targeted=targeted, restarts=restarts, random_start=random_start, train_mode=train_mode)
    _check_images(x)
    _check_labels_shape(x, y)
    return attack.run(model, x.detach(), y.to(x.device), threat, generator=generator, loss_fn=_resolve_loss(loss),
                      autocast_dtype=autocast_dtype, check_labels=True)


def trades_kl(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    l2_step: str = "threat",
) -> torch.Tensor:
    """:class:`TradesKL` in the ``norm`` ball of radius ``eps``, its arguments checked; ``l2_step``:
    ``threat`` or ``authors`` (:class:`TradesKL`)."""
    threat = ThreatModel(norm, float(eps), float(step_size), steps)
    _check_images(x)
    return TradesKL(l2_step=l2_step).run(model, x.detach(), threat, generator=generator, autocast_dtype=autocast_dtype)


def gaussian(x: torch.Tensor, *, eps: float, norm: str = "linf", generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise of the threat model's size, clamped to [0, 1].

    ``linf``: ``x + eps * N(0, I)``, a per-pixel standard deviation of ``eps`` (Su et al.'s evaluation
    uses 8/255 per pixel; not norm-bounded). ``l2``: ``x + eps * z / ||z||_2`` with ``z ~ N(0, I)``, a
    uniformly random direction of l2 length ``eps`` (per-pixel eps would be ``sqrt(D)`` times the
    budget: an l2 norm of 20 for 128/255 on CIFAR).
    """
    _check_norm(norm)
    _check_eps(eps)
    _check_images(x)
    return _sized_noise("gaussian", x, eps, norm, generator)


def random_sign(x: torch.Tensor, *, eps: float, norm: str = "linf", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-sign noise of the threat model's size, clamped to [0, 1]: ``linf`` a random corner
    ``x + eps * sign(z)`` of the ball; ``l2`` the same direction scaled to l2 length ``eps``
    (``eps / sqrt(D)`` per pixel)."""
    _check_norm(norm)
    _check_eps(eps)
    _check_images(x)
    return _sized_noise("sign", x, eps, norm, generator)
