"""One training segment: from the checkpoint of epoch ``e0`` to the checkpoint of epoch ``e1``.

Standard training (``st``), PGD adversarial training (Madry et al.; the attack runs with BatchNorm
in train mode, as Madry, Rice and Su et al.) and TRADES (Zhang et al.; the KL attack is crafted in
eval mode, the update is made in train mode — Su et al.'s code never switches back to train mode,
we do).

Reproducibility: the shuffle and the attack noise of epoch ``e`` come from a generator seeded by
``(seed, "epoch", e)``, and the learning rate is a function of the global iteration, so a chain of
segments gives bit-identical results to one uninterrupted run, whatever the segment boundaries.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attacks import ThreatModel, pgd, trades_kl
from .experiment import adversary_kind, generator
from .losses import LossFn


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
    """The training recipe of one cell (paper defaults: SGD 0.1, momentum 0.9, wd 5e-4, batch 128)."""

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
    compile: bool = False

    def iterations_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.batch_size)


class SGD:
    """SGD with heavy-ball momentum and L2 weight decay: the update of ``torch.optim.SGD``
    (dampening 0, no Nesterov) with the same tensor operations, so the two agree bit for bit
    (tested)::

        d = grad + weight_decay * p;  b = d at the first step, else b = momentum * b + d;  p -= lr * b

    Why our own: the first use of any ``torch.optim`` optimizer imports ``torch._dynamo`` (2 s),
    paid by every training job of a chain; on the embedded default that was a tenth of the run.
    On a GPU the update uses the multi-tensor (``torch._foreach_*``) kernels, as torch's default.
    The state is plain: ``{"lr": float, "momentum_buffer": [tensor or None per parameter]}``.
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.momentum_buffer: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _buffer(self, i: int, d: torch.Tensor) -> torch.Tensor:
        """Momentum buffer ``i`` after folding in the direction ``d`` (a copy of ``d`` at first)."""
        buf = self.momentum_buffer[i]
        if buf is None:
            buf = self.momentum_buffer[i] = torch.clone(d).detach()
        else:
            buf.mul_(self.momentum).add_(d)
        return buf

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if params and all(p.is_cuda for p in params):  # multi-tensor kernels: a handful of launches
            if self.weight_decay:
                grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
            if self.momentum:
                bufs = [self.momentum_buffer[i] for i in live]
                if all(b is not None for b in bufs):
                    torch._foreach_mul_(bufs, self.momentum)
                    torch._foreach_add_(bufs, grads)
                    grads = bufs
                else:
                    grads = [self._buffer(i, g) for i, g in zip(live, grads)]
            torch._foreach_add_(params, grads, alpha=-self.lr)
            return
        for i, p, g in zip(live, params, grads):
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                g = self._buffer(i, g)
            p.add_(g, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum_buffer": list(self.momentum_buffer)}

    def load_state_dict(self, state: dict) -> None:
        buffers = state.get("momentum_buffer") if isinstance(state, dict) else None
        if not isinstance(buffers, list) or len(buffers) != len(self.params):
            raise ValueError(
                f"optimizer state does not fit the model: {len(buffers) if isinstance(buffers, list) else 'no'} momentum "
                f"buffers for {len(self.params)} parameters (a checkpoint of another model, or of an older ncrobust?)"
            )
        for i, (p, buf) in enumerate(zip(self.params, buffers)):
            if buf is not None and buf.shape != p.shape:
                raise ValueError(f"momentum buffer {i} has shape {tuple(buf.shape)}, parameter {tuple(p.shape)}")
            self.momentum_buffer[i] = None if buf is None else buf.to(device=p.device, dtype=p.dtype).clone()
        self.lr = float(state.get("lr", self.lr))


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> SGD:
    return SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _snapshot(model: torch.nn.Module, optimizer: SGD, epoch: int, iteration: int) -> dict:
    """A checkpoint that owns its tensors (state dicts alias the live parameters)."""
    return copy.deepcopy(
        {
            "epoch": epoch,
            "iteration": iteration,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )


def initial_checkpoint(model: torch.nn.Module, recipe: Recipe) -> dict:
    """Epoch 0: the seeded initialisation and a fresh optimizer."""
    return _snapshot(model, make_optimizer(model, recipe), 0, 0)


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    return torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Clean accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
            for i in range(0, len(x), batch_size)
        )
    finally:
        model.train(was_training)
    return correct / max(len(x), 1)


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
    progress=None,
) -> tuple[dict, list[dict]]:
    """Train from ``checkpoint`` (epoch e0) to ``end_epoch``; return the new checkpoint and one
    log row per epoch. ``x_train`` is one resident tensor in [0, 1]; batches are index slices."""
    start_epoch = int(checkpoint["epoch"])
    if not start_epoch < end_epoch <= recipe.epochs:
        raise ValueError(f"segment {start_epoch} -> {end_epoch} is not within 0..{recipe.epochs} and increasing")
    device = x_train.device
    model.load_state_dict(checkpoint["model"])
    optimizer = make_optimizer(model, recipe)
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    kind = adversary_kind(recipe.adversary)
    net = model
    if recipe.compile:  # same parameters; state comes from `model`
        import torch._inductor.config as inductor_config

        inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
        net = torch.compile(model)
    n = len(x_train)
    per_epoch = recipe.iterations_per_epoch(n)
    total = per_epoch * recipe.epochs
    iteration = int(checkpoint["iteration"])
    if iteration != start_epoch * per_epoch:
        raise ValueError(
            f"checkpoint iteration {iteration} does not match epoch {start_epoch} x {per_epoch} iterations/epoch: "
            "was it trained with another batch size or dataset?"
        )
    t = recipe.threat
    rows = []
    for epoch in range(start_epoch + 1, end_epoch + 1):
        started = time.perf_counter()
        gen = generator(seed, "epoch", epoch, device=device)
        order = torch.randperm(n, generator=gen, device=device)
        model.train()
        sums = {"loss": 0.0, "clean_correct": 0, "robust_correct": 0}
        for step in range(per_epoch):
            lr = optimizer.lr = recipe.schedule.lr(recipe.lr, iteration, total)
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            with _autocast(xb, recipe.autocast_dtype):
                if kind == "st":
                    logits = net(xb)
                    loss = recipe.loss(logits, yb)
                    clean_logits, robust_logits = logits, None
                elif kind == "pgd":
                    x_adv = pgd(
                        net, xb, yb, norm=t.norm, eps=t.eps, step_size=t.step_size, steps=t.steps,
                        loss=recipe.loss, generator=gen, train_mode=True,
                    )
                    robust_logits = net(x_adv)
                    loss = recipe.loss(robust_logits, yb)
                    clean_logits = None  # clean train accuracy: one eval-mode pass at the end of the epoch
                else:  # trades
                    x_adv = trades_kl(net, xb, norm=t.norm, eps=t.eps, step_size=t.step_size, steps=t.steps, generator=gen)
                    model.train()
                    clean_logits = net(xb)
                    robust_logits = net(x_adv)
                    kl = F.kl_div(
                        F.log_softmax(robust_logits.float(), 1), F.softmax(clean_logits.float(), 1), reduction="batchmean"
                    )
                    loss = recipe.loss(clean_logits, yb) + recipe.trades_beta * kl
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()}) at epoch {epoch}, step {step + 1}/{per_epoch}, lr {lr:g}; "
                    "lower training.optimizer.lr or check the data"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iteration += 1
            sums["loss"] += loss.item() * len(idx)
            if clean_logits is not None:
                sums["clean_correct"] += (clean_logits.argmax(1) == yb).sum().item()
            if robust_logits is not None:
                sums["robust_correct"] += (robust_logits.argmax(1) == yb).sum().item()
        row = {
            "epoch": epoch,
            "lr": lr,
            "loss": sums["loss"] / n,
            "train_accuracy": sums["clean_correct"] / n if kind != "pgd" else accuracy(model, x_train, y_train),
            "train_robust_accuracy": sums["robust_correct"] / n if kind != "st" else float("nan"),
            "test_accuracy": (
                accuracy(model, x_test, y_test) if recipe.log_test_accuracy and x_test is not None else float("nan")
            ),
        }
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['train_accuracy']:.3f}")
    return _snapshot(model, optimizer, end_epoch, iteration), rows
