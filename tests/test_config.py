"""Bad configs stop at parse time with one line naming the key, the value and what is allowed."""

import copy
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO_ROOT, run_snakemake, tiny_config, write_tiny_config

from ncrobust.config import ConfigError, load_config_file, typed_overrides, validate_config
from ncrobust.config import main as config_main
from ncrobust.stages import merge

_DELETE = object()


def _with(path: str, value):
    config = tiny_config()
    keys = path.split(".")
    node = config
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return config


BAD = [
    ("grid.dataset", ["svhn"], r"grid\.dataset\.0 = 'svhn': not allowed; allowed: digits"),
    ("grid.model", ["resnet50"], r"grid\.model\.0 = 'resnet50': not allowed"),
    ("grid.loss", ["hinge"], r"grid\.loss\.0 = 'hinge': not allowed"),
    ("grid.adversary", ["fgsm"], r"grid\.adversary\.0 = 'fgsm': not allowed"),
    ("grid.seed", [1, 1], r"grid\.seed = \[1, 1\]: duplicate entries"),
    ("grid.adversary", [], r"grid\.adversary = \[\]: must have at least 1"),
    ("training.epochs", 0, r"training\.epochs = 0: must be >= 1"),
    ("training.epochs", "ten", r"training\.epochs = 'ten': must be of type integer"),
    ("training.batch_size", -5, r"training\.batch_size = -5: must be >= 1"),
    ("training.checkpoints", [4, 2], r"training\.checkpoints = \[4, 2\]: must be increasing"),
    ("training.checkpoints", [2, 9], r"must lie in 1\.\.4 and end at training\.epochs = 4"),
    ("training.checkpoints", _DELETE, r"missing key training\.checkpoints"),
    ("training.typo_key", 1, r"unknown key 'typo_key' under training; allowed: "),
    ("datasets.digits.threat", {"linf": {"eps": -0.1, "step_size": 0.1, "steps": 3}}, r"datasets\.digits\.threat\.linf\.eps = -0\.1: must be > 0"),
    ("datasets.digits.threat", {"linf": {"eps": 0.1, "step_size": 0.1, "steps": 0}}, r"steps = 0: must be >= 1"),
    ("datasets.digits.threat", {"l3": {"eps": 0.1, "step_size": 0.1, "steps": 1}}, r"unknown key 'l3' under datasets\.digits\.threat"),
    ("evaluation.perturbations", {"clean": {}, "fgsm": {}}, r"evaluation\.perturbations = 'fgsm': not allowed; allowed: clean, pgd, pgd-targeted"),
    ("evaluation.splits", ["val"], r"evaluation\.splits\.0 = 'val': not allowed; allowed: train, test"),
    ("device", "tpu", r"device = 'tpu': not allowed; allowed: auto, cpu, cuda"),
    ("training.optimizer", {"lr": -0.1}, r"training\.optimizer\.lr = -0\.1: must be > 0"),
    ("training.optimizer", {"momentum": 1.5}, r"training\.optimizer\.momentum = 1\.5: must be <= 1"),
    ("training.trades_beta", -1, r"training\.trades_beta = -1: must be >= 0"),
    ("training.schedule", {"milestones": [0.5], "factors": [0.1, 0.01]}, r"training\.schedule\.factors = \[0\.1, 0\.01\]: needs one factor per milestone"),
    ("evaluation.perturbations", {"clean": {}, "pgd": {"restarts": 0}}, r"evaluation\.perturbations\.pgd\.restarts = 0: must be >= 1"),
    ("evaluation.epochs", [0, 3], r"evaluation\.epochs: 3 is not a checkpoint epoch; allowed: \[0, 2, 4\]"),
    ("evaluation.attack_precision", "fp16", r"evaluation\.attack_precision = 'fp16': not allowed; allowed: fp32, bf16"),
    ("evaluation.feature_dtype", "int8", r"evaluation\.feature_dtype = 'int8': not allowed; allowed: float16, bfloat16, float32"),
    ("evaluation.strong", {"attacks": ["fab"]}, r"evaluation\.strong\.attacks\.0 = 'fab': not allowed; allowed: pgd-strong, apgd-ce, apgd-t"),
    ("resources", {"train": {"gpu": -1}}, r"resources\.train\.gpu = -1: must be >= 0"),
    ("threads", 0, r"threads = 0: must be >= 1"),
    ("grid.seed", ["one"], r"grid\.seed\.0 = 'one': must be of type integer"),
    ("grid", _DELETE, r"missing key grid"),
    ("datasets", {}, r"grid\.dataset = 'digits': no entry datasets\.digits"),
    # what passes a schema's ranges: NaN and infinity (every comparison with NaN is false)
    ("datasets.digits.threat", {"linf": {"eps": float("nan"), "step_size": 0.1, "steps": 3}}, r"datasets\.digits\.threat\.linf\.eps = nan: must be a finite number"),
    ("training.optimizer", {"lr": float("inf")}, r"training\.optimizer\.lr = inf: must be a finite number"),
    ("training.schedule", {"milestones": [0.5], "factors": [float("nan")]}, r"training\.schedule\.factors\.0 = nan: must be a finite number"),
    # what passes a schema's ranges but fails in torch or the random generators: integers beyond 64 bits
    ("grid.seed", [2**64], r"grid\.seed\.0 = 18446744073709551616: must lie in -9223372036854775808\.\.9223372036854775807"),
    ("datasets.digits.options", {"split_seed": 2**63}, r"datasets\.digits\.options\.split_seed = 9223372036854775808: must lie in"),
    ("training.epochs", 2**70, r"training\.epochs = 1180591620717411303424: must lie in"),
    # empty paths (results '' would write under /runs), and a thread count no machine has
    ("results", "", r"results = '': '' should be non-empty"),
    ("data_root", "", r"data_root = '': '' should be non-empty"),
    ("threads", 10**6, r"threads = 1000000: must be <= 1024"),
    # model options, against the constructors
    ("models.mlp", {"depth": 0, "width": 32}, r"models\.mlp = \{'depth': 0, 'width': 32\}: mlp needs depth >= 1"),
    ("models.mlp", {"dept": 3}, r"models\.mlp: unknown option 'dept'; allowed: depth, width, bias"),
    ("models.mlp", {"depth": "3"}, r"models\.mlp = \{'depth': '3'\}: "),
    ("models.mpl", {"depth": 3}, r"models\.mpl: unknown model; known: cnn1d, convnet, deep_linear, mlp, "),
    # loader options: ranges from the schema, names from the loader
    ("datasets.digits.options", {"test_fraction": 1.5}, r"datasets\.digits\.options\.test_fraction = 1\.5: must be < 1"),
    ("datasets.digits.options", {"train_per_class": 0}, r"datasets\.digits\.options\.train_per_class = 0: must be >= 1"),
    ("datasets.digits.options", {"image_size": 16}, r"datasets\.digits\.options: unknown option 'image_size'; allowed: test_fraction, "),
    # the related stages, before any training
    ("evaluation.mixup_geometry", {"enabled": True, "pairs": [[3, 10]]}, r"evaluation\.mixup_geometry\.pairs: \[3, 10\] is not a pair of two classes of digits \(0\.\.9\)"),
    ("evaluation.mixup_geometry", {"enabled": True, "pairs": [[4, 4]]}, r"\[4, 4\] is not a pair of two classes"),
    ("probe", {"enabled": True, "layer": "layer9"}, r"probe\.layer = 'layer9': not a tap of mlp; its taps: layer1, penultimate"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[0] + ":" + str(i) for i, b in enumerate(BAD)])
def test_bad_config_is_one_clear_line(path, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_config(_with(path, value))
    assert "\n" not in str(info.value)


def test_missing_threat_model_for_an_adversary():
    config = tiny_config()
    config["grid"]["adversary"] = ["pgd-l2"]
    with pytest.raises(ConfigError, match=r"datasets\.digits\.threat has no 'l2' threat model"):
        validate_config(config)


def test_real_dataset_needs_an_existing_data_root(tmp_path):
    config = tiny_config(data_root=str(tmp_path / "nowhere"))
    config["grid"]["dataset"] = ["cifar10"]
    config["datasets"]["cifar10"] = copy.deepcopy(config["datasets"]["digits"])
    with pytest.raises(ConfigError, match=r"data_root = '.*nowhere': directory does not exist; dataset 'cifar10' needs it"):
        validate_config(config)


def test_the_largest_seed_is_accepted_and_seeds_torch_and_numpy():
    import numpy as np
    import torch

    from ncrobust.config import INT64

    config = tiny_config()
    config["grid"]["seed"] = [INT64[1]]
    assert validate_config(config)["grid"]["seed"] == [INT64[1]]
    torch.manual_seed(INT64[1])
    torch.Generator().manual_seed(INT64[1])
    np.random.default_rng(INT64[1])


@pytest.mark.parametrize("dataset,staged,lacks", [
    ("cifar10", [], r"cifar10: .*/cifar-10-batches-py lacks data_batch_1, data_batch_2, data_batch_3, data_batch_4 and 3 more; "
                    r"set data_root to a directory holding cifar-10-batches-py/"),
    ("cifar10", ["cifar-10-batches-py/data_batch_1"], r"cifar10: .* lacks data_batch_2, data_batch_3, data_batch_4, data_batch_5 and 2 more"),
    ("mnist", ["MNIST/raw/train-images-idx3-ubyte.gz", "MNIST/raw/train-labels-idx1-ubyte"],
     r"mnist: .*/MNIST/raw lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; set data_root to a directory holding MNIST/raw/"),
    ("imagenette", ["imagenette2-160/train/n01440764"], r"imagenette: .*/imagenette2-160 lacks train/n02102040, .* and 15 more;"),
])
def test_an_empty_or_partial_data_root_is_named_before_any_job(tmp_path, dataset, staged, lacks):
    """What the staged layout lacks, and how to stage it, in one line at config time (not when
    prepare_data runs); a complete layout passes (its content is the loader's to check)."""
    for path in staged:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).mkdir() if dataset == "imagenette" else (tmp_path / path).write_bytes(b"")
    config = tiny_config(data_root=str(tmp_path))
    config["grid"]["dataset"] = [dataset]
    config["datasets"][dataset] = copy.deepcopy(config["datasets"]["digits"])
    config["datasets"][dataset]["options"] = {}
    with pytest.raises(ConfigError, match=rf"^data_root = '{tmp_path}': {lacks}") as info:
        validate_config(config)
    assert "\n" not in str(info.value)
    from ncrobust.data import staged_layout

    layout = staged_layout(dataset)
    for name in layout.files:
        (tmp_path / layout.folder / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / layout.folder / name).write_bytes(b"")
    for name in layout.folders:
        (tmp_path / layout.folder / name).mkdir(parents=True, exist_ok=True)
    validate_config(config)


def test_defaults_are_filled_and_the_shipped_configs_are_valid():
    config = validate_config(tiny_config())
    assert config["training"]["optimizer"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}
    assert config["evaluation"]["layerwise"] is True
    shipped = validate_config(load_config_file(REPO_ROOT / "config" / "config.yaml"))
    assert shipped["grid"]["dataset"] == ["digits"]


@pytest.mark.workflow
@pytest.mark.slow
def test_snakemake_stops_before_any_job_with_one_line(tmp_path):
    config = write_tiny_config(tmp_path, device="tpu")
    proc = run_snakemake(tmp_path, "-n", configfile=config, check=False)
    assert proc.returncode != 0
    assert "ncrobust: config error: device = 'tpu': not allowed; allowed: auto, cpu, cuda" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()


def test_a_convnet_too_deep_for_the_datasets_images(tmp_path):
    config = tiny_config(models={"convnet": {"channels": [8, 8, 8, 8, 8]}})
    config["grid"]["model"] = ["convnet"]
    with pytest.raises(ConfigError, match=r"models\.convnet = .*5 blocks pool a 8px image to nothing \(for 1x8x8 images\)"):
        validate_config(config)


def test_results_under_a_regular_file(tmp_path):
    (tmp_path / "results").write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"results = 'results/run1': {tmp_path}/results is a regular file; choose another"):
        validate_config(tiny_config(results="results/run1"), base_dir=tmp_path)


def test_results_in_an_unwritable_directory(tmp_path, monkeypatch):
    """(Simulated: the tests may run as root, who can write anywhere.)"""
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=rf"results = 'out': {tmp_path} is not writable by this user"):
        validate_config(tiny_config(results="out"), base_dir=tmp_path)


def test_config_files_missing_or_broken_are_one_line_with_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/nope\.yaml: config file not found"):
        load_config_file(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("results: r\ngrid: {dataset: [digits\n  model: [mlp]\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:3:\d+: YAML syntax error: ") as info:
        load_config_file(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config_file(listing)


def test_command_line_overrides_are_typed_and_deep_merged():
    """What Snakemake hands over for --config training='{"epochs": 3, "checkpoints": [3]}'."""
    overrides = typed_overrides({"training": {"epochs": "3", "checkpoints": ["3"], "optimizer": {"lr": "1e-3"}}, "threads": 2})
    assert overrides == {"training": {"epochs": 3, "checkpoints": [3], "optimizer": {"lr": 0.001}}, "threads": 2}
    config = validate_config(merge(tiny_config(), overrides))
    assert config["training"]["epochs"] == 3 and config["training"]["batch_size"] == 128  # kept from the file
    assert typed_overrides({"results": {"name": "run1", "flag": "true", "nothing": "null"}}) == {"results": {"name": "run1", "flag": True, "nothing": None}}


def test_check_config_files_without_snakemake(tmp_path, capsys):
    """`python -m ncrobust.config FILE...`: the files merged in order, one line per verdict."""
    good = write_tiny_config(tmp_path)
    assert config_main([str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: valid"
    bad = tmp_path / "nan.yaml"
    bad.write_text("datasets: {digits: {threat: {linf: {eps: .nan}}}}\n")
    assert config_main([str(good), str(bad)]) == 1
    assert capsys.readouterr().err.strip() == "ncrobust: config error: datasets.digits.threat.linf.eps = nan: must be a finite number"


SNAKEMAKE_CONFIG_ERRORS = [
    ("eps", {"datasets": {"digits": {"threat": {"linf": {"eps": float("nan"), "step_size": 0.05, "steps": 3}}}}}, "datasets.digits.threat.linf.eps = nan: must be a finite number"),
    ("depth", {"models": {"mlp": {"depth": 0}}}, "models.mlp = {'depth': 0, 'width': 32}: mlp needs depth >= 1"),
    ("test_fraction", {"datasets": {"digits": {"options": {"test_fraction": 1.5}}}}, "datasets.digits.options.test_fraction = 1.5: must be < 1"),
    ("results", {"results": "blocker/results"}, "/blocker is a regular file; choose another results directory"),
]


@pytest.mark.workflow
@pytest.mark.slow
@pytest.mark.parametrize("name,override,message", SNAKEMAKE_CONFIG_ERRORS, ids=[e[0] for e in SNAKEMAKE_CONFIG_ERRORS])
def test_snakemake_dry_run_stops_on_what_used_to_fail_in_a_job(tmp_path, name, override, message):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    config = write_tiny_config(tmp_path)
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    proc = run_snakemake(tmp_path, "-n", configfile=config, extra_configfiles=[str(path)], check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
@pytest.mark.slow
def test_nested_command_line_overrides_work_in_snakemake(tmp_path):
    """`--config training='{...}'` is deep-merged onto the config file with numbers as numbers: a
    nested value replaces only the keys it names (datasets.digits keeps its threat models)."""
    config = write_tiny_config(tmp_path)
    proc = run_snakemake(
        tmp_path, "-n", "--config", 'training={"epochs": 3, "checkpoints": [3]}',
        'datasets={"digits": {"options": {"test_fraction": 0.5}}}', configfile=config, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "checkpoints/epoch3.pt" in out and "checkpoints/epoch4.pt" not in out


def _copy_of_the_workflow(tmp_path: Path) -> Path:
    """The workflow (workflow/Snakefile and the rest of workflow/) with src/ and config/, to break the embedded
    default config."""
    import shutil

    copy_root = tmp_path / "repo"
    for name in ("workflow", "src", "config"):
        shutil.copytree(REPO_ROOT / name, copy_root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy_root


@pytest.mark.workflow
@pytest.mark.slow
def test_the_default_config_missing_or_broken_is_one_line(tmp_path):
    import subprocess

    from workflow_helpers import SNAKEMAKE

    repo = _copy_of_the_workflow(tmp_path)
    default = repo / "config" / "config.yaml"
    run = lambda: subprocess.run([SNAKEMAKE, "-n", "--cores", "1", "--snakefile", str(repo / "workflow" / "Snakefile"), "--directory", str(tmp_path / "work")],
                                 capture_output=True, text=True, timeout=300)
    default.write_text(default.read_text().replace("training:\n", "training:\n  epochs: [\n", 1))
    proc = run()
    assert proc.returncode != 0
    assert f"ncrobust: config error: {default}:" in proc.stderr and "YAML syntax error" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    default.unlink()
    proc = run()
    assert proc.returncode != 0
    assert f"ncrobust: config error: {default}: config file not found" in proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# the schema's enums are the library's registries (the config code stays torch-free, so the
# schema names them by hand: these tests keep the two lists one)


def _schema_node(path: str) -> dict:
    """The schema node at ``path``: property names joined by dots, ``[]`` for a list's items,
    ``*`` for the value of any name (``additionalProperties``)."""
    from ncrobust.config import load_schema

    schema = load_schema()
    node = schema
    for key in path.split("."):
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].split("/")[-1]]
        node = node["items"] if key == "[]" else node["additionalProperties"] if key == "*" else node["properties"][key]
    return schema["definitions"][node["$ref"].split("/")[-1]] if "$ref" in node else node


ENUM_REGISTRIES = {  # schema path -> the library's name for the same list
    "grid.dataset.[]": "ncrobust.data.list_datasets",
    "datasets": "ncrobust.data.list_datasets",
    "grid.model.[]": "ncrobust.models.list_models",
    "grid.loss.[]": "ncrobust.losses.LOSSES",
    "grid.adversary.[]": "ncrobust.cell.ADVERSARIES",
    "evaluation.perturbations": "ncrobust.attacks.PERTURBATIONS",
    "evaluation.strong.attacks.[]": "ncrobust.attacks.STRONG_ATTACKS",
    "datasets.*.norm": "ncrobust.attacks.NORMS",
    "evaluation.norms.[]": "ncrobust.attacks.NORMS",
    "training.trades_bn": "ncrobust.training.train.TRADES_BN",
    "training.trades_l2_step": "ncrobust.attacks.TRADES_L2_STEPS",
    "precision": "ncrobust.jobs.experiment.AUTOCAST",
    "evaluation.attack_precision": "ncrobust.jobs.experiment.AUTOCAST",
    "evaluation.attack_loss": "ncrobust.jobs.experiment.ATTACK_LOSSES",
    "evaluation.feature_dtype": "ncrobust.evaluation.checkpoint.FEATURE_DTYPES",
    "datasets.*.options.imbalance.profile": "ncrobust.data.IMBALANCE_PROFILES",
    "variants.*.adversaries.[]": "ncrobust.cell.ADVERSARIES",
    "variants.*.losses.[]": "ncrobust.losses.LOSSES",
    "findings": "ncrobust.findings.BLOCKS",
}


def _registry(name: str) -> set:
    import importlib

    module, attribute = name.rsplit(".", 1)
    value = getattr(importlib.import_module(module), attribute)
    return set(value() if callable(value) else value)


@pytest.mark.parametrize("path", list(ENUM_REGISTRIES))
def test_a_schema_enum_is_its_registry(path):
    node = _schema_node(path)
    enum = node["propertyNames"]["enum"] if "propertyNames" in node else node["enum"]
    assert len(enum) == len(set(enum)) and set(enum) == _registry(ENUM_REGISTRIES[path])


def test_the_schemas_threat_models_schedules_and_loss_options_are_the_librarys():
    """Names the schema spells as keys rather than an enum, or that the library has no list of."""
    import inspect

    from ncrobust.attacks import NORMS
    from ncrobust.config import DATASET_SHAPES, REAL_DATASETS
    from ncrobust.data import list_datasets
    from ncrobust.losses import LOSSES
    from ncrobust.training.train import Schedule

    assert set(_schema_node("datasets.*.threat")["properties"]) == set(NORMS)
    assert set(DATASET_SHAPES) == set(list_datasets()) and set(REAL_DATASETS) < set(list_datasets())
    with_options = {name for name, make in LOSSES.items() if inspect.signature(make).parameters}
    assert set(_schema_node("losses")["properties"]) == with_options
    for kind in _schema_node("training.schedule.kind")["enum"]:
        Schedule(kind)  # each is one the library draws


# --------------------------------------------------------------------------------------------
# the library's defaults are the schema's (the validated config is the source: the workflow
# passes every value; the library keeps defaults for direct use, and they must not drift)


def _default(path: str):
    return _schema_node(path)["default"]


def test_the_training_recipes_defaults_are_the_schemas():
    import dataclasses

    from ncrobust.jobs.experiment import AUTOCAST
    from ncrobust.training.train import Recipe, Schedule

    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
    schedule = {key: _default(f"training.schedule.{key}") for key in ("kind", "milestones", "factors")}
    assert defaults == {
        **{key: _default(f"training.{key}") for key in ("batch_size", "trades_beta", "log_test_accuracy", "trades_bn",
                                                        "pgd_clean_bn_pass", "track_collapse", "cuda_graph", "epoch_measure", "trades_l2_step")},
        **{key: _default(f"training.optimizer.{key}") for key in ("lr", "momentum", "weight_decay")},
        "autocast_dtype": AUTOCAST[_default("precision")],
        "mixup_alpha": _default("training.mixup.alpha"),
    }
    assert Schedule() == Schedule(schedule["kind"], tuple(schedule["milestones"]), tuple(schedule["factors"]))


def test_the_evaluation_plans_defaults_are_the_schemas():
    import dataclasses

    from ncrobust.evaluation.checkpoint import EvaluationPlan
    from ncrobust.jobs.experiment import AUTOCAST

    defaults = {f.name: f.default for f in dataclasses.fields(EvaluationPlan) if f.default is not dataclasses.MISSING}
    assert defaults == {
        **{key: _default(f"evaluation.{key}") for key in ("batch_size", "layerwise", "projection_points", "keep_features",
                                                          "feature_dtype")},
        "splits": tuple(_default("evaluation.splits")),
        "attack_loss": None,  # the cell's loss: the workflow always passes it
        "attack_dtype": AUTOCAST[_default("evaluation.attack_precision")],
        "trades_l2_step": _default("training.trades_l2_step"),
    }


def test_the_losses_models_and_related_stages_defaults_are_the_schemas():
    import inspect

    from ncrobust.geometry.mixup_geometry import mixup_geometry
    from ncrobust.geometry.probe import probe_model
    from ncrobust.losses import LOSSES
    from ncrobust.models.base import check_normalized_features

    for name, option in (("label_smoothing", "smoothing"), ("focal", "gamma")):
        assert inspect.signature(LOSSES[name]).parameters[option].default == _default(f"losses.{name}.{option}")
    assert check_normalized_features("mlp", {}) == _default("models.*.normalized_features.temperature")
    geometry = inspect.signature(mixup_geometry).parameters
    assert [list(p) for p in geometry["pairs"].default] == _default("evaluation.mixup_geometry.pairs")
    assert list(geometry["lambdas"].default) == _default("evaluation.mixup_geometry.lambdas")
    assert geometry["per_class"].default == _default("evaluation.mixup_geometry.per_class")
    assert inspect.signature(probe_model).parameters["weight_decay"].default == _default("probe.weight_decay")


def test_every_schema_property_has_a_description():
    from ncrobust.config import schema_properties

    rows = schema_properties()
    assert len(rows) > 100  # every property, those of the definitions ($ref) at each place they are used
    assert [key for key, node, _ in rows if not node.get("description")] == []


def test_config_readme_is_the_schemas_reference(capsys):
    """config/README.md is what `python -m ncrobust.config --markdown` prints: one row per key."""
    from ncrobust.config import config_reference, schema_properties

    assert config_main(["--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == config_reference()
    assert (REPO_ROOT / "config/README.md").read_text() == printed, (
        "config/README.md is out of date: python -m ncrobust.config --markdown > config/README.md")
    for key, _, _ in schema_properties():
        assert f"| `{key}` |" in printed
    for shipped in ("config.yaml", "imbalance.yaml", "related.yaml", "paper.yaml"):
        assert f"`config/{shipped}`" in printed


def test_a_property_without_a_description_is_named():
    from ncrobust.config import config_reference, load_schema

    schema = load_schema()
    del schema["properties"]["training"]["properties"]["batch_size"]["description"]
    with pytest.raises(ValueError, match=r"without a description: training\.batch_size$"):
        config_reference(schema)
