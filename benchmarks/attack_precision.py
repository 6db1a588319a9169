"""What ``evaluation.attack_precision: bf16`` does to the measurements: the same checkpoints
evaluated with fp32 and with bf16-autocast attacks (the metrics are fp32 either way), against
what the attacks' own randomness does (fp32 again, from other random starts).

    .venv/bin/python benchmarks/attack_precision.py      # digits, MLP and ConvNet, st and pgd-linf (CPU: ~30 s)
    .venv/bin/python benchmarks/attack_precision.py --training    # bf16 against fp32 TRADES training (CPU: ~90 s)

Trains each network 30 epochs on digits, evaluates its test split under ``pgd``, ``pgd-targeted``
and ``trades-kl`` both ways from the same seeded random starts, and prints the accuracy and the
perturbed ``nc1`` of each, and the largest relative difference over the penultimate layer's
scalar metrics: bf16 against fp32, and fp32 from other random starts (evaluation seed 2) against
fp32. A weaker attack shows as a higher accuracy with bf16; bf16 is as good as fp32 where its
difference is no larger than the reseeded one.

``--training`` asks the same of ``precision: bf16`` (autocast of the training step and its attack):
each network is trained with ``trades-linf`` 30 epochs in fp32 and in bf16 (CPU autocast), seeds
1 and 2, and evaluated with fp32 attacks; it prints the final training loss, the test clean and PGD
accuracy, and ``nc1`` clean, under PGD and under the KL attack. A weaker inner maximisation shows
as a lower training loss.
"""

from __future__ import annotations

import argparse

import torch

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.cell import Cell
from ncrobust.columns import PENULTIMATE
from ncrobust.evaluation.checkpoint import EvaluationPlan, evaluate_checkpoint
from ncrobust.jobs.experiment import build_model
from ncrobust.losses import get_loss
from ncrobust.training.train import Recipe, initial_checkpoint, train_segment

THREAT = ThreatModel("linf", 0.1, 0.025, 10)  # config/config.yaml's digits threat model
MODELS = {"mlp": {"depth": 4, "width": 256}, "convnet": {"channels": [32, 64], "width": 128}}
ATTACKS = ("pgd", "pgd-targeted", "trades-kl")


def scalars(model, data, attack_dtype, seed=1):
    plan = EvaluationPlan(threats=(THREAT,), perturbations={"clean": {}, **{a: {} for a in ATTACKS}}, splits=("test",),
                          attack_dtype=attack_dtype)
    m = evaluate_checkpoint(model, data, plan, seed=seed, epoch=30).metrics
    m = m[(m.layer == PENULTIMATE) & m["class"].isna() & m.row.isna()]
    return m.set_index(["perturbation", "metric"]).value


def trained(data, name: str, adversary: str, seed: int = 1, autocast_dtype=None):
    """``name`` trained 30 epochs on digits with ``adversary``; the model and its last training loss."""
    x, y = datasets.as_float(data, "train")
    model = build_model({"models": {name: MODELS[name]}}, Cell("digits", name, "ce", adversary, seed), data)
    recipe = Recipe(adversary=adversary, loss=get_loss("ce"), threat=THREAT, epochs=30, batch_size=128, lr=0.1,
                    autocast_dtype=autocast_dtype)
    state, rows = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=30, seed=seed)
    model.load_state_dict(state["model"])
    return model, rows[-1]["loss"]


def training(data) -> None:
    print(f"{'model':<8} {'training':<8} {'seed':>4} {'loss':>7} {'clean':>7} {'pgd':>7} {'nc1':>7} {'nc1 pgd':>7} {'nc1 kl':>7}")
    for name in MODELS:
        for autocast_dtype in (None, torch.bfloat16):
            for seed in (1, 2):
                model, loss = trained(data, name, "trades-linf", seed, autocast_dtype)
                m = scalars(model, data, None)
                print(f"{name:<8} {'bf16' if autocast_dtype else 'fp32':<8} {seed:>4} {loss:>7.4f} {m['clean', 'accuracy']:>7.4f} "
                      f"{m['pgd', 'accuracy']:>7.4f} {m['clean', 'nc1']:>7.4f} {m['pgd', 'nc1']:>7.4f} {m['trades-kl', 'nc1']:>7.4f}",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training", action="store_true", help="bf16 against fp32 TRADES training instead")
    args = parser.parse_args()
    data = datasets.load("digits", root="data", download=False, seed=0, test_fraction=0.25)
    if args.training:
        return training(data)
    print(f"{'model':<8} {'adversary':<9} {'attack':<13} {'acc fp32':>8} {'acc bf16':>8} {'nc1 fp32':>8} {'nc1 bf16':>8} {'rel diff bf16':>13} {'reseeded':>8}")
    for name in MODELS:
        for adversary in ("st", "pgd-linf"):
            model, _ = trained(data, name, adversary)
            fp32, bf16, reseeded = scalars(model, data, None), scalars(model, data, torch.bfloat16), scalars(model, data, None, seed=2)
            for attack in ATTACKS:
                rel, noise = (((other[attack] - fp32[attack]).abs() / fp32[attack].abs().clip(lower=1e-3)).max() for other in (bf16, reseeded))
                print(f"{name:<8} {adversary:<9} {attack:<13} {fp32[attack, 'accuracy']:>8.4f} {bf16[attack, 'accuracy']:>8.4f} "
                      f"{fp32[attack, 'nc1']:>8.4f} {bf16[attack, 'nc1']:>8.4f} {rel:>13.3f} {noise:>8.3f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
