"""Parquet tables: the long-format metrics of one checkpoint, and the aggregation over the grid.

Metrics table columns (DESIGN.md): ``dataset, model, loss, adversary, seed, epoch, split,
perturbation, layer, metric, value``. ``layer`` is ``penultimate`` or a tap name; per-class and
matrix entries carry their indices in the metric name (``alignment_angle[3]``, ``leap[2,5]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .collapse import nc_metrics, perturbation_metrics
from .experiment import Cell

CELL_COLUMNS = ["dataset", "model", "loss", "adversary", "seed"]
METRIC_COLUMNS = [*CELL_COLUMNS, "epoch", "split", "perturbation", "layer", "metric", "value"]
ROBUSTNESS_COLUMNS = [*CELL_COLUMNS, "epoch", "split", "attack", "robust_accuracy", "samples"]
TRAINING_COLUMNS = [*CELL_COLUMNS, "epoch", "lr", "loss_value", "train_accuracy", "train_robust_accuracy", "test_accuracy", "seconds"]

# Final-epoch summary: (split, perturbation, layer, metric) -> column name.
SUMMARY_METRICS = {
    ("train", "clean", "penultimate", "accuracy"): "train_accuracy",
    ("train", "pgd", "penultimate", "accuracy"): "train_robust_accuracy",
    ("test", "clean", "penultimate", "accuracy"): "test_accuracy",
    ("test", "pgd", "penultimate", "accuracy"): "test_robust_accuracy",
    ("train", "clean", "penultimate", "nc1"): "nc1_clean",
    ("train", "pgd", "penultimate", "nc1"): "nc1_pgd",
    ("train", "clean", "penultimate", "nc2_equinorm_M"): "nc2_equinorm_clean",
    ("train", "pgd", "penultimate", "nc2_equinorm_M"): "nc2_equinorm_pgd",
    ("train", "clean", "penultimate", "nc2_equiangle_M"): "nc2_equiangle_clean",
    ("train", "pgd", "penultimate", "nc2_equiangle_M"): "nc2_equiangle_pgd",
    ("train", "clean", "penultimate", "nc3"): "nc3_clean",
    ("train", "pgd", "penultimate", "nc3"): "nc3_pgd",
    ("train", "clean", "penultimate", "nc4"): "nc4_clean",
    ("train", "pgd", "penultimate", "nc4"): "nc4_pgd",
    ("train", "pgd", "penultimate", "ncc_accuracy_clean_means"): "ncc_accuracy_clean_means_pgd",
    ("test", "pgd", "penultimate", "ncc_accuracy_clean_means"): "test_ncc_accuracy_clean_means_pgd",
    ("train", "pgd", "penultimate", "alignment_angle"): "alignment_angle_pgd",
    ("train", "pgd", "penultimate", "leap_rate"): "leap_rate_pgd",
}


def checkpoint_metrics(evaluation: dict) -> list[dict]:
    """All metrics of one evaluated checkpoint, as rows ``{split, perturbation, layer, metric, value}``."""
    rows: list[dict] = []
    results = evaluation["results"]
    C = evaluation["num_classes"]
    W, b = evaluation["classifier_weight"], evaluation["classifier_bias"]
    for key, entry in results.items():
        split, perturbation = key.split("/")
        labels = entry["labels"]
        group = entry.get("targets", labels)
        values = nc_metrics(entry["features"], group, num_classes=C, weight=W, bias=b, logits=entry["logits"])
        if perturbation != "clean":
            clean = results[f"{split}/clean"]
            values.update(
                perturbation_metrics(
                    clean["features"], clean["labels"], entry["features"], labels, num_classes=C, logits=entry["logits"]
                )
            )
            values["accuracy_true_labels"] = float((entry["logits"].argmax(1) == labels).double().mean())
        if "targets" in entry:
            values["target_hit_rate"] = float((entry["logits"].argmax(1) == entry["targets"]).double().mean())
        rows += [dict(split=split, perturbation=perturbation, layer="penultimate", metric=m, value=float(v)) for m, v in values.items()]
        for layer, stats in entry["layer_stats"].items():
            rows += [dict(split=split, perturbation=perturbation, layer=layer, metric=m, value=float(v)) for m, v in stats.items()]
    return rows


def metrics_frame(evaluation: dict, cell: Cell, epoch: int) -> pd.DataFrame:
    """The long-format metrics table of one checkpoint of one cell."""
    frame = pd.DataFrame(checkpoint_metrics(evaluation))
    for column, value in cell.as_dict().items():
        frame[column] = value
    frame["epoch"] = epoch
    return frame[METRIC_COLUMNS].astype({"seed": "int64", "epoch": "int64", "value": "float64"})


def training_frame(rows: list[dict], cell: Cell) -> pd.DataFrame:
    """One row per epoch of a training segment, tagged with the cell."""
    frame = pd.DataFrame(rows, columns=["epoch", "lr", "loss", "train_accuracy", "train_robust_accuracy", "test_accuracy", "seconds"])
    frame = frame.rename(columns={"loss": "loss_value"})
    for column, value in cell.as_dict().items():
        frame[column] = value
    return frame[TRAINING_COLUMNS].astype({"seed": "int64", "epoch": "int64"})


def concat(paths: list[str | Path]) -> pd.DataFrame:
    """Concatenate Parquet files (the aggregation of per-checkpoint tables)."""
    from .io import read_parquet

    frames = [read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def robustness_by_cell(robustness: pd.DataFrame) -> pd.DataFrame:
    """Per cell: ``strong_robust_accuracy`` (per-example worst case over the strong attacks) and
    ``pgd_gap`` = PGD-10 robust accuracy minus it, on the same samples (large: gradient masking)."""
    wide = robustness.pivot_table(index=CELL_COLUMNS, columns="attack", values="robust_accuracy").reset_index()
    strongest = "worst" if "worst" in wide.columns else "pgd"
    out = wide[CELL_COLUMNS].copy()
    out["strong_robust_accuracy"] = wide[strongest]
    out["pgd_gap"] = wide["pgd"] - wide[strongest]
    return out


def summary(metrics: pd.DataFrame, robustness: pd.DataFrame | None = None) -> pd.DataFrame:
    """Final-epoch values per cell (mean and std over seeds) of the headline quantities
    (:data:`SUMMARY_METRICS`; NC and perturbation quantities on the train split, as Su et al.).
    One row per (dataset, model, loss, adversary); an empty table gives an empty summary."""
    group = ["dataset", "model", "loss", "adversary"]
    if metrics.empty or not set(METRIC_COLUMNS) <= set(metrics.columns):
        return pd.DataFrame(columns=[*group, "seeds", "epoch"])
    final = metrics[metrics["epoch"] == metrics.groupby(CELL_COLUMNS)["epoch"].transform("max")]
    keys = pd.Series(list(zip(final["split"], final["perturbation"], final["layer"], final["metric"])), index=final.index)
    picked = final[keys.isin(SUMMARY_METRICS.keys())].copy()
    picked["quantity"] = [SUMMARY_METRICS[k] for k in zip(picked["split"], picked["perturbation"], picked["layer"], picked["metric"])]
    wide = picked.pivot_table(index=CELL_COLUMNS + ["epoch"], columns="quantity", values="value").reset_index()
    if wide.empty:
        return pd.DataFrame(columns=[*group, "seeds", "epoch"])
    extra = []
    if robustness is not None and not robustness.empty:
        wide = wide.merge(robustness_by_cell(robustness), on=CELL_COLUMNS, how="left")
        extra = ["strong_robust_accuracy", "pgd_gap"]
    quantities = [q for q in SUMMARY_METRICS.values() if q in wide.columns] + extra
    agg = wide.groupby(group)[quantities].agg(["mean", "std"])
    agg.columns = [f"{q}_{stat}" for q, stat in agg.columns]
    agg.insert(0, "seeds", wide.groupby(group)["seed"].nunique())
    agg.insert(1, "epoch", wide.groupby(group)["epoch"].max())
    return agg.reset_index()


def summary_markdown(table: pd.DataFrame) -> str:
    """The summary as a Markdown table: ``mean ± std`` per quantity."""
    group = ["dataset", "model", "loss", "adversary", "seeds", "epoch"]
    quantities = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    header = group + quantities
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row[g]) for g in group]
        for q in quantities:
            mean, std = row[f"{q}_mean"], row[f"{q}_std"]
            cells.append("" if pd.isna(mean) else f"{mean:.4g}" + ("" if pd.isna(std) or math.isnan(std) else f" ± {std:.2g}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
