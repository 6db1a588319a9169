"""Dataset registry.

Every dataset is prepared into one dict (``results/data/{name}.pt``)::

    {"name", "x_train", "y_train", "x_test", "y_test",  # images uint8 (N, C, H, W), labels int64
     "max_value",                                        # images in [0, 1] are x / max_value
     "classes", "mean", "std"}                           # class names, per-channel normalisation

Images are stored as integers and scaled to [0, 1] on load (``as_float``), so the file is small
and exact. ``digits`` ships inside scikit-learn and needs no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

Dataset = dict

_LOADERS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str):
    def decorate(fn):
        _LOADERS[name] = fn
        return fn

    return decorate


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, *, root: str | Path | None = None, download: bool = False, seed: int = 0, **options) -> Dataset:
    """Load dataset ``name`` into the prepared-dict format (see module docstring)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    data = _LOADERS[name](root=root, download=download, seed=seed, **options)
    validate(data)
    return data


def validate(data: Dataset) -> None:
    """Check a prepared dataset's structure; a broken file is named by the caller."""
    required = ["name", "x_train", "y_train", "x_test", "y_test", "max_value", "classes", "mean", "std"]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"prepared dataset lacks {missing}")
    num_classes = len(data["classes"])
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.ndim != 4 or x.dtype != torch.uint8:
            raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],) or y.dtype != torch.int64:
            raise ValueError(f"y_{split} must be int64 of length {x.shape[0]}, got {y.dtype} {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"y_{split} holds labels outside [0, {num_classes})")
    if len(data["mean"]) != data["x_train"].shape[1] or len(data["std"]) != data["x_train"].shape[1]:
        raise ValueError("mean and std must have one entry per channel")


def as_float(data: Dataset, split: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``split`` as float32 in [0, 1] and labels, on ``device`` (one resident tensor)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: train, test")
    x = data[f"x_{split}"].to(device=device).float().div_(float(data["max_value"]))
    return x, data[f"y_{split}"].to(device)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split into (train indices, test indices), each sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def channel_stats(x_uint8: torch.Tensor, max_value: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of [0, 1] images (training split), for the model's first layer."""
    x = x_uint8.double() / max_value
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


@register_dataset("digits")
def _digits(*, root=None, download=False, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, pixel values 0..16), stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    x_train = images[torch.from_numpy(train_idx)]
    mean, std = channel_stats(x_train, 16)
    return {
        "name": "digits",
        "x_train": x_train.contiguous(),
        "y_train": torch.from_numpy(labels[train_idx]),
        "x_test": images[torch.from_numpy(test_idx)].contiguous(),
        "y_test": torch.from_numpy(labels[test_idx]),
        "max_value": 16,
        "classes": [str(c) for c in range(10)],
        "mean": mean,
        "std": std,
    }
