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
    (as on a shared file system). Read it, or copy it (shutil.copytree with copy2 keeps the
    modification times Snakemake compares); do not change it."""
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
