"""Which result files are made from which, so that a missing intermediate file is rebuilt on its own.

Snakemake reruns every job downstream of a job it runs, whatever the rebuilt file holds: a deleted
data file or checkpoint rebuilt inside an ordinary run would redo everything made from it. Rebuilt
alone (asked for by its path), it is compared by content later: the workflow profile
(``profiles/default``) has Snakemake record a checksum of every input of every job
(``max-checksum-file-size``), and a newer input with the recorded checksum reruns nothing. The
Snakefile therefore refuses an ordinary run while such a file is missing (:func:`stranded`) and
names the command that rebuilds it alone (:func:`rebuild_alone`).

Torch-free: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping


def cell_sources(run: str, data: str, checkpoint_epochs: list[int], eval_epochs: Iterable[int],
                 robustness: bool) -> dict[str, list[str]]:
    """The intermediate files of one cell (directory ``run``, prepared data ``data``) and the files
    made directly from each: the data file makes the initial checkpoint; checkpoint ``e`` makes the
    next checkpoint, the evaluation of epoch ``e`` and, for the last one, the strong evaluation."""
    evaluated = set(eval_epochs)
    final = checkpoint_epochs[-1]
    out: dict[str, list[str]] = {data: [f"{run}/checkpoints/epoch{checkpoint_epochs[0]}.pt"]}
    for i, epoch in enumerate(checkpoint_epochs):
        made = [f"{run}/checkpoints/epoch{checkpoint_epochs[i + 1]}.pt"] if i + 1 < len(checkpoint_epochs) else []
        if epoch in evaluated:
            made += [f"{run}/metrics/epoch{epoch}.parquet", f"{run}/projection/epoch{epoch}.parquet"]
        if robustness and epoch == final:
            made.append(f"{run}/robustness/epoch{epoch}.parquet")
        out[f"{run}/checkpoints/epoch{epoch}.pt"] = made
    return out


def stranded(sources: Mapping[str, Iterable[str]], exists: Callable[[str], bool] = os.path.exists) -> list[tuple[str, str]]:
    """``(missing, product)`` for every source file that is missing while a file made from it
    (``product``, the first one found) exists."""
    out = []
    for source, products in sources.items():
        if exists(source):
            continue
        product = next((p for p in products if exists(p)), None)
        if product is not None:
            out.append((source, product))
    return out


def rebuild_alone(missing: str, product: str) -> str:
    """The one-line refusal for a missing intermediate file, with the commands that recover."""
    return (
        f"{missing} is missing while files made from it exist ({product}); rebuilt within this run it "
        f"would redo all of them. Rebuild it alone first, then rerun this command (what is made from it "
        f"reruns only if its content changed): snakemake --cores 1 {missing}"
    )


def merged(*sources: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Several cells' sources as one mapping (cells that share a data file share its entry)."""
    out: dict[str, list[str]] = {}
    for s in sources:
        for source, products in s.items():
            out.setdefault(source, []).extend(products)
    return out
