"""Measure one network, outside the grid: the evaluation of a workflow cell on any classifier.

:func:`measure` runs :func:`ncrobust.evaluation.checkpoint.evaluate_checkpoint` (every layer,
every perturbation, the same tidy rows as the workflow's metrics tables) on a model and a
prepared dataset; :func:`summary_lines` is the short account ``ncrobust measure`` prints.
Threat models default to RobustBench's CIFAR ones (:data:`STANDARD_THREATS`) unless a config
names the dataset's (``datasets.<name>.threat``, as the workflow reads it).
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from ncrobust.attacks import ThreatModel
from ncrobust.columns import PENULTIMATE
from ncrobust.evaluation.checkpoint import EvaluationPlan, evaluate_checkpoint

STANDARD_THREATS = {
    "linf": ThreatModel(norm="linf", eps=8 / 255, step_size=2 / 255, steps=10),
    "l2": ThreatModel(norm="l2", eps=0.5, step_size=0.125, steps=10),
}
"""RobustBench's CIFAR threat models (L-inf 8/255, L2 0.5), attacked with PGD-10 at a step of eps/4."""

SUMMARY_COLUMNS = {
    "accuracy": "acc",
    "nc1": "NC1",
    "nc2_equinorm_M": "NC2 norm",
    "nc2_equiangle_M": "NC2 angle",
    "nc3": "NC3",
    "nc4": "NC4",
    "ncc_accuracy_clean_means": "NCC clean means",
    "leap_rate": "leap rate",
}
"""The penultimate layer's quantities :func:`summary_lines` prints, with their headings."""


def subset(data: dict, max_samples: int | None) -> dict:
    """``data`` with the first ``max_samples`` images of each split (all with ``None``); the
    training split's ``class_counts`` follow. Every class needs a sample in each split measured."""
    if max_samples is None:
        return data
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    out = dict(data)
    for split in ("train", "test"):
        out[f"x_{split}"] = data[f"x_{split}"][:max_samples]
        out[f"y_{split}"] = data[f"y_{split}"][:max_samples]
    out["class_counts"] = torch.bincount(out["y_train"], minlength=len(data["classes"]))
    return out


def measure(
    model: torch.nn.Module, data: dict, *, threat: ThreatModel, perturbations: dict[str, dict], splits=("test",),
    layerwise: bool = True, batch_size: int = 500, seed: int = 0, epoch: int = 0, device: torch.device | str = "cpu",
    on_set: Callable[[tuple[str, str, str]], None] | None = None,
) -> pd.DataFrame:
    """The evaluation's rows (:data:`ncrobust.columns.RESULT_COLUMNS`) of ``model`` on ``data``:
    every perturbation (name -> overrides of ``threat``, as ``evaluation.perturbations``) of every
    split, at every tap (``layerwise``) or the penultimate features only. The attacks ascend
    cross-entropy and are seeded by ``(seed, "evaluate", epoch, split, perturbation)``."""
    if "clean" not in perturbations:
        perturbations = {"clean": {}, **perturbations}
    plan = EvaluationPlan(threats=(threat,), perturbations=dict(perturbations), splits=tuple(splits), batch_size=batch_size,
                          layerwise=layerwise, projection_points=0)
    return evaluate_checkpoint(model, data, plan, seed=seed, epoch=epoch, device=device, on_set=on_set).metrics


def summary_lines(results: pd.DataFrame) -> list[str]:
    """A fixed-width table of the penultimate layer's headline quantities (:data:`SUMMARY_COLUMNS`)
    per split and perturbation; '-' where a quantity does not apply (the leap rate of the clean set).
    ``acc`` is the accuracy on the true labels, also for ``pgd-targeted`` (whose metrics group its
    samples by their targets)."""
    rows = results[(results["layer"] == PENULTIMATE) & results["class"].isna() & results["row"].isna()]
    table = rows[rows["metric"].isin([*SUMMARY_COLUMNS, "accuracy_true_labels"])].pivot_table(
        index=["split", "perturbation"], columns="metric", values="value", sort=False)
    if "accuracy_true_labels" in table.columns:  # a targeted set's own accuracy is against its targets: show the true labels'
        table["accuracy"] = table["accuracy_true_labels"].fillna(table["accuracy"])
    width = max(len("perturbation"), *(len(p) for p in rows["perturbation"].unique()))
    head = f"{'split':<6} {'perturbation':<{width}} " + " ".join(f"{h:>{max(len(h), 7)}}" for h in SUMMARY_COLUMNS.values())
    lines = [head]
    for (split, perturbation), values in table.iterrows():
        cells = []
        for metric, heading in SUMMARY_COLUMNS.items():
            value = values.get(metric)
            cells.append(f"{'-' if value is None or pd.isna(value) else f'{value:.4g}':>{max(len(heading), 7)}}")
        lines.append(f"{split:<6} {perturbation:<{width}} " + " ".join(cells))
    return lines
