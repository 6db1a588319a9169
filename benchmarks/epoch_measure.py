"""What ``training.epoch_measure`` adds to an epoch: time and memory.

Trains one epoch (a whole ``train_segment`` call from the initial checkpoint, test accuracy off)
with the measurement off and on, back to back in alternating order, and times the measurement
alone (``EpochInputs.measure``) inside the "on" epoch. The memory it adds is the perturbed images
the epoch keeps on the training device (``EpochInputs.perturbed``, read from the object) and,
while it measures, the pass-1 cache of one set's penultimate features and logits (arithmetic:
``N x (d + C) x 4`` bytes; freed after each set).

    .venv/bin/python benchmarks/epoch_measure.py             # digits, the embedded default's MLP and ConvNet
    .venv/bin/python benchmarks/epoch_measure.py --cifar     # also PreActResNet18 on CIFAR-shaped random images

Digits uses the embedded default's models, threat model (linf, 10 steps) and batch 128 on one
thread. ``--cifar`` trains PreActResNet18 on ``--cifar-images`` random 3x32x32 images with the
paper's linf threat (8/255, 2/255, 10 steps): the ratio of one eval-mode forward pass to a
training step of that network, which the README's paper-scale estimate uses.

Prints per model and adversary: the median epoch seconds off and on, the median of the per-round
ratios on / off, the measurement's median seconds, and the bytes kept.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.cell import Cell
from ncrobust.jobs.experiment import build_model
from ncrobust.losses import get_loss
from ncrobust.models import create_model
from ncrobust.training import epoch_measure
from ncrobust.training.train import Recipe, initial_checkpoint, train_segment

DIGITS_MODELS = {"mlp": {"depth": 4, "width": 256}, "convnet": {"channels": [32, 64], "width": 128}}  # config/config.yaml
DIGITS_THREAT = ThreatModel("linf", 0.1, 0.025, 10)
CIFAR_THREAT = ThreatModel("linf", 8 / 255, 2 / 255, 10)


class _Timed:
    """Wraps ``EpochInputs.measure`` to record how long each measurement takes."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.stored_bytes = 0
        self.original = epoch_measure.EpochInputs.measure

    def __enter__(self):
        timer = self

        def measure(inputs, *args, **kwargs):
            timer.stored_bytes = 0 if inputs.perturbed is None else inputs.perturbed.nbytes
            start = time.perf_counter()
            out = timer.original(inputs, *args, **kwargs)
            timer.seconds.append(time.perf_counter() - start)
            return out

        epoch_measure.EpochInputs.measure = measure
        return self

    def __exit__(self, *exc) -> None:
        epoch_measure.EpochInputs.measure = self.original


def _epoch(model, x, y, recipe: Recipe, start: dict, num_classes: int) -> float:
    began = time.perf_counter()
    train_segment(model, start, x, y, recipe=recipe, end_epoch=1, seed=1, num_classes=num_classes,
                  epoch_metrics=[] if recipe.epoch_measure else None)
    return time.perf_counter() - began


def compare(label: str, make_model, x, y, adversary: str, threat: ThreatModel, rounds: int, num_classes: int) -> None:
    model = make_model()
    recipes = {on: Recipe(adversary=adversary, loss=get_loss("ce"), threat=threat, epochs=1, batch_size=128,
                          log_test_accuracy=False, epoch_measure=on) for on in (False, True)}
    start = initial_checkpoint(model, recipes[False])
    _epoch(model, x, y, recipes[True], start, num_classes)  # warm-up (lazy init, allocator)
    times: dict[bool, list[float]] = {False: [], True: []}
    with _Timed() as timed:
        for r in range(rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                times[on].append(_epoch(model, x, y, recipes[on], start, num_classes))
    ratios = [b / a for a, b in zip(times[False], times[True])]
    d = model.classifier.in_features
    cache = len(x) * (d + num_classes) * 4
    print(f"{label:<10} {adversary:<12} off {statistics.median(times[False]):7.3f} s  on {statistics.median(times[True]):7.3f} s  "
          f"ratio {statistics.median(ratios):5.3f}  measurement {statistics.median(timed.seconds):6.3f} s  "
          f"kept {timed.stored_bytes / 1e6:7.2f} MB perturbed + {len(x) * 8 / 1e6:.2f} MB order  "
          f"(cache while measuring {cache / 1e6:.2f} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (off and on back to back, alternating order)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cifar", action="store_true", help="also PreActResNet18 on CIFAR-shaped random images (slow on a CPU)")
    parser.add_argument("--cifar-images", type=int, default=256)
    parser.add_argument("--cifar-rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")

    data = datasets.load("digits", root="data", download=False, seed=0, test_fraction=0.25)
    x, y = datasets.as_float(data, "train")
    print(f"digits: {len(x)} training images of {tuple(x.shape[1:])}, batch 128, {DIGITS_THREAT}")
    for name in DIGITS_MODELS:
        for adversary in ("st", "pgd-linf", "trades-linf"):
            def make(name=name, adversary=adversary):
                torch.manual_seed(0)
                return build_model({"models": DIGITS_MODELS}, Cell("digits", name, "ce", adversary, 1), data)

            compare(name, make, x, y, adversary, DIGITS_THREAT, args.rounds, 10)

    if args.cifar:
        g = torch.Generator().manual_seed(0)
        xc = torch.rand(args.cifar_images, 3, 32, 32, generator=g)
        yc = torch.arange(args.cifar_images) % 10
        print(f"CIFAR-shaped: {len(xc)} random images, PreActResNet18, {CIFAR_THREAT}")
        for adversary in ("st", "pgd-linf"):
            def make_resnet():
                torch.manual_seed(0)
                return create_model("preact_resnet18", num_classes=10, in_chans=3, image_size=32,
                                    mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))

            compare("resnet18", make_resnet, xc, yc, adversary, CIFAR_THREAT, args.cifar_rounds, 10)


if __name__ == "__main__":
    main()
