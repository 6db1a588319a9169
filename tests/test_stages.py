"""Config slices: each stage depends on exactly the part of the config that determines its output."""

import copy

import pytest
from workflow_helpers import tiny_config

from ncrobust.cell import ADVERSARIES, Adversary, Cell
from ncrobust.config import validate_config
from ncrobust.stages import (
    EXECUTION_KEYS, EXTERNAL_CELL_STAGES, RESULTS_ONLY_KEYS, STAGES, TRAINED_CELL_STAGES, canonical, cell_config, grid_cells, job_config, merge, stage_slice,
)

ST = Cell("digits", "mlp", "ce", "st", 1)
PGD = Cell("digits", "mlp", "ce", "pgd-linf", 1)
TRADES = Cell("digits", "mlp", "ce", "trades-linf", 1)
CELL_STAGES = list(TRAINED_CELL_STAGES)
RELATED = ["mixup_geometry", "probe", "kernel", "spectra"]  # like robustness: the checkpoint's recipe and threat model, and their own section


def _config(**overrides) -> dict:
    config = tiny_config(**overrides)
    config["grid"]["adversary"] = ["st", "pgd-linf", "trades-linf"]
    config["datasets"]["digits"]["threat"]["l2"] = {"eps": 1.0, "step_size": 0.25, "steps": 3}
    return validate_config(config)


def _slices(config) -> dict:
    out = {("prepare_data", None): stage_slice("prepare_data", config, dataset="digits")}
    for stage in CELL_STAGES:
        for cell in (ST, PGD, TRADES):
            out[stage, cell.adversary] = stage_slice(stage, config, cell=cell)
    return out


def _changed(edit) -> set:
    """(stage, adversary) pairs whose slice changes when ``edit`` is applied to the config."""
    raw = tiny_config()
    raw["grid"]["adversary"] = ["st", "pgd-linf", "trades-linf"]
    raw["datasets"]["digits"]["threat"]["l2"] = {"eps": 1.0, "step_size": 0.25, "steps": 3}
    edited = copy.deepcopy(raw)
    edit(edited)
    before, after = _slices(validate_config(raw)), _slices(validate_config(edited))
    return {key for key in before if repr(before[key]) != repr(after[key])}


def _stages_that_differ(before: dict, after: dict, cell: Cell) -> set:
    """The stages of ``cell`` whose config slice differs between two validated configs."""
    return {stage for stage in CELL_STAGES if repr(stage_slice(stage, before, cell=cell)) != repr(stage_slice(stage, after, cell=cell))}


def _reversed_keys(value):
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    return value


def _all(stages, adversaries=("st", "pgd-linf", "trades-linf")) -> set:
    return {(s, a) for s in stages for a in adversaries}


def _set(path, value):
    def edit(config):
        node = config
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return edit


EDITS = {
    "threads": (_set("threads", 2), set()),
    "device": (_set("device", "auto"), set()),
    "cuda graph": (_set("training.cuda_graph", False), set()),
    "deterministic kernels": (_set("training.deterministic", False), set()),
    "resources": (_set("resources", {"train": {"mem_mb": 9000, "gpu": 1}}), set()),
    "group_training": (_set("group_training", True), set()),
    "mps": (_set("mps", True), set()),
    "results path": (_set("results", "elsewhere"), set()),
    "findings block": (_set("findings", "imbalance"), set()),  # read by the findings rule alone (its params)
    "findings default spelled out": (_set("findings", "default"), set()),
    "default spelled out": (_set("training.optimizer", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}), set()),
    "int for a number": (_set("training.trades_beta", 6), set()),
    "unused l2 threat": (_set("datasets.digits.threat.l2.eps", 2.0), set()),
    "evaluation epochs": (_set("evaluation.epochs", [4]), set()),
    "keep features": (_set("evaluation.keep_features", True), set()),
    "split options": (_set("datasets.digits.options.test_fraction", 0.3), {("prepare_data", None)}),
    "model width": (_set("models.mlp.width", 64), _all(CELL_STAGES)),
    "linf eps": (
        _set("datasets.digits.threat.linf.eps", 0.05),
        _all(["train"], ["pgd-linf", "trades-linf"]) | _all(["evaluate", "robustness", *RELATED]),
    ),
    "st norm": (_set("datasets.digits.norm", "l2"), _all(["evaluate", "robustness", *RELATED], ["st"])),
    "trades beta": (_set("training.trades_beta", 3.0), _all(["train", "evaluate", "robustness", *RELATED], ["trades-linf"])),
    "training batch size": (_set("training.batch_size", 64), _all(["train", "evaluate", "robustness", *RELATED])),
    "precision": (_set("precision", "bf16"), _all(["train", "evaluate", "robustness", *RELATED])),
    "evaluation batch size": (_set("evaluation.batch_size", 250), _all(["evaluate", "robustness"])),
    # the strong evaluation attacks with the evaluation's PGD-10: its precision and its overrides are in both slices
    "bf16 evaluation attacks": (_set("evaluation.attack_precision", "bf16"), _all(["evaluate", "robustness"])),
    "fp32 evaluation attacks spelled out": (_set("evaluation.attack_precision", "fp32"), set()),
    "simplex projection sample": (_set("evaluation.projection_points", 100), _all(["evaluate"])),
    "simplex projection default spelled out": (_set("evaluation.projection_points", 300), set()),
    "pgd overrides": (_set("evaluation.perturbations", {"clean": {}, "pgd": {"steps": 7}}), _all(["evaluate", "robustness"])),
    "perturbations but pgd": (_set("evaluation.perturbations", {"clean": {}, "pgd": {}, "sign": {}}), _all(["evaluate"])),
    "strong samples": (_set("evaluation.strong", {"max_samples": 50}), _all(["robustness"])),
    "unused loss options": (_set("losses", {"focal": {"gamma": 1.0}}), set()),
    "loss defaults spelled out": (_set("losses", {"focal": {"gamma": 2.0}, "label_smoothing": {"smoothing": 0.1}}), set()),
    "extra norm for st": (_set("evaluation.norms", ["linf", "l2"]), {("evaluate", "st")}),
    "training-time collapse": (_set("training.track_collapse", True), _all(["train", "evaluate", "robustness", *RELATED])),
    # adds the train jobs' epoch_metrics files, never changes a checkpoint: the train slice only, and only when on
    "per-epoch measurement": (_set("training.epoch_measure", True), _all(["train"])),
    "per-epoch measurement off spelled out": (_set("training.epoch_measure", False), set()),
    "authors' TRADES BN": (_set("training.trades_bn", "eval"), _all(["train", "evaluate", "robustness", *RELATED], ["trades-linf"])),
    "authors' clean BN pass": (_set("training.pgd_clean_bn_pass", True), _all(["train", "evaluate", "robustness", *RELATED], ["pgd-linf"])),
    "mixup training": (_set("training.mixup", {"alpha": 0.4}), _all(["train", "evaluate", "robustness", *RELATED])),
    "mixup geometry": (_set("evaluation.mixup_geometry", {"enabled": True, "pairs": [[1, 2]]}), _all(["mixup_geometry"])),
    "probe": (_set("probe", {"enabled": True, "lambdas": [1.0]}), _all(["probe"])),
    "probe defaults spelled out": (_set("probe", {"layer": "penultimate", "weight_decay": 5e-3}), set()),
    "cross-entropy attacks (ce cells: the same attack)": (_set("evaluation.attack_loss", "ce"), set()),
    "authors' TRADES l2 step (no trades-l2 cell here)": (_set("training.trades_l2_step", "authors"), set()),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_changes_exactly_the_slices_it_must(name):
    edit, expected = EDITS[name]
    assert _changed(edit) == expected


def test_key_order_does_not_matter():
    config = _config()
    assert repr(_slices(_reversed_keys(config))) == repr(_slices(config))


def test_canonical_sorts_keys_at_every_level_and_keeps_list_order():
    assert list(canonical({"b": 1, "a": {"d": 2, "c": (3, 1)}})) == ["a", "b"]
    assert canonical({"b": 1, "a": {"d": 2, "c": (3, 1)}})["a"] == {"c": [3, 1], "d": 2}
    assert repr(canonical({"y": 1, "x": 2})) == "{'x': 2, 'y': 1}"


def test_schema_numbers_become_floats_and_integers_stay():
    config = tiny_config()
    del config["evaluation"]["strong"]  # left out: its default max_samples (null) must stay None
    config["datasets"]["digits"]["threat"]["linf"] = {"eps": 1, "step_size": 1, "steps": 3}
    config["training"]["schedule"] = {"milestones": [0, 1], "factors": [1, 2]}
    v = validate_config(config)
    linf = v["datasets"]["digits"]["threat"]["linf"]
    assert (type(linf["eps"]), type(linf["step_size"]), type(linf["steps"])) == (float, float, int)
    assert v["training"]["schedule"]["factors"] == [1.0, 2.0] and all(type(f) is float for f in v["training"]["schedule"]["factors"])
    assert type(v["training"]["epochs"]) is int and type(v["evaluation"]["batch_size"]) is int
    assert v["evaluation"]["strong"]["max_samples"] is None


def test_slices_keep_the_config_nesting_and_leave_out_execution_settings():
    config = _config()
    s = stage_slice("train", config, cell=PGD)
    assert s["training"]["optimizer"] == config["training"]["optimizer"]
    assert s["datasets"]["digits"]["threat"] == {"linf": config["datasets"]["digits"]["threat"]["linf"]}
    assert "checkpoints" not in s["training"] and "trades_beta" not in s["training"]
    for stage, adversary in _slices(config):
        assert not set(EXECUTION_KEYS) & set(_slices(config)[stage, adversary])
        assert not set(RESULTS_ONLY_KEYS) & set(_slices(config)[stage, adversary])


def _bn_eval(config: dict, only=("trades-linf",)) -> dict:
    """``config`` with the variant of Su et al.'s TRADES BatchNorm, restricted to ``only``."""
    config = copy.deepcopy(config)
    config["variants"] = {"bn-eval": {"training": {"trades_bn": "eval"}, "adversaries": list(only)}}
    config["grid"]["variant"] = ["base", "bn-eval"]
    return config


def test_a_variant_restricted_to_trades_has_trades_cells_only_with_the_slices_of_its_override():
    raw = tiny_config()
    raw["grid"]["adversary"] = ["st", "pgd-linf", "trades-linf"]
    config = validate_config(_bn_eval(raw))
    cells = [(c["adversary"], c["variant"]) for c in grid_cells(config)]
    assert cells == [("st", "base"), ("pgd-linf", "base"), ("trades-linf", "base"), ("trades-linf", "bn-eval")]
    # the variant's TRADES cell computes what the config with trades_bn: eval computes; base cells are untouched
    eval_config = validate_config(merge(raw, {"training": {"trades_bn": "eval"}}))
    plain = validate_config(raw)
    variant_trades = Cell("digits", "mlp", "ce", "trades-linf", 1, "bn-eval")
    for stage in CELL_STAGES:
        assert stage_slice(stage, config, cell=variant_trades) == stage_slice(stage, eval_config, cell=TRADES)
        for cell in (ST, PGD, TRADES):
            assert stage_slice(stage, config, cell=cell) == stage_slice(stage, plain, cell=cell)
    # a path of a cell the variant leaves out is an error naming the variant's adversaries
    with pytest.raises(ValueError, match=r"variant 'bn-eval' has no ce st cells: variants\.bn-eval\.adversaries = \[trades-linf\]"):
        cell_config(config, Cell("digits", "mlp", "ce", "st", 1, "bn-eval"))


def test_grid_cells_is_the_product_of_the_axes_without_a_restriction():
    config = validate_config(_bn_eval(tiny_config(), only=("st", "pgd-linf")))
    raw = tiny_config()
    expected = [dict(dataset="digits", model="mlp", loss="ce", adversary=a, variant=v, seed=1)
                for a in raw["grid"]["adversary"] for v in ("base", "bn-eval")]
    assert sorted(map(repr, grid_cells(config))) == sorted(map(repr, expected))


def test_job_config_is_the_slice_plus_execution_settings_and_inert_keys():
    from ncrobust.jobs.pipeline import recipe

    config = _config(threads=3, device="cpu")
    config["training"]["cuda_graph"] = False
    for stage in CELL_STAGES:
        for cell in (ST, PGD, TRADES):
            sliced = stage_slice(stage, config, cell=cell)
            job = job_config(stage, sliced, config, cell=cell)
            assert job["threads"] == 3 and job["device"] == "cpu"
            assert job["training"]["cuda_graph"] is False and "cuda_graph" not in sliced.get("training", {})
            assert merge(job, sliced) == job  # every value of the slice reaches the job unchanged
            if stage in ("init_model", "train"):  # the pipeline builds the cell's recipe from it
                assert recipe(job, cell).trades_beta == config["training"]["trades_beta"]
    data = job_config("prepare_data", stage_slice("prepare_data", config, dataset="digits"), config)
    assert data["datasets"]["digits"]["options"] == config["datasets"]["digits"]["options"]
    assert data["data_root"] == config["data_root"]


def test_unknown_stage_and_missing_cell_are_errors():
    config = _config()
    with pytest.raises(ValueError, match="unknown stage 'aggregate'"):
        stage_slice("aggregate", config, cell=ST)
    with pytest.raises(ValueError, match="stage train needs cell="):
        stage_slice("train", config)
    with pytest.raises(ValueError, match="stage prepare_data needs dataset="):
        stage_slice("prepare_data", config)


def test_the_simplex_projection_sample_reaches_the_evaluation_through_the_slice():
    """``evaluation.projection_points`` is read from the evaluate job's config (its slice plus
    execution settings), not from a default of the library's."""
    from ncrobust.jobs.experiment import evaluation_plan

    raw = tiny_config()
    raw["evaluation"]["projection_points"] = 40
    config = validate_config(raw)
    for cell in (ST, PGD, TRADES):
        job = job_config("evaluate", stage_slice("evaluate", config, cell=cell), config, cell=cell)
        assert evaluation_plan(job, cell).projection_points == 40
    assert evaluation_plan(_config(), ST).projection_points == 300


MSE_CELLS = [Cell("digits", "mlp", "mse", adversary, 1) for adversary in ("st", "pgd-linf", "trades-linf")]


def test_the_attack_loss_is_in_the_evaluate_and_robustness_slices_of_a_non_ce_cell():
    """``evaluation.attack_loss: ce`` reruns an mse cell's evaluate and robustness jobs, nothing
    else; writing out the default reruns nothing; a ce cell's slices never hold the key."""
    raw = tiny_config()
    for value, changed in (("ce", {"evaluate", "robustness"}), ("own", set())):
        edited = copy.deepcopy(raw)
        edited["evaluation"]["attack_loss"] = value
        before, after = validate_config(raw), validate_config(edited)
        for cell in MSE_CELLS:
            differs = _stages_that_differ(before, after, cell)
            assert differs == changed, (value, cell.adversary)
    for cell in (ST, PGD, TRADES):
        assert "attack_loss" not in stage_slice("evaluate", validate_config(raw), cell=cell)["evaluation"]


def test_attack_loss_ce_changes_the_loss_that_an_mse_cells_attacks_ascend():
    """Through each job's own config (slice plus execution settings): the evaluation plan's and the
    robustness stage's attack loss is the cell's own by default and cross-entropy with ``ce``;
    a ce cell reads no key (its slice has none)."""
    from ncrobust import losses
    from ncrobust.jobs.experiment import attack_loss, evaluation_plan

    raw = tiny_config()
    raw["evaluation"]["attack_loss"] = "ce"
    for config, want in ((validate_config(tiny_config()), ("mse", losses.mse)), (validate_config(raw), ("ce", losses.cross_entropy))):
        for cell in MSE_CELLS:
            for stage in ("evaluate", "robustness"):
                job = job_config(stage, stage_slice(stage, config, cell=cell), config, cell=cell)
                assert attack_loss(job, cell) == want
            job = job_config("evaluate", stage_slice("evaluate", config, cell=cell), config, cell=cell)
            assert evaluation_plan(job, cell).attack_loss is want[1]
        for cell in (ST, PGD, TRADES):
            job = job_config("evaluate", stage_slice("evaluate", config, cell=cell), config, cell=cell)
            assert attack_loss(job, cell) == ("ce", losses.cross_entropy)


def test_the_trades_l2_step_is_in_the_slices_of_trades_l2_cells_only():
    """``training.trades_l2_step`` reruns a ``trades-l2`` cell's training and everything after it,
    no other cell's; the default written out reruns nothing; every job reads it from its own config."""
    from ncrobust.jobs.experiment import evaluation_plan
    from ncrobust.jobs.pipeline import recipe

    raw = tiny_config()
    raw["grid"]["adversary"] = ["st", "pgd-l2", "trades-linf", "trades-l2"]
    raw["datasets"]["digits"]["threat"]["l2"] = {"eps": 1.0, "step_size": 0.25, "steps": 3}
    cells = [Cell("digits", "mlp", "ce", adversary, 1) for adversary in raw["grid"]["adversary"]]
    for value, changed in (("authors", {"train", "evaluate", "robustness", *RELATED}), ("threat", set())):
        edited = copy.deepcopy(raw)
        edited["training"]["trades_l2_step"] = value
        before, after = validate_config(raw), validate_config(edited)
        for cell in cells:
            differs = _stages_that_differ(before, after, cell)
            assert differs == (changed if cell.adversary == "trades-l2" else set()), (value, cell.adversary)
        for cell in cells:
            for stage in ("init_model", "train"):
                job = job_config(stage, stage_slice(stage, after, cell=cell), after, cell=cell)
                assert recipe(job, cell).trades_l2_step == value
            job = job_config("evaluate", stage_slice("evaluate", after, cell=cell), after, cell=cell)
            assert evaluation_plan(job, cell).trades_l2_step == (value if cell.adversary == "trades-l2" else "threat")


def test_an_adversary_name_parses_to_its_kind_and_norm_and_back():
    assert [Adversary.parse(name) for name in ADVERSARIES] == [
        Adversary("st"), Adversary("pgd", "linf"), Adversary("pgd", "l2"), Adversary("trades", "linf"), Adversary("trades", "l2"),
    ]
    assert all(Adversary.parse(name).name == name for name in ADVERSARIES)
    assert TRADES.parsed_adversary == Adversary("trades", "linf") and ST.parsed_adversary.norm is None
    with pytest.raises(ValueError, match="unknown adversary 'pgd-l1'; allowed: st, pgd-linf, pgd-l2, trades-linf, trades-l2"):
        Adversary.parse("pgd-l1")
    for kind, norm in (("st", "linf"), ("pgd", None), ("fgsm", "linf")):
        with pytest.raises(ValueError, match="no adversary of kind"):
            Adversary(kind, norm)


# ------------------------------------------------------------------ lineage: stranded intermediate files
def test_a_missing_source_with_an_existing_product_is_stranded_and_the_refusal_names_its_rebuild():
    from ncrobust.lineage import cell_sources, merged, rebuild_alone, stranded

    run, data = "R", "D.pt"
    sources = cell_sources(run, data, [0, 2, 4], [0, 2, 4], robustness=True)
    assert sources[data] == ["R/checkpoints/epoch0.pt"]
    assert sources["R/checkpoints/epoch2.pt"] == ["R/checkpoints/epoch4.pt", "R/metrics/epoch2.parquet", "R/projection/epoch2.parquet"]
    assert sources["R/checkpoints/epoch4.pt"] == ["R/metrics/epoch4.parquet", "R/projection/epoch4.parquet", "R/robustness/epoch4.parquet"]
    assert merged(sources, cell_sources("S", data, [0, 4], [4], robustness=False))[data] == ["R/checkpoints/epoch0.pt", "S/checkpoints/epoch0.pt"]
    present = {"R/checkpoints/epoch0.pt", "R/checkpoints/epoch4.pt", "R/metrics/epoch2.parquet"}
    assert stranded(sources, present.__contains__) == [(data, "R/checkpoints/epoch0.pt"), ("R/checkpoints/epoch2.pt", "R/checkpoints/epoch4.pt")]
    assert stranded(sources, lambda p: False) == []  # nothing made yet: nothing stranded
    line = rebuild_alone(data, "R/checkpoints/epoch0.pt")
    assert "\n" not in line and line.endswith("snakemake --cores 1 D.pt") and line.startswith("D.pt is missing")


def test_archive_damage_names_a_truncated_torch_file_and_passes_a_whole_one(tmp_path):
    import torch

    from ncrobust.io import archive_damage, save_torch

    good = tmp_path / "a.pt"
    save_torch({"w": torch.ones(3)}, good)
    assert archive_damage(good) is None
    bad = tmp_path / "b.pt"
    bad.write_bytes(good.read_bytes()[:50])
    assert archive_damage(bad) == "unreadable or corrupt: not a PyTorch checkpoint archive (50 bytes: truncated or overwritten)"
    # the same object, saved twice under other names: the same bytes (what the rerun checksums compare)
    again = tmp_path / "c.pt"
    save_torch({"w": torch.ones(3)}, again)
    assert again.read_bytes() == good.read_bytes()


def test_the_imbalance_figure_is_drawn_only_when_a_cell_has_minority_classes():
    from ncrobust.columns import FIGURES
    from ncrobust.stages import drawn_figures

    balanced = _config()
    assert drawn_figures(balanced) == [name for name in FIGURES if name != "imbalance"]
    skewed = copy.deepcopy(balanced)
    skewed["variants"] = {"r10": {"dataset": {"imbalance": {"profile": "step", "ratio": 10}}}}
    skewed["grid"]["variant"] = ["base", "r10"]
    assert drawn_figures(skewed) == FIGURES
    skewed["variants"]["r10"]["dataset"]["imbalance"]["ratio"] = 1.5  # no class has half the largest's samples
    assert "imbalance" not in drawn_figures(skewed)
    skewed["grid"]["variant"] = ["base"]  # the base options themselves
    skewed["datasets"]["digits"]["options"]["imbalance"] = {"profile": "exponential", "ratio": 4}
    assert drawn_figures(skewed) == FIGURES


def test_an_external_cells_slices_hold_its_entry_not_the_training_recipe(tmp_path):
    """An external network's stages read its entry (but its path: the file is the import's input)
    and its loss's options in place of the recipe: a training edit changes none of them, an edit of
    its entry changes all of them, an edit of another entry none, and it has no init or train stage."""
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"")
    entries = {"net_a": {"path": "a.pt", "architecture": "mlp", "dataset": "digits"},
               "net_b": {"path": "b.pt", "architecture": "mlp", "dataset": "digits", "adversary": "pgd-linf"}}

    def config(edit=lambda c: None):
        raw = tiny_config(external=copy.deepcopy(entries))
        edit(raw)
        return validate_config(raw, base_dir=tmp_path)

    cell = Cell("digits", "net_a", "ce", "st", 0)
    base = config()
    sliced = stage_slice("import_network", base, cell=cell)
    assert sliced["external"] == {"net_a": {k: v for k, v in base["external"]["net_a"].items() if k != "path"}}
    assert "training" not in stage_slice("evaluate", base, cell=cell)

    def changed(edit):
        after = config(edit)
        return {s for s in EXTERNAL_CELL_STAGES if repr(stage_slice(s, base, cell=cell)) != repr(stage_slice(s, after, cell=cell))}

    assert changed(lambda c: c["training"].update(epochs=6, checkpoints=[3, 6])) == set()
    assert changed(lambda c: c["external"]["net_a"].update(taps=["layer1"])) == set(EXTERNAL_CELL_STAGES)
    assert changed(lambda c: c["external"]["net_b"].update(taps=["layer1"])) == set()
    assert changed(lambda c: c["external"]["net_a"].update(path="b.pt")) == set()  # the file's content decides
    assert changed(lambda c: c["evaluation"].update(batch_size=250)) == {"evaluate", "robustness"}
    for stage in ("init_model", "train"):
        with pytest.raises(ValueError, match="external network"):
            stage_slice(stage, base, cell=cell)
    with pytest.raises(ValueError, match="no external network"):
        stage_slice("import_network", base, cell=ST)
