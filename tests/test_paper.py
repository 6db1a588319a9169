"""config/paper.yaml: its DAG, and one of its cells run for a handful of epochs on the CPU on fake
data in the real CIFAR-10 on-disk format."""

import re

import numpy as np
import pandas as pd
import pytest
import yaml
from test_data import write_py2_pickle
from workflow_helpers import REPO_ROOT, cell_dir, run_snakemake, stage_placeholders

from ncrobust.config import validate_config

PAPER = REPO_ROOT / "config" / "paper.yaml"


def write_fake_cifar10(root, n_train_per_file=4, n_test=20):
    """cifar-10-batches-py/ with every class present in both splits (labels cycle through 0..9
    across the five training files, twice with the default 20 training images)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        labels = [((i - 1) * n_train_per_file + j) % 10 for j in range(n_train_per_file)]
        data = rng.integers(0, 256, size=(n_train_per_file, 3072), dtype=np.uint8)
        write_py2_pickle({"batch_label": f"training batch {i} of 5", "labels": labels, "data": data, "filenames": []}, folder / f"data_batch_{i}")
    write_py2_pickle(
        {"batch_label": "testing batch 1 of 1", "labels": [j % 10 for j in range(n_test)], "data": rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8), "filenames": []},
        folder / "test_batch",
    )
    write_py2_pickle({"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": n_train_per_file, "num_vis": 3072}, folder / "batches.meta")


def test_paper_config_is_the_papers_recipe(tmp_path):
    config = validate_config(yaml.safe_load(PAPER.read_text()) | {"data_root": str(stage_placeholders(tmp_path, "cifar10", "cifar100"))})
    assert config["grid"]["model"] == ["preact_resnet18", "vgg11_bn"]
    assert config["grid"]["adversary"] == ["st", "pgd-linf", "trades-linf"] and config["grid"]["seed"] == [1, 2, 3]
    t = config["training"]
    assert (t["epochs"], t["batch_size"], t["optimizer"]["lr"], t["trades_beta"]) == (400, 128, 0.1, 6.0)
    assert t["epoch_measure"] is True  # Su et al.'s per-epoch curves of the training-time examples
    linf = config["datasets"]["cifar10"]["threat"]["linf"]
    assert linf == {"eps": pytest.approx(8 / 255), "step_size": pytest.approx(2 / 255), "steps": 10}
    l2 = config["datasets"]["cifar10"]["threat"]["l2"]
    assert l2 == {"eps": pytest.approx(128 / 255), "step_size": pytest.approx(15 / 255), "steps": 10}
    # the authors' arithmetic (fp32 training and attacks) and their attack choices
    assert (config["precision"], config["evaluation"]["attack_precision"]) == ("fp32", "fp32")
    assert (t["trades_l2_step"], config["evaluation"]["attack_loss"]) == ("authors", "ce")


@pytest.mark.workflow
@pytest.mark.slow
def test_one_paper_cell_runs_on_fake_cifar(tmp_path):
    data_root = tmp_path / "data"
    write_fake_cifar10(data_root)
    cell = cell_dir(dataset="cifar10", model="preact_resnet18", adversary="pgd-linf")
    override = tmp_path / "short.yaml"
    override.write_text(yaml.safe_dump({
        "data_root": str(data_root),
        "device": "cpu",
        "precision": "fp32",
        "threads": 1,
        "grid": {"dataset": ["cifar10"], "model": ["preact_resnet18"], "loss": ["ce"], "adversary": ["pgd-linf"], "seed": [1]},
        "datasets": {"cifar10": {"options": {"verify_checksums": False}, "threat": {"linf": {"eps": 8 / 255, "step_size": 4 / 255, "steps": 2}}}},
        "models": {"preact_resnet18": {"width": 16}},  # the paper's network a quarter as wide: same layers and taps
        "training": {"epochs": 2, "checkpoints": [1, 2], "batch_size": 20},
        "evaluation": {"epochs": [0, 2], "batch_size": 40, "strong": {"attacks": ["apgd-ce"], "max_samples": 4}},
    }))
    # the dry run of the restricted paper config lists only this cell
    cmd_files = [str(PAPER), str(override)]
    proc = run_snakemake(tmp_path, "-n", configfile=None, check=True, extra_configfiles=cmd_files)
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    assert counts["train"] == "2" and counts["evaluate"] == "2" and counts["robustness"] == "1"
    # the cell's own files (the grid's tables and figures are tested on digits)
    targets = [f"{cell}/metrics/epoch0.parquet", f"{cell}/metrics/epoch2.parquet", f"{cell}/robustness/epoch2.parquet"]
    run_snakemake(tmp_path, *targets, extra_configfiles=cmd_files, timeout=1800)
    m = pd.concat([pd.read_parquet(tmp_path / t) for t in targets[:2]])
    assert set(m["epoch"]) == {0, 2}
    assert set(m["layer"]) >= {"penultimate", "stage1_block1", "stage4_block2"}
    assert m["value"].notna().all()
    measured = pd.concat([pd.read_parquet(tmp_path / cell / f"epoch_metrics/epoch{e}.parquet") for e in (1, 2)])
    assert set(measured["epoch"]) == {1, 2} and set(measured["perturbation"]) == {"clean", "pgd"}
    assert measured.loc[measured["metric"] == "nc1", "value"].notna().all()
    ckpt_dir = tmp_path / cell / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == ["epoch0.pt", "epoch1.pt", "epoch2.pt"]
    r = pd.read_parquet(tmp_path / targets[2])
    assert set(r["attack"]) == {"clean", "pgd", "apgd-ce", "worst"} and set(r["samples"]) == {4}
