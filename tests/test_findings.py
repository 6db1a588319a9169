"""Findings blocks (ncrobust.findings): generated from synthetic tables with the real columns, each
sentence follows its numbers (swap them and its direction flips), and `check` fails naming the
block and the number when a document's copy differs from the run's."""

import copy
import re

import pandas as pd
import pytest
import yaml
from workflow_helpers import REPO_ROOT

from ncrobust import findings, tables
from ncrobust.columns import METRIC_COLUMNS, ROBUSTNESS_COLUMNS
from ncrobust.findings import (
    BN_EVAL_VARIANT, FindingsError, Tables, compare, differences, marked, pick, span, times, updated,
)

SEEDS = (1, 2)
SPREAD = {1: -0.01, 2: 0.01}  # seed 1 lies below the mean, seed 2 above: the mean is the stated value
# (loss, adversary, variant) -> final-epoch values (means over the seeds)
DEFAULT = {
    ("ce", "st", "base"): dict(nc1_clean=0.055, nc1_pgd=1.32, ncc_pgd=0.61, leap=0.39, angle=19.4, pgd10=0.54, worst=0.51, hit=0.65),
    ("ce", "pgd-linf", "base"): dict(nc1_clean=0.088, nc1_pgd=0.28, ncc_pgd=0.97, leap=0.03, angle=10.2, pgd10=0.86, worst=0.85, hit=0.02),
    ("ce", "trades-linf", "base"): dict(nc1_clean=0.096, nc1_pgd=0.255, ncc_pgd=0.94, leap=0.06, angle=8.0, pgd10=0.88, worst=0.87, hit=0.03),
    ("ce", "trades-linf", BN_EVAL_VARIANT): dict(nc1_clean=0.174, nc1_pgd=0.452, ncc_pgd=0.90, leap=0.10, angle=9.0, pgd10=0.85, worst=0.84, hit=0.04),
    ("mse", "st", "base"): dict(nc1_clean=0.133, nc1_pgd=0.94, ncc_pgd=0.72, leap=0.28, angle=14.4, pgd10=0.57, worst=0.44, hit=0.55),
    ("mse", "pgd-linf", "base"): dict(nc1_clean=0.14, nc1_pgd=0.43, ncc_pgd=0.84, leap=0.16, angle=10.0, pgd10=0.80, worst=0.76, hit=0.05),
}


def _row(cell, seed, epoch, split, perturbation, metric, value, **index):
    loss, adversary, variant = cell
    return dict(dataset="digits", model="mlp", loss=loss, adversary=adversary, variant=variant, seed=seed, epoch=epoch,
                split=split, norm="linf", perturbation=perturbation, layer="penultimate", layer_index=3, metric=metric,
                **{"class": index.get("cls"), "row": None, "col": None}, value=value)


def metrics_frame(values: dict) -> pd.DataFrame:
    """The metrics table of a grid whose final-epoch means are ``values`` (epoch 0: nc1 1.0)."""
    rows = []
    for cell, v in values.items():
        for seed in SEEDS:
            d = SPREAD[seed]
            rows.append(_row(cell, seed, 0, "train", "clean", "nc1", 1.0))
            final = {
                ("train", "clean", "nc1"): v["nc1_clean"], ("train", "pgd", "nc1"): v["nc1_pgd"],
                ("train", "pgd", "ncc_accuracy_clean_means"): v["ncc_pgd"], ("train", "pgd", "leap_rate"): v["leap"],
                ("train", "pgd", "alignment_angle"): v["angle"],
                ("test", "clean", "accuracy"): v.get("test", 0.97), ("test", "pgd", "accuracy"): v["pgd10"],
            }
            if "hit" in v:
                final["train", "pgd-targeted", "target_hit_rate"] = v["hit"]
            for (split, perturbation, metric), value in final.items():
                rows.append(_row(cell, seed, 60, split, perturbation, metric, value + d * value))
            for metric, value in v.get("extra", {}).items():  # (split, perturbation, metric) -> value
                rows.append(_row(cell, seed, 60, *metric, value + d * abs(value)))
    return pd.DataFrame(rows)[METRIC_COLUMNS]


def robustness_frame(values: dict) -> pd.DataFrame:
    rows = []
    for (loss, adversary, variant), v in values.items():
        for seed in SEEDS:
            d = SPREAD[seed]
            for attack, value in (("clean", 0.97), ("pgd", v["pgd10"]), ("apgd-ce", v["worst"]), ("worst", v["worst"])):
                rows.append(dict(dataset="digits", model="mlp", loss=loss, adversary=adversary, variant=variant, seed=seed,
                                 epoch=60, split="test", norm="linf", attack=attack, attack_loss="ce",
                                 robust_accuracy=value + d * value, samples=450))
    return pd.DataFrame(rows)[ROBUSTNESS_COLUMNS]


def grid_tables(values=DEFAULT, robustness=True) -> Tables:
    """The Tables of a grid: the summary made by the workflow's own ``tables.summary``."""
    metrics = metrics_frame(values)
    strong = robustness_frame(values) if robustness else None
    return Tables(summary=tables.summary(metrics, strong), metrics=metrics, robustness=strong)


def with_values(changes: dict) -> dict:
    values = copy.deepcopy(DEFAULT)
    for cell, quantities in changes.items():
        values[cell].update(quantities)
    return values


def bullet(text: str, start: str, after: str | None = None) -> str:
    """The first line of ``text`` (after the line containing ``after``) that starts with ``start``."""
    lines = text.splitlines()
    if after is not None:
        lines = lines[next(i for i, line in enumerate(lines) if after in line):]
    return next(line.strip() for line in lines if line.strip().startswith(start))


# ------------------------------------------------------------------------------------ wording


def test_comparisons_in_words_by_hand():
    assert times(1.32, 0.055) == "24 times larger" and times(0.28, 1.32) == "4.7 times smaller"
    assert times(1.004, 1.0) == "about equal"
    assert compare(0.0551, 0.0549) == 0 and compare(0.056, 0.055) == 1 and compare(0.054, 0.055) == -1  # printed 0.055
    assert pick(2.0, 1.0, "up", "down", "same") == "up" and pick(1.0, 2.0, "up", "down", "same") == "down"
    assert span([0.21, 0.26, 0.24], findings.two) == "0.21 to 0.26" and span([0.211, 0.209], findings.two) == "0.21"
    assert findings.nc(0.0551) == "0.055" and findings.nc(1.3226) == "1.32" and findings.two(-0.001) == "0.00"


# ------------------------------------------------------------------------------------ the default block


def test_the_default_block_states_the_seed_means_of_the_tables():
    block = findings.block("default", grid_tables())
    metrics = metrics_frame(DEFAULT)
    # an independent reference: the mean over seeds of the final rows, straight from the metrics table
    final = metrics[(metrics.epoch == 60) & (metrics.split == "train")]
    st = final[(final.adversary == "st") & (final.loss == "ce")]
    nc1_pgd = st[(st.perturbation == "pgd") & (st.metric == "nc1")].value.mean()
    nc1_clean = st[(st.perturbation == "clean") & (st.metric == "nc1")].value.mean()
    row = bullet(block, "| ce | `st` | `base` |")
    assert row == "| ce | `st` | `base` | 0.055 | 1.32 | 0.610 | 0.390 | 19.4° | 0.650 | 0.540 / 0.510 |"
    assert f"`nc1_pgd` {nc1_pgd:.3g}, {nc1_pgd / nc1_clean:.2g} times larger than clean" in block
    assert "worst of APGD-CE)" in block.splitlines()[2]  # the header names the strong attacks of the table
    assert bullet(block, "| ce | `trades-linf` | `bn-eval` |").startswith("| ce | `trades-linf` | `bn-eval` | 0.174 | 0.452 |")
    assert "the clean features collapse during training (`nc1` 1.00 at epoch 0, 0.055 at epoch 60)" in block


def test_a_sentence_flips_with_its_numbers():
    pgd_line = "  - `pgd-linf`: its PGD features are"
    original = findings.block("default", grid_tables())
    assert "are more collapsed than `st`'s (`nc1_pgd` 0.280 against 1.32, 4.7 times smaller)" in bullet(original, pgd_line.strip())
    # swap which adversary collapses more under PGD
    swapped = with_values({("ce", "st", "base"): {"nc1_pgd": 0.28}, ("ce", "pgd-linf", "base"): {"nc1_pgd": 1.32}})
    flipped = findings.block("default", grid_tables(swapped))
    assert "are less collapsed than `st`'s (`nc1_pgd` 1.32 against 0.280, 4.7 times larger)" in bullet(flipped, pgd_line.strip())


def test_the_trades_conclusion_is_computed_for_each_batchnorm_handling():
    block = findings.block("default", grid_tables())
    verdict = bullet(block, "- Su et al.'s", after="With `ce`")
    assert verdict == ("- Su et al.'s \"TRADES collapses less than PGD-AT\" does not hold with BatchNorm in train mode and holds "
                       "with their eval-mode BatchNorm (`bn-eval`): here it follows from that BatchNorm handling.")
    assert "TRADES collapses less than PGD-AT on clean features and more under PGD" in block  # base: 0.096 > 0.088, 0.255 < 0.28
    # both handlings below PGD-AT's collapse: neither holds, and the attribution goes away
    lower = with_values({("ce", "trades-linf", BN_EVAL_VARIANT): {"nc1_clean": 0.05, "nc1_pgd": 0.2}})
    verdict = bullet(findings.block("default", grid_tables(lower)), "- Su et al.'s", after="With `ce`")
    assert verdict.endswith("does not hold with BatchNorm in train mode and does not hold with their eval-mode BatchNorm (`bn-eval`).")
    assert "TRADES collapses more than PGD-AT, clean and under PGD" in findings.block("default", grid_tables(lower))


def test_a_grid_without_trades_or_strong_attacks_gives_the_sentences_its_tables_hold():
    values = {cell: v for cell, v in DEFAULT.items() if cell[1] != "trades-linf"}
    block = findings.block("default", grid_tables(values, robustness=False))
    assert "trades" not in block and "Su et al." not in block
    assert "`pgd-linf`: its PGD features are more collapsed" in block
    assert "test robust accuracy (PGD-10) |" in block and "| ce | `st` | `base` | 0.055 | 1.32 | 0.610 | 0.390 | 19.4° | 0.650 | – |" in block


def test_the_targeted_sentence_states_the_hit_rates_and_whether_half_is_reached():
    block = findings.block("default", grid_tables())
    assert bullet(block, "- `pgd-targeted`", after="With `ce`") == (
        "- `pgd-targeted` reaches its target for at least half of `st`'s training samples (`target_hit_rate` 0.650); "
        "`pgd-linf` is steered to the target less often (0.020, 32 times less).")
    missed = with_values({("ce", "st", "base"): {"hit": 0.11}})
    assert bullet(findings.block("default", grid_tables(missed)), "- `pgd-targeted`", after="With `ce`").startswith(
        "- `pgd-targeted` does not reach its target for at least half of `st`'s training samples (`target_hit_rate` 0.110)")
    without = {cell: {k: x for k, x in v.items() if k != "hit"} for cell, v in DEFAULT.items()}
    assert "pgd-targeted" not in findings.block("default", grid_tables(without)).split("\n\n", 2)[2]


def test_the_attack_gap_sentence_compares_pgd10_with_the_worst_case_per_loss():
    block = findings.block("default", grid_tables())
    # mse: 0.57 - 0.44 and 0.80 - 0.76 against ce's 0.54 - 0.51 and 0.86 - 0.85: further above for both
    assert bullet(block, "- `mse`: PGD-10") == (
        "- `mse`: PGD-10 with the cells' attack loss (`evaluation.attack_loss`) stays further above the worst case than "
        "with `ce` (test robust accuracy PGD-10 / worst: `st` 0.570 / 0.440 against 0.540 / 0.510, `pgd-linf` 0.800 / "
        "0.760 against 0.860 / 0.850), so their PGD geometry is measured on points that a stronger attack moves further.")
    closer = with_values({("mse", "st", "base"): {"worst": 0.56}, ("mse", "pgd-linf", "base"): {"worst": 0.80}})
    assert "PGD-10 stays closer to the worst case than with `ce`" in findings.block("default", grid_tables(closer))
    assert "PGD-10" not in findings.block("default", grid_tables(robustness=False)).split("\n\n", 2)[2]


# ------------------------------------------------------------------------------------ check and update

PROSE = "# A document\n\nSome prose.\n\n{block}\nMore prose, kept as it is.\n"


@pytest.fixture
def run(tmp_path):
    """A results directory holding the synthetic grid's tables, and a document with its block."""
    grid = grid_tables()
    folder = tmp_path / "results/tables"
    folder.mkdir(parents=True)
    for name in ("summary", "metrics", "robustness"):
        getattr(grid, name).to_parquet(folder / f"{name}.parquet")
    doc = tmp_path / "DOC.md"
    doc.write_text(PROSE.format(block=marked("default", grid)))
    return tmp_path / "results", doc


def _cli(*args):
    return findings.main([str(a) for a in args])


def test_check_passes_on_the_runs_block_and_names_a_changed_number(run, capsys):
    results, doc = run
    assert _cli("check", doc, "--results", results, "--config", "default") == 0
    text = doc.read_text()
    line = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("| ce | `st` |"))
    doc.write_text(text.replace("| ce | `st` | `base` | 0.055 |", "| ce | `st` | `base` | 0.056 |"))
    capsys.readouterr()
    assert _cli("check", doc, "--results", results, "--config", "default") == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{doc}:{line}: findings:default: the document has '0.056', the run gives '0.055'"]


def test_check_names_a_flipped_word_and_a_missing_line(run, capsys):
    results, doc = run
    text = doc.read_text()
    text = text.replace("are more collapsed than", "are less collapsed than", 1)  # the ce bullet only
    text = "\n".join(line for line in text.splitlines() if not line.startswith("| mse | `st`")) + "\n"
    doc.write_text(text)
    assert _cli("check", doc, "--results", results, "--config", "default") == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(": findings:default: " in line for line in out)
    assert "the document has 'less', the run gives 'more'" in out[0] or "the document has 'less', the run gives 'more'" in out[1]
    assert any("a line the run gives is missing: '| mse | `st` | `base` | 0.133" in line for line in out)


def test_update_rewrites_the_block_and_nothing_else(run, capsys):
    results, doc = run
    good = doc.read_text()
    doc.write_text(good.replace("0.055", "9.999"))
    assert _cli("update", doc, "--results", results, "--config", "default") == 0
    assert doc.read_text() == good and "updated" in capsys.readouterr().out
    assert _cli("update", doc, "--results", results, "--config", "default") == 0
    assert "unchanged" in capsys.readouterr().out


def test_write_puts_the_block_under_results_findings(run):
    results, _ = run
    assert _cli("write", "--results", results, "--config", "default") == 0
    written = (results / "findings/default.md").read_text()
    assert _cli("check", results / "findings/default.md", "--results", results, "--config", "default") == 0
    assert written.startswith("# Findings: default")


def test_a_document_without_the_block_or_a_run_without_tables_is_one_line(run, tmp_path, capsys):
    results, doc = run
    assert _cli("check", doc, "--results", results, "--config", "imbalance") == 1
    err = capsys.readouterr().err
    assert err == (f"ncrobust: findings: {doc}: findings:imbalance: needs one line <!-- findings:imbalance:start --> and one "
                   "line <!-- findings:imbalance:end --> (found 0 and 0)\n")
    assert _cli("check", doc, "--results", tmp_path / "nothing", "--config", "default") == 1
    assert "summary.parquet: no such table; run the workflow first" in capsys.readouterr().err
    with pytest.raises(FindingsError, match="end marker comes before"):
        differences("<!-- findings:x:end -->\n<!-- findings:x:start -->\n", "x", grid_tables())
    with pytest.raises(FindingsError):
        updated("no markers\n", "default", grid_tables())


# ------------------------------------------------------------------------------------ imbalance and related

IMBALANCE_CELLS = {  # (loss, adversary) -> variant -> (cos_W, cos_M clean, cos_M pgd, minority acc clean, pgd)
    ("ce", "st"): {"r10": (0.08, 0.5, 0.1, 0.85, 0.28), "r100": (0.71, 0.98, -0.02, 0.0, 0.0),
                   "r10-nobias": (0.09, 0.5, 0.1, 0.8, 0.2), "r100-nobias": (0.72, 0.98, 0.0, 0.0, 0.0)},
    ("ce", "pgd-linf"): {"r10": (-0.05, 0.4, 0.2, 0.84, 0.55), "r100": (0.48, 0.77, 0.31, 0.1, 0.05),
                         "r10-nobias": (-0.06, 0.4, 0.2, 0.8, 0.5), "r100-nobias": (0.57, 0.88, 0.56, 0.1, 0.05)},
    ("mse", "st"): {v: (-0.05, 0.1, 0.06, 0.74, 0.10) for v in ("r10", "r100", "r10-nobias", "r100-nobias")},
    ("mse", "pgd-linf"): {v: (0.01, 0.14, 0.09, 0.69, 0.28) for v in ("r10", "r100", "r10-nobias", "r100-nobias")},
}


def imbalance_tables(cells=IMBALANCE_CELLS) -> Tables:
    values = {}
    for (loss, adversary), variants in cells.items():
        for variant, (cos_w, cos_m, cos_m_pgd, acc_clean, acc_pgd) in variants.items():
            extra = {("train", "clean", "minority_cos_W"): cos_w, ("train", "clean", "minority_cos_M"): cos_m,
                     ("train", "pgd", "minority_cos_M"): cos_m_pgd, ("test", "clean", "minority_accuracy"): acc_clean,
                     ("test", "pgd", "minority_accuracy"): acc_pgd, ("train", "clean", "orthogonality_W"): 0.07}
            values[(loss, adversary, variant)] = dict(nc1_clean=0.1, nc1_pgd=0.5, ncc_pgd=0.9, leap=0.1, angle=10.0, pgd10=0.5,
                                                      worst=0.5, test=0.5, extra=extra)
    metrics = metrics_frame(values)
    counts = [_row((loss, adversary, variant), seed, 60, "train", "clean", "train_class_count", n, cls=c)
              for (loss, adversary), variants in cells.items() for variant in variants for seed in SEEDS
              for c, n in enumerate([130] * 5 + [130 // (100 if "r100" in variant else 10)] * 5)]
    metrics = pd.concat([metrics, pd.DataFrame(counts)[METRIC_COLUMNS]], ignore_index=True)
    return Tables(summary=tables.summary(metrics), metrics=metrics)


def test_the_imbalance_block_has_the_readme_columns_and_follows_the_ratio():
    block = findings.block("imbalance", imbalance_tables())
    assert "| ce, `st` | 0.08 / 0.71 | 0.09 / 0.72 | 0.98 / -0.02 | 0.85 / 0.28 |" in block
    assert "rises from 0.08 to 0.71 for `st`" in block and "Adversarial training weakens it" in block
    assert "At ratio 100 (1 training image per minority class) the minority clean class means of `st`" in block
    assert "PGD-AT keeps more of the minorities' robustness: their PGD test accuracy is 0.55 against 0.28" in block
    assert "**With `mse`** the minority rows' mean cosine is -0.05 to 0.01" in block
    # the ratio's effect reversed for st: the sentence says so
    reversed_ = copy.deepcopy(IMBALANCE_CELLS)
    reversed_[("ce", "st")]["r10"], reversed_[("ce", "st")]["r100"] = reversed_[("ce", "st")]["r100"], reversed_[("ce", "st")]["r10"]
    flipped = findings.block("imbalance", imbalance_tables(reversed_))
    assert "falls from 0.71 to 0.08 for `st`" in flipped
    assert "Adversarial training does not weaken it throughout" in flipped  # pgd-linf's 0.48 now above st's 0.08


def related_tables(cross_mixup=18.0) -> Tables:
    values, angles, probe = {}, [], []
    for loss in ("ce", "mse"):
        for adversary in ("st", "pgd-linf"):
            for variant in ("base", "mixup", "normalized"):
                values[(loss, adversary, variant)] = dict(
                    nc1_clean={"base": 0.041, "mixup": 0.2, "normalized": 0.011}[variant], nc1_pgd=1.28, ncc_pgd=0.9, leap=0.1,
                    angle=10.0, pgd10={"base": 0.578, "mixup": 0.331, "normalized": 0.576}[variant], worst=0.5, test=0.98,
                    extra={("train", "clean", "nc3"): 0.26})
                for seed in SEEDS:
                    for perturbation in ("clean", "pgd"):
                        cross = {"base": 43.0, "mixup": cross_mixup, "normalized": 42.0}[variant] + (4 if perturbation == "pgd" else 0)
                        for metric, value in (("same_class_angle", 34.0), ("cross_boundary_angle", cross)):
                            for pair in ("0-1", "all"):
                                angles.append(dict(dataset="digits", model="mlp", loss=loss, adversary=adversary, variant=variant,
                                                   seed=seed, epoch=60, pair=pair, perturbation=perturbation, metric=metric,
                                                   value=value + SPREAD[seed], split="train"))
                        for lam in (0.01, 1.0, 1000.0):
                            ratio = {0.01: 0.001, 1.0: 0.24 if perturbation == "clean" else 0.15, 1000.0: 1.0}[lam]
                            probe.append(dict(dataset="digits", model="mlp", loss=loss, adversary=adversary, variant=variant,
                                              seed=seed, epoch=60, perturbation=perturbation, layer="penultimate", lam=lam,
                                              nc1_input=1.0, nc1_solution=ratio, nc1_ratio=ratio, split="train"))
    metrics = metrics_frame(values)
    return Tables(summary=tables.summary(metrics), metrics=metrics, mixup_geometry=pd.DataFrame(angles), probe=pd.DataFrame(probe))


def test_the_related_block_quotes_the_mixup_geometry_and_the_probe():
    block = findings.block("related", related_tables())
    assert "| ce | st | mixup | 0.980 | 0.331 | 0.200 | 1.28 | 34° / 34° | 18° / 22° | 0.24 / 0.15 |" in block
    assert "cross-class mixes move towards the boundary" in block and "(18° from it for `st`" in block
    assert "the clean features collapse less (`nc1` 0.200 against 0.041)" in block
    assert "to 0.24 of its value across the cells" in block and "at lambda = 0.01 at most 0.001" in block
    assert "Mixup costs robustness here: PGD-10 test accuracy 0.331 against 0.578 for `st`" in block
    away = findings.block("related", related_tables(cross_mixup=60.0))
    assert "cross-class mixes move away from the boundary" in away


# ------------------------------------------------------------------------------------ mnist1d


def test_the_mnist1d_block_checks_the_published_accuracy_then_gives_the_default_findings():
    """The external check compares `st`'s clean test accuracy (ce, seed mean) with the MNIST-1D
    paper's within the tolerance, and says whether it holds; the default block's table follows."""
    far = findings.block("mnist1d", grid_tables())
    assert "| `mlp` | 0.680 | 0.970 | +0.290 | no |" in far
    assert findings.default_block(grid_tables()) in far
    near = findings.block("mnist1d", grid_tables(with_values({("ce", "st", "base"): {"test": 0.70}})))
    assert "| `mlp` | 0.680 | 0.700 | +0.020 | yes |" in near
    assert "tolerance 0.05" in near and "Terminal phase" not in near  # one trained epoch: no half-way checkpoint


def test_the_mnist1d_terminal_phase_reads_the_training_logs_nc1():
    """Half-way and final in-step `nc1` of `st` (the training log, mean over seeds) and the train
    accuracy of the summary; the direction follows the numbers."""
    tabs = grid_tables(with_values({("ce", "st", "base"): {"extra": {("train", "clean", "accuracy"): 1.0}}}))

    def log(half, final):
        rows = [dict(dataset="digits", model="mlp", loss="ce", adversary="st", variant="base", seed=seed, epoch=epoch,
                     nc1_clean=value + SPREAD[seed] * value)
                for seed in SEEDS for epoch, value in ((30, half), (60, final))]
        return pd.DataFrame(rows)

    falling = findings.block("mnist1d", Tables(tabs.summary, tabs.metrics, tabs.robustness, training=log(0.5, 0.25)))
    line = bullet(falling, "- Terminal phase, `mlp` / `ce` `st`")
    assert line.startswith("- Terminal phase, `mlp` / `ce` `st`: train accuracy 1.000 at epoch 60;")
    assert "is still falling: 0.500 at epoch 30, 0.250 at epoch 60" in line
    rising = findings.block("mnist1d", Tables(tabs.summary, tabs.metrics, tabs.robustness, training=log(0.25, 0.5)))
    assert "rises: 0.250 at epoch 30, 0.500 at epoch 60" in bullet(rising, "- Terminal phase, `mlp` / `ce` `st`")


def test_the_mnist1d_layerwise_sentence_states_each_taps_nc1_and_the_gap():
    metrics = metrics_frame(DEFAULT)
    first = metrics[(metrics["metric"] == "nc1") & (metrics["epoch"] == 60)].copy()
    first["layer"], first["layer_index"] = "layer1", 1
    clean, pgd = first["perturbation"] == "clean", first["perturbation"] == "pgd"
    first.loc[clean, "value"], first.loc[pgd, "value"] = 2.0, 3.0  # PGD / clean 1.5 at layer1
    metrics = pd.concat([metrics, first], ignore_index=True)
    text = findings.block("mnist1d", Tables(summary=tables.summary(metrics, None), metrics=metrics))
    line = bullet(text, "- Layerwise `nc1` of `mlp`")
    assert "`st`: `layer1` 2.00 / 3.00, `penultimate` 0.055 / 1.32" in line
    assert "1.50 times the clean one at `layer1` and 24.00 times at `penultimate` (the gap widens" in line


# ------------------------------------------------------------------------------------ the shipped configs


def _config(name):
    return yaml.safe_load((REPO_ROOT / "config" / f"{name}.yaml").read_text())


def test_the_shipped_configs_name_their_block_and_define_the_variants_it_reads():
    default, imbalance, related = _config("config"), _config("imbalance"), _config("related")
    assert default["findings"] == "default" and imbalance["findings"] == "imbalance" and related["findings"] == "related"
    assert default["variants"][BN_EVAL_VARIANT] == {"training": {"trades_bn": "eval"}, "adversaries": ["trades-linf"], "losses": ["ce"]}
    assert default["training"]["trades_bn"] == "train" and BN_EVAL_VARIANT in default["grid"]["variant"]
    for name, (ratio, bias) in findings.IMBALANCE_VARIANTS.items():
        entry = imbalance["variants"][name]
        assert entry["dataset"] == {"imbalance": {"profile": "step", "ratio": ratio}}
        assert entry.get("model", {}).get("bias", True) is bias
    assert set(related["variants"]) == set(findings.RELATED_VARIANTS)
    assert findings.PROBE_LAMBDA in related["probe"]["lambdas"]
    mnist1d = _config("mnist1d")
    assert mnist1d["findings"] == "mnist1d" and set(mnist1d["grid"]["model"]) == set(findings.PUBLISHED_ACCURACY)
    assert mnist1d["variants"][BN_EVAL_VARIANT]["training"] == {"trades_bn": "eval"}


def test_the_mnist1d_page_holds_its_block_and_names_the_commands():
    page = (REPO_ROOT / "docs/mnist1d.md").read_text()
    words = " ".join(page.split())
    first, last = findings.locate(page, "mnist1d", "docs/mnist1d.md")
    assert first < last
    results = _config("mnist1d")["results"]
    assert f"python -m ncrobust.findings update docs/mnist1d.md --results {results} --config mnist1d" in words
    assert "snakemake --cores 2 --configfile config/mnist1d.yaml" in words
    assert "(docs/mnist1d.md)" in (REPO_ROOT / "README.md").read_text()  # the README points to the page


def test_the_docs_hold_each_block_between_its_markers_and_name_the_commands():
    """The default block is in the README, the variants' in docs/variants.md; each document names
    the commands that regenerate its block."""
    for name, config, doc in (("default", "config", "README.md"), ("imbalance", "imbalance", "docs/variants.md"),
                              ("related", "related", "docs/variants.md"), ("kernel", "kernel", "docs/kernel.md")):
        text = (REPO_ROOT / doc).read_text()
        words = " ".join(text.split())
        first, last = findings.locate(text, name, doc)
        assert first < last
        results = _config(config)["results"]
        assert f"python -m ncrobust.findings update {doc} --results {results} --config {name}" in words
        assert ("snakemake --cores 2" + ("" if name == "default" else f" --configfile config/{name}.yaml")) in words
    assert "python -m ncrobust.findings check README.md --results results --config default" in (REPO_ROOT / ".ci/run").read_text()


@pytest.mark.workflow
@pytest.mark.slow
def test_the_workflow_writes_the_findings_of_its_run(finished_tiny_run):
    """The tiny run (st and pgd-linf, no strong attacks) wrote results/findings/default.md, and it
    is what its tables give."""
    results = finished_tiny_run / "results"
    written = (results / "findings/default.md").read_text()
    assert "`pgd-linf`: its PGD features are" in written and "trades" not in written
    assert findings.differences(written, "default", Tables.read(results), "default.md") == []
    assert re.search(r"\| ce \| `st` \| `base` \| \d\.\d{3} \|", written)
