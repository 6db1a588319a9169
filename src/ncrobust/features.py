"""Run a model over a split under each perturbation and keep what the metrics need.

For every (split, perturbation): the penultimate features, logits, labels (and targets for
``pgd-targeted``), and the streaming per-layer collapse statistics of every tap. The perturbed
inputs of a split are generated once and reused for both passes of the layer statistics (pass 1:
class means; pass 2: within-class scatter projected on the span of the centred means, and NCC with
the perturbed set's own means and with the clean means). Everything runs in eval mode, in fp32.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .attacks import PERTURBATIONS, ThreatModel, perturb, target_labels
from .collapse import LayerStats
from .data import as_float
from .experiment import generator


def _batches(x: torch.Tensor, batch_size: int) -> Iterator[slice]:
    for i in range(0, len(x), batch_size):
        yield slice(i, i + batch_size)


@torch.no_grad()
def _forward_pass(model, x, y, batch_size, stats: dict[str, LayerStats], *, phase: str):
    """One pass over ``x`` feeding the layer statistics; phase ``"means"`` (pass 1, also returns
    penultimate features and logits) or ``"scatter"`` (pass 2)."""
    feats, logits = [], []
    for sl in _batches(x, batch_size):
        out, taps = model(x[sl], taps=True)
        if phase == "means":
            feats.append(taps["penultimate"].float())
            logits.append(out.float())
        for name, acc in stats.items():
            h = taps[name].flatten(1)
            if phase == "means":
                acc.accumulate_means(h, y[sl])
            else:
                acc.accumulate_scatter(h, y[sl])
    if phase == "means":
        for acc in stats.values():
            acc.finish_means()
        return torch.cat(feats), torch.cat(logits)
    return None


def evaluate(
    model: torch.nn.Module,
    data: dict,
    *,
    threat: ThreatModel,
    perturbations: dict[str, dict],
    splits: list[str],
    seed: int,
    epoch: int,
    batch_size: int = 1000,
    layerwise: bool = True,
    feature_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    loss=None,
) -> dict:
    """Features and statistics of ``model`` on each split under each perturbation.

    ``perturbations`` maps a name of :data:`ncrobust.attacks.PERTURBATIONS` to its overrides
    (``steps``, ``step_size``, ``restarts``, ``eps``). Returns a dict of plain tensors and floats
    (loadable with ``weights_only=True``): ``{"num_classes", "classifier_weight",
    "classifier_bias", "tap_names", "results": {"split/perturbation": {...}}}``.
    """
    unknown = set(perturbations) - set(PERTURBATIONS)
    if unknown:
        raise ValueError(f"unknown perturbations {sorted(unknown)}; allowed: {', '.join(PERTURBATIONS)}")
    model = model.to(device).eval()
    num_classes = len(data["classes"])
    taps = [t for t in model.tap_names if t != "penultimate"] if layerwise else []
    results = {}
    names = ["clean"] + [p for p in perturbations if p != "clean"]  # clean first: its means are the reference
    for split in splits:
        x, y = as_float(data, split, device)
        clean_means: dict[str, torch.Tensor] = {}
        for name in names:
            gen = generator(seed, "evaluate", epoch, split, name, device=device)
            x_p = (
                x
                if name == "clean"
                else perturb(
                    name, model, x, y, threat=threat, num_classes=num_classes, generator=gen,
                    batch_size=batch_size, loss=loss, **perturbations.get(name, {}),
                )
            )
            group = target_labels(y, num_classes) if name == "pgd-targeted" else y
            stats = {t: LayerStats(num_classes, ref_means=clean_means.get(t)) for t in taps}
            features, logits = _forward_pass(model, x_p, group, batch_size, stats, phase="means")
            if stats:
                _forward_pass(model, x_p, group, batch_size, stats, phase="scatter")
            if name == "clean":
                clean_means = {t: s.means for t, s in stats.items()}
            entry = {
                "features": features.to(feature_dtype).cpu(),
                "logits": logits.cpu(),
                "labels": y.cpu(),
                "layer_stats": {t: s.compute() for t, s in stats.items()},
            }
            if name == "pgd-targeted":
                entry["targets"] = group.cpu()
            results[f"{split}/{name}"] = entry
    classifier = model.classifier
    return {
        "num_classes": num_classes,
        "classifier_weight": classifier.weight.detach().float().cpu(),
        "classifier_bias": classifier.bias.detach().float().cpu() if classifier.bias is not None else None,
        "tap_names": taps,
        "results": results,
    }
