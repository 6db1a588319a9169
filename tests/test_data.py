"""Dataset loaders, on small files written in the real on-disk formats.

CIFAR pickles are written as the originals are (Python 2 protocol-2 pickles whose keys and raw
array bytes are byte strings: ``b'data'`` under ``encoding='bytes'``, ``'data'`` under
``encoding='latin1'``, which torchvision uses); MNIST files are big-endian idx files; ImageNette is a
folder tree of JPEGs. The loaders read them through torchvision's own parsing code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncrobust import data
from ncrobust.data import DatasetNotFoundError, channel_stats, load, stratified_split

RNG = np.random.default_rng(0)

# --------------------------------------------------------------------------------------------
# writers of the real formats


class _Py2Pickler(pickle._Pickler):
    """Protocol 2, with ``bytes`` and ASCII ``str`` written as Python 2 ``str`` (BINSTRING), and
    numpy's reconstructor under its Python 2 name, as in the CIFAR pickles."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def _save_str(self, obj):
        if obj.isascii():
            self._save_py2_str(obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_py2_pickle(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(obj)


def write_cifar(root: Path, *, hundred: bool = False, n_per_file: int = 7, n_test: int = 9) -> dict:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) with random images."""
    num_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    names = [f"class_{i:02d}" for i in range(num_classes)]
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    truth = {"train_x": [], "train_y": []}
    for fname in train_files:
        x = RNG.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        y = RNG.integers(0, num_classes, size=n_per_file).tolist()
        entry = {"batch_label": f"training batch of {fname}", label_key: y, "data": x,
                 "filenames": [f"img_{i}.png" for i in range(n_per_file)]}
        if hundred:
            entry["coarse_labels"] = [label // 5 for label in y]
        write_py2_pickle(entry, folder / fname)
        truth["train_x"].append(x)
        truth["train_y"] += y
    x = RNG.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    y = RNG.integers(0, num_classes, size=n_test).tolist()
    entry = {"batch_label": "testing batch 1 of 1", label_key: y, "data": x,
             "filenames": [f"t_{i}.png" for i in range(n_test)]}
    write_py2_pickle(entry, folder / ("test" if hundred else "test_batch"))
    if hundred:
        meta = {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}
        write_py2_pickle(meta, folder / "meta")
    else:
        write_py2_pickle({"num_cases_per_batch": n_per_file, "label_names": names, "num_vis": 3072},
                         folder / "batches.meta")
    return {
        "folder": folder,
        "names": names,
        "x_train": np.concatenate(truth["train_x"]).reshape(-1, 3, 32, 32),
        "y_train": np.array(truth["train_y"]),
        "x_test": x.reshape(-1, 3, 32, 32),
        "y_test": np.array(y),
    }


def idx_bytes(array: np.ndarray) -> bytes:
    """Big-endian idx (LeCun) file of a uint8 array: magic 0x0000 08 <ndim>, sizes, data."""
    header = struct.pack(">i", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, folder: str = "MNIST", *, gz: bool = False, n_train: int = 30, n_test: int = 12) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, size=n_test).astype(np.uint8),
    }
    for fname, array in arrays.items():
        if gz:
            with gzip.open(raw / f"{fname}.gz", "wb") as fh:
                fh.write(idx_bytes(array))
        else:
            (raw / fname).write_bytes(idx_bytes(array))
    return {"raw": raw, **arrays}


IMAGENETTE_WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
IMAGENETTE_NAMES = ["tench", "English springer", "cassette player", "chain saw", "church",
                    "French horn", "garbage truck", "gas pump", "golf ball", "parachute"]


def colour(split: str, class_idx: int, k: int) -> tuple[int, int, int]:
    return (20 * class_idx + 5, 100 + 40 * k, 200 if split == "train" else 60)


def write_imagenette(root: Path, sizes: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """imagenette2-160/{train,val}/<wnid>/*.JPEG: flat-coloured JPEGs, one colour per image."""
    sizes = sizes or {"train": [(213, 160), (160, 240)], "val": [(160, 160)]}
    base = root / "imagenette2-160"
    for split, shapes in sizes.items():
        for c, wnid in enumerate(IMAGENETTE_WNIDS):
            folder = base / split / wnid
            folder.mkdir(parents=True)
            for k, (w, h) in enumerate(shapes):
                Image.new("RGB", (w, h), colour(split, c, k)).save(folder / f"{wnid}_{k}.JPEG", quality=95)
    return base


# --------------------------------------------------------------------------------------------
# CIFAR


def test_fake_pickles_have_the_original_layout(tmp_path):
    truth = write_cifar(tmp_path)
    with open(truth["folder"] / "data_batch_1", "rb") as fh:
        as_bytes = pickle.load(fh, encoding="bytes")  # the CIFAR web page's recipe
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (7, 3072)
    with open(truth["folder"] / "data_batch_1", "rb") as fh:
        assert fh.read(2) == b"\x80\x02"


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_round_trip(tmp_path, hundred):
    truth = write_cifar(tmp_path, hundred=hundred)
    name = "cifar100" if hundred else "cifar10"
    ds = load(name, root=tmp_path, verify_checksums=False)
    n_train = 7 if hundred else 35
    assert ds["name"] == name
    assert ds["x_train"].shape == (n_train, 3, 32, 32) and ds["x_train"].dtype == torch.uint8
    assert ds["x_test"].shape == (9, 3, 32, 32) and ds["y_test"].dtype == torch.int64
    assert ds["max_value"] == 255
    assert ds["classes"] == truth["names"]
    assert ds["x_train"].is_contiguous()
    np.testing.assert_array_equal(ds["x_train"].numpy(), truth["x_train"])
    np.testing.assert_array_equal(ds["y_train"].numpy(), truth["y_train"])
    np.testing.assert_array_equal(ds["x_test"].numpy(), truth["x_test"])
    np.testing.assert_array_equal(ds["y_test"].numpy(), truth["y_test"])
    x = truth["x_train"] / 255.0
    np.testing.assert_allclose(ds["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(ds["std"], x.std(axis=(0, 2, 3), ddof=1), rtol=1e-12)


def test_cifar_checksums_verified_by_default(tmp_path):
    truth = write_cifar(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        load("cifar10", root=tmp_path)
    message = str(err.value)
    assert str(truth["folder"] / "data_batch_1") in message
    assert "md5" in message and "c99cafc152244af753f735de768cd75f" in message
    assert "verify_checksums" in message and "cifar-10-python.tar.gz" in message


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load("cifar10", root=tmp_path / "nowhere")
    message = str(err.value)
    for expected in ("cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta",
                     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "download: true", "data_root"):
        assert expected in message
    assert "\n" not in message
    with pytest.raises(DatasetNotFoundError, match="no data_root given.*cifar-100-python"):
        load("cifar100")


def test_cifar_one_file_missing(tmp_path):
    truth = write_cifar(tmp_path)
    (truth["folder"] / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks data_batch_3;"):
        load("cifar10", root=tmp_path, verify_checksums=False)


def test_cifar_truncated_pickle(tmp_path):
    truth = write_cifar(tmp_path)
    path = truth["folder"] / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetNotFoundError, match="cannot read the pickles.*corrupt or truncated"):
        load("cifar10", root=tmp_path, verify_checksums=False)
    with pytest.raises(DatasetNotFoundError, match="md5"):  # and the checksum catches it first
        load("cifar10", root=tmp_path)


def test_cifar_bad_labels(tmp_path):
    truth = write_cifar(tmp_path)
    entry = {"batch_label": "x", "labels": [0, 1, 12], "data": np.zeros((3, 3072), np.uint8), "filenames": ["a"] * 3}
    write_py2_pickle(entry, truth["folder"] / "test_batch")
    with pytest.raises(DatasetNotFoundError, match=r"labels outside \[0, 10\)"):
        load("cifar10", root=tmp_path, verify_checksums=False)


def test_train_per_class(tmp_path):
    write_cifar(tmp_path, n_per_file=40)
    full = load("cifar10", root=tmp_path, verify_checksums=False)
    counts = torch.bincount(full["y_train"], minlength=10)
    k = int(counts.min())
    assert k >= 1
    a = load("cifar10", root=tmp_path, verify_checksums=False, train_per_class=k, seed=3)
    b = load("cifar10", root=tmp_path, verify_checksums=False, train_per_class=k, seed=3)
    assert torch.bincount(a["y_train"], minlength=10).tolist() == [k] * 10
    assert torch.equal(a["x_train"], b["x_train"])
    assert torch.equal(a["x_test"], full["x_test"])  # the test split is untouched
    with pytest.raises(ValueError, match="train_per_class=1000 but class 0 has only .* set datasets.<dataset>.options.train_per_class to at most"):
        load("cifar10", root=tmp_path, verify_checksums=False, train_per_class=1000)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_round_trip(tmp_path, name, folder):
    truth = write_mnist(tmp_path, folder)
    ds = load(name, root=tmp_path, verify_checksums=False)
    assert ds["x_train"].shape == (30, 1, 28, 28) and ds["x_train"].dtype == torch.uint8
    assert ds["x_test"].shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(ds["x_train"][:, 0].numpy(), truth["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds["y_train"].numpy(), truth["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds["x_test"][:, 0].numpy(), truth["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds["y_test"].numpy(), truth["t10k-labels-idx1-ubyte"])
    assert ds["y_train"].dtype == torch.int64 and ds["max_value"] == 255
    if name == "mnist":
        assert ds["classes"] == [str(i) for i in range(10)]
    else:
        assert ds["classes"][0] == "T-shirt/top" and ds["classes"][9] == "Ankle boot"
    assert len(ds["mean"]) == 1 and len(ds["std"]) == 1


def test_mnist_gz_only(tmp_path):
    """The published files are .gz; torchvision reads the unpacked ones, which the loader unpacks."""
    truth = write_mnist(tmp_path, gz=True)
    ds = load("mnist", root=tmp_path, verify_checksums=False)
    np.testing.assert_array_equal(ds["x_test"][:, 0].numpy(), truth["t10k-images-idx3-ubyte"])
    assert (truth["raw"] / "t10k-images-idx3-ubyte").is_file()
    assert not list(truth["raw"].glob(".*.tmp"))


def test_mnist_verified_by_default(tmp_path):
    write_mnist(tmp_path, gz=True)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz fails its md5 checksum"):
        load("mnist", root=tmp_path)
    for gz in (tmp_path / "MNIST" / "raw").glob("*.gz"):
        gz.unlink()
    with pytest.raises(DatasetNotFoundError, match="holds 30 images, the published mnist 60,000"):
        load("mnist", root=tmp_path)


def test_mnist_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load("fashion_mnist", root=tmp_path)
    message = str(err.value)
    for expected in ("FashionMNIST/raw", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "download: true"):
        assert expected in message
    truth = write_mnist(tmp_path)
    path = truth["raw"] / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetNotFoundError, match="cannot read the idx files.*corrupt or truncated"):
        load("mnist", root=tmp_path, verify_checksums=False)


# --------------------------------------------------------------------------------------------
# ImageNette


def test_imagenette(tmp_path):
    write_imagenette(tmp_path)
    ds = load("imagenette", root=tmp_path, verify_checksums=False, num_threads=2)
    assert ds["classes"] == IMAGENETTE_NAMES
    assert ds["x_train"].shape == (20, 3, 160, 160) and ds["x_train"].dtype == torch.uint8
    assert ds["x_test"].shape == (10, 3, 160, 160)
    assert ds["y_train"].tolist() == [c for c in range(10) for _ in range(2)]
    assert ds["y_test"].tolist() == list(range(10))
    for i, (c, k) in enumerate((c, k) for c in range(10) for k in range(2)):
        expected = torch.tensor(colour("train", c, k), dtype=torch.float32).view(3, 1, 1)
        assert (ds["x_train"][i].float() - expected).abs().max() <= 3  # JPEG: approximately
    assert len(ds["mean"]) == 3


def test_imagenette_resize_and_crop(tmp_path):
    """Short side to image_size, then a centre crop: a left/right split image keeps its halves."""
    base = write_imagenette(tmp_path, {"train": [(160, 160)], "val": [(160, 160)]})
    img = Image.new("RGB", (320, 200), (255, 0, 0))
    img.paste((0, 0, 255), (160, 0, 320, 200))
    img.save(base / "val" / IMAGENETTE_WNIDS[0] / "split.JPEG", quality=95)
    ds = load("imagenette", root=tmp_path, verify_checksums=False, image_size=32)
    assert ds["x_train"].shape == (10, 3, 32, 32)
    x = ds["x_test"][ds["y_test"] == 0]
    assert x.shape == (2, 3, 32, 32)
    split = next(im for im in x if im[0].float().std() > 50)  # the red/blue image
    assert split[0, :, :12].float().mean() > 230 and split[2, :, :12].float().mean() < 25  # left: red
    assert split[2, :, -12:].float().mean() > 230 and split[0, :, -12:].float().mean() < 25  # right: blue


def test_imagenette_verified_missing_corrupt(tmp_path):
    base = write_imagenette(tmp_path, {"train": [(160, 160)], "val": [(160, 160)]})
    with pytest.raises(DatasetNotFoundError, match="holds 10 images, the published imagenette 9,469"):
        load("imagenette", root=tmp_path)
    (base / "val" / IMAGENETTE_WNIDS[3] / f"{IMAGENETTE_WNIDS[3]}_0.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetNotFoundError, match=f"cannot decode .*{IMAGENETTE_WNIDS[3]}_0.JPEG"):
        load("imagenette", root=tmp_path, verify_checksums=False)
    with pytest.raises(DatasetNotFoundError) as err:
        load("imagenette", root=tmp_path / "empty")
    message = str(err.value)
    for expected in ("imagenette2-160/train/<wnid>/*.JPEG", "imagenette2-160.tgz", "n01440764", "download: true"):
        assert expected in message


# --------------------------------------------------------------------------------------------
# digits, statistics, registry


def test_digits_split_stratified_and_seeded():
    a, b, c = load("digits", seed=1), load("digits", seed=1), load("digits", seed=2)
    assert torch.equal(a["x_train"], b["x_train"]) and torch.equal(a["y_test"], b["y_test"])
    assert not torch.equal(a["y_train"], c["y_train"]) or not torch.equal(a["x_train"], c["x_train"])
    assert a["x_train"].shape[1:] == (1, 8, 8) and a["max_value"] == 16
    assert len(a["y_train"]) + len(a["y_test"]) == 1797
    counts_train = torch.bincount(a["y_train"], minlength=10).numpy()
    counts_test = torch.bincount(a["y_test"], minlength=10).numpy()
    total = counts_train + counts_test
    np.testing.assert_allclose(counts_test, 0.25 * total, atol=1)  # proportions within one sample


def test_stratified_split_indices():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train, test = stratified_split(labels, 0.2, seed=5)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(labels)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.bincount(labels[test]).tolist() == [2, 4, 6]
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_channel_stats_exact_and_chunked():
    x = torch.from_numpy(RNG.integers(0, 256, size=(300, 3, 40, 40), dtype=np.uint8))  # several chunks
    mean, std = channel_stats(x, 255)
    ref = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    flat = torch.full((4, 1, 2, 2), 7, dtype=torch.uint8)
    assert channel_stats(flat, 16) == ([7 / 16], [1e-3])


def test_registry_and_options():
    assert set(data.list_datasets()) >= {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette"}
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load("svhn")
    with pytest.raises(ValueError, match="has no option verify_checksum; its options: .*verify_checksums"):
        load("cifar10", root="/nonexistent", verify_checksum=False)
    assert issubclass(DatasetNotFoundError, ValueError)
