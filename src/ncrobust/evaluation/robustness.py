"""The strong final evaluation: robust accuracy under PGD-10 (the study's attack) and under
stronger attacks (PGD with more steps and restarts, APGD-CE, APGD-T), on the same samples.

A sample counts as robust under ``worst`` only if it survives PGD-10 and every strong attack (the
per-example worst case over all the attacks run, as AutoAttack reports), so ``worst`` is never
above any one attack's accuracy. ``pgd_gap`` = accuracy under PGD-10 minus accuracy under
``worst`` (>= 0): a large gap means PGD-10 overestimates robustness (gradient masking),
and the collapse measured under PGD-10 would be measured on points that are not adversarial.
"""

from __future__ import annotations

import logging
import time

import torch

from ncrobust.attacks import STRONG_ATTACKS, ThreatModel, perturb
from ncrobust.models.base import eval_mode
from ncrobust.seeding import generator

log = logging.getLogger(__name__)


def _progress(row: dict, samples: int, attacks: list[str], since: float) -> None:
    """One log line per attack, once its accuracy is on the host (no extra synchronisation): a long
    strong evaluation shows in its job's log how far it got."""
    order = ["pgd", *attacks]
    log.info("strong evaluation: attack %d/%d %s: robust accuracy %.4f on %d samples, %.2f s",
             order.index(row["attack"]) + 1, len(order), row["attack"], row["robust_accuracy"], samples, time.perf_counter() - since)


@torch.no_grad()
def _correct(model, x, y, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(x), batch_size)])


def strong_evaluation(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: ThreatModel,
    num_classes: int,
    attacks: list[str],
    seed: int,
    batch_size: int = 500,
    loss=None,
    loss_name: str = "ce",
    pgd_inputs: torch.Tensor | None = None,
) -> list[dict]:
    """Rows ``{attack, attack_loss, robust_accuracy, samples}`` for ``clean``, ``pgd`` (the cell's
    PGD-10), each of ``attacks`` and the per-example ``worst`` over PGD-10 and ``attacks``.

    ``loss`` (named ``loss_name``) is the loss PGD and PGD-strong ascend: the cell's training loss,
    as in the evaluation's ``pgd``, so that both report the same attack. APGD-CE and APGD-T keep
    their definitions (cross-entropy, targeted DLR). The model runs in eval mode; its modes are
    restored afterwards. ``pgd_inputs``: the PGD-10 examples of ``x`` as the evaluation attacked them
    (:func:`ncrobust.evaluation.checkpoint.attack_set`; the workflow passes them, so that ``pgd`` here
    is the summary's robust accuracy); without them PGD-10 runs here, seeded by ``(seed, "strong", "pgd")``."""
    unknown = set(attacks) - set(STRONG_ATTACKS)
    if unknown:
        raise ValueError(f"unknown strong attacks {sorted(unknown)}; allowed: {', '.join(STRONG_ATTACKS)}")
    attack_loss = {"pgd": loss_name, "pgd-strong": loss_name, "apgd-ce": "ce", "apgd-t": "dlr"}
    since = time.perf_counter()
    with eval_mode(model):
        rows = [{"attack": "clean", "robust_accuracy": _correct(model, x, y, batch_size).double().mean().item()}]
        x_pgd = pgd_inputs if pgd_inputs is not None else perturb(
            "pgd", model, x, y, threat=threat, num_classes=num_classes, batch_size=batch_size, loss=loss,
            generator=generator(seed, "strong", "pgd", device=x.device))
        if x_pgd.shape != x.shape:
            raise ValueError(f"pgd_inputs has shape {tuple(x_pgd.shape)}, the samples {tuple(x.shape)}: pass the PGD-10 examples of x")
        survived = _correct(model, x_pgd, y, batch_size)  # worst: robust to PGD-10 and to every strong attack
        rows.append({"attack": "pgd", "robust_accuracy": survived.double().mean().item()})
        _progress(rows[-1], len(x), attacks, since)
        for name in attacks:
            since = time.perf_counter()
            x_adv = perturb(name, model, x, y, threat=threat, num_classes=num_classes, seed=seed, batch_size=batch_size, loss=loss)
            correct = _correct(model, x_adv, y, batch_size)
            survived &= correct
            rows.append({"attack": name, "robust_accuracy": correct.double().mean().item()})
            _progress(rows[-1], len(x), attacks, since)
    if attacks:
        rows.append({"attack": "worst", "robust_accuracy": survived.double().mean().item()})
    for row in rows:
        row["attack_loss"] = attack_loss.get(row["attack"], "")
    for row in rows:
        row["samples"] = len(x)
    return rows
