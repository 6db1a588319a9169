"""The front page of ``snakemake --report``: the summary table and every figure with its caption.

Snakemake's report shows the workflow description (``workflow/report/workflow.rst``) on its
landing page, but figures only behind sidebar clicks and Markdown tables as plain text. The
description includes this module's output, one HTML fragment with the summary as a table and the
figures inline (as data URIs, so the report stays one self-contained file).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from ncrobust.io import write_text


def markdown_table_html(text: str) -> str:
    """A GitHub pipe table (``tables.summary_markdown``'s output) as an HTML table."""
    rows = [line.strip().strip("|").split("|") for line in text.strip().splitlines() if line.strip().startswith("|")]
    if len(rows) < 2 or not all(set(cell.strip()) <= set("-: ") for cell in rows[1]):
        raise ValueError("not a Markdown pipe table: no header row followed by a |---| separator row")
    head = "".join(f"<th>{html.escape(cell.strip())}</th>" for cell in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in row) + "</tr>" for row in rows[2:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def caption_html(rst: str) -> str:
    """A caption written in reStructuredText, as HTML."""
    from docutils.core import publish_parts
    from docutils.writers.html4css1 import Writer  # the writer of Snakemake's own captions

    return publish_parts(rst, writer=Writer())["body"]


def front_page(
    summary_md: str | os.PathLike, figures: dict[str, str], captions: dict[str, str], output: str | os.PathLike
) -> None:
    """Write the front page fragment: the summary table, then each figure (name -> PNG path) with
    its caption (name -> reStructuredText text), in the order of ``figures``. The captions come as
    text, not paths: the rule passes them as params, so a moved or copied project reruns nothing."""
    missing = sorted(set(figures) - set(captions))
    if missing:
        raise ValueError(f"no caption for figure(s) {', '.join(missing)}")
    # Wider than the description's column, scrolling sideways: the summary has one column per metric.
    parts = [
        '<div style="width: 80vw; overflow-x: auto; font-size: 0.75rem">',
        "<h2>Summary (final epoch, mean ± std over seeds)</h2>",
        markdown_table_html(Path(summary_md).read_text()),
        "<h2>Figures</h2>",
    ]
    for name, png in figures.items():
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(
            f'<figure id="{html.escape(name)}"><img style="max-width: 100%" alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{caption_html(captions[name])}'
            "</figcaption></figure>"
        )
    parts.append("</div>")
    write_text("\n".join(parts) + "\n", output)
