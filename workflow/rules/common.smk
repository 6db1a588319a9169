# Validation, the grid, wildcard constraints and input functions. No logic beyond wiring.
import os
import re
import sys

from snakemake_interface_executor_plugins.settings import ExecMode

from ncrobust.config import ConfigError, typed_overrides, validate_config
from ncrobust.attacks import PERTURBATIONS
from ncrobust.cell import ADVERSARIES, Cell
from ncrobust.columns import EPOCH_FIGURES, KERNEL_FIGURES
from ncrobust.io import CorruptFileError, archive_damage, unwritable_directory
from ncrobust.lineage import cell_sources, merged, rebuild_alone, stranded
from ncrobust.runlock import clear_stale_lock, locked_message, record_run, release_run
from ncrobust.stages import (
    KERNEL_VIEW_FILES,
    RUN_LAYOUT,
    all_cells,
    canonical,
    checkpoint_epochs,
    data_variant,
    drawn_figures,
    evaluated_epochs,
    grid_cells,
    is_external,
    merge,
    stage_slice,
)

# Snakemake leaves the scalars of a nested --config value as strings (training='{"epochs": 3}'
# gives "3"): merge the overrides again with YAML's types, then check everything that can be
# checked without data. The checked config (defaults filled in) replaces Snakemake's in place, so
# that job scripts see it too as snakemake.config.
try:
    _checked = validate_config(merge(config, typed_overrides(workflow.config_settings.config)), base_dir=Path.cwd())
except ConfigError as err:
    sys.stderr.write(f"ncrobust: config error: {err}\n")
    sys.exit(1)
config.clear()
config.update(_checked)

RESULTS = config["results"]
GRID = config["grid"]
RUN = f"{RESULTS}/{RUN_LAYOUT}"  # a cell's directory, with its wildcards (ncrobust.stages.RUN_LAYOUT)
DATA = f"{RESULTS}/data/{{dataset}}/{{data_variant}}.pt"  # data_variant: base, or a variant with dataset overrides
CHECKPOINT_EPOCHS = checkpoint_epochs(config)
EVAL_EPOCHS = evaluated_epochs(config)
FINAL_EPOCH = CHECKPOINT_EPOCHS[-1]  # an external network's one checkpoint is the grid's last epoch
EXTERNAL = list(config["external"])  # networks trained elsewhere: their cells are imported, not trained
CELLS = all_cells(config)
MIXUP_GEOMETRY = config["evaluation"]["mixup_geometry"]["enabled"]  # opt-in stages of related.smk
PROBE = config["probe"]["enabled"]
RELATED_FIGURES = [name for name, on in (("mixup", MIXUP_GEOMETRY), ("probe", PROBE)) if on]
KERNEL = config["kernel"]["enabled"]  # the kernel and spectrum views (kernel.smk), opt-in
SPECTRA = config["spectra"]["enabled"]
KERNEL_VIEW_FIGURES = [name for name in KERNEL_FIGURES if (SPECTRA if name == "spectra" else KERNEL)]
EPOCH_MEASURE = config["training"]["epoch_measure"]  # the per-epoch measurement of training: extra train outputs
MEASURED_FIGURES = EPOCH_FIGURES if EPOCH_MEASURE else []  # drawn by rule epoch_figures (report.smk)
DRAWN_FIGURES = drawn_figures(config)  # FIGURES this grid has something to show in (rule figures)
REPORT_FIGURES = DRAWN_FIGURES + MEASURED_FIGURES + RELATED_FIGURES + KERNEL_VIEW_FIGURES  # the front page's, in its order
FINDINGS = f"{RESULTS}/findings/{config['findings']}.md"  # the findings block of this config (report.smk)


wildcard_constraints:
    dataset="|".join(dict.fromkeys(c["dataset"] for c in CELLS)),
    model="|".join(map(re.escape, dict.fromkeys(c["model"] for c in CELLS))),
    loss="|".join(dict.fromkeys(c["loss"] for c in CELLS)),
    adversary="|".join(dict.fromkeys(c["adversary"] for c in CELLS)),
    variant="|".join(GRID["variant"]),
    data_variant="|".join(sorted({data_variant(config, v) for v in GRID["variant"]})),
    seed=r"\d+",
    epoch=r"\d+",


def cells():
    """Every cell, as dicts of wildcard values: the grid's (the product of the axes, less the cells
    a variant's `adversaries` or `losses` leaves out) and the external networks' (ncrobust.stages.all_cells)."""
    return CELLS


def trained_cells():
    """The cells that train (not the external networks')."""
    return grid_cells(config)


def cell_checkpoint_epochs(c):
    """A cell's checkpoint epochs: the grid's, or the one imported checkpoint of an external network."""
    return [FINAL_EPOCH] if is_external(config, c) else CHECKPOINT_EPOCHS


def cell_eval_epochs(c):
    """The epochs evaluated in a cell: evaluation.epochs, or an external network's one checkpoint."""
    return [FINAL_EPOCH] if is_external(config, c) else EVAL_EPOCHS


def external_weights(wildcards):
    """An external network's weights file: the import job's input (replacing it reruns the cell)."""
    return config["external"][wildcards.model]["path"]


def cell_of(wildcards):
    return Cell(wildcards.dataset, wildcards.model, wildcards.loss, wildcards.adversary, int(wildcards.seed), wildcards.variant)


def data_file(wildcards):
    """The prepared data a cell reads: its dataset, with its variant's dataset overrides."""
    return DATA.format(dataset=wildcards.dataset, data_variant=data_variant(config, wildcards.variant))


def config_slice(stage):
    """The rule's params: the canonical config slice its output depends on (ncrobust.stages).
    Snakemake reruns a job when this slice's text changes, and only then; the job script adds
    the execution settings (threads, device, ...) from snakemake.config, which it does not compare."""
    if stage == "prepare_data":
        return lambda wildcards: stage_slice(stage, config, dataset=wildcards.dataset, variant=wildcards.data_variant)
    return lambda wildcards: stage_slice(stage, config, cell=cell_of(wildcards))


def previous_checkpoint(wildcards):
    """Checkpoint epoch e is trained from the previous checkpoint epoch."""
    epoch = int(wildcards.epoch)
    if epoch not in CHECKPOINT_EPOCHS[1:]:
        raise ValueError(f"epoch {epoch} is not a checkpoint epoch; checkpoints: {CHECKPOINT_EPOCHS}")
    prev = CHECKPOINT_EPOCHS[CHECKPOINT_EPOCHS.index(epoch) - 1]
    return f"{RUN}/checkpoints/epoch{prev}.pt".format(**wildcards)


def metrics_files():
    return [f"{RUN}/metrics/epoch{e}.parquet".format(**c) for c in cells() for e in cell_eval_epochs(c)]


def training_logs():
    return [f"{RUN}/train_log/epoch{e}.parquet".format(**c) for c in trained_cells() for e in CHECKPOINT_EPOCHS[1:]]


def epoch_metrics_files():
    """The per-epoch measurement of every training segment (training.epoch_measure; none when off)."""
    if not EPOCH_MEASURE:
        return []
    return [f"{RUN}/epoch_metrics/epoch{e}.parquet".format(**c) for c in trained_cells() for e in CHECKPOINT_EPOCHS[1:]]


def projection_files():
    """The simplex projection of every cell at its last evaluated epoch (input of the figures)."""
    return [f"{RUN}/projection/epoch{max(cell_eval_epochs(c))}.parquet".format(**c) for c in cells()]


def robustness_files():
    """The strong final evaluation of every cell (none when evaluation.strong.attacks is empty
    and PGD-10 is the only attack: the table then still gives PGD-10 on the same samples)."""
    return (
        [f"{RUN}/robustness/epoch{FINAL_EPOCH}.parquet".format(**c) for c in cells()]
        if config["evaluation"]["strong"]["enabled"]
        else []
    )


def checkpoint_files():
    return [f"{RUN}/checkpoints/epoch{e}.pt".format(**c) for c in cells() for e in cell_checkpoint_epochs(c)]


def final_outputs():
    """Every file of every cell, not only the tables and figures: Snakemake rebuilds a missing
    file only when it is a target or an input of a job that runs, so a deleted checkpoint or
    metrics file (e.g. a corrupt one removed as its error message says) is rebuilt by the same
    command even though the tables made from it still exist."""
    tables = [
        f"{RESULTS}/tables/{name}"
        for name in ("metrics.parquet", "training.parquet", "robustness.parquet", "summary.parquet", "summary.md", "summary.csv")
    ]
    evaluated = ["metrics", "projection", *(["features"] if config["evaluation"]["keep_features"] else [])]
    per_epoch = [
        f"{RUN}/{kind}/epoch{e}.{'pt' if kind == 'features' else 'parquet'}".format(**c)
        for c in cells()
        for e in cell_eval_epochs(c)
        for kind in evaluated
    ]
    per_cell = checkpoint_files() + training_logs() + per_epoch + robustness_files() + epoch_metrics_files()
    if EPOCH_MEASURE:
        tables.append(f"{RESULTS}/tables/epoch_metrics.parquet")
    return tables + per_cell + [f"{RESULTS}/figures/{name}.png" for name in DRAWN_FIGURES + MEASURED_FIGURES]


def requested_files():
    """The files named on the command line (normalised, relative to the working directory)."""
    from snakemake.cli import get_argument_parser

    args, _ = get_argument_parser().parse_known_args(sys.argv[1:])
    return {os.path.normpath(os.path.relpath(t)) for t in args.targets or ()}


def check_no_stranded_files():
    """Stop, in one line, when an intermediate file (prepared data, a checkpoint) is missing while
    files made from it exist and the run names no files (ncrobust.lineage), or is damaged and the
    run does not ask for it. Jobs started by a cluster executor do not check: the run that submitted them did."""
    if workflow.workflow_settings.exec_mode != ExecMode.DEFAULT:
        return
    targets = requested_files()
    sources = merged(
        *(
            cell_sources(
                RUN.format(**c),
                DATA.format(dataset=c["dataset"], data_variant=data_variant(config, c["variant"])),
                cell_checkpoint_epochs(c),
                cell_eval_epochs(c),
                config["evaluation"]["strong"]["enabled"],
            )
            for c in cells()
        )
    )
    for missing, product in [] if targets else stranded(sources):  # files asked for: only what they need is built
        sys.stderr.write(f"ncrobust: {rebuild_alone(missing, product)}\n")
        sys.exit(1)
    # A damaged one (truncated, overwritten) stops the run before any job reads it: a job that
    # failed on it would leave its restored outputs without Snakemake's record of their inputs.
    for path in sources:
        damage = archive_damage(path) if os.path.exists(path) and os.path.normpath(path) not in targets else None
        if damage:
            sys.stderr.write(f"ncrobust: CorruptFileError: {CorruptFileError.at(path, damage)}\n")
            sys.exit(1)


check_no_stranded_files()


def handle_stale_lock():
    """After a killed run (SIGKILL, the out-of-memory killer), the same command resumes: a lock that
    surely belongs to no running process is removed (ncrobust.runlock); any other refusal to run in
    a locked directory is one line naming `--unlock` and when it is safe."""
    if workflow.workflow_settings.exec_mode != ExecMode.DEFAULT:
        return
    import snakemake.exceptions

    for run in clear_stale_lock():
        sys.stderr.write(
            f"ncrobust: removed the lock left by a killed run (pid {run.pid} on this machine, no longer "
            "running); the jobs it left unfinished are redone\n"
        )

    class LockedDirectory(snakemake.exceptions.LockException):
        def __init__(self):
            snakemake.exceptions.WorkflowError.__init__(self, f"ncrobust: {locked_message()}")

    snakemake.exceptions.LockException = LockedDirectory  # raised by Snakemake's Persistence.lock()


handle_stale_lock()


def check_writable():
    """Stop in one line, before any job starts, when a directory the jobs to run write into (their
    outputs and logs) cannot be written: a read-only mount, a directory of another user or group."""
    paths = [str(f) for job in workflow.dag.needrun_jobs() for f in (*job.output, *job.log)]
    blocked = unwritable_directory(paths)
    if blocked:
        sys.stderr.write(
            f"ncrobust: cannot write into {blocked} (read-only, or not yours), where jobs of this run write "
            f"their outputs and logs: make it writable (chmod -R u+w {blocked}, or remount it read-write), "
            "or write the results elsewhere (--config results=DIR); no job has started\n"
        )
        sys.exit(1)


# Before any job: the directories it writes are writable. A run that holds the lock says so while it
# runs jobs (Snakemake calls onstart after taking the lock, and onsuccess / onerror before removing
# it): a record left behind is a killed run's. As a module of another workflow, Snakemake runs only
# the main Snakefile's handlers: that one calls these (ncrobust.onstart(), ...; docs/deploy.md).
onstart:
    if workflow.workflow_settings.exec_mode == ExecMode.DEFAULT:
        check_writable()
        record_run()


onsuccess:
    release_run()


onerror:
    release_run()


def job_resources(kind):
    """SLURM requests of a rule kind (train, evaluate, cpu) from the config. GPUs are requested as
    the string resource `gres` (`gpu:1`, `gpu:a100:1`), not the number `gpu`: Snakemake sums a
    number over the parallel jobs of a group job but keeps a string that all of them share, so k
    training chains packed into one allocation (`--group-components train=k`) share one GPU."""
    r = config["resources"][kind]
    res = dict(mem_mb=r["mem_mb"], runtime=r["runtime"], cpus_per_task=r["cpus"])
    if r["gpu"]:
        model = config["resources"]["gpu_model"]
        res["gres"] = f"gpu:{model}:{r['gpu']}" if model else f"gpu:{r['gpu']}"
    return res


# The related stages' per-cell outputs at the final epoch (related.smk), and what rule all asks of them.


def related_files(kind):
    """The per-cell outputs of one related stage at the final epoch: mixup_geometry (points),
    mixup_summary, probe."""
    folder, name = {
        "mixup_geometry": ("mixup_geometry", "points"),
        "mixup_summary": ("mixup_geometry", "summary"),
        "probe": ("probe", "probe"),
    }[kind]
    return [f"{RUN}/{folder}/{name}_epoch{FINAL_EPOCH}.parquet".format(**c) for c in cells()]


def related_outputs():
    """Every related output the config switches on (none by default)."""
    out = []
    if MIXUP_GEOMETRY:
        out += related_files("mixup_geometry") + related_files("mixup_summary")
        out += [f"{RESULTS}/tables/mixup_geometry.parquet", f"{RESULTS}/figures/mixup.png"]
    if PROBE:
        out += related_files("probe") + [f"{RESULTS}/tables/probe.parquet", f"{RESULTS}/figures/probe.png"]
    return out


# The kernel and spectrum views' per-cell outputs (kernel.smk), and what rule all asks of them.


def kernel_files(kind, c=None):
    """Per-cell files of the kernel views (ncrobust.stages.KERNEL_VIEW_FILES): the checkpoint
    kernels (`kernels`, .pt) and their rows (`kernel`) at every checkpoint epoch (the dynamics need
    them all, whatever evaluation.epochs evaluates), each trained cell's `kernel_dynamics`, the
    `spectra` rows; of one cell `c` (a dict of wildcard values), or of every cell."""
    pattern = KERNEL_VIEW_FILES[kind]
    chosen = [c] if c is not None else (trained_cells() if kind == "kernel_dynamics" else cells())
    epochs = (lambda cell: [None]) if kind == "kernel_dynamics" else cell_checkpoint_epochs  # one file per cell
    return [f"{RUN}/{pattern}".format(**cell, e=e) for cell in chosen for e in epochs(cell)]


def cell_kernels(wildcards):
    """One cell's checkpoint kernels, every checkpoint epoch: the input of its kernel dynamics."""
    return kernel_files("kernels", dict(wildcards))


def kernel_outputs():
    """Every output of the kernel views the config switches on (none by default)."""
    out = []
    if KERNEL:
        out += kernel_files("kernels") + kernel_files("kernel") + kernel_files("kernel_dynamics")
        out += [f"{RESULTS}/tables/kernel.parquet", f"{RESULTS}/tables/kernel_dynamics.parquet"]
    if SPECTRA:
        out += kernel_files("spectra") + [f"{RESULTS}/tables/spectra.parquet"]
    return out + [f"{RESULTS}/figures/{name}.png" for name in KERNEL_VIEW_FIGURES]
