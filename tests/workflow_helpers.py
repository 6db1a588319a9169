"""Helpers for tests that run the workflow: the repository root and a tiny config."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SNAKEFILE = REPO_ROOT / "workflow" / "Snakefile"

TINY_CONFIG = {
    "results": "results",
    "device": "cpu",
    "threads": 1,
    "grid": {"dataset": ["digits"], "model": ["mlp"], "loss": ["ce"], "adversary": ["st", "pgd-linf"], "seed": [1]},
    "datasets": {
        "digits": {
            "options": {"test_fraction": 0.25, "split_seed": 0},
            "norm": "linf",
            "threat": {"linf": {"eps": 0.1, "step_size": 0.05, "steps": 3}},
        }
    },
    "models": {"mlp": {"depth": 2, "width": 32}},
    "training": {"epochs": 4, "checkpoints": [2, 4], "batch_size": 128},
    "evaluation": {
        "splits": ["train", "test"],
        "perturbations": {"clean": {}, "pgd": {}, "pgd-targeted": {}, "gaussian": {}, "sign": {}},
        "batch_size": 500,
        # the strong evaluation with PGD-10 only, on 40 test samples: the rule runs, in seconds
        "strong": {"attacks": [], "max_samples": 40},
    },
}


# A user's own classifier, as the source of a module (smallnet.py) that the tests of ``ncrobust measure``
# and of external networks write next to its weights: a body and a head called ``fc``.
SMALLNET = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.Tanh())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))
'''

def cell_dir(
    dataset: str = "digits", model: str = "mlp", loss: str = "ce", adversary: str = "pgd-linf", seed: int = 1, variant: str = "base",
) -> str:
    """The directory of one cell's files, relative to the workflow directory (the one place the
    tests spell the layout of results/runs/)."""
    return f"results/runs/{dataset}/{model}/{loss}/{adversary}/{variant}/seed{seed}"


def copy_run(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """A copy of a workflow directory with its modification times (copy2: what Snakemake compares)
    and its .snakemake/ metadata, for a test that changes it."""
    shutil.copytree(source, destination, symlinks=True, copy_function=shutil.copy2)
    return Path(destination)


def tiny_config(**overrides) -> dict:
    """A copy of the tiny config with top-level keys replaced."""
    config = copy.deepcopy(TINY_CONFIG)
    config.update(copy.deepcopy(overrides))
    return config


def write_tiny_config(directory: str | os.PathLike, **overrides) -> Path:
    """Write the tiny config to ``directory/config.yaml`` and return its path."""
    path = Path(directory) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_config(**overrides), sort_keys=False))
    return path


def file_mtimes(directory: str | os.PathLike) -> dict[Path, int]:
    """Modification time (ns) of every file below ``directory``."""
    return {p: p.stat().st_mtime_ns for p in Path(directory).rglob("*") if p.is_file()}


def snakemake_command(workdir: str | os.PathLike, *args: str, configfile: str | os.PathLike | None = None,
                      extra_configfiles: list[str] | None = None, cores: int = 2) -> list[str]:
    """The command line :func:`run_snakemake` runs (for tests that start it with Popen)."""
    cmd = [SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "--cores", str(cores)]
    cmd += list(args)
    configfiles = ([str(configfile)] if configfile is not None else []) + list(extra_configfiles or [])
    if configfiles:  # last: --configfile takes several values and would swallow targets
        cmd += ["--configfile", *configfiles]
    return cmd


def run_snakemake(
    workdir: str | os.PathLike,
    *args: str,
    configfile: str | os.PathLike | None = None,
    extra_configfiles: list[str] | None = None,
    check: bool = True,
    timeout: int = 900,
):
    """Run the repository's Snakefile in ``workdir`` with ``--cores 2``; return the CompletedProcess.
    ``extra_configfiles`` are merged in order (``--configfile A B``)."""
    cmd = snakemake_command(workdir, *args, configfile=configfile, extra_configfiles=extra_configfiles)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def fit_full_batch(model, x, y, *, lr: float, steps: int):
    """A small model trained by full-batch SGD (momentum 0.9) on ``x, y``, in eval mode: a
    collapsed-enough network for tests of the evaluation, seconds on a CPU."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def stage_placeholders(root: str | os.PathLike, *datasets: str) -> Path:
    """Empty files and folders in the staged layout of ``datasets`` under ``root``
    (``ncrobust.data.staged_layout``): what the config check asks of a data_root, for a config
    test or a dry run that reads no data (a loader would refuse them)."""
    from ncrobust.data import staged_layout

    root = Path(root)
    for name in datasets:
        layout = staged_layout(name)
        for f in layout.files:
            (root / layout.folder / f).parent.mkdir(parents=True, exist_ok=True)
            (root / layout.folder / f).touch()
        for d in layout.folders:
            (root / layout.folder / d).mkdir(parents=True, exist_ok=True)
    return root
