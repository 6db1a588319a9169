# Validation, the grid, wildcard constraints and input functions. No logic beyond wiring.
import itertools
import sys

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from ncrobust.config import ConfigError, validate_config
from ncrobust.cell import Cell
from ncrobust.stages import stage_slice

try:
    config = validate_config(config, base_dir=Path.cwd())
except ConfigError as err:
    sys.stderr.write(f"ncrobust: config error: {err}\n")
    sys.exit(1)

RESULTS = config["results"]
GRID = config["grid"]
RUN = f"{RESULTS}/runs/{{dataset}}/{{model}}/{{loss}}/{{adversary}}/seed{{seed}}"
CHECKPOINT_EPOCHS = [0, *config["training"]["checkpoints"]]
EVAL_EPOCHS = config["evaluation"].get("epochs") or CHECKPOINT_EPOCHS
FIGURES = ["nc_vs_epoch", "accuracy", "alignment", "leap", "layerwise", "simplex", "ncc_robustness", "imbalance"]


wildcard_constraints:
    dataset="|".join(GRID["dataset"]),
    model="|".join(GRID["model"]),
    loss="|".join(GRID["loss"]),
    adversary="|".join(GRID["adversary"]),
    seed=r"\d+",
    epoch=r"\d+",


def cells():
    """Every cell of the grid, as dicts of wildcard values."""
    keys = ["dataset", "model", "loss", "adversary", "seed"]
    return [dict(zip(keys, values)) for values in itertools.product(*(GRID[k] for k in keys))]


def cell_of(wildcards):
    return Cell(wildcards.dataset, wildcards.model, wildcards.loss, wildcards.adversary, int(wildcards.seed))


def config_slice(stage):
    """The rule's params: the canonical config slice its output depends on (ncrobust.stages).
    Snakemake reruns a job when this slice's text changes, and only then; the job script adds
    the execution settings (threads, device, ...) from snakemake.config, which it does not compare."""
    if stage == "prepare_data":
        return lambda wildcards: stage_slice(stage, config, dataset=wildcards.dataset)
    return lambda wildcards: stage_slice(stage, config, cell=cell_of(wildcards))


def previous_checkpoint(wildcards):
    """Checkpoint epoch e is trained from the previous checkpoint epoch."""
    epoch = int(wildcards.epoch)
    if epoch not in CHECKPOINT_EPOCHS[1:]:
        raise ValueError(f"epoch {epoch} is not a checkpoint epoch; checkpoints: {CHECKPOINT_EPOCHS}")
    prev = CHECKPOINT_EPOCHS[CHECKPOINT_EPOCHS.index(epoch) - 1]
    return f"{RUN}/checkpoints/epoch{prev}.pt".format(**wildcards)


def metrics_files():
    return [f"{RUN}/metrics/epoch{e}.parquet".format(**c) for c in cells() for e in EVAL_EPOCHS]


def training_logs():
    return [f"{RUN}/train_log/epoch{e}.parquet".format(**c) for c in cells() for e in CHECKPOINT_EPOCHS[1:]]


def projection_files():
    """The simplex projection of every cell at its last evaluated epoch (input of the figures)."""
    return [f"{RUN}/projection/epoch{max(EVAL_EPOCHS)}.parquet".format(**c) for c in cells()]


def robustness_files():
    """The strong final evaluation of every cell (none when evaluation.strong.attacks is empty
    and PGD-10 is the only attack: the table then still gives PGD-10 on the same samples)."""
    final = CHECKPOINT_EPOCHS[-1]
    return [f"{RUN}/robustness/epoch{final}.parquet".format(**c) for c in cells()] if config["evaluation"]["strong"]["enabled"] else []


def final_outputs():
    tables = [f"{RESULTS}/tables/{name}" for name in ("metrics.parquet", "training.parquet", "robustness.parquet", "summary.parquet", "summary.md", "summary.csv")]
    return tables + projection_files() + [f"{RESULTS}/figures/{name}.png" for name in FIGURES]


def job_resources(kind):
    """SLURM requests of a rule kind (train, evaluate, cpu) from the config."""
    r = config["resources"].get(kind, {})
    res = dict(mem_mb=r.get("mem_mb", 4000), runtime=r.get("runtime", 60), cpus_per_task=r.get("cpus", 1))
    if r.get("gpu", 0):
        res["gpu"] = r["gpu"]
        if config["resources"].get("gpu_model"):
            res["gpu_model"] = config["resources"]["gpu_model"]
    return res
