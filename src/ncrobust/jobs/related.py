"""The stages of the related questions (mixup geometry, near-collapse probe) as file-to-file
functions, one call per Snakemake script, like :mod:`ncrobust.jobs.pipeline`: each reads the final
checkpoint of a cell and writes tidy, cell-tagged Parquet tables; :func:`related_figures` stacks
them into the grid's tables and draws the ``mixup`` and ``probe`` figures."""

from __future__ import annotations

from ncrobust import data as datasets
from ncrobust.cell import Cell
from ncrobust.geometry.mixup_geometry import mixup_geometry
from ncrobust.geometry.probe import probe_model
from ncrobust.io import read_parquet, write_parquet
from ncrobust.jobs.experiment import cell_loss, threat_model
from ncrobust.jobs.pipeline import load_checkpoint_model, place, setup
from ncrobust.tables import mixup_points, mixup_summary, probe_curves, stack, tag


def _checkpoint_model(config: dict, cell: Cell, data_path: str, checkpoint: str, split: str, max_samples: int | None = None):
    """The cell's model with the checkpoint's weights and the split's tensors, on the job's device."""
    device = setup(config)
    model, data, epoch = load_checkpoint_model(config, cell, data_path, checkpoint, device)
    x, y = datasets.as_float(data, split)
    if max_samples and len(x) > max_samples:
        x, y = x[:max_samples], y[:max_samples]
    x, y = place(model, device, x, y)[1:]
    return model.eval(), x, y, len(data["classes"]), epoch


def mixup_geometry_cell(config: dict, cell: Cell, data_path: str, checkpoint: str, points_out: str, summary_out: str) -> None:
    """:func:`ncrobust.geometry.mixup_geometry.mixup_geometry` of one checkpoint (settings
    ``evaluation.mixup_geometry``; clean and PGD mixes, the cell's threat model and loss)."""
    g = config["evaluation"]["mixup_geometry"]
    model, x, y, num_classes, epoch = _checkpoint_model(config, cell, data_path, checkpoint, g["split"])
    points, summary = mixup_geometry(
        model, x, y, num_classes=num_classes, pairs=[tuple(p) for p in g["pairs"]], lambdas=g["lambdas"],
        per_class=g["per_class"], perturbations=("clean", "pgd"), threat=threat_model(config, cell),
        loss=cell_loss(config, cell), seed=cell.seed,
    )
    write_parquet(tag(points.assign(split=g["split"]), cell, epoch), points_out)
    write_parquet(tag(summary.assign(split=g["split"]), cell, epoch), summary_out)


def probe_cell(config: dict, cell: Cell, data_path: str, checkpoint: str, output: str) -> None:
    """:func:`ncrobust.geometry.probe.probe_model` of one checkpoint (settings ``probe``): NC1 of Tirer et
    al.'s solution against NC1 of the layer's clean and PGD features, per lambda."""
    p = config["probe"]
    model, x, y, num_classes, epoch = _checkpoint_model(config, cell, data_path, checkpoint, p["split"], p["max_samples"])
    frame = probe_model(
        model, x, y, layer=p["layer"], lambdas=p["lambdas"], threat=threat_model(config, cell), loss=cell_loss(config, cell),
        seed=cell.seed, num_classes=num_classes, weight_decay=p["weight_decay"],
    )
    write_parquet(tag(frame.assign(split=p["split"]), cell, epoch), output)


def related_figures(
    points: list[str], summaries: list[str], probes: list[str], *, tables: dict[str, str], figures: dict[str, str],
) -> None:
    """Stack the per-cell tables into ``tables`` (``mixup_geometry``: the summary numbers of every
    cell and pair, ``probe``: every probe row) and draw ``figures`` (``mixup``, ``probe``), each
    only when its inputs are given."""
    from ncrobust.figures import plots

    if "mixup_geometry" in tables:
        s = stack([read_parquet(f) for f in summaries])
        write_parquet(s, tables["mixup_geometry"])
        plots.mixup(mixup_points(stack([read_parquet(f) for f in points])), mixup_summary(s), figures["mixup"])
    if "probe" in tables:
        p = stack([read_parquet(f) for f in probes])
        write_parquet(p, tables["probe"])
        plots.probe(probe_curves(p), figures["probe"])
