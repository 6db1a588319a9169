"""From a validated config to the objects of one grid cell.

A cell is ``(dataset, model, loss, adversary, seed)``; everything a stage needs about it (the
model's constructor options, the threat model, the training recipe) is resolved here, so that
every stage reads the config the same way and an output depends only on its config slice.
"""

from __future__ import annotations

import torch

from ncrobust.attacks import ThreatModel
from ncrobust.cell import Cell
from ncrobust.evaluation.checkpoint import EvaluationPlan
from ncrobust.losses import get_loss
from ncrobust.models import create_model
from ncrobust.models.external import build, spec_of, tapped
from ncrobust.seeding import generator, stream_seed  # noqa: F401  (re-exported)
from ncrobust.stages import is_external

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
"""``precision`` and ``evaluation.attack_precision`` -> the autocast dtype (None: none)."""


def threat_model(config: dict, cell: Cell, norm: str | None = None) -> ThreatModel:
    """The cell's threat model: the adversary's norm, or the dataset's default norm for ``st``
    (``norm`` picks another of the dataset's threat models)."""
    ds = config["datasets"][cell.dataset]
    if norm is None:
        norm = cell.parsed_adversary.norm or ds["norm"]
    if norm not in ds["threat"]:
        raise ValueError(f"datasets.{cell.dataset}.threat has no {norm!r} entry (needed by adversary {cell.adversary})")
    t = ds["threat"][norm]
    return ThreatModel(norm=norm, eps=float(t["eps"]), step_size=float(t["step_size"]), steps=int(t["steps"]))


ATTACK_LOSSES = ("own", "ce")
"""``evaluation.attack_loss``: the cell's own training loss, or cross-entropy."""


def cell_loss(config: dict, cell: Cell):
    """The cell's training loss with its options: also the loss its training-time attacks ascend."""
    return get_loss(cell.loss, **config.get("losses", {}).get(cell.loss, {}))


def attack_loss(config: dict, cell: Cell):
    """``(name, loss)`` that the evaluation's and the robustness stage's attacks on ``cell``
    ascend: its own loss (``evaluation.attack_loss: own``) or cross-entropy (``ce``, Su et al.'s
    attack on every network). A ``ce`` cell's own loss is ``ce``: the key is not read for it (and
    is in none of its slices, :data:`ncrobust.stages.EVALUATION_UNUSED_BY_LOSS`)."""
    if cell.loss != "ce" and config["evaluation"]["attack_loss"] == "ce":
        return "ce", get_loss("ce")
    return cell.loss, cell_loss(config, cell)


def evaluation_plan(config: dict, cell: Cell, *, keep_features: bool = False) -> EvaluationPlan:
    """What the evaluation measures on every checkpoint of ``cell``: its own threat model first, and
    for an ``st`` cell every other norm of ``evaluation.norms``; the attacks' loss of :func:`attack_loss`,
    the ``trades-kl`` step of :func:`trades_l2_step`."""
    ev = config["evaluation"]
    own = threat_model(config, cell)
    extra = [n for n in ev["norms"] if n != own.norm] if cell.parsed_adversary.kind == "st" else []
    return EvaluationPlan(
        threats=(own, *(threat_model(config, cell, n) for n in extra)),
        perturbations=dict(ev["perturbations"]),
        splits=tuple(ev["splits"]),
        batch_size=int(ev["batch_size"]),
        layerwise=bool(ev["layerwise"]),
        attack_loss=attack_loss(config, cell)[1],
        projection_points=ev["projection_points"],
        keep_features=keep_features,
        feature_dtype=ev["feature_dtype"],
        attack_dtype=AUTOCAST[ev["attack_precision"]],
        trades_l2_step=trades_l2_step(config, cell),
    )


def robustness_plan(config: dict, cell: Cell) -> EvaluationPlan:
    """The part of :func:`evaluation_plan` that the evaluation's PGD-10 on the cell's own threat
    model reads (its ``perturbations.pgd`` overrides, batch size, loss and precision): the strong
    evaluation attacks with that same PGD-10 (:func:`ncrobust.evaluation.checkpoint.attack_set`)."""
    ev = config["evaluation"]
    return EvaluationPlan(
        threats=(threat_model(config, cell),),
        perturbations={"pgd": dict(ev["perturbations"].get("pgd") or {})},
        splits=(ev["strong"]["split"],),
        batch_size=int(ev["batch_size"]),
        attack_loss=attack_loss(config, cell)[1],
        attack_dtype=AUTOCAST[ev["attack_precision"]],
    )


def trades_l2_step(config: dict, cell: Cell) -> str:
    """The ``l2`` step of the evaluation's ``trades-kl`` attack on ``cell``: a trained ``trades-l2``
    cell's own training attack (``training.trades_l2_step``, in its slices only), the threat
    model's step for every other cell (an external network's recipe is not known)."""
    trained = cell.adversary == "trades-l2" and not is_external(config, cell)
    return config["training"]["trades_l2_step"] if trained else "threat"


def input_shape(data: dict) -> dict:
    """The constructors' ``num_classes``, ``in_chans`` and ``image_size`` of a prepared dataset."""
    x = data["x_train"]
    side = x.shape[-1] if x.shape[-2] == x.shape[-1] else tuple(x.shape[-2:])
    return {"num_classes": len(data["classes"]), "in_chans": x.shape[1], "image_size": side}


def build_model(config: dict, cell: Cell, data: dict) -> torch.nn.Module:
    """The cell's model with the seed's initialisation (seeded here, so init is reproducible); an
    external network's architecture with its taps (its weights come from its imported checkpoint)."""
    torch.manual_seed(cell.seed)
    if is_external(config, cell):
        spec = spec_of(config["external"][cell.model])
        return tapped(spec, build(spec.architecture, options=spec.options, **input_shape(data)))
    return create_model(
        cell.model, mean=data["mean"], std=data["std"], **input_shape(data), **config.get("models", {}).get(cell.model, {}),
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no GPU; use device: auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda")
    return torch.device(name)
