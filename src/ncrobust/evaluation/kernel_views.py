"""The kernel and spectrum views of one checkpoint, and the kernel's dynamics over a cell's checkpoints.

- :func:`checkpoint_kernel`: Tsilivis & Kempe 2022's measurements of a checkpoint's empirical NTK
  (:mod:`ncrobust.kernel`) on a fixed, seeded, class-balanced subset of the training set, clean
  and (optionally) PGD-attacked: its eigenvalues, the top-eigenvalue mass, the centred
  kernel-target alignment and its trace; and, at the final checkpoint, the clean and attacked
  test accuracy of each eigen-feature ``f_i(x) = lambda_i^-1 K(x, X) v_i v_i^T Y`` by rank ``i``.
- :func:`kernel_dynamics`: across a cell's checkpoints, the kernel distance to the initial, the
  previous and the final kernel, the velocity (distance per epoch) and the polar view.
- :func:`checkpoint_spectra`: Nassar et al. 2020's power-law exponent ``alpha`` of every tapped
  layer's covariance eigenspectrum (:mod:`ncrobust.spectra`) on a seeded subset of a split, clean
  and under the evaluation's perturbations.

The attacks here ascend cross-entropy under the cell's threat model (as Tsilivis & Kempe's), each
seeded by its own stream ``(seed, "kernel" | "spectra", epoch, split, perturbation)``.
Rows are tidy (:data:`ncrobust.columns.KERNEL_COLUMNS`, :data:`~ncrobust.columns.DYNAMICS_COLUMNS`,
:data:`~ncrobust.columns.SPECTRA_COLUMNS`); the jobs tag them with the cell and epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ncrobust.attacks import ThreatModel, perturb
from ncrobust.columns import DYNAMICS_COLUMNS, KERNEL_COLUMNS, SPECTRA_COLUMNS
from ncrobust.data import as_float, per_class_subset
from ncrobust.kernel import (
    eigen_feature_accuracy, eigendecomposition, empirical_ntk, kernel_distance, kernel_target_alignment, kernel_velocity,
    logit_trace, plan_ntk, polar_view, top_eigenvalue_mass,
)
from ncrobust.models.base import eval_mode, tap_activations
from ncrobust.seeding import generator
from ncrobust.spectra import power_law_exponent, representation_spectrum


@dataclass(frozen=True)
class KernelPlan:
    """What the ``kernel`` stage measures (config section ``kernel``): ``samples`` training images
    (class-balanced, seeded), the ``kind`` of kernel within ``memory_bytes``, the top-``top_k``
    eigenvalue mass and eigenspace, the kernel of the PGD-attacked subset too (``attacked``), and
    at the final checkpoint the eigen-features of ranks ``eigen_ranks`` on ``eigen_test_samples``
    test images (0: none)."""

    samples: int = 250
    kind: str = "trace"
    memory_bytes: int = 2 << 30
    top_k: int = 10
    attacked: bool = True
    eigen_ranks: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200)
    eigen_test_samples: int = 200


def kernel_subset(labels: torch.Tensor, samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """The fixed subset of the training set a cell's kernels are built on: ``samples // C`` images
    of every class, drawn with ``seed`` (the same at every checkpoint of the cell)."""
    per_class = samples // num_classes
    if per_class < 1:
        raise ValueError(f"kernel.samples = {samples}: needs at least one image per class ({num_classes} classes)")
    return torch.as_tensor(per_class_subset(labels.cpu().numpy(), per_class, seed))


def _pgd(model, x, y, threat: ThreatModel, num_classes: int, stream: tuple) -> torch.Tensor:
    return perturb("pgd", model, x, y, threat=threat, num_classes=num_classes, generator=generator(*stream, device=x.device))


def _spectrum_rows(K: torch.Tensor, lam: torch.Tensor, labels: torch.Tensor, num_classes: int, top_k: int,
                   name: str) -> list[dict]:
    """Eigenvalues ``lam`` (``index`` = rank), the top-k mass, the alignment and the trace of one kernel."""
    rows = [{"set": name, "metric": "eigenvalue", "index": i + 1, "value": float(v)} for i, v in enumerate(lam)]
    rows += [{"set": name, "metric": "top_eigenvalue_mass", "index": k, "value": top_eigenvalue_mass(lam, k)}
             for k in sorted({1, top_k})]
    rows.append({"set": name, "metric": "alignment", "index": math.nan, "value": kernel_target_alignment(K, labels, num_classes)})
    rows.append({"set": name, "metric": "trace", "index": math.nan, "value": float(torch.trace(K))})
    return rows


def checkpoint_kernel(
    model: torch.nn.Module, data: dict, plan: KernelPlan, *, threat: ThreatModel, seed: int, epoch: int, final: bool,
    device: torch.device | str = "cpu",
) -> tuple[dict, pd.DataFrame]:
    """``(kernels, rows)`` of one checkpoint: ``kernels`` holds the trace kernel of the subset
    (``clean``, and ``pgd`` with ``plan.attacked``; the full kernels too for ``kind="full"``) and
    the subset's indices, for :func:`kernel_dynamics`; ``rows`` (:data:`KERNEL_COLUMNS`) their
    spectra and, when ``final``, the eigen-feature accuracies (``set`` ``clean`` / ``pgd``: the test
    images as they are / attacked). The trace-kernel quantities are of the logit-summed kernel
    (of the full one's logit trace for ``kind="full"``), whose rows are samples."""
    num_classes = len(data["classes"])
    x_all, y_all = as_float(data, "train", device)
    index = kernel_subset(y_all, plan.samples, num_classes, seed).to(y_all.device)
    x, y = x_all[index], y_all[index]
    sets = {"clean": x}
    if plan.attacked:
        sets["pgd"] = _pgd(model, x, y, threat, num_classes, (seed, "kernel", epoch, "train", "pgd"))
    kernels: dict = {"index": index.cpu(), "labels": y.cpu()}
    rows: list[dict] = []
    eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # of each trace kernel, for its rows and the eigen-features
    ntk_plan = plan_ntk(model, x, kind=plan.kind, memory_bytes=plan.memory_bytes)
    for name, inputs in sets.items():
        K = empirical_ntk(model, inputs, kind=plan.kind, plan=ntk_plan).cpu()
        if plan.kind == "full":
            kernels[f"{name}_full"] = K
            lam, _ = eigendecomposition(K)
            rows += [{"set": name, "metric": "full_eigenvalue", "index": i + 1, "value": float(v)} for i, v in enumerate(lam)]
            K = logit_trace(K, num_classes)
        kernels[name] = K
        eigen[name] = eigendecomposition(K)
        rows += _spectrum_rows(K, eigen[name][0], y.cpu(), num_classes, plan.top_k, name)
    if final and plan.eigen_test_samples:
        rows += _eigen_features(model, data, plan, eigen["clean"], x, y, threat=threat, seed=seed, epoch=epoch, device=device)
    return kernels, pd.DataFrame(rows, columns=KERNEL_COLUMNS)


def _eigen_features(model, data, plan: KernelPlan, eigen: tuple[torch.Tensor, torch.Tensor], x, y, *, threat, seed, epoch,
                    device) -> list[dict]:
    """Clean and attacked test accuracy of each eigen-feature of the train kernel (``eigen``: its
    :func:`eigendecomposition`) by rank."""
    num_classes = len(data["classes"])
    x_test, y_test = as_float(data, "test", device)
    x_test, y_test = x_test[: plan.eigen_test_samples], y_test[: plan.eigen_test_samples]
    lam, V = eigen
    ranks = [r for r in plan.eigen_ranks if r <= len(lam)]
    rows = []
    for name, inputs in (("clean", x_test),
                         ("pgd", _pgd(model, x_test, y_test, threat, num_classes, (seed, "kernel", epoch, "test", "pgd")))):
        cross = empirical_ntk(model, inputs, x, kind="trace", memory_bytes=plan.memory_bytes).cpu()
        accuracy = eigen_feature_accuracy(cross, lam, V, y.cpu(), y_test.cpu(), ranks)
        rows += [{"set": name, "metric": "eigen_feature_accuracy", "index": r, "value": float(a)} for r, a in zip(ranks, accuracy)]
    return rows


def kernel_dynamics(kernels: dict[int, dict], top_k: int) -> pd.DataFrame:
    """Across one cell's checkpoint kernels (``epoch -> kernels`` of :func:`checkpoint_kernel`, the
    initial one included), per epoch and kernel set: ``distance_to_init``, ``distance_to_final``,
    ``distance_to_previous`` and ``velocity`` (to the previous checkpoint, per epoch; none at the
    first), and the polar view ``polar_r``, ``polar_theta``, ``polar_theta_top``,
    ``polar_theta_bottom`` (top-``top_k`` eigenspace). Rows: ``epoch`` and :data:`DYNAMICS_COLUMNS`."""
    epochs = sorted(kernels)
    if len(epochs) < 2:
        return pd.DataFrame(columns=["epoch", *DYNAMICS_COLUMNS])
    rows = []
    for name in [s for s in ("clean", "pgd") if s in kernels[epochs[0]]]:
        Ks = [kernels[e][name] for e in epochs]
        velocity = kernel_velocity(Ks, epochs)
        polar = polar_view(Ks, k=min(top_k, Ks[0].shape[0] - 1))
        for i, e in enumerate(epochs):
            values = {"distance_to_init": kernel_distance(Ks[i], Ks[0]), "distance_to_final": kernel_distance(Ks[i], Ks[-1])}
            if i:
                values["distance_to_previous"] = kernel_distance(Ks[i], Ks[i - 1])
                values["velocity"] = float(velocity[i - 1])
            values.update({f"polar_{k}": float(v[i]) for k, v in polar.items()})
            rows += [{"epoch": e, "set": name, "metric": m, "value": v} for m, v in values.items()]
    return pd.DataFrame(rows, columns=["epoch", *DYNAMICS_COLUMNS])


def checkpoint_spectra(
    model: torch.nn.Module, data: dict, *, split: str, samples: int, perturbations: tuple[str, ...], threat: ThreatModel,
    index_range: tuple[int, int], seed: int, epoch: int, device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """``alpha`` (and the eigenvalues) of every tap's covariance spectrum on ``samples`` images of
    ``split`` drawn with ``seed`` (the same subset at every checkpoint), clean and under each of
    ``perturbations`` (``clean``, ``pgd``, ``gaussian``, ...: :func:`ncrobust.attacks.perturb`).
    Rows: :data:`SPECTRA_COLUMNS`; ``alpha`` is NaN for a layer whose spectrum is shorter than the
    range asks (a narrow tap), with the reason logged nowhere else: the eigenvalues are kept."""
    num_classes = len(data["classes"])
    x_all, y_all = as_float(data, split, device)
    rng = np.random.default_rng(seed)
    index = torch.as_tensor(np.sort(rng.choice(len(y_all), size=min(samples, len(y_all)), replace=False)), device=y_all.device)
    x, y = x_all[index], y_all[index]
    layers = list(model.tap_names)
    rows = []
    for name in perturbations:
        inputs = x if name == "clean" else perturb(name, model, x, y, threat=threat, num_classes=num_classes,
                                                   generator=generator(seed, "spectra", epoch, split, name, device=x.device))
        with eval_mode(model):
            _, taps = tap_activations(model, inputs, layers)
        for depth, layer in enumerate(layers):
            lam = representation_spectrum(taps[layer])
            try:
                alpha = power_law_exponent(lam, tuple(index_range))
            except ValueError:
                alpha = math.nan
            base = {"split": split, "perturbation": name, "layer": layer, "layer_index": depth}
            rows.append({**base, "metric": "alpha", "index": math.nan, "value": alpha})
            rows += [{**base, "metric": "eigenvalue", "index": i + 1, "value": float(v)} for i, v in enumerate(lam)]
    return pd.DataFrame(rows, columns=SPECTRA_COLUMNS)
