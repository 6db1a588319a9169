"""Project penultimate features on the plane of the clean simplex, for the ``simplex`` figure.

The plane is spanned by the two leading principal directions of the ``C`` centred clean class
means ``M~ = [mu_c - mu_G]`` (the top two right singular vectors of ``M~``, [C, d]); every feature
``h`` is drawn at ``((h - mu_G) . v1, (h - mu_G) . v2)``. On that plane a standard-trained network's
perturbed features sit on (or near) the vertices of *other* classes (Su et al. 2024, "leap"), while
an adversarially trained network's perturbed features stay on their own vertex.

Pure functions: an evaluation blob in (see :func:`ncrobust.features.evaluate`), a DataFrame out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

PROJECTION_COLUMNS = ["split", "perturbation", "kind", "label", "target", "x", "y"]
DEFAULT_PERTURBATIONS = ("clean", "pgd", "pgd-targeted")


def simplex_plane(features, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plane of the clean simplex: ``(mu_G [d], V [d, 2], means [C, d])``, float64.

    ``V`` holds the two leading right singular vectors of the centred class means, each signed so
    that its entry of largest magnitude in ``M~ V`` is positive (deterministic orientation). With
    ``C == 2`` (rank 1) the second direction is any unit vector orthogonal to the first.
    """
    H = torch.as_tensor(features).to(torch.float64).flatten(1)  # [N, d]
    y = torch.as_tensor(labels).long()  # [N]
    if H.shape[0] != y.shape[0]:
        raise ValueError(f"features have {H.shape[0]} rows but labels have {y.shape[0]}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if H.shape[1] < 2:
        raise ValueError(f"features need at least 2 dimensions to project on a plane, got {H.shape[1]}")
    if y.numel() == 0 or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) and be non-empty")
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)  # [C]
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no sample: the clean simplex is undefined")
    sums = torch.zeros(num_classes, H.shape[1], dtype=torch.float64).index_add_(0, y, H)
    M = sums / counts[:, None]  # [C, d]
    mu_G = H.mean(0)  # [d]
    Mc = M - mu_G  # [C, d]
    _, _, Vh = torch.linalg.svd(Mc, full_matrices=False)  # Vh [min(C, d), d]
    V = Vh[:2].T.clone()  # [d, 2]
    if V.shape[1] < 2 or float(torch.linalg.vector_norm(Mc @ V[:, 1])) < 1e-12 * max(float(torch.linalg.vector_norm(Mc)), 1e-300):
        # rank-1 means (C == 2): complete the plane with a deterministic orthogonal direction
        v1 = V[:, 0]
        e = torch.zeros_like(v1)
        e[int(torch.argmin(v1.abs()))] = 1.0
        v2 = e - (e @ v1) * v1
        V = torch.stack([v1, v2 / torch.linalg.vector_norm(v2)], dim=1)
    P = Mc @ V  # [C, 2]
    signs = torch.sign(P.gather(0, P.abs().argmax(0, keepdim=True))).flatten()
    signs[signs == 0] = 1.0
    V = V * signs
    return mu_G.numpy(), V.numpy(), M.numpy()


def _class_means(H: np.ndarray, y: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(y, minlength=C)
    sums = np.zeros((C, H.shape[1]))
    np.add.at(sums, y, H)
    present = counts > 0
    sums[present] /= counts[present, None]
    return sums, present


def project(
    evaluation: dict,
    *,
    max_points: int = 300,
    seed: int = 0,
    perturbations: tuple[str, ...] | list[str] = DEFAULT_PERTURBATIONS,
    splits: tuple[str, ...] | list[str] | None = None,
) -> pd.DataFrame:
    """Clean and perturbed penultimate features projected on each split's clean simplex plane.

    Args:
        evaluation: the dict written by :func:`ncrobust.features.evaluate` (``num_classes`` and
            ``results["split/perturbation"]`` with ``features`` [N, d], ``labels`` [N] and, for
            ``pgd-targeted``, ``targets`` [N]).
        max_points: at most this many samples per (split, perturbation); the same seeded subset of
            sample indices is used for every perturbation of a split, so point ``i`` of ``pgd`` is
            the perturbed version of point ``i`` of ``clean``.
        seed: seed of the subsample (a ``numpy`` generator; no global state).
        perturbations: which perturbations to project (those absent from ``evaluation`` are skipped;
            ``clean`` is required, it defines the plane).
        splits: splits to project (default: every split with a clean entry).

    Returns:
        A DataFrame with columns ``split, perturbation, kind, label, target, x, y``: ``kind`` is
        ``"sample"`` for a projected feature and ``"mean"`` for a projected class mean (of all the
        samples of that split and perturbation, grouped by true label; the ``clean`` means are the
        vertices of the clean simplex). ``target`` is the attack's target (``pgd-targeted``
        samples) or missing. ``x``, ``y`` are in feature units (the coordinates on the plane).
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    results = evaluation.get("results")
    if not isinstance(results, dict):
        raise ValueError("evaluation has no 'results' dict (expected the output of ncrobust.features.evaluate)")
    C = int(evaluation["num_classes"])
    available = {tuple(k.split("/", 1)) for k in results}
    if splits is None:
        splits = sorted({s for s, p in available if p == "clean"}, key=lambda s: (s != "train", s))
    frames = []
    for split in splits:
        if (split, "clean") not in available:
            raise ValueError(f"no clean features for split {split!r}: the clean simplex defines the plane")
        clean = results[f"{split}/clean"]
        mu_G, V, _ = simplex_plane(clean["features"], clean["labels"], C)
        n = int(clean["labels"].shape[0])
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=min(max_points, n), replace=False))
        for pert in perturbations:
            if (split, pert) not in available:
                continue
            entry = results[f"{split}/{pert}"]
            H = torch.as_tensor(entry["features"]).to(torch.float64).flatten(1).numpy()  # [N, d]
            y = torch.as_tensor(entry["labels"]).long().numpy()  # [N]
            if H.shape[0] != n:
                raise ValueError(f"{split}/{pert} has {H.shape[0]} samples but {split}/clean has {n}")
            xy = (H[idx] - mu_G) @ V  # [n_sub, 2]
            target = (
                torch.as_tensor(entry["targets"]).long().numpy()[idx]
                if "targets" in entry
                else np.full(len(idx), -1)
            )
            frames.append(pd.DataFrame({
                "split": split, "perturbation": pert, "kind": "sample", "label": y[idx],
                "target": target, "x": xy[:, 0], "y": xy[:, 1],
            }))
            means, present = _class_means(H, y, C)
            mxy = (means[present] - mu_G) @ V  # [C', 2]
            frames.append(pd.DataFrame({
                "split": split, "perturbation": pert, "kind": "mean", "label": np.nonzero(present)[0],
                "target": -1, "x": mxy[:, 0], "y": mxy[:, 1],
            }))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(PROJECTION_COLUMNS, ["str", "str", "str", "int64", "Int64", "float64", "float64"])})
    out = pd.concat(frames, ignore_index=True)
    out["label"] = out["label"].astype("int64")
    out["target"] = out["target"].astype("Int64").mask(out["target"] < 0)
    return out[PROJECTION_COLUMNS]
