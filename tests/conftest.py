import os
from pathlib import Path

import pytest
import torch


# The test files that take longest start first, longest first (pytest-xdist, `-n 4 --dist
# loadfile` in pyproject.toml, hands whole files to its workers in collection order): the short
# files then fill the gaps, and no long file is left for the end of the run.
FIRST = ("test_slurm", "test_faults", "test_incremental", "test_plots", "test_paper")


def pytest_collection_modifyitems(items):
    """Put the longest test files first (:data:`FIRST`)."""
    items.sort(key=lambda item: FIRST.index(item.module.__name__) if item.module.__name__ in FIRST else len(FIRST))


def _once_for_all_workers(tmp_path_factory, name: str, make):
    """``make(directory)`` run once for the whole session, even across pytest-xdist workers: the
    first worker to get here makes it in the session's shared temporary directory (under a file
    lock), the others wait for it and reuse it. Returns the directory."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one session
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            directory.mkdir()
            make(directory)
            done.touch()
    return directory


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run with one torch thread: deterministic and fair on the 2-core CI machine."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def digits():
    from ncrobust import data

    return data.load("digits", seed=0)


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory):
    """The whole tiny workflow (workflow_helpers.TINY_CONFIG), run once per session with umask 022
    (as on a shared file system). Read it, or copy it (workflow_helpers.copy_run keeps the
    modification times Snakemake compares); do not change it. test_workflow, test_faults and
    test_incremental all start from it: one end-to-end run for the whole suite."""
    from workflow_helpers import run_snakemake, write_tiny_config

    def make(workdir):
        config = write_tiny_config(workdir)
        previous = os.umask(0o022)
        try:
            run_snakemake(workdir, configfile=config)
        finally:
            os.umask(previous)

    return _once_for_all_workers(tmp_path_factory, "finished", make)


@pytest.fixture(scope="session")
def st_only_run(finished_tiny_run, tmp_path_factory):
    """A copy of the finished tiny run after its grid lost the pgd-linf cell and the workflow ran
    again: the tables, the figures and the report's front page remade for standard training alone.
    Returns (workdir, modification times in ns of every file under results/runs/ before that run).
    Read it; do not change it."""
    import json

    import yaml

    from workflow_helpers import copy_run, file_mtimes, run_snakemake

    def make(directory):
        workdir = copy_run(finished_tiny_run, directory / "run")
        before = file_mtimes(workdir / "results/runs")
        (directory / "before.json").write_text(json.dumps({str(k): v for k, v in before.items()}))
        config = yaml.safe_load((workdir / "config.yaml").read_text())
        config["grid"]["adversary"] = ["st"]
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run_snakemake(workdir, configfile=workdir / "config.yaml")

    directory = _once_for_all_workers(tmp_path_factory, "st_only", make)
    before = json.loads((directory / "before.json").read_text())
    return directory / "run", {Path(k): v for k, v in before.items()}
