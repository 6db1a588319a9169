"""The kernel and spectrum figures (plots.kernel_dynamics, plots.kernel_spectrum, plots.spectra)
from synthetic tables shaped like the workflow's: several adversaries and seeds, one adversary,
one seed, no attacked kernel, several models, and no table at all (a placeholder)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from ncrobust.columns import CELL_COLUMNS, DYNAMICS_COLUMNS, KERNEL_COLUMNS, SPECTRA_COLUMNS
from ncrobust.figures import plots

EPOCHS = (0, 2, 4, 6, 8, 10)
LAYERS = ["stem", "block1", "block2", "block3", "penultimate"]
RANKS = (1, 2, 5, 10, 20, 50, 100, 200)
# How far each adversary's kernel moves (Tsilivis & Kempe: adversarial training moves it further).
MOVES = {"st": 0.25, "pgd-linf": 0.45, "pgd-l2": 0.4, "trades-linf": 0.35, "trades-l2": 0.3}


def _cells(adversaries, seeds, models=("mlp",)):
    for model, adv, seed in itertools.product(models, adversaries, seeds):
        yield {"dataset": "digits", "model": model, "loss": "ce", "adversary": adv, "variant": "base", "seed": seed}


def dynamics_table(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=EPOCHS, sets=("clean", "pgd"), models=("mlp",)):
    """The kernel dynamics table: distances rising to / falling from a plateau, a decaying velocity, the polar view."""
    rng = np.random.default_rng(0)
    rows = []
    for cell in _cells(adversaries, seeds, models):
        for kset in sets:
            scale = MOVES[cell["adversary"]] * (1.3 if kset == "pgd" else 1.0) * rng.uniform(0.9, 1.1)
            tau = rng.uniform(1.5, 3.0)
            init = scale * (1 - np.exp(-np.asarray(epochs) / tau))
            for i, epoch in enumerate(epochs):
                values = {"distance_to_init": init[i], "distance_to_final": scale * np.exp(-epoch / tau) * (i < len(epochs) - 1) * 0.8,
                          "polar_r": init[i] / init[-1], "polar_theta": np.arccos(1 - init[i]),
                          "polar_theta_top": np.arccos(1 - min(1.0, 1.6 * init[i])), "polar_theta_bottom": np.arccos(1 - 0.6 * init[i])}
                if i:
                    step = scale * (np.exp(-epochs[i - 1] / tau) - np.exp(-epoch / tau))
                    values |= {"distance_to_previous": step, "velocity": step / (epoch - epochs[i - 1])}
                rows += [{**cell, "epoch": epoch, "set": kset, "metric": m, "value": float(v)} for m, v in values.items()]
    return pd.DataFrame(rows, columns=[*CELL_COLUMNS, "epoch", *DYNAMICS_COLUMNS])


def kernel_table(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=EPOCHS, sets=("clean", "pgd"), samples=250, models=("mlp",)):
    """The kernel table: power-law eigenvalues growing and concentrating with training, an alignment
    rising to a plateau, and eigen-features at the final epoch (the top ones the most accurate;
    under standard training the attacked test images defeat them)."""
    rng = np.random.default_rng(1)
    rows = []
    ranks = np.arange(1, samples + 1)
    for cell in _cells(adversaries, seeds, models):
        robust = cell["adversary"] != "st"
        for kset, epoch in itertools.product(sets, epochs):
            t = epoch / max(epochs)
            decay = 0.8 + 1.2 * t * (0.7 if robust else 1.0) * rng.uniform(0.95, 1.05)
            lam = 50 * (1 + 20 * t) * ranks ** -decay
            if kset == "pgd":
                lam = lam * 1.3
            base = {**cell, "epoch": epoch, "set": kset}
            rows += [{**base, "metric": "eigenvalue", "index": i, "value": v} for i, v in zip(ranks, lam)]
            for k in (1, 10):
                rows.append({**base, "metric": "top_eigenvalue_mass", "index": k, "value": (lam[:k] ** 2).sum() / (lam ** 2).sum()})
            align = (0.15 + 0.5 * (1 - np.exp(-3 * t))) * (0.8 if kset == "pgd" and not robust else 1.0) * rng.uniform(0.95, 1.05)
            rows += [{**base, "metric": "alignment", "index": np.nan, "value": align},
                     {**base, "metric": "trace", "index": np.nan, "value": lam.sum()}]
        for test_set, r in itertools.product(("clean", "pgd"), RANKS):
            top = 0.85 * r ** -0.35
            accuracy = top * (0.3 if test_set == "pgd" and not robust else 0.8 if test_set == "pgd" else 1.0)
            rows.append({**cell, "epoch": max(epochs), "set": test_set, "metric": "eigen_feature_accuracy", "index": r,
                         "value": float(np.clip(accuracy * rng.uniform(0.9, 1.1), 0.1, 1))})
    return pd.DataFrame(rows, columns=[*CELL_COLUMNS, "epoch", *KERNEL_COLUMNS])


def spectra_table(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=EPOCHS, perturbations=("clean", "pgd", "gaussian"),
                  layers=LAYERS, samples=300, models=("mlp",), nan_alpha=False):
    """The spectra table: alpha rising with depth and training (more for adversarial training, and
    lower under PGD for standard training), eigenvalues n^-alpha by rank."""
    rng = np.random.default_rng(2)
    rows = []
    ranks = np.arange(1, samples + 1)
    for cell in _cells(adversaries, seeds, models):
        robust = cell["adversary"] != "st"
        for epoch, pert in itertools.product(epochs, perturbations):
            t = epoch / max(epochs)
            for depth, layer in enumerate(layers):
                alpha = (0.6 + 0.15 * depth + 0.4 * t * (1.4 if robust else 1.0)) * (0.8 if pert == "pgd" and not robust else 1.0)
                alpha *= rng.uniform(0.96, 1.04)
                base = {**cell, "epoch": epoch, "split": "test", "perturbation": pert, "layer": layer, "layer_index": depth}
                rows.append({**base, "metric": "alpha", "index": np.nan, "value": np.nan if nan_alpha else alpha})
                rows += [{**base, "metric": "eigenvalue", "index": i, "value": v} for i, v in zip(ranks, 3.0 * ranks ** -alpha)]
    return pd.DataFrame(rows, columns=[*CELL_COLUMNS, "epoch", *SPECTRA_COLUMNS])


FIGURES = {"kernel_dynamics": (plots.kernel_dynamics, dynamics_table), "kernel_spectrum": (plots.kernel_spectrum, kernel_table),
           "spectra": (plots.spectra, spectra_table)}
CASES = {
    "grid": {},
    "one_seed": {"seeds": (1,)},
    "one_adversary": {"adversaries": ("pgd-linf",)},
    "five_adversaries_two_models": {"adversaries": ("st", "pgd-linf", "pgd-l2", "trades-linf", "trades-l2"), "models": ("mlp", "convnet")},
}


def _drawn(fig) -> list:
    return [ax for ax in fig.axes if ax.axison and (ax.lines or ax.collections)]


def _check(path, fig, min_panels: int) -> None:
    assert path.exists() and path.stat().st_size > 20_000 and path.with_suffix(".pdf").exists()
    assert len(_drawn(fig)) >= min_panels


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", FIGURES)
def test_figure_draws_every_panel(tmp_path, name, case):
    """Every panel of each figure has lines, in the full grid and with one seed, one adversary or
    several models (which add rows to ``spectra`` and line styles to the kernel figures)."""
    draw, table = FIGURES[name]
    frame = table(**CASES[case])
    fig = draw(frame, tmp_path / f"{name}.png")
    rows = 2 if name == "spectra" and "models" in CASES[case] else 1
    _check(tmp_path / f"{name}.png", fig, {"kernel_dynamics": 10, "kernel_spectrum": 7, "spectra": 3 * rows}[name])


def test_kernel_figures_without_the_attacked_kernel(tmp_path):
    """``kernel.attacked: false``: one column of kernel panels; the eigen-features still have their
    clean and PGD test images."""
    fig = plots.kernel_dynamics(dynamics_table(sets=("clean",)), tmp_path / "dynamics.png")
    _check(tmp_path / "dynamics.png", fig, 5)
    assert "PGD-attacked subset kernel" not in [ax.get_title() for ax in fig.axes]
    kernel = kernel_table(sets=("clean",))
    kernel = pd.concat([kernel[kernel.metric != "eigen_feature_accuracy"],
                        kernel_table()[lambda k: k.metric == "eigen_feature_accuracy"]])
    fig = plots.kernel_spectrum(kernel, tmp_path / "spectrum.png")
    _check(tmp_path / "spectrum.png", fig, 4)
    features = [ax for ax in fig.axes if "eigen-feature" in ax.get_xlabel()]
    assert len(features) == 1 and len(features[0].lines) == 2 * 2  # (clean, pgd test images) x 2 adversaries


def test_kernel_dynamics_polar_view_and_log_velocity(tmp_path):
    fig = plots.kernel_dynamics(dynamics_table(), tmp_path / "dynamics.png")
    polar = [ax for ax in fig.axes if ax.name == "polar"]
    assert len(polar) == 2 and all(len(ax.lines) >= 2 for ax in polar)
    assert any(ax.get_yscale() == "log" for ax in fig.axes if ax.name != "polar")


def test_kernel_dynamics_small_angles_get_a_plain_panel(tmp_path, monkeypatch):
    """A lazy-regime kernel that turns by a few degrees: r against theta on plain axes, not a thin polar wedge."""
    monkeypatch.setitem(MOVES, "st", 0.002)
    monkeypatch.setitem(MOVES, "pgd-linf", 0.004)
    fig = plots.kernel_dynamics(dynamics_table(), tmp_path / "dynamics.png")
    assert not [ax for ax in fig.axes if ax.name == "polar"]
    plain = [ax for ax in fig.axes if ax.get_title() == "polar view (r against θ)"]
    assert len(plain) == 2 and plain[0].get_xlim()[1] < plots.POLAR_MIN_DEGREES


def test_kernel_spectrum_uses_the_largest_k_and_the_final_epoch(tmp_path):
    fig = plots.kernel_spectrum(kernel_table(), tmp_path / "spectrum.png")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any(label.startswith("top-10 eigenvalue mass") for label in labels)
    assert "final epoch 10" in fig._suptitle.get_text()


def test_spectra_layers_in_forward_order_and_alpha_reference(tmp_path):
    """Layers on the x axis by layer_index, whatever their names' order; a line at alpha = 1."""
    layers = ["stem", "block10", "block2", "penultimate"]
    fig = plots.spectra(spectra_table(layers=layers), tmp_path / "spectra.png")
    first = fig.axes[0]
    assert [t.get_text() for t in first.get_xticklabels()] == layers
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in first.lines)


def test_spectra_with_nan_alpha_keeps_the_eigenspectrum(tmp_path):
    fig = plots.spectra(spectra_table(nan_alpha=True), tmp_path / "spectra.png")
    assert len(_drawn(fig)) == 1
    assert any("α is NaN" in t.get_text() for ax in fig.axes for t in ax.texts)


@pytest.mark.parametrize("name", FIGURES)
@pytest.mark.parametrize("frame", [None, pd.DataFrame()])
def test_placeholder_without_a_table(tmp_path, name, frame):
    draw, _ = FIGURES[name]
    fig = draw(frame, tmp_path / f"{name}.png")
    assert (tmp_path / f"{name}.png").exists()
    assert "enabled: false?" in " ".join(t.get_text() for t in fig.axes[0].texts)
