"""Which part of the config each workflow stage's output depends on.

Snakemake reruns a job when the ``repr`` of one of its ``params`` differs from the one recorded
with its outputs. Each rule therefore takes as params only the *slice* of the validated config
that determines its output (:func:`stage_slice`), in a canonical form (:func:`canonical`: keys
sorted at every level, so key order does not matter; :func:`ncrobust.config.validate_config` has
already filled the defaults and turned schema ``number`` values into floats). A slice keeps the
nesting of the full config, so the library's pipeline functions read it like a full config.

Settings that cannot change a result (:data:`EXECUTION_KEYS`: threads, device, resources, ...)
are in no slice: the job script adds them from ``snakemake.config``, which Snakemake does not
compare (:func:`job_config`).

Whole sections go into a slice minus the keys known not to matter for that stage, so a key added
to ``training`` or ``evaluation`` later reruns the stages that read it without a change here.

Free of torch: the rules call this at parse time.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping

from ncrobust.cell import BASE_VARIANT, Cell

STAGES = ("prepare_data", "init_model", "train", "import_network", "evaluate", "robustness", "mixup_geometry", "probe",
          "kernel", "spectra")
TRAINED_CELL_STAGES = tuple(s for s in STAGES if s not in ("prepare_data", "import_network"))
"""The stages with a slice of a trained cell."""
EXTERNAL_CELL_STAGES = tuple(s for s in STAGES if s not in ("prepare_data", "init_model", "train"))
"""The stages with a slice of an external network's cell (``config.external``): imported, not trained."""

EXECUTION_KEYS = ("results", "data_root", "download", "device", "threads", "resources", "group_training", "mps")
"""Top-level keys that say where and how a job runs, never what it computes: in no slice.
``data_root`` and ``download`` say where a dataset comes from, not which one it is."""

RESULTS_ONLY_KEYS = ("findings",)
"""Top-level keys that only a stage reading the result tables uses (the ``findings`` rule, which
takes the value as its params): in no slice, so changing one reruns no cell's job."""

TRAINING_IGNORED = frozenset({"checkpoints"})
"""``training`` keys no training output depends on: the checkpoint epochs choose which segments
exist (and so each segment's input file, which Snakemake compares on its own), not what epoch e's
weights are: resuming is bit-identical to an uninterrupted run."""

TRAINING_EXECUTION = frozenset({"cuda_graph", "deterministic"})
"""``training`` keys that say how a GPU runs the same computation (a captured step, deterministic
kernels): results agree to rounding, so changing them reruns nothing; :func:`job_config` hands
them to every job."""

TRAINING_USED_BY = {"trades_beta": "trades", "trades_bn": "trades", "pgd_clean_bn_pass": "pgd", "trades_l2_step": "trades-l2"}
"""``training`` keys that only one adversary kind (or one adversary: ``trades_l2_step`` is the step of
the ``l2`` TRADES attack) reads: in the slices of that kind's or that adversary's cells only."""

TRAINING_OUTPUT_ONLY = frozenset({"epoch_measure"})
"""``training`` switches that add files to the train job and never change its checkpoint (the
per-epoch measurement runs in eval mode and draws no random number: tested bit-identical): in the
train slice only, and there only when on, so that the key's default reruns nothing, also in
results made before the key existed; :func:`job_config` hands its value to every training job."""

EVALUATION_IGNORED = {
    # which checkpoints are evaluated (one file per epoch), and whether the features file is also
    # written (an output of its own): neither changes a metric; `strong` is the robustness stage's
    "evaluate": frozenset({"epochs", "keep_features", "strong", "mixup_geometry"}),
    # extra threat models are attacked on `st` cells only (EVALUATION_USED_BY)
    # the strong evaluation reads `strong`, `batch_size`, `attack_precision` and the `pgd` entry of
    # `perturbations` (it attacks with the evaluation's PGD-10: ROBUSTNESS_PERTURBATIONS)
    "robustness": frozenset({"epochs", "keep_features", "splits", "layerwise", "feature_dtype", "norms",
                             "mixup_geometry", "projection_points"}),
}

ROBUSTNESS_PERTURBATIONS = ("pgd",)
"""The ``evaluation.perturbations`` entries in the robustness slice: its PGD-10 is the evaluation's."""

EVALUATION_USED_BY = {"norms": "st"}
"""``evaluation`` keys that only one adversary kind reads: in the slices of that kind's cells only."""

EVALUATION_UNUSED_BY_LOSS = {"attack_loss": "ce"}
"""``evaluation`` keys that cells of one loss never read: ``attack_loss`` chooses between the
cell's own loss and cross-entropy, the same for a ``ce`` cell, so it is in no slice of one."""


VARIANT_PARTS = ("dataset", "model", "training")
"""What a variant may override: the cell's dataset loader options, its model's options, and
``training`` (but :data:`VARIANT_FIXED_TRAINING`)."""

VARIANT_ONLY = {"adversaries": "adversary", "losses": "loss"}
"""A variant entry's fields that restrict it to some values of a grid axis (absent: every value of
the grid): a variant that only changes what one adversary kind reads (``training.trades_bn``)
gets no cells of the others, which would train copies of their ``base`` cells; ``losses`` keeps a
variant to the losses it is meant to study."""

VARIANT_FIXED_TRAINING = {
    "epochs": "the checkpoint epochs are the grid's",
    "checkpoints": "the checkpoint epochs are the grid's",
    "epoch_measure": "the per-epoch measurement is the grid's (it decides which files every train job writes)",
}
"""``training`` keys a variant may not change, and why: the checkpoint epochs are the grid's,
shared by every cell (file names, the evaluated epochs, the tables' epoch axis), and so is the
switch that adds the per-epoch measurement's files to every train job."""


def variant_overrides(config: dict, variant: str, dataset: str, model: str) -> dict:
    """The partial config that variant ``variant`` lays over ``config`` for a cell of ``dataset``
    and ``model``: ``{"datasets": {dataset: {"options": ...}}, "models": {model: ...},
    "training": ...}`` (empty for ``base``)."""
    if variant == BASE_VARIANT:
        return {}
    variants = config.get("variants", {})
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r}; defined in config.variants: {', '.join(sorted(variants)) or 'none'}")
    entry = variants[variant]
    out: dict = {}
    if entry.get("dataset"):
        out["datasets"] = {dataset: {"options": entry["dataset"]}}
    if entry.get("model"):
        out["models"] = {model: entry["model"]}
    if entry.get("training"):
        out["training"] = entry["training"]
    return out


def variant_restriction(config: dict, variant: str, **axes: str) -> str | None:
    """Why the grid has no cell of ``variant`` with these axis values (``adversary=...``,
    ``loss=...``): the :data:`VARIANT_ONLY` field that leaves them out, as ``variants.V.F = [...]``;
    ``None`` when it has (always for ``base``)."""
    if variant == BASE_VARIANT:
        return None
    entry = config.get("variants", {}).get(variant, {})
    for field, axis in VARIANT_ONLY.items():
        only = entry.get(field)
        if only is not None and axis in axes and axes[axis] not in only:
            return f"variants.{variant}.{field} = [{', '.join(only)}]"
    return None


def variant_applies(config: dict, variant: str, **axes: str) -> bool:
    """Whether the grid has cells of ``variant`` with these axis values (``adversary=...``,
    ``loss=...``; see :func:`variant_restriction`)."""
    return variant_restriction(config, variant, **axes) is None


GRID_AXES = ("dataset", "model", "loss", "adversary", "variant", "seed")
"""The grid's axes, in the order of a cell's path."""


RUN_LAYOUT = "runs/{dataset}/{model}/{loss}/{adversary}/{variant}/seed{seed}"
"""A cell's directory under ``results``, in :data:`GRID_AXES` (Snakemake's wildcards fill it in
``common.smk``, :mod:`ncrobust.collect` reads finished cells from it): one spelling for both."""

KERNEL_VIEW_FILES = {
    "kernels": "kernel/epoch{e}.pt",
    "kernel": "kernel/epoch{e}.parquet",
    "kernel_dynamics": "kernel/dynamics.parquet",
    "spectra": "spectra/epoch{e}.parquet",
}
"""A cell's files of the kernel and spectrum views under :data:`RUN_LAYOUT` (``kernels``: the
checkpoint kernels the dynamics read; the others are stacked into the table of their name), for
``common.smk`` and :mod:`ncrobust.collect` alike."""


def checkpoint_epochs(config: dict) -> list[int]:
    """The epochs with a checkpoint: 0 (the initialisation) and ``training.checkpoints``; training
    segment ``e`` ends at each after 0."""
    return [0, *config["training"]["checkpoints"]]


def evaluated_epochs(config: dict) -> list[int]:
    """The checkpoint epochs the ``evaluate`` stage measures: ``evaluation.epochs``, by default all."""
    return list(config["evaluation"].get("epochs") or checkpoint_epochs(config))


def grid_cells(config: dict) -> list[dict]:
    """Every cell of a validated config's grid as a dict of :data:`GRID_AXES` values: the product of
    the axes, less the cells a variant's ``adversaries`` or ``losses`` leaves out."""
    grid = config["grid"]
    cells = (dict(zip(GRID_AXES, values)) for values in itertools.product(*(grid[axis] for axis in GRID_AXES)))
    return [c for c in cells if variant_applies(config, c["variant"], adversary=c["adversary"], loss=c["loss"])]


def external_cells(config: dict) -> list[dict]:
    """The cells of the networks under ``external`` (trained elsewhere, docs/own-network.md): one
    per entry, whose model is the entry's name, in the ``base`` variant."""
    return [
        {"dataset": e["dataset"], "model": name, "loss": e["loss"], "adversary": e["adversary"], "variant": BASE_VARIANT,
         "seed": e["seed"]}
        for name, e in config.get("external", {}).items()
    ]


def all_cells(config: dict) -> list[dict]:
    """The grid's trained cells (:func:`grid_cells`), then the external networks' (:func:`external_cells`)."""
    return grid_cells(config) + external_cells(config)


def is_external(config: dict, cell: Cell | dict) -> bool:
    """Whether ``cell`` is an external network's: imported, not trained (its model is an entry's name)."""
    model = cell["model"] if isinstance(cell, dict) else cell.model
    return model in config.get("external", {})


EXTERNAL_UNSLICED = ("path",)
"""External entry keys in no slice: where the weights file is does not change a result, and its
content is the ``import_network`` job's input (Snakemake compares it)."""


def _external(config: dict, cell: Cell) -> dict:
    """An external cell's part of every slice: its entry (but :data:`EXTERNAL_UNSLICED`) and the
    options of its loss, which the attacks may ascend."""
    entry = {k: v for k, v in config["external"][cell.model].items() if k not in EXTERNAL_UNSLICED}
    return {"external": {cell.model: entry}, "losses": {cell.loss: config.get("losses", {}).get(cell.loss, {})}}


def _recipe(config: dict, cell: Cell) -> dict:
    """What made the checkpoint, in a later stage's slice: the training recipe of a trained cell,
    the entry of an external one."""
    return _external(config, cell) if is_external(config, cell) else _training(config, cell)


def imbalanced(config: dict) -> bool:
    """Whether a cell of the grid trains with minority classes (an ``imbalance`` ratio of at least
    2 in its dataset options, its variant's included: a minority class has at most half the
    training samples of the largest)."""
    for c in grid_cells(config):
        variant = variant_overrides(config, c["variant"], c["dataset"], c["model"]).get("datasets", {})
        options = merge(config["datasets"].get(c["dataset"], {}), variant.get(c["dataset"], {})).get("options") or {}
        imbalance = options.get("imbalance")
        if imbalance and float(imbalance.get("ratio", 1)) >= 2:
            return True
    return False


def drawn_figures(config: dict) -> list[str]:
    """The study figures (:data:`ncrobust.columns.FIGURES`) that this grid has something to show
    in: ``imbalance`` only when a cell has minority classes (:func:`imbalanced`); on a balanced
    grid all its Minority Collapse panels would be placeholders. Decided from the config at parse
    time, so a figure left out is simply no output of the run."""
    from ncrobust.columns import FIGURES

    return [name for name in FIGURES if name != "imbalance" or imbalanced(config)]


def cell_config(config: dict, cell: Cell) -> dict:
    """The config as the cell's variant sees it: ``config`` with the variant's overrides merged
    in (``config`` itself for ``base``). Every stage reads its cell's config through this, so a
    library function never needs to know about variants. A cell the variant's ``adversaries`` or
    ``losses`` leaves out is an error (a target asked for by path that no grid cell has)."""
    why = variant_restriction(config, cell.variant, adversary=cell.adversary, loss=cell.loss)
    if why:
        raise ValueError(f"variant {cell.variant!r} has no {cell.loss} {cell.adversary} cells: {why}")
    overrides = variant_overrides(config, cell.variant, cell.dataset, cell.model)
    return merge(config, overrides) if overrides else config


def data_variant(config: dict, variant: str) -> str:
    """The name of the prepared-data file a variant's cells read: ``base`` when the variant
    leaves the dataset options alone, else the alphabetically first variant with the same
    dataset overrides (variants that differ only in model or training share one file)."""
    wanted = config.get("variants", {}).get(variant, {}).get("dataset") if variant != BASE_VARIANT else None
    if not wanted:
        return BASE_VARIANT
    return min(name for name, entry in config["variants"].items() if canonical(entry.get("dataset")) == canonical(wanted))


def canonical(value):
    """``value`` with every dict's keys sorted (recursively) and tuples as lists: equal configs
    give equal ``repr``, whatever the key order they were written in."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value  # a YAML scalar: immutable


def cell_threat(config: dict, cell: Cell) -> dict:
    """``{"datasets": {dataset: ...}}`` with the one threat model the cell uses: its adversary's
    norm, or for ``st`` the dataset's ``norm`` and its threat model (see
    :func:`ncrobust.jobs.experiment.threat_model`)."""
    ds = config["datasets"][cell.dataset]
    norm = cell.parsed_adversary.norm
    if norm is None:
        entry = {"norm": ds["norm"], "threat": {ds["norm"]: ds["threat"][ds["norm"]]}}
    else:
        entry = {"threat": {norm: ds["threat"][norm]}}
    return {"datasets": {cell.dataset: entry}}


def _model_and_loss(config: dict, cell: Cell) -> dict:
    return {
        "models": {cell.model: config.get("models", {}).get(cell.model, {})},
        "losses": {cell.loss: config.get("losses", {}).get(cell.loss, {})},
    }


def _training(config: dict, cell: Cell, *, train_job: bool = False) -> dict:
    """The train slice (``train_job``) or the recipe part of a later stage's slice."""
    kind = cell.parsed_adversary.kind
    training = {
        k: v for k, v in config["training"].items()
        if k not in TRAINING_IGNORED and k not in TRAINING_EXECUTION and TRAINING_USED_BY.get(k, kind) in (kind, cell.adversary)
        and (k not in TRAINING_OUTPUT_ONLY or (train_job and v))
    }
    sliced = {**_model_and_loss(config, cell), "training": training, "precision": config["precision"]}
    if kind != "st":  # standard training never attacks
        sliced = merge(sliced, cell_threat(config, cell))
    return sliced


def _evaluation(stage: str, config: dict, cell: Cell) -> dict:
    kind = cell.parsed_adversary.kind
    evaluation = {
        k: v for k, v in config["evaluation"].items()
        if k not in EVALUATION_IGNORED[stage] and EVALUATION_USED_BY.get(k, kind) == kind
        and EVALUATION_UNUSED_BY_LOSS.get(k) != cell.loss
    }
    if stage == "robustness":
        evaluation["perturbations"] = {k: v for k, v in evaluation["perturbations"].items() if k in ROBUSTNESS_PERTURBATIONS}
    return merge(_recipe(config, cell), cell_threat(config, cell), {"evaluation": evaluation})


def stage_slice(
    stage: str, config: dict, *, cell: Cell | None = None, dataset: str | None = None, variant: str = BASE_VARIANT,
) -> dict:
    """The canonical part of a validated ``config`` that the output of one job of ``stage``
    depends on: ``dataset`` (and the data file's ``variant``) for ``prepare_data``, ``cell`` for
    every other stage. Variants are applied first (:func:`cell_config`): a slice holds what the
    cell computes with, never the variant's name.

    - ``prepare_data``: the dataset's loader options.
    - ``init_model``: the model's options (the seed and the dataset's shapes come with the
      output path and the data file).
    - ``train``: model and loss options, ``training`` (but the checkpoint epochs, the keys of
      other adversaries: :data:`TRAINING_USED_BY`, and the :data:`TRAINING_OUTPUT_ONLY` switches
      while off), ``precision``, and the cell's threat model unless the cell is ``st``.
    - ``evaluate``: that, the cell's threat model, and ``evaluation`` but the keys in
      :data:`EVALUATION_IGNORED`; ``robustness`` likewise, with its own ignored keys.
    - ``mixup_geometry``, ``probe``, ``kernel``, ``spectra``: the train slice, the cell's threat
      model and their own section (:data:`RELATED_SECTIONS`).
    - ``import_network`` (external cells only): the entry under ``external`` but its path, and its
      loss's options; the later stages of an external cell hold that in place of the recipe.

    ``aggregate`` and ``figures`` read files only: no slice.
    """
    if stage == "prepare_data":
        if dataset is None:
            raise ValueError("stage prepare_data needs dataset=")
        options = config["datasets"][dataset].get("options", {})
        if variant != BASE_VARIANT:
            options = merge(options, config["variants"][variant].get("dataset", {}))
        return canonical({"datasets": {dataset: {"options": options}}})
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages with a config slice: {', '.join(STAGES)}")
    if cell is None:
        raise ValueError(f"stage {stage} needs cell=")
    config = cell_config(config, cell)
    if stage in ("init_model", "train") and is_external(config, cell):
        raise ValueError(f"{cell.model} is an external network: it has no {stage} stage (import_network makes its checkpoint)")
    if stage == "import_network":
        if not is_external(config, cell):
            raise ValueError(f"{cell.model} is no external network: its checkpoints are trained")
        return canonical(_external(config, cell))
    if stage == "init_model":
        return canonical({"models": {cell.model: config.get("models", {}).get(cell.model, {})}})
    if stage == "train":
        return canonical(_training(config, cell, train_job=True))
    if stage in RELATED_SECTIONS:  # the checkpoint's recipe, the threat model and the stage's own section
        section = RELATED_SECTIONS[stage]
        own = {section[0]: {section[1]: config[section[0]][section[1]]}} if len(section) == 2 else {section[0]: config[section[0]]}
        return canonical(merge(_recipe(config, cell), cell_threat(config, cell), own))
    return canonical(_evaluation(stage, config, cell))


RELATED_SECTIONS = {"mixup_geometry": ("evaluation", "mixup_geometry"), "probe": ("probe",), "kernel": ("kernel",),
                    "spectra": ("spectra",)}
"""The config section of each related-question stage (``mixup_geometry``, ``probe``, and the
kernel and spectrum views ``kernel``, ``spectra``): its slice is that section with the train slice
and the cell's threat model (their attacks use it)."""


def job_config(stage: str, sliced: dict, config: dict, *, cell: Cell | None = None) -> dict:
    """The config a job of ``stage`` hands to its pipeline function: its slice (the rule's
    params), the execution settings of the full ``config`` (``snakemake.config``), and the keys
    the library reads without the output depending on them:

    - ``init_model``: :func:`ncrobust.jobs.pipeline.init_cell` builds the whole training recipe to
      create the epoch-0 optimizer, which holds no state yet (momentum buffers are empty and the
      learning rate is set from the recipe at every training step);
    - ``init_model`` and ``train``: the recipe resolves the cell's threat model, which standard
      training never uses, and reads every key of :data:`TRAINING_USED_BY`, which other
      adversaries never use, and every key of :data:`TRAINING_OUTPUT_ONLY` (off: no extra file).

    A stage that reads a key outside these fails with a ``KeyError`` instead of silently not
    rerunning when that key changes.
    """
    if cell is not None:
        config = cell_config(config, cell)
    parts = [sliced]
    if stage == "init_model":
        parts.append(_training(config, cell))
    if stage in ("init_model", "train"):
        parts.append(cell_threat(config, cell))
        parts.append({"training": {k: config["training"][k] for k in (*TRAINING_USED_BY, *TRAINING_OUTPUT_ONLY)
                                   if k in config["training"]}})
    parts.append({key: config[key] for key in EXECUTION_KEYS if key in config})
    parts.append({"training": {k: config["training"][k] for k in TRAINING_EXECUTION if k in config["training"]}})
    return merge(*parts)


def merge(*dicts: Mapping) -> dict:
    """Deep merge, later mappings winning on leaves (nested mappings merged, anything else
    replaced: the way Snakemake applies ``--config`` to the config files); the inputs are not
    modified."""
    out: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return out
