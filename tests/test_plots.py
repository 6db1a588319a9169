"""Figures from synthetic tables, the projection, and the report of the tiny workflow."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest
import torch
from workflow_helpers import run_snakemake

from ncrobust import tables
from ncrobust.collapse import LayerStats
from ncrobust.columns import FIGURES, METRIC_COLUMNS
from ncrobust.figures import plots
from ncrobust.figures.plots import render
from ncrobust.geometry.projection import PROJECTION_COLUMNS, SimplexPlane, simplex_plane
from ncrobust.tables import summary, summary_markdown

C = 4
PERTURBATIONS = ["clean", "pgd", "pgd-targeted", "gaussian", "sign"]
# tap names whose natural sort is NOT the forward order: the order must come from layer_index
LAYERS = ["stem", "block10", "block2", "penultimate"]


def synthetic_metrics(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=(0, 5, 10), losses=("ce",), models=("mlp",)) -> pd.DataFrame:
    """A tidy metrics table shaped like the workflow's (ncrobust.columns.METRIC_COLUMNS), with
    plausible values; ``st`` cells also carry an extra ``l2`` evaluation that figures must ignore."""
    rng = np.random.default_rng(0)
    rows = []
    for model, loss, adv, seed, epoch, split, pert in itertools.product(models, losses, adversaries, seeds, epochs, ["train", "test"], PERTURBATIONS):
        norms = ["linf", "l2"] if adv == "st" and pert != "clean" else ["linf"]
        for norm in norms:
            cell = dict(dataset="digits", model=model, loss=loss, adversary=adv, variant="base", seed=seed, epoch=epoch, split=split, norm=norm, perturbation=pert)
            t = epoch / max(epochs)
            robust = adv != "st"
            attacked = pert in ("pgd", "pgd-targeted")
            bad = attacked and not robust
            junk = 1e6 if norm == "l2" else 1.0  # extra-norm rows: absurd values a figure must never show

            def add(layer, metric, value, klass=None, row=None, col=None):
                rows.append({**cell, "layer": layer, "layer_index": LAYERS.index(layer), "metric": metric,
                             "class": klass, "row": row, "col": col, "value": float(value) * junk})

            nc1 = 10 ** (1 - 3 * t) * (30 if bad else 1) * rng.uniform(0.8, 1.2)
            add("penultimate", "nc1", nc1)
            add("penultimate", "nc2_equinorm_M", 0.3 * 10 ** (-t) * rng.uniform(0.8, 1.2))
            add("penultimate", "nc2_equiangle_M", 0.2 * 10 ** (-t) * rng.uniform(0.8, 1.2))
            add("penultimate", "nc3", 0.5 * 10 ** (-2 * t) * rng.uniform(0.8, 1.2))
            w_scale = 1 + seed / 10  # NC2 of the classifier: one value per checkpoint, the same in every set
            add("penultimate", "nc2_equinorm_W", 0.1 * 10 ** (-t) * w_scale)
            add("penultimate", "nc2_equiangle_W", 0.05 * 10 ** (-t) * w_scale)
            add("penultimate", "nc4", 0.0 if (t == 1 and not attacked) else rng.uniform(0.0, 0.3))
            acc = (0.3 + 0.7 * t) * (0.1 if bad else (0.6 if attacked else 1.0))
            add("penultimate", "accuracy", acc)
            add("penultimate", "ncc_accuracy", acc * rng.uniform(0.9, 1.0))
            ncc = min(acc * (1.2 if robust else 1.0), 1.0)
            add("penultimate", "ncc_accuracy_clean_means", ncc)
            if pert != "clean":
                add("penultimate", "accuracy_true_labels", acc)
                add("penultimate", "leap_rate", 1 - ncc)
                add("penultimate", "alignment_angle", (60 if bad else 8) * rng.uniform(0.8, 1.2))
                add("penultimate", "mean_shift", rng.uniform(0, 0.3))
                for c in range(C):
                    add("penultimate", "alignment_angle_per_class", rng.uniform(0, 60), klass=c)
                stay = 0.2 if bad else 0.9
                for y, k in itertools.product(range(C), range(C)):
                    dest = (y + 1) % C if pert == "pgd-targeted" else (y + 2) % C
                    add("penultimate", "leap", stay if k == y else ((1 - stay) if k == dest else 0.0), row=y, col=k)
            if pert == "pgd-targeted":
                add("penultimate", "target_hit_rate", (1 - acc) * rng.uniform(0.8, 1.0))
                add("penultimate", "target_hit_rate_ncc", ncc)
            for depth, layer in enumerate(LAYERS[:-1]):
                add(layer, "nc1", nc1 * (depth + 1) / 3)
                add(layer, "nc1_trace_ratio", nc1 / 2)
                add(layer, "ncc_accuracy", acc)
                add(layer, "ncc_accuracy_clean_means", min(acc * (1.3 - 0.1 * depth), 1.0))
                if pert == "pgd-targeted":
                    add(layer, "target_hit_rate_ncc", min(acc * (1.3 - 0.1 * depth), 1.0))
    frame = pd.DataFrame(rows)
    return frame[METRIC_COLUMNS].astype({"seed": "int64", "epoch": "int64", "layer_index": "int64", "value": "float64",
                                         "class": "Int64", "row": "Int64", "col": "Int64"})


def synthetic_training(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=10) -> pd.DataFrame:
    rows = []
    for adv, seed, epoch in itertools.product(adversaries, seeds, range(1, epochs + 1)):
        t = epoch / epochs
        rows.append(dict(
            dataset="digits", model="mlp", loss="ce", adversary=adv, variant="base", seed=seed, epoch=epoch, lr=0.1, loss_value=1 - t,
            train_accuracy=0.3 + 0.7 * t, train_robust_accuracy=np.nan if adv == "st" else 0.2 + 0.4 * t,
            test_accuracy=0.3 + 0.6 * t, seconds=1.0,
        ))
    return pd.DataFrame(rows)


def leapt_sets(n=200, d=8, seed=0):
    """Clean features on a simplex, and perturbed ones of class y on class y+1's vertex."""
    g = torch.Generator().manual_seed(seed)
    means = 5 * torch.eye(C, d, dtype=torch.float64)
    y = torch.arange(n) % C
    clean = means[y] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    leapt = means[(y + 1) % C] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return clean, leapt, y


def synthetic_projection(adversaries=("st", "pgd-linf"), seeds=(1, 2), points=50) -> pd.DataFrame:
    """Projection tables as the evaluation writes them (SimplexPlane of the clean statistics)."""
    frames = []
    for adv, seed in itertools.product(adversaries, seeds):
        clean, leapt, y = leapt_sets(seed=seed)
        ref = LayerStats(C)
        ref.accumulate_means(clean, y)
        ref.finish_means()
        plane = SimplexPlane.of(ref)
        idx = torch.arange(points)
        for split in ("train", "test"):
            for pert, H, targets in (("clean", clean, None), ("pgd", leapt, None), ("pgd-targeted", leapt, (y + 1) % C)):
                stats = LayerStats(C)
                stats.accumulate_means(H, y if targets is None else targets)
                stats.finish_means()
                f = plane.project((split, "linf", pert), H[idx], y[idx], None if targets is None else targets[idx], stats)
                frames.append(f.assign(dataset="digits", model="mlp", loss="ce", adversary=adv, variant="base", seed=seed, epoch=10))
    return pd.concat(frames, ignore_index=True)


def check_image_files(outputs: dict[str, str]) -> None:
    for name, png in outputs.items():
        png_bytes = open(png, "rb").read()
        assert png_bytes[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(png_bytes) > 15_000, f"{name}: PNG suspiciously small ({len(png_bytes)} bytes)"
        pdf = png[: -len(".png")] + ".pdf"
        pdf_bytes = open(pdf, "rb").read()
        assert pdf_bytes[:5] == b"%PDF-" and b"%%EOF" in pdf_bytes[-64:], name
        assert len(pdf_bytes) > 5_000, f"{name}: PDF suspiciously small"


# --------------------------------------------------------------------------------------------
# projection


def test_simplex_plane_spans_the_centred_means():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 3
    H = torch.randn(3, 6, generator=g, dtype=torch.float64)[y] * 4 + 0.1 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    mu_G, V, M = simplex_plane(H, y, 3)
    assert V.shape == (6, 2) and np.allclose(V.T @ V, np.eye(2), atol=1e-10)
    # 3 centred means span a plane: projecting on V loses nothing
    Mc = M - mu_G
    assert np.allclose((Mc @ V) @ V.T, Mc, atol=1e-8)
    # deterministic orientation: the same input gives the same signs
    assert np.array_equal(simplex_plane(H, y, 3)[1], V)


def test_simplex_plane_with_two_classes_is_a_plane():
    y = torch.tensor([0, 0, 1, 1])
    H = torch.tensor([[1.0, 0, 0], [1.2, 0, 0], [-1.0, 0, 0], [-1.1, 0, 0]])
    _, V, _ = simplex_plane(H, y, 2)
    assert np.allclose(V.T @ V, np.eye(2), atol=1e-10)


def test_simplex_plane_rejects_bad_input():
    with pytest.raises(ValueError, match="no sample"):
        simplex_plane(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), 3)
    with pytest.raises(ValueError, match="rows"):
        simplex_plane(torch.randn(4, 3), torch.tensor([0, 1, 1]), 2)


def test_projection_pairs_samples_and_shows_the_leap():
    f = synthetic_projection(adversaries=("st",), seeds=(1,), points=60)
    assert set(PROJECTION_COLUMNS) <= set(f.columns)
    samples = f[(f["kind"] == "sample") & (f["split"] == "train")]
    assert (samples.groupby("perturbation").size() == 60).all()
    # the same samples in every perturbation (paired), the targets only for pgd-targeted
    clean, pgd = samples[samples["perturbation"] == "clean"], samples[samples["perturbation"] == "pgd"]
    assert (clean["label"].to_numpy() == pgd["label"].to_numpy()).all() and pgd["target"].isna().all()
    tgt = samples[samples["perturbation"] == "pgd-targeted"]
    assert (tgt["target"].to_numpy() == (tgt["label"].to_numpy() + 1) % C).all()
    # clean means: one per class; pgd features of class y land at clean vertex y+1
    means = f[(f["kind"] == "mean") & (f["split"] == "train") & (f["perturbation"] == "clean")].set_index("label")
    assert sorted(means.index) == list(range(C))
    vertices = means.loc[list(range(C)), ["x", "y"]].to_numpy()
    xy = pgd[["x", "y"]].to_numpy()
    nearest = np.argmin(((xy[:, None, :] - vertices[None]) ** 2).sum(-1), axis=1)
    assert (nearest == (pgd["label"].to_numpy() + 1) % C).mean() > 0.9
    # pgd-targeted means are grouped by target: the mean of the samples sent to c sits on vertex c
    tmeans = f[(f["kind"] == "mean") & (f["split"] == "train") & (f["perturbation"] == "pgd-targeted")].set_index("label")
    assert np.allclose(tmeans.loc[list(range(C)), ["x", "y"]].to_numpy(), vertices, atol=0.3)


@pytest.mark.workflow
@pytest.mark.slow
def test_figures_drawn_in_parallel_equal_the_serial_ones(tmp_path, monkeypatch):
    """``workers > 1`` draws the figures in other processes; the files are the same as drawn one by one."""
    import os

    names = ["nc_vs_epoch", "accuracy", "simplex"]
    drawn_by = tmp_path / "pids"
    drawn_by.mkdir()

    def draw(name, *args, _draw=plots._draw):  # record which process draws each figure (forked workers inherit the patch)
        (drawn_by / f"{name}-{os.getpid()}").touch()
        return _draw(name, *args)

    monkeypatch.setattr(plots, "_draw", draw)
    serial = {name: str(tmp_path / "serial" / f"{name}.png") for name in names}
    parallel = {name: str(tmp_path / "parallel" / f"{name}.png") for name in names}
    for outputs, workers in ((serial, 1), (parallel, 3)):
        (tmp_path / ("serial" if workers == 1 else "parallel")).mkdir()
        render(synthetic_metrics(), synthetic_training(), outputs, projection=synthetic_projection(), workers=workers)
    pids = {name: {int(p.name.rsplit("-", 1)[1]) for p in drawn_by.glob(f"{name}-*")} for name in names}
    for name in names:
        assert os.getpid() in pids[name] and len(pids[name]) == 2, pids  # once here, once in a worker
        assert open(serial[name], "rb").read() == open(parallel[name], "rb").read(), name


@pytest.mark.workflow
def test_an_error_in_a_parallel_figure_reaches_the_caller(tmp_path):
    outputs = {name: str(tmp_path / f"{name}.png") for name in ("accuracy", "simplex")}
    with pytest.raises(KeyError, match="split"):  # the simplex figure needs the projection's columns
        render(synthetic_metrics(), synthetic_training(), outputs, projection=pd.DataFrame({"x": [1.0]}), workers=2)


# --------------------------------------------------------------------------------------------
# figures


@pytest.mark.slow
def test_every_figure_renders_from_a_synthetic_grid(tmp_path):
    outputs = {name: str(tmp_path / f"{name}.png") for name in FIGURES}
    render(synthetic_metrics(), synthetic_training(), outputs, projection=synthetic_projection())
    check_image_files(outputs)


@pytest.mark.slow
def test_figures_render_with_one_adversary_one_seed_and_missing_pieces(tmp_path):
    metrics = synthetic_metrics(adversaries=("st",), seeds=(1,), epochs=(0, 10))
    metrics = metrics[~metrics["perturbation"].isin(["gaussian", "sign", "pgd-targeted"])]
    outputs = {name: str(tmp_path / f"{name}.png") for name in FIGURES}
    render(metrics, synthetic_training(adversaries=("st",), seeds=(1,)), outputs, projection=synthetic_projection(adversaries=("st",), seeds=(1,)))
    check_image_files(outputs)
    # a cell without a test split: its panels say "no data", the others still have ticks
    ragged = synthetic_metrics(seeds=(1,), epochs=(0, 10))
    ragged = ragged[~((ragged["adversary"] == "pgd-linf") & (ragged["split"] == "test"))]
    outputs = {name: str(tmp_path / f"ragged_{name}.png") for name in ("accuracy", "alignment")}
    render(ragged, None, outputs)
    check_image_files(outputs)
    # only clean data, no training log, no projection: every figure still gets a file
    clean_only = metrics[(metrics["perturbation"] == "clean") & (metrics["layer"] == "penultimate")]
    outputs = {name: str(tmp_path / f"clean_{name}.png") for name in FIGURES}
    render(clean_only, pd.DataFrame(), outputs, projection=None)
    for png in outputs.values():
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_figures_tell_several_losses_and_models_apart(tmp_path):
    metrics = synthetic_metrics(adversaries=("st", "trades-linf"), seeds=(1,), epochs=(0, 10), losses=("ce", "mse"), models=("mlp", "convnet"))
    outputs = {name: str(tmp_path / f"{name}.png") for name in ("layerwise", "leap", "ncc_robustness")}
    render(metrics, None, outputs)
    check_image_files(outputs)


def test_render_rejects_an_unknown_figure(tmp_path):
    with pytest.raises(ValueError, match="unknown figure"):
        render(synthetic_metrics(), synthetic_training(), {"nope": str(tmp_path / "nope.png")})


def test_palettes_are_fixed_for_known_names():
    from ncrobust.attacks import PERTURBATIONS
    from ncrobust.cell import ADVERSARIES

    assert set(plots.PERTURBATION_PALETTE) == set(plots.PERTURBATION_ORDER) == set(PERTURBATIONS)
    assert set(plots.ADVERSARY_PALETTE) == set(ADVERSARIES)
    assert not set(plots.PERTURBATION_PALETTE.values()) & set(plots.ADVERSARY_PALETTE.values())


# --------------------------------------------------------------------------------------------
# summary


def test_summary_has_every_headline_quantity():
    s = summary(synthetic_metrics())
    assert len(s) == 2 and set(s["seeds"]) == {2} and set(s["epoch"]) == {10}
    for q in ("train_accuracy", "train_robust_accuracy", "test_accuracy", "test_robust_accuracy", "nc1_clean", "nc1_pgd",
              "nc2_equinorm_clean", "nc2_equiangle_pgd", "nc3_clean", "nc4_pgd", "ncc_accuracy_clean_means_pgd",
              "alignment_angle_pgd", "leap_rate_pgd", "target_hit_rate"):
        assert f"{q}_mean" in s.columns and f"{q}_std" in s.columns, q
    md = summary_markdown(s)
    assert md.startswith("| dataset | model | loss | adversary |") and " ± " in md
    assert " target_hit_rate |" in md.splitlines()[0]


def final_hit_rates(metrics, split="train", metric="target_hit_rate"):
    """Per adversary and seed: the targeted set's hit rate at the last epoch under the own (linf) threat, picked by hand."""
    last = metrics["epoch"].max()
    m = metrics[(metrics.metric == metric) & (metrics.perturbation == "pgd-targeted") & (metrics.layer == "penultimate")
                & (metrics.split == split) & (metrics.norm == "linf") & (metrics.epoch == last)]
    return m.set_index(["adversary", "seed"])["value"]


def test_summary_gives_the_targeted_sets_hit_rate_on_the_train_split():
    metrics = synthetic_metrics(seeds=(1, 2, 3))
    s = summary(metrics).set_index("adversary")
    want = final_hit_rates(metrics)
    for adv in ("st", "pgd-linf"):
        assert s.at[adv, "target_hit_rate_mean"] == pytest.approx(want[adv].mean(), rel=1e-12)
        assert s.at[adv, "target_hit_rate_std"] == pytest.approx(want[adv].std(ddof=1), rel=1e-9)
    without = summary(metrics[metrics.perturbation != "pgd-targeted"])
    assert "target_hit_rate_mean" not in without.columns


# --------------------------------------------------------------------------------------------
# the report of the tiny workflow


@pytest.mark.slow
def test_report_includes_every_figure_and_table(st_only_run):
    """The tiny workflow with only standard training in its grid (conftest.st_only_run): every
    figure it has something to show in is made (``imbalance``: none, a balanced grid), and the
    report embeds every figure and table."""
    import yaml

    from ncrobust.config import validate_config
    from ncrobust.stages import drawn_figures

    workdir, before = st_only_run
    drawn = drawn_figures(validate_config(yaml.safe_load((workdir / "config.yaml").read_text())))
    assert set(FIGURES) - set(drawn) == {"imbalance"} and not (workdir / "results/figures/imbalance.png").exists()
    for name in drawn:  # drawn again after the grid lost pgd-linf: later than any file of the cells
        png = workdir / f"results/figures/{name}.png"
        assert png.stat().st_size > 0 and png.stat().st_mtime_ns > max(before.values()), f"figure {name} not redrawn for an st-only grid"
    run_snakemake(workdir, "--report", "results/report.html", configfile=workdir / "config.yaml")
    html = (workdir / "results/report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in drawn:
        assert re.search(rf"{name}\.png", html), f"report misses figure {name}"
    for name in ("summary.md", "summary.csv"):
        assert name in html, f"report misses table {name}"


# --------------------------------------------------------------------------------------------
# what the figures draw (read back from the returned matplotlib figures)


def _panel_lines(ax):
    """Lines of a panel that carry data (seaborn draws one Line2D per series)."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 1]


@pytest.mark.slow
def test_nc_vs_epoch_draws_one_series_per_perturbation_under_the_own_threat(tmp_path):
    metrics = synthetic_metrics()
    fig = plots.nc_vs_epoch(tables.nc_curves(metrics), tmp_path / "nc.png")
    axes = np.array(fig.axes).reshape(7, 2)
    assert [ax.get_title() for ax in axes[0]] == ["trained with\nst", "trained with\npgd-linf"]
    assert "NC1" in axes[0, 0].get_ylabel() and "NC4" in axes[6, 0].get_ylabel()
    # NC2 of the classifier W: one line (W is the same in every set), the mean over seeds
    assert "of W" in axes[3, 0].get_ylabel() and "of W" in axes[4, 0].get_ylabel()
    (w_line,) = _panel_lines(axes[3, 0])
    want_w = metrics[(metrics.adversary == "st") & (metrics.split == "train") & (metrics.metric == "nc2_equinorm_W")
                     & (metrics.perturbation == "clean")].groupby("epoch")["value"].mean()
    np.testing.assert_allclose(w_line.get_ydata(), want_w.to_numpy())
    nc1_st = _panel_lines(axes[0, 0])
    assert len(nc1_st) == len(PERTURBATIONS)
    # every value drawn is a mean over seeds of the linf rows: the l2 rows (x 1e6) never appear
    top = max(max(line.get_ydata()) for ax in axes.flat for line in _panel_lines(ax))
    assert top < 1e4
    want = metrics[(metrics.adversary == "st") & (metrics.split == "train") & (metrics.layer == "penultimate")
                   & (metrics.metric == "nc1") & (metrics.perturbation == "clean")].groupby("epoch")["value"].mean()
    clean = [line for line in nc1_st if line.get_color() == plots.PERTURBATION_PALETTE["clean"]]
    assert len(clean) == 1
    np.testing.assert_allclose(clean[0].get_ydata(), want.to_numpy())
    assert clean[0].get_zorder() > max(line.get_zorder() for line in nc1_st if line is not clean[0])  # drawn on top
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:1] == ["evaluated on"] and set(PERTURBATIONS) <= set(legend)


@pytest.mark.slow
def test_perturbations_differ_by_more_than_colour(tmp_path):
    fig = plots.nc_vs_epoch(tables.nc_curves(synthetic_metrics()), tmp_path / "nc.png")
    styles = {(tuple(line.get_dashes() if hasattr(line, "get_dashes") else ()), line.get_linestyle(), line.get_marker())
              for line in _panel_lines(fig.axes[0])}
    assert len(styles) >= 4, styles  # clean/pgd solid with different markers, noise broken
    markers = {line.get_marker() for line in _panel_lines(fig.axes[0])}
    assert len(markers) == len(PERTURBATIONS)


def test_leap_heatmap_shows_the_mean_matrix_with_targets_as_rows(tmp_path):
    metrics = synthetic_metrics()
    fig = plots.leap_heatmap(tables.leap_matrices(metrics), tmp_path / "leap.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4  # (pgd, pgd-targeted) x (st, pgd-linf)
    st_pgd = next(ax for ax in panels if ax.get_title().startswith("trained with st\npgd ·"))
    L = st_pgd.images[0].get_array()
    expected = 0.2 * np.eye(C) + 0.8 * np.roll(np.eye(C), 2, axis=1)
    np.testing.assert_allclose(L, expected)
    targeted = next(ax for ax in panels if "pgd-targeted" in ax.get_title() and ax.get_ylabel())
    assert targeted.get_ylabel() == "target y"


def test_figures_that_draw_the_targeted_set_name_its_hit_rate(tmp_path):
    metrics = synthetic_metrics()
    hits = tables.target_hit_rates(metrics)
    network, ncc = final_hit_rates(metrics), final_hit_rates(metrics, metric="target_hit_rate_ncc")
    fig = plots.leap_heatmap(tables.leap_matrices(metrics), tmp_path / "leap.png", hits=hits)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    for adv in ("st", "pgd-linf"):
        line = f"hit rate {network[adv].mean():.2f} (NCC {ncc[adv].mean():.2f})"
        assert f"trained with {adv}\npgd-targeted · epoch 10\n{line}" in titles, titles
    assert not [t for t in titles if "\npgd ·" in t and "hit rate" in t]  # untargeted panels name none
    fig = plots.simplex(tables.simplex_points(synthetic_projection()), tmp_path / "simplex.png", hits=hits)
    titles = [ax.get_title() for ax in fig.axes if ax.collections]
    assert f"hit rate {network['st'][1]:.2f} (NCC {ncc['st'][1]:.2f})" in next(t for t in titles if "st\npgd-targeted" in t)
    fig = plots.nc_vs_epoch(tables.nc_curves(metrics), tmp_path / "nc.png", hits=hits)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"st: {network['st'].mean():.2f}" in legend and f"pgd-linf: {network['pgd-linf'].mean():.2f}" in legend
    fig = plots.alignment_angle(tables.alignment_curves(metrics), tmp_path / "alignment.png", hits=hits)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    test = final_hit_rates(metrics, split="test")
    assert f"st · train: {network['st'].mean():.2f}" in legend and f"st · test: {test['st'].mean():.2f}" in legend
    untargeted = metrics[metrics.perturbation != "pgd-targeted"]
    fig = plots.nc_vs_epoch(tables.nc_curves(untargeted), tmp_path / "nc_untargeted.png", hits=tables.target_hit_rates(untargeted))
    assert not [t for t in fig.legends[0].get_texts() if "hit rate" in t.get_text()]


@pytest.mark.slow
def test_layerwise_orders_taps_by_layer_index_not_by_name(tmp_path):
    fig = plots.layerwise(tables.layer_profiles(synthetic_metrics()), tmp_path / "layers.png")
    bottom = fig.axes[-1]
    assert [t.get_text() for t in bottom.get_xticklabels()] == LAYERS
    assert "NC1" in fig.axes[0].get_ylabel()


def test_ncc_robustness_points_are_the_metrics(tmp_path):
    metrics = synthetic_metrics(seeds=(1,), epochs=(0, 10))
    fig = plots.ncc_robustness(tables.ncc_robustness_points(metrics), tmp_path / "ncc.png")
    train = fig.axes[0]
    assert train.get_title() == "train split"
    pts = np.concatenate([c.get_offsets() for c in train.collections if len(c.get_offsets())])
    m = metrics[(metrics.split == "train") & (metrics.perturbation == "pgd") & (metrics.layer == "penultimate") & (metrics.norm == "linf")]
    acc = m[m.metric == "accuracy_true_labels"].sort_values(["adversary", "epoch"])["value"].to_numpy()
    ncc = m[m.metric == "ncc_accuracy_clean_means"].sort_values(["adversary", "epoch"])["value"].to_numpy()
    assert sorted(map(tuple, np.round(pts, 12))) == sorted(zip(np.round(acc, 12), np.round(ncc, 12)))
    assert not [t for t in train.texts if t.get_text() == "y = x"]  # in the legend, not over the points
    assert "y = x" in [t.get_text() for t in fig.legends[0].get_texts()]


@pytest.mark.slow
def test_simplex_draws_arrows_from_clean_to_perturbed_means(tmp_path):
    fig = plots.simplex(tables.simplex_points(synthetic_projection()), tmp_path / "simplex.png")
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 4  # (pgd, pgd-targeted) x (st, pgd-linf)
    for ax in panels:
        arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
        assert len(arrows) == C, ax.get_title()
        vertex_labels = sorted(t.get_text() for t in ax.texts if getattr(t, "arrow_patch", None) is None)
        assert vertex_labels == [str(c) for c in range(C)]


def test_vertex_labels_are_spread_apart_even_from_coinciding_vertices():
    """The simplex figure's class labels: at least about the asked distance apart, also for class
    means that project onto one point, and near their vertices."""
    from ncrobust.figures.plots import spread_labels

    rng = np.random.default_rng(0)
    points = np.concatenate([np.zeros((3, 2)), rng.normal(size=(7, 2)) * 0.01 + [1, 0]])  # 3 coincide, 7 nearly
    labels = spread_labels(points, 0.2)
    dist = np.linalg.norm(labels[:, None] - labels[None], axis=2) + np.eye(len(points)) * 9
    assert dist.min() >= 0.2 * 0.9
    assert np.linalg.norm(labels - points, axis=1).max() < 1.0  # each stays near its vertex
    far = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # already apart: pushed out by the distance only
    assert np.allclose(np.linalg.norm(spread_labels(far, 0.2) - far, axis=1), 0.2)


def test_gaussian_is_drawn_wide_under_sign(tmp_path):
    """The two noises give nearly equal values: gaussian is a wider, translucent line below sign, so
    both stay visible (and the legend shows it the same way)."""
    import matplotlib.pyplot as plt

    from ncrobust.figures import plots

    frame = pd.DataFrame([{"epoch": e, "perturbation": p, "value": 1.0 + e, "seed": 1, "setting": ""}
                          for e in range(3) for p in ("clean", "gaussian", "sign")])
    styles = plots._perturbation_styles(frame)
    fig, ax = plt.subplots()
    plots._lines(ax, frame, x="epoch", styles=styles)
    widths = {line.get_color(): (line.get_linewidth(), line.get_zorder()) for line in ax.get_lines() if len(line.get_xdata()) > 1}
    gaussian, sign = widths[plots.PERTURBATION_PALETTE["gaussian"]], widths[plots.PERTURBATION_PALETTE["sign"]]
    assert gaussian[0] > 2 * sign[0] and gaussian[1] < sign[1]
    plt.close(fig)


def test_the_seed_count_of_a_title_is_per_cell_not_over_the_grid():
    """An imported network (seed 0) beside a trained grid (seeds 1, 2) is still 'mean over 2 seeds'."""
    trained = pd.DataFrame({"dataset": "digits", "model": "mlp", "loss": "ce", "adversary": "st",
                            "variant": "base", "seed": [1, 2, 1, 2], "epoch": [1, 1, 2, 2]})
    imported = pd.DataFrame({"dataset": "digits", "model": "mine", "loss": "ce", "adversary": "st",
                             "variant": "base", "seed": [0], "epoch": [2]})
    frame = pd.concat([trained, imported], ignore_index=True)
    assert frame["seed"].nunique() == 3
    assert plots._seeds_note(frame) == "mean over 2 seeds, band = seed range"
    assert plots._seeds_note(imported) == "1 seed (no band)"
    assert plots._seeds_note(frame.iloc[:0]) == "1 seed (no band)"


def test_log_axis_labels_are_plain_numbers():
    f = plots._PlainLogFormatter()
    assert [f._num_to_string(x, 0, 1) for x in (0.3, 2, 10, 100, 1000, 20000, 1e-5, 1e6)] == [
        "0.3", "2", "10", "100", "1000", "20000", "1e-05", "1e+06"]
