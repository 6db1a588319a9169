"""Seaborn figures of the metrics and training tables. Every figure adapts to the grid: facets
come from the values present in the table (one adversary, many models, one seed all work), and
lines show the mean over seeds with a 95% band."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

ADVERSARY_ORDER = ["st", "pgd-linf", "pgd-l2", "trades-linf", "trades-l2"]
PERTURBATION_ORDER = ["clean", "pgd", "pgd-targeted", "gaussian", "sign"]
PERTURBATION_PALETTE = dict(zip(PERTURBATION_ORDER, sns.color_palette("colorblind", len(PERTURBATION_ORDER))))
NC_METRICS = {
    "nc1": "NC1  tr(Σ_W Σ_B⁺)/C",
    "nc2_equinorm_M": "NC2 equinorm (means)",
    "nc2_equiangle_M": "NC2 equiangle (means)",
    "nc3": "NC3 self-duality",
    "nc4": "NC4 1 − NCC agreement",
}


def _present(values, order):
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def _save(fig, path: str | Path) -> None:
    from .io import atomic_path

    path = Path(path)
    for target in (path, path.with_suffix(".pdf")):
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=target.suffix[1:], dpi=130, bbox_inches="tight")
    plt.close(fig)


def _style(frame: pd.DataFrame) -> str | None:
    """Line style distinguishes losses (or models) when the grid has several."""
    for column in ("loss", "model"):
        if frame[column].nunique() > 1:
            return column
    return None


def nc_vs_epoch(metrics: pd.DataFrame, path: str | Path, split: str = "train") -> None:
    """NC1-NC4 of the penultimate features against epoch: clean vs each perturbation, one column
    per adversary, one row per metric (log scale: the values span decades)."""
    m = metrics[(metrics["layer"] == "penultimate") & (metrics["split"] == split) & metrics["metric"].isin(NC_METRICS)].copy()
    m["metric"] = m["metric"].map(NC_METRICS)
    m = m[m["value"] > 0]
    grid = sns.relplot(
        data=m, x="epoch", y="value", kind="line", row="metric", col="adversary",
        row_order=[v for v in NC_METRICS.values() if v in set(m["metric"])],
        col_order=_present(m["adversary"], ADVERSARY_ORDER),
        hue="perturbation", hue_order=_present(m["perturbation"], PERTURBATION_ORDER), palette=PERTURBATION_PALETTE,
        style=_style(m), errorbar=("ci", 95), marker="o", markersize=4,
        height=2.1, aspect=1.5, facet_kws={"sharey": "row", "margin_titles": True},
    )
    grid.set(yscale="log")
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    grid.set_axis_labels("epoch", "value (log)")
    grid.figure.suptitle(f"Neural Collapse on the {split} split: clean vs perturbed features", y=1.02)
    _save(grid.figure, path)


def accuracy_curves(metrics: pd.DataFrame, path: str | Path) -> None:
    """Network accuracy against epoch, clean and under each perturbation, train and test, per adversary."""
    m = metrics[(metrics["layer"] == "penultimate") & (metrics["metric"] == "accuracy")]
    m = m[m["perturbation"] != "pgd-targeted"]  # its `accuracy` is against the targets (the hit rate)
    grid = sns.relplot(
        data=m, x="epoch", y="value", kind="line", row="split", col="adversary",
        row_order=_present(m["split"], ["train", "test"]), col_order=_present(m["adversary"], ADVERSARY_ORDER),
        hue="perturbation", hue_order=_present(m["perturbation"], PERTURBATION_ORDER), palette=PERTURBATION_PALETTE,
        style=_style(m), errorbar=("ci", 95), marker="o", markersize=4,
        height=2.4, aspect=1.4, facet_kws={"margin_titles": True},
    )
    grid.set(ylim=(-0.02, 1.02))
    grid.set_titles(row_template="{row_name} split", col_template="{col_name}")
    grid.set_axis_labels("epoch", "accuracy")
    grid.figure.suptitle("Accuracy: clean and robust", y=1.02)
    _save(grid.figure, path)


FIGURES: dict[str, Callable[..., None]] = {
    "nc_vs_epoch": lambda metrics, training, path: nc_vs_epoch(metrics, path),
    "accuracy": lambda metrics, training, path: accuracy_curves(metrics, path),
}


def render(metrics: pd.DataFrame, training: pd.DataFrame, outputs: dict[str, str]) -> None:
    """Render each figure named in ``outputs`` to its PNG path (and a PDF beside it)."""
    sns.set_theme(context="paper", style="whitegrid")
    for name, path in outputs.items():
        if name not in FIGURES:
            raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
        FIGURES[name](metrics, training, path)
