"""Project penultimate features on the plane of the clean simplex, for the ``simplex`` figure.

The plane is spanned by the two leading principal directions of the ``C`` centred clean class
means ``M~ = [mu_c - mu_G]`` (the top two right singular vectors of ``M~``, [C, d]); every feature
``h`` is drawn at ``((h - mu_G) . v1, (h - mu_G) . v2)``. On that plane a standard-trained network's
perturbed features sit on (or near) the vertices of *other* classes (Su et al. 2024, "leap"), while
an adversarially trained network's perturbed features stay on their own vertex.

The class means come from the evaluation's own statistics (:class:`ncrobust.collapse.LayerStats`):
nothing here computes them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ncrobust.collapse import LayerStats

PROJECTION_COLUMNS = ["split", "norm", "perturbation", "kind", "label", "target", "x", "y"]
_DTYPES = ["str", "str", "str", "str", "int64", "Int64", "float64", "float64"]


def _plane_basis(M: torch.Tensor, mu_G: torch.Tensor) -> torch.Tensor:
    """``V`` [d, 2]: the two leading right singular vectors of ``M - mu_G``, each signed so that its
    entry of largest magnitude in ``M~ V`` is positive (deterministic orientation). With ``C == 2``
    (rank 1) the second direction is a deterministic unit vector orthogonal to the first."""
    Mc = (M - mu_G).to(torch.float64)  # [C, d]
    if Mc.shape[1] < 2:
        raise ValueError(f"features need at least 2 dimensions to project on a plane, got {Mc.shape[1]}")
    _, _, Vh = torch.linalg.svd(Mc, full_matrices=False)  # Vh [min(C, d), d]
    V = Vh[:2].T.clone()  # [d, 2]
    if V.shape[1] < 2 or float(torch.linalg.vector_norm(Mc @ V[:, 1])) < 1e-12 * max(float(torch.linalg.vector_norm(Mc)), 1e-300):
        v1 = V[:, 0]
        e = torch.zeros_like(v1)
        e[int(torch.argmin(v1.abs()))] = 1.0
        v2 = e - (e @ v1) * v1
        V = torch.stack([v1, v2 / torch.linalg.vector_norm(v2)], dim=1)
    P = Mc @ V  # [C, 2]
    signs = torch.sign(P.gather(0, P.abs().argmax(0, keepdim=True))).flatten()
    signs[signs == 0] = 1.0
    return V * signs


@dataclass(frozen=True)
class SimplexPlane:
    """The plane of one split's clean simplex: origin ``mu_G`` [d] and basis ``V`` [d, 2] (float64)."""

    mu_G: torch.Tensor
    V: torch.Tensor

    @classmethod
    def of(cls, clean: LayerStats) -> "SimplexPlane":
        """The plane of a clean set's penultimate statistics (after its first pass)."""
        return cls(clean.global_mean, _plane_basis(clean.means, clean.global_mean))

    def coordinates(self, features: torch.Tensor) -> np.ndarray:
        """``[n, 2]`` plane coordinates of ``features`` [n, d] (feature units)."""
        return ((features.to(self.V.device, torch.float64) - self.mu_G) @ self.V).cpu().numpy()

    def project(
        self, keys: tuple[str, str, str], features: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
        stats: LayerStats,
    ) -> pd.DataFrame:
        """Rows for one set ``keys = (split, norm, perturbation)``: its sampled ``features`` (kind
        ``sample``, with true ``label`` and attack ``target``) and its class means (kind ``mean``,
        from ``stats``: grouped as the metrics are, by target for ``pgd-targeted``)."""
        split, norm, perturbation = keys
        xy = self.coordinates(features)
        mxy = self.coordinates(stats.means)
        C = mxy.shape[0]
        samples = pd.DataFrame({
            "kind": "sample", "label": labels.cpu().numpy(),
            "target": targets.cpu().numpy() if targets is not None else np.full(len(xy), -1),
            "x": xy[:, 0], "y": xy[:, 1],
        })
        means = pd.DataFrame({"kind": "mean", "label": np.arange(C), "target": -1, "x": mxy[:, 0], "y": mxy[:, 1]})
        out = pd.concat([samples, means], ignore_index=True)
        out.insert(0, "perturbation", perturbation)
        out.insert(0, "norm", norm)
        out.insert(0, "split", split)
        out["label"] = out["label"].astype("int64")
        out["target"] = out["target"].astype("Int64").mask(out["target"] < 0)
        return out[PROJECTION_COLUMNS]

    @staticmethod
    def empty() -> pd.DataFrame:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(PROJECTION_COLUMNS, _DTYPES)})


def simplex_plane(features: Any, labels: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plane of the clean simplex of a feature matrix: ``(mu_G [d], V [d, 2], means [C, d])``,
    float64 numpy (a convenience for features outside the workflow)."""
    stats = LayerStats(num_classes)
    stats.accumulate_means(features, labels)
    stats.finish_means()
    plane = SimplexPlane.of(stats)
    return plane.mu_G.numpy(), plane.V.numpy(), stats.means.numpy()
