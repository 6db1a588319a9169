"""The geometry of mixed examples in the last layer (Fisher et al., "Pushing Boundaries: Mixup's
Influence on Neural Collapse"): where the penultimate features of ``lam * x_a + (1 - lam) * x_b``
lie relative to the classifier rows of the two classes.

For each class pair ``(i, j)`` and mixing weight ``lam`` of a grid, ``per_class`` examples of each
class (a seeded sample of the split) are mixed three ways: ``cross`` (an example of ``i`` with one
of ``j``, weight ``lam`` on ``i``), ``same-i`` (two examples of ``i``) and ``same-j`` (two of
``j``). With ``pgd``, the mixed inputs are also attacked (the model's threat model, eval mode)
against their **majority label**: ``i`` when ``lam >= 1/2``, else ``j`` (for same-class mixes
their class).

Coordinates: features are centred by the global mean ``mu_G`` of the clean, unmixed features of
the sample (all classes, the same count each) and projected on the plane of the classifier rows
``w_i, w_j`` with the orthonormal basis ``e1 = w_i / ||w_i||``, ``e2`` = the part of ``w_j``
orthogonal to ``e1``, normalised: ``x = <h - mu_G, e1>``, ``y = <h - mu_G, e2>``.

Summary numbers (degrees, per perturbation, over all pairs and weights):
- ``same_class_angle``: mean angle between a same-class mix's centred feature and its class's
  classifier row (full feature space): 0 = the mixes align with the classifier (Fisher et al.).
- ``cross_boundary_angle``: mean in-plane angle between a cross-class mix's projected centred
  feature and the decision boundary of ``i`` against ``j`` in the plane (the line through the
  origin orthogonal to the projection of ``w_i - w_j``; the biases are left out): 0 = on the
  boundary; mixes that interpolate linearly between two simplex vertices lie at
  ``atan(|2 lam - 1| tan(theta_ij / 2))``, ``theta_ij`` the angle between the centred means.
  Unmixed endpoints (``lam`` 0 or 1) are left out of it.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from ncrobust.columns import PENULTIMATE
from ncrobust.models.base import eval_mode, tap_activations
from ncrobust.seeding import generator

DEFAULT_PAIRS = ((0, 1), (2, 3), (4, 5))
DEFAULT_LAMBDAS = tuple(i / 10 for i in range(11))
GEOMETRY_COLUMNS = ["pair", "class_i", "class_j", "kind", "lam", "perturbation", "x", "y", "row_angle", "boundary_angle",
                    "prediction", "wi_x", "wj_x", "wj_y"]
SUMMARY_METRICS = ("same_class_angle", "cross_boundary_angle")


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Degrees between the rows of ``a`` and the vector (or rows) ``b``."""
    cos = torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=1).clamp(-1, 1)  # b: [d] or [n, d]
    return torch.rad2deg(torch.arccos(cos))


def plane_basis(w_i: torch.Tensor, w_j: torch.Tensor) -> torch.Tensor:
    """[2, d] orthonormal basis of span(w_i, w_j): ``e1 = w_i/||w_i||``, ``e2`` from ``w_j`` by
    Gram-Schmidt. Parallel rows have no plane: a one-line error."""
    e1 = w_i / w_i.norm()
    rest = w_j - (w_j @ e1) * e1
    if rest.norm() <= 1e-9 * w_j.norm():
        raise ValueError("mixup geometry: the two classifier rows are parallel; their plane is undefined")
    return torch.stack([e1, rest / rest.norm()])


def _check_pairs(pairs, num_classes: int) -> list[tuple[int, int]]:
    out = []
    for pair in pairs:
        if len(pair) != 2 or any(isinstance(c, bool) or not isinstance(c, int) for c in pair):
            raise ValueError(f"mixup geometry: pair {pair!r} must be two class indices")
        i, j = pair
        if i == j or not (0 <= i < num_classes and 0 <= j < num_classes):
            raise ValueError(f"mixup geometry: pair {pair!r} needs two different classes in [0, {num_classes})")
        out.append((i, j))
    if not out:
        raise ValueError("mixup geometry: no class pairs")
    return out


def _check_lambdas(lambdas) -> list[float]:
    lams = [float(v) for v in lambdas]
    if not lams or any(not (0.0 <= v <= 1.0) for v in lams):
        raise ValueError(f"mixup geometry: lambdas must be a non-empty list of numbers in [0, 1], got {list(lambdas)!r}")
    return sorted(set(lams))


def _features(model, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (float64 on the CPU) and predictions."""
    logits, taps = tap_activations(model, x, [PENULTIMATE], batch_size)
    return taps[PENULTIMATE], logits.argmax(1)


def mixup_geometry(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, pairs=DEFAULT_PAIRS,
    lambdas=DEFAULT_LAMBDAS, per_class: int = 50, perturbations=("clean",), threat=None, loss=None, seed: int = 0,
    batch_size: int = 1000,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(points, summary)``: one row per mixed example (:data:`GEOMETRY_COLUMNS`; ``row_angle``:
    degrees to the majority class's row, ``boundary_angle``: in-plane degrees to the i/j boundary,
    ``prediction``: the network's class; ``wi_x``, ``wj_x``, ``wj_y``: the plane coordinates of the
    two classifier rows, to draw them and the boundary) and the summary numbers (``pair, perturbation, metric, value``,
    metrics :data:`SUMMARY_METRICS`, per pair and ``all``); definitions in the module docstring. ``perturbations``:
    ``clean`` and/or ``pgd`` (needs ``threat`` and ``loss``). Draws come from
    ``generator(seed, "mixup_geometry")``; the model's mode is restored."""
    from ncrobust.attacks import pgd

    pairs = _check_pairs(pairs, num_classes)
    lams = _check_lambdas(lambdas)
    for p in perturbations:
        if p not in ("clean", "pgd"):
            raise ValueError(f"mixup geometry perturbation {p!r}: allowed: clean, pgd")
    if "pgd" in perturbations and (threat is None or loss is None):
        raise ValueError("mixup geometry: pgd needs the threat model and the loss")
    if per_class < 2:
        raise ValueError(f"mixup geometry: per_class = {per_class}: needs >= 2 (same-class mixes pair two examples)")
    device = x.device
    gen = generator(seed, "mixup_geometry")
    y_cpu = y.cpu()
    picks = {}
    for c in range(num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if len(idx) < 2:
            raise ValueError(f"mixup geometry: class {c} has {len(idx)} samples in the split; needs >= 2")
        chosen = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
        picks[c] = chosen
    n = min(len(v) for v in picks.values())
    picks = {c: v[:n] for c, v in picks.items()}
    partner = {c: v[torch.roll(torch.arange(n), 1)] for c, v in picks.items()}  # another example of the class
    W = model.classifier.weight.detach().to("cpu", torch.float64)
    with eval_mode(model):
        clean_all, _ = _features(model, x[torch.cat(list(picks.values())).to(device)], batch_size)
        mu_G = clean_all.mean(0)
        rows = []
        for i, j in pairs:
            basis = plane_basis(W[i], W[j])
            wi_xy, wj_xy = W[i] @ basis.T, W[j] @ basis.T  # the rows' own plane coordinates (wi_xy = (||w_i||, 0))
            normal = (W[i] - W[j]) @ basis.T  # the boundary's normal within the plane
            normal = normal / normal.norm()
            along = torch.stack([-normal[1], normal[0]])
            for kind, a_idx, b_idx, a_cls, b_cls in (
                ("cross", picks[i], picks[j], i, j), (f"same-{i}", picks[i], partner[i], i, i), (f"same-{j}", picks[j], partner[j], j, j)
            ):
                xa, xb = x[a_idx.to(device)], x[b_idx.to(device)]
                weights = torch.tensor(lams, dtype=x.dtype, device=device).repeat_interleave(n)  # all weights in one batch
                shape = (-1,) + (1,) * (x.ndim - 1)
                mixed = weights.view(shape) * xa.repeat(len(lams), *[1] * (x.ndim - 1)) + (1 - weights.view(shape)) * xb.repeat(
                    len(lams), *[1] * (x.ndim - 1))
                labels = torch.where(weights >= 0.5, a_cls, b_cls).to(torch.int64)
                lam_column = torch.tensor(lams, dtype=torch.float64).repeat_interleave(n).numpy()
                for perturbation in perturbations:
                    inputs = mixed
                    if perturbation == "pgd":
                        inputs = pgd(model, mixed, labels, norm=threat.norm, eps=threat.eps, step_size=threat.step_size,
                                     steps=threat.steps, loss=loss,
                                     generator=generator(seed, "mixup_geometry", "pgd", i, j, kind, device=device))
                    h, pred = _features(model, inputs, batch_size)
                    centred = h - mu_G
                    xy = centred @ basis.T
                    labels_cpu = labels.cpu()
                    rows.append(pd.DataFrame({
                        "pair": f"{i}-{j}", "class_i": i, "class_j": j, "kind": kind, "lam": lam_column,
                        "perturbation": perturbation, "x": xy[:, 0].numpy(), "y": xy[:, 1].numpy(),
                        "row_angle": _angle(centred, W[labels_cpu]).numpy(),
                        "boundary_angle": torch.rad2deg(torch.arctan2((xy @ normal).abs(), (xy @ along).abs())).numpy(),
                        "prediction": pred.numpy(), "wi_x": float(wi_xy[0]), "wj_x": float(wj_xy[0]), "wj_y": float(wj_xy[1]),
                    }))
    points = pd.concat(rows, ignore_index=True)[GEOMETRY_COLUMNS]
    return points, geometry_summary(points)


def geometry_summary(points: pd.DataFrame) -> pd.DataFrame:
    """The summary numbers of a points frame (module docstring): ``pair, perturbation, metric,
    value``, per pair and over all pairs (``pair = "all"``)."""
    out = []
    for pair, frame in [*points.groupby("pair", sort=False), ("all", points)]:
        for perturbation, p in frame.groupby("perturbation", sort=False):
            same = p[p.kind != "cross"]
            cross = p[(p.kind == "cross") & (p.lam > 0) & (p.lam < 1)]
            for metric, values in (("same_class_angle", same.row_angle), ("cross_boundary_angle", cross.boundary_angle)):
                out.append({"pair": pair, "perturbation": perturbation, "metric": metric,
                            "value": float(values.mean()) if len(values) else math.nan})
    return pd.DataFrame(out, columns=["pair", "perturbation", "metric", "value"])
