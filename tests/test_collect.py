"""ncrobust.collect: the tables and summary of a partial grid (cells still running, or failed in a
``--keep-going`` run), and the summary's rows of seeds at different epochs."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from test_plots import synthetic_metrics
from workflow_helpers import REPO_ROOT, cell_dir, copy_run, file_mtimes, tiny_config, write_tiny_config

from ncrobust import tables
from ncrobust.collect import NothingToCollect, collect, load_config
from ncrobust.columns import ROBUSTNESS_COLUMNS
from ncrobust.config import ConfigError, validate_config
from ncrobust.io import write_parquet

ST, PGD = cell_dir(adversary="st"), cell_dir(adversary="pgd-linf")


def test_summary_averages_seeds_at_one_epoch_only():
    """Seeds of one setting that reached different epochs (a partial grid) are separate rows, each
    labelled with its epoch; a finished grid keeps one row per setting."""
    metrics = synthetic_metrics(seeds=(1, 2), epochs=(0, 5, 10))
    assert len(tables.summary(metrics)) == 2
    behind = metrics[~((metrics["seed"] == 2) & (metrics["epoch"] == 10))]
    s = tables.summary(behind)
    assert list(s.columns[:7]) == ["dataset", "model", "loss", "adversary", "variant", "seeds", "epoch"]
    assert sorted(zip(s["adversary"], s["epoch"], s["seeds"])) == [("pgd-linf", 5, 1), ("pgd-linf", 10, 1), ("st", 5, 1), ("st", 10, 1)]
    at_5 = s[(s["adversary"] == "st") & (s["epoch"] == 5)]["nc1_clean_mean"].item()
    one = tables.summary(behind[(behind["seed"] == 2)])
    assert at_5 == one[one["adversary"] == "st"]["nc1_clean_mean"].item()


def _config(**overrides) -> dict:
    return validate_config(tiny_config(**overrides))


def _write_cell(workdir, directory: str, *, evaluated=(), trained=(), robustness=False) -> None:
    """A cell's files as the workflow writes them (metrics, training logs, strong evaluation)."""
    adversary = directory.split("/")[5]
    metrics = synthetic_metrics(adversaries=(adversary,), seeds=(1,), epochs=(0, 2, 4))
    for e in evaluated:
        write_parquet(metrics[metrics["epoch"] == e].reset_index(drop=True), workdir / directory / f"metrics/epoch{e}.parquet")
    cell = dict(dataset="digits", model="mlp", loss="ce", adversary=adversary, variant="base", seed=1)
    for e in trained:
        log = pd.DataFrame([{**cell, "epoch": epoch, "loss_value": 1.0 / epoch} for epoch in range(e - 1, e + 1)])
        write_parquet(log, workdir / directory / f"train_log/epoch{e}.parquet")
    if robustness:
        rows = [{**cell, "epoch": 4, "split": "test", "norm": "linf", "attack": a, "attack_loss": "ce", "robust_accuracy": v, "samples": 40}
                for a, v in (("clean", 0.9), ("pgd", 0.5))]
        write_parquet(pd.DataFrame(rows)[ROBUSTNESS_COLUMNS], workdir / directory / "robustness/epoch4.parquet")


def test_collect_tables_hold_the_finished_cells_and_name_the_others(tmp_path):
    """One cell complete, one evaluated at epoch 0 only: the tables hold the first at every epoch and the
    second at epoch 0, the summary labels each row with its epoch, and the report says which is which."""
    _write_cell(tmp_path, ST, evaluated=(0, 2, 4), trained=(2, 4), robustness=True)
    _write_cell(tmp_path, PGD, evaluated=(0,))
    collected = collect(_config(), workdir=tmp_path)
    assert collected.tables == tmp_path / "results/partial/tables"
    m = pd.read_parquet(collected.tables / "metrics.parquet")
    assert m.groupby("adversary")["epoch"].unique().map(sorted).to_dict() == {"pgd-linf": [0], "st": [0, 2, 4]}
    s = pd.read_parquet(collected.tables / "summary.parquet").set_index("adversary")
    assert s["epoch"].to_dict() == {"pgd-linf": 0, "st": 4}
    assert s.loc["st", "strong_robust_accuracy_mean"] == 0.5 and pd.isna(s.loc["pgd-linf", "strong_robust_accuracy_mean"])
    assert sorted(pd.read_parquet(collected.tables / "training.parquet")["epoch"]) == [1, 2, 3, 4]
    assert "| pgd-linf | base | 1 | 0 |" in (collected.tables / "summary.md").read_text()
    report = collected.report()
    assert report == (tmp_path / "results/partial/progress.txt").read_text()
    lines = report.splitlines()
    assert lines[0].startswith("complete  digits/mlp/ce/st/base/seed1: trained to epoch 4/4, evaluated 0, 2, 4")
    assert lines[1] == ("partial   digits/mlp/ce/pgd-linf/base/seed1: trained to epoch 0/4, evaluated 0 (of 0, 2, 4), "
                        "no strong evaluation yet; in the tables at epoch 0")
    assert lines[2] == "2 cells: 1 complete, 1 partial, 0 missing"
    assert not (tmp_path / "results/tables").exists()  # Snakemake's own outputs: never written


def test_a_strong_evaluation_waits_for_its_epochs_metrics(tmp_path):
    """A cell whose strong evaluation finished before its last evaluation is in the tables at its
    last evaluated epoch without the strong numbers, which belong to a later epoch; the line says when they come."""
    _write_cell(tmp_path, ST, evaluated=(0, 2), trained=(2, 4), robustness=True)
    collected = collect(_config(), workdir=tmp_path, out=tmp_path / "elsewhere")
    assert collected.tables == tmp_path / "elsewhere/tables"
    assert pd.read_parquet(collected.tables / "robustness.parquet").empty
    assert pd.read_parquet(collected.tables / "summary.parquet")["epoch"].tolist() == [2]
    lines = collected.report().splitlines()
    assert "strong evaluation done (in the tables once epoch 4 is evaluated); in the tables at epoch 2" in lines[0]
    assert lines[1] == "missing   digits/mlp/ce/pgd-linf/base/seed1: nothing yet"


def test_collect_stacks_the_kernel_views_of_the_cells_so_far(tmp_path):
    """With the kernel and spectrum views on, the partial tables hold every kernel, dynamics and spectra
    file a cell has so far (epoch 0 included), as the kernel_figures rule's tables would; off, none."""
    _write_cell(tmp_path, ST, evaluated=(0, 2), trained=(2,))
    _write_cell(tmp_path, PGD, evaluated=(0,))
    row = lambda adversary, e: pd.DataFrame({"adversary": [adversary], "epoch": [e], "value": [float(e)]})  # noqa: E731
    for d, adversary, epochs in ((ST, "st", (0, 2)), (PGD, "pgd-linf", (0,))):
        for e in epochs:
            write_parquet(row(adversary, e), tmp_path / d / f"kernel/epoch{e}.parquet")
            write_parquet(row(adversary, e), tmp_path / d / f"spectra/epoch{e}.parquet")
    write_parquet(row("st", 2), tmp_path / ST / "kernel/dynamics.parquet")
    collected = collect(_config(kernel={"enabled": True}, spectra={"enabled": True}), workdir=tmp_path)
    for kind in ("kernel", "spectra"):
        t = pd.read_parquet(collected.tables / f"{kind}.parquet")
        assert sorted(zip(t["adversary"], t["epoch"])) == [("pgd-linf", 0), ("st", 0), ("st", 2)]
    assert pd.read_parquet(collected.tables / "kernel_dynamics.parquet")["adversary"].tolist() == ["st"]
    off = collect(_config(), workdir=tmp_path, out=tmp_path / "off")
    assert not any((off.tables / f"{k}.parquet").exists() for k in ("kernel", "kernel_dynamics", "spectra"))


def test_nothing_evaluated_yet_says_what_makes_it(tmp_path):
    _write_cell(tmp_path, ST, trained=(2,))
    with pytest.raises(NothingToCollect, match=r"no cell of the grid has an evaluated epoch yet \(2 cells; 1 begun\).*snakemake"):
        collect(_config(), workdir=tmp_path)


def test_load_config_merges_files_and_overrides_as_snakemake(tmp_path):
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(tiny_config()))
    (tmp_path / "b.yaml").write_text("threads: 2\n")
    config = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["results=out", "training={epochs: 4, checkpoints: [4]}"])
    assert (config["threads"], config["results"], config["training"]["checkpoints"]) == (2, "out", [4])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config([tmp_path / "a.yaml"], ["results"])


def test_collect_command_on_a_failed_cell(tmp_path, finished_tiny_run):
    """As after a ``--keep-going`` run whose pgd-linf cell failed in its last segment: the command
    writes the tables of what exists (st complete, pgd-linf up to epoch 2) beside Snakemake's, which it
    leaves alone, and names the partial cell."""
    workdir = copy_run(finished_tiny_run, tmp_path / "run")
    for name in ("metrics/epoch4.parquet", "projection/epoch4.parquet", "robustness/epoch4.parquet", "train_log/epoch4.parquet",
                 "checkpoints/epoch4.pt"):
        (workdir / PGD / name).unlink()
    before = file_mtimes(workdir / "results/tables")
    proc = subprocess.run([sys.executable, "-m", "ncrobust.collect", "--configfile", "config.yaml", "-d", str(workdir)],
                          capture_output=True, text=True, cwd=workdir, env={"PYTHONPATH": str(REPO_ROOT / "src"), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("complete  digits/mlp/ce/st/base/seed1:")
    assert lines[1] == ("partial   digits/mlp/ce/pgd-linf/base/seed1: trained to epoch 2/4, evaluated 0, 2 (of 0, 2, 4), "
                        "no strong evaluation yet; in the tables at epoch 2")
    assert lines[-1] == f"tables of the cells so far: {workdir}/results/partial/tables/ (summary: {workdir}/results/partial/tables/summary.md)"
    assert file_mtimes(workdir / "results/tables") == before
    partial = pd.read_parquet(workdir / "results/partial/tables/summary.parquet").set_index("adversary")
    finished = pd.read_parquet(workdir / "results/tables/summary.parquet").set_index("adversary")
    assert partial["epoch"].to_dict() == {"pgd-linf": 2, "st": 4}
    pd.testing.assert_series_equal(partial.loc["st"], finished.loc["st"])  # the same function, the same numbers
    m = pd.read_parquet(workdir / "results/partial/tables/metrics.parquet")
    assert m.groupby("adversary")["epoch"].unique().map(sorted).to_dict() == {"pgd-linf": [0, 2], "st": [0, 2, 4]}


@pytest.mark.workflow
@pytest.mark.slow
def test_collect_command_errors_are_one_line(tmp_path):
    """No results yet, or a config error: one line naming what to do, exit status 1."""
    run = [sys.executable, "-m", "ncrobust.collect", "-d", str(tmp_path)]
    env = {"PYTHONPATH": str(REPO_ROOT / "src"), "PATH": ""}
    tiny = write_tiny_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("grid: {dataset: [nope]}\n")
    for args, expected in ((["--configfile", str(tiny)], "no cell of the grid has an evaluated epoch yet"),
                           (["--configfile", str(tmp_path / "bad.yaml")], "ncrobust: config error: ")):
        proc = subprocess.run(run + args, capture_output=True, text=True, env=env)
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and expected in proc.stderr, proc.stderr
