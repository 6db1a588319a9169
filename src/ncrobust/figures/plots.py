"""Seaborn figures. Drawing only: each figure takes the tidy frame that
:mod:`ncrobust.tables` shapes for it (``tables.nc_curves``, ``tables.leap_matrices``, ...).

Every figure adapts to the grid: facets come from the values present in the table (one adversary,
many models, one seed, missing perturbations all work; an absent quantity gives an annotated empty
panel or a placeholder figure, never an error). Lines are the mean over seeds with a band from the
lowest to the highest seed (with the 2-3 seeds of a study a bootstrap interval says little, and
bootstrapping was a quarter of the figures' time). Two palettes are used throughout: one for evaluation
perturbations (:data:`PERTURBATION_PALETTE`) and one for training adversaries
(:data:`ADVERSARY_PALETTE`). When the grid has several datasets, models or losses, they are told
apart by line style (or marker) and named in the legend.

Each figure is written as PNG and as PDF beside it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402

from ncrobust import tables
from ncrobust.cell import ADVERSARIES  # noqa: E402
from ncrobust.columns import CELL_COLUMNS, FIGURES, PENULTIMATE  # noqa: E402
from ncrobust.tables import constant_setting as _constant_setting  # noqa: E402

PERTURBATION_ORDER = ["clean", "pgd", "pgd-targeted", "trades-kl", "gaussian", "sign"]
SPLIT_ORDER = ["train", "test"]

# Perturbations (Okabe & Ito's colour-blind-safe palette): clean is black and drawn on top,
# attacks warm and solid, random noise cool and broken, each with its own marker, so that no two
# perturbations differ by colour alone.
PERTURBATION_PALETTE = {
    "clean": "#000000",
    "pgd": "#D55E00",
    "pgd-targeted": "#CC79A7",
    "trades-kl": "#E69F00",
    "gaussian": "#0072B2",
    "sign": "#009E73",
}
PERTURBATION_DASHES = {"clean": "", "pgd": "", "pgd-targeted": (5, 1.5), "trades-kl": (5, 1.5), "gaussian": (2, 1.2), "sign": (4, 1, 1, 1)}
PERTURBATION_MARKERS = {"clean": "o", "pgd": "s", "pgd-targeted": "^", "trades-kl": "P", "gaussian": "v", "sign": "D"}
# The two noises of one size give almost the same values: `gaussian` is drawn wide and underneath,
# so that it shows as a band around `sign` instead of being hidden by it.
PERTURBATION_WIDTHS = {"gaussian": (3.6, 7)}  # (line width, marker size); the others: DEFAULT_WIDTH
DEFAULT_WIDTH = (1.5, 4)
# Adversaries: grey for standard training, blues for PGD-AT, greens for TRADES (dark l_inf, light l_2).
ADVERSARY_PALETTE = {
    "st": "#4D4D4D",
    "pgd-linf": "#1F4E9C",
    "pgd-l2": "#6FA8DC",
    "trades-linf": "#1B7837",
    "trades-l2": "#7FBF7B",
}
STYLE_DASHES = ["", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (2, 2)]
STYLE_MARKERS = ["o", "s", "^", "D", "v", "P"]

NC_METRICS = {  # metric -> (axis label, log scale)
    "nc1": ("NC1\ntr(Σ_W Σ_B⁺)/C", True),
    "nc2_equinorm_M": ("NC2 equinorm\nstd/mean ‖μ_c − μ_G‖", True),
    "nc2_equiangle_M": ("NC2 equiangle\nmean |cos + 1/(C−1)|", True),
    "nc2_equinorm_W": ("NC2 equinorm of W\nstd/mean ‖w_c‖", True),
    "nc2_equiangle_W": ("NC2 equiangle of W\nmean |cos + 1/(C−1)|", True),
    "nc3": ("NC3 self-duality\n‖W/‖W‖ − M̃ᵀ/‖M̃‖‖²_F", True),
    "nc4": ("NC4\n1 − NCC/network agreement", False),
}

PANEL_HEIGHT = 2.3
PANEL_WIDTH = 3.3


# ---------------------------------------------------------------------------------------------
# helpers


def _present(values, order):
    """Values present, known ones in ``order`` first, then the others sorted."""
    values = {v for v in values if not pd.isna(v)}
    return [v for v in order if v in values] + sorted(values - set(order), key=str)


def _palette(values, base: dict[str, str]) -> dict:
    """``base`` extended with distinct colours for names it does not know."""
    extra = [v for v in values if v not in base]
    colours = sns.color_palette("husl", len(extra)) if extra else []
    return {**base, **dict(zip(extra, colours))}


def _seed_count(frame: pd.DataFrame) -> int:
    """The most seeds any one cell (but for its seed) has in ``frame``: an external network's seed 0 next
    to a trained grid's seeds 1 and 2 is still two seeds per line, not three."""
    if "seed" not in frame.columns or not len(frame):
        return 0
    keys = [c for c in CELL_COLUMNS if c != "seed" and c in frame.columns]
    if not keys:
        return int(frame["seed"].nunique())
    return int(frame.groupby(keys, observed=True, dropna=False)["seed"].nunique().max())


def _seeds_note(frame: pd.DataFrame, *, band: bool = True) -> str:
    if "seeds" in frame.columns:  # a frame already averaged over seeds
        n = int(frame["seeds"].max()) if len(frame) else 0
    else:
        n = _seed_count(frame)
    if n <= 1:
        return "1 seed (no band)" if band else "1 seed"
    return f"mean over {n} seeds, band = seed range" if band else f"mean over {n} seeds"


def _save(fig, path: str | Path):
    """Write ``fig`` as PNG and PDF (atomically) and return it, closed (tests read what was drawn)."""
    from ncrobust.io import atomic_path

    path = Path(path)
    for target in (path, path.with_suffix(".pdf")):
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=target.suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(fig)
    return fig


def _placeholder(path: str | Path, title: str, message: str):
    """A figure that says what is missing (the workflow still gets its file)."""
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=12, weight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.3, message, ha="center", va="center", fontsize=10, wrap=True, transform=ax.transAxes)
    return _save(fig, path)


def _empty_panel(ax, message: str = "no data") -> None:
    """Mark a panel without data (axis off: shared tick locators of the row stay untouched)."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, color="0.45", transform=ax.transAxes)


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (``0.3``, ``2``, ``1000``; ``1e-05`` when tiny or huge)."""

    def _num_to_string(self, x, vmin, vmax):
        if 100 <= x < 1e5:  # .3g would write 1000 as 1e+03
            return f"{x:.0f}"
        return f"{x:.3g}" if 1e-3 <= x < 1e5 else f"{x:.0e}"


def _log_y(ax) -> None:
    """Log y axis with plain-number labels (some minor ticks labelled when the range is about a decade)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))


def _themed(func):
    """Run a figure function under the package's seaborn theme."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
            return func(*args, **kwargs)

    return wrapper


def _grid(nrows: int, ncols: int, *, sharex=True, sharey="row", width=PANEL_WIDTH, height=PANEL_HEIGHT):
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols + 1.2, height * nrows + 0.8), sharex=sharex, sharey=sharey,
        squeeze=False, layout="constrained",
    )
    return fig, axes


def _style_maps(settings: list[str]) -> tuple[dict, dict]:
    dashes = {s: STYLE_DASHES[i % len(STYLE_DASHES)] for i, s in enumerate(settings)}
    markers = {s: STYLE_MARKERS[i % len(STYLE_MARKERS)] for i, s in enumerate(settings)}
    return dashes, markers


@dataclass(frozen=True)
class _Styles:
    """Colours per perturbation and line styles of one figure, shared by its panels and its
    legend. With one setting the line style and marker tell perturbations apart too; with several
    they tell the settings apart."""

    perts: list[str]
    palette: dict
    settings: list[str]
    dashes: dict
    markers: dict

    @property
    def by_perturbation(self) -> bool:
        return len(self.settings) <= 1


def _perturbation_styles(m: pd.DataFrame) -> _Styles:
    perts = _present(m["perturbation"], PERTURBATION_ORDER)
    settings = sorted(m["setting"].unique())
    if len(settings) <= 1:
        dashes = {p: PERTURBATION_DASHES.get(p, (1, 1)) for p in perts}
        markers = {p: PERTURBATION_MARKERS.get(p, "X") for p in perts}
    else:
        dashes, markers = _style_maps(settings)
    return _Styles(perts, _palette(perts, PERTURBATION_PALETTE), settings, dashes, markers)


def _lines(ax, data: pd.DataFrame, *, x: str, styles: _Styles, **kwargs) -> None:
    """Mean over seeds with a min-max band over seeds, one line per (perturbation, setting); the
    clean reference is drawn last, on top."""
    style = "perturbation" if styles.by_perturbation else "setting"
    order = styles.perts if styles.by_perturbation else styles.settings
    for pert in sorted(styles.perts, key=lambda p: p == "clean"):
        d = data[data["perturbation"] == pert]
        if d.empty:
            continue
        width, marker = PERTURBATION_WIDTHS.get(pert, DEFAULT_WIDTH)
        sns.lineplot(
            data=d, x=x, y="value", hue="perturbation", hue_order=styles.perts, palette=styles.palette,
            style=style, style_order=order, dashes=styles.dashes, markers=styles.markers, markersize=marker,
            linewidth=width, alpha=0.55 if pert in PERTURBATION_WIDTHS else 1.0,
            errorbar=("pi", 100), err_kws={"alpha": 0.18, "linewidth": 0}, ax=ax, legend=False,
            zorder=3 if pert == "clean" else 1.5 if pert in PERTURBATION_WIDTHS else 2, **kwargs,
        )


def _legend(fig, hue_title: str, styles: _Styles, extra: list | None = None) -> None:
    palette, settings, dashes, markers = styles.palette, styles.settings, styles.dashes, styles.markers
    handles = []
    for v in styles.perts:
        width, size = PERTURBATION_WIDTHS.get(v, DEFAULT_WIDTH)
        line = Line2D([], [], color=palette[v], marker=markers[v] if styles.by_perturbation else "o", markersize=size,
                      linewidth=width, alpha=0.55 if v in PERTURBATION_WIDTHS else 1.0, label=str(v))
        if styles.by_perturbation and dashes[v]:
            line.set_dashes(dashes[v])
        handles.append(line)
    labels = [str(v) for v in styles.perts]
    handles.insert(0, Line2D([], [], linestyle="none", label=hue_title))
    labels.insert(0, hue_title)
    if len(settings) > 1:
        handles.append(Line2D([], [], linestyle="none", label=" "))
        labels.append(" ")
        for s in settings:
            dash = dashes[s]
            line = Line2D([], [], color="0.3", marker=markers[s], markersize=4, label=s)
            if dash:
                line.set_dashes(dash)
            handles.append(line)
            labels.append(s)
    for handle in extra or []:
        handles.append(handle)
        labels.append(handle.get_label())
    fig.legend(handles, labels, loc="outside right center", frameon=False)


def spread_labels(points: np.ndarray, min_distance: float, *, iterations: int = 200) -> np.ndarray:
    """Label positions near ``points`` ([n, 2], in any one unit) that lie at least about
    ``min_distance`` apart: each starts pushed away from the points' centre, then overlapping pairs
    are pushed apart. Class means that project close together on the simplex plane keep readable
    labels, each joined to its vertex by a line."""
    points = np.asarray(points, dtype=float)
    centre = points.mean(0)
    out = points - centre
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    angles = 2 * np.pi * np.arange(len(points)) / max(len(points), 1)  # coincident points: spread on a circle
    fallback = np.stack([np.cos(angles), np.sin(angles)], 1)
    direction = np.where(norms > 1e-12 * max(float(norms.max()), 1.0), out / np.maximum(norms, 1e-300), fallback)
    labels = points + direction * min_distance
    # labels that coincide separate along their circle positions
    apart = fallback[:, None, :] - fallback[None, :, :]
    apart = apart / np.maximum(np.linalg.norm(apart, axis=2, keepdims=True), 1e-12)
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    for _ in range(iterations):
        delta = labels[:, None, :] - labels[None, :, :]
        dist = np.linalg.norm(delta, axis=2)
        close = (dist < min_distance) & off_diagonal
        if not close.any():
            break
        unit = np.where((dist > 1e-9 * min_distance)[..., None], delta / np.maximum(dist, 1e-300)[..., None], apart)
        labels = labels + np.where(close[..., None], unit * (min_distance - dist)[..., None] / 2, 0).sum(1)
    return labels


def _vertex_labels(ax, means: pd.DataFrame, colours, span: float) -> None:
    """Each clean class mean's index beside its vertex, spread so that no two overlap, joined to the
    vertex by a thin line. ``span``: the panel's data extent (its aspect is equal), of which a
    label takes about 6%."""
    if means.empty:
        return
    labels = spread_labels(means[["x", "y"]].to_numpy(dtype=float), 0.07 * span)
    for (c, row), (lx, ly) in zip(means.iterrows(), labels):
        ax.plot([row["x"], lx], [row["y"], ly], color="0.3", lw=0.5, zorder=4)  # a leader line, not an arrow
        ax.text(lx, ly, str(c), ha="center", va="center", fontsize=7, weight="bold", color="black", zorder=5,
                bbox=dict(boxstyle="round,pad=0.15", facecolor=colours[c], edgecolor="none", alpha=0.85))


def _bottom_labels(axes, xlabel: str) -> None:
    """x label and tick labels on the lowest panel with data of each column (a column whose
    bottom panel is empty still shows its x axis)."""
    for j in range(axes.shape[1]):
        live = [i for i in range(axes.shape[0]) if axes[i, j].axison]
        if live:
            ax = axes[live[-1], j]
            ax.set_xlabel(xlabel, visible=True)  # seaborn hides the label of a panel drawn without tick labels
            ax.xaxis.set_tick_params(labelbottom=True)


def _metric_panels(axes, m, rows, cols, *, x, styles: _Styles, linear_ylim=None) -> None:
    """One panel per (row ``(metric, label, log)``, adversary column): lines against ``x`` coloured
    by perturbation. Log rows drop non-positive values; linear rows get ``linear_ylim`` if given."""
    for i, (metric, label, log) in enumerate(rows):
        for j, adv in enumerate(cols):
            ax = axes[i, j]
            d = m[(m["metric"] == metric) & (m["adversary"] == adv)]
            if log:
                d = d[d["value"] > 0]
            if d.empty:
                _empty_panel(ax)
                continue
            _lines(ax, d, x=x, styles=styles)
            if log:
                _log_y(ax)
            elif linear_ylim is not None:
                ax.set_ylim(*linear_ylim)
            ax.set_ylabel(label if j == 0 else "")
            ax.set_xlabel("")


def _epoch_panels(m: pd.DataFrame, rows: list):
    """A metric-by-adversary grid of curves against epoch, one style per perturbation: the figure,
    its axes, the adversary columns and the styles."""
    cols = _present(m["adversary"], ADVERSARIES)
    styles = _perturbation_styles(m)
    fig, axes = _grid(len(rows), len(cols))
    _metric_panels(axes, m, rows, cols, x="epoch", styles=styles)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes, cols, styles


def _col_titles(axes, cols, prefix: str = "") -> None:
    """Column titles; a prefix goes on its own line, so that narrow columns' titles do not overlap."""
    for j, col in enumerate(cols):
        axes[0, j].set_title(f"{prefix.strip()}\n{col}" if prefix else str(col), fontsize=11, weight="bold")


def _title(fig, text: str, frame: pd.DataFrame) -> None:
    setting = _constant_setting(frame)
    fig.suptitle(f"{text}\n{setting + ' · ' if setting else ''}{_seeds_note(frame)}", fontsize=11)


def _hit_rate(hits: pd.DataFrame | None, metric: str = "target_hit_rate", **where) -> float | None:
    """Mean over seeds of one ``tables.target_hit_rates`` metric where the columns equal ``where``
    (None where there is none)."""
    if hits is None or hits.empty:
        return None
    h = hits[hits["metric"] == metric]
    for column, value in where.items():
        h = h[h[column] == value]
    return float(h["value"].mean()) if len(h) else None


def _hit_rate_title(hits: pd.DataFrame | None, **where) -> str:
    """``"hit rate 0.62 (NCC 0.70)"``: how often ``pgd-targeted`` reached its target, by the network
    and by the nearest clean class mean, for a panel's title ("" without the numbers)."""
    network, ncc = _hit_rate(hits, **where), _hit_rate(hits, "target_hit_rate_ncc", **where)
    if network is None:
        return ""
    return f"hit rate {network:.2f}" + ("" if ncc is None else f" (NCC {ncc:.2f})")


def _hit_rate_handles(hits: pd.DataFrame | None, frame: pd.DataFrame, splits: list[str]) -> list:
    """Legend lines naming the final-epoch ``pgd-targeted`` hit rate (network argmax = target, mean
    over seeds) of each adversary, split and setting drawn in ``frame``; none when ``frame`` has no
    targeted set."""
    if hits is None or hits.empty or "pgd-targeted" not in set(frame["perturbation"]):
        return []
    handles = [Line2D([], [], linestyle="none", label=" "),
               Line2D([], [], linestyle="none", label="pgd-targeted hit rate\n(network = target,\nfinal epoch)")]
    settings = sorted(hits["setting"].unique())
    for adv in _present(frame["adversary"], ADVERSARIES):
        for split in splits:
            rates = [(s, _hit_rate(hits, adversary=adv, split=split, setting=s)) for s in settings]
            rates = [f"{s} {v:.2f}" if s else f"{v:.2f}" for s, v in rates if v is not None]
            if rates:
                where = f"{adv} · {split}" if len(splits) > 1 else adv
                handles.append(Line2D([], [], linestyle="none", label=f"{where}: {', '.join(rates)}"))
    return handles


# ---------------------------------------------------------------------------------------------
# figures


@_themed
def nc_vs_epoch(m: pd.DataFrame, path: str | Path, split: str = "train", hits: pd.DataFrame | None = None):
    """NC1-NC4 of the penultimate features against epoch (``tables.nc_curves``): clean vs each
    perturbation, one column per adversary, one row per metric (log scale for NC1-NC3: they span
    decades; NC4 is a share); the NC2 rows of the classifier W have one line (W is the same for
    every perturbation). ``hits`` (``tables.target_hit_rates``): the legend names the targeted
    set's hit rate."""
    if m.empty:
        return _placeholder(path, "Neural Collapse against epoch", f"no NC metrics of the penultimate layer on the {split} split")
    rows = [(k, *NC_METRICS[k]) for k in NC_METRICS if k in set(m["metric"])]
    fig, axes, cols, styles = _epoch_panels(m, rows)
    _bottom_labels(axes, "epoch")
    _col_titles(axes, cols, "trained with ")
    _legend(fig, "evaluated on", styles, _hit_rate_handles(hits, m, [split]))
    _title(fig, f"Neural Collapse of the penultimate features ({split} split)\nclean vs perturbed; lower = more collapse", m)
    return _save(fig, path)


@_themed
def accuracy_curves(m: pd.DataFrame, path: str | Path, training: pd.DataFrame | None = None, hits: pd.DataFrame | None = None):
    """Network accuracy against epoch (``tables.accuracy_curves``), clean and under each
    perturbation, train and test, per adversary (markers: evaluated checkpoints); thin lines: the
    per-epoch training log (``tables.training_curves``). ``hits`` (``tables.target_hit_rates``):
    the legend names the targeted set's hit rate (its line is the accuracy on the true labels)."""
    if m.empty:
        return _placeholder(path, "Accuracy", "no accuracy in the metrics table")
    rows = _present(m["split"], SPLIT_ORDER)
    cols = _present(m["adversary"], ADVERSARIES)
    styles = _perturbation_styles(m)
    log_columns = {"train": [("train_accuracy", "clean"), ("train_robust_accuracy", "pgd")], "test": [("test_accuracy", "clean")]}
    t = training
    fig, axes = _grid(len(rows), len(cols), sharey=True)
    drew_log = False
    for i, split in enumerate(rows):
        for j, adv in enumerate(cols):
            ax = axes[i, j]
            d = m[(m["split"] == split) & (m["adversary"] == adv)]
            if d.empty:
                _empty_panel(ax)
                continue
            _lines(ax, d, x="epoch", styles=styles)
            if t is not None:
                for column, colour_of in log_columns.get(split, []):
                    if column not in t.columns:
                        continue
                    tl = t[t["adversary"] == adv].dropna(subset=[column])
                    if tl.empty:
                        continue
                    tl = tl.rename(columns={column: "value"})
                    several = len(styles.settings) > 1
                    sns.lineplot(
                        data=tl, x="epoch", y="value", style="setting" if several else None,
                        style_order=styles.settings if several else None, dashes=styles.dashes if several else True,
                        color=styles.palette.get(colour_of, "0.5"), linewidth=0.8, alpha=0.55, errorbar=None, ax=ax, legend=False,
                    )
                    drew_log = True
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch" if i == len(rows) - 1 else "")
            ax.set_ylabel(f"{split} accuracy\n(fraction correct)" if j == 0 else "")
    _bottom_labels(axes, "epoch")
    _col_titles(axes, cols, "trained with ")
    extra = [Line2D([], [], color="0.4", linewidth=0.8, alpha=0.7, label="thin: per-epoch training log\n(robust = training attack)")] if drew_log else []
    _legend(fig, "evaluated on", styles, extra + _hit_rate_handles(hits, m, rows))
    _title(fig, "Network accuracy against the true labels, clean and under attack", m)
    return _save(fig, path)


@_themed
def alignment_angle(m: pd.DataFrame, path: str | Path, hits: pd.DataFrame | None = None):
    """Mean angle (degrees) between clean and perturbed centred class means against epoch
    (``tables.alignment_curves``), per split and adversary: 0 means the perturbed simplex is
    aligned with the clean one. ``hits`` (``tables.target_hit_rates``): the legend names the
    targeted set's hit rate."""
    if m.empty:
        return _placeholder(path, "Alignment of clean and perturbed class means", "no perturbation was evaluated (alignment_angle is absent)")
    rows = _present(m["split"], SPLIT_ORDER)
    cols = _present(m["adversary"], ADVERSARIES)
    styles = _perturbation_styles(m)
    fig, axes = _grid(len(rows), len(cols), sharey=True)
    top = float(m["value"].max())
    for i, split in enumerate(rows):
        for j, adv in enumerate(cols):
            ax = axes[i, j]
            d = m[(m["split"] == split) & (m["adversary"] == adv)]
            if d.empty:
                _empty_panel(ax)
                continue
            _lines(ax, d, x="epoch", styles=styles)
            ax.set_ylim(0, max(5.0, 1.08 * top))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch" if i == len(rows) - 1 else "")
            ax.set_ylabel(f"{split} split\nangle (degrees)" if j == 0 else "")
    _bottom_labels(axes, "epoch")
    _col_titles(axes, cols, "trained with ")
    _legend(fig, "perturbation", styles, _hit_rate_handles(hits, m, rows))
    _title(fig, "Angle between clean and perturbed class means (centred, mean over classes)\n0° = perturbed simplex aligned with the clean one", m)
    return _save(fig, path)


@_themed
def leap_heatmap(m: pd.DataFrame, path: str | Path, split: str = "train", hits: pd.DataFrame | None = None):
    """The leap matrix ``L[y, k]`` (share of class-y perturbed samples whose nearest clean class
    mean is k; for pgd-targeted y is the target) at each cell's final epoch, mean over seeds
    (``tables.leap_matrices``); one column per adversary, one row per attack and setting. A
    pgd-targeted panel's title gives its hit rate (``hits``: ``tables.target_hit_rates``), by the
    network and by the nearest clean mean (the sample-weighted diagonal of the panel)."""
    if m.empty:
        return _placeholder(path, "Leap matrix", f"no pgd / pgd-targeted leap matrix on the {split} split")
    cols = _present(m["adversary"], ADVERSARIES)
    rows = [(s, p) for s in sorted(m["setting"].unique()) for p in _present(m["perturbation"], PERTURBATION_ORDER)
            if len(m[(m["setting"] == s) & (m["perturbation"] == p)])]
    C = int(max(m["row"].max(), m["col"].max())) + 1
    size = min(3.4, max(2.6, 0.26 * C + 0.6))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(size * len(cols) + 1.6, size * len(rows) + 1.0), squeeze=False, layout="constrained")
    annotate = C <= 10
    mappable = None
    for i, (setting, pert) in enumerate(rows):
        for j, adv in enumerate(cols):
            ax = axes[i, j]
            d = m[(m["setting"] == setting) & (m["perturbation"] == pert) & (m["adversary"] == adv)]
            if d.empty:
                _empty_panel(ax)
                continue
            L = np.full((C, C), np.nan)
            L[d["row"].to_numpy(int), d["col"].to_numpy(int)] = d["value"].to_numpy()
            mappable = ax.imshow(L, cmap="rocket_r", vmin=0, vmax=1, interpolation="nearest")
            if annotate:
                for (yy, k), v in np.ndenumerate(L):
                    if np.isfinite(v) and v >= 0.05:
                        ax.text(k, yy, f"{100 * v:.0f}", ha="center", va="center", fontsize=6.5, color="white" if v > 0.5 else "black")
            ticks = np.arange(C) if C <= 20 else np.arange(0, C, max(1, C // 10))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=7, length=0)
            ax.grid(False)
            hit = _hit_rate_title(hits, setting=setting, adversary=adv, split=split) if pert == "pgd-targeted" else ""
            ax.set_title(f"trained with {adv}\n{pert} · epoch {d['epochs'].iloc[0]}" + (f"\n{hit}" if hit else "")
                         + (f"\n{setting}" if setting else ""), fontsize=9)
            ax.set_xlabel("nearest clean class mean k" if i == len(rows) - 1 else "")
            ax.set_ylabel(("target y" if pert == "pgd-targeted" else "true class y") if j == 0 else "")
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, shrink=min(0.6, 1.6 / len(rows)), location="right", aspect=15)
        bar.set_label("L[y, k]: share of class y")
    fig.suptitle(
        f"Leap matrix L[y, k] of perturbed penultimate features ({split} split, final epoch)\n"
        f"diagonal = at the clean vertex of its own class (pgd) or of its target (pgd-targeted, rows = targets);\n"
        f"hit rate: share of pgd-targeted samples the network classifies as the target (NCC: nearest clean mean = target)"
        f"{'; numbers in % (≥ 5 shown)' if annotate else ''}\n{_seeds_note(m, band=False)}",
        fontsize=10,
    )
    return _save(fig, path)


@_themed
def layerwise(m: pd.DataFrame, path: str | Path, split: str = "train"):
    """NC1 and NCC accuracy against depth (``tables.layer_profiles``: taps in forward order,
    penultimate last) at each cell's final epoch: clean vs perturbed, one column per adversary. NCC
    accuracy is shown with the clean class means (the clean NCC classifier applied to perturbed
    features) and with the perturbed set's own means."""
    if m.empty:
        return _placeholder(path, "Collapse through depth", f"no layer statistics on the {split} split")
    orders = {s: list(g.drop_duplicates("depth").sort_values("depth")["layer"]) for s, g in m.groupby("setting")}
    rows = [
        ("nc1", "NC1 per layer\ntr(Σ_W Σ_B⁺)/C", True),
        ("ncc_accuracy_clean_means", "NCC accuracy,\nclean class means", False),
        ("ncc_accuracy", "NCC accuracy,\nown class means", False),
    ]
    rows = [r for r in rows if r[0] in set(m["metric"])]
    cols = _present(m["adversary"], ADVERSARIES)
    styles = _perturbation_styles(m)
    same_taps = len({tuple(o) for o in orders.values()}) == 1
    tap_names = next(iter(orders.values()))
    depth_max = max(len(o) for o in orders.values())
    fig, axes = _grid(len(rows), len(cols), width=max(PANEL_WIDTH, 0.45 * depth_max + 1.2))
    _metric_panels(
        axes, m, rows, cols, x="depth", styles=styles, linear_ylim=(-0.02, 1.02),
    )
    ax0 = next((ax for ax in axes.flat if ax.axison), axes[0, 0])
    ax0.set_xticks(range(1, depth_max + 1))  # shared x: every panel gets these ticks
    if same_taps:
        tilt = depth_max > 3 or sum(len(t) for t in tap_names) > 28
        for ax in axes.flat:
            if ax.axison:
                ax.set_xticklabels(tap_names, rotation=35 if tilt else 0, ha="right" if tilt else "center", rotation_mode="anchor")
    _bottom_labels(axes, "layer (input → output)" if same_taps else "depth: tap index (penultimate last)")
    ax0.set_xlim(0.7, depth_max + 0.3)
    _col_titles(axes, cols, "trained with ")
    _legend(fig, "evaluated on", styles)
    epochs = "/".join(map(str, sorted(m["epoch"].unique())))
    note = "" if depth_max > 1 else " · only the penultimate layer (evaluation.layerwise is off?)"
    _title(fig, f"Collapse through depth ({split} split, final epoch {epochs}){note}", m)
    return _save(fig, path)


@_themed
def simplex(p: pd.DataFrame, path: str | Path, split: str = "train", perturbations=("pgd", "pgd-targeted"),
            hits: pd.DataFrame | None = None):
    """Clean and perturbed penultimate features on the plane of the clean simplex (the two leading
    principal directions of the centred clean class means; ``tables.simplex_points``), one column
    per adversary, one row per attack and setting; the first seed of each cell, its final epoch.
    Arrows go from each clean class mean to the mean of that class's perturbed features (for
    pgd-targeted: of the samples sent to that class). A pgd-targeted panel's title gives that
    seed's hit rate (``hits``: ``tables.target_hit_rates``)."""
    perturbed = [v for v in _present(p["perturbation"], PERTURBATION_ORDER) if v in perturbations]
    if p.empty or not perturbed or "clean" not in set(p["perturbation"]):
        return _placeholder(path, "Clean vs perturbed features on the clean simplex", f"no clean and perturbed projections on the {split} split")
    cols = _present(p["adversary"], ADVERSARIES)
    rows = [(s, q) for s in sorted(p["setting"].unique()) for q in perturbed if len(p[(p["setting"] == s) & (p["perturbation"] == q)])]
    C = int(p["label"].max()) + 1
    class_colours = sns.color_palette("tab10" if C <= 10 else "husl", C)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.4 * len(cols) + 1.8, 3.3 * len(rows) + 0.9), squeeze=False, layout="constrained")
    for i, (setting, pert) in enumerate(rows):
        for j, adv in enumerate(cols):
            ax = axes[i, j]
            cell = p[(p["setting"] == setting) & (p["adversary"] == adv)]
            clean = cell[(cell["perturbation"] == "clean") & (cell["kind"] == "sample")]
            pts = cell[(cell["perturbation"] == pert) & (cell["kind"] == "sample")]
            means = cell[(cell["perturbation"] == "clean") & (cell["kind"] == "mean")].set_index("label")
            pmeans = cell[(cell["perturbation"] == pert) & (cell["kind"] == "mean")].set_index("label")
            if clean.empty or pts.empty:
                _empty_panel(ax)
                continue
            ax.scatter(clean["x"], clean["y"], s=7, c=[class_colours[c] for c in clean["label"]], alpha=0.3, linewidths=0)
            ax.scatter(pts["x"], pts["y"], s=16, c=[class_colours[c] for c in pts["label"]], alpha=0.85, marker="x", linewidths=0.9)
            for c, row in means.iterrows():
                if c in pmeans.index:
                    ax.annotate("", xy=(pmeans.at[c, "x"], pmeans.at[c, "y"]), xytext=(row["x"], row["y"]),
                                arrowprops=dict(arrowstyle="->", color="0.25", lw=0.8, shrinkA=5, shrinkB=2))
            ax.scatter(means["x"], means["y"], s=140, c=[class_colours[c] for c in means.index], edgecolors="black", linewidths=0.8, zorder=3)
            ax.set_aspect("equal", adjustable="datalim")
            shown = pd.concat([clean[["x", "y"]], pts[["x", "y"]], means[["x", "y"]]])
            _vertex_labels(ax, means, class_colours, float(max(np.ptp(shown["x"]), np.ptp(shown["y"]), 1e-12)))
            ax.tick_params(labelsize=7)
            epoch = f" · epoch {int(cell['epoch'].max())}" if "epoch" in cell.columns else ""
            seed = f" · seed {int(cell['seed'].min())}" if "seed" in cell.columns else ""
            hit = ""
            if pert == "pgd-targeted" and "seed" in cell.columns:
                hit = _hit_rate_title(hits, setting=setting, adversary=adv, split=split, seed=int(cell["seed"].min()))
            ax.set_title(f"trained with {adv}\n{pert}{epoch}{seed}" + (f"\n{hit}" if hit else "")
                         + (f"\n{setting}" if setting else ""), fontsize=9)
            ax.set_xlabel("PC1 of clean class means\n(feature units)" if i == len(rows) - 1 else "")
            ax.set_ylabel("PC2 of clean class means" if j == 0 else "")
    handles = [
        Line2D([], [], marker="o", linestyle="none", color="0.5", alpha=0.5, markersize=4, label="clean sample"),
        Line2D([], [], marker="x", linestyle="none", color="0.2", markersize=5, label="perturbed sample"),
        Line2D([], [], marker="o", linestyle="none", markerfacecolor="0.5", markeredgecolor="black", markersize=10, label="clean class mean\n(vertex, class index)"),
        Line2D([], [], color="0.25", marker=">", markersize=4, lw=0.8, label="clean → perturbed\nmean of a class\n(pgd-targeted: of the\nsamples sent to it)"),
        Line2D([], [], linestyle="none", label=" "),
        Line2D([], [], linestyle="none", label="colour = true class"),
    ]
    if C <= 10:
        handles += [Line2D([], [], marker="o", linestyle="none", color=class_colours[c], markersize=5, label=f"class {c}") for c in range(C)]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=8)
    setting = _constant_setting(p)
    fig.suptitle(
        f"Perturbed features leap between vertices of the clean simplex ({split} split)\n"
        f"{setting + ' · ' if setting else ''}plane of the 2 leading directions of the clean class means",
        fontsize=10,
    )
    return _save(fig, path)


@_themed
def ncc_robustness(wide: pd.DataFrame, path: str | Path):
    """NCC accuracy of PGD features with the *clean* class means against the network's PGD
    accuracy (``tables.ncc_robustness_points``), per split; one point per cell and evaluated epoch
    (final epoch: large, outlined), colour = adversary. Above the diagonal the clean-means NCC
    classifier is more robust than the network itself."""
    if wide.empty:
        return _placeholder(path, "Robustness of the clean NCC classifier", "needs accuracy and ncc_accuracy_clean_means under pgd")
    cols = _present(wide["split"], SPLIT_ORDER)
    advs = _present(wide["adversary"], ADVERSARIES)
    palette = _palette(advs, ADVERSARY_PALETTE)
    settings = sorted(wide["setting"].unique())
    _, markers = _style_maps(settings)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.8 * len(cols) + 1.8, 4.2), squeeze=False, layout="constrained")
    for j, split in enumerate(cols):
        ax = axes[0, j]
        d = wide[wide["split"] == split]
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.55", linewidth=0.9, zorder=1)
        ax.text(0.03, 0.97, "clean-means NCC\nmore robust", color="0.45", fontsize=8, ha="left", va="top", transform=ax.transAxes)
        ax.text(0.97, 0.03, "network\nmore robust", color="0.45", fontsize=8, ha="right", va="bottom", transform=ax.transAxes)
        for adv in advs:
            for s in settings:
                e = d[(d["adversary"] == adv) & (d["setting"] == s)]
                if e.empty:
                    continue
                early, last = e[~e["final"]], e[e["final"]]
                ax.scatter(early["accuracy"], early["ncc_accuracy_clean_means"], s=18, marker=markers[s], color=palette[adv], alpha=0.45, linewidths=0, zorder=2)
                ax.scatter(last["accuracy"], last["ncc_accuracy_clean_means"], s=60, marker=markers[s], color=palette[adv], edgecolors="black", linewidths=0.8, zorder=3)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_title(f"{split} split", fontsize=11, weight="bold")
        ax.set_xlabel("network accuracy under PGD\n(robust accuracy, fraction)")
        ax.set_ylabel("NCC accuracy with clean class means\non PGD features (fraction)" if j == 0 else "")
    handles = [Line2D([], [], linestyle="none", label="trained with")]
    handles += [Line2D([], [], marker="o", linestyle="none", color=palette[a], markersize=6, label=a) for a in advs]
    if len(settings) > 1:
        handles += [Line2D([], [], linestyle="none", label=" ")]
        handles += [Line2D([], [], marker=markers[s], linestyle="none", color="0.4", markersize=6, label=s) for s in settings]
    handles += [
        Line2D([], [], linestyle="none", label=" "),
        Line2D([], [], linestyle="--", color="0.55", linewidth=0.9, label="y = x"),
        Line2D([], [], marker="o", linestyle="none", color="0.6", alpha=0.5, markersize=4, label="earlier epoch"),
        Line2D([], [], marker="o", linestyle="none", color="0.6", markeredgecolor="black", markersize=7, label="final epoch"),
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    setting = _constant_setting(wide)
    fig.suptitle(
        f"Is the clean nearest-class-centre classifier robust?\n{setting + ' · ' if setting else ''}one point per cell (seed) and evaluated epoch",
        fontsize=11,
    )
    return _save(fig, path)


CLASSIFIER_COLOUR = "#56B4E9"  # Okabe & Ito's sky blue: the classifier rows (one per network, no perturbation)


def _imbalance_points(ax, d: pd.DataFrame, x: str, colour, marker: str, zorder: int = 2) -> None:
    """Points of one series, and a thin line through their mean at each ``x``."""
    ax.plot(d[x], d["value"], linestyle="none", marker=marker, markersize=5, color=colour, alpha=0.8, zorder=zorder)
    mean = d.groupby(x)["value"].mean()
    if len(mean) > 1:
        ax.plot(mean.index, mean.to_numpy(), color=colour, linewidth=0.9, alpha=0.6, zorder=zorder)


@_themed
def imbalance(f: pd.DataFrame, path: str | Path, split: str = "train"):
    """The geometry of imbalanced training (``tables.imbalance_geometry``), one column per training
    adversary: per class, the norm of the centred class mean (clean vs PGD features) and of the
    classifier row against the class's number of training samples (log scale); per cell, the mean
    cosine between the minority classes' centred means (clean vs PGD) and classifier rows against
    the measured imbalance ratio n_max / n_min (Fang et al.'s Minority Collapse: tends to 1).
    Marker: the dataset/model/loss setting and the variant, where several are present."""
    if f.empty:
        return _placeholder(
            path, "Geometry of imbalanced classes",
            "no imbalance metrics in the metrics table (train_class_count, mean_norm_per_class, ...): "
            "the train split was not evaluated",
        )
    cols = _present(f["adversary"], ADVERSARIES)
    perts = _present(f["perturbation"], PERTURBATION_ORDER)
    palette = _palette(perts, PERTURBATION_PALETTE)
    groups = sorted(f["group"].unique())
    _, markers = _style_maps(groups)
    rows = [
        ("mean_norm_per_class", "class_count", "‖μ_c − μ_G‖\ncentred class mean"),
        ("classifier_norm_per_class", "class_count", "‖w_c‖\nclassifier row"),
        ("minority_cos", "ratio", "minority collapse\nmean cos between minorities"),
    ]
    fig, axes = _grid(len(rows), len(cols), sharex="row", sharey="row")
    for i, (metric, x, label) in enumerate(rows):
        for j, adv in enumerate(cols):
            ax = axes[i, j]
            a = f[f["adversary"] == adv]
            series = []  # (frame, colour) per perturbation, clean last (on top)
            if metric == "classifier_norm_per_class":
                series.append((a[a["metric"] == metric], CLASSIFIER_COLOUR))
            elif metric == "minority_cos":
                series.append((a[a["metric"] == "minority_cos_W"], CLASSIFIER_COLOUR))
                series += [(a[(a["metric"] == "minority_cos_M") & (a["perturbation"] == p)], palette[p]) for p in perts[::-1]]
            else:
                series += [(a[(a["metric"] == metric) & (a["perturbation"] == p)], palette[p]) for p in perts[::-1]]
            if all(d.empty for d, _ in series):
                _empty_panel(ax, "no minority classes\n(balanced data only)" if metric == "minority_cos" else "no data")
                continue
            for k, (d, colour) in enumerate(series):
                for g in groups:
                    e = d[d["group"] == g]
                    if len(e):
                        _imbalance_points(ax, e, x, colour, markers[g], zorder=2 + k)
            spread = f[x].max() / max(f[x].min(), 1e-12) if len(f) else 1.0
            if spread > 3:  # class sizes over a range: log x; nearly balanced data: plain ticks
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))
                ax.xaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))
            if metric == "minority_cos":
                ax.axhline(1.0, color="0.6", linestyle=":", linewidth=0.9, zorder=1)
            ax.set_ylabel(label if j == 0 else "")
            ax.set_xlabel("")
    for i, (_, x, _) in enumerate(rows):
        live = [ax for ax in axes[i] if ax.axison]
        for ax in live:
            ax.set_xlabel("training samples of the class" if x == "class_count" else "imbalance n_max / n_min")
    _col_titles(axes, cols, "trained with ")
    handles = [Line2D([], [], linestyle="none", label="class means on")]
    handles += [Line2D([], [], color=palette[p], marker="o", markersize=4, label=p) for p in perts]
    handles += [Line2D([], [], color=CLASSIFIER_COLOUR, marker="o", markersize=4, label="classifier rows")]
    if len(groups) > 1 or groups[0]:
        handles.append(Line2D([], [], linestyle="none", label=" "))
        handles += [Line2D([], [], color="0.3", marker=markers[g], linestyle="none", markersize=5, label=g or "(base)") for g in groups]
    fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="outside right center", frameon=False)
    epochs = "/".join(sorted(set("/".join(f["epochs"]).split("/")), key=int))
    seeds = int(f["seeds"].max())
    fig.suptitle(
        f"Geometry of imbalanced classes ({split} split, final epoch {epochs})\n"
        f"points: classes (rows 1-2) or cells (row 3); lines: mean at each x · "
        f"{'1 seed' if seeds <= 1 else f'mean over {seeds} seeds'}",
        fontsize=10,
    )
    return _save(fig, path)


@_themed
def epoch_collapse(m: pd.DataFrame, path: str | Path):
    """Su et al.'s per-epoch curves (``tables.epoch_collapse_curves``): NC1-NC4 and the alignment
    angle of each epoch's clean inputs and of the perturbed inputs the training steps made, measured
    with the end-of-epoch model in eval mode; one column per adversary, one row per metric."""
    if m.empty:
        return _placeholder(path, "Neural Collapse of the training-time examples", "no per-epoch measurement (training.epoch_measure: false?)")
    labels = {**NC_METRICS, "alignment_angle": ("alignment angle\n(degrees, centred)", False)}
    rows = [(k, *labels[k]) for k in labels if k in set(m["metric"])]
    fig, axes, cols, styles = _epoch_panels(m, rows)
    for i, (metric, label, _) in enumerate(rows):  # a row whose first panels are empty (st has no angle)
        live = [ax for ax in axes[i] if ax.axison]
        if live and live[0] is not axes[i, 0]:
            live[0].set_ylabel(label, visible=True)  # sharey hid the labels of inner columns
            live[0].yaxis.set_tick_params(labelleft=True)
        if metric == "alignment_angle" and live:
            live[0].set_ylim(bottom=0)
    _bottom_labels(axes, "epoch")
    _col_titles(axes, cols, "trained with ")
    _legend(fig, "training-time inputs", styles)
    _title(fig, "Neural Collapse of the training-time examples, every epoch (end-of-epoch model, eval mode)\n"
                "clean vs the perturbed inputs the training steps made; lower = more collapse", m)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# registry

def _draw(name: str, metrics: pd.DataFrame, training, projection, path: str, variants: dict | None = None):
    """Shape (``tables``) and draw one figure; returns the matplotlib figure (closed, saved).
    ``variants`` (``config.variants``) groups the variants of one recipe in the ``imbalance`` figure."""
    hits = None if metrics is None or metrics.empty else tables.target_hit_rates(metrics)
    if name == "simplex":
        return simplex(tables.simplex_points(projection), path, hits=hits)
    if metrics is None or metrics.empty:
        return _placeholder(path, name, "the metrics table is empty")
    if name == "nc_vs_epoch":
        return nc_vs_epoch(tables.nc_curves(metrics), path, hits=hits)
    if name == "accuracy":
        training_log = tables.training_curves(training, tables.varying_settings(metrics))
        return accuracy_curves(tables.accuracy_curves(metrics), path, training_log, hits=hits)
    if name == "alignment":
        return alignment_angle(tables.alignment_curves(metrics), path, hits=hits)
    if name == "leap":
        return leap_heatmap(tables.leap_matrices(metrics), path, hits=hits)
    if name == "layerwise":
        return layerwise(tables.layer_profiles(metrics), path)
    if name == "imbalance":
        return imbalance(tables.imbalance_geometry(metrics, variants=variants), path)
    return ncc_robustness(tables.ncc_robustness_points(metrics), path)


def _render_one(name: str, metrics, training, projection, path: str, variants: dict | None) -> None:
    _draw(name, metrics, training, projection, path, variants)


def render(
    metrics: pd.DataFrame,
    training: pd.DataFrame | None,
    outputs: dict[str, str],
    projection: pd.DataFrame | None = None,
    *,
    workers: int = 1,
    variants: dict | None = None,
) -> None:
    """Render each figure named in ``outputs`` (name -> PNG path; a PDF is written beside it).

    ``projection`` is the concatenated table of :func:`ncrobust.geometry.projection.project` outputs (with
    the cell columns), needed by ``simplex`` only; ``variants`` is ``config.variants``. With ``workers > 1`` the figures are drawn in
    that many forked processes (matplotlib is single-threaded; the figure job is the last of a run
    and would otherwise leave the other cores idle).
    """
    unknown = [name for name in outputs if name not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIGURES)}")
    workers = min(workers, len(outputs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for name, path in outputs.items():
            _render_one(name, metrics, training, projection, path, variants)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    with pool:
        jobs = [pool.submit(_render_one, name, metrics, training, projection, path, variants) for name, path in outputs.items()]
        for job in jobs:
            job.result()  # re-raises a figure's error here


# ---------------------------------------------------------------------------------------------
# related questions: mixup geometry (Fisher et al.) and the near-collapse probe (Tirer et al.)

MIXUP_KIND_MARKERS = {"cross": "o", "same-i": "^", "same-j": "v"}


@_themed
def mixup(points: pd.DataFrame, summary: pd.DataFrame, path: str | Path):
    """Penultimate features of mixed examples of one class pair in the plane of the two classifier
    rows (``tables.mixup_points``; Fisher et al.'s picture): one row per variant (and varying
    setting), one column per (training adversary, evaluation perturbation); colour = the weight
    ``lam`` on class i of a cross-class mix (blue: all j, red: all i), marker = its kind; arrows =
    the rows w_i, w_j, dashed line = their decision boundary (biases left out); same-class mixes in
    grey. Each panel names the
    summary numbers of ``tables.mixup_summary`` (mean over all pairs)."""
    if points is None or points.empty:
        return _placeholder(path, "Mixup geometry", "no mixup geometry tables (evaluation.mixup_geometry.enabled: false?)")
    pair = points["pair"].iloc[0]
    i, j = (int(c) for c in pair.split("-"))
    groups = sorted(points["group"].unique(), key=lambda g: (g not in ("", "base"), g))
    advs = _present(points["adversary"], ADVERSARIES)
    perts = _present(points["perturbation"], ["clean", "pgd"])
    cols = [(a, p) for a in advs for p in perts]
    fig, axes = _grid(len(groups), len(cols), sharex=False, sharey=False, width=3.0, height=3.0)
    norm = matplotlib.colors.Normalize(0.0, 1.0)
    cmap = plt.get_cmap("coolwarm")
    kinds = {"cross": "cross", f"same-{i}": "same-i", f"same-{j}": "same-j"}
    for r, group in enumerate(groups):
        for c, (adv, pert) in enumerate(cols):
            ax = axes[r, c]
            d = points[(points["group"] == group) & (points["adversary"] == adv) & (points["perturbation"] == pert)]
            if d.empty:
                _empty_panel(ax)
                continue
            for kind, key in kinds.items():  # same-class mixes in grey under the cross-class ones, coloured by lam
                k = d[d["kind"] == kind]
                colour = {"c": k["lam"], "cmap": cmap, "norm": norm} if key == "cross" else {"color": "0.45"}
                ax.scatter(k["x"], k["y"], s=7 if key == "cross" else 6, alpha=0.55 if key == "cross" else 0.3, linewidths=0,
                           marker=MIXUP_KIND_MARKERS[key], zorder=3 if key == "cross" else 2, **colour)
            radius = float(np.hypot(d["x"], d["y"]).quantile(0.95)) or 1.0
            wi = np.array([d["wi_x"].iloc[0], 0.0])
            wj = np.array([d["wj_x"].iloc[0], d["wj_y"].iloc[0]])
            for w, name, colour in ((wi, f"w_{i}", cmap(1.0)), (wj, f"w_{j}", cmap(0.0))):
                tip = w / np.linalg.norm(w) * radius
                ax.annotate("", xy=tip, xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6), zorder=4)
                ax.text(*(tip * 1.08), name, color=colour, fontsize=9, weight="bold", ha="center", va="center", zorder=4)
            n = wi - wj
            along = np.array([-n[1], n[0]]) / np.linalg.norm(n) * radius * 1.2
            ax.plot([-along[0], along[0]], [-along[1], along[1]], color="0.35", linestyle="--", linewidth=0.9, zorder=1)
            ax.axhline(0, color="0.85", linewidth=0.6, zorder=0)
            ax.axvline(0, color="0.85", linewidth=0.6, zorder=0)
            ax.set_aspect("equal", adjustable="datalim")
            s = summary[(summary["group"] == group) & (summary["adversary"] == adv) & (summary["perturbation"] == pert)]
            values = s.set_index("metric")["value"] if len(s) else pd.Series(dtype=float)
            if len(values):
                ax.text(0.02, 0.02, f"same∠row {values.get('same_class_angle', np.nan):.0f}°\n"
                        f"cross∠boundary {values.get('cross_boundary_angle', np.nan):.0f}°",
                        transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
                        bbox=dict(boxstyle="round,pad=0.2", facecolor="white", alpha=0.8, linewidth=0))
            if r == 0:
                ax.set_title(f"trained {adv}\n{pert} mixes", fontsize=10, weight="bold")
            ax.set_xlabel(f"⟨h − μ_G, ŵ_{i}⟩" if r == len(groups) - 1 else "")
            ax.set_ylabel(f"{group or 'base'}\n⟨h − μ_G, e₂⟩" if c == 0 else "")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.5, pad=0.01,
                 label=f"λ: weight on class {i} (1 − λ on {j})")
    handles = [Line2D([], [], color="0.3", marker=MIXUP_KIND_MARKERS[v], linestyle="none", markersize=5, label=label)
               for v, label in (("cross", f"{i} mixed with {j}"), ("same-i", f"{i} with {i}"), ("same-j", f"{j} with {j}"))]
    handles.append(Line2D([], [], color="0.35", linestyle="--", label=f"boundary {i} vs {j}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    seeds = max(_seed_count(points), 1)
    fig.suptitle(
        f"Mixup geometry: penultimate features h of mixed examples of classes {i} and {j}, centred by the clean global mean μ_G,\n"
        f"in the plane of w_{i}, w_{j} (e₂: the part of w_{j} orthogonal to w_{i}) · PGD mixes attacked against the majority label"
        f" · final epoch · first seed of {seeds}", fontsize=10,
    )
    return _save(fig, path)


@_themed
def probe(frame: pd.DataFrame, path: str | Path):
    """The near-collapse probe (``tables.probe_curves``; Tirer et al.): NC1 of the solution of the
    regularised unconstrained-features problem against lambda (log-log), for the clean and PGD
    features of the probed layer, the input's NC1 as a dotted line of the same colour (the
    lambda -> infinity limit); below, the ratio solution / input, the predicted reduction. One
    column per variant, a pair of rows per other varying setting (dataset, model, loss); colour =
    training adversary, style = perturbation."""
    if frame is None or frame.empty:
        return _placeholder(path, "Near-collapse probe", "no probe tables (probe.enabled: false?)")
    variants = sorted(frame["variant"].unique(), key=lambda v: (v != "base", v))
    others = sorted(frame["others"].unique()) if "others" in frame.columns else [""]
    advs = _present(frame["adversary"], ADVERSARIES)
    palette = _palette(advs, ADVERSARY_PALETTE)
    perts = _present(frame["perturbation"], PERTURBATION_ORDER)
    dashes = {p: PERTURBATION_DASHES.get(p, (1, 1)) or "" for p in perts}
    markers = {p: PERTURBATION_MARKERS.get(p, "X") for p in perts}
    metrics = [("nc1_solution", "NC1 of the solution\ntr(Σ_W Σ_B⁺)/C"), ("nc1_ratio", "NC1 solution / input\n(predicted reduction)")]
    rows = [(other, metric, label) for other in others for metric, label in metrics]  # variants across, the rest down
    fig, axes = _grid(len(rows), len(variants), sharex=True, sharey="row")
    for c, variant in enumerate(variants):
        for r, (other, metric, label) in enumerate(rows):
            ax = axes[r, c]
            cell = frame[(frame["variant"] == variant) & (frame.get("others", "") == other)]
            d = cell[(cell["metric"] == metric) & (cell["value"] > 0)]
            if d.empty:
                _empty_panel(ax)
                continue
            sns.lineplot(data=d, x="lam", y="value", hue="adversary", hue_order=advs, palette=palette, style="perturbation",
                         style_order=perts, dashes=dashes, markers=markers, markersize=5, errorbar=("pi", 100),
                         err_kws={"alpha": 0.18, "linewidth": 0}, ax=ax, legend=False)
            if metric == "nc1_solution":
                inputs = cell[cell["metric"] == "nc1_input"]
                for (adv, pert), v in inputs.groupby(["adversary", "perturbation"])["value"]:
                    ax.axhline(v.mean(), color=palette[adv], linestyle=":", linewidth=1.1, alpha=0.9)
            else:
                ax.axhline(1.0, color="0.6", linestyle=":", linewidth=0.9)
            ax.set_xscale("log")
            _log_y(ax)
            ax.set_ylabel((f"{other}\n" if other else "") + label if c == 0 else "")
            ax.set_xlabel("λ (proximity to the input features)" if r == len(rows) - 1 else "")
        axes[0, c].set_title(variant, fontsize=11, weight="bold")
    handles = [Line2D([], [], linestyle="none", label="trained with")]
    handles += [Line2D([], [], color=palette[a], label=a) for a in advs]
    handles += [Line2D([], [], linestyle="none", label=" "), Line2D([], [], linestyle="none", label="features")]
    for p in perts:
        line = Line2D([], [], color="0.3", marker=markers[p], markersize=4, label=p)
        if dashes[p]:
            line.set_dashes(dashes[p])
        handles.append(line)
    handles.append(Line2D([], [], color="0.3", linestyle=":", label="input NC1 (λ → ∞)"))
    fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="outside right center", frameon=False)
    layer = "/".join(sorted(frame["layer"].astype(str).unique()))
    seeds = max(_seed_count(frame), 1)
    fig.suptitle(
        f"Near-collapse probe (Tirer et al.): min over W, H of MSE + λ_W‖W‖² + λ‖H − H₀‖², H₀ = features of {layer}"
        f" (rescaled to unit RMS norm)\n"
        f"final epoch · {'1 seed' if seeds <= 1 else f'mean over {seeds} seeds, band = seed range'}", fontsize=10,
    )
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# the kernel and spectrum views: Tsilivis & Kempe's empirical NTK, Nassar et al.'s spectra

KERNEL_SETS = {"clean": "clean-subset kernel", "pgd": "PGD-attacked subset kernel"}
KERNEL_DYNAMICS_ROWS = [  # metric, axis label, log y
    ("distance_to_init", "distance to the initial\nkernel S(K_t, K_0)", False),
    ("distance_to_final", "distance to the final\nkernel S(K_t, K_T)", False),
    ("velocity", "kernel velocity\nS(K_t, K_prev) / epoch", True),
]
KERNEL_ANGLES = {  # metric -> (legend label, dashes)
    "polar_theta": ("whole kernel", ""),
    "polar_theta_top": ("top-k eigenspace", (4, 1.5)),
    "polar_theta_bottom": ("remaining eigenspace", (1, 1)),
}
TEST_SET_DASHES = {"clean": "", "pgd": (4, 1.5)}  # eigen-feature accuracy: clean / attacked test images


@dataclass(frozen=True)
class _AdversaryStyles:
    """Colour per training adversary, line style and marker per varying setting (dataset / model /
    loss / variant), shared by a kernel or spectrum figure's panels and its legend."""

    advs: list[str]
    palette: dict
    settings: list[str]
    dashes: dict
    markers: dict


def _with_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the ``setting`` column of :func:`ncrobust.tables.with_setting`, joined column by
    column (the kernel and spectra tables have a row per eigenvalue: joining row by row takes minutes)."""
    names = [frame[c].astype(str) for c in tables.varying_settings(frame)]
    return frame.assign(setting=functools.reduce(lambda a, b: a + " / " + b, names) if names else "")


def _adversary_styles(frame: pd.DataFrame) -> _AdversaryStyles:
    advs = _present(frame["adversary"], ADVERSARIES)
    settings = sorted(frame["setting"].unique())
    dashes, markers = _style_maps(settings)
    return _AdversaryStyles(advs, _palette(advs, ADVERSARY_PALETTE), settings, dashes, markers)


def _seed_band(ax, d: pd.DataFrame, x: str, colour, dashes="", marker: str | None = "o", *, size: float = 4, width: float = 1.5) -> None:
    """``value`` against ``x``: the mean over seeds, and a band from the lowest to the highest seed."""
    g = d.dropna(subset=["value"]).groupby(x)["value"].agg(["mean", "min", "max"]).sort_index()
    if g.empty:
        return
    (line,) = ax.plot(g.index, g["mean"], color=colour, marker=marker, markersize=size, linewidth=width, zorder=3)
    if dashes:
        line.set_dashes(dashes)
    if (g["max"] > g["min"]).any():
        ax.fill_between(g.index, g["min"], g["max"], color=colour, alpha=0.18, linewidth=0, zorder=2)


def _adversary_handles(styles: _AdversaryStyles, title: str = "trained with") -> list:
    """Legend lines: one colour per adversary, then one line style and marker per setting (several only)."""
    handles = [Line2D([], [], linestyle="none", label=title)]
    handles += [Line2D([], [], color=styles.palette[a], linewidth=2.2, label=a) for a in styles.advs]
    if len(styles.settings) > 1:
        handles.append(Line2D([], [], linestyle="none", label=" "))
        for s in styles.settings:
            line = Line2D([], [], color="0.3", marker=styles.markers[s], markersize=4, label=s)
            if styles.dashes[s]:
                line.set_dashes(styles.dashes[s])
            handles.append(line)
    return handles


def _style_handles(title: str, dashes: dict, markers: dict | None = None) -> list:
    """Legend lines of a style (not a colour): a blank line, the title, one grey line per key."""
    handles = [Line2D([], [], linestyle="none", label=" "), Line2D([], [], linestyle="none", label=title)]
    for key, dash in dashes.items():
        line = Line2D([], [], color="0.3", marker=(markers or {}).get(key), markersize=4, label=str(key))
        if dash:
            line.set_dashes(dash)
        handles.append(line)
    return handles


def _finish_legend(fig, handles: list) -> None:
    fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="outside right center", frameon=False)


def _line_axes(fig, gs, nrows: int, ncols: int) -> np.ndarray:
    """Cartesian panels on the first ``nrows`` rows of ``gs``: x shared per column, y per row."""
    axes = np.empty((nrows, ncols), dtype=object)
    for i in range(nrows):
        for j in range(ncols):
            axes[i, j] = fig.add_subplot(gs[i, j], sharex=axes[0, j] if i else None, sharey=axes[i, 0] if j else None)
            if i < nrows - 1:
                axes[i, j].tick_params(labelbottom=False)
            if j:
                axes[i, j].tick_params(labelleft=False)
    return axes


def _adversary_lines(ax, d: pd.DataFrame, x: str, styles: _AdversaryStyles, *, markers: bool = True, dashes=None) -> None:
    """One seed-averaged line per (adversary, setting) of ``d``: colour = adversary, line style and
    marker = setting (``dashes`` overrides the line style, when it tells something else apart)."""
    for adv in styles.advs:
        for s in styles.settings:
            e = d[(d["adversary"] == adv) & (d["setting"] == s)]
            if len(e):
                _seed_band(ax, e, x, styles.palette[adv], styles.dashes[s] if dashes is None else dashes,
                           styles.markers[s] if markers else None)


POLAR_MIN_DEGREES = 30.0
"""Below this largest angle the polar view is drawn as a plain r-against-theta panel: a polar wedge
of a few degrees is too thin to read (a lazy, kernel-regime network's kernel barely turns)."""


def _polar_panel(ax, d: pd.DataFrame, styles: _AdversaryStyles, limits: tuple[float, float]) -> None:
    """The polar view: each checkpoint's kernel at angle theta (to the initial kernel) and radius r
    (its distance from the initial kernel, in units of the final one's), one trajectory per
    adversary and setting from the initial kernel (origin) out; thin lines: single seeds, a large
    outlined marker: the final checkpoint. ``ax`` is a polar axes, or a plain one (theta in
    degrees on x) for small angles; ``limits``: the largest angle (degrees) and radius measured
    (:func:`_polar_limits`)."""
    polar = ax.name == "polar"
    wide = d.pivot_table(index=["adversary", "setting", "seed", "epoch"], columns="metric", values="value").reset_index()
    wide = wide.dropna(subset=["polar_r", "polar_theta"])
    wide["angle"] = wide["polar_theta"] if polar else np.degrees(wide["polar_theta"])
    for (adv, s), g in wide.groupby(["adversary", "setting"]):
        colour, marker = styles.palette[adv], styles.markers[s]
        for _, one in g.groupby("seed"):
            one = one.sort_values("epoch")
            ax.plot(one["angle"], one["polar_r"], color=colour, linewidth=0.6, alpha=0.35, zorder=2)
        mean = g.groupby("epoch")[["angle", "polar_r"]].mean().sort_index()
        (line,) = ax.plot(mean["angle"], mean["polar_r"], color=colour, marker=marker, markersize=3.5, linewidth=1.5, zorder=3)
        if styles.dashes[s]:
            line.set_dashes(styles.dashes[s])
        ax.plot(mean["angle"].iloc[-1:], mean["polar_r"].iloc[-1:], marker=marker, markersize=8, color=colour,
                markeredgecolor="black", markeredgewidth=0.8, linestyle="none", zorder=4)
    angle, radius = "angle θ = arccos sim(K_t, K_0)", "radius r = ‖K_t − K_0‖ / ‖K_T − K_0‖"
    if polar:  # a wedge of 45, 60, 75 or 90 degrees
        ax.set_thetamin(0)
        ax.set_thetamax(float(np.clip(np.ceil(1.1 * limits[0] / 15) * 15, 45, 90)))
        ax.set_rlim(0, 1.05 * limits[1])
        ax.tick_params(labelsize=8)
        ax.text(0.5, -0.1, f"{angle}\n{radius}", transform=ax.transAxes, ha="center", va="top", fontsize=8.5)
    else:
        ax.set_xlim(0, 1.08 * limits[0] or 1.0)
        ax.set_ylim(0, 1.05 * limits[1])
        ax.set_xlabel(f"{angle}\n(degrees)")
        ax.set_ylabel(radius.replace("radius ", "") if ax.get_subplotspec().colspan.start == 0 else "")
    ax.set_title("polar view" if polar else "polar view (r against θ)", fontsize=10, pad=14 if polar else 4)


@_themed
def kernel_dynamics(dynamics: pd.DataFrame | None, path: str | Path):
    """How far the empirical NTK of a fixed training subset moves during training (the kernel
    dynamics table; Tsilivis & Kempe 2022): one column per kernel set (the clean subset, its
    PGD-attacked copy). Rows: the kernel distance S to the initial and to the final kernel and the
    velocity (distance to the previous checkpoint per epoch, log y) against epoch; the angle to the
    initial kernel of the whole kernel, its top-k and its remaining eigenspace; and the polar view
    (r against theta; a plain panel below :data:`POLAR_MIN_DEGREES`): a lazy (kernel) regime keeps
    small distances and angles, a rich one turns the kernel far; r (1 at the final checkpoint)
    shows whether it moved early or late. Colour = training adversary; line style and marker =
    dataset/model/loss/variant where several; mean over seeds, band = seed range."""
    if dynamics is None or dynamics.empty:
        return _placeholder(path, "Kernel dynamics", "no kernel dynamics table (kernel.enabled: false?)")
    d = _with_setting(dynamics)
    styles = _adversary_styles(d)
    sets = _present(d["set"], list(KERNEL_SETS))
    present = set(d["metric"])
    rows = [r for r in KERNEL_DYNAMICS_ROWS if r[0] in present]
    angles = {m: v for m, v in KERNEL_ANGLES.items() if m in present}
    if angles:
        rows.append(("angles", "angle to the initial\nkernel (degrees)", False))
    polar = {"polar_r", "polar_theta"} <= present
    if not rows:
        return _placeholder(path, "Kernel dynamics", f"no kernel distances in the table (metrics: {', '.join(sorted(present))})")
    n = len(rows) + polar
    fig = plt.figure(figsize=(PANEL_WIDTH * len(sets) + 2.6, PANEL_HEIGHT * len(rows) + 3.6 * polar + 1.2), layout="constrained")
    gs = fig.add_gridspec(n, len(sets), height_ratios=[PANEL_HEIGHT] * len(rows) + [3.4] * polar)
    axes = _line_axes(fig, gs, len(rows), len(sets))
    for j, kset in enumerate(sets):
        k = d[d["set"] == kset]
        for i, (metric, label, log) in enumerate(rows):
            ax = axes[i, j]
            e = k[k["metric"].isin(angles)] if metric == "angles" else k[k["metric"] == metric]
            e = e[e["value"] > 0] if log else e
            if e.empty:
                _empty_panel(ax)
                continue
            if metric == "angles":
                for m, (_, dash) in angles.items():
                    a = e[e["metric"] == m]
                    _adversary_lines(ax, a.assign(value=np.degrees(a["value"])), "epoch", styles, dashes=dash)
            else:
                _adversary_lines(ax, e, "epoch", styles)
                if log:
                    _log_y(ax)
            ax.set_ylabel(label if j == 0 else "")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, j].set_title(KERNEL_SETS.get(kset, kset), fontsize=11, weight="bold")
        if polar:
            limits = _polar_limits(d)
            ax = fig.add_subplot(gs[-1, j], projection="polar" if limits[0] >= POLAR_MIN_DEGREES else None)
            _polar_panel(ax, k[k["metric"].isin(["polar_r", "polar_theta"])], styles, limits)
    for i, (_, _, log) in enumerate(rows):  # after every column is drawn: the shared autoscaled top stays
        if not log:
            axes[i, 0].set_ylim(bottom=0)
    _bottom_labels(axes, "epoch")
    handles = _adversary_handles(styles)
    if angles:
        handles += _style_handles("angle of the", {label: dash for label, dash in angles.values()})
    if polar:
        handles += [Line2D([], [], linestyle="none", label=" "),
                    Line2D([], [], color="0.4", marker="o", markersize=7, markeredgecolor="black", linestyle="none",
                           label="polar: final checkpoint" + ("\n(thin: single seeds)" if d["seed"].nunique() > 1 else ""))]
    _finish_legend(fig, handles)
    _title(fig, "Kernel dynamics of the empirical NTK on a fixed training subset\n(Tsilivis & Kempe): "
                "S = 1 − cosine similarity of kernels;\nsmall distances and angles = lazy (kernel) regime", d)
    return _save(fig, path)


@_themed
def kernel_spectrum(kernel: pd.DataFrame | None, path: str | Path):
    """The empirical NTK's spectrum and what it has learnt (the kernel table; Tsilivis & Kempe 2022):
    one column per kernel set (the clean subset, its PGD-attacked copy). Rows: the mass of the top-k
    eigenvalues (the largest k measured) and the centred kernel-target alignment against epoch
    (how the kernel concentrates on, and aligns with, the labels), the final checkpoint's
    eigenvalues by rank (log-log); below, across the columns, the test accuracy of each
    eigen-feature of the clean kernel by rank (log x) on clean (solid) and PGD-attacked (dashed)
    test images: which eigen-directions carry the robust or the non-robust features. Colour =
    training adversary; mean over seeds, band = seed range."""
    if kernel is None or kernel.empty:
        return _placeholder(path, "Kernel spectrum", "no kernel table (kernel.enabled: false?)")
    d = _with_setting(kernel)
    styles = _adversary_styles(d)
    present = set(d["metric"])
    mass = d[d["metric"] == "top_eigenvalue_mass"]
    k = int(mass["index"].max()) if len(mass) else None
    final = tables.final_epoch(d)
    rows = [r for r in [
        ("mass", mass[mass["index"] == k], f"top-{k} eigenvalue mass\nΣ_(i≤{k}) λ_i² / Σ λ_i²", "epoch"),
        ("alignment", d[d["metric"] == "alignment"], "kernel-target\nalignment (centred)", "epoch"),
        ("eigenvalue", final[final["metric"] == "eigenvalue"], "eigenvalue λ_i\n(final epoch)", "index"),
    ] if not r[1].empty]
    features = final[final["metric"] == "eigen_feature_accuracy"]
    if not rows and features.empty:
        return _placeholder(path, "Kernel spectrum", f"no kernel spectrum in the kernel table (metrics: {', '.join(sorted(present))})")
    sets = _present(d.loc[d["metric"] != "eigen_feature_accuracy", "set"], list(KERNEL_SETS)) or ["clean"]
    n = len(rows) + (not features.empty)
    fig = plt.figure(figsize=(PANEL_WIDTH * len(sets) + 2.6, PANEL_HEIGHT * (n + 0.4) + 1.2), layout="constrained")
    gs = fig.add_gridspec(n, len(sets), height_ratios=[1] * len(rows) + [1.4] * (not features.empty))
    axes = np.empty((n, len(sets)), dtype=object)
    for i, (name, frame, label, x) in enumerate(rows):
        last_epoch_row = x == "epoch" and (i + 1 == len(rows) or rows[i + 1][3] != "epoch")
        for j, kset in enumerate(sets):
            ax = axes[i, j] = fig.add_subplot(gs[i, j], sharey=axes[i, 0] if j else None,
                                              sharex=axes[0, j] if i and x == "epoch" else None)
            if j:
                ax.tick_params(labelleft=False)
            e = frame[frame["set"] == kset]
            e = e[e["value"] > 0] if name == "eigenvalue" else e
            if e.empty:
                _empty_panel(ax)
                continue
            _adversary_lines(ax, e, x, styles, markers=name != "eigenvalue")
            if name == "eigenvalue":
                _log_x(ax)
                _log_y(ax)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.tick_params(labelbottom=last_epoch_row)
            ax.set_xlabel("rank i" if name == "eigenvalue" else "epoch" if last_epoch_row else "")
            ax.set_ylabel(label if j == 0 else "")
        if i == 0:
            for j, kset in enumerate(sets):
                axes[0, j].set_title(KERNEL_SETS.get(kset, kset), fontsize=11, weight="bold")
    handles = _adversary_handles(styles)
    if not features.empty:
        _eigen_feature_panels(fig, gs[-1, :], features, styles)
        handles += _style_handles("test images", {"clean": "", "pgd-attacked": TEST_SET_DASHES["pgd"]})
    _finish_legend(fig, handles)
    epochs = "/".join(map(str, sorted(final["epoch"].unique())))
    _title(fig, f"Spectrum of the empirical NTK on a fixed training subset\n(Tsilivis & Kempe) · final epoch {epochs}", d)
    return _save(fig, path)


def _perturbation_dashes(perts: list[str]) -> dict:
    """Clean solid, each perturbation its own dashes (the colour is the adversary's)."""
    others = [p for p in perts if p != "clean"]
    dashes = {p: STYLE_DASHES[1 + k % (len(STYLE_DASHES) - 1)] for k, p in enumerate(others)}
    return {p: dashes.get(p, "") for p in perts}


def _spectra_lines(ax, d: pd.DataFrame, x: str, styles: _AdversaryStyles, perts: list[str], dashes: dict, *, markers: bool = True) -> None:
    """One seed-averaged line per (adversary, perturbation): colour = adversary, dashes and marker = perturbation."""
    for adv in styles.advs:
        for p in sorted(perts, key=lambda q: q == "clean"):  # clean on top
            e = d[(d["adversary"] == adv) & (d["perturbation"] == p)]
            if len(e):
                _seed_band(ax, e, x, styles.palette[adv], dashes[p], PERTURBATION_MARKERS.get(p, "X") if markers else None)


@_themed
def spectra(spectra: pd.DataFrame | None, path: str | Path):
    """Nassar et al.'s spectrum view of the representations (the spectra table): the power-law
    exponent alpha of each layer's covariance eigenspectrum, lambda_n ~ n^-alpha, on one split
    (test when present). Columns: alpha per layer at the final epoch (layers in forward order),
    alpha of the penultimate layer against epoch, and the penultimate eigenspectrum at the final
    epoch (rank against eigenvalue, log-log). The dotted line is alpha = 1, Stringer et al.'s 1/n
    spectrum: below it the representation is too high-dimensional to be smooth (small input changes
    can move it far), above it smoother. Colour = training adversary; line style and marker =
    input (clean solid); one row per varying dataset/model/loss/variant, whose layers may differ;
    mean over seeds, band = seed range."""
    if spectra is None or spectra.empty:
        return _placeholder(path, "Representation spectra", "no spectra table (spectra.enabled: false?)")
    split = _present(spectra["split"], ["test", "train"])[0]
    d = _with_setting(spectra[spectra["split"] == split])
    styles = _adversary_styles(d)
    perts = _present(d["perturbation"], PERTURBATION_ORDER)
    dashes = _perturbation_dashes(perts)
    final = tables.final_epoch(d)
    depth = int(d["layer_index"].max()) + 1
    fig, axes = plt.subplots(len(styles.settings), 3, figsize=(max(PANEL_WIDTH, 0.55 * depth + 1.4) + 2 * PANEL_WIDTH + 2.6,
                             (PANEL_HEIGHT + 0.5) * len(styles.settings) + 1.4), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [max(PANEL_WIDTH, 0.55 * depth + 1.4), PANEL_WIDTH, PANEL_WIDTH]})
    for i, s in enumerate(styles.settings):
        e, f = d[d["setting"] == s], final[final["setting"] == s]
        last = e.loc[e["layer_index"].idxmax(), "layer"] if PENULTIMATE not in set(e["layer"]) else PENULTIMATE
        layers = e.drop_duplicates("layer_index").sort_values("layer_index")
        measured = e[e["metric"] == "alpha"]
        alpha = measured.dropna(subset=["value"])
        panels = [
            (f[f["metric"] == "alpha"].dropna(subset=["value"]), "layer_index", (f"{s}\n" if s else "") + "α per layer\n(final epoch)"),
            (alpha[alpha["layer"] == last], "epoch", f"α of {last}"),
            (f[(f["metric"] == "eigenvalue") & (f["layer"] == last) & (f["value"] > 0)], "index", f"eigenvalue λ_n\n({last})"),
        ]
        for j, (frame, x, label) in enumerate(panels):
            ax = axes[i, j]
            if frame.empty:
                nan = j < 2 and len(measured)
                _empty_panel(ax, "α is NaN: the spectra are shorter\nthan spectra.index_range" if nan else "no data")
                continue
            _spectra_lines(ax, frame, x, styles, perts, dashes, markers=j < 2)
            ax.set_ylabel(label)
            if j < 2:
                ax.axhline(1.0, color="0.45", linestyle=":", linewidth=1.2, zorder=1)
            if j == 0:
                ax.set_xticks(layers["layer_index"], layers["layer"], rotation=35 if depth > 3 else 0,
                              ha="right" if depth > 3 else "center", rotation_mode="anchor")
                ax.set_xlim(-0.3, depth - 0.7)
                ax.set_xlabel("layer (input → output)")
            elif j == 1:
                ax.sharey(axes[i, 0])  # both panels are alpha
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlabel("epoch")
            else:
                _one_over_n(ax, frame)
                _log_x(ax)
                _log_y(ax)
                ax.set_xlabel("rank n")
    for j, title in enumerate(["α through depth", "α against epoch", "eigenspectrum"]):
        axes[0, j].set_title(title, fontsize=11, weight="bold")
    handles = _adversary_handles(_AdversaryStyles(styles.advs, styles.palette, [""], {"": ""}, {"": "o"}))
    handles += _style_handles("input", dashes, {p: PERTURBATION_MARKERS.get(p, "X") for p in perts})
    handles += [Line2D([], [], linestyle="none", label=" "),
                Line2D([], [], color="0.45", linestyle=":", linewidth=1.2, label="α = 1: 1/n spectrum\n(Stringer et al.)")]
    _finish_legend(fig, handles)
    epochs = "/".join(map(str, sorted(final["epoch"].unique())))
    _title(fig, f"Power-law exponent α of the layers' covariance eigenspectra, λ_n ∝ n^(−α) ({split} split, final epoch {epochs})\n"
                f"Nassar et al.; dotted: α = 1, Stringer et al.'s 1/n spectrum (below it a representation cannot be smooth)", d)
    return _save(fig, path)


def _one_over_n(ax, frame: pd.DataFrame) -> None:
    """A dotted 1/n line (alpha = 1) through the median of the mean spectra at rank 10 (the first rank when shorter)."""
    ranks = np.sort(frame["index"].unique())
    anchor = ranks[min(9, len(ranks) - 1)]
    level = float(frame[frame["index"] == anchor].groupby(["adversary", "perturbation", "setting"])["value"].mean().median())
    ax.plot(ranks, level * anchor / ranks, color="0.45", linestyle=":", linewidth=1.2, zorder=1)


def _log_x(ax) -> None:
    """Log x axis with plain-number labels (``1``, ``10``, ``100``)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))
    ax.xaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))


def _polar_limits(d: pd.DataFrame) -> tuple[float, float]:
    """The largest angle (degrees) and radius of the polar view, the same in every column."""
    theta, r = d.loc[d["metric"] == "polar_theta", "value"], d.loc[d["metric"] == "polar_r", "value"]
    top = float(np.degrees(theta.max())) if theta.notna().any() else 90.0
    return top, max(1.0, float(r.max())) if r.notna().any() else 1.0


def _eigen_feature_panels(fig, spec, features: pd.DataFrame, styles: _AdversaryStyles) -> None:
    """The eigen-features' test accuracy by rank (log x) across the bottom row ``spec``: clean test
    images solid, attacked ones dashed, colour = adversary; one panel per setting where several
    (the line style is the test set's, so the settings cannot share a panel)."""
    sub = spec.subgridspec(1, len(styles.settings))
    first = None
    for j, s in enumerate(styles.settings):
        ax = fig.add_subplot(sub[0, j], sharex=first, sharey=first)
        first = first or ax
        e = features[features["setting"] == s]
        if e.empty:
            _empty_panel(ax)
            continue
        for test_set, dash in TEST_SET_DASHES.items():
            _adversary_lines(ax, e[e["set"] == test_set], "index", styles, dashes=dash)
        _log_x(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("rank i of f_i(x) = λ_i⁻¹ K(x, X) v_i v_iᵀ Y\n(eigen-feature of the clean kernel)")
        ax.set_ylabel("eigen-feature\ntest accuracy" if j == 0 else "")
        ax.tick_params(labelleft=j == 0)
        ax.set_title("each eigen-feature alone, final epoch" + (f"\n{s}" if s else ""), fontsize=10)
