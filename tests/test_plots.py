"""Figures from synthetic tables, the projection, and the report of the tiny workflow."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest
import torch

from ncrobust import plots
from ncrobust.plots import FIGURES, layer_order, render
from ncrobust.projection import PROJECTION_COLUMNS, project, simplex_plane
from ncrobust.tables import METRIC_COLUMNS, summary, summary_markdown
from workflow_helpers import run_snakemake, write_tiny_config

C = 4
PERTURBATIONS = ["clean", "pgd", "pgd-targeted", "gaussian", "sign"]
LAYERS = ["layer1", "layer2", "layer10", "penultimate"]  # natural order: layer10 is the deepest tap


def synthetic_metrics(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=(0, 5, 10), losses=("ce",), models=("mlp",)) -> pd.DataFrame:
    """A long-format metrics table shaped like the workflow's, with plausible values."""
    rng = np.random.default_rng(0)
    rows = []
    for model, loss, adv, seed, epoch, split, pert in itertools.product(models, losses, adversaries, seeds, epochs, ["train", "test"], PERTURBATIONS):
        cell = dict(dataset="digits", model=model, loss=loss, adversary=adv, seed=seed, epoch=epoch, split=split, perturbation=pert)
        t = epoch / max(epochs)
        robust = adv != "st"
        attacked = pert in ("pgd", "pgd-targeted")
        bad = attacked and not robust

        def add(layer, metric, value):
            rows.append({**cell, "layer": layer, "metric": metric, "value": float(value)})

        nc1 = 10 ** (1 - 3 * t) * (30 if bad else 1) * rng.uniform(0.8, 1.2)
        add("penultimate", "nc1", nc1)
        add("penultimate", "nc2_equinorm_M", 0.3 * 10 ** (-t) * rng.uniform(0.8, 1.2))
        add("penultimate", "nc2_equiangle_M", 0.2 * 10 ** (-t) * rng.uniform(0.8, 1.2))
        add("penultimate", "nc3", 0.5 * 10 ** (-2 * t) * rng.uniform(0.8, 1.2))
        add("penultimate", "nc4", 0.0 if (t == 1 and not attacked) else rng.uniform(0.0, 0.3))
        acc = (0.3 + 0.7 * t) * (0.1 if bad else (0.6 if attacked else 1.0))
        add("penultimate", "accuracy", acc)
        add("penultimate", "ncc_accuracy", acc * rng.uniform(0.9, 1.0))
        if pert != "clean":
            add("penultimate", "accuracy_true_labels", acc)
            ncc = acc * (1.2 if robust else 1.0)
            add("penultimate", "ncc_accuracy_clean_means", min(ncc, 1.0))
            add("penultimate", "leap_rate", 1 - min(ncc, 1.0))
            add("penultimate", "alignment_angle", (60 if bad else 8) * rng.uniform(0.8, 1.2))
            add("penultimate", "mean_shift", rng.uniform(0, 0.3))
            for c in range(C):
                add("penultimate", f"alignment_angle[{c}]", rng.uniform(0, 60))
            stay = 0.2 if bad else 0.9
            for y, k in itertools.product(range(C), range(C)):
                dest = (y + 1) % C if pert == "pgd-targeted" else (y + 2) % C
                add("penultimate", f"leap[{y},{k}]", stay if k == y else ((1 - stay) if k == dest else 0.0))
        if pert == "pgd-targeted":
            add("penultimate", "target_hit_rate", 1 - acc)
        for depth, layer in enumerate(LAYERS[:-1]):
            add(layer, "nc1", nc1 * (depth + 1) / 3)
            add(layer, "nc1_trace_ratio", nc1 / 2)
            add(layer, "ncc_accuracy", acc)
            if pert != "clean":
                add(layer, "ncc_accuracy_clean_means", min(acc * (1.3 - 0.1 * depth), 1.0))
    frame = pd.DataFrame(rows)
    return frame[METRIC_COLUMNS].astype({"seed": "int64", "epoch": "int64", "value": "float64"})


def synthetic_training(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=10) -> pd.DataFrame:
    rows = []
    for adv, seed, epoch in itertools.product(adversaries, seeds, range(1, epochs + 1)):
        t = epoch / epochs
        rows.append(dict(
            dataset="digits", model="mlp", loss="ce", adversary=adv, seed=seed, epoch=epoch, lr=0.1, loss_value=1 - t,
            train_accuracy=0.3 + 0.7 * t, train_robust_accuracy=np.nan if adv == "st" else 0.2 + 0.4 * t,
            test_accuracy=0.3 + 0.6 * t, seconds=1.0,
        ))
    return pd.DataFrame(rows)


def synthetic_evaluation(n=200, d=8, seed=0) -> dict:
    """An evaluation blob (features.evaluate's layout) with a clean simplex and a perturbation that
    moves class y onto class y+1's vertex."""
    g = torch.Generator().manual_seed(seed)
    means = 5 * torch.eye(C, d, dtype=torch.float64)
    results = {}
    for split in ("train", "test"):
        y = torch.arange(n) % C
        clean = means[y] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        leapt = means[(y + 1) % C] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        results[f"{split}/clean"] = {"features": clean.half(), "labels": y, "logits": torch.zeros(n, C)}
        results[f"{split}/pgd"] = {"features": leapt.half(), "labels": y, "logits": torch.zeros(n, C)}
        results[f"{split}/pgd-targeted"] = {"features": leapt.half(), "labels": y, "targets": (y + 1) % C, "logits": torch.zeros(n, C)}
        results[f"{split}/gaussian"] = {"features": clean.half(), "labels": y, "logits": torch.zeros(n, C)}
    return {"num_classes": C, "results": results, "epoch": 10}


def synthetic_projection(adversaries=("st", "pgd-linf"), seeds=(1, 2)) -> pd.DataFrame:
    frames = []
    for adv, seed in itertools.product(adversaries, seeds):
        f = project(synthetic_evaluation(seed=seed), max_points=50, seed=seed)
        f = f.assign(dataset="digits", model="mlp", loss="ce", adversary=adv, seed=seed, epoch=10)
        frames.append(f)
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


def test_project_subsamples_pairs_and_shows_the_leap():
    blob = synthetic_evaluation(n=500)
    f = project(blob, max_points=300, seed=3)
    assert list(f.columns) == PROJECTION_COLUMNS
    samples = f[f["kind"] == "sample"]
    counts = samples.groupby(["split", "perturbation"]).size()
    assert set(counts.index) == {(s, p) for s in ("train", "test") for p in ("clean", "pgd", "pgd-targeted")}  # gaussian not asked
    assert (counts == 300).all()
    # the same samples in every perturbation (paired), the targets only for pgd-targeted
    tr = samples[samples["split"] == "train"]
    assert (tr[tr["perturbation"] == "clean"]["label"].to_numpy() == tr[tr["perturbation"] == "pgd"]["label"].to_numpy()).all()
    assert tr[tr["perturbation"] == "pgd"]["target"].isna().all()
    tgt = tr[tr["perturbation"] == "pgd-targeted"]
    assert (tgt["target"].to_numpy() == (tgt["label"].to_numpy() + 1) % C).all()
    # clean means: one per class; pgd features of class y land at clean vertex y+1
    means = f[(f["kind"] == "mean") & (f["split"] == "train") & (f["perturbation"] == "clean")].set_index("label")
    assert sorted(means.index) == list(range(C))
    pgd = tr[tr["perturbation"] == "pgd"]
    xy = pgd[["x", "y"]].to_numpy()
    vertices = means.loc[list(range(C)), ["x", "y"]].to_numpy()
    nearest = np.argmin(((xy[:, None, :] - vertices[None]) ** 2).sum(-1), axis=1)
    assert (nearest == (pgd["label"].to_numpy() + 1) % C).mean() > 0.9
    # seeded: same seed, same subsample; other seed, other subsample
    assert project(blob, max_points=300, seed=3).equals(f)
    assert not project(blob, max_points=300, seed=4).equals(f)


def test_project_small_split_and_errors():
    blob = synthetic_evaluation(n=40)
    f = project(blob, max_points=300, perturbations=["clean", "pgd"], splits=["test"])
    assert set(f["split"]) == {"test"} and (f[f["kind"] == "sample"].groupby("perturbation").size() == 40).all()
    with pytest.raises(ValueError, match="max_points"):
        project(blob, max_points=0)
    with pytest.raises(ValueError, match="clean"):
        project({"num_classes": C, "results": {"train/pgd": blob["results"]["train/pgd"]}}, splits=["train"])


def test_projection_table_is_tagged_with_the_cell_and_epoch():
    from ncrobust.experiment import Cell
    from ncrobust.pipeline import projection_table

    cell = Cell("digits", "mlp", "ce", "st", 2)
    f = projection_table(synthetic_evaluation(n=60), cell, max_points=50)
    assert set(PROJECTION_COLUMNS) <= set(f.columns)
    assert set(f["adversary"]) == {"st"} and set(f["seed"]) == {2} and set(f["epoch"]) == {10}
    assert (f[f["kind"] == "sample"].groupby(["split", "perturbation"]).size() == 50).all()


def test_figures_drawn_in_parallel_equal_the_serial_ones(tmp_path, monkeypatch):
    """``workers > 1`` draws the figures in other processes; the files are the same as drawn one by one."""
    import os

    names = ["nc_vs_epoch", "accuracy", "simplex"]
    drawn_by = tmp_path / "pids"
    drawn_by.mkdir()
    for name in names:  # record which process draws each figure (forked workers inherit the patch)
        def draw(*args, _draw=FIGURES[name], _name=name):
            (drawn_by / f"{_name}-{os.getpid()}").touch()
            return _draw(*args)

        monkeypatch.setitem(FIGURES, name, draw)
    serial = {name: str(tmp_path / "serial" / f"{name}.png") for name in names}
    parallel = {name: str(tmp_path / "parallel" / f"{name}.png") for name in names}
    for outputs, workers in ((serial, 1), (parallel, 3)):
        (tmp_path / ("serial" if workers == 1 else "parallel")).mkdir()
        render(synthetic_metrics(), synthetic_training(), outputs, projection=synthetic_projection(), workers=workers)
    pids = {name: {int(p.name.rsplit("-", 1)[1]) for p in drawn_by.glob(f"{name}-*")} for name in names}
    for name in names:
        assert os.getpid() in pids[name] and len(pids[name]) == 2, pids  # once here, once in a worker
        assert open(serial[name], "rb").read() == open(parallel[name], "rb").read(), name


def test_an_error_in_a_parallel_figure_reaches_the_caller(tmp_path):
    outputs = {name: str(tmp_path / f"{name}.png") for name in ("accuracy", "simplex")}
    with pytest.raises(KeyError, match="split"):  # the simplex figure needs the projection's columns
        render(synthetic_metrics(), synthetic_training(), outputs, projection=pd.DataFrame({"x": [1.0]}), workers=2)


# --------------------------------------------------------------------------------------------
# figures


def test_layer_order_is_forward_with_penultimate_last():
    assert layer_order(["penultimate", "layer10", "layer2", "layer1"]) == ["layer1", "layer2", "layer10", "penultimate"]
    assert layer_order(["stage2_block1", "stage1_block10", "stage1_block2"]) == ["stage1_block2", "stage1_block10", "stage2_block1"]


def test_every_figure_renders_from_a_synthetic_grid(tmp_path):
    outputs = {name: str(tmp_path / f"{name}.png") for name in FIGURES}
    render(synthetic_metrics(), synthetic_training(), outputs, projection=synthetic_projection())
    check_image_files(outputs)


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


def test_figures_tell_several_losses_and_models_apart(tmp_path):
    metrics = synthetic_metrics(adversaries=("st", "trades-linf"), seeds=(1,), epochs=(0, 10), losses=("ce", "mse"), models=("mlp", "convnet"))
    outputs = {name: str(tmp_path / f"{name}.png") for name in ("layerwise", "leap", "ncc_robustness")}
    render(metrics, None, outputs)
    check_image_files(outputs)


def test_render_rejects_an_unknown_figure(tmp_path):
    with pytest.raises(ValueError, match="unknown figure"):
        render(synthetic_metrics(), synthetic_training(), {"nope": str(tmp_path / "nope.png")})


def test_palettes_are_fixed_for_known_names():
    assert set(plots.PERTURBATION_PALETTE) == set(plots.PERTURBATION_ORDER)
    assert set(plots.ADVERSARY_PALETTE) == set(plots.ADVERSARY_ORDER)
    assert not set(plots.PERTURBATION_PALETTE.values()) & set(plots.ADVERSARY_PALETTE.values())


# --------------------------------------------------------------------------------------------
# summary


def test_summary_has_every_headline_quantity():
    s = summary(synthetic_metrics())
    assert len(s) == 2 and set(s["seeds"]) == {2} and set(s["epoch"]) == {10}
    for q in ("train_accuracy", "train_robust_accuracy", "test_accuracy", "test_robust_accuracy", "nc1_clean", "nc1_pgd",
              "nc2_equinorm_clean", "nc2_equiangle_pgd", "nc3_clean", "nc4_pgd", "ncc_accuracy_clean_means_pgd",
              "alignment_angle_pgd", "leap_rate_pgd"):
        assert f"{q}_mean" in s.columns and f"{q}_std" in s.columns, q
    md = summary_markdown(s)
    assert md.startswith("| dataset | model | loss | adversary |") and " ± " in md


# --------------------------------------------------------------------------------------------
# the report of the tiny workflow


@pytest.mark.slow
def test_report_includes_every_figure_and_table(tmp_path):
    """The smallest workflow (one `st` cell, one checkpoint): every figure is made, even on a grid
    with only standard training, and the report embeds every figure and table."""
    grid = {"dataset": ["digits"], "model": ["mlp"], "loss": ["ce"], "adversary": ["st"], "seed": [1]}
    config = write_tiny_config(tmp_path, grid=grid, evaluation={
        "splits": ["train", "test"], "perturbations": {"clean": {}, "pgd": {}, "pgd-targeted": {}}, "batch_size": 500,
    }, training={"epochs": 2, "checkpoints": [2], "batch_size": 128})
    run_snakemake(tmp_path, configfile=config)
    assert sorted(p.name for p in (tmp_path / "results/runs/digits/mlp/ce/st/seed1/projection").iterdir()) == ["epoch0.parquet", "epoch2.parquet"]
    run_snakemake(tmp_path, "--report", "results/report.html", configfile=config)
    html = (tmp_path / "results/report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in FIGURES:
        assert re.search(rf"{name}\.png", html), f"report misses figure {name}"
    for name in ("summary.md", "summary.csv"):
        assert name in html, f"report misses table {name}"
