"""Why ``config/mnist1d.yaml`` trains 40 epochs with weight decay 1e-3, and why its targeted attack
has a radius of 0.5 data units: standard training (``st``, ``ce``, seed 1) of its two networks on
MNIST-1D with the config's recipe at three weight decays, and the targeted attack's hit rate at
four radii.

    .venv/bin/python benchmarks/mnist1d_recipe.py     # CPU: about 2 minutes

For each network and weight decay it prints, at the half-way epoch and at the end, the train and
test accuracy (eval mode) and ``nc1`` of the clean training features (penultimate layer, eval
mode). The terminal phase is train accuracy 1 with ``nc1`` still falling; the external check
wants the test accuracy near the published one (MLP 0.68, CNN 0.94). Then, for the networks of
the config's weight decay, the share of 1,000 training samples that ``pgd-targeted`` (20 steps,
target ``(y + 1) mod 10``) sends to its target, per radius in data units (the config's threat
model is 0.1).
"""

from __future__ import annotations

import time

import torch
import yaml

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel, perturb, target_labels
from ncrobust.collapse.dense import nc_metrics
from ncrobust.losses import get_loss
from ncrobust.models import create_model
from ncrobust.models.base import tap_activations
from ncrobust.training.train import Recipe, Schedule, accuracy, initial_checkpoint, train_segment

CONFIG = yaml.safe_load(open("config/mnist1d.yaml"))
WEIGHT_DECAYS = (5e-4, 1e-3, 5e-3)
TARGET_RADII = (0.1, 0.2, 0.3, 0.5)  # data units


def main() -> None:
    torch.set_num_threads(1)
    d = datasets.load("mnist1d", **CONFIG["datasets"]["mnist1d"]["options"])
    box = d["units"]["box"]
    x_train, y_train = datasets.as_float(d, "train")
    x_test, y_test = datasets.as_float(d, "test")
    t, opt = CONFIG["training"], CONFIG["training"]["optimizer"]
    epochs = t["epochs"]
    threat = ThreatModel("linf", **CONFIG["datasets"]["mnist1d"]["threat"]["linf"])
    kept = {}
    print(f"st, ce, seed 1, {epochs} epochs, lr {opt['lr']}, batch {t['batch_size']}, piecewise {t['schedule']['milestones']}")
    for name in CONFIG["grid"]["model"]:
        for wd in WEIGHT_DECAYS:
            torch.manual_seed(1)
            model = create_model(name, num_classes=10, in_chans=1, image_size=(1, 40), mean=d["mean"], std=d["std"],
                                 **CONFIG["models"][name])
            recipe = Recipe(adversary="st", loss=get_loss("ce"), threat=threat, epochs=epochs, batch_size=t["batch_size"],
                            lr=opt["lr"], momentum=opt["momentum"], weight_decay=wd,
                            schedule=Schedule(t["schedule"]["kind"], tuple(t["schedule"]["milestones"]), tuple(t["schedule"]["factors"])))
            checkpoint, start = initial_checkpoint(model, recipe), time.perf_counter()
            for end in (epochs // 2, epochs):
                checkpoint, _ = train_segment(model, checkpoint, x_train, y_train, recipe=recipe, end_epoch=end, seed=1)
                model.eval()
                features = tap_activations(model, x_train, ["penultimate"])[1]["penultimate"]
                nc1 = nc_metrics(features, y_train, num_classes=10)["nc1"]
                print(f"{name:6s} weight_decay {wd:.0e} epoch {end:3d}: train {accuracy(model, x_train, y_train):.4f} "
                      f"test {accuracy(model, x_test, y_test):.3f} nc1 {nc1:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if wd == opt["weight_decay"]:
                kept[name] = model
    x, y = x_train[:1000], y_train[:1000]
    for name, model in kept.items():
        rates = []
        for radius in TARGET_RADII:
            eps = radius / (2 * box)
            adv = perturb("pgd-targeted", model, x, y, threat=ThreatModel("linf", eps, 2.5 * eps / 20, 20), num_classes=10,
                          generator=torch.Generator().manual_seed(0), loss="ce")
            with torch.no_grad():
                rates.append(f"{radius:g}: {(model(adv).argmax(1) == target_labels(y, 10)).double().mean().item():.3f}")
        print(f"{name:6s} weight_decay {opt['weight_decay']:.0e}: pgd-targeted hit rate by radius (data units) {', '.join(rates)}")


if __name__ == "__main__":
    main()
