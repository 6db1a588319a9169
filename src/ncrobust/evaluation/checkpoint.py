"""The evaluation core: a model's features on each split under each perturbation -> every metric
of every layer, as one tidy table.

One loop feeds every layer the same way. For each split the clean set is measured first; its
per-layer statistics (:class:`ncrobust.collapse.LayerStats`) are the reference ("clean means") of
every perturbed set of that split, so they are computed once. The penultimate layer is one more
layer of the same two streaming passes (pass 1: class sums; pass 2: within-class scatter, NCC with
the own and the clean means, agreement with the network), plus the quantities that only the last
layer has: NC2 / NC3 against the classifier, NC4, accuracy (overall and per class), the leap
matrix and the alignment of the perturbed simplex with the clean one. Every layer also gets the
imbalance geometry of its class means (``mean_norm_per_class``, ``orthogonality_M``,
``minority_cos_M``) and, on a perturbed set, the displacement of its class means and global mean
from the clean ones (``class_mean_distance``, ``global_mean_angle``, ...), the penultimate one that of the classifier rows too and the training split's
``train_class_count`` (the minorities come from the prepared dataset's ``class_counts``).

Which labels group a set is decided here, once: the true labels, except for ``pgd-targeted``,
whose samples are grouped by their target ``(y + 1) mod C`` for every metric of every layer (as
Su et al. measure it: the angle between clean mean ``c`` and the mean of the samples sent to ``c``);
``accuracy_true_labels`` and ``target_hit_rate`` (the network's argmax is the target) say how the
attack did, and at every layer ``target_hit_rate_ncc`` (the nearest clean class mean is the target)
where in the network it got there; sets without targets have neither.

Metrics come from the float32 activations of the forward pass, whatever ``feature_dtype`` the kept
features file uses. Pass 2 reuses pass 1's activations as far as memory allows
(:func:`activation_cache_bytes`) and runs the forward pass again only for the batches beyond.
Nothing in the per-batch loop reads a value back to the host (``tests/host_syncs.py`` checks it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ncrobust.attacks import PERTURBATIONS, TRADES_L2_STEPS, ThreatModel, perturb, target_labels
from ncrobust.collapse import LayerStats, minority_classes
from ncrobust.columns import PENULTIMATE, RESULT_COLUMNS
from ncrobust.data import as_float, device_layout
from ncrobust.geometry.projection import SimplexPlane
from ncrobust.models.base import eval_mode
from ncrobust.seeding import generator

log = logging.getLogger(__name__)

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_ACTIVATION_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class EvaluationPlan:
    """What to measure on one checkpoint; validated once, here, so the loop trusts it.

    ``threats``: the threat models to attack under, the cell's own first (an ``st`` cell may add the
    other norm: ``evaluation.norms``); ``perturbations``: name -> overrides of the threat model
    (``steps``, ``step_size``, ``eps``, ``restarts``); ``attack_loss``: the loss the attacks ascend
    (the cell's training loss); ``projection_points``: penultimate features kept per set for the
    ``simplex`` figure; ``keep_features``: keep every set's penultimate features and logits;
    ``attack_dtype``: autocast dtype of the attacks' forward and backward passes (None: fp32; the
    metrics are measured in fp32 on the perturbed inputs either way); ``trades_l2_step``: the ``l2``
    step of ``trades-kl`` (:class:`ncrobust.attacks.TradesKL`).
    """

    threats: tuple[ThreatModel, ...]
    perturbations: dict[str, dict] = field(default_factory=lambda: {"clean": {}})
    splits: tuple[str, ...] = ("train", "test")
    batch_size: int = 1000
    layerwise: bool = True
    attack_loss: Callable | None = None
    projection_points: int = 300
    keep_features: bool = False
    feature_dtype: str = "float32"
    attack_dtype: torch.dtype | None = None
    trades_l2_step: str = "threat"

    def __post_init__(self) -> None:
        if not self.threats or not all(isinstance(t, ThreatModel) for t in self.threats):
            raise ValueError("threats must be a non-empty sequence of ThreatModel (the cell's own first)")
        norms = [t.norm for t in self.threats]
        if len(set(norms)) != len(norms):
            raise ValueError(f"threats must have distinct norms, got {norms}")
        unknown = set(self.perturbations) - set(PERTURBATIONS)
        if unknown:
            raise ValueError(f"unknown perturbations {sorted(unknown)}; allowed: {', '.join(PERTURBATIONS)}")
        bad_splits = set(self.splits) - {"train", "test"}
        if not self.splits or bad_splits:
            raise ValueError(f"splits must be a non-empty subset of train, test; got {list(self.splits)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.projection_points, int) or self.projection_points < 0:
            raise ValueError(f"projection_points must be an integer >= 0, got {self.projection_points!r}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype {self.feature_dtype!r}; allowed: {', '.join(FEATURE_DTYPES)}")
        if self.attack_dtype not in (None, torch.bfloat16):  # fp16's range underflows small gradients: not validated
            raise ValueError(f"attack_dtype {self.attack_dtype!r}; allowed: None (fp32), torch.bfloat16")
        if self.trades_l2_step not in TRADES_L2_STEPS:
            raise ValueError(f"trades_l2_step {self.trades_l2_step!r}; allowed: {', '.join(TRADES_L2_STEPS)}")

    @property
    def attacked(self) -> list[str]:
        """Perturbations other than ``clean``, in the configured order."""
        return [p for p in self.perturbations if p != "clean"]


@dataclass
class CheckpointEvaluation:
    """What one checkpoint's evaluation yields: the tidy metrics (:data:`RESULT_COLUMNS`), the
    penultimate features projected on each split's clean simplex plane, and (with
    ``keep_features``) the features themselves, a dict loadable with ``weights_only=True``."""

    metrics: pd.DataFrame
    projection: pd.DataFrame
    features: dict | None = None


class _Rows:
    """Collects one set's results as tidy rows: a float is one row, a [C] tensor one row per
    ``class``, a [C, C] tensor one row per ``(row, col)``."""

    def __init__(self) -> None:
        self.records: list[tuple] = []

    def add(self, keys: tuple, layer: str, layer_index: int, values: dict) -> None:
        for metric, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                for c, v in enumerate(value.tolist()):
                    self.records.append((*keys, layer, layer_index, metric, c, None, None, v))
            elif isinstance(value, torch.Tensor) and value.dim() == 2:
                for (r, c), v in np.ndenumerate(value.cpu().numpy()):
                    self.records.append((*keys, layer, layer_index, metric, None, r, c, float(v)))
            else:
                self.records.append((*keys, layer, layer_index, metric, None, None, None, float(value)))

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.records, columns=RESULT_COLUMNS)
        return frame.astype({"layer_index": "int64", "class": "Int64", "row": "Int64", "col": "Int64", "value": "float64"})


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


Forward = Callable[[slice], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _measure(
    forward: Forward, n: int, groups: torch.Tensor, layers: list[str], num_classes: int, batch_size: int,
    reference: dict[str, LayerStats] | None, collect: Callable[[slice, torch.Tensor, torch.Tensor], None] | None = None,
    cache_bytes: int = 0,
) -> tuple[dict[str, LayerStats], torch.Tensor]:
    """Both passes of every layer's statistics over one set; returns them and the network's
    predictions. ``forward(slice)`` gives ``(logits, {layer: activations})`` of those samples;
    ``collect(slice, logits, penultimate)`` sees each batch of pass 1 (to keep features).
    Pass 1 keeps its batches' activations while they total at most ``cache_bytes``, and pass 2
    uses them instead of a second forward pass (and so sees the very features pass 1 saw, also
    under non-deterministic kernels); the batches beyond are computed again."""
    stats = {name: LayerStats(num_classes, reference=None if reference is None else reference[name]) for name in layers}
    predictions = torch.empty(n, dtype=torch.int64, device=groups.device)
    cached: dict[int, dict[str, torch.Tensor]] = {}
    held = 0
    for sl in _batches(n, batch_size):
        logits, acts = forward(sl)
        predictions[sl] = logits.argmax(dim=1)
        for name, s in stats.items():
            s.accumulate_means_unchecked(acts[name], groups[sl])
        if collect is not None:
            collect(sl, logits, acts[PENULTIMATE])
        size = _nbytes(acts)
        if held + size <= cache_bytes:
            cached[sl.start], held = acts, held + size
    for s in stats.values():
        s.finish_means()
    for sl in _batches(n, batch_size):
        acts = cached.pop(sl.start, None)
        if acts is None:
            _, acts = forward(sl)
        for name, s in stats.items():
            s.accumulate_scatter_unchecked(acts[name], groups[sl], predictions[sl] if name == PENULTIMATE else None)
    return stats, predictions


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Memory that keeping ``tensors`` holds: their storages, each counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    return sum(storages.values())


def activation_cache_bytes(device: torch.device | str) -> int:
    """How many bytes of pass-1 activations a set may keep for pass 2: on a GPU half of what it has
    left (free plus cached by PyTorch; the other half stays for the forward pass and the float64
    statistics), on the CPU :data:`CPU_ACTIVATION_CACHE_BYTES` (a job asks for little memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 2
    return CPU_ACTIVATION_CACHE_BYTES


class _Keep:
    """Pass 1's penultimate features of the projection subsample (and, with ``everything``, all
    features and logits). The subsample's positions (``index``, sorted) go to the device in one
    copy per set, and each batch's are a slice of them found on the host (a host-to-device copy
    per batch would wait for the GPU each time)."""

    def __init__(self, index: np.ndarray, n: int, batch_size: int, device, everything: bool) -> None:
        on_device = torch.as_tensor(index, device=device)
        starts = [sl.start for sl in _batches(n, batch_size)]
        bounds = np.searchsorted(index, [*starts, n])
        self.local = {start: on_device[a:b] - start for start, a, b in zip(starts, bounds[:-1], bounds[1:])}
        self.everything = everything
        self.sample: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def __call__(self, sl: slice, logits: torch.Tensor, penultimate: torch.Tensor) -> None:
        local = self.local[sl.start]
        if len(local):
            self.sample.append(penultimate[local])
        if self.everything:
            self.features.append(penultimate)
            self.logits.append(logits)


def _set_metrics(
    rows: _Rows, keys: tuple, layers: list[str], stats: dict[str, LayerStats], predictions: torch.Tensor,
    labels: torch.Tensor, targets: torch.Tensor | None, weight: torch.Tensor, depth: list[str] | None = None, *,
    class_counts: torch.Tensor,
) -> None:
    """Every metric of one set: per layer the within-class ones, at the penultimate layer the rest.
    ``depth``: every layer of the model in forward order (``layer_index``), default ``layers``.
    ``class_counts``: the training split's samples per class (the prepared dataset's), which
    decide the minority classes of the imbalance geometry."""
    perturbed = stats[PENULTIMATE].reference is not None
    depth = layers if depth is None else depth
    minority = minority_classes(class_counts)
    for name in layers:
        index = depth.index(name)
        s = stats[name]
        values = s.compute()
        if not perturbed:
            values["ncc_accuracy_clean_means"] = values["ncc_accuracy"]  # the clean means are the own means
        if targets is not None:  # grouped by target: the clean-means NCC decision counts arrivals at the target
            values["target_hit_rate_ncc"] = values["ncc_accuracy_clean_means"]
        values.update(s.imbalance_geometry(weight if name == PENULTIMATE else None, minority))
        if perturbed:
            values.update(s.mean_displacement())
        if name == PENULTIMATE:
            values.update(s.class_geometry(weight))
            values.update(s.prediction_metrics())
            values.update(s.class_accuracy())
            if int(minority.sum()) >= 2:  # as minority_cos_*: absent on balanced data
                values["minority_accuracy"] = float(values["accuracy_per_class"][minority.to(values["accuracy_per_class"].device)].mean())
            values["train_class_count"] = class_counts.to(torch.float64)
            if perturbed:
                values.update(s.reference_geometry())
                values["accuracy_true_labels"] = float((predictions == labels).double().mean())
            if targets is not None:
                values["target_hit_rate"] = float((predictions == targets).double().mean())
        rows.add(keys, name, index, values)


def _model_forward(model: torch.nn.Module, x: torch.Tensor, layers: list[str], index: torch.Tensor | None = None) -> Forward:
    """The forward pass of batch ``sl`` of ``x`` (of ``x[index]`` when ``index`` is given, gathered
    a batch at a time)."""
    def forward(sl: slice):
        logits, taps = model(x[sl] if index is None else x[index[sl]], taps=True)
        return logits.float(), {name: taps[name].float() for name in layers}

    return forward


def _measure_set(
    rows: _Rows, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
    targets: torch.Tensor | None, keys: tuple, reference: dict[str, LayerStats] | None, layers: list[str], *,
    num_classes: int, batch_size: int, weight: torch.Tensor, class_counts: torch.Tensor, depth: list[str] | None = None,
    index: torch.Tensor | None = None, collect: Callable | None = None,
) -> dict[str, LayerStats]:
    """One input set through ``model`` into ``rows``: both passes of every layer (:func:`_measure`)
    and its metrics (:func:`_set_metrics`); returns the layers' statistics (the reference of the
    split's perturbed sets when this is its clean set). ``index``: measure ``x[index]``. The one
    path from input tensors to metric rows: the evaluation and the per-epoch measurement of
    training (:func:`input_metrics`) both take it."""
    stats, predictions = _measure(
        _model_forward(model, x, layers, index), len(groups), groups, layers, num_classes, batch_size, reference, collect,
        cache_bytes=activation_cache_bytes(x.device),
    )
    _set_metrics(rows, keys, layers, stats, predictions, labels, targets, weight, depth, class_counts=class_counts)
    return stats


@torch.no_grad()
def input_metrics(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, perturbed: tuple[str, torch.Tensor, torch.Tensor] | None = None,
    *, split: str, norm: str, class_counts: torch.Tensor, num_classes: int | None = None, index: torch.Tensor | None = None,
    batch_size: int = 1000, layers: list[str] | tuple[str, ...] = (PENULTIMATE,),
) -> pd.DataFrame:
    """The evaluation's rows (:data:`RESULT_COLUMNS`) of given inputs: the clean set ``x`` with
    labels ``y`` (``x[index]`` when ``index`` is given; ``y`` then belongs to those rows), and
    optionally one perturbed set ``(name, x_p, y_p)`` measured against the clean set's class means,
    as :func:`evaluate_checkpoint` measures an attack. The model runs in eval mode and fp32 (its
    modes are restored) and draws no random number; ``layers`` default to the penultimate one,
    ``layer_index`` counts in ``model.tap_names``. The per-epoch measurement of training-time
    examples (``training.epoch_measure``) is this call."""
    layers = list(layers)
    depth = list(model.tap_names)
    num_classes = int(model.classifier.out_features) if num_classes is None else num_classes
    weight = model.classifier.weight.detach().double()
    rows = _Rows()
    common = dict(num_classes=num_classes, batch_size=batch_size, weight=weight, class_counts=class_counts, depth=depth)
    with eval_mode(model):
        clean = _measure_set(rows, model, x, y, y, None, (split, norm, "clean"), None, layers, index=index, **common)
        if perturbed is not None:
            name, x_p, y_p = perturbed
            _measure_set(rows, model, x_p, y_p, y_p, None, (split, norm, name), clean, layers, **common)
    return rows.frame()


def _projection_indices(n: int, points: int, seed: int) -> np.ndarray:
    """The same seeded subset of sample indices for every set of a split (point ``i`` of ``pgd``
    is the perturbed version of point ``i`` of ``clean``)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(points, n), replace=False))


def attack_set(
    name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, plan: EvaluationPlan, threat: ThreatModel, *,
    num_classes: int, seed: int, epoch: int, split: str, device: torch.device | str,
) -> torch.Tensor:
    """The perturbed inputs of one set of :func:`evaluate_checkpoint`, seeded by ``(seed, "evaluate",
    epoch, split, name)`` (and the norm, for a threat model other than the cell's own). The strong
    evaluation attacks with this PGD-10 too, so that the summary's robust accuracy and its
    ``pgd_gap`` come from the same attacked inputs."""
    stream = (seed, "evaluate", epoch, split, name) + (() if threat.norm == plan.threats[0].norm else (threat.norm,))
    return perturb(
        name, model, x, y, threat=threat, num_classes=num_classes, generator=generator(*stream, device=device),
        batch_size=plan.batch_size, loss=plan.attack_loss, autocast_dtype=plan.attack_dtype,
        l2_step=plan.trades_l2_step, **plan.perturbations.get(name, {}),
    )


@torch.no_grad()
def evaluate_checkpoint(
    model: torch.nn.Module, data: dict, plan: EvaluationPlan, *, seed: int, epoch: int, device: torch.device | str = "cpu",
    on_set: Callable[[tuple[str, str, str]], None] | None = None,
) -> CheckpointEvaluation:
    """Every metric of ``model`` on each split of ``data`` under each perturbation of ``plan``.

    Perturbations are seeded by ``(seed, "evaluate", epoch, split, perturbation)`` (and the norm,
    for a threat model other than the cell's own), so they do not depend on which others run.
    The model runs in eval mode and fp32. ``on_set``: called with ``(split, norm, perturbation)``
    after each set (a progress bar's update).
    """
    model = model.to(device).eval()
    num_classes = len(data["classes"])
    class_counts = data["class_counts"]
    taps = [t for t in model.tap_names if t != PENULTIMATE] if plan.layerwise else []
    layers = [*taps, PENULTIMATE]
    weight = model.classifier.weight.detach().double()
    primary = plan.threats[0].norm
    rows = _Rows()
    projections: list[pd.DataFrame] = []
    kept: dict[str, dict] = {}
    feature_dtype = FEATURE_DTYPES[plan.feature_dtype]

    def measure(x, labels, groups, targets, keys, reference, plane, index):
        keep = _Keep(index, len(x), plan.batch_size, x.device, plan.keep_features)
        stats = _measure_set(rows, model, x, labels, groups, targets, keys, reference, layers, num_classes=num_classes,
                             batch_size=plan.batch_size, weight=weight, class_counts=class_counts, collect=keep)
        plane = plane or SimplexPlane.of(stats[PENULTIMATE])
        if len(index):
            at = torch.as_tensor(index, device=labels.device)
            projections.append(plane.project(
                keys, torch.cat(keep.sample), labels[at], None if targets is None else targets[at], stats[PENULTIMATE]
            ))
        if plan.keep_features:
            entry = {"features": torch.cat(keep.features).to(feature_dtype).cpu(), "logits": torch.cat(keep.logits).cpu(),
                     "labels": labels.cpu()}
            if targets is not None:
                entry["targets"] = targets.cpu()
            kept["/".join(keys)] = entry
        return stats, plane

    sets = len(plan.splits) * (1 + len(plan.threats) * len(plan.attacked))
    done = 0
    started = time.perf_counter()

    def progress(keys, since):
        # one line per set, after its metrics were read back to the host (so the time is the set's own
        # on a GPU too, without an extra synchronisation): what a long job's log shows while it runs
        nonlocal done
        done += 1
        log.info("evaluate epoch %d: set %d/%d %s done in %.2f s (%.1f s so far)",
                 epoch, done, sets, "/".join(keys), time.perf_counter() - since, time.perf_counter() - started)
        if on_set is not None:
            on_set(keys)

    for split in plan.splits:
        since = time.perf_counter()
        x, y = as_float(data, split, device)
        x = device_layout(x)
        index = _projection_indices(len(y), plan.projection_points, seed)
        clean, plane = measure(x, y, y, None, (split, primary, "clean"), None, None, index)
        progress((split, primary, "clean"), since)
        for threat in plan.threats:
            for name in plan.attacked:
                since = time.perf_counter()
                x_p = attack_set(name, model, x, y, plan, threat, num_classes=num_classes, seed=seed, epoch=epoch, split=split, device=device)
                targets = target_labels(y, num_classes) if name == "pgd-targeted" else None
                groups = y if targets is None else targets
                measure(x_p, y, groups, targets, (split, threat.norm, name), clean, plane, index)
                progress((split, threat.norm, name), since)

    features = None
    if plan.keep_features:
        bias = model.classifier.bias
        features = {
            "num_classes": num_classes,
            "classifier_weight": model.classifier.weight.detach().float().cpu(),
            "classifier_bias": None if bias is None else bias.detach().float().cpu(),
            "layers": layers,
            "epoch": int(epoch),
            "class_counts": class_counts,
            "sets": kept,
        }
    projection = pd.concat(projections, ignore_index=True) if projections else SimplexPlane.empty()
    return CheckpointEvaluation(rows.frame(), projection, features)


def penultimate_metrics(features_file: dict, *, batch_size: int = 1000) -> pd.DataFrame:
    """The penultimate-layer metrics recomputed from a kept features file (``keep_features``),
    with the same code as the evaluation: to try a new metric without attacking again. With
    ``float32`` features the rows equal the metrics file's penultimate rows."""
    if features_file.get("class_counts") is None:
        raise ValueError("the features file has no class_counts (an older ncrobust wrote it): rebuild it with "
                         "`snakemake --forcerun evaluate` and evaluation.keep_features: true")
    sets = features_file["sets"]
    num_classes = int(features_file["num_classes"])
    weight = features_file["classifier_weight"].double()
    rows = _Rows()
    references: dict[tuple[str, str], dict[str, LayerStats]] = {}
    for key in sets:  # in evaluation order: each split's clean set (the reference) before its perturbed sets
        split, norm, perturbation = key.split("/")
        entry = sets[key]
        H, logits, labels = entry["features"].float(), entry["logits"].float(), entry["labels"]
        targets = entry.get("targets")
        groups = labels if targets is None else targets

        def forward(sl, H=H, logits=logits):
            return logits[sl], {PENULTIMATE: H[sl]}

        reference = None if perturbation == "clean" else references[split]
        stats, predictions = _measure(forward, len(H), groups, [PENULTIMATE], num_classes, batch_size, reference)
        if perturbation == "clean":
            references[split] = stats
        _set_metrics(rows, (split, norm, perturbation), [PENULTIMATE], stats, predictions, labels, targets, weight,
                     list(features_file["layers"]), class_counts=features_file["class_counts"])
    return rows.frame()
