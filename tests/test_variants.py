"""The `variant` grid axis: named overrides of a cell's recipe (config.variants, grid.variant),
their config slices and data files, their validation, and a variant cell built by the workflow."""

import pytest
import torch
from workflow_helpers import cell_dir, run_snakemake, tiny_config, write_tiny_config

from ncrobust.cell import Cell
from ncrobust.config import ConfigError, validate_config
from ncrobust.stages import cell_config, data_variant, grid_cells, job_config, stage_slice, variant_applies

STEP10 = {"imbalance": {"profile": "step", "ratio": 10}}
VARIANTS = {
    "r10": {"dataset": STEP10},
    "nobias": {"model": {"bias": False}},
    "r10-nobias": {"dataset": STEP10, "model": {"bias": False}},
    "slow": {"training": {"optimizer": {"lr": 0.01}}},
}


def config_with(variants=VARIANTS, grid_variants=("base", *VARIANTS), **overrides):
    config = tiny_config(variants=variants, **overrides)
    config["grid"]["variant"] = list(grid_variants)
    return validate_config(config)


def cell(variant="base", adversary="st", model="mlp"):
    return Cell("digits", model, "ce", adversary, 1, variant)


# ---------------------------------------------------------------------------------- the slices


def test_base_is_the_default_and_its_slices_ignore_the_variants():
    plain = validate_config(tiny_config())
    assert plain["grid"]["variant"] == ["base"] and plain["variants"] == {}
    config = config_with()
    for stage in ("init_model", "train", "evaluate", "robustness"):
        assert stage_slice(stage, config, cell=cell()) == stage_slice(stage, plain, cell=cell())
    assert stage_slice("prepare_data", config, dataset="digits") == stage_slice("prepare_data", plain, dataset="digits")


def test_a_variant_slice_holds_its_overrides_and_nothing_of_the_other_variants():
    config = config_with()
    base = stage_slice("train", config, cell=cell())
    slow = stage_slice("train", config, cell=cell("slow"))
    assert slow["training"]["optimizer"]["lr"] == 0.01 and base["training"]["optimizer"]["lr"] == 0.1
    assert {k: v for k, v in slow["training"].items() if k != "optimizer"} == {k: v for k, v in base["training"].items() if k != "optimizer"}
    assert stage_slice("init_model", config, cell=cell("nobias")) == {"models": {"mlp": {"bias": False, "depth": 2, "width": 32}}}
    assert stage_slice("init_model", config, cell=cell("slow")) == stage_slice("init_model", config, cell=cell())
    assert "variants" not in stage_slice("evaluate", config, cell=cell("r10"))  # what a cell computes with, not names
    # a variant's dataset options reach prepare_data's slice through the data file's variant
    options = stage_slice("prepare_data", config, dataset="digits", variant="r10")["datasets"]["digits"]["options"]
    assert options == {"imbalance": {"profile": "step", "ratio": 10.0}, "split_seed": 0, "test_fraction": 0.25}


def test_job_config_and_cell_config_apply_the_cells_variant():
    config = config_with()
    job = job_config("train", stage_slice("train", config, cell=cell("slow")), config, cell=cell("slow"))
    assert job["training"]["optimizer"]["lr"] == 0.01
    assert cell_config(config, cell("r10-nobias"))["models"]["mlp"]["bias"] is False
    assert cell_config(config, cell()) is config
    with pytest.raises(ValueError, match="unknown variant 'r11'; defined in config.variants: nobias, r10, r10-nobias, slow"):
        cell_config(config, cell("r11"))


def test_variants_with_the_same_dataset_overrides_share_one_data_file():
    config = config_with()
    assert {v: data_variant(config, v) for v in config["grid"]["variant"]} == {
        "base": "base", "r10": "r10", "nobias": "base", "r10-nobias": "r10", "slow": "base",
    }


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("variants, grid_variants, message", [
    ({}, ("base", "r10"), r"grid\.variant: unknown variant 'r10'; define it under variants \(defined: none\)"),
    ({"r10": {"dataset": {"imbalance": {"profile": "step", "ratio": 0.5}}}}, ("r10",),
     r"variants\.r10: datasets\.digits\.options\.imbalance\.ratio = 0\.5: must be >= 1"),
    ({"wide": {"model": {"widht": 64}}}, ("wide",), r"variants\.wide: models\.mlp: unknown option 'widht'; allowed: .*width"),
    ({"long": {"training": {"epochs": 8}}}, ("long",), r"variants\.long\.training\.epochs: the checkpoint epochs are the grid's"),
    ({"odd": {"loss": {}}}, ("odd",), r"unknown key 'loss' under variants\.odd; allowed: adversaries, dataset, losses, model, training"),
    ({"base": {"model": {"bias": False}}}, ("base",), r"variants: the name 'base' is not allowed \(reserved\)"),
    ({"R 10": {"dataset": STEP10}}, ("R 10",), r"variants: the name 'R 10' is not allowed"),
    ({"empty": {}}, ("empty",), r"variants\.empty = \{\}: must name at least 1 entry"),
    ({"bn": {"training": {"trades_bn": "eval"}, "adversaries": ["trades-linf"]}}, ("base", "bn"),
     r"variants\.bn\.adversaries = \['trades-linf'\]: none is in grid\.adversary \(st, pgd-linf\); the variant would have no cells"),
    ({"bn": {"training": {"trades_bn": "eval"}, "adversaries": ["trades"]}}, ("base", "bn"),
     r"variants\.bn\.adversaries\.0 = 'trades': not allowed; allowed: st, pgd-linf, pgd-l2, trades-linf, trades-l2"),
    ({"bn": {"training": {"trades_bn": "eval"}, "adversaries": []}}, ("base", "bn"),
     r"variants\.bn\.adversaries = \[\]: must have at least 1 item"),
    ({"bn": {"training": {"trades_bn": "eval"}, "losses": ["mse"]}}, ("base", "bn"),
     r"variants\.bn\.losses = \['mse'\]: none is in grid\.loss \(ce\); the variant would have no cells"),
    ({"bn": {"training": {"trades_bn": "eval"}, "losses": ["hinge"]}}, ("base", "bn"),
     r"variants\.bn\.losses\.0 = 'hinge': not allowed; allowed: ce, mse, label_smoothing, focal"),
])
def test_a_bad_variant_is_one_clear_line(variants, grid_variants, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_with(variants, grid_variants)
    assert "\n" not in str(info.value)


def test_a_variant_outside_the_grid_is_kept_and_its_name_and_keys_are_still_checked():
    config = config_with({"r10": {"dataset": STEP10}}, ("base",))
    assert config["grid"]["variant"] == ["base"] and config["variants"] == {"r10": {"dataset": STEP10}}
    with pytest.raises(ConfigError, match=r"variants: the name 'R10' is not allowed"):
        config_with({"R10": {"dataset": STEP10}}, ("base",))
    with pytest.raises(ConfigError, match=r"unknown key 'loss' under variants\.r10; allowed: adversaries, dataset, losses, model, training"):
        config_with({"r10": {"loss": {}}}, ("base",))


def test_a_variant_restricted_to_some_adversaries_has_cells_of_those_only():
    config = config_with({"slow": {"training": {"optimizer": {"lr": 0.01}}, "adversaries": ["pgd-linf"]}}, ("base", "slow"))
    assert [(c["adversary"], c["variant"]) for c in grid_cells(config)] == [("st", "base"), ("pgd-linf", "base"), ("pgd-linf", "slow")]
    assert variant_applies(config, "slow", adversary="pgd-linf") and not variant_applies(config, "slow", adversary="st")
    assert variant_applies(config, "base", adversary="st")
    assert stage_slice("train", config, cell=cell("slow", "pgd-linf"))["training"]["optimizer"]["lr"] == 0.01
    with pytest.raises(ValueError, match=r"variant 'slow' has no ce st cells: variants\.slow\.adversaries = \[pgd-linf\]"):
        stage_slice("train", config, cell=cell("slow", "st"))
    # the restriction is no override: the figures' variant groups do not show it
    from ncrobust.tables import variant_groups

    assert variant_groups(config["variants"]) == {"slow": "training.optimizer.lr=0.01"}


def test_a_variant_restricted_to_some_losses_and_adversaries_has_cells_of_both_only():
    raw = {"slow": {"training": {"optimizer": {"lr": 0.01}}, "adversaries": ["pgd-linf"], "losses": ["ce"]}}
    config = config_with(raw, ("base", "slow"))
    config["grid"]["loss"] = ["ce", "mse"]
    cells = [(c["loss"], c["adversary"], c["variant"]) for c in grid_cells(config)]
    assert cells == [("ce", "st", "base"), ("ce", "pgd-linf", "base"), ("ce", "pgd-linf", "slow"),
                     ("mse", "st", "base"), ("mse", "pgd-linf", "base")]
    assert not variant_applies(config, "slow", adversary="pgd-linf", loss="mse")
    with pytest.raises(ValueError, match=r"variant 'slow' has no mse pgd-linf cells: variants\.slow\.losses = \[ce\]"):
        cell_config(config, Cell("digits", "mlp", "mse", "pgd-linf", 1, "slow"))


# ---------------------------------------------------------------------------------- the workflow


@pytest.mark.workflow
@pytest.mark.slow
def test_a_variant_cell_gets_its_own_path_data_and_model(tmp_path):
    config = tiny_config(variants=VARIANTS)
    config["grid"].update(variant=["base", "r10", "r10-nobias"], adversary=["st"])
    path = write_tiny_config(tmp_path, **config)
    out = run_snakemake(tmp_path, "--dry-run", configfile=path).stdout
    assert "results/data/digits/base.pt" in out and "results/data/digits/r10.pt" in out
    assert "results/data/digits/r10-nobias.pt" not in out  # shares r10's file
    for v in ("base", "r10", "r10-nobias"):
        assert f"{cell_dir(adversary='st', variant=v)}/metrics/epoch4.parquet" in out
    run = cell_dir(adversary="st", variant="r10-nobias")
    run_snakemake(tmp_path, f"{run}/checkpoints/epoch0.pt", "results/data/digits/base.pt", configfile=path)
    balanced = torch.load(tmp_path / "results/data/digits/base.pt")["class_counts"]
    skewed = torch.load(tmp_path / "results/data/digits/r10.pt")["class_counts"]
    assert skewed.max() / skewed.min() == pytest.approx(10, rel=0.1) and balanced.max() / balanced.min() < 1.2
    checkpoint = torch.load(tmp_path / run / "checkpoints/epoch0.pt")
    assert checkpoint["cell"]["variant"] == "r10-nobias"
    assert "classifier.weight" in checkpoint["model"] and "classifier.bias" not in checkpoint["model"]


@pytest.mark.workflow
def test_a_variant_restricted_to_an_adversary_schedules_its_cells_only(tmp_path):
    config = tiny_config(variants={"slow": {"training": {"optimizer": {"lr": 0.01}}, "adversaries": ["pgd-linf"]}})
    config["grid"]["variant"] = ["base", "slow"]
    out = run_snakemake(tmp_path, "--dry-run", configfile=write_tiny_config(tmp_path, **config)).stdout
    assert f"{cell_dir(adversary='pgd-linf', variant='slow')}/metrics/epoch4.parquet" in out
    assert "/st/slow/" not in out and f"{cell_dir(adversary='st')}/metrics/epoch4.parquet" in out
