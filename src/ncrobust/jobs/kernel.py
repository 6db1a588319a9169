"""The kernel and spectrum views as file-to-file functions (rules ``kernel``, ``kernel_dynamics``,
``spectra`` and ``kernel_figures``), one call per Snakemake script, like :mod:`ncrobust.jobs.pipeline`."""

from __future__ import annotations

import logging
import time

from ncrobust.cell import Cell
from ncrobust.evaluation.kernel_views import KernelPlan, checkpoint_kernel, checkpoint_spectra, kernel_dynamics
from ncrobust.io import load_torch, read_parquet, save_torch, write_parquet
from ncrobust.jobs.experiment import threat_model
from ncrobust.jobs.pipeline import load_checkpoint_model, setup
from ncrobust.tables import stack, tag

log = logging.getLogger("ncrobust")


def kernel_plan(config: dict) -> KernelPlan:
    """The config section ``kernel`` as a :class:`KernelPlan`."""
    k = config["kernel"]
    return KernelPlan(samples=k["samples"], kind=k["kind"], memory_bytes=k["memory_mb"] << 20, top_k=k["top_k"],
                      attacked=k["attacked"], eigen_ranks=tuple(k["eigen_ranks"]), eigen_test_samples=k["eigen_test_samples"])


def kernel_cell(config: dict, cell: Cell, data_path: str, checkpoint: str, final: bool, kernels_out: str, rows_out: str) -> None:
    """One checkpoint's kernels (for the cell's dynamics) and their rows (spectrum, alignment, and at
    the ``final`` checkpoint the eigen-features): :func:`ncrobust.evaluation.kernel_views.checkpoint_kernel`."""
    device = setup(config)
    model, data, epoch = load_checkpoint_model(config, cell, data_path, checkpoint, device)
    started = time.perf_counter()
    kernels, rows = checkpoint_kernel(model, data, kernel_plan(config), threat=threat_model(config, cell), seed=cell.seed,
                                      epoch=epoch, final=final, device=device)
    log.info("kernel epoch %d: %s in %.1f s", epoch, ", ".join(k for k in kernels if k not in ("index", "labels")),
             time.perf_counter() - started)
    save_torch({**kernels, "epoch": epoch, "cell": cell.as_dict()}, kernels_out)
    write_parquet(tag(rows, cell, epoch), rows_out)


def kernel_dynamics_cell(top_k: int, cell: Cell, kernel_files: list[str], output: str) -> None:
    """A cell's kernel distances, velocity and polar view over its checkpoints (:func:`kernel_dynamics`;
    ``top_k``: ``kernel.top_k``, the polar view's top eigenspace)."""
    kernels = {}
    for path in kernel_files:
        saved = load_torch(path)
        kernels[int(saved["epoch"])] = saved
    frame = kernel_dynamics(kernels, top_k)
    write_parquet(tag(frame, cell).astype({"epoch": "int64"}), output)


def spectra_cell(config: dict, cell: Cell, data_path: str, checkpoint: str, output: str) -> None:
    """Every tap's power-law exponent on one checkpoint, clean and perturbed (:func:`checkpoint_spectra`)."""
    s = config["spectra"]
    device = setup(config)
    model, data, epoch = load_checkpoint_model(config, cell, data_path, checkpoint, device)
    frame = checkpoint_spectra(model, data, split=s["split"], samples=s["samples"], perturbations=tuple(s["perturbations"]),
                               threat=threat_model(config, cell), index_range=tuple(s["index_range"]), seed=cell.seed,
                               epoch=epoch, device=device)
    write_parquet(tag(frame, cell, epoch), output)


def kernel_figures(kernel: list[str], dynamics: list[str], spectra: list[str], *, tables: dict[str, str],
                   figures: dict[str, str]) -> None:
    """Stack the per-cell tables into ``tables`` (``kernel``, ``kernel_dynamics``, ``spectra``) and
    draw ``figures`` (``kernel_dynamics``, ``kernel_spectrum``, ``spectra``), each only when its
    inputs are given."""
    from ncrobust.figures import plots

    if "kernel" in tables:
        k = stack([read_parquet(f) for f in kernel])
        d = stack([read_parquet(f) for f in dynamics])
        write_parquet(k, tables["kernel"])
        write_parquet(d, tables["kernel_dynamics"])
        plots.kernel_dynamics(d, figures["kernel_dynamics"])
        plots.kernel_spectrum(k, figures["kernel_spectrum"])
    if "spectra" in tables:
        s = stack([read_parquet(f) for f in spectra])
        write_parquet(s, tables["spectra"])
        plots.spectra(s, figures["spectra"])
