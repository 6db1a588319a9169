"""Dataset registry.

Every dataset is prepared into one dict (``results/data/{name}.pt``)::

    {"name", "x_train", "y_train", "x_test", "y_test",  # images uint8 (N, C, H, W), labels int64
     "max_value",                                        # images in [0, 1] are x / max_value
     "classes", "mean", "std",                           # class names, per-channel normalisation
     "class_counts"}                                     # training images per class, [C] int64

Images are stored as integers and scaled to [0, 1] on load (``as_float``), so the file is small
and exact; ``mean`` and ``std`` are computed on the training split (``channel_stats``). Real-valued
data (``mnist1d``) is stored as float32 already in [0, 1] (``max_value`` 1), mapped there by a
stated affine map kept in the dict as ``units`` (:func:`to_box`, :func:`from_box`).

``digits`` ships inside scikit-learn and needs no download; ``mnist1d`` is generated offline by
the ``mnist1d`` package (Greydanus & Kobak), sequences of length 40 stored as (N, 1, 1, 40). The others read torchvision's
on-disk layouts under ``root`` (the config key ``data_root``)::

    mnist          root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    fashion_mnist  root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    cifar10        root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    cifar100       root/cifar-100-python/{train,test,meta}
    imagenette     root/imagenette2-160/{train,val}/<wnid>/*.JPEG   (fast.ai's imagenette2-160)

``download=True`` lets torchvision fetch what is missing (machines with internet). Options of
every loader: ``verify_checksums`` (default ``True``: the files must be the published originals,
see each loader) and ``train_per_class`` (keep that many training images per class, drawn with
``seed``; Su et al. keep 5,000 per class of MNIST) and ``imbalance`` (a seeded long-tailed
subsample of the training split, see :func:`imbalance_counts`; the test split stays as it is). A missing, incomplete or corrupt dataset
raises :class:`DatasetNotFoundError` with one message naming the expected files and how to get
them.
"""

from __future__ import annotations

import gzip
import inspect
import math
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ncrobust.io import ExplainedError

Dataset = dict

_LOADERS: dict[str, Callable[..., Dataset]] = {}

# Errors that reading a truncated, garbled or foreign file can raise inside torchvision / PIL.
_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    OSError,
    RuntimeError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    AssertionError,
)


class DatasetNotFoundError(ExplainedError, ValueError):
    """A dataset's files are missing, incomplete or corrupt; the message says what to put where."""


class TooFewSamplesError(ExplainedError, ValueError):
    """A subset asks for more samples of a class than the split holds; the message names the bound."""


def register_dataset(name: str):
    def decorate(fn):
        _LOADERS[name] = fn
        return fn

    return decorate


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def loader(name: str) -> Callable[..., Dataset]:
    """The registered loader of dataset ``name`` (its keyword parameters are the dataset's options)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _LOADERS[name]


def load(name: str, *, root: str | Path | None = None, download: bool = False, seed: int = 0, **options) -> Dataset:
    """Load dataset ``name`` into the prepared-dict format (see module docstring).

    ``options`` are the loader's own keywords (``verify_checksums``, ``train_per_class``, ...);
    an unknown option is a ``ValueError`` naming the allowed ones.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    loader = _LOADERS[name]
    allowed = [p for p in inspect.signature(loader).parameters if p not in ("root", "download", "seed")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option {', '.join(unknown)}; its options: {', '.join(allowed)}")
    data = loader(root=root, download=download, seed=seed, **options)
    validate(data)
    return data


def validate(data: Dataset) -> None:
    """Check a prepared dataset's structure; a broken file is named by the caller."""
    required = ["name", "x_train", "y_train", "x_test", "y_test", "max_value", "classes", "mean", "std", "class_counts"]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"prepared dataset lacks {missing}")
    num_classes = len(data["classes"])
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.ndim != 4 or x.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"x_{split} must be uint8 or float32 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if x.dtype == torch.float32 and x.numel() and not (0.0 <= float(x.min()) and float(x.max()) <= data["max_value"]):
            raise ValueError(f"x_{split} holds float values outside [0, {data['max_value']}]")
        if y.shape != (x.shape[0],) or y.dtype != torch.int64:
            raise ValueError(f"y_{split} must be int64 of length {x.shape[0]}, got {y.dtype} {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"y_{split} holds labels outside [0, {num_classes})")
    if len(data["mean"]) != data["x_train"].shape[1] or len(data["std"]) != data["x_train"].shape[1]:
        raise ValueError("mean and std must have one entry per channel")
    counts = data["class_counts"]
    expected = torch.bincount(data["y_train"], minlength=num_classes)
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64 or not torch.equal(counts, expected):
        raise ValueError("class_counts must be the int64 [C] counts of y_train per class")


def as_float(data: Dataset, split: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``split`` as float32 in [0, 1] and labels, on ``device`` (one resident tensor)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: train, test")
    x = data[f"x_{split}"].to(device=device).float().div_(float(data["max_value"]))
    return x, data[f"y_{split}"].to(device)


def device_layout(t: torch.Tensor) -> torch.Tensor:
    """Images on a GPU in channels_last (cuDNN's tensor-core convolutions want NHWC: PGD-10 on
    10,000 CIFAR images took 2.45 s against 2.73 s in NCHW on an H100); anything else unchanged.
    The values are the same either way."""
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 and t.device.type == "cuda" else t


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


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of every class, drawn without replacement with ``seed``."""
    if per_class < 1:
        raise ValueError(f"train_per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise TooFewSamplesError(
                f"train_per_class={per_class} but class {c} has only {len(idx)} training samples: "
                f"set datasets.<dataset>.options.train_per_class to at most {np.unique(labels, return_counts=True)[1].min()}"
            )
        keep.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(keep))


IMBALANCE_PROFILES = ("step", "exponential")
_IMBALANCE_STREAM = 0x1B  # second entropy word of the imbalance draw: a stream apart from seed's other draws


def check_imbalance(imbalance) -> dict | None:
    """The ``imbalance`` option, validated: ``None`` or ``{"profile": step|exponential, "ratio": R >= 1}``."""
    if imbalance is None:
        return None
    if not isinstance(imbalance, dict):
        raise ValueError(
            f"imbalance must be a mapping {{profile: step|exponential, ratio: R}}, got {type(imbalance).__name__}"
        )
    unknown = sorted(set(imbalance) - {"profile", "ratio"})
    if unknown:
        raise ValueError(f"imbalance has no key {', '.join(map(str, unknown))}; its keys: profile, ratio")
    missing = [k for k in ("profile", "ratio") if k not in imbalance]
    if missing:
        raise ValueError(f"imbalance lacks {', '.join(missing)}; give e.g. {{profile: step, ratio: 10}}")
    profile, ratio = imbalance["profile"], imbalance["ratio"]
    if profile not in IMBALANCE_PROFILES:
        raise ValueError(f"imbalance.profile {profile!r} is unknown; allowed: {', '.join(IMBALANCE_PROFILES)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"imbalance.ratio must be a finite number >= 1 (n_max / n_min; 1 = balanced), got {ratio!r}")
    return {"profile": profile, "ratio": float(ratio)}


def imbalance_counts(n_max: int, num_classes: int, profile: str, ratio: float) -> list[int]:
    """Training images kept per class for a long-tailed profile (Cao et al. 2019, LDAM's code):

    - ``step``: the first ``C - C // 2`` classes keep ``n_max``, the last ``C // 2`` (the
      minorities) ``floor(n_max / ratio)``;
    - ``exponential``: class ``c`` keeps ``floor(n_max * ratio ** (-c / (C - 1)))``, so class 0
      keeps ``n_max`` and class ``C-1`` ``floor(n_max / ratio)``.

    Class index order decides who is a minority (deterministic, label order). A profile that
    leaves a class without images raises (the ratio is too large for ``n_max``).
    """
    check_imbalance({"profile": profile, "ratio": ratio})
    if num_classes < 2 or n_max < 1:
        raise ValueError(f"imbalance needs at least 2 classes and n_max >= 1, got {num_classes} and {n_max}")
    if profile == "step":
        minorities = num_classes // 2
        counts = [n_max] * (num_classes - minorities) + [int(n_max / ratio)] * minorities
    else:
        counts = [int(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]
    if min(counts) < 1:
        raise ValueError(
            f"imbalance ratio {ratio:g} leaves a class without training images (n_max = {n_max}); "
            f"use a ratio <= {n_max}"
        )
    return counts


def imbalanced_subset(labels: np.ndarray, num_classes: int, imbalance: dict, seed: int) -> np.ndarray:
    """Sorted indices of a seeded long-tailed subsample of ``labels`` (:func:`imbalance_counts`).

    ``n_max`` is the smallest class's count, so every class can give its share and the ratio
    n_max / n_min is the configured one (up to the floor). The draw uses its own stream of
    ``seed``, independent of ``train_per_class``'s.
    """
    imbalance = check_imbalance(imbalance)
    available = np.bincount(labels, minlength=num_classes)
    counts = imbalance_counts(int(available.min()), num_classes, imbalance["profile"], imbalance["ratio"])
    rng = np.random.default_rng([seed, _IMBALANCE_STREAM])
    keep = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in enumerate(counts)]
    return np.sort(np.concatenate(keep))


def channel_stats(x_uint8: torch.Tensor, max_value: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (ddof 1, at least 1e-3) of [0, 1] images (training split), for the
    model's first layer.

    Integer images are summed exactly in int64 chunks (no float copy of the dataset: ImageNette
    would need 6 GB in float64), so the result does not depend on the summation order.
    """
    n_chan = x_uint8.shape[1]
    count = x_uint8.shape[0] * x_uint8.shape[2] * x_uint8.shape[3]
    if count < 2:
        raise ValueError(
            f"channel_stats needs at least 2 values per channel, got images of shape {tuple(x_uint8.shape)}"
        )
    rows = max(1, (1 << 22) // max(1, x_uint8[0].numel()))
    integer = not (x_uint8.is_floating_point() or x_uint8.is_complex())
    acc = torch.int64 if integer else torch.float64
    s1 = torch.zeros(n_chan, dtype=acc)
    s2 = torch.zeros(n_chan, dtype=acc)
    for chunk in x_uint8.split(rows):
        c = chunk.to(acc)
        s1 += c.sum(dim=(0, 2, 3))
        s2 += c.square().sum(dim=(0, 2, 3))
    mean, std = [], []
    for a, b in zip(s1.tolist(), s2.tolist()):
        if integer:  # exact: n * sum(x^2) - sum(x)^2 in Python integers
            var = (count * b - a * a) / (count * (count - 1)) / max_value**2
        else:
            var = max(0.0, (b - a * a / count) / (count - 1)) / max_value**2
        mean.append(a / count / max_value)
        std.append(max(math.sqrt(var), 1e-3))
    return mean, std


def _prepared(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    classes: list[str],
    *,
    max_value: int = 255,
    train_per_class: int | None = None,
    imbalance: dict | None = None,
    seed: int = 0,
    extra: dict | None = None,
) -> Dataset:
    """Assemble the prepared dict: optional per-class subsample of train, then optional long-tailed
    subsample of it (the test split is never touched), stats and class counts from train."""
    imbalance = check_imbalance(imbalance)
    if train_per_class is not None:
        keep = torch.from_numpy(per_class_subset(y_train.numpy(), train_per_class, seed))
        x_train, y_train = x_train[keep], y_train[keep]
    if imbalance is not None:
        keep = torch.from_numpy(imbalanced_subset(y_train.numpy(), len(classes), imbalance, seed))
        x_train, y_train = x_train[keep], y_train[keep]
    mean, std = channel_stats(x_train, max_value)
    return {
        "name": name,
        "x_train": x_train.contiguous(),
        "y_train": y_train.to(torch.int64).contiguous(),
        "x_test": x_test.contiguous(),
        "y_test": y_test.to(torch.int64).contiguous(),
        "max_value": max_value,
        "classes": [str(c) for c in classes],
        "mean": mean,
        "std": std,
        "class_counts": torch.bincount(y_train.to(torch.int64), minlength=len(classes)),
        **(extra or {}),
    }


def _check_labels(name: str, where: Path, y: torch.Tensor, num_classes: int) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetNotFoundError(
            f"{name}: {where} holds labels outside [0, {num_classes}): the files are corrupt or not {name}"
        )


@register_dataset("digits")
def _digits(
    *,
    root=None,
    download=False,
    seed: int = 0,
    test_fraction: float = 0.25,
    verify_checksums: bool = True,
    train_per_class: int | None = None,
    imbalance: dict | None = None,
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, pixel values 0..16), stratified split.

    ``root``, ``download`` and ``verify_checksums`` do not apply (the data ships with scikit-learn).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = stratified_split(labels.numpy(), test_fraction, seed)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return _prepared(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        [str(c) for c in range(10)],
        max_value=16,
        train_per_class=train_per_class,
        imbalance=imbalance,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------
# MNIST-1D (Greydanus & Kobak, ICML 2024): generated by the mnist1d package, never downloaded

MNIST1D_LENGTH = 40
"""The generator's ``final_seq_length``: the length of every MNIST-1D sequence."""


def to_box(x, box: float):
    """Data values to the attack box [0, 1]: ``(x + box) / (2 box)`` (so data ``[-box, box]``
    fills the box; eps in box units is eps in data units divided by ``2 box``)."""
    return (x + box) / (2.0 * box)


def from_box(u, box: float):
    """The inverse of :func:`to_box`: ``2 box u - box``."""
    return 2.0 * box * u - box


def _mnist1d_arrays(args: dict) -> dict:
    """The mnist1d package's own generator (``make_dataset``) on ``args``, which seeds numpy's and
    Python's global RNGs: their states are restored afterwards, so loading leaves no trace."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    full = get_dataset_args(as_dict=True)
    full.update(args)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        return make_dataset(ObjectView(full))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@register_dataset("mnist1d")
def _mnist1d(
    *,
    root=None,
    download=False,
    seed: int = 0,
    num_samples: int = 5000,
    train_split: float = 0.8,
    generator_seed: int = 42,
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 2e-2,
    shear_scale: float = 0.75,
    box: float = 8.0,
    train_per_class: int | None = None,
    imbalance: dict | None = None,
) -> Dataset:
    """MNIST-1D: 10 classes of sequences of length 40 (default 4,000 train and 1,000 test), made by
    ``mnist1d.data.make_dataset`` from its fixed templates with the published arguments
    (``get_dataset_args``: seed 42, 5,000 samples, the first 80% for training) unless an option
    changes them. ``root`` and ``download`` do not apply: nothing is read or fetched.

    The generator standardises the whole set to mean 0 and std 1 (the data's units); each value
    is stored as :func:`to_box` of it with half-width ``box`` (default 8: the published set spans
    -5.5 to 4.5), so the attacks' [0, 1] box is data in [-box, box] and the mapping inverts exactly
    (:func:`from_box`). Sequences are (N, 1, 1, 40) float32: a one-row image.
    """
    if num_samples < 10 or not 0.0 < train_split < 1.0:
        raise ValueError(
            f"mnist1d needs num_samples >= 10 and 0 < train_split < 1, got {num_samples} and {train_split}; "
            "the published set is num_samples 5000, train_split 0.8"
        )
    if not box > 0:
        raise ValueError(f"mnist1d box must be > 0 (the half-width of the data range mapped to [0, 1]), got {box}")
    args = dict(num_samples=num_samples, train_split=train_split, seed=generator_seed, scale_coeff=scale_coeff,
                max_translation=max_translation, corr_noise_scale=corr_noise_scale, iid_noise_scale=iid_noise_scale,
                shear_scale=shear_scale)
    raw = _mnist1d_arrays(args)
    reach = max(float(np.abs(raw["x"]).max()), float(np.abs(raw["x_test"]).max()))
    if reach > box:
        raise ValueError(
            f"mnist1d: the generated values reach {reach:.2f}, outside the box [-{box:g}, {box:g}] that maps to [0, 1]; "
            f"set the option box to at least {math.ceil(reach)}"
        )
    splits = []
    for x, y in ((raw["x"], raw["y"]), (raw["x_test"], raw["y_test"])):
        u = torch.from_numpy(to_box(np.asarray(x, dtype=np.float64), box)).to(torch.float32).clamp_(0.0, 1.0)
        splits += [u.reshape(len(u), 1, 1, -1), torch.from_numpy(np.asarray(y, dtype=np.int64))]
    return _prepared(
        "mnist1d", *splits, [str(c) for c in range(10)], max_value=1, train_per_class=train_per_class,
        imbalance=imbalance, seed=seed, extra={"units": {"box": float(box), "offset": -float(box), "scale": 2.0 * float(box)}},
    )


# --------------------------------------------------------------------------------------------
# helpers shared by the torchvision-backed loaders


def _root_dir(name: str, root: str | Path | None, expected: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"{name}: no data_root given; {expected}")
    return Path(root).expanduser()


@dataclass(frozen=True)
class StagedLayout:
    """Where a real dataset's files lie under ``data_root``: the folder, the files (a file may
    also be staged gzipped: ``gzipped``) or folders it must hold, and how to get them."""

    folder: str
    files: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    gzipped: bool = False
    how: str = ""


def staged_layout(name: str) -> StagedLayout:
    """The pre-staged layout of real dataset ``name`` (what its loader reads under ``data_root``)."""
    if name in ("mnist", "fashion_mnist"):
        from torchvision.datasets import MNIST, FashionMNIST

        folder = f"{(MNIST if name == 'mnist' else FashionMNIST).__name__}/raw"
        how = _how_to_get(name, f"{folder}/ with {', '.join(f + '[.gz]' for f in _MNIST_FILES)}",
                          _MNIST_URLS[name] + "{" + ",".join(f + ".gz" for f in _MNIST_FILES) + "}")
        return StagedLayout(folder, files=_MNIST_FILES, gzipped=True, how=how)
    if name in ("cifar10", "cifar100"):
        from torchvision.datasets import CIFAR10, CIFAR100

        tv_cls = CIFAR10 if name == "cifar10" else CIFAR100
        files = (*(f for f, _ in (*tv_cls.train_list, *tv_cls.test_list)), tv_cls.meta["filename"])
        return StagedLayout(tv_cls.base_folder, files=files,
                            how=_how_to_get(name, f"{tv_cls.base_folder}/ ({', '.join(files)})", tv_cls.url))
    if name == "imagenette":
        from torchvision.datasets import Imagenette

        url, _ = Imagenette._ARCHIVES["160px"]
        wnids = sorted(Imagenette._WNID_TO_CLASS)
        how = _how_to_get("imagenette", "imagenette2-160/train/<wnid>/*.JPEG and imagenette2-160/val/<wnid>/*.JPEG for the 10 "
                          f"ImageNette WordNet ids ({', '.join(wnids)})", url)
        return StagedLayout(Path(url).stem, folders=tuple(f"{split}/{w}" for split in ("train", "val") for w in wnids), how=how)
    raise ValueError(f"{name!r} is not read from data_root; staged datasets: mnist, fashion_mnist, cifar10, cifar100, imagenette")


def missing_staged_files(name: str, root: str | Path) -> str | None:
    """One line naming what ``root`` lacks of dataset ``name``'s staged layout and how to stage
    it, or None when every file and folder is there. Presence only (fast: the config check runs
    it before any job); the loader then checks content."""
    layout = staged_layout(name)
    base = Path(root).expanduser() / layout.folder
    missing = [f for f in layout.files if not (base / f).is_file() and not (layout.gzipped and (base / f"{f}.gz").is_file())]
    missing += [d for d in layout.folders if not (base / d).is_dir()]
    if not missing:
        return None
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return f"{name}: {base} lacks {shown}; {layout.how}"


def _how_to_get(name: str, layout: str, url: str) -> str:
    return (
        f"set data_root to a directory holding {layout} (from {url}), "
        f"or set download: true on a machine with internet"
    )


def _download_failed(name: str, root: Path, err: BaseException, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{name}: downloading into {root} failed ({type(err).__name__}: {err}); {how}")


def _md5_mismatch(name: str, path: Path, md5: str, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: {path} fails its md5 checksum (the original's is {md5}): the file is truncated, "
        f"corrupt or not the published {name}; {how}; or pass verify_checksums=False "
        f"(config: verify_checksums: false) to use these files anyway"
    )


def _count_mismatch(name: str, what: str, found: int, expected: int, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: {what} holds {found:,} images, the published {name} {expected:,}: a partial or "
        f"different copy; {how}; or pass verify_checksums=False (config: verify_checksums: false) "
        f"to use these files anyway"
    )


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: torchvision.datasets.MNIST / FashionMNIST


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}


def _gunzip(src: Path, dst: Path) -> None:
    from ncrobust.io import atomic_path

    with gzip.open(src, "rb") as fin, atomic_path(dst) as tmp, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _mnist_family(
    name: str, tv_cls, *, root, download: bool, seed: int, verify_checksums: bool, train_per_class: int | None,
    imbalance: dict | None = None,
) -> Dataset:
    from torchvision.datasets.utils import check_md5

    folder = tv_cls.__name__  # torchvision's raw folder: root/MNIST/raw, root/FashionMNIST/raw
    how = staged_layout(name).how
    root = _root_dir(name, root, how)
    raw = root / folder / "raw"
    if download:
        try:
            tv_cls(str(root), train=True, download=True)
        except _READ_ERRORS as err:
            raise _download_failed(name, root, err, how) from err
    # torchvision reads the uncompressed idx files; the .gz files (as published) are unpacked first
    for f in _MNIST_FILES:
        if not (raw / f).is_file() and (raw / f"{f}.gz").is_file():
            try:
                _gunzip(raw / f"{f}.gz", raw / f)
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                raise DatasetNotFoundError(
                    f"{name}: cannot unpack {raw / f'{f}.gz'} ({type(err).__name__}: {err}): corrupt or "
                    f"truncated, or {raw} is not writable; {how}"
                ) from err
    lacking = missing_staged_files(name, root)
    if lacking:
        raise DatasetNotFoundError(lacking)
    if verify_checksums:  # the published md5s are those of the .gz files; check them where present
        for fname, md5 in tv_cls.resources:
            if (raw / fname).is_file() and not check_md5(raw / fname, md5):
                raise _md5_mismatch(name, raw / fname, md5, how)
    try:
        train, test = tv_cls(str(root), train=True), tv_cls(str(root), train=False)
    except _READ_ERRORS as err:
        raise DatasetNotFoundError(
            f"{name}: cannot read the idx files in {raw} ({type(err).__name__}: {err}): corrupt or truncated; {how}"
        ) from err
    splits = {}
    for split, ds, prefix, n_expected in (("train", train, "train", 60_000), ("test", test, "t10k", 10_000)):
        x, y = ds.data, ds.targets.to(torch.int64)
        if x.ndim != 3 or x.shape[0] != y.shape[0]:
            raise DatasetNotFoundError(
                f"{name}: {raw}/{prefix}-* hold {tuple(x.shape)} images but {tuple(y.shape)} labels: corrupt; {how}"
            )
        if verify_checksums and (x.shape[0] != n_expected or tuple(x.shape[1:]) != (28, 28)):
            raise _count_mismatch(name, f"{raw}/{prefix}-images-idx3-ubyte", x.shape[0], n_expected, how)
        _check_labels(name, raw / f"{prefix}-labels-idx1-ubyte", y, len(ds.classes))
        splits[split] = (x.unsqueeze(1), y)
    classes = [c.split(" - ")[0] for c in train.classes]  # MNIST's "0 - zero" -> "0"
    return _prepared(name, *splits["train"], *splits["test"], classes, train_per_class=train_per_class, imbalance=imbalance, seed=seed)


@register_dataset("mnist")
def _mnist(
    *, root=None, download=False, seed: int = 0, verify_checksums: bool = True, train_per_class: int | None = None,
    imbalance: dict | None = None,
) -> Dataset:
    """MNIST (60,000 + 10,000 grey 28x28 digits), via ``torchvision.datasets.MNIST``.

    ``verify_checksums``: the .gz files, where present, must match torchvision's md5 list, and
    the splits must hold 60,000 and 10,000 images of 28x28.
    """
    from torchvision.datasets import MNIST

    return _mnist_family(
        "mnist", MNIST, root=root, download=download, seed=seed,
        verify_checksums=verify_checksums, train_per_class=train_per_class, imbalance=imbalance,
    )


@register_dataset("fashion_mnist")
def _fashion_mnist(
    *, root=None, download=False, seed: int = 0, verify_checksums: bool = True, train_per_class: int | None = None,
    imbalance: dict | None = None,
) -> Dataset:
    """Fashion-MNIST (60,000 + 10,000 grey 28x28 clothes), via ``torchvision.datasets.FashionMNIST``.

    ``verify_checksums`` as for ``mnist``.
    """
    from torchvision.datasets import FashionMNIST

    return _mnist_family(
        "fashion_mnist", FashionMNIST, root=root, download=download, seed=seed,
        verify_checksums=verify_checksums, train_per_class=train_per_class, imbalance=imbalance,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100: torchvision.datasets.CIFAR10 / CIFAR100


@cache
def _cifar_reader(tv_cls):
    """``tv_cls`` with its md5 records removed: torchvision's own parsing code (``__init__``,
    ``_load_meta``), which then only checks that the files exist. The checksums are verified
    before, by ``_cifar`` (once, with a message naming the file), unless ``verify_checksums=False``."""
    return type(
        f"{tv_cls.__name__}Files",
        (tv_cls,),
        {
            "train_list": [[f, None] for f, _ in tv_cls.train_list],
            "test_list": [[f, None] for f, _ in tv_cls.test_list],
            "meta": {**tv_cls.meta, "md5": None},
        },
    )


def _cifar(
    name: str, tv_cls, *, root, download: bool, seed: int, verify_checksums: bool, train_per_class, imbalance=None
) -> Dataset:
    from torchvision.datasets.utils import check_md5

    folder = tv_cls.base_folder
    records = [*tv_cls.train_list, *tv_cls.test_list, [tv_cls.meta["filename"], tv_cls.meta["md5"]]]
    how = staged_layout(name).how
    root = _root_dir(name, root, how)
    base = root / folder
    reader = _cifar_reader(tv_cls)
    if download:
        try:
            reader(str(root), train=True, download=True)
        except _READ_ERRORS as err:
            raise _download_failed(name, root, err, how) from err
    lacking = missing_staged_files(name, root)
    if lacking:
        raise DatasetNotFoundError(lacking)
    if verify_checksums:
        for f, md5 in records:
            if not check_md5(base / f, md5):
                raise _md5_mismatch(name, base / f, md5, how)
    try:
        train, test = reader(str(root), train=True), reader(str(root), train=False)
    except _READ_ERRORS as err:
        raise DatasetNotFoundError(
            f"{name}: cannot read the pickles in {base} ({type(err).__name__}: {err}): corrupt or truncated; {how}"
        ) from err
    splits = {}
    for split, ds in (("train", train), ("test", test)):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # torchvision holds (N, 32, 32, 3)
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        if x.shape[0] != y.shape[0]:
            raise DatasetNotFoundError(
                f"{name}: {base} holds {x.shape[0]} {split} images but {y.shape[0]} labels; {how}"
            )
        _check_labels(name, base, y, len(ds.classes))
        splits[split] = (x, y)
    return _prepared(name, *splits["train"], *splits["test"], train.classes, train_per_class=train_per_class, imbalance=imbalance, seed=seed)


@register_dataset("cifar10")
def _cifar10(
    *, root=None, download=False, seed: int = 0, verify_checksums: bool = True, train_per_class: int | None = None,
    imbalance: dict | None = None,
) -> Dataset:
    """CIFAR-10 (50,000 + 10,000 RGB 32x32), via ``torchvision.datasets.CIFAR10``.

    ``verify_checksums``: every pickle must match torchvision's md5 record of the original.
    """
    from torchvision.datasets import CIFAR10

    return _cifar(
        "cifar10", CIFAR10, root=root, download=download, seed=seed,
        verify_checksums=verify_checksums, train_per_class=train_per_class, imbalance=imbalance,
    )


@register_dataset("cifar100")
def _cifar100(
    *, root=None, download=False, seed: int = 0, verify_checksums: bool = True, train_per_class: int | None = None,
    imbalance: dict | None = None,
) -> Dataset:
    """CIFAR-100 (50,000 + 10,000 RGB 32x32, the 100 fine labels), via ``torchvision.datasets.CIFAR100``.

    ``verify_checksums`` as for ``cifar10``.
    """
    from torchvision.datasets import CIFAR100

    return _cifar(
        "cifar100", CIFAR100, root=root, download=download, seed=seed,
        verify_checksums=verify_checksums, train_per_class=train_per_class, imbalance=imbalance,
    )


# --------------------------------------------------------------------------------------------
# ImageNette (fast.ai's imagenette2-160): torchvision.datasets.Imagenette, decoded with PIL


IMAGENETTE_COUNTS = {"train": 9_469, "val": 3_925}  # fast.ai's imagenette2 (70/30 split)


def _decode_jpeg(path: str, size: int) -> np.ndarray:
    """RGB, short side resized to ``size`` (bilinear, antialiased) where it differs, centre crop
    ``size`` x ``size`` (torchvision's ``Resize(size)`` + ``CenterCrop(size)``); (3, size, size) uint8."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        img = im.convert("RGB")
    if min(img.size) != size:
        img = TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, [size, size])
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


@register_dataset("imagenette")
def _imagenette(
    *,
    root=None,
    download=False,
    seed: int = 0,
    verify_checksums: bool = True,
    train_per_class: int | None = None,
    imbalance: dict | None = None,
    image_size: int = 160,
    num_threads: int | None = None,
) -> Dataset:
    """ImageNette (10 ImageNet classes; 9,469 train and 3,925 val images), from fast.ai's
    ``imagenette2-160`` (short side 160 px), via ``torchvision.datasets.Imagenette(size="160px")``.

    Labels are the sorted WordNet ids (as ``ImageFolder``, and Su et al.), named by their first
    English name (tench, English springer, ...). Images are resized so that the short side is
    ``image_size`` (a no-op for imagenette2-160 at the default 160) and centre-cropped to
    ``image_size`` x ``image_size``, as Su et al.'s ``CenterCrop(160)``; the test split is ``val``.
    Decoding uses ``num_threads`` threads (default: up to 8). ``verify_checksums``: the published
    archive has an md5 but the unpacked images do not, so the image counts must be the published ones.
    """
    from torchvision.datasets import Imagenette

    if image_size < 1:
        raise ValueError(f"imagenette image_size must be >= 1, got {image_size}")
    url, _ = Imagenette._ARCHIVES["160px"]
    wnids = sorted(Imagenette._WNID_TO_CLASS)
    how = staged_layout("imagenette").how
    root = _root_dir("imagenette", root, how)
    base = root / Path(url).stem  # imagenette2-160
    if download:
        try:
            Imagenette(str(root), split="train", size="160px", download=True)
        except _READ_ERRORS as err:
            raise _download_failed("imagenette", root, err, how) from err
    lacking = missing_staged_files("imagenette", root)
    if lacking:
        raise DatasetNotFoundError(lacking)
    workers = num_threads if num_threads is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"imagenette num_threads must be >= 1, got {num_threads}")
    splits = {}
    for split in ("train", "val"):
        try:
            ds = Imagenette(str(root), split=split, size="160px")
        except _READ_ERRORS as err:  # e.g. a folder that is no ImageNette class, or a class without images
            raise DatasetNotFoundError(
                f"imagenette: cannot list {base / split} ({type(err).__name__}: {err}); {how}"
            ) from err
        if ds.wnids != wnids:
            extra = sorted(set(ds.wnids) - set(wnids))
            raise DatasetNotFoundError(
                f"imagenette: {base / split} holds folders {extra} that are no ImageNette class; {how}"
            )
        paths = [p for p, _ in ds._samples]
        if verify_checksums and len(paths) != IMAGENETTE_COUNTS[split]:
            raise _count_mismatch("imagenette", str(base / split), len(paths), IMAGENETTE_COUNTS[split], how)
        x = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
        x_np = x.numpy()

        def decode(i: int) -> None:
            try:
                x_np[i] = _decode_jpeg(paths[i], image_size)
            except _READ_ERRORS as err:
                raise DatasetNotFoundError(
                    f"imagenette: cannot decode {paths[i]} ({type(err).__name__}: {err}): corrupt or truncated; {how}"
                ) from err

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(decode, range(len(paths))))
        y = torch.tensor([label for _, label in ds._samples], dtype=torch.int64)
        splits[split] = (x, y)
        classes = [Imagenette._WNID_TO_CLASS[w][0] for w in ds.wnids]
    return _prepared(
        "imagenette", *splits["train"], *splits["val"], classes, train_per_class=train_per_class, imbalance=imbalance, seed=seed
    )
