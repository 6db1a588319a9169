import pytest
import torch


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
    import os

    from workflow_helpers import run_snakemake, write_tiny_config

    workdir = tmp_path_factory.mktemp("finished")
    config = write_tiny_config(workdir)
    previous = os.umask(0o022)
    try:
        run_snakemake(workdir, configfile=config)
    finally:
        os.umask(previous)
    return workdir


@pytest.fixture(scope="session")
def st_only_run(finished_tiny_run, tmp_path_factory):
    """A copy of the finished tiny run after its grid lost the pgd-linf cell and the workflow ran
    again: the tables, the figures and the report's front page remade for standard training alone.
    Returns (workdir, modification times in ns of every file under results/runs/ before that run).
    Read it; do not change it."""
    import yaml

    from workflow_helpers import copy_run, file_mtimes, run_snakemake

    workdir = copy_run(finished_tiny_run, tmp_path_factory.mktemp("st_only") / "run")
    before = file_mtimes(workdir / "results/runs")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["grid"]["adversary"] = ["st"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_snakemake(workdir, configfile=workdir / "config.yaml")
    return workdir, before
