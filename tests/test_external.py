"""Networks trained elsewhere as cells of the grid (config ``external``): added to the finished tiny
run, they are imported, evaluated and collected next to the trained cells without retraining
anything; a trained checkpoint imported as an external network measures exactly as its own cell;
editing one entry or replacing its file reruns only its cell."""

from __future__ import annotations

import copy
import os
import shutil
import textwrap

import pandas as pd
import pytest
import torch
import yaml
from test_incremental import FINAL, scheduled
from workflow_helpers import SMALLNET, cell_dir, copy_run, run_snakemake, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slow]



EXTERNAL = {
    # the trained st cell's final checkpoint, as a user would bring a checkpoint of their own
    "mine": {"path": "networks/mine.pt", "architecture": "mlp", "options": {"depth": 2, "width": 32}, "dataset": "digits",
             "seed": 1},
    # a plain nn.Module from the user's own code, measured at one named module and its penultimate features
    "small": {"path": "networks/small.pt", "architecture": "smallnet:SmallNet", "dataset": "digits", "taps": ["body.2"],
              "adversary": "pgd-linf"},
}


def external_jobs(*names) -> set:
    """The jobs of external cells, keyed as :func:`test_incremental.scheduled` keys them."""
    keys = {"mine": ("st", 1), "small": ("pgd-linf", 0)}
    return {job for n in names for job in (("import_network", *keys[n]), ("evaluate", *keys[n], 4), ("robustness", *keys[n], 4))}


@pytest.fixture(scope="module")
def with_external(tmp_path_factory, finished_tiny_run):
    """The finished tiny run with the two external networks added, and the jobs its dry run scheduled."""
    workdir = copy_run(finished_tiny_run, tmp_path_factory.mktemp("external") / "run")
    (workdir / "networks").mkdir()
    shutil.copy(workdir / cell_dir(adversary="st") / "checkpoints/epoch4.pt", workdir / "networks/mine.pt")
    (workdir / "smallnet.py").write_text(textwrap.dedent(SMALLNET))
    torch.manual_seed(0)
    exec(compile(textwrap.dedent(SMALLNET), "smallnet", "exec"), namespace := {})
    torch.save(namespace["SmallNet"]().state_dict(), workdir / "networks/small.pt")
    config = tiny_config(external=EXTERNAL)
    planned = scheduled(workdir, config)
    run_snakemake(workdir, configfile=workdir / "edited.yaml")
    return workdir, config, planned


def test_adding_external_networks_trains_nothing(with_external):
    _, _, planned = with_external
    assert planned == external_jobs("mine", "small") | FINAL


def test_external_cells_join_the_tables_and_a_second_run_has_nothing_to_do(with_external):
    workdir, config, _ = with_external
    tables = workdir / "results/tables"
    metrics = pd.read_parquet(tables / "metrics.parquet")
    assert {"mine", "small", "mlp"} == set(metrics["model"])
    small = metrics[metrics["model"] == "small"]
    assert set(small["layer"]) == {"body.2", "penultimate"} and set(small["epoch"]) == {4}
    assert set(small["adversary"]) == {"pgd-linf"}
    summary = pd.read_parquet(tables / "summary.parquet")
    assert {"mine", "small"} <= set(summary["model"])
    robustness = pd.read_parquet(tables / "robustness.parquet")
    assert {"mine", "small"} <= set(robustness["model"])
    for figure in ("nc_vs_epoch", "layerwise", "simplex", "ncc_robustness"):
        assert (workdir / f"results/figures/{figure}.png").stat().st_size > 0
    assert scheduled(workdir, config) == set()


def test_a_trained_checkpoint_imported_measures_as_its_own_cell(with_external):
    """Every metric of the external network "mine" (the st cell's final checkpoint) equals that cell's
    own evaluation at epoch 4, bit for bit: the import keeps the weights, the normalisation and the
    seeded attacks."""
    workdir, _, _ = with_external
    metrics = pd.read_parquet(workdir / "results/tables/metrics.parquet")
    own = metrics[(metrics["model"] == "mlp") & (metrics["adversary"] == "st") & (metrics["epoch"] == 4)]
    imported = metrics[metrics["model"] == "mine"]
    columns = [c for c in metrics.columns if c != "model"]
    key = ["split", "norm", "perturbation", "layer", "metric", "class", "row", "col"]
    pd.testing.assert_frame_equal(
        imported[columns].sort_values(key).reset_index(drop=True), own[columns].sort_values(key).reset_index(drop=True),
        check_exact=True,
    )


def test_editing_one_entry_or_replacing_its_file_reruns_only_its_cell(with_external, tmp_path):
    workdir, config, _ = with_external
    run = copy_run(workdir, tmp_path / "run")
    edited = copy.deepcopy(config)
    edited["external"]["small"]["taps"] = ["body.0", "body.2"]
    assert scheduled(run, edited) == external_jobs("small") | FINAL
    # another file under the same name: its import and everything made from it
    weights = run / "networks/small.pt"
    state = torch.load(weights)
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, weights)
    assert scheduled(run, config) == external_jobs("small") | FINAL
    # the same bytes written again (a newer file, the same content): nothing
    mine = run / "networks/mine.pt"
    data = mine.read_bytes()
    mine.write_bytes(data)
    os.utime(mine, None)
    weights.write_bytes((workdir / "networks/small.pt").read_bytes())  # the original content back
    assert scheduled(run, config) == set()


def test_an_external_network_needs_its_file(tmp_path):
    config = tiny_config(external={"gone": {"path": "networks/none.pt", "architecture": "mlp", "dataset": "digits"}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, "-n", configfile=path, check=False)
    assert proc.returncode == 1 and "external.gone.path = 'networks/none.pt': no such file" in proc.stderr


def test_the_partial_tables_hold_the_external_cells(with_external, tmp_path):
    """`ncrobust collect` on the run: the external cells are complete once imported and evaluated,
    and their rows are in the partial tables as in the workflow's."""
    from ncrobust.collect import collect
    from ncrobust.config import validate_config

    workdir, config, _ = with_external
    collected = collect(validate_config(config, base_dir=workdir), workdir=workdir, out=tmp_path / "partial")
    lines = {line.split()[1]: line for line in collected.report().splitlines()[:-2]}
    assert lines["digits/small/ce/pgd-linf/base/seed0:"].startswith("complete") and "imported" in lines["digits/small/ce/pgd-linf/base/seed0:"]
    assert len(lines) == 4 and all(line.startswith("complete") for line in lines.values())
    metrics = pd.read_parquet(tmp_path / "partial/tables/metrics.parquet")
    pd.testing.assert_frame_equal(metrics.sort_values(list(metrics.columns)).reset_index(drop=True),
                                  pd.read_parquet(workdir / "results/tables/metrics.parquet").sort_values(list(metrics.columns)).reset_index(drop=True))
