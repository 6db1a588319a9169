"""The kernel and spectrum views of one checkpoint and across a cell's checkpoints
(:mod:`ncrobust.evaluation.kernel_views`), on a small MLP and digits: what each row holds, against
the library functions they are made of."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.columns import DYNAMICS_COLUMNS, KERNEL_COLUMNS, SPECTRA_COLUMNS
from ncrobust.evaluation.kernel_views import KernelPlan, checkpoint_kernel, checkpoint_spectra, kernel_dynamics, kernel_subset
from ncrobust.kernel import empirical_ntk, kernel_distance
from ncrobust.measure import subset
from ncrobust.models import create_model

THREAT = ThreatModel(norm="linf", eps=0.1, step_size=0.05, steps=2)
PLAN = KernelPlan(samples=30, top_k=4, eigen_ranks=(1, 2, 5, 40), eigen_test_samples=25, memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def digits():
    return subset(datasets.load("digits", test_fraction=0.25, seed=0), 200)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.3,), std=(0.4,), depth=2, width=16).eval()


def test_the_subset_is_balanced_and_fixed_by_the_seed(digits):
    y = digits["y_train"]
    index = kernel_subset(y, 30, 10, seed=1)
    assert torch.bincount(y[index], minlength=10).tolist() == [3] * 10
    assert torch.equal(index, kernel_subset(y, 30, 10, seed=1)) and not torch.equal(index, kernel_subset(y, 30, 10, seed=2))
    with pytest.raises(ValueError, match="at least one image per class"):
        kernel_subset(y, 5, 10, seed=1)


def test_checkpoint_kernel_rows_are_the_kernels_spectrum(model, digits):
    kernels, rows = checkpoint_kernel(model, digits, PLAN, threat=THREAT, seed=1, epoch=3, final=True)
    assert list(rows.columns) == KERNEL_COLUMNS
    x, _ = datasets.as_float(digits, "train")
    torch.testing.assert_close(kernels["clean"], empirical_ntk(model, x[kernels["index"]]).cpu(), rtol=0, atol=0)
    assert not torch.equal(kernels["pgd"], kernels["clean"])  # the attacked subset's own kernel
    for name in ("clean", "pgd"):
        own = rows[rows["set"] == name]
        lam = own[own["metric"] == "eigenvalue"].sort_values("index")["value"]
        assert len(lam) == 30 and lam.is_monotonic_decreasing
        assert sum(lam) == pytest.approx(float(own[own["metric"] == "trace"]["value"].item()), rel=1e-9)
        mass = own[own["metric"] == "top_eigenvalue_mass"].set_index("index")["value"]
        assert list(mass.index) == [1, 4] and 0 < mass[1] <= mass[4] <= 1
        assert -1 <= float(own[own["metric"] == "alignment"]["value"].item()) <= 1
    features = rows[rows["metric"] == "eigen_feature_accuracy"]
    assert sorted(set(features["index"])) == [1, 2, 5] and set(features["set"]) == {"clean", "pgd"}  # rank 40 > 30 samples
    assert features["value"].between(0, 1).all()
    _, rows = checkpoint_kernel(model, digits, PLAN, threat=THREAT, seed=1, epoch=3, final=False)
    assert "eigen_feature_accuracy" not in set(rows["metric"])


def test_the_full_kernel_keeps_its_eigenvalues_and_measures_its_logit_trace(model, digits):
    plan = KernelPlan(samples=10, kind="full", attacked=False, eigen_test_samples=0, top_k=3)
    kernels, rows = checkpoint_kernel(model, digits, plan, threat=THREAT, seed=1, epoch=0, final=True)
    assert kernels["clean_full"].shape == (100, 100) and set(rows["set"]) == {"clean"}
    assert len(rows[rows["metric"] == "full_eigenvalue"]) == 100 and len(rows[rows["metric"] == "eigenvalue"]) == 10
    x, _ = datasets.as_float(digits, "train")
    torch.testing.assert_close(kernels["clean"], empirical_ntk(model, x[kernels["index"]]).cpu(), rtol=1e-10, atol=1e-8)


def test_kernel_dynamics_of_a_trajectory():
    torch.manual_seed(0)
    A = torch.randn(12, 12, dtype=torch.float64)
    kernels = {e: {"clean": (A + t * torch.randn(12, 12, dtype=torch.float64)) @ (A + t).T}
               for e, t in ((0, 0.0), (1, 0.5), (3, 0.8), (6, 1.0))}
    frame = kernel_dynamics(kernels, top_k=3)
    assert list(frame.columns) == ["epoch", *DYNAMICS_COLUMNS] and set(frame["set"]) == {"clean"}
    value = frame.set_index(["epoch", "metric"])["value"]
    assert value[0, "distance_to_init"] == pytest.approx(0, abs=1e-12) and value[6, "distance_to_final"] == pytest.approx(0, abs=1e-12)
    assert value[0, "polar_r"] == 0 and value[6, "polar_r"] == pytest.approx(1)
    assert value[3, "distance_to_previous"] == pytest.approx(kernel_distance(kernels[3]["clean"], kernels[1]["clean"]))
    assert value[3, "velocity"] == pytest.approx(value[3, "distance_to_previous"] / 2)
    assert (0, "velocity") not in value.index
    assert kernel_dynamics({0: kernels[0]}, top_k=3).empty  # an external network's one checkpoint: no trajectory


def test_checkpoint_spectra_rows(model, digits):
    frame = checkpoint_spectra(model, digits, split="test", samples=150, perturbations=("clean", "pgd"), threat=THREAT,
                               index_range=(2, 12), seed=1, epoch=2)
    assert list(frame.columns) == SPECTRA_COLUMNS
    alpha = frame[frame["metric"] == "alpha"].set_index(["perturbation", "layer"])["value"]
    assert len(alpha) == 2 * len(model.tap_names) and alpha.notna().all()
    eigen = frame[(frame["metric"] == "eigenvalue") & (frame["layer"] == "penultimate") & (frame["perturbation"] == "clean")]
    assert len(eigen) == 16  # min(150 samples, 16 features)
    narrow = checkpoint_spectra(model, digits, split="test", samples=150, perturbations=("clean",), threat=THREAT,
                                index_range=(2, 40), seed=1, epoch=2)
    assert math.isnan(narrow[narrow["metric"] == "alpha"]["value"].iloc[-1])  # 16 eigenvalues cannot fit ranks up to 40
    again = checkpoint_spectra(model, digits, split="test", samples=150, perturbations=("clean", "pgd"), threat=THREAT,
                               index_range=(2, 12), seed=1, epoch=2)
    pd.testing.assert_frame_equal(frame, again)  # seeded: the same subset and attack
