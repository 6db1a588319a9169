"""Shared fixtures, the markers' rules, and the order of the test files.

The markers (declared in pyproject.toml) say what a test needs:

- ``workflow``: it starts another process: Snakemake (a dry run or a real one), a command-line
  tool, or a process pool. Tests that use a fixture that runs Snakemake (:data:`WORKFLOW_FIXTURES`)
  and ``slurm`` tests get it here; every other test that starts a process must carry it, and one
  that does not fails with a message naming it (:func:`_no_processes`).
- ``slow``: it trains or evaluates end to end, or takes more than about 2 s by itself; tests that
  use :data:`WORKFLOW_FIXTURES` get it here.
- ``slurm``: it needs a running SLURM controller (the test cluster of slurm_cluster.py).
- ``gpu``: it needs CUDA; skipped here when there is none.

The unit tests, which start no process (about a minute on two cores)::

    pytest -n 2 -m "not workflow and not slow and not gpu"

(``slurm`` implies ``workflow``.) The default run, ``pytest -q``, runs every test.
"""

import multiprocessing.process
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# The test files that take longest start first, longest first (pytest-xdist, `-n 4 --dist
# loadfile` in pyproject.toml, hands whole files to its workers in collection order): the short
# files then fill the gaps, and no long file is left for the end of the run.
FIRST = ("test_slurm", "test_faults", "test_incremental", "test_plots", "test_paper")
# Session fixtures below that run the whole tiny workflow (several minutes, once per session).
WORKFLOW_FIXTURES = {"finished_tiny_run", "st_only_run"}


def pytest_collection_modifyitems(config, items):
    """Mark the tests that use :data:`WORKFLOW_FIXTURES` ``workflow`` and ``slow`` and the ``slurm``
    ones ``workflow``; skip ``gpu`` tests without CUDA; put the longest test files first
    (:data:`FIRST`)."""
    cuda = torch.cuda.is_available()
    for item in items:
        if WORKFLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.workflow)
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.workflow)
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    items.sort(key=lambda item: FIRST.index(item.module.__name__) if item.module.__name__ in FIRST else len(FIRST))


def pytest_sessionstart(session):
    """scikit-learn's first parallel computation counts the physical cores with ``lscpu`` (joblib
    keeps the count): counted here, before the tests, so that a unit test using scikit-learn starts
    no process."""
    import joblib

    joblib.cpu_count(only_physical_cores=True)


@contextmanager
def _no_processes(item):
    """Within a test not marked ``workflow`` (its fixtures' set-up and its call), starting a
    process fails the test, naming the marker: the unit tests stay in-process and fast, and the
    marker cannot silently drift."""
    if item.get_closest_marker("workflow"):
        yield
        return

    message = (f"{item.nodeid} starts a process but is not marked workflow: add @pytest.mark.workflow "
               "(and @pytest.mark.slow if it takes more than about 2 s)")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        pytest.fail(message)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse)
        patch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
        for name in ("posix_spawn", "posix_spawnp", "fork", "forkpty"):
            if hasattr(os, name):
                patch.setattr(os, name, refuse)
        yield
    if attempts:  # refused where the failure was caught, e.g. in another thread
        pytest.fail(message)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _no_processes(item):
        return (yield)


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
