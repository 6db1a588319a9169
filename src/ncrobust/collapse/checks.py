"""Input validation of the collapse package: bad input raises :class:`ValueError` with a one-line
message (an empty class, a single class, NaN/inf features naming the first bad row, labels out of
range, mismatched shapes). Degenerate *geometry* is not bad input and never raises here.

Features stay in their dtype (fp16 included): the row blocks are cast to float64 where they are
used. Labels become int64 on the features' device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .blocks import _blocks

_F64 = torch.float64


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be an array of numbers, got {type(x).__name__}: {err}") from None


def _features(x: Any, name: str = "features", *, flatten: bool = False) -> torch.Tensor:
    """A real-valued [N, d] tensor (not yet cast: blocks are cast to float64 when used)."""
    t = _tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    if flatten and t.dim() >= 2:
        t = t.reshape(t.shape[0], -1)
    if t.dim() != 2:
        want = "[N, ...] (at least 2-D)" if flatten else "[N, d]"
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def _labels(x: Any, n: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    t = _tensor(x, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be integers, got dtype {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the features have {n} rows")
    return t.to(device=device, dtype=torch.int64)


def _num_classes(y: torch.Tensor, num_classes: int | None, name: str = "labels") -> int:
    lo, hi = int(y.min()), int(y.max())
    if num_classes is None:
        num_classes = hi + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"NC metrics need at least 2 classes, got num_classes={num_classes}")
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), found {bad}")
    return num_classes


def _check_counts(counts: torch.Tensor, name: str = "labels") -> None:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ValueError(
            f"{len(empty)} class(es) have no sample in {name} (class {shown}); "
            f"every class 0..{counts.numel() - 1} needs at least one"
        )


def _check_finite_rows(H: torch.Tensor, name: str) -> None:
    """Raise naming the first non-finite row of ``H``; called once a cheap check has failed."""
    bad = (~torch.isfinite(H)).any(dim=1).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"{name} contain non-finite values (NaN or inf) in {bad.numel()} row(s), first at row {int(bad[0])}"
        )


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t`` ([N, ...]): a float64 sum per block of rows (NaN and inf propagate;
    memory bounded by the block), and the exact elementwise test only if a sum is not finite."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    for s, e in _blocks(flat.shape[0], max(1, flat.shape[1])):
        block = flat[s:e]
        if not math.isfinite(float(block.to(_F64).sum())) and not bool(torch.isfinite(block).all()):
            return False
    return True


def _matrix(x: Any, shape: tuple[int, ...], name: str, device: torch.device) -> torch.Tensor:
    """A finite float64 tensor of exactly ``shape`` on ``device`` (means, weights, a bias)."""
    t = _tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    t = t.to(device=device, dtype=_F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return t


def _checked_logits(logits: Any, N: int, C: int, device: torch.device) -> torch.Tensor:
    """The network's logits [N, C], finite, on ``device``."""
    t = _tensor(logits, "logits")
    if tuple(t.shape) != (N, C):
        raise ValueError(f"logits must have shape [{N}, {C}] (N, num_classes), got {list(t.shape)}")
    if not _all_finite(t):
        raise ValueError("logits contain non-finite values (NaN or inf)")
    return t.to(device)


def _checked_set(features: Any, labels: Any, num_classes, name: str = "features", labels_name: str = "labels"):
    """A whole feature set ``(H [N, d], y [N] int64, C)``: shapes, label range, every class
    present, every feature finite."""
    H = _features(features, name)
    y = _labels(labels, H.shape[0], H.device, labels_name)
    C = _num_classes(y, num_classes, labels_name)
    _check_counts(torch.bincount(y, minlength=C), f"the labels of the {name}")
    if not _all_finite(H):
        _check_finite_rows(H, name)
    return H, y, C
