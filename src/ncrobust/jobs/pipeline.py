"""The workflow's stages as file-to-file functions: each Snakemake script makes exactly one of
these calls. Everything here reads a validated config dict and paths, and writes atomically."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import pandas as pd
import torch
from tqdm import tqdm

from ncrobust import data as datasets
from ncrobust import mps
from ncrobust.cell import Cell
from ncrobust.columns import EPOCH_FIGURES, ROBUSTNESS_COLUMNS
from ncrobust.evaluation.checkpoint import attack_set, evaluate_checkpoint
from ncrobust.io import CorruptFileError, OutdatedFileError, load_torch, read_parquet, save_torch, write_parquet
from ncrobust.jobs.experiment import (
    AUTOCAST, attack_loss, build_model, cell_loss, evaluation_plan, input_shape, resolve_device, robustness_plan, threat_model,
)
from ncrobust.models.adapter import check_classifier
from ncrobust.models.base import eval_mode
from ncrobust.models.external import load_weights, spec_of, tapped
from ncrobust.tables import epoch_collapse_curves, metrics_frame, stack, tag, training_frame
from ncrobust.training.train import Recipe, Schedule, initial_checkpoint, train_segment

log = logging.getLogger("ncrobust")


def setup(config: dict, threads: int | None = None, *, deterministic: bool = True) -> torch.device:
    """Threads, kernel determinism and the device for one job.

    ``deterministic``: deterministic kernels (warn where none exists), cuDNN autotuning off and a
    fixed cuBLAS workspace, so that on a GPU a rerun and a chain of segments give the same bits.
    Off: cuDNN autotuning on and no determinism (faster on a GPU: see the README; a no-op on the
    CPU, whose kernels are deterministic anyway). ``set_deterministic_debug_mode("warn")`` is
    ``use_deterministic_algorithms(True, warn_only=True)`` without its import of
    ``torch._inductor`` (1.6 s, paid by every job). Nothing here is global to the GPU: two jobs
    can share one (memory is allocated on demand by each process).
    """
    torch.set_num_threads(threads or config["threads"])
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, i.e. later
        torch.set_deterministic_debug_mode("warn")
    else:
        torch.set_deterministic_debug_mode("default")
    torch.backends.cudnn.benchmark = not deterministic
    return resolve_device(config["device"])


def place(model: torch.nn.Module, device: torch.device, *tensors: torch.Tensor):
    """Model and resident data on ``device``, in :func:`ncrobust.data.device_layout` (channels_last
    on a GPU, contiguous NCHW on the CPU)."""
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    return (model, *(datasets.device_layout(t.to(device).contiguous()) for t in tensors))


def load_dataset(path: str | os.PathLike) -> dict:
    """A prepared dataset file, checked (a broken or outdated file names its path and the fix)."""
    data = load_torch(path)
    if isinstance(data, dict) and "class_counts" not in data:
        raise OutdatedFileError.at(path, "class_counts", "prepare_data")
    try:
        datasets.validate(data)
    except ValueError as err:
        raise CorruptFileError.at(path, f"unreadable or corrupt: {err}") from err
    return data


def load_checkpoint_model(config: dict, cell: Cell, data_path: str, checkpoint: str, device: torch.device):
    """``(model, data, epoch)``: the cell's model with a checkpoint's weights, placed on ``device``
    (:func:`place`), its prepared data and the checkpoint's epoch. Every stage that reads a trained
    checkpoint starts here."""
    data = load_dataset(data_path)
    ckpt = load_torch(checkpoint, map_location=device)
    model = place(build_model(config, cell, data), device)[0]
    model.load_state_dict(ckpt["model"])
    return model, data, int(ckpt["epoch"])


def prepare_data(config: dict, dataset: str, output: str) -> None:
    ds = config["datasets"][dataset]
    options = dict(ds["options"])
    seed = options.pop("split_seed", 0)
    data = datasets.load(dataset, root=config["data_root"], download=config["download"], seed=seed, **options)
    save_torch(data, output)
    log.info("%s: %d train, %d test images of shape %s", dataset, len(data["y_train"]), len(data["y_test"]), tuple(data["x_train"].shape[1:]))


def recipe(config: dict, cell: Cell) -> Recipe:
    t = config["training"]
    schedule = t["schedule"]
    return Recipe(
        adversary=cell.adversary,
        loss=cell_loss(config, cell),
        threat=threat_model(config, cell),
        epochs=t["epochs"],
        batch_size=t["batch_size"],
        lr=t["optimizer"]["lr"],
        momentum=t["optimizer"]["momentum"],
        weight_decay=t["optimizer"]["weight_decay"],
        schedule=Schedule(schedule["kind"], tuple(schedule["milestones"]), tuple(schedule["factors"])),
        trades_beta=t["trades_beta"],
        log_test_accuracy=t["log_test_accuracy"],
        autocast_dtype=AUTOCAST[config["precision"]],
        trades_bn=t["trades_bn"],
        pgd_clean_bn_pass=t["pgd_clean_bn_pass"],
        track_collapse=t["track_collapse"],
        cuda_graph=t["cuda_graph"],
        mixup_alpha=t["mixup"]["alpha"] if "mixup" in t else 0.0,  # no mixup section: no mixup
        epoch_measure=t["epoch_measure"],
        trades_l2_step=t["trades_l2_step"],
    )


def _deterministic(config: dict) -> bool:
    return config["training"]["deterministic"]


def import_cell(config: dict, cell: Cell, data_path: str, weights: str, epoch: int, output: str) -> None:
    """An external network's checkpoint at the grid's ``epoch``: its weights file read as its entry
    says (:mod:`ncrobust.models.external`, never running code), checked to give the dataset's logits
    from its classifier layer, saved as the state dict of the model :func:`build_model` makes for
    the cell, so that every later stage reads it like a trained checkpoint."""
    setup(config)
    data = load_dataset(data_path)
    spec = spec_of(config["external"][cell.model])
    network, own_epoch = load_weights(replace(spec, path=weights), **input_shape(data))
    model = tapped(spec, network).eval()
    x, _ = datasets.as_float(data, "test")
    check_classifier(model, x[:16], len(data["classes"]))
    save_torch({"model": model.state_dict(), "epoch": epoch, "cell": cell.as_dict(),
                "source": {"architecture": spec.architecture, "format": spec.format, "epoch": own_epoch}}, output)
    log.info("%s: %s weights of %s imported as epoch %d", cell.model, spec.format, spec.architecture, epoch)


def init_cell(config: dict, cell: Cell, data_path: str, output: str) -> None:
    """Epoch 0: the seeded initialisation."""
    setup(config, deterministic=_deterministic(config))
    data = load_dataset(data_path)
    model = build_model(config, cell, data)
    save_torch({**initial_checkpoint(model, recipe(config, cell)), "cell": cell.as_dict()}, output)


def train_cell(
    config: dict, cell: Cell, data_path: str, previous: str, epoch: int, checkpoint_out: str, log_out: str,
    epoch_metrics_out: str | None = None,
) -> None:
    """Train from the previous checkpoint to ``epoch``; write the checkpoint and the epoch log
    (with the in-step NC columns of :data:`ncrobust.columns.COLLAPSE_LOG_COLUMNS`) and, with
    ``training.epoch_measure``, the segment's per-epoch measurement to ``epoch_metrics_out``
    (:data:`ncrobust.columns.METRIC_COLUMNS`, one ``epoch`` per trained epoch). With ``mps``, first
    joins the MPS daemon of the SLURM allocation (before CUDA starts: it reads the variables once)."""
    measure = config["training"]["epoch_measure"]
    if measure != (epoch_metrics_out is not None):
        raise ValueError(f"training.epoch_measure = {measure} needs {'an' if measure else 'no'} epoch_metrics output")
    if config["mps"] and config["device"] != "cpu":
        mps.join_allocation_daemon()
    device = setup(config, deterministic=_deterministic(config))
    data = load_dataset(data_path)
    ckpt = load_torch(previous, map_location=device)  # train_segment copies every tensor to where it is used
    model, x_train, y_train, x_test, y_test = place(
        build_model(config, cell, data), device, *datasets.as_float(data, "train"), *datasets.as_float(data, "test")
    )
    start = int(ckpt["epoch"])
    measured: list[tuple[int, pd.DataFrame]] = []
    with tqdm(total=epoch - start, desc=f"train {cell.adversary} seed{cell.seed} {start}->{epoch}", mininterval=5, ascii=True) as bar:
        new, rows = train_segment(
            model, ckpt, x_train, y_train, recipe=recipe(config, cell), end_epoch=epoch, seed=cell.seed,
            x_test=x_test, y_test=y_test, num_classes=len(data["classes"]), progress=bar,
            epoch_metrics=measured if measure else None, class_counts=data["class_counts"],
        )
    if measure:
        write_parquet(stack([metrics_frame(frame, cell, e) for e, frame in measured]), epoch_metrics_out)
    write_parquet(training_frame(rows, cell), log_out)
    save_torch({**new, "cell": cell.as_dict()}, checkpoint_out)


def evaluate_cell(
    config: dict, cell: Cell, data_path: str, checkpoint: str, metrics_out: str, projection_out: str,
    features_out: str | None = None,
) -> None:
    """Evaluate one checkpoint (:func:`ncrobust.evaluation.checkpoint.evaluate_checkpoint`) and write its
    metrics table, its simplex projection and (when ``features_out`` is given) the features.

    One job rather than evaluate -> metrics: the metrics are computed while the attacked inputs
    stream through the model, instead of a second job re-reading a features file (322 MB per
    CIFAR checkpoint) after another queue wait.
    """
    device = setup(config, deterministic=_deterministic(config))
    model, data, epoch = load_checkpoint_model(config, cell, data_path, checkpoint, device)
    plan = evaluation_plan(config, cell, keep_features=features_out is not None)
    result = evaluate_checkpoint(model, data, plan, seed=cell.seed, epoch=epoch, device=device)
    if features_out:
        save_torch({**result.features, "cell": cell.as_dict()}, features_out)
    write_parquet(metrics_frame(result.metrics, cell, epoch), metrics_out)
    write_parquet(tag(result.projection, cell, epoch), projection_out)


def robustness_cell(config: dict, cell: Cell, data_path: str, checkpoint: str, output: str) -> None:
    """Robust test accuracy of the final checkpoint under PGD-10 and the strong attacks. PGD-10 is
    the evaluation's own (:func:`ncrobust.evaluation.checkpoint.attack_set`: the same seeded attack,
    on the whole batches that hold the first ``max_samples``), so ``pgd_gap`` measures the summary's
    robust accuracy against the strong attacks on the same attacked inputs."""
    from ncrobust.evaluation.robustness import strong_evaluation

    device = setup(config)  # no cuDNN autotuning: on an H100 this stage took 15.9 s with it, 10.6 s without
    model, data, epoch = load_checkpoint_model(config, cell, data_path, checkpoint, device)
    strong = config["evaluation"]["strong"]
    num_classes = len(data["classes"])
    x, y = place(model, device, *datasets.as_float(data, strong["split"]))[1:]
    plan = robustness_plan(config, cell)
    loss_name = attack_loss(config, cell)[0]
    log.info("robustness epoch %d: the evaluation's PGD-10 of the %s split (%d samples), then %s on the first %s",
             epoch, strong["split"], len(x), ", ".join(strong["attacks"]) or "no strong attack", strong["max_samples"] or "all")
    if strong["max_samples"] and len(x) > strong["max_samples"]:  # the first samples, as RobustBench does
        # the evaluation's attack of the split goes batch by batch, its random stream continuing from one to
        # the next: its whole batches that hold the first max_samples are attacked exactly as it attacked them
        whole = -(-strong["max_samples"] // plan.batch_size) * plan.batch_size
        x, y = x[:whole], y[:whole]
    with eval_mode(model):
        x_pgd = attack_set("pgd", model, x, y, plan, plan.threats[0], num_classes=num_classes, seed=cell.seed, epoch=epoch,
                           split=strong["split"], device=device)
    if strong["max_samples"] and len(x) > strong["max_samples"]:
        x, y, x_pgd = x[: strong["max_samples"]], y[: strong["max_samples"]], x_pgd[: strong["max_samples"]]
    rows = strong_evaluation(
        model, x, y, threat=plan.threats[0], num_classes=num_classes, attacks=strong["attacks"],
        seed=cell.seed, batch_size=plan.batch_size, loss=plan.attack_loss, loss_name=loss_name, pgd_inputs=x_pgd,
    )
    frame = pd.DataFrame(rows).assign(split=strong["split"], norm=plan.threats[0].norm)
    write_parquet(tag(frame, cell, epoch)[ROBUSTNESS_COLUMNS], output)


def epoch_figures(epoch_metrics: str, outputs: dict[str, str]) -> None:
    """Draw the figures of the per-epoch measurement (:data:`ncrobust.columns.EPOCH_FIGURES`)
    from the aggregated ``epoch_metrics`` table; ``outputs``: figure name -> PNG path."""
    from ncrobust.figures.plots import epoch_collapse

    unknown = set(outputs) - set(EPOCH_FIGURES)
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(sorted(unknown))}; known: {', '.join(EPOCH_FIGURES)}")
    epoch_collapse(epoch_collapse_curves(read_parquet(epoch_metrics)), outputs["epoch_collapse"])


def figures(
    metrics: str, training: str, outputs: dict[str, str], projections: list[str] | tuple[str, ...] = (), *,
    workers: int = 1, variants: dict | None = None,
) -> None:
    """Render every figure named in ``outputs`` (figure name -> PNG path; a PDF is written beside),
    ``workers`` at a time. ``projections`` are the per-cell projection tables of the ``simplex``
    figure; ``variants`` (``config.variants``) says which variants differ only by their imbalance."""
    from ncrobust.figures.plots import render

    projection = stack([read_parquet(p) for p in projections]) if projections else None
    render(read_parquet(metrics), read_parquet(training), outputs, projection=projection, workers=workers, variants=variants)
