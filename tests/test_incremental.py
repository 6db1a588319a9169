"""A config edit reruns only what it changes: after one complete run of the tiny config (the
session's finished run, conftest.py), each edit's dry run schedules exactly the jobs it must
(parsed from `snakemake -n`'s job blocks)."""

import copy
import re

import pandas as pd
import pytest
import yaml
from workflow_helpers import cell_dir, copy_run, file_mtimes, run_snakemake, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

CELLS = ("st", "pgd-linf")
FINAL = {("aggregate",), ("figures",), ("report_page",), ("findings",), ("all",)}
# The tiny config (its strong evaluation: 40 samples, PGD-10 only): what the finished run ran.
BASE = tiny_config()


def jobs(rule: str, adversaries=CELLS, epochs=(None,), seeds=(1,)) -> set:
    """Job keys (rule, adversary, seed, epoch) as :func:`scheduled` returns them."""
    return {(rule, a, s, e) if e is not None else (rule, a, s) for a in adversaries for s in seeds for e in epochs}


def cell_jobs(adversaries=CELLS, seeds=(1,)) -> set:
    """Every job of a new cell: init, two training segments, three evaluations, the strong evaluation."""
    return (
        jobs("init_model", adversaries, seeds=seeds)
        | jobs("train", adversaries, (2, 4), seeds)
        | jobs("evaluate", adversaries, (0, 2, 4), seeds)
        | jobs("robustness", adversaries, (4,), seeds)
    )


def scheduled(workdir, config: dict) -> set:
    """The jobs a dry run with ``config`` schedules: (rule,) or (rule, adversary, seed[, epoch])."""
    path = workdir / "edited.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = run_snakemake(workdir, "--dry-run", configfile=path).stdout
    found = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block).group(1)
        wildcards = dict(re.findall(r"(\w+)=([^,\s]+)", (re.search(r"wildcards: (.*)", block) or [None, ""])[1]))
        key = (rule,)
        if "adversary" in wildcards:
            key += (wildcards["adversary"], int(wildcards["seed"]))
            key += (int(wildcards["epoch"]),) if "epoch" in wildcards else ()
        elif "dataset" in wildcards:
            key += (wildcards["dataset"],)
        assert key not in found, f"job {key} listed twice"
        found.add(key)
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory, finished_tiny_run):
    """A copy of the session's finished run of BASE (the dry runs write their config into it)."""
    assert yaml.safe_load((finished_tiny_run / "config.yaml").read_text()) == BASE
    return copy_run(finished_tiny_run, tmp_path_factory.mktemp("incremental") / "run")


def edited(edit) -> dict:
    config = copy.deepcopy(BASE)
    edit(config)
    return config


def _reverse_keys(value):
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    return value


def _reorder_keys(config):
    """The same config with the keys of every mapping in reverse order (YAML keeps the order)."""
    reordered = _reverse_keys(config)
    config.clear()
    config.update(reordered)


def _spell_out_defaults(config):
    config["training"]["optimizer"] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}
    config["training"]["schedule"] = {"kind": "piecewise", "milestones": [0.25, 0.375], "factors": [0.1, 0.01]}
    config["evaluation"].update(layerwise=True, feature_dtype="float32", keep_features=False, attack_precision="fp32",
                                projection_points=300)
    config.update(precision="fp32", data_root="data", download=False)


def _halve_linf(config):
    config["datasets"]["digits"]["threat"]["linf"] = {"eps": 0.05, "step_size": 0.025, "steps": 3}


def _execution_settings(config):
    config.update(threads=2, group_training=True, mps=True, device="auto")
    config["training"].update(cuda_graph=False, deterministic=False)
    config["resources"] = {"train": {"cpus": 2, "mem_mb": 8000, "runtime": 90}, "cpu": {"mem_mb": 1000}}


def _add_unused_l2(config):
    config["datasets"]["digits"]["threat"]["l2"] = {"eps": 1.0, "step_size": 0.25, "steps": 3}


def _st_norm_l2(config):
    _add_unused_l2(config)
    config["datasets"]["digits"]["norm"] = "l2"


EDITS = {
    "nothing": (lambda c: None, set()),
    "keys reordered at every level": (_reorder_keys, set()),
    "defaults spelled out": (_spell_out_defaults, set()),
    "1 for 1.0 at a number key": (lambda c: c["training"].update(trades_beta=6), set()),
    "threads, resources, group_training, mps, device, GPU switches": (_execution_settings, set()),
    "grid axis reordered": (lambda c: c["grid"].update(adversary=["pgd-linf", "st"]), set()),
    "threat model no cell uses": (_add_unused_l2, set()),
    "trades_beta without TRADES cells": (lambda c: c["training"].update(trades_beta=3.0), set()),
    "the authors' TRADES l2 step without trades-l2 cells": (lambda c: c["training"].update(trades_l2_step="authors"), set()),
    "cross-entropy attacks of ce cells": (lambda c: c["evaluation"].update(attack_loss="ce"), set()),
    "new seed": (lambda c: c["grid"].update(seed=[1, 2]), cell_jobs(seeds=(2,)) | FINAL),
    "new adversary": (lambda c: c["grid"].update(adversary=["st", "pgd-linf", "trades-linf"]), cell_jobs(["trades-linf"]) | FINAL),
    "adversary removed": (lambda c: c["grid"].update(adversary=["st"]), FINAL),
    "fewer evaluated epochs": (lambda c: c["evaluation"].update(epochs=[0, 4]), FINAL),
    "evaluation.batch_size": (
        lambda c: c["evaluation"].update(batch_size=250),
        jobs("evaluate", epochs=(0, 2, 4)) | jobs("robustness", epochs=(4,)) | FINAL,
    ),
    "perturbation override": (
        # the strong evaluation attacks with the evaluation's PGD-10: its robustness job reruns too
        lambda c: c["evaluation"]["perturbations"].update(pgd={"steps": 5}),
        jobs("evaluate", epochs=(0, 2, 4)) | jobs("robustness", epochs=(4,)) | FINAL,
    ),
    "perturbation override but pgd": (
        lambda c: c["evaluation"]["perturbations"].update(sign={"eps": 0.05}), jobs("evaluate", epochs=(0, 2, 4)) | FINAL
    ),
    "strong evaluation samples": (
        lambda c: c["evaluation"]["strong"].update(max_samples=30), jobs("robustness", epochs=(4,)) | FINAL
    ),
    "linf eps halved": (
        _halve_linf,
        jobs("train", ["pgd-linf"], (2, 4)) | jobs("evaluate", epochs=(0, 2, 4)) | jobs("robustness", epochs=(4,)) | FINAL,
    ),
    "st cells' norm": (_st_norm_l2, jobs("evaluate", ["st"], (0, 2, 4)) | jobs("robustness", ["st"], (4,)) | FINAL),
    "learning rate": (
        lambda c: c["training"].update(optimizer={"lr": 0.05}),
        jobs("train", epochs=(2, 4)) | jobs("evaluate", epochs=(0, 2, 4)) | jobs("robustness", epochs=(4,)) | FINAL,
    ),
    "model width": (lambda c: c["models"]["mlp"].update(width=16), cell_jobs() | FINAL),
    "variant defined, not in the grid": (lambda c: c.update(variants={"nobias": {"model": {"bias": False}}}), set()),
    "new variant (model override)": (
        lambda c: (c.update(variants={"nobias": {"model": {"bias": False}}}), c["grid"].update(variant=["base", "nobias"])),
        cell_jobs() | FINAL,  # the new variant's cells (same adversaries and seed), its own path; no prepare_data
    ),
    "new variant (dataset override)": (
        lambda c: (c.update(variants={"r10": {"dataset": {"imbalance": {"profile": "step", "ratio": 10}}}}),
                   c["grid"].update(variant=["base", "r10"])),
        {("prepare_data", "digits")} | cell_jobs() | FINAL,  # its own data file, then its cells
    ),
    "new variant for one adversary": (
        lambda c: (c.update(variants={"bn": {"training": {"pgd_clean_bn_pass": True}, "adversaries": ["pgd-linf"]}}),
                   c["grid"].update(variant=["base", "bn"])),
        cell_jobs(["pgd-linf"]) | FINAL,  # no st copy of the base cell
    ),
    "findings block": (lambda c: c.update(findings="imbalance"), {("findings",), ("all",)}),  # its own output, nothing else
    "dataset split": (
        lambda c: c["datasets"]["digits"]["options"].update(test_fraction=0.3),
        {("prepare_data", "digits")} | cell_jobs() | FINAL,
    ),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_schedules_exactly_the_jobs_it_changes(finished, name):
    edit, expected = EDITS[name]
    assert scheduled(finished, edited(edit)) == expected


def test_removing_a_cell_keeps_its_files_and_the_tables_hold_the_current_grid(st_only_run):
    """Run the removal for real (conftest.st_only_run: a copy of the finished run, pgd-linf dropped
    from the grid): no file of any cell is touched, the removed cell's included, and the tables
    hold the st cell alone."""
    workdir, before = st_only_run
    dropped = workdir / cell_dir(adversary="pgd-linf") / "checkpoints/epoch4.pt"
    kept = workdir / cell_dir(adversary="st") / "metrics/epoch4.parquet"
    assert dropped in before and kept in before
    after = file_mtimes(workdir / "results/runs")
    assert after == before, [str(p.relative_to(workdir)) for p in set(after) | set(before) if after.get(p) != before.get(p)]
    for table in ("metrics", "training", "summary", "robustness"):
        assert set(pd.read_parquet(workdir / f"results/tables/{table}.parquet")["adversary"]) == {"st"}, table


def test_report_opens_on_the_title_and_the_summary_with_the_figures_in_the_sidebar(finished, tmp_path):
    """`snakemake --report` on the finished run (here, because it needs one): the landing page is
    the workflow description, short (what the run is, the summary table), the figures and the
    front page are sidebar entries, and in Chromium the title and the summary are in view as the
    report opens (Snakemake centres its content pane; workflow/report/report.css keeps a tall
    one's top reachable)."""
    import json

    from browser_helpers import CHROMIUM, layout
    from ncrobust.columns import FIGURES
    from test_report_page import assert_title_and_summary_in_view
    from workflow_helpers import REPO_ROOT

    metadata = REPO_ROOT / "workflow/report/metadata.yaml"
    stylesheet = REPO_ROOT / "workflow/report/report.css"
    run_snakemake(finished, "--report", "report.html", "--report-metadata", str(metadata), "--report-stylesheet", str(stylesheet),
                  configfile=finished / "config.yaml")
    page = (finished / "report.html").read_text()
    assert re.search(r"var metadata = \{.+\};", page)  # non-empty metadata: Snakemake opens on the description
    assert "align-items: safe center" in page  # the report's stylesheet
    desc = json.loads(re.search(r"var workflow_desc = (\".*?\");\n", page, re.S).group(1))
    assert "Grid of this run: dataset digits" in desc and "training adversary st, pgd-linf" in desc
    assert desc.count("<tr>") == 2 + 2  # two header rows and one row per (dataset, model, loss, adversary)
    assert "data:image/png" not in desc and len(desc) < 30_000  # no figure in the description: it stays short
    for name in FIGURES:
        if name != "imbalance":  # a balanced grid: no imbalance figure
            assert f'"figure": "{name}"' in page, name
    assert "imbalance.png" not in page and "front_page.html" in page
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: the report's layout is not checked (.ci/install_chromium.sh)")
    for size in ((1400, 900), (1400, 2000)):
        assert_title_and_summary_in_view(layout(finished / "report.html", *size, tmp_path))


# ------------------------------------------------------------------ reruns by content, not by age
DATA = "results/data/digits/base.pt"
CONFIG = "config.yaml"


def _refusal(workdir, *args: str) -> str:
    """The one line a run stops with while an intermediate file is missing; its recovery command."""
    proc = run_snakemake(workdir, *args, configfile=workdir / CONFIG, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ncrobust: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    command = re.search(r"Rebuild it alone first, then rerun this command .*: snakemake --cores 1 (\S+)$", lines[0])
    assert command, lines[0]
    return command.group(1)


@pytest.fixture
def damaged(tmp_path, finished_tiny_run):
    """A fresh copy of the finished run (with Snakemake's metadata: the recorded checksums)."""
    return copy_run(finished_tiny_run, tmp_path / "run")


def test_a_deleted_data_file_is_rebuilt_alone_and_then_a_new_seed_trains_only_its_cells(damaged):
    """Deleting the prepared data (to save disk) and extending the grid: the run stops in one line
    naming the rebuild; after it (the same bytes), nothing is out of date, and a new seed schedules
    its own cells and the tables only."""
    (damaged / DATA).unlink()
    assert _refusal(damaged) == DATA
    assert _refusal(damaged, "-n") == DATA  # a dry run says so too
    run_snakemake(damaged, DATA, configfile=damaged / CONFIG)
    assert scheduled(damaged, BASE) == set()
    assert scheduled(damaged, edited(lambda c: c["grid"].update(seed=[1, 2]))) == cell_jobs(seeds=(2,)) | FINAL


def test_a_deleted_middle_checkpoint_rebuilt_alone_reruns_only_what_changed(damaged):
    """The rebuilt checkpoint has the same bytes (CPU training is deterministic): the next segment
    and the evaluations made from it stay; only the segment's training log changed (its timing
    column), so the tables are made again."""
    middle = f"{cell_dir(adversary='pgd-linf')}/checkpoints/epoch2.pt"
    before = (damaged / middle).read_bytes()
    (damaged / middle).unlink()
    assert _refusal(damaged) == middle
    run_snakemake(damaged, middle, configfile=damaged / CONFIG)
    assert (damaged / middle).read_bytes() == before
    assert scheduled(damaged, BASE) == FINAL


def test_a_data_file_with_other_content_reruns_exactly_what_is_made_from_it(damaged):
    """A newer data file with different tensors (what a changed loader would write): every job
    downstream of it, and not prepare_data, whose output it is."""
    import torch

    from ncrobust.io import load_torch, save_torch

    data = load_torch(damaged / DATA)
    data["x_train"] = data["x_train"].clone()
    data["x_train"].view(-1)[0] = (int(data["x_train"].view(-1)[0]) + 1) % 256  # one pixel of one image
    save_torch(data, damaged / DATA)
    assert scheduled(damaged, BASE) == cell_jobs() | FINAL
    assert torch.equal(load_torch(damaged / DATA)["x_train"], data["x_train"])


def test_a_truncated_data_file_recovers_by_the_printed_commands_and_reruns_nothing_else(damaged):
    """A truncated data file stops the run before any job reads it, in one line with the advice;
    following it (rm, rebuild alone) restores the same bytes, and then nothing is out of date."""
    original = (damaged / DATA).read_bytes()
    (damaged / DATA).write_bytes(original[:100])
    failed = run_snakemake(damaged, configfile=damaged / CONFIG, check=False)
    lines = [line for line in failed.stderr.splitlines() if line.startswith("ncrobust: CorruptFileError: ")]
    assert failed.returncode != 0 and len(lines) == 1, failed.stderr[-3000:]
    assert "Error in rule" not in failed.stdout + failed.stderr  # no job ran
    advice = re.search(r"rebuild it alone \(rm '([^']+)' && snakemake --cores 1 '([^']+)'\), then rerun the same", lines[0])
    assert advice and advice.group(1) == advice.group(2) == DATA
    (damaged / advice.group(1)).unlink()
    run_snakemake(damaged, advice.group(2), configfile=damaged / CONFIG)
    assert (damaged / DATA).read_bytes() == original
    assert scheduled(damaged, BASE) == set()


def test_a_moved_project_reruns_nothing(tmp_path, finished_tiny_run):
    """The workflow's code and a finished run copied together elsewhere (a project moved to another
    disk, a colleague's copy): no input is named by an absolute path, so nothing reruns."""
    import shutil
    import subprocess

    from workflow_helpers import REPO_ROOT, snakemake_command

    moved = copy_run(finished_tiny_run, tmp_path / "moved")
    for name in ("workflow", "src", "config", "profiles"):
        shutil.copytree(REPO_ROOT / name, moved / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = snakemake_command(moved, "-n", configfile=moved / CONFIG)
    cmd[cmd.index("--snakefile") + 1] = str(moved / "workflow" / "Snakefile")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
