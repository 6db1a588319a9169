"""MNIST-1D: generated offline and deterministically by the mnist1d package's own generator, its
published split and shapes, the invertible map to the attack box, the config checks and slices of
its options, and a tiny grid end to end."""

from __future__ import annotations

import random
import socket
import urllib.request

import numpy as np
import pytest
import torch
import yaml
from workflow_helpers import REPO_ROOT, run_snakemake

from ncrobust import data
from ncrobust.cell import Cell
from ncrobust.config import ConfigError, load_config_file, validate_config
from ncrobust.data import from_box, load, to_box
from ncrobust.stages import merge, stage_slice

SMALL = {"num_samples": 200}  # 160 train and 40 test sequences: a fraction of a second


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"mnist1d tried the network: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import requests

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)


def test_generated_offline_deterministically_and_without_touching_the_global_rngs(offline):
    np.random.seed(7)
    random.seed(7)
    numpy_next, python_next = np.random.get_state()[1].copy(), random.getstate()
    a, b = load("mnist1d", **SMALL), load("mnist1d", **SMALL)
    for key in ("x_train", "y_train", "x_test", "y_test", "class_counts"):
        assert torch.equal(a[key], b[key]), key
    assert np.array_equal(np.random.get_state()[1], numpy_next) and random.getstate() == python_next
    assert a["x_train"].shape == (160, 1, 1, 40) and a["x_test"].shape == (40, 1, 1, 40)
    assert a["x_train"].dtype == torch.float32 and a["max_value"] == 1
    assert 0.0 <= float(a["x_train"].min()) and float(a["x_train"].max()) <= 1.0
    assert a["units"] == {"box": 8.0, "offset": -8.0, "scale": 16.0}
    other = load("mnist1d", generator_seed=43, **SMALL)
    assert not torch.equal(other["x_train"], a["x_train"])


def test_the_box_map_inverts_and_the_stored_values_are_the_generators():
    u = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(to_box(from_box(u, 8.0), 8.0), u, rtol=0, atol=1e-15)
    x = torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(from_box(to_box(x, 3.0), 3.0), x, rtol=0, atol=1e-14)
    assert to_box(-8.0, 8.0) == 0.0 and to_box(8.0, 8.0) == 1.0 and to_box(0.0, 8.0) == 0.5
    stored = load("mnist1d", **SMALL)
    raw = data._mnist1d_arrays({"num_samples": 200})
    for split, key in (("train", "x"), ("test", "x_test")):
        back = from_box(stored[f"x_{split}"].double().reshape(len(raw[key]), 40), 8.0)
        np.testing.assert_allclose(back.numpy(), raw[key], rtol=0, atol=16 * 2**-24)  # float32 storage, 16 data units per box unit
    assert stored["y_train"].tolist() == raw["y"].tolist() and stored["y_test"].tolist() == raw["y_test"].tolist()


@pytest.mark.slow
def test_the_published_split_and_values():
    """The default options are the package's ``get_dataset_args()``: 4,000 training and 1,000 test
    sequences of length 40, the first 80% of the generated set for training; a few values pinned
    (they match the authors' reference pickle)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = load("mnist1d")
    assert d["x_train"].shape == (4000, 1, 1, 40) and d["x_test"].shape == (1000, 1, 1, 40)
    assert d["classes"] == [str(c) for c in range(10)] and int(d["class_counts"].sum()) == 4000
    reference = make_dataset(get_dataset_args())
    np.testing.assert_allclose(from_box(d["x_train"].double().reshape(4000, 40), 8.0).numpy(), reference["x"], atol=16 * 2**-24)
    np.testing.assert_allclose(from_box(d["x_test"].double().reshape(1000, 40), 8.0).numpy(), reference["x_test"], atol=16 * 2**-24)
    np.testing.assert_allclose(reference["x"][0, :4], [-0.33200566736939013, -0.4719103656557236, -0.778697076293495, -1.0097408265367045], rtol=0, atol=1e-12)
    assert d["y_train"][:5].tolist() == [2, 6, 4, 5, 6] and d["y_test"][-5:].tolist() == [2, 5, 9, 6, 4]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"box": 2.0}, "outside the box \\[-2, 2\\].*set the option box to at least"),
        ({"train_split": 1.0}, "0 < train_split < 1.*published set is num_samples 5000, train_split 0.8"),
        ({"box": 0.0}, "box must be > 0"),
        ({"noise": 1.0}, "has no option noise; its options: .*iid_noise_scale"),
    ],
)
def test_bad_options_are_one_line_naming_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        load("mnist1d", **{**SMALL, **options})


# ------------------------------------------------------------------------------------ config

def _config(**grid):
    config = load_config_file(REPO_ROOT / "config" / "mnist1d.yaml")
    config["grid"].update(grid)
    return config


def test_the_shipped_config_is_valid_and_refuses_a_model_for_square_images():
    validate_config(load_config_file(REPO_ROOT / "config" / "mnist1d.yaml"))
    with pytest.raises(ConfigError, match="grid.model = 'convnet': builds square images, not mnist1d's sequences; use one of cnn1d"):
        validate_config(_config(model=["mlp", "convnet"]))
    bad = _config(model=["cnn1d"])
    bad["models"] = {"cnn1d": {"channels": 0}}
    with pytest.raises(ConfigError, match="models.cnn1d = .*channels must be an integer >= 1, got 0 \\(for 1x1x40 images\\)"):
        validate_config(bad)


def test_a_generation_option_reruns_only_the_data_and_what_reads_it():
    """Changing a generation argument changes the prepare_data slice only: the cells' own slices
    are the same, so Snakemake reruns them only because their data file changed."""
    config = validate_config(_config())
    edited = validate_config(merge(_config(), {"datasets": {"mnist1d": {"options": {"iid_noise_scale": 0.05}}}}))
    assert stage_slice("prepare_data", config, dataset="mnist1d") != stage_slice("prepare_data", edited, dataset="mnist1d")
    cell = Cell("mnist1d", "cnn1d", "ce", "pgd-linf", 1)
    for stage in ("init_model", "train", "evaluate", "robustness"):
        assert stage_slice(stage, config, cell=cell) == stage_slice(stage, edited, cell=cell), stage


# ------------------------------------------------------------------------------------ end to end

TINY = {
    "results": "results",
    "device": "cpu",
    "threads": 1,
    "findings": "mnist1d",
    "grid": {"dataset": ["mnist1d"], "model": ["mlp", "cnn1d"], "loss": ["ce"], "adversary": ["st", "pgd-linf"], "seed": [1]},
    "datasets": {"mnist1d": {"options": {"num_samples": 300}, "norm": "linf",
                             "threat": {"linf": {"eps": 0.00625, "step_size": 0.003125, "steps": 2}}}},
    "models": {"mlp": {"depth": 2, "width": 16}, "cnn1d": {"channels": 4}},
    "training": {"epochs": 2, "checkpoints": [1, 2], "batch_size": 64},
    "evaluation": {"splits": ["train", "test"], "batch_size": 500,
                   "perturbations": {"clean": {}, "pgd": {}, "pgd-targeted": {"eps": 0.03125, "step_size": 0.008, "steps": 3}},
                   "strong": {"attacks": [], "max_samples": 20}},
}


@pytest.mark.workflow
@pytest.mark.slow
def test_a_tiny_mnist1d_grid_end_to_end(tmp_path):
    from ncrobust.findings import Tables, differences

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    run_snakemake(tmp_path, configfile=tmp_path / "config.yaml", timeout=600)
    results = tmp_path / "results"
    tables = Tables.read(results)
    assert set(tables.summary["model"]) == {"mlp", "cnn1d"} and set(tables.summary["dataset"]) == {"mnist1d"}
    layers = set(tables.metrics[tables.metrics["model"] == "cnn1d"]["layer"])
    assert layers == {"conv1", "conv2", "penultimate"}
    prepared = torch.load(results / "data/mnist1d/base.pt", weights_only=True)
    assert prepared["x_train"].shape == (240, 1, 1, 40)
    written = (results / "findings/mnist1d.md").read_text()
    assert "**External check.**" in written and "| `mlp` | 0.680 |" in written and "| `cnn1d` | 0.940 |" in written
    assert "Layerwise `nc1` of `cnn1d`" in written and "`conv1`" in written
    assert differences(written, "mnist1d", tables, "mnist1d.md") == []
