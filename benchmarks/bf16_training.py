"""What ``precision: bf16`` (autocast of the training step and its attack) does to the terminal
phase of Neural Collapse: the digits ConvNet trained long past zero training error in fp32 and in
bf16 autocast, from the same initialisation and the same seeded batches, then evaluated the same
way (fp32 forward passes and fp32 attacks).

    .venv/bin/python benchmarks/bf16_training.py        # st and pgd-linf, 200 epochs, seeds 1 and 2 (2 CPU cores: ~1 h)
    .venv/bin/python benchmarks/bf16_training.py --adversary st --epochs 400

For each adversary and seed it prints, for fp32 and bf16 training, the test clean accuracy, the
PGD-10 accuracy and the clean penultimate NC1 (``tr(Sigma_W Sigma_B^+) / C``), NC2 (equinorm and
equiangle of the means and of the classifier rows), NC3 and NC4 of the training split, then the
difference bf16 - fp32 per seed and the seed-to-seed difference of fp32 (seed 2 - seed 1), the
scale against which a bf16 difference is read. bf16 autocast runs on the CPU here (matmuls and
convolutions in bf16, the losses on fp32 logits, as on a GPU); GPU kernels round differently.
"""

from __future__ import annotations

import argparse
import time

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
OPTIONS = {"convnet": {"channels": [32, 64], "width": 128}}  # config/config.yaml's ConvNet
COLUMNS = [  # (label, split, perturbation, metric)
    ("clean acc", "test", "clean", "accuracy"),
    ("pgd acc", "test", "pgd", "accuracy"),
    ("nc1", "train", "clean", "nc1"),
    ("nc2 M norm", "train", "clean", "nc2_equinorm_M"),
    ("nc2 M angle", "train", "clean", "nc2_equiangle_M"),
    ("nc2 W norm", "train", "clean", "nc2_equinorm_W"),
    ("nc2 W angle", "train", "clean", "nc2_equiangle_W"),
    ("nc3", "train", "clean", "nc3"),
    ("nc4", "train", "clean", "nc4"),
]


def trained(data, adversary: str, seed: int, epochs: int, autocast_dtype):
    """The ConvNet trained ``epochs`` epochs on digits (the paper's recipe: SGD 0.1, lr /10 at 25%
    and /100 at 37.5% of training), and its final training loss."""
    x, y = datasets.as_float(data, "train")
    model = build_model({"models": OPTIONS}, Cell("digits", "convnet", "ce", adversary, seed), data)
    recipe = Recipe(adversary=adversary, loss=get_loss("ce"), threat=THREAT, epochs=epochs, batch_size=128, lr=0.1,
                    autocast_dtype=autocast_dtype, log_test_accuracy=False)
    state, rows = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=epochs, seed=seed)
    model.load_state_dict(state["model"])
    return model, rows[-1]["loss"]


def measured(model, data, epochs: int) -> dict[str, float]:
    plan = EvaluationPlan(threats=(THREAT,), perturbations={"clean": {}, "pgd": {}}, layerwise=False)
    m = evaluate_checkpoint(model, data, plan, seed=1, epoch=epochs).metrics
    m = m[(m.layer == PENULTIMATE) & m["class"].isna() & m.row.isna()].set_index(["split", "perturbation", "metric"]).value
    return {label: float(m[split, pert, metric]) for label, split, pert, metric in COLUMNS}


def line(name: str, values: dict[str, float], loss: str = "") -> str:
    return f"{name:<22} {loss:>9} " + " ".join(f"{values[c[0]]:>11.4f}" for c in COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adversary", nargs="+", default=["st", "pgd-linf"], help="adversaries to train (st, pgd-linf, trades-linf)")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    data = datasets.load("digits", root="data", download=False, seed=0, test_fraction=0.25)
    print(f"digits ConvNet {OPTIONS['convnet']}, {args.epochs} epochs, seeds {args.seeds}; NC on the training split, "
          "accuracies on the test split; fp32 evaluation", flush=True)
    print(f"{'run':<22} {'loss':>9} " + " ".join(f"{c[0]:>11}" for c in COLUMNS), flush=True)
    for adversary in args.adversary:
        results: dict[tuple[str, int], dict[str, float]] = {}
        for seed in args.seeds:
            for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                started = time.perf_counter()
                model, loss = trained(data, adversary, seed, args.epochs, dtype)
                results[precision, seed] = measured(model, data, args.epochs)
                print(line(f"{adversary} {precision} seed {seed}", results[precision, seed], f"{loss:.2e}")
                      + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        for seed in args.seeds:
            diff = {c[0]: results["bf16", seed][c[0]] - results["fp32", seed][c[0]] for c in COLUMNS}
            print(line(f"{adversary} bf16-fp32 seed {seed}", diff), flush=True)
        if len(args.seeds) >= 2:
            s1, s2 = args.seeds[:2]
            spread = {c[0]: results["fp32", s2][c[0]] - results["fp32", s1][c[0]] for c in COLUMNS}
            print(line(f"{adversary} fp32 seed {s2}-{s1}", spread), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
