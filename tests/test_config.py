"""Bad configs stop at parse time with one line naming the key, the value and what is allowed."""

import copy

import pytest
import yaml

from ncrobust.config import ConfigError, validate_config
from workflow_helpers import REPO_ROOT, run_snakemake, tiny_config, write_tiny_config


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
    ("evaluation.feature_dtype", "int8", r"evaluation\.feature_dtype = 'int8': not allowed; allowed: float16, bfloat16, float32"),
    ("evaluation.strong", {"attacks": ["fab"]}, r"evaluation\.strong\.attacks\.0 = 'fab': not allowed; allowed: pgd-strong, apgd-ce, apgd-t"),
    ("resources", {"train": {"gpu": -1}}, r"resources\.train\.gpu = -1: must be >= 0"),
    ("threads", 0, r"threads = 0: must be >= 1"),
    ("grid.seed", ["one"], r"grid\.seed\.0 = 'one': must be of type integer"),
    ("grid", _DELETE, r"missing key grid"),
    ("datasets", {}, r"grid\.dataset = 'digits': no entry datasets\.digits"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[0] + ":" + str(i) for i, b in enumerate(BAD)])
def test_bad_config_is_one_clear_line(path, value, message):
    assert len(BAD) >= 25
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


def test_defaults_are_filled_and_the_shipped_configs_are_valid():
    config = validate_config(tiny_config())
    assert config["training"]["optimizer"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}
    assert config["evaluation"]["layerwise"] is True
    shipped = validate_config(yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text()), base_dir=REPO_ROOT)
    assert shipped["grid"]["dataset"] == ["digits"]


def test_snakemake_stops_before_any_job_with_one_line(tmp_path):
    config = write_tiny_config(tmp_path, device="tpu")
    proc = run_snakemake(tmp_path, "-n", configfile=config, check=False)
    assert proc.returncode != 0
    assert "ncrobust: config error: device = 'tpu': not allowed; allowed: auto, cpu, cuda" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()
