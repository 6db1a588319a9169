"""The near-collapse probe (ncrobust.geometry.probe): Tirer et al.'s regularised unconstrained features."""

from __future__ import annotations

import time

import pytest
import torch

from ncrobust.collapse import nc_metrics
from ncrobust.geometry.probe import PROBE_COLUMNS, probe, probe_model, solve


def _features(n_per_class=40, C=4, d=12, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(n_per_class)
    means = torch.randn(C, d, generator=g, dtype=torch.float64) * 2
    return means[y] + noise * torch.randn(len(y), d, generator=g, dtype=torch.float64), y


def _objective(W, H, H0, y, lam, wd):
    Y = torch.nn.functional.one_hot(y, W.shape[0]).to(W.dtype)
    N = len(y)
    return ((H @ W.T - Y).pow(2).sum() / (2 * N) + wd / 2 * W.pow(2).sum() + lam / (2 * N) * (H - H0).pow(2).sum())


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_solution_is_a_stationary_point_of_the_joint_objective(lam):
    """The gradient of Phi(W, H) in both W and H vanishes at the returned (W, H), in the input's
    coordinates: the reduced solver, the basis change and the closed form of H(W) agree."""
    H0, y = _features()
    sol = solve(H0, y, lam=lam, weight_decay=5e-3, tol=1e-8)
    assert sol.converged
    W, H = sol.W.clone().requires_grad_(True), sol.H.clone().requires_grad_(True)
    f = _objective(W, H, H0, y, lam, 5e-3)
    gW, gH = torch.autograd.grad(f, (W, H))
    assert float(f.detach()) == pytest.approx(sol.objective, rel=1e-9)
    assert gW.norm() < 1e-6 and gH.norm() < 1e-6
    # and it is a minimum, not a saddle: random perturbations raise the objective
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        dW, dH = 1e-3 * torch.randn(W.shape, generator=g, dtype=W.dtype), 1e-3 * torch.randn(H.shape, generator=g, dtype=H.dtype)
        assert float(_objective(sol.W + dW, sol.H + dH, H0, y, lam, 5e-3)) > sol.objective


def test_large_lambda_keeps_the_input_features():
    """lambda -> infinity: H = H0, NC1 unchanged."""
    H0, y = _features()
    sol = solve(H0, y, lam=1e9)
    torch.testing.assert_close(sol.H, H0, rtol=0, atol=1e-7)
    row = probe(H0, y, [1e9]).iloc[0]
    assert row.nc1_ratio == pytest.approx(1.0, abs=1e-6) and row.relative_distance < 1e-8


def test_vanishing_lambda_gives_a_collapsed_frame():
    """lambda -> 0: the features are free, the plain unconstrained-features minimiser is reached
    (MSE, no bias, balanced: Tirer & Bruna 2022): within-class variability vanishes (NC1 -> 0), the
    (uncentred) class means align with the rows of W and form an orthogonal frame."""
    from ncrobust.collapse import class_means

    H0, y = _features(noise=2.0)
    sol = solve(H0, y, lam=1e-9)
    assert nc_metrics(sol.H, y)["nc1"] < 1e-3 * nc_metrics(H0, y)["nc1"]
    M, _ = class_means(sol.H, y)
    assert torch.nn.functional.cosine_similarity(M, sol.W, dim=1).min() > 0.999
    cos = torch.nn.functional.normalize(M, dim=1) @ torch.nn.functional.normalize(M, dim=1).T
    assert (cos - torch.eye(4, dtype=cos.dtype)).abs().max() < 0.02


def test_nc1_grows_with_lambda_from_collapse_to_the_input():
    H0, y = _features(noise=1.5, seed=3)
    frame = probe(H0, y, [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 100.0, 1e6])
    assert list(frame.columns) == PROBE_COLUMNS and frame.converged.all()
    ratios = frame.nc1_ratio.tolist()
    assert all(a <= b + 1e-9 for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[0] < 0.05 and ratios[-1] > 0.999
    assert (frame.nc1_input == frame.nc1_input.iloc[0]).all()


def test_digits_sized_probe_takes_seconds():
    H0, y = _features(n_per_class=135, C=10, d=256, noise=3.0)
    started = time.perf_counter()
    frame = probe(H0.relu(), y, [1e-6, 1e-4, 1e-2, 1.0, 100.0])
    assert time.perf_counter() - started < 10
    assert frame.converged.all()


def test_probe_model_attacks_and_reads_the_layer(digits):
    from ncrobust import data as datasets
    from ncrobust.attacks import ThreatModel
    from ncrobust.cell import Cell
    from ncrobust.jobs.experiment import build_model
    from ncrobust.losses import get_loss

    model = build_model({"models": {"mlp": {"depth": 2, "width": 16}}}, Cell("digits", "mlp", "ce", "st", 1), digits)
    x, y = datasets.as_float(digits, "train")
    x, y = x[:200], y[:200]
    threat = ThreatModel(norm="linf", eps=0.1, step_size=0.05, steps=3)
    frame = probe_model(model, x, y, layer="layer1", lambdas=[1e-4, 1.0], threat=threat, loss=get_loss("ce"), seed=1,
                        num_classes=10)
    assert sorted(frame.perturbation.unique()) == ["clean", "pgd"] and (frame.layer == "layer1").all()
    clean, pgd_rows = frame[frame.perturbation == "clean"], frame[frame.perturbation == "pgd"]
    assert clean.nc1_input.iloc[0] != pgd_rows.nc1_input.iloc[0]  # the attack moved the features
    with pytest.raises(ValueError, match="probe.layer = 'layer9': not a tap"):
        probe_model(model, x, y, layer="layer9", lambdas=[1.0], threat=threat, loss=get_loss("ce"), seed=1, num_classes=10)


@pytest.mark.parametrize("kwargs, message", [
    ({"lambdas": [0.0]}, "lambda must be a finite number > 0"),
    ({"lambdas": []}, "lambdas is empty"),
    ({"lambdas": [1.0], "weight_decay": -1}, "weight_decay must be a finite number > 0"),
    ({"lambdas": [1.0], "num_classes": 9}, "every class needs at least one sample"),
])
def test_bad_input_is_one_line(kwargs, message):
    H0, y = _features()
    with pytest.raises(ValueError, match=message):
        probe(H0, y, **kwargs)
    with pytest.raises(ValueError, match="features contain NaN"):
        probe(H0 * float("nan"), y, [1.0])
    with pytest.raises(ValueError, match="labels for"):
        probe(H0, y[:-1], [1.0])


def _probe_table():
    from ncrobust.cell import Cell
    from ncrobust.tables import tag

    H0, y = _features()
    frames = []
    for adversary in ("st", "pgd-linf"):
        for seed in (1, 2):
            f = probe(H0 * seed, y, [0.1, 1.0, 10.0]).assign(perturbation="clean", layer="penultimate")
            frames.append(tag(f, Cell("digits", "mlp", "ce", adversary, seed), 5).assign(variant="base"))
    return frames


@pytest.mark.slow
def test_probe_curves_and_figure(tmp_path):
    """tables.probe_curves keeps each cell's final epoch in long form; plots.probe draws one column
    per variant, two rows (NC1 of the solution, ratio), and a placeholder without data."""
    import pandas as pd

    from ncrobust.figures import plots
    from ncrobust.tables import probe_curves

    frames = _probe_table()
    early = frames[0].assign(epoch=1, nc1_ratio=99.0)  # an earlier checkpoint of a cell: dropped
    curves = probe_curves(pd.concat([*frames, early]))
    assert set(curves.metric) == {"nc1_input", "nc1_solution", "nc1_ratio"} and (curves.value != 99.0).all()
    assert len(curves) == 4 * 3 * 3 and set(curves.group) == {""}  # nothing varies but the adversary and seed
    # rescaled: seed 2's features (2 x seed 1's) give the same solution
    r = curves[curves.metric == "nc1_ratio"].pivot_table(index=["adversary", "lam"], columns="seed", values="value")
    assert (r[1] - r[2]).abs().max() < 1e-8
    fig = plots.probe(curves, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").exists() and (tmp_path / "probe.pdf").exists()
    assert len([ax for ax in fig.axes if ax.axison]) == 2
    empty = plots.probe(probe_curves(pd.DataFrame()), tmp_path / "none.png")
    assert "no probe tables" in " ".join(t.get_text() for t in empty.axes[0].texts)


@pytest.mark.workflow
@pytest.mark.slow  # two Snakemake dry runs (DAG only), about 10 s
def test_related_rules_are_opt_in_per_cell_at_the_final_epoch(tmp_path):
    """Dry runs: the tiny config has no mixup_geometry, probe or related_figures job; switched on,
    each cell (variants included) gets one of each at its final checkpoint, plus one figures job."""
    import re

    from workflow_helpers import run_snakemake, write_tiny_config

    def jobs(**overrides) -> dict:
        config = write_tiny_config(tmp_path / str(len(overrides)), **overrides)
        out = run_snakemake(config.parent, "-n", "--quiet", "rules", configfile=config).stdout
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.M)}

    off = jobs()
    assert not {"mixup_geometry", "probe", "related_figures"} & set(off)
    from workflow_helpers import TINY_CONFIG

    evaluation = {**TINY_CONFIG["evaluation"], "mixup_geometry": {"enabled": True}}
    grid = {**TINY_CONFIG["grid"], "variant": ["base", "mixup"]}
    on = jobs(evaluation=evaluation, probe={"enabled": True}, grid=grid, variants={"mixup": {"training": {"mixup": {"alpha": 1.0}}}})
    assert on["mixup_geometry"] == on["probe"] == 4 and on["related_figures"] == 1
    assert on["train"] == 2 * off["train"]
