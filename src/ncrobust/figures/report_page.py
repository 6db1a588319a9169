"""The report's front door: what the run is and its summary, readable, as the first screen.

Two outputs of rule ``report_page``:

- the overview fragment (``report/overview.html``): what the run is and the summary table, grouped
  and rounded. ``workflow/report/workflow.rst`` includes it, so Snakemake's report opens on it;
  the figures stay in the report's sidebar (a description holding every figure is ~9,000 px tall,
  and Snakemake's content pane centres it, so its top could never be scrolled to).
- the front page (``report/front_page.html``): a complete, styled page that opens on the same
  overview, followed by every figure with its caption (inlined as data URIs, so the page is one
  self-contained file, also listed in the report).
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path

import pandas as pd

from ncrobust.io import read_parquet, write_text

TITLE = "ncrobust: Neural Collapse under adversarial perturbation"

CELL_KEYS = ["dataset", "model", "loss", "adversary", "variant"]

# The summary's quantities (tables.summary's ``<name>_mean``/``_std`` columns) in groups of
# columns: (group heading, [(quantity, column heading)]). Absent quantities are left out, and so is
# a group with none present.
SUMMARY_GROUPS = [
    ("Accuracy (%)", [
        ("train_accuracy", "train"), ("test_accuracy", "test"), ("train_robust_accuracy", "train PGD"),
        ("test_robust_accuracy", "test PGD"), ("strong_robust_accuracy", "test strong"), ("pgd_gap", "PGD − strong"),
    ]),
    ("Neural Collapse, clean train", [
        ("nc1_clean", "NC1"), ("nc2_equinorm_clean", "NC2 norm"), ("nc2_equiangle_clean", "NC2 angle"),
        ("nc3_clean", "NC3"), ("nc4_clean", "NC4"),
    ]),
    ("Neural Collapse, PGD train", [
        ("nc1_pgd", "NC1"), ("nc2_equinorm_pgd", "NC2 norm"), ("nc2_equiangle_pgd", "NC2 angle"),
        ("nc3_pgd", "NC3"), ("nc4_pgd", "NC4"),
    ]),
    ("Clean simplex under PGD", [
        ("ncc_accuracy_clean_means_pgd", "NCC train %"), ("test_ncc_accuracy_clean_means_pgd", "NCC test %"),
        ("alignment_angle_pgd", "angle °"), ("leap_rate_pgd", "leap %"), ("target_hit_rate", "targeted hit %"),
    ]),
    ("Minority classes", [
        ("minority_cos_W", "cos W"), ("minority_cos_M_clean", "cos M clean"), ("minority_cos_M_pgd", "cos M PGD"),
        ("test_minority_accuracy", "test %"), ("test_minority_robust_accuracy", "test PGD %"),
    ]),
]

STYLE = """
.ncrobust-overview { font-size: 0.8rem; line-height: 1.35; }
.ncrobust-overview p { margin: 0.4em 0; }
.ncrobust-scroll { overflow-x: auto; max-width: 100%; }
table.ncrobust-summary { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.5em 0; }
table.ncrobust-summary th, table.ncrobust-summary td { padding: 0.15em 0.45em; border: 0; white-space: nowrap; }
table.ncrobust-summary thead th { font-weight: 600; text-align: center; vertical-align: bottom; }
table.ncrobust-summary thead tr:first-child th.group { border-bottom: 1px solid #999; }
table.ncrobust-summary th.group + th.group, table.ncrobust-summary .first { border-left: 1px solid #ccc; }
table.ncrobust-summary tbody tr:nth-child(odd) { background: #f3f4f6; }
table.ncrobust-summary td.num { text-align: right; }
table.ncrobust-summary td.key { text-align: left; font-weight: 600; }
table.ncrobust-summary .sd { color: #777; font-size: 0.85em; margin-left: 0.15em; }
"""

PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2937;
       margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1400px; }
h1 { font-size: 1.5rem; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.15rem; margin: 1.2em 0 0.4em; border-bottom: 1px solid #e5e7eb; }
nav a { margin-right: 0.8em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e7eb; }
figcaption { font-size: 0.85rem; max-width: 60rem; }
code, tt { font-size: 0.9em; background: #f3f4f6; padding: 0 0.2em; }
"""


def _number(quantity: str, value: float, std: float) -> str:
    """One summary entry, rounded for reading: fractions in percent (one decimal), the angle in
    degrees, the rest to three significant digits; the spread over seeds after it, small."""
    if pd.isna(value):
        return ""
    if "accuracy" in quantity or "rate" in quantity or quantity == "pgd_gap":
        text, spread = f"{100 * value:.1f}", f"{100 * std:.1f}"
    elif quantity.startswith("alignment_angle"):
        text, spread = f"{value:.1f}", f"{std:.1f}"
    elif quantity.startswith("minority_cos"):
        text, spread = f"{value:.2f}", f"{std:.2f}"
    else:
        text, spread = f"{value:.3g}", f"{std:.1g}"
    if std is None or pd.isna(std) or math.isnan(std):
        return text
    return f'{text}<span class="sd">±{spread}</span>'


def summary_html(table: pd.DataFrame) -> str:
    """The summary (``tables.summary``) as one HTML table: one row per cell (dataset, model, loss,
    adversary, variant), the quantities in groups (:data:`SUMMARY_GROUPS`), rounded, with the
    spread over seeds. Cell keys that are the same in every row are named above it instead."""
    if table.empty:
        return '<p class="ncrobust-empty">The summary is empty: no cell has final-epoch metrics yet.</p>'
    keys = [k for k in CELL_KEYS if k in table.columns and (table[k].nunique() > 1 or k == "adversary")]
    constant = [f"{k} {table[k].iloc[0]}" for k in CELL_KEYS if k in table.columns and k not in keys]
    if "seeds" in table.columns:
        seeds = sorted(set(int(s) for s in table["seeds"]))
        constant.append(f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} per row")
    if "epoch" in table.columns:
        constant.append(f"epoch {int(table['epoch'].max())}")
    groups = [(title, [(q, h) for q, h in cols if f"{q}_mean" in table.columns]) for title, cols in SUMMARY_GROUPS]
    groups = [(title, cols) for title, cols in groups if cols]
    head1 = "".join(f'<th rowspan="2" class="key">{html.escape(k)}</th>' for k in keys)
    head1 += "".join(f'<th class="group" colspan="{len(cols)}">{html.escape(title)}</th>' for title, cols in groups)
    head2 = "".join(
        f'<th{" class=first" if i == 0 else ""} title="{html.escape(q)}">{html.escape(h)}</th>'
        for _, cols in groups for i, (q, h) in enumerate(cols)
    )
    rows = []
    for _, row in table.iterrows():
        cells = "".join(f'<td class="key">{html.escape(str(row[k]))}</td>' for k in keys)
        cells += "".join(
            f'<td class="num{" first" if i == 0 else ""}">{_number(q, row[f"{q}_mean"], row.get(f"{q}_std"))}</td>'
            for _, cols in groups for i, (q, _h) in enumerate(cols)
        )
        rows.append(f"<tr>{cells}</tr>")
    note = f'<p class="ncrobust-note">{html.escape("; ".join(constant))}. Mean over seeds, ±: standard deviation.</p>'
    return (
        f'{note}<div class="ncrobust-scroll"><table class="ncrobust-summary"><thead><tr>{head1}</tr><tr>{head2}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
    )


def run_html(run: dict) -> str:
    """What the run is, one paragraph: the grid, the epochs and the evaluation's perturbations
    (``run``: ``grid``, ``epochs``, ``perturbations`` of the validated config)."""
    grid = run["grid"]
    axes = "; ".join(
        f"{label} {', '.join(map(str, grid[axis]))}"
        for axis, label in (("dataset", "dataset"), ("model", "model"), ("loss", "loss"), ("adversary", "training adversary"),
                            ("variant", "variant"), ("seed", "seed"))
        if axis in grid
    )
    text = (
        "Neural Collapse (NC) of networks trained with and without adversarial training, measured on "
        "clean and perturbed data, after Su, Zhang, Tsilivis and Kempe, <em>On the Robustness of Neural "
        "Collapse and the Neural Collapse of Robustness</em> (TMLR 2024). "
        f"Grid of this run: {html.escape(axes)}; {int(run['epochs'])} epochs, evaluated under the "
        f"perturbations {html.escape(', '.join(run['perturbations']))}."
    )
    return f"<p>{text}</p>"


LOOK_FOR = (
    "<p>What to look for: standard training (<code>st</code>) collapses on clean data and loses its simplex "
    "under PGD (features leap to other class means); adversarially trained networks keep two aligned "
    "simplices, so the nearest-class-centre (NCC) classifier built on clean means stays robust.</p>"
)


def overview_html(summary: pd.DataFrame, run: dict) -> str:
    """The overview: what the run is and the summary table (the fragment the report opens on)."""
    return (
        f'<div class="ncrobust-overview"><style>{STYLE}</style>{run_html(run)}{LOOK_FOR}'
        f'<h2 id="summary">Summary at the final epoch</h2>{summary_html(summary)}</div>'
    )


def caption_html(rst: str) -> str:
    """A caption written in reStructuredText, as HTML."""
    from docutils.core import publish_parts
    from docutils.writers.html4css1 import Writer  # the writer of Snakemake's own captions

    return publish_parts(rst, writer=Writer())["body"]


def front_page(
    summary: str | os.PathLike, figures: dict[str, str], captions: dict[str, str], page: str | os.PathLike,
    overview: str | os.PathLike, run: dict,
) -> None:
    """Write the overview fragment and the front page: a complete HTML page with the title, the
    overview and each figure (name -> PNG path) with its caption (name -> reStructuredText text),
    in the order of ``figures``. The captions come as text, not paths: the rule passes them as
    params, so a moved or copied project reruns nothing."""
    missing = sorted(set(figures) - set(captions))
    if missing:
        raise ValueError(f"no caption for figure(s) {', '.join(missing)}")
    body = overview_html(read_parquet(summary), run)
    nav = " ".join(f'<a href="#{html.escape(name)}">{html.escape(name)}</a>' for name in figures)
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(TITLE)}</title><style>{PAGE_STYLE}</style></head><body>",
        f"<h1>{html.escape(TITLE)}</h1>",
        body,
        f'<h2 id="figures">Figures</h2><nav>{nav}</nav>',
    ]
    for name, png in figures.items():
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(
            f'<figure id="{html.escape(name)}"><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{caption_html(captions[name])}'
            "</figcaption></figure>"
        )
    parts.append("</body></html>")
    write_text(body + "\n", overview)
    write_text("\n".join(parts) + "\n", page)
