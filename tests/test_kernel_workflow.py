"""The kernel and spectrum stages in the workflow: switched on in the finished tiny run they schedule
only their own jobs (and the tables, figures, report page and findings that read them), run into
tables and figures, and the kernel findings block is made from those tables."""

from __future__ import annotations

import pandas as pd
import pytest
from test_incremental import scheduled
from workflow_helpers import copy_run, run_snakemake, tiny_config

from ncrobust.findings import Tables, block

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

VIEWS = {
    "kernel": {"enabled": True, "samples": 20, "top_k": 3, "eigen_ranks": [1, 2, 5], "eigen_test_samples": 20,
               "memory_mb": 256},
    "spectra": {"enabled": True, "samples": 100, "index_range": [2, 10], "perturbations": ["clean", "pgd"]},
}
CELLS = (("st", 1), ("pgd-linf", 1))
EPOCHS = (0, 2, 4)


@pytest.fixture(scope="module")
def with_views(tmp_path_factory, finished_tiny_run):
    workdir = copy_run(finished_tiny_run, tmp_path_factory.mktemp("kernel") / "run")
    config = tiny_config(**VIEWS)
    planned = scheduled(workdir, config)
    run_snakemake(workdir, configfile=workdir / "edited.yaml")
    return workdir, config, planned


def test_switching_the_views_on_schedules_only_their_jobs(with_views):
    _, _, planned = with_views
    expected = {(rule, a, s, e) for rule in ("kernel", "spectra") for a, s in CELLS for e in EPOCHS}
    expected |= {("kernel_dynamics", a, s) for a, s in CELLS}
    expected |= {("kernel_figures",), ("report_page",), ("findings",), ("all",)}
    assert planned == expected


def test_the_views_tables_figures_and_findings(with_views):
    workdir, config, _ = with_views
    tables = workdir / "results/tables"
    kernel = pd.read_parquet(tables / "kernel.parquet")
    assert set(kernel["epoch"]) == set(EPOCHS) and set(kernel["set"]) == {"clean", "pgd"}
    assert set(kernel[kernel["metric"] == "eigen_feature_accuracy"]["epoch"]) == {4}  # the final checkpoint only
    dynamics = pd.read_parquet(tables / "kernel_dynamics.parquet").set_index(["adversary", "set", "epoch", "metric"])["value"]
    for adversary, _ in CELLS:
        assert dynamics[adversary, "clean", 0, "distance_to_init"] == pytest.approx(0, abs=1e-12)
        assert dynamics[adversary, "clean", 4, "polar_r"] == pytest.approx(1)
    spectra = pd.read_parquet(tables / "spectra.parquet")
    alpha = spectra[spectra["metric"] == "alpha"]
    assert set(alpha["layer"]) == {"layer1", "penultimate"} and alpha["value"].notna().all()
    for name in ("kernel_dynamics", "kernel_spectrum", "spectra"):
        assert (workdir / f"results/figures/{name}.png").stat().st_size > 10_000
    assert "kernel_dynamics" in (workdir / "results/report/front_page.html").read_text()
    text = block("kernel", Tables.read(workdir / "results"))
    assert "| `st` |" in text and "| `pgd-linf` |" in text and "Does the `pgd-linf` kernel settle earlier?" in text
    assert scheduled(workdir, config) == set()  # done: a second run has nothing to do


def test_a_sentence_whose_numbers_are_missing_is_left_out(with_views):
    """Without the spectra table the kernel block keeps its other sentences and drops alpha's (its
    table cells read '–')."""
    workdir, _, _ = with_views
    tables = Tables.read(workdir / "results")
    assert "Does alpha differ?" in block("kernel", tables)
    tables.spectra = None
    text = block("kernel", tables)
    assert "Does the `pgd-linf` kernel settle earlier?" in text
    assert "Does alpha differ?" not in text and "– / –" in text
