"""One training segment: from the checkpoint of epoch ``e0`` to the checkpoint of epoch ``e1``.

Standard training (``st``: :class:`StandardStep`), PGD adversarial training (Madry et al.;
:class:`PGDStep`: the attack runs with BatchNorm in train mode, as Madry, Rice and Su et al.) and
TRADES (Zhang et al.; :class:`TradesStep`: the KL attack is crafted in eval mode; ``trades_bn``
chooses the mode of the update: ``train``, or ``eval`` as Su et al.'s code, which never switches
back to train mode).

Reproducibility: the shuffle and the attack noise of epoch ``e`` come from a generator seeded by
``(seed, "epoch", e)``, the global RNG (dropout) is seeded by ``(seed, "global", e)`` at the start
of epoch ``e``, and the learning rate is a function of the global iteration; so a checkpoint needs
no RNG state and a chain of segments gives bit-identical results to one uninterrupted run, whatever
the segment boundaries (on a GPU with ``deterministic`` kernels).

GPU speed: one step (attack, forward, loss, backward, SGD update, log sums) is one function of
tensors only: no ``.item()``, no Python ``if`` on a device value. The log (loss and accuracy sums,
the first non-finite step, the NC statistics) is summed on the device and read once per epoch.
On a GPU the full-batch step is captured in a CUDA graph after a few eager warm-up steps and
replayed (``cuda_graph``); the last, partial batch runs the same function eagerly. The attack's
random start is drawn outside the step from the epoch's generator (:meth:`TrainStep.draw_noise`:
the attack's own ``draw_start``, the draws its evaluation call makes), so capture needs no
graph-safe generator state.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ncrobust.attacks import PGD, TRADES_L2_STEPS, ThreatModel, TradesKL
from ncrobust.cell import Adversary
from ncrobust.columns import COLLAPSE_LOG_COLUMNS
from ncrobust.losses import LossFn
from ncrobust.models.base import eval_mode
from ncrobust.seeding import generator, stream_seed
from ncrobust.training.epoch_collapse import EpochFeatures, ncc_accuracy
from ncrobust.training.epoch_measure import EpochInputs
from ncrobust.training.mixup import check_alpha, draw_mixup, majority_label, mix, mixed_loss

TRADES_BN = ("train", "eval")
CUDA_GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN autotuning, lazy init)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch, step and lr."""


@dataclass(frozen=True)
class Schedule:
    """Learning rate as a function of the global iteration.

    ``piecewise``: ``lr * factors[i]`` once ``iteration >= milestones[i] * total`` (milestones are
    fractions of the whole training; the paper: /10 at 25%, /100 at 37.5%); ``cosine``: cosine
    decay to 0 over the whole training; ``constant``.
    """

    kind: str = "piecewise"
    milestones: tuple[float, ...] = (0.25, 0.375)
    factors: tuple[float, ...] = (0.1, 0.01)

    def __post_init__(self) -> None:
        if self.kind not in ("piecewise", "cosine", "constant"):
            raise ValueError(f"unknown schedule {self.kind!r}; allowed: piecewise, cosine, constant")
        if len(self.milestones) != len(self.factors):
            raise ValueError("schedule milestones and factors must have the same length")

    def lr(self, base_lr: float, iteration: int, total: int) -> float:
        if self.kind == "constant":
            return base_lr
        if self.kind == "cosine":
            return base_lr * 0.5 * (1.0 + math.cos(math.pi * iteration / total))
        factor = 1.0
        for milestone, f in zip(self.milestones, self.factors):
            if iteration >= milestone * total:
                factor = f
        return base_lr * factor


@dataclass(frozen=True)
class Recipe:
    """The training recipe of one cell (paper defaults: SGD 0.1, momentum 0.9, wd 5e-4, batch 128).

    ``trades_bn``: BatchNorm mode of the TRADES update (``eval``: Su et al.'s code, where the
    running statistics never move). ``pgd_clean_bn_pass``: the clean forward pass that every PGD-AT
    step makes (for the log) also feeds BatchNorm's running statistics, as Su et al.'s and Rice et
    al.'s code (otherwise it uses batch statistics without updating them). ``track_collapse``:
    per-epoch NC1 and NCC accuracy of the in-step features (train-mode BatchNorm, the model
    changing within the epoch) in the log. ``epoch_measure``: Su et al.'s per-epoch measurement,
    the epoch's clean and training-time perturbed inputs measured with the end-of-epoch model in
    eval mode (:mod:`ncrobust.training.epoch_measure`); it never changes the training.
    ``cuda_graph``: capture the full-batch step in a CUDA graph (ignored on the CPU).
    ``mixup_alpha``: mixup's Beta(alpha, alpha) (0 = off; :mod:`ncrobust.training.mixup` says how it
    combines with each adversary). ``trades_l2_step``: the step of TRADES' ``l2`` attack
    (:class:`~ncrobust.attacks.TradesKL`: ``threat``, or ``authors``: ``2 eps / steps`` and a random
    direction where the gradient is zero).
    """

    adversary: str
    loss: LossFn
    threat: ThreatModel
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Schedule = field(default_factory=Schedule)
    trades_beta: float = 6.0
    log_test_accuracy: bool = True
    autocast_dtype: torch.dtype | None = None
    trades_bn: str = "train"
    pgd_clean_bn_pass: bool = False
    track_collapse: bool = False
    cuda_graph: bool = True
    mixup_alpha: float = 0.0
    epoch_measure: bool = False
    trades_l2_step: str = "threat"

    def __post_init__(self) -> None:
        check_alpha(self.mixup_alpha)
        if self.epoch_measure and self.mixup_alpha:
            raise ValueError("training.epoch_measure with training.mixup: a mixed input has no one label to group it by; "
                             "switch one of them off")
        if self.trades_l2_step not in TRADES_L2_STEPS:
            raise ValueError(f"training.trades_l2_step = {self.trades_l2_step!r}: not allowed; allowed: {', '.join(TRADES_L2_STEPS)}")
        if self.trades_bn not in TRADES_BN:
            raise ValueError(f"training.trades_bn = {self.trades_bn!r}: not allowed; allowed: {', '.join(TRADES_BN)}")
        if self.batch_size < 1:
            raise ValueError(f"training.batch_size = {self.batch_size}: must be >= 1")

    def iterations_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.batch_size)


class SGD:
    """SGD with heavy-ball momentum and L2 weight decay: the update of ``torch.optim.SGD``
    (dampening 0, no Nesterov) with the same formula (tested against it)::

        d = grad + weight_decay * p;  b = d at the first step, else b = momentum * b + d;  p -= lr * b

    Why our own: the first use of any ``torch.optim`` optimizer imports ``torch._dynamo`` (2 s),
    paid by every training job of a chain; on the embedded default that was a tenth of the run.
    And the learning rate lives in a device tensor (``lr_tensor``; setting ``lr`` fills it without
    a host synchronisation), so a captured CUDA graph of the step reads the schedule's current
    value at every replay. The update is multi-tensor (``torch._foreach_*``) on every device: one
    code path, a handful of launches on a GPU. The state is plain:
    ``{"lr": float, "momentum_buffer": [tensor or None per parameter]}``.
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.lr_tensor = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = lr
        self.momentum_buffer: list[torch.Tensor | None] = [None] * len(self.params)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(value)
        self.lr_tensor.fill_(self._lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            bufs = [self.momentum_buffer[i] for i in live]
            old = [j for j, b in enumerate(bufs) if b is not None]
            if old:
                torch._foreach_mul_([bufs[j] for j in old], self.momentum)
                torch._foreach_add_([bufs[j] for j in old], [grads[j] for j in old])
            for j, b in enumerate(bufs):
                if b is None:  # the first step: b = d
                    bufs[j] = self.momentum_buffer[live[j]] = torch.clone(grads[j]).detach()
            grads = bufs
        torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr_tensor))

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum_buffer": list(self.momentum_buffer)}

    def load_state_dict(self, state: dict) -> None:
        buffers = state.get("momentum_buffer") if isinstance(state, dict) else None
        if not isinstance(buffers, list) or len(buffers) != len(self.params) or "lr" not in state:
            raise ValueError(
                f"optimizer state does not fit the model: {len(buffers) if isinstance(buffers, list) else 'no'} momentum "
                f"buffers for {len(self.params)} parameters{'' if isinstance(state, dict) and 'lr' in state else ', no lr'} "
                "(a checkpoint of another model or another ncrobust version: delete it and rerun to rebuild it)"
            )
        for i, (p, buf) in enumerate(zip(self.params, buffers)):
            if buf is not None and buf.shape != p.shape:
                raise ValueError(f"momentum buffer {i} has shape {tuple(buf.shape)}, parameter {tuple(p.shape)}")
            self.momentum_buffer[i] = None if buf is None else buf.to(device=p.device, dtype=p.dtype).clone()
        self.lr = float(state["lr"])


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> SGD:
    return SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _snapshot(model: torch.nn.Module, optimizer: SGD, epoch: int, iteration: int) -> dict:
    """A checkpoint that owns its tensors (state dicts alias the live parameters). No RNG state:
    every random draw comes from a generator seeded by ``(seed, epoch)`` (module docstring)."""
    return copy.deepcopy(
        {"epoch": epoch, "iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    )


def initial_checkpoint(model: torch.nn.Module, recipe: Recipe) -> dict:
    """Epoch 0: the seeded initialisation and a fresh optimizer."""
    return _snapshot(model, make_optimizer(model, recipe), 0, 0)


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    """bf16 autocast when ``dtype`` is set; the weight-cast cache is off because a captured CUDA
    graph must not keep casts made before a parameter update (same values either way)."""
    return torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Clean accuracy in eval mode (the model's modes are restored); counted on the device, read once."""
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()
    return int(correct) / max(len(x), 1)


@contextlib.contextmanager
def _batch_norm_stats_frozen(modules: list[nn.Module]):
    """Train-mode BatchNorm (batch statistics) that does not update its running statistics."""
    saved = [m.track_running_stats for m in modules]
    for m in modules:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(modules, saved):
            m.track_running_stats = flag


def _forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return model(x), None


# --------------------------------------------------------------------------------------------
# The step and its epoch log


class StepBatch(NamedTuple):
    """One step's inputs as the passes of every kind of step see them: the batch ``x, y``, the
    attack's start (its draws, consumed), mixup's ``lam, perm`` (None without mixup), the labels
    a prediction on the (mixed) batch counts against, and the training loss of logits on it."""

    x: torch.Tensor
    y: torch.Tensor
    start: tuple[torch.Tensor, ...]
    lam: torch.Tensor | None
    perm: torch.Tensor | None
    y_mixed: torch.Tensor
    train_loss: Callable[[torch.Tensor], torch.Tensor]

    def mixed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` mixed with the step's ``lam, perm`` (``x`` itself without mixup)."""
        return x if self.lam is None else mix(x, self.lam, self.perm)


class StepPasses(NamedTuple):
    """What one step's forward passes give: the loss, the clean logits and features with the labels
    the clean predictions count against, the adversarial ones and the adversarial inputs the step
    trained on (None without an attack)."""

    loss: torch.Tensor
    clean_logits: torch.Tensor
    h_clean: torch.Tensor | None
    y_clean: torch.Tensor
    robust_logits: torch.Tensor | None = None
    h_adv: torch.Tensor | None = None
    x_adv: torch.Tensor | None = None


class StepOutput(NamedTuple):
    """What one step hands to the epoch's stores (:meth:`TrainStep.store_features`), None where
    nothing keeps it: the clean and adversarial penultimate features (float32) and, with mixup,
    the labels they count against (``track_collapse``), and the adversarial inputs the step
    trained on (``epoch_measure``). A captured graph overwrites these at every replay, so they
    are copied out before the next step."""

    h_clean: torch.Tensor | None = None
    h_adv: torch.Tensor | None = None
    y_clean: torch.Tensor | None = None
    y_adv: torch.Tensor | None = None
    x_adv: torch.Tensor | None = None


class TrainStep(abc.ABC):
    """One training step, as a function of tensors only: ``step(x, y, noise)`` runs the attack,
    the forward passes, the loss, the backward pass and the SGD update with ``optimizer.lr_tensor``,
    and adds the step's log to device tensors. No host synchronisation, so the same function runs
    eagerly or inside a CUDA graph. :meth:`draw_noise` draws the step's random inputs (outside it);
    :meth:`epoch_log` reads the sums back (once per epoch).

    One subclass per adversary kind (:class:`StandardStep`, :class:`PGDStep`, :class:`TradesStep`,
    chosen by :func:`make_train_step`) says what the step's forward passes are (:meth:`passes`)
    and which attack (``attack``, None for standard training) it draws a start for; the rest is
    common.

    Log definitions (the same for every adversary):
    - ``loss``: mean over the epoch's samples of the training loss of the sample's batch;
    - ``train_accuracy``: share of the epoch's clean training images classified correctly by the
      model when it trained on them (before the update, BatchNorm in the mode of the step: batch
      statistics, or running statistics for TRADES with ``trades_bn: eval``); a PGD step makes a
      clean forward pass for it (it feeds the running statistics only with ``pgd_clean_bn_pass``);
    - ``train_robust_accuracy``: the same on the training-time adversarial examples (NaN for st);
    - with mixup, a prediction on a mixed input counts against the mix's majority label
      (:func:`ncrobust.training.mixup.majority_label`), and the NC columns group the features of mixed
      inputs by it; PGD's clean log pass stays on the unmixed images;
    - with ``track_collapse`` (:data:`COLLAPSE_LOG_COLUMNS`): NC1, NC1 trace ratio and NCC accuracy
      of the epoch's clean and of its adversarial penultimate features as the steps computed them
      (in-step: BatchNorm in the mode of the step, the model changing within the epoch; the step
      keeps them in :class:`~ncrobust.training.epoch_collapse.EpochFeatures`), and the NCC accuracy
      of the adversarial features with the epoch's clean class means.

    With ``epoch_measure`` the step also hands out the adversarial inputs it trained on, for
    :class:`~ncrobust.training.epoch_measure.EpochInputs` (``inputs``, set by :func:`train_segment`).
    """

    attack: PGD | TradesKL | None = None
    """The attack whose start :meth:`draw_noise` draws; None: the step trains on clean inputs only."""

    def __init__(self, model: nn.Module, optimizer: SGD, recipe: Recipe, *, num_classes: int, n_train: int,
                 device: torch.device) -> None:
        self.model, self.optimizer, self.recipe = model, optimizer, recipe
        self.train_mode = True
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.loss_sum, self.bad_loss = zeros(torch.float64), zeros(torch.float32)
        self.clean_correct, self.robust_correct, self.seen = zeros(torch.int64), zeros(torch.int64), zeros(torch.int64)
        self.step_index, self.first_bad = zeros(torch.int64), zeros(torch.int64)
        self.num_classes = num_classes
        self.clean_features = self.adv_features = None
        self.inputs: EpochInputs | None = None  # the epoch's inputs (epoch_measure), set by train_segment
        if recipe.track_collapse:
            classifier = getattr(model, "classifier", None)
            if not hasattr(model, "forward_features") or not isinstance(classifier, nn.Linear):
                raise ValueError("training.track_collapse needs a model with forward_features() and a Linear classifier "
                                 "(every ncrobust model has them); set training.track_collapse: false for this one")
            d = classifier.in_features
            self.clean_features = EpochFeatures(n_train, d, device)
            if self.attack is not None:
                self.adv_features = EpochFeatures(n_train, d, device)
        # with mixup a stream's features are labelled by the label each prediction was counted
        # against (the majority label of a mix), kept on the device as the features are
        self.stream_labels = None
        if recipe.track_collapse and recipe.mixup_alpha:
            self.stream_labels = tuple(
                None if store is None else torch.zeros(n_train, dtype=torch.int64, device=device)
                for store in (self.clean_features, self.adv_features)
            )
        self.reset()

    def reset(self) -> None:
        """Zero the epoch's sums in place (a captured graph keeps pointing at them)."""
        for t in (self.loss_sum, self.bad_loss, self.clean_correct, self.robust_correct, self.seen, self.step_index):
            t.zero_()
        self.first_bad.fill_(-1)

    def draw_noise(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Every random input of one step on batch ``x``, from ``gen``, in draw order: the attack's
        start (its ``draw_start``: none for standard training), then with mixup ``(lam, perm)``
        (:func:`ncrobust.training.mixup.draw_mixup`), the last two entries. Drawn outside the step so that
        a captured step takes them as inputs."""
        start = () if self.attack is None else self.attack.draw_start(x, self.recipe.threat, gen)
        return start + draw_mixup(self.recipe.mixup_alpha, x.shape[0], gen) if self.recipe.mixup_alpha else start

    def __call__(self, x: torch.Tensor, y: torch.Tensor, noise: tuple[torch.Tensor, ...]) -> StepOutput:
        """One step; returns what the epoch's stores keep for :meth:`store_features` (a graph's
        outputs are overwritten at every replay)."""
        recipe, model = self.recipe, self.model
        self.optimizer.zero_grad()
        if model.training != self.train_mode:  # Module.train walks every submodule: only when it changes
            model.train(self.train_mode)
        if recipe.mixup_alpha:  # (lam, perm) are the last draws (draw_noise)
            start, (lam, perm) = noise[:-2], noise[-2:]
            train_loss = lambda logits: mixed_loss(recipe.loss, logits, y, lam, perm)  # noqa: E731
            y_mixed = majority_label(y, lam, perm)
        else:
            start, lam, perm = noise, None, None
            train_loss = lambda logits: recipe.loss(logits, y)  # noqa: E731
            y_mixed = y
        with _autocast(x, recipe.autocast_dtype):
            out = self.passes(StepBatch(x, y, start, lam, perm, y_mixed, train_loss))
        out.loss.backward()
        self.optimizer.step()
        logged = self._log(x.shape[0], out.y_clean, y_mixed, out.loss.detach(), out.clean_logits, out.robust_logits,
                           out.h_clean, out.h_adv)
        if self.inputs is None or self.inputs.perturbed is None:
            return logged
        return logged._replace(x_adv=out.x_adv.detach())

    @abc.abstractmethod
    def passes(self, batch: StepBatch) -> StepPasses:
        """The step's forward passes and loss, under the step's autocast and in its mode."""

    def store_features(self, offset: int, out: StepOutput) -> None:
        """Keep a step's outputs at rows ``offset : offset + n`` of the epoch's stores."""
        for store, h in zip((self.clean_features, self.adv_features), (out.h_clean, out.h_adv)):
            if store is not None:
                store.store(offset, h)
        if self.stream_labels is not None:
            for labels, y in zip(self.stream_labels, (out.y_clean, out.y_adv)):
                if labels is not None:
                    labels[offset : offset + y.shape[0]].copy_(y)
        if out.x_adv is not None:
            self.inputs.store(offset, out.x_adv)

    @torch.no_grad()
    def _log(self, n, y_clean, y_robust, loss, clean_logits, robust_logits, h_clean, h_adv) -> StepOutput:
        self.loss_sum.add_(loss.double() * n)
        newly_bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(newly_bad, self.step_index, self.first_bad))
        self.bad_loss.copy_(torch.where(newly_bad, loss.float(), self.bad_loss))
        self.step_index.add_(1)
        self.clean_correct.add_((clean_logits.argmax(1) == y_clean).sum())
        if robust_logits is not None:
            self.robust_correct.add_((robust_logits.argmax(1) == y_robust).sum())
        self.seen.add_(n)
        out = StepOutput(*(
            None if store is None else h.float() for store, h in ((self.clean_features, h_clean), (self.adv_features, h_adv))
        ))
        return out if self.stream_labels is None else out._replace(y_clean=y_clean, y_adv=y_robust)

    def epoch_log(self, labels_in_order: torch.Tensor) -> dict:
        """The epoch's sums as numbers (one read-back, plus the NC arithmetic when tracked);
        ``labels_in_order``: the labels of the epoch's samples in the order they were trained on
        (with mixup, each stream's own stored labels are used: the majority label of each mix)."""
        loss_sum, clean, robust, seen, first_bad, bad_loss = torch.stack([
            self.loss_sum, self.clean_correct.double(), self.robust_correct.double(), self.seen.double(),
            self.first_bad.double(), self.bad_loss.double(),
        ]).tolist()
        n = max(seen, 1.0)
        row = {
            "loss": loss_sum / n,
            "train_accuracy": clean / n,
            "train_robust_accuracy": robust / n if self.attack is not None else math.nan,
            "first_bad_step": int(first_bad),
            "bad_loss": bad_loss,
        }
        row.update(dict.fromkeys(COLLAPSE_LOG_COLUMNS, math.nan))
        if first_bad >= 0 or self.clean_features is None:  # a diverged epoch stops the job anyway
            return row
        C = self.num_classes
        clean_labels, adv_labels = self.stream_labels or (labels_in_order, labels_in_order)
        for stream, store, labels in (("clean", self.clean_features, clean_labels), ("adv", self.adv_features, adv_labels)):
            if store is not None:
                for name, value in store.metrics(labels, C).items():
                    row[f"{name}_{stream}"] = value
        if self.adv_features is not None:
            clean_means = self.clean_features.class_means(clean_labels, C)
            row["ncc_accuracy_clean_means_adv"] = ncc_accuracy(self.adv_features.features, adv_labels, clean_means)
        return row


class StandardStep(TrainStep):
    """Standard training (``st``): the loss of the (mixed) clean batch."""

    def passes(self, batch: StepBatch) -> StepPasses:
        clean_logits, h_clean = _forward_features(self.model, batch.mixed(batch.x))
        return StepPasses(batch.train_loss(clean_logits), clean_logits, h_clean, batch.y_mixed)


class PGDStep(TrainStep):
    """PGD adversarial training (Madry et al.): the loss of PGD's examples, crafted in train mode
    (BatchNorm on batch statistics, as Madry, Rice and Su et al.), each example attacked with its
    own label, then mixed (Lamb et al.); a clean pass for the log, on the unmixed batch, that feeds
    BatchNorm's running statistics only with ``pgd_clean_bn_pass``."""

    attack = PGD()

    def __init__(self, model: nn.Module, optimizer: SGD, recipe: Recipe, **kwargs) -> None:
        super().__init__(model, optimizer, recipe, **kwargs)
        self.batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def passes(self, batch: StepBatch) -> StepPasses:
        model, recipe = self.model, self.recipe
        x_adv = batch.mixed(self.attack.from_start(model, batch.x, batch.y, batch.start, recipe.threat, loss_fn=recipe.loss))
        robust_logits, h_adv = _forward_features(model, x_adv)
        loss = batch.train_loss(robust_logits)
        frozen = contextlib.nullcontext() if recipe.pgd_clean_bn_pass else _batch_norm_stats_frozen(self.batch_norms)
        with torch.no_grad(), frozen:
            clean_logits, h_clean = _forward_features(model, batch.x)
        return StepPasses(loss, clean_logits, h_clean, batch.y, robust_logits, h_adv, x_adv)


class TradesStep(TrainStep):
    """TRADES (Zhang et al.): the natural loss of the (mixed) clean batch plus ``trades_beta`` times
    the KL to TRADES' examples, crafted on it in eval mode; the update in the ``trades_bn`` mode."""

    attack = TradesKL()

    def __init__(self, model: nn.Module, optimizer: SGD, recipe: Recipe, **kwargs) -> None:
        self.attack = TradesKL(l2_step=recipe.trades_l2_step)
        super().__init__(model, optimizer, recipe, **kwargs)
        self.train_mode = recipe.trades_bn != "eval"

    def passes(self, batch: StepBatch) -> StepPasses:
        model, recipe = self.model, self.recipe
        x_in = batch.mixed(batch.x)
        with eval_mode(model):
            x_adv = self.attack.from_start(model, x_in, batch.start, recipe.threat)
        clean_logits, h_clean = _forward_features(model, x_in)
        robust_logits, h_adv = _forward_features(model, x_adv)
        kl = F.kl_div(F.log_softmax(robust_logits.float(), 1), F.softmax(clean_logits.float(), 1), reduction="batchmean")
        loss = batch.train_loss(clean_logits) + recipe.trades_beta * kl
        return StepPasses(loss, clean_logits, h_clean, batch.y_mixed, robust_logits, h_adv, x_adv)


TRAIN_STEPS: dict[str, type[TrainStep]] = {"st": StandardStep, "pgd": PGDStep, "trades": TradesStep}
"""The training step of each adversary kind."""


def make_train_step(model: nn.Module, optimizer: SGD, recipe: Recipe, *, num_classes: int, n_train: int,
                    device: torch.device) -> TrainStep:
    """The training step of ``recipe``'s adversary."""
    step = TRAIN_STEPS[Adversary.parse(recipe.adversary).kind]
    return step(model, optimizer, recipe, num_classes=num_classes, n_train=n_train, device=device)


def _refill(buffers: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]) -> None:
    """Copy a step's inputs into the captured graph's static buffers. Outside autograd: the step
    consumes its attack start in place and marks it ``requires_grad`` (the buffer becomes a leaf
    that requires grad), and an in-place copy into such a leaf is refused under grad mode."""
    with torch.no_grad():
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)


class CapturedStep:
    """Runs a :class:`TrainStep` eagerly, or, on a GPU with ``enabled``, replays it from a CUDA
    graph for full batches: the first ``CUDA_GRAPH_WARMUP_STEPS`` full batches run eagerly on a
    side stream (cuDNN autotuning, lazy initialisation, the momentum buffers), then the step is
    captured once with static input buffers and replayed; other batch sizes (the last, partial
    batch) run eagerly. The step function is the same either way; this is only a wrapper."""

    def __init__(self, step: TrainStep, batch_size: int, device: torch.device, enabled: bool) -> None:
        self.step, self.batch_size = step, batch_size
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] = ()
        self.output: StepOutput = StepOutput()
        self.warm = 0
        self.stream = torch.cuda.Stream(device) if self.enabled else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, noise: tuple[torch.Tensor, ...]) -> StepOutput:
        if not self.enabled or x.shape[0] != self.batch_size:
            return self.step(x, y, noise)
        if self.graph is None and self.warm < CUDA_GRAPH_WARMUP_STEPS:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = self.step(x, y, noise)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.warm += 1
            return out
        if self.graph is None:
            self.static = tuple(t.clone() for t in (x, y, *noise))
            self.graph = torch.cuda.CUDAGraph()
            # captured on the step's own stream, not the process-wide default capture stream: cuBLAS
            # keeps one workspace per stream, and two graphs captured on one stream would share it
            # (a race, or a hang, when two cells' graphs replay at once on two streams)
            with torch.cuda.graph(self.graph, stream=self.stream):  # records only; the replay below runs this batch
                self.output = self.step(self.static[0], self.static[1], self.static[2:])
        else:
            _refill(self.static, (x, y, *noise))
        self.graph.replay()
        return self.output


def train_segment(
    model: torch.nn.Module,
    checkpoint: dict,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    recipe: Recipe,
    end_epoch: int,
    seed: int,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    num_classes: int | None = None,
    progress=None,
    epoch_metrics: list[tuple[int, pd.DataFrame]] | None = None,
    class_counts: torch.Tensor | None = None,
) -> tuple[dict, list[dict]]:
    """Train from ``checkpoint`` (epoch e0) to ``end_epoch``; return the new checkpoint and one
    log row per epoch (:class:`TrainStep` defines the columns). ``x_train`` is one resident tensor
    in [0, 1] on the training device; batches are index slices. The checkpoint's tensors may sit
    on any device (they are copied to the model's). ``num_classes`` defaults to the classifier's
    output width. A non-finite loss raises :class:`NonFiniteLossError` at the end of its epoch,
    naming the first bad step and its learning rate.

    With ``recipe.epoch_measure``, ``(epoch, rows)`` of every epoch's measurement
    (:meth:`~ncrobust.training.epoch_measure.EpochInputs.measure`) are appended to
    ``epoch_metrics`` (required then); ``class_counts`` (the training split's samples per class,
    for the imbalance rows) default to the counts of ``y_train``."""
    start_epoch = int(checkpoint["epoch"])
    if not start_epoch < end_epoch <= recipe.epochs:
        raise ValueError(f"segment {start_epoch} -> {end_epoch} is not within 0..{recipe.epochs} and increasing")
    device = x_train.device
    y_train = y_train.to(device)
    model.load_state_dict(checkpoint["model"])
    optimizer = make_optimizer(model, recipe)
    optimizer.load_state_dict(checkpoint["optimizer"])
    n = len(x_train)
    per_epoch = recipe.iterations_per_epoch(n)
    total = per_epoch * recipe.epochs
    iteration = int(checkpoint["iteration"])
    if iteration != start_epoch * per_epoch:
        raise ValueError(
            f"checkpoint iteration {iteration} does not match epoch {start_epoch} x {per_epoch} iterations/epoch: "
            "was it trained with another batch size or dataset?"
        )
    if num_classes is None:
        num_classes = getattr(getattr(model, "classifier", None), "out_features", None) or int(y_train.max()) + 1
    step = make_train_step(model, optimizer, recipe, num_classes=num_classes, n_train=n, device=device)
    if recipe.epoch_measure:
        if epoch_metrics is None:
            raise ValueError("training.epoch_measure: pass a list as epoch_metrics to receive the measurements")
        step.inputs = EpochInputs(x_train, perturbed=step.attack is not None)
        if class_counts is None:
            class_counts = torch.bincount(y_train, minlength=num_classes).cpu()
    run = CapturedStep(step, recipe.batch_size, device, recipe.cuda_graph)
    rows = []
    for epoch in range(start_epoch + 1, end_epoch + 1):
        started = time.perf_counter()
        gen = generator(seed, "epoch", epoch, device=device)
        torch.manual_seed(stream_seed(seed, "global", epoch))  # dropout: reproducible without RNG state in checkpoints
        order = torch.randperm(n, generator=gen, device=device)
        step.reset()
        if step.inputs is not None:
            step.inputs.start(order)
        model.train()
        first_iteration = iteration
        for s in range(per_epoch):
            optimizer.lr = recipe.schedule.lr(recipe.lr, iteration, total)
            idx = order[s * recipe.batch_size : (s + 1) * recipe.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            step.store_features(s * recipe.batch_size, run(xb, yb, step.draw_noise(xb, gen)))
            iteration += 1
        log = step.epoch_log(y_train[order])
        if log["first_bad_step"] >= 0:
            bad = log["first_bad_step"]
            lr = recipe.schedule.lr(recipe.lr, first_iteration + bad, total)
            raise NonFiniteLossError(
                f"non-finite training loss ({log['bad_loss']}) at epoch {epoch}, step {bad + 1}/{per_epoch}, lr {lr:g}; "
                "lower training.optimizer.lr or check the data"
            )
        row = {
            "epoch": epoch,
            "lr": optimizer.lr,
            "loss": log["loss"],
            "train_accuracy": log["train_accuracy"],
            "train_robust_accuracy": log["train_robust_accuracy"],
            "test_accuracy": (
                accuracy(model, x_test, y_test.to(device)) if recipe.log_test_accuracy and x_test is not None else math.nan
            ),
            **{c: log[c] for c in COLLAPSE_LOG_COLUMNS},
        }
        if step.inputs is not None:  # eval mode, no gradient, no random draw: the training is untouched
            epoch_metrics.append((epoch, step.inputs.measure(
                model, x_train, y_train, kind=Adversary.parse(recipe.adversary).kind, norm=recipe.threat.norm,
                num_classes=num_classes, class_counts=class_counts,
            )))
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['train_accuracy']:.3f}")
    return _snapshot(model, optimizer, end_epoch, iteration), rows
