"""Every reshaping of results: tagging a stage's rows with their cell, the grid's tables, the
final-epoch summary, and the tidy frame each figure draws (:mod:`ncrobust.figures.plots` only draws).

Metrics table (long, tidy: :data:`ncrobust.columns.METRIC_COLUMNS`, one value a row, tagged with its
cell and epoch). ``norm`` is the threat model a perturbation used (clean rows carry the cell's
own); ``layer`` is a tap name or ``penultimate`` and ``layer_index`` its position in the forward
pass; per-class values (``*_per_class``) have ``class``, matrices (``leap``) have ``row`` and
``col``; scalars have none of them.
"""

from __future__ import annotations

import math

import pandas as pd

from ncrobust.cell import Cell
from ncrobust.columns import CELL_COLUMNS, METRIC_COLUMNS, PENULTIMATE, RESULT_COLUMNS, SETTING_COLUMNS, TRAINING_COLUMNS
from ncrobust.stages import VARIANT_PARTS

# Final-epoch summary: (split, perturbation, layer, metric) -> column name (the cell's own threat model).
SUMMARY_METRICS = {
    ("train", "clean", PENULTIMATE, "accuracy"): "train_accuracy",
    ("train", "pgd", PENULTIMATE, "accuracy"): "train_robust_accuracy",
    ("test", "clean", PENULTIMATE, "accuracy"): "test_accuracy",
    ("test", "pgd", PENULTIMATE, "accuracy"): "test_robust_accuracy",
    ("train", "clean", PENULTIMATE, "nc1"): "nc1_clean",
    ("train", "pgd", PENULTIMATE, "nc1"): "nc1_pgd",
    ("train", "clean", PENULTIMATE, "nc2_equinorm_M"): "nc2_equinorm_clean",
    ("train", "pgd", PENULTIMATE, "nc2_equinorm_M"): "nc2_equinorm_pgd",
    ("train", "clean", PENULTIMATE, "nc2_equiangle_M"): "nc2_equiangle_clean",
    ("train", "pgd", PENULTIMATE, "nc2_equiangle_M"): "nc2_equiangle_pgd",
    ("train", "clean", PENULTIMATE, "nc3"): "nc3_clean",
    ("train", "pgd", PENULTIMATE, "nc3"): "nc3_pgd",
    ("train", "clean", PENULTIMATE, "nc4"): "nc4_clean",
    ("train", "pgd", PENULTIMATE, "nc4"): "nc4_pgd",
    ("train", "pgd", PENULTIMATE, "ncc_accuracy_clean_means"): "ncc_accuracy_clean_means_pgd",
    ("test", "pgd", PENULTIMATE, "ncc_accuracy_clean_means"): "test_ncc_accuracy_clean_means_pgd",
    ("train", "pgd", PENULTIMATE, "alignment_angle"): "alignment_angle_pgd",
    ("train", "pgd", PENULTIMATE, "leap_rate"): "leap_rate_pgd",
    ("train", "pgd-targeted", PENULTIMATE, "target_hit_rate"): "target_hit_rate",
    # imbalanced training data only (absent without minority classes, so absent from the columns)
    ("train", "clean", PENULTIMATE, "minority_cos_W"): "minority_cos_W",
    ("train", "clean", PENULTIMATE, "minority_cos_M"): "minority_cos_M_clean",
    ("train", "pgd", PENULTIMATE, "minority_cos_M"): "minority_cos_M_pgd",
    ("test", "clean", PENULTIMATE, "minority_accuracy"): "test_minority_accuracy",
    ("test", "pgd", PENULTIMATE, "minority_accuracy"): "test_minority_robust_accuracy",
}


# ---------------------------------------------------------------------------------------------
# one stage's rows


def tag(frame: pd.DataFrame, cell: Cell, epoch: int | None = None) -> pd.DataFrame:
    """``frame`` with the cell's columns (and ``epoch``) in front: how every stage's rows join the grid."""
    frame = frame.copy()
    values = cell.as_dict()
    front = {column: values[column] for column in CELL_COLUMNS} | ({} if epoch is None else {"epoch": int(epoch)})
    for i, (column, value) in enumerate(front.items()):
        frame.insert(i, column, value)
    return frame.astype({"seed": "int64", **({} if epoch is None else {"epoch": "int64"})})


def metrics_frame(results: pd.DataFrame, cell: Cell, epoch: int) -> pd.DataFrame:
    """The long-format metrics table of one checkpoint of one cell (``results``: the evaluation
    core's tidy rows, :data:`ncrobust.columns.RESULT_COLUMNS`)."""
    return tag(results[RESULT_COLUMNS], cell, epoch)[METRIC_COLUMNS]


def training_frame(rows: list[dict], cell: Cell) -> pd.DataFrame:
    """One row per epoch of a training segment (:func:`ncrobust.training.train.train_segment`'s rows),
    tagged with the cell; columns beyond :data:`ncrobust.columns.TRAINING_COLUMNS` are kept after them."""
    frame = tag(pd.DataFrame(rows).rename(columns={"loss": "loss_value"}), cell)
    extra = [c for c in frame.columns if c not in TRAINING_COLUMNS]
    return frame[TRAINING_COLUMNS + extra].astype({"epoch": "int64"})


def stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The grid's table from per-job tables (empty ones skipped)."""
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------
# selections shared by the summary and the figures


def scalars(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows that are one number per set (no ``class``, ``row`` or ``col`` index)."""
    return metrics[metrics["class"].isna() & metrics["row"].isna()]


def own_threat(frame: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows under each cell's own threat model (the norm of its clean rows in ``reference``, by
    default ``frame``): drops the extra norms an ``st`` cell may be evaluated under
    (``evaluation.norms``). Works on metrics and projections."""
    reference = frame if reference is None else reference
    own = reference[reference["perturbation"] == "clean"].groupby(CELL_COLUMNS)["norm"].first().rename("own_norm")
    merged = frame.join(own, on=CELL_COLUMNS)
    return frame[(merged["norm"] == merged["own_norm"]).to_numpy()]


def final_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows at the last epoch of each cell."""
    keys = [c for c in CELL_COLUMNS if c in frame.columns]
    return frame[frame["epoch"] == frame.groupby(keys)["epoch"].transform("max")]


def varying_settings(frame: pd.DataFrame) -> list[str]:
    """The dataset/model/loss/variant columns that take several values (they become line styles)."""
    return [c for c in SETTING_COLUMNS if c in frame.columns and frame[c].nunique() > 1]


def with_setting(frame: pd.DataFrame, varying: list[str] | None = None) -> pd.DataFrame:
    """Add a ``setting`` column naming the dataset/model/loss/variant values that vary in the grid."""
    varying = varying_settings(frame) if varying is None else varying
    frame = frame.copy()
    frame["setting"] = frame[varying].astype(str).agg(" / ".join, axis=1) if varying else ""
    return frame


def constant_setting(frame: pd.DataFrame) -> str:
    """The dataset/model/loss/variant values shared by every row, joined for a title."""
    return " / ".join(str(frame[c].iloc[0]) for c in SETTING_COLUMNS if c in frame.columns and len(frame) and frame[c].nunique() == 1)


# ---------------------------------------------------------------------------------------------
# the grid's summary


def robustness_by_cell(robustness: pd.DataFrame) -> pd.DataFrame:
    """Per cell, on the strong evaluation's samples (``evaluation.strong``: the first ``max_samples``
    of its split): ``strong_pgd_robust_accuracy`` (the evaluation's own PGD-10 there: with all samples,
    the summary's ``test_robust_accuracy``), ``strong_robust_accuracy`` (the per-example worst case
    over PGD-10 and the strong attacks) and ``pgd_gap``, the first minus the second (large: gradient
    masking). Naming the subset's PGD-10 keeps ``pgd_gap`` the difference of two columns of the table."""
    wide = robustness.pivot_table(index=CELL_COLUMNS, columns="attack", values="robust_accuracy").reset_index()
    strongest = "worst" if "worst" in wide.columns else "pgd"
    out = wide[CELL_COLUMNS].copy()
    out["strong_pgd_robust_accuracy"] = wide["pgd"]
    out["strong_robust_accuracy"] = wide[strongest]
    out["pgd_gap"] = wide["pgd"] - wide[strongest]
    return out


def summary(metrics: pd.DataFrame, robustness: pd.DataFrame | None = None) -> pd.DataFrame:
    """Final-epoch values per cell (mean and std over seeds) of the headline quantities
    (:data:`SUMMARY_METRICS`; NC and perturbation quantities on the train split, as Su et al.,
    under each cell's own threat model). One row per (dataset, model, loss, adversary, variant) and
    ``epoch``, each cell's last: one epoch per setting in a finished grid, maybe several in a partial one."""
    group = ["dataset", "model", "loss", "adversary", "variant"]
    if metrics.empty or not set(METRIC_COLUMNS) <= set(metrics.columns):
        return pd.DataFrame(columns=[*group, "seeds", "epoch"])
    final = final_epoch(own_threat(scalars(metrics)))
    keys = pd.Series(list(zip(final["split"], final["perturbation"], final["layer"], final["metric"])), index=final.index)
    picked = final[keys.isin(SUMMARY_METRICS.keys())].copy()
    picked["quantity"] = [SUMMARY_METRICS[k] for k in zip(picked["split"], picked["perturbation"], picked["layer"], picked["metric"])]
    wide = picked.pivot_table(index=CELL_COLUMNS + ["epoch"], columns="quantity", values="value").reset_index()
    if wide.empty:
        return pd.DataFrame(columns=[*group, "seeds", "epoch"])
    extra = []
    if robustness is not None and not robustness.empty:
        wide = wide.merge(robustness_by_cell(robustness), on=CELL_COLUMNS, how="left")
        extra = ["strong_pgd_robust_accuracy", "strong_robust_accuracy", "pgd_gap"]
    quantities = [q for q in SUMMARY_METRICS.values() if q in wide.columns] + extra
    # by epoch too: seeds of a partial grid (ncrobust.collect) may have reached different epochs, and
    # a mean is over seeds at one epoch; a finished grid has one final epoch per setting
    keys = [*group, "epoch"]
    agg = wide.groupby(keys)[quantities].agg(["mean", "std"])
    agg.columns = [f"{q}_{stat}" for q, stat in agg.columns]
    columns = list(agg.columns)
    agg.insert(0, "seeds", wide.groupby(keys)["seed"].nunique())
    return agg.reset_index()[[*group, "seeds", "epoch", *columns]]


def summary_markdown(table: pd.DataFrame) -> str:
    """The summary as a Markdown table: ``mean ± std`` per quantity."""
    group = ["dataset", "model", "loss", "adversary", "variant", "seeds", "epoch"]
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


# ---------------------------------------------------------------------------------------------
# what each figure draws (tidy frames; ncrobust.figures.plots takes them as they are)

NC_FIGURE_METRICS = ["nc1", "nc2_equinorm_M", "nc2_equiangle_M", "nc2_equinorm_W", "nc2_equiangle_W", "nc3", "nc4"]
CLASSIFIER_METRICS = ["nc2_equinorm_W", "nc2_equiangle_W"]  # of W alone: the same in every set of a checkpoint
LAYERWISE_METRICS = ["nc1", "ncc_accuracy_clean_means", "ncc_accuracy"]


def _penultimate(metrics: pd.DataFrame) -> pd.DataFrame:
    return own_threat(scalars(metrics[metrics["layer"] == PENULTIMATE]))


def nc_curves(metrics: pd.DataFrame, split: str = "train") -> pd.DataFrame:
    """NC1-NC4 of the penultimate features against epoch, every perturbation; NC2 of the
    classifier rows (:data:`CLASSIFIER_METRICS`) once, from the clean rows (W does not depend on the set)."""
    m = _penultimate(metrics)
    m = m[(m["split"] == split) & m["metric"].isin(NC_FIGURE_METRICS)]
    m = m[~m["metric"].isin(CLASSIFIER_METRICS) | (m["perturbation"] == "clean")]
    return with_setting(m, varying_settings(metrics))


def accuracy_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """Network accuracy against the *true* labels: ``accuracy`` on clean data,
    ``accuracy_true_labels`` on perturbed data (for ``pgd-targeted``, ``accuracy`` is the hit rate)."""
    m = _penultimate(metrics)
    wanted = ((m["perturbation"] == "clean") & (m["metric"] == "accuracy")) | (
        (m["perturbation"] != "clean") & (m["metric"] == "accuracy_true_labels")
    )
    return with_setting(m[wanted], varying_settings(metrics))


def training_curves(training: pd.DataFrame | None, varying: list[str]) -> pd.DataFrame | None:
    """The per-epoch training log with the ``setting`` column of the metrics' figures."""
    if training is None or training.empty or "epoch" not in training.columns:
        return None
    return with_setting(training, varying)


def alignment_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean angle between clean and perturbed centred class means, against epoch."""
    m = _penultimate(metrics)
    return with_setting(m[m["metric"] == "alignment_angle"], varying_settings(metrics))


EPOCH_COLLAPSE_METRICS = [*NC_FIGURE_METRICS, "alignment_angle"]


def epoch_collapse_curves(epoch_metrics: pd.DataFrame) -> pd.DataFrame:
    """NC1-NC4 and the alignment angle of the training-time examples against epoch (the
    per-epoch measurement, ``training.epoch_measure``), clean and perturbed."""
    if epoch_metrics.empty:
        return epoch_metrics
    m = _penultimate(epoch_metrics)
    return with_setting(m[m["metric"].isin(EPOCH_COLLAPSE_METRICS)], varying_settings(epoch_metrics))


TARGET_HIT_METRICS = ["target_hit_rate", "target_hit_rate_ncc"]


def target_hit_rates(metrics: pd.DataFrame) -> pd.DataFrame:
    """How often ``pgd-targeted`` reached its target, per cell, split and seed at the cell's final
    epoch (own threat model, penultimate layer): ``target_hit_rate`` (network argmax = target) and
    ``target_hit_rate_ncc`` (nearest clean class mean = target), with the ``setting`` column of the
    figures. Every figure that draws the targeted set names these next to it. Empty without targeted
    sets."""
    columns = ["setting", "adversary", "seed", "split", "epoch", "metric", "value"]
    m = _penultimate(metrics)
    m = m[(m["perturbation"] == "pgd-targeted") & m["metric"].isin(TARGET_HIT_METRICS)]
    if m.empty:
        return pd.DataFrame(columns=columns)
    return with_setting(final_epoch(m), varying_settings(metrics))[columns].reset_index(drop=True)


def leap_matrices(metrics: pd.DataFrame, split: str = "train", perturbations=("pgd", "pgd-targeted")) -> pd.DataFrame:
    """The leap matrix ``L[row, col]`` at each cell's final epoch, mean over seeds: one row per
    (setting, adversary, perturbation, row, col), with the epochs it averages."""
    m = metrics[(metrics["layer"] == PENULTIMATE) & (metrics["metric"] == "leap") & (metrics["split"] == split)]
    m = final_epoch(own_threat(m[m["perturbation"].isin(perturbations)], metrics))
    m = with_setting(m, varying_settings(metrics))
    keys = ["setting", "adversary", "perturbation", "row", "col"]  # setting names dataset/model/loss when they vary
    if m.empty:
        return pd.DataFrame(columns=[*keys, "value", "epochs", "seeds"])
    out = m.groupby(keys, observed=True).agg(value=("value", "mean"), seeds=("seed", "nunique")).reset_index()
    epochs = m.groupby(["setting", "adversary", "perturbation"])["epoch"].agg(lambda e: "/".join(map(str, sorted(set(e)))))
    return out.join(epochs.rename("epochs"), on=["setting", "adversary", "perturbation"])


def layer_profiles(metrics: pd.DataFrame, split: str = "train") -> pd.DataFrame:
    """NC1 and NCC accuracy (own and clean means) per layer at the final epoch; ``depth`` is the
    1-based tap position from ``layer_index``. ``pgd-targeted`` is left out (grouped by target)."""
    m = own_threat(scalars(metrics))
    m = m[(m["split"] == split) & (m["perturbation"] != "pgd-targeted") & m["metric"].isin(LAYERWISE_METRICS)]
    m = with_setting(final_epoch(m), varying_settings(metrics))
    return m.assign(depth=m["layer_index"] + 1)


def ncc_robustness_points(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per cell, split and epoch: the network's accuracy under PGD against the NCC accuracy of the
    PGD features with the clean means; ``final`` marks each cell's last epoch."""
    m = _penultimate(metrics)
    m = m[(m["perturbation"] == "pgd") & m["metric"].isin(["accuracy_true_labels", "ncc_accuracy_clean_means"])]
    keys = [*SETTING_COLUMNS, "adversary", "seed", "epoch", "split"]
    wide = m.pivot_table(index=keys, columns="metric", values="value").reset_index()
    if wide.empty or not {"accuracy_true_labels", "ncc_accuracy_clean_means"} <= set(wide.columns):
        return pd.DataFrame(columns=[*keys, "accuracy", "ncc_accuracy_clean_means", "final", "setting"])
    wide = wide.rename(columns={"accuracy_true_labels": "accuracy"})
    wide["final"] = wide["epoch"] == wide.groupby([*SETTING_COLUMNS, "adversary", "seed"])["epoch"].transform("max")
    return with_setting(wide, varying_settings(metrics))


def simplex_points(projection: pd.DataFrame | None, split: str = "train") -> pd.DataFrame:
    """Projected features of each (setting, adversary): its first seed at its final epoch, under
    the cell's own threat model."""
    if projection is None or projection.empty:
        return pd.DataFrame(columns=["setting", "adversary", "perturbation", "kind", "label", "x", "y"])
    p = with_setting(own_threat(projection[projection["split"] == split]))
    p = p[p["seed"] == p.groupby(["setting", "adversary"])["seed"].transform("min")]
    return p[p["epoch"] == p.groupby(["setting", "adversary"])["epoch"].transform("max")]


IMBALANCE_CLASS_METRICS = ["mean_norm_per_class", "classifier_norm_per_class"]
IMBALANCE_SCALAR_METRICS = ["minority_cos_M", "minority_cos_W"]
IMBALANCE_COLUMNS = ["group", "adversary", "perturbation", "metric", "class", "class_count", "ratio", "value", "seeds", "epochs"]


def _flat(overrides, prefix=""):
    for key, value in sorted(overrides.items()):
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def variant_groups(variants: dict, ignore: tuple[str, ...] = ("dataset.imbalance",)) -> dict[str, str]:
    """Each variant's overrides (``config.variants``) but those under ``ignore``, as one label
    (``"model.bias=False"``; ``""`` for none): variants that differ only in what a figure puts on
    its x axis (the imbalance ratio) fall in one group."""
    return {  # the overrides only: a variant's `adversaries` says which cells it has, not what they compute
        name: ", ".join(f"{key}={value}" for key, value in _flat({k: entry[k] for k in VARIANT_PARTS if k in entry})
                        if not key.startswith(ignore))
        for name, entry in variants.items()
    }


def imbalance_geometry(metrics: pd.DataFrame, split: str = "train", perturbations=("clean", "pgd"), variants: dict | None = None) -> pd.DataFrame:
    """The geometry of imbalanced training at each cell's final epoch, mean over seeds, for the
    ``imbalance`` figure: per class (``class``, with the class's training count ``class_count``)
    the norms of the centred class means (clean and each of ``perturbations``) and of the
    classifier rows (one per network: on the ``clean`` rows only), and per cell the minority
    cosines ``minority_cos_M`` (each perturbation) and ``minority_cos_W`` (``clean`` rows only).

    ``ratio`` is each cell's measured imbalance ``max / min`` of its training class counts
    (``train_class_count``), the figure's x axis for the minority cosines. ``group`` tells apart
    the points of different settings: the varying dataset/model/loss values, and each variant's
    overrides other than the imbalance (:func:`variant_groups` of ``variants``, the config's
    ``variants``; without it, the variant's name), so that the variants of one recipe at several
    ratios form one series. Empty when the table has no class counts.
    """
    wanted = ["train_class_count", *IMBALANCE_CLASS_METRICS, *IMBALANCE_SCALAR_METRICS]
    m = metrics[(metrics["layer"] == PENULTIMATE) & (metrics["split"] == split) & metrics["metric"].isin(wanted)
                & metrics["perturbation"].isin(perturbations)]
    m = final_epoch(own_threat(m, metrics))
    if m.empty or not (m["metric"] == "train_class_count").any():
        return pd.DataFrame(columns=IMBALANCE_COLUMNS)
    m = with_setting(m, [c for c in varying_settings(metrics) if c != "variant"])
    labels = variant_groups(variants or {})
    recipe = m["variant"].map(lambda v: labels.get(v, "" if v == "base" else v))
    m["group"] = [" / ".join(p for p in parts if p) for parts in zip(m["setting"], recipe)]
    counts = m[(m["metric"] == "train_class_count") & (m["perturbation"] == m["perturbation"].iloc[0])]
    counts = counts.groupby([*CELL_COLUMNS, "class"])["value"].first().rename("class_count").reset_index()
    ratio = counts.groupby(CELL_COLUMNS)["class_count"].agg(lambda c: c.max() / c.min()).rename("ratio")
    # one classifier per network: its rows (and their minority cosine) come from the clean set
    per_network = m["metric"].isin(["classifier_norm_per_class", "minority_cos_W"])
    m = m[(m["metric"] != "train_class_count") & (~per_network | (m["perturbation"] == "clean"))]
    m = m.merge(counts, on=[*CELL_COLUMNS, "class"], how="left").join(ratio, on=CELL_COLUMNS)
    # a cell is its own point (its ratio); seeds of one (group, adversary, ratio) are averaged
    m["ratio"] = m["ratio"].round(6)
    keys = ["group", "adversary", "perturbation", "metric", "ratio", "class"]
    out = m.groupby(keys, dropna=False, observed=True).agg(
        class_count=("class_count", "mean"), value=("value", "mean"), seeds=("seed", "nunique"),
        epochs=("epoch", lambda e: "/".join(map(str, sorted(set(e))))),
    ).reset_index()
    return out[IMBALANCE_COLUMNS]


# ---------------------------------------------------------------------------------------------
# related questions: the mixup geometry and the near-collapse probe


def _grouped(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``group``: the dataset/model/loss/variant values that vary (:func:`with_setting`;
    ``""`` when none does), the facet of the ``mixup`` and ``probe`` figures, and ``others``: the
    same without the variant."""
    varying = varying_settings(frame)
    others = with_setting(frame, [c for c in varying if c != "variant"])["setting"]
    frame = with_setting(frame, varying)
    return frame.assign(group=frame["setting"], others=others)


def mixup_points(points: pd.DataFrame, pair: str | None = None) -> pd.DataFrame:
    """The mixed examples of one class pair (``pair`` like ``"0-1"``; default the first present)
    for the ``mixup`` figure: each (group, adversary)'s first seed at its final epoch, with the
    ``group`` column of :func:`_grouped`."""
    if points is None or points.empty:
        return pd.DataFrame()
    pair = pair if pair is not None else sorted(points["pair"].unique(), key=lambda p: [int(c) for c in p.split("-")])[0]
    p = _grouped(final_epoch(points[points["pair"] == pair]))
    keys = ["group", "adversary"]
    return p[p["seed"] == p.groupby(keys)["seed"].transform("min")].reset_index(drop=True)


def mixup_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The mixup geometry's summary numbers at each cell's final epoch, mean over seeds and pairs:
    ``group, variant, adversary, perturbation, metric, value, seeds``."""
    columns = ["group", "variant", "adversary", "perturbation", "metric", "value", "seeds"]
    if summary is None or summary.empty:
        return pd.DataFrame(columns=columns)
    s = _grouped(final_epoch(summary))
    s = s[s["pair"] == "all"] if "pair" in s.columns else s
    out = s.groupby(["group", "variant", "adversary", "perturbation", "metric"], dropna=False).agg(
        value=("value", "mean"), seeds=("seed", "nunique")).reset_index()
    return out[columns]


def probe_curves(probe: pd.DataFrame) -> pd.DataFrame:
    """The near-collapse probe at each cell's final epoch, long: ``group, others, variant,
    adversary, perturbation, layer, lam, metric (nc1_input, nc1_solution, nc1_ratio), value, seed``
    (seeds kept, the figure draws a mean with a seed band)."""
    columns = ["group", "others", "variant", "adversary", "perturbation", "layer", "lam", "seed", "metric", "value"]
    if probe is None or probe.empty:
        return pd.DataFrame(columns=columns)
    p = _grouped(final_epoch(probe))
    long = p.melt(id_vars=["group", "others", "variant", "adversary", "perturbation", "layer", "lam", "seed"],
                  value_vars=["nc1_input", "nc1_solution", "nc1_ratio"], var_name="metric", value_name="value")
    return long[columns]
