"""Su et al.'s per-epoch measurement of the training-time examples (``training.epoch_measure``).

Their code keeps every batch's clean images and the adversarial images the step trained on, and
at the end of each epoch measures both sets with the end-of-epoch model in eval mode: NC1-NC4 of
each, and the angles and distances between the clean and the perturbed class means. Here
:class:`EpochInputs` keeps the same on the training device: the epoch's order (the clean inputs
are the dataset's rows in that order, so they are not copied) and the perturbed images ``[N, ...]``
in the inputs' dtype and memory layout. A step's images are copied in at rows the host knows (a
slice: no host synchronisation per step); under CUDA-graph replay the copy reads the graph's
static output right after each replay, before the next one overwrites it. At the end of the epoch
:meth:`EpochInputs.measure` runs the evaluation's core on them
(:func:`ncrobust.evaluation.checkpoint.input_metrics`), so the rows are those of an evaluated
checkpoint's training split at the penultimate layer, computed by the same code.

The measurement runs in eval mode under ``no_grad`` and draws no random number: BatchNorm's
running statistics, the parameters and every random stream of the training stay as they were, so
the checkpoints and the training log are the same with the option on or off (tested).

This differs from ``training.track_collapse`` (:mod:`ncrobust.training.epoch_collapse`): that one
keeps the features the training step computed (train-mode BatchNorm, the model changing within
the epoch) at no extra forward pass, and logs NC1 and NCC accuracy only.

Cost (``benchmarks/epoch_measure.py``; README, "Paper scale"): the perturbed images are one more
copy of the training set on the device (CIFAR-10: 50,000 x 3 x 32 x 32 float32 = 614 MB), and
the measurement is one eval-mode forward pass per clean and one per perturbed image per epoch
(pass 2 of the statistics reuses pass 1's penultimate features), against the 12 forward and 11
backward passes per image of a PGD-10 training step.
"""

from __future__ import annotations

import pandas as pd
import torch

from ncrobust.evaluation.checkpoint import input_metrics

MEASURE_BATCH_SIZE = 1000
"""Images per forward pass of the measurement (fixed, so the rows do not depend on another key)."""

TRAINING_PERTURBATION = {"pgd": "pgd", "trades": "trades-kl"}
"""The ``perturbation`` value of an adversary kind's training-time examples in the rows: the
name of the attack that made them (``st`` has none: its rows are the clean set only)."""


class EpochInputs:
    """One epoch's training inputs as the steps saw them: the order of the dataset's rows (the
    clean inputs) and, with ``perturbed``, the images the step trained on, row ``i`` being the
    perturbed version of ``x_train[order[i]]``.

    :meth:`start` takes the epoch's order, :meth:`store` a step's images at host-known rows (no
    synchronisation), :meth:`measure` turns the epoch into metric rows (once per epoch).
    """

    def __init__(self, x_train: torch.Tensor, *, perturbed: bool) -> None:
        self.order: torch.Tensor | None = None
        # empty_like keeps the inputs' dtype, device and layout (channels_last on a GPU)
        self.perturbed = torch.empty_like(x_train) if perturbed else None

    def start(self, order: torch.Tensor) -> None:
        """A new epoch, trained in ``order`` (a permutation of the dataset's rows)."""
        self.order = order

    @torch.no_grad()
    def store(self, offset: int, x_adv: torch.Tensor) -> None:
        """Rows ``offset : offset + len(x_adv)`` of the epoch's perturbed images."""
        self.perturbed[offset : offset + x_adv.shape[0]].copy_(x_adv)

    def measure(
        self, model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, kind: str, norm: str,
        num_classes: int, class_counts: torch.Tensor, batch_size: int = MEASURE_BATCH_SIZE,
    ) -> pd.DataFrame:
        """The evaluation's penultimate rows (:data:`ncrobust.columns.RESULT_COLUMNS`, split
        ``train``) of the epoch's clean inputs and, for an adversary ``kind`` that attacks, of its
        perturbed inputs against the clean class means, with ``model`` as it is now (eval mode)."""
        if self.order is None:
            raise ValueError("EpochInputs.measure before start(): no epoch was stored")
        labels = y_train[self.order]
        perturbed = None
        if self.perturbed is not None:
            perturbed = (TRAINING_PERTURBATION[kind], self.perturbed, labels)
        return input_metrics(
            model, x_train, labels, perturbed, split="train", norm=norm, class_counts=class_counts,
            num_classes=num_classes, index=self.order, batch_size=batch_size,
        )
