"""The names the stages, tables and figures share: the columns of every result table, the layer
name of the penultimate features and the study's figures. Defined once, here; free of torch, so
that the tables, the figures and the workflow's parsing import them without it.
"""

from __future__ import annotations

PENULTIMATE = "penultimate"
"""The layer name of the features fed to the classifier (every model's last tap)."""

RESULT_COLUMNS = ["split", "norm", "perturbation", "layer", "layer_index", "metric", "class", "row", "col", "value"]
"""One checkpoint's metrics (:func:`ncrobust.evaluation.checkpoint.evaluate_checkpoint`), before the cell's
columns are added."""

CELL_COLUMNS = ["dataset", "model", "loss", "adversary", "variant", "seed"]
"""What every stage's rows are tagged with (:func:`ncrobust.tables.tag`)."""

SETTING_COLUMNS = ["dataset", "model", "loss", "variant"]
"""The cell columns a figure tells apart by line style, row or marker where they vary (the
adversary has its own panels, seeds are averaged)."""

COLLAPSE_LOG_COLUMNS = (
    "nc1_clean", "nc1_trace_ratio_clean", "ncc_accuracy_clean",
    "nc1_adv", "nc1_trace_ratio_adv", "ncc_accuracy_adv", "ncc_accuracy_clean_means_adv",
)
"""The training log's per-epoch in-step Neural Collapse: the features the training steps computed
(train-mode BatchNorm, the model changing within the epoch; ``track_collapse``; NaN without it)."""

METRIC_COLUMNS = [*CELL_COLUMNS, "epoch", *RESULT_COLUMNS]
"""The metrics table: one checkpoint's results tagged with its cell and epoch."""

ROBUSTNESS_COLUMNS = [*CELL_COLUMNS, "epoch", "split", "norm", "attack", "attack_loss", "robust_accuracy", "samples"]
"""The strong final evaluation of each cell (rule ``robustness``)."""

TRAINING_COLUMNS = [*CELL_COLUMNS, "epoch", "lr", "loss_value", "train_accuracy", "train_robust_accuracy", "test_accuracy",
                    *COLLAPSE_LOG_COLUMNS, "seconds"]
"""The training log, one row per epoch of each cell."""

FIGURES = ["nc_vs_epoch", "accuracy", "alignment", "leap", "layerwise", "simplex", "ncc_robustness", "imbalance"]
"""The study's figures (rule ``figures``): each is ``figures/<name>.png`` with its caption
``workflow/report/<name>.rst``."""

EPOCH_FIGURES = ["epoch_collapse"]
"""The figures of the per-epoch measurement of training (rule ``epoch_figures``), drawn only with
``training.epoch_measure``; named and captioned like :data:`FIGURES`."""

KERNEL_COLUMNS = ["set", "metric", "index", "value"]
"""One checkpoint's kernel rows (rule ``kernel``, :func:`ncrobust.evaluation.kernel_views.checkpoint_kernel`):
``set`` ``clean`` or ``pgd`` (the attacked subset), ``index`` a rank (eigenvalues, eigen-features)
or ``k`` (top-eigenvalue mass); tagged with the cell and epoch in ``tables/kernel.parquet``."""

DYNAMICS_COLUMNS = ["set", "metric", "value"]
"""One cell's kernel dynamics per epoch (rule ``kernel_dynamics``): distances, velocity, polar view."""

SPECTRA_COLUMNS = ["split", "perturbation", "layer", "layer_index", "metric", "index", "value"]
"""One checkpoint's representation spectra (rule ``spectra``): ``alpha`` per layer and perturbation,
and the eigenvalues by rank (``index``)."""

KERNEL_FIGURES = ["kernel_dynamics", "kernel_spectrum", "spectra"]
"""The figures of the kernel and spectrum views (rule ``kernel_figures``), drawn when their stage is on:
``kernel_dynamics`` and ``kernel_spectrum`` with ``kernel.enabled``, ``spectra`` with ``spectra.enabled``."""
