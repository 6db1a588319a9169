"""End to end: Snakemake on the tiny config in a temporary directory."""

import re

import numpy as np
import pandas as pd
import pytest
from workflow_helpers import cell_dir, copy_run, run_snakemake, tiny_config, write_tiny_config

from ncrobust.columns import METRIC_COLUMNS

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

CELL = cell_dir(adversary="pgd-linf")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, finished_tiny_run):
    """A copy of the session's finished tiny run (conftest.py), which these tests may change."""
    workdir = copy_run(finished_tiny_run, tmp_path_factory.mktemp("tiny") / "run")
    return workdir, workdir / "config.yaml"


def test_every_table_and_figure_is_made(tiny_run):
    workdir, _ = tiny_run
    for name in ("metrics.parquet", "training.parquet", "summary.parquet", "summary.md", "summary.csv"):
        assert (workdir / "results/tables" / name).stat().st_size > 0
    for name in ("nc_vs_epoch", "accuracy", "alignment", "leap", "layerwise", "simplex", "ncc_robustness"):
        assert (workdir / f"results/figures/{name}.png").stat().st_size > 10_000
        assert (workdir / f"results/figures/{name}.pdf").stat().st_size > 0
    assert not (workdir / "results/figures/imbalance.png").exists()  # a balanced grid: nothing to show
    page = (workdir / "results/report/front_page.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<figure") == 7
    assert (workdir / "results/tables/robustness.parquet").stat().st_size > 0


def test_metrics_table_covers_the_grid(tiny_run):
    workdir, _ = tiny_run
    m = pd.read_parquet(workdir / "results/tables/metrics.parquet")
    assert list(m.columns) == METRIC_COLUMNS
    assert set(m["adversary"]) == {"st", "pgd-linf"}
    assert set(m["epoch"]) == {0, 2, 4}
    assert set(m["split"]) == {"train", "test"}
    assert set(m["perturbation"]) == {"clean", "pgd", "pgd-targeted", "gaussian", "sign"}
    assert set(m["layer"]) == {"penultimate", "layer1"} and set(m["norm"]) == {"linf"}
    # tap order travels with the results
    assert dict(m[["layer", "layer_index"]].drop_duplicates().itertuples(index=False)) == {"layer1": 0, "penultimate": 1}
    assert m["value"].notna().all()
    pen = m[m["layer"] == "penultimate"]
    per_key = pen.groupby(["adversary", "epoch", "split", "perturbation"])["metric"].apply(set)
    for (adv, epoch, split, pert), names in per_key.items():
        assert {"accuracy", "nc1", "nc2_equinorm_M", "nc2_equiangle_W", "nc3", "nc4", "ncc_accuracy"} <= names
        if pert != "clean":
            assert {"ncc_accuracy_clean_means", "alignment_angle", "leap_rate"} <= names
    # accuracies are shares, and PGD hurts the standard network at the final epoch
    acc = pen[pen["metric"] == "accuracy"]
    assert acc["value"].between(0, 1).all()
    final = pen[(pen["epoch"] == 4) & (pen["split"] == "train") & (pen["adversary"] == "st") & (pen["metric"] == "accuracy")]
    by_pert = final.set_index("perturbation")["value"]
    assert by_pert["pgd"] < by_pert["clean"] - 0.1
    # the leap matrix of every perturbed set is row-stochastic, indexed by row and col (10 classes)
    leap = pen[pen["metric"] == "leap"]
    assert leap["class"].isna().all() and set(leap["row"]) == set(leap["col"]) == set(range(10))
    sums = leap.groupby(["adversary", "epoch", "split", "perturbation", "row"])["value"].sum()
    assert len(sums) == 2 * 3 * 2 * 4 * 10 and sums.to_numpy() == pytest.approx(1.0)
    per_class = pen[pen["metric"] == "alignment_angle_per_class"]
    assert set(per_class["class"]) == set(range(10)) and per_class["row"].isna().all()


def test_training_table_has_one_row_per_epoch(tiny_run):
    workdir, _ = tiny_run
    t = pd.read_parquet(workdir / "results/tables/training.parquet")
    assert sorted(t[t["adversary"] == "st"]["epoch"]) == [1, 2, 3, 4]
    assert t["loss_value"].notna().all() and t["seconds"].gt(0).all()


def test_summary_has_one_row_per_cell_group(tiny_run):
    workdir, _ = tiny_run
    s = pd.read_parquet(workdir / "results/tables/summary.parquet")
    assert len(s) == 2 and set(s["epoch"]) == {4}
    md = (workdir / "results/tables/summary.md").read_text()
    assert md.startswith("| dataset | model | loss | adversary |") and "pgd-linf" in md


def test_no_features_files_by_default_and_every_job_has_a_log(tiny_run):
    workdir, _ = tiny_run
    assert not (workdir / CELL / "features").exists()
    assert sorted(p.name for p in (workdir / CELL / "projection").iterdir()) == [f"epoch{e}.parquet" for e in (0, 2, 4)]
    logs = sorted(p.name for p in (workdir / CELL / "logs").iterdir())
    assert logs == ["evaluate_epoch0.log", "evaluate_epoch2.log", "evaluate_epoch4.log", "init.log",
                    "robustness_epoch4.log", "train_epoch2.log", "train_epoch4.log"]


def test_long_jobs_log_their_progress(tiny_run):
    """Not only training reports progress: each evaluate log has one line per evaluated set, the
    robustness log one per attack, the aggregate log what it stacked."""
    workdir, _ = tiny_run
    evaluate = (workdir / CELL / "logs/evaluate_epoch4.log").read_text()
    sets = [f"{s}/linf/{p}" for s in ("train", "test") for p in sorted(tiny_config()["evaluation"]["perturbations"])]
    assert re.findall(r"evaluate epoch 4: set (\d+)/10 (\S+) done in", evaluate) == [(str(i + 1), key) for i, key in enumerate(sets)]
    assert "strong evaluation: attack 1/1 pgd: robust accuracy" in (workdir / CELL / "logs/robustness_epoch4.log").read_text()
    assert re.search(r"INFO metrics: 6 files, \d+ rows", (workdir / "results/logs/aggregate.log").read_text())


def test_kept_features_give_back_the_metrics_table(tmp_path, finished_tiny_run):
    """With ``keep_features: true`` the features file is an output of ``evaluate``, and the
    penultimate metrics recomputed from it (the same code, without attacking again) equal the table
    the job wrote, to rounding: the job's second pass re-runs the forward pass. (In a copy of the
    finished run: only that evaluation runs.)"""
    from ncrobust.columns import RESULT_COLUMNS
    from ncrobust.evaluation.checkpoint import penultimate_metrics
    from ncrobust.io import load_torch

    workdir = copy_run(finished_tiny_run, tmp_path / "run")
    evaluation = {**tiny_config()["evaluation"], "keep_features": True}
    config = write_tiny_config(workdir, evaluation=evaluation)
    run_snakemake(workdir, f"{CELL}/features/epoch0.pt", configfile=config)
    blob = load_torch(workdir / CELL / "features/epoch0.pt")
    assert set(blob["sets"]) == {f"{s}/linf/{p}" for s in ("train", "test") for p in evaluation["perturbations"]}
    recomputed = penultimate_metrics(blob)
    written = pd.read_parquet(workdir / CELL / "metrics/epoch0.parquet")
    written = written[written["layer"] == "penultimate"][RESULT_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(recomputed.drop(columns="value"), written.drop(columns="value"))
    np.testing.assert_allclose(recomputed["value"], written["value"], rtol=1e-12, atol=1e-15)


def test_a_finished_workflow_has_nothing_to_do(tiny_run):
    workdir, config = tiny_run
    proc = run_snakemake(workdir, "-n", configfile=config)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_one_cell_target_lists_only_that_cells_jobs(tmp_path):
    config = write_tiny_config(tmp_path)
    proc = run_snakemake(tmp_path, "-n", f"{CELL}/metrics/epoch4.parquet", configfile=config)
    out = proc.stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert counts == {"prepare_data": "1", "init_model": "1", "train": "2", "evaluate": "1", "total": "5"}
    assert "/st/" not in out


def test_rerunning_a_cell_by_its_file(tiny_run):
    workdir, config = tiny_run
    target = workdir / CELL / "metrics/epoch4.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    run_snakemake(workdir, str(target.relative_to(workdir)), configfile=config)
    pd.testing.assert_frame_equal(pd.read_parquet(target), before)


def _docs_python_blocks() -> list[tuple[str, str]]:
    """Every ```python block of the README and the docs pages, with its file."""
    from workflow_helpers import REPO_ROOT

    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    return [(page.name, block) for page in pages for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_docs_python_examples_run(tiny_run, monkeypatch, capsys):
    """The Python examples of the README and the docs run as written (in a finished workflow directory)."""
    workdir, _ = tiny_run
    monkeypatch.chdir(workdir)
    blocks = _docs_python_blocks()
    assert len(blocks) >= 2
    for page, block in blocks:
        exec(compile(block, page, "exec"), {})
    out = capsys.readouterr().out
    assert "adversary" in out and "pgd-linf" in out  # the metrics-table example printed its pivot
    assert re.search(r"^0\.\d+$", out, flags=re.M)  # the collapse example printed NC1 values


def test_strong_evaluation_attacks_with_the_evaluations_pgd(tmp_path, finished_tiny_run):
    """One PGD-10 per checkpoint: the robustness stage's ``pgd`` is the evaluation's attack (the same
    seeded inputs), so on the whole test split its accuracy equals the metrics table's test robust
    accuracy exactly, and ``pgd_gap`` compares the summary's robust accuracy with the strong attacks.
    (In a copy of the finished run with ``max_samples: null``: only the robustness jobs run.)"""
    workdir = copy_run(finished_tiny_run, tmp_path / "run")
    evaluation = tiny_config()["evaluation"]
    evaluation["strong"] = {**evaluation["strong"], "attacks": ["pgd-strong"], "max_samples": None}
    config = write_tiny_config(workdir, evaluation=evaluation)
    cells = [cell_dir(adversary=a) for a in ("st", "pgd-linf")]
    targets = [f"{c}/robustness/epoch4.parquet" for c in cells]
    dry = run_snakemake(workdir, "-n", *targets, configfile=config).stdout
    assert dict(re.findall(r"^(\w+)\s+(\d+)$", dry, flags=re.M)) == {"robustness": "2", "total": "2"}
    run_snakemake(workdir, *targets, configfile=config)
    for cell in cells:
        metrics = pd.read_parquet(workdir / cell / "metrics/epoch4.parquet")
        evaluated = metrics.query("split == 'test' and perturbation == 'pgd' and layer == 'penultimate' "
                                  "and metric == 'accuracy' and norm == 'linf'")["value"]
        strong = pd.read_parquet(workdir / cell / "robustness/epoch4.parquet").set_index("attack")
        assert strong.loc["pgd", "samples"] == 450
        assert strong.loc["pgd", "robust_accuracy"] == evaluated.item()
        assert strong.loc["worst", "robust_accuracy"] <= min(strong.loc["pgd", "robust_accuracy"],
                                                             strong.loc["pgd-strong", "robust_accuracy"])
    # the summary: its robust accuracy is the strong evaluation's PGD-10, and pgd_gap the difference of two of its columns
    from ncrobust.tables import summary

    table = summary(pd.concat([pd.read_parquet(p) for c in cells for p in (workdir / c / "metrics").glob("*.parquet")]),
                    pd.concat([pd.read_parquet(workdir / t) for t in targets]))
    assert len(table) == 2
    assert (table["test_robust_accuracy_mean"] == table["strong_pgd_robust_accuracy_mean"]).all()
    assert np.allclose(table["pgd_gap_mean"], table["test_robust_accuracy_mean"] - table["strong_robust_accuracy_mean"], rtol=0, atol=1e-15)
