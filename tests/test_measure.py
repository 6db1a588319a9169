"""Measuring a network trained elsewhere: the module adapter, weights files read without running
code, and :func:`ncrobust.measure.measure` against the library's direct computation on the same
features. The command line (``ncrobust measure``) is tested in tests/test_cli.py."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from workflow_helpers import fit_full_batch

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.collapse import class_means, nc_metrics, ncc_predict
from ncrobust.evaluation.checkpoint import EvaluationPlan, attack_set
from ncrobust.measure import measure, subset, summary_lines
from ncrobust.models import create_model
from ncrobust.models.adapter import AdapterError, TappedModule, as_tapped, check_classifier
from ncrobust.models.external import NetworkError, NetworkSpec, load_network, read_file, state_dict_of

THREAT = ThreatModel(norm="linf", eps=0.1, step_size=0.025, steps=3)


class SmallNet(nn.Module):
    """A plain classifier with no knowledge of this project: a body and a head called ``fc``."""

    def __init__(self, num_classes: int = 10, softmax: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.Tanh())
        self.fc = nn.Linear(32, num_classes)
        self.softmax = softmax

    def forward(self, x):
        logits = self.fc(self.body(x))
        return logits.softmax(1) if self.softmax else logits


@pytest.fixture(scope="module")
def digits():
    return subset(datasets.load("digits", test_fraction=0.25, seed=0), 300)


@pytest.fixture(scope="module")
def trained(digits):
    """A SmallNet fitted on the digits subset (collapsed enough for the metrics to mean something)."""
    torch.manual_seed(0)
    x, y = datasets.as_float(digits, "train")
    return fit_full_batch(SmallNet(), x, y, lr=0.1, steps=60)


def test_the_adapter_taps_named_modules_and_the_classifier_input(trained, digits):
    model = TappedModule(trained, taps=["body.2", "body.4"])
    x, _ = datasets.as_float(digits, "test")
    logits, taps = model(x[:20], taps=True)
    assert model.tap_names == ["body.2", "body.4", "penultimate"] and list(taps) == model.tap_names
    assert model.classifier is trained.fc
    h = trained.body[:3](x[:20])
    torch.testing.assert_close(taps["body.2"], h, rtol=0, atol=0)
    torch.testing.assert_close(taps["penultimate"], trained.body(x[:20]), rtol=0, atol=0)
    torch.testing.assert_close(logits, trained(x[:20]), rtol=0, atol=0)
    torch.testing.assert_close(model(x[:20]), trained(x[:20]), rtol=0, atol=0)  # no taps: the module's own pass


def test_the_adapter_keeps_gradients_for_the_attacks(trained, digits):
    model = TappedModule(trained)
    x, y = datasets.as_float(digits, "test")
    x = x[:8].clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), y[:8]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_adapter_normalises_inside_the_model(trained, digits):
    model = TappedModule(trained, mean=(0.5,), std=(0.25,))
    x, _ = datasets.as_float(digits, "test")
    torch.testing.assert_close(model(x[:5]), trained((x[:5] - 0.5) / 0.25), rtol=0, atol=0)


def test_registry_models_keep_their_native_taps():
    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,), depth=2, width=16)
    assert as_tapped(model) is model
    with pytest.raises(AdapterError, match="not a tap of this model"):
        as_tapped(model, taps=["nope"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"taps": ["body.9"]}, "no such module"),
        ({"classifier": "body"}, "not an nn.Linear"),
        ({"classifier": "head"}, "no such module"),
        ({"taps": ["penultimate"]}, "always the classifier's input"),
    ],
)
def test_the_adapter_refuses_what_it_cannot_measure_in_one_line(kwargs, message):
    with pytest.raises(AdapterError, match=message) as err:
        TappedModule(SmallNet(), **kwargs)
    assert "\n" not in str(err.value)


def test_a_module_without_a_linear_layer_is_refused():
    with pytest.raises(AdapterError, match="no nn.Linear"):
        TappedModule(nn.Sequential(nn.Flatten()))


@pytest.mark.parametrize(
    ("network", "num_classes", "x", "message"),
    [
        (SmallNet(num_classes=5), 10, None, r"not \[N, 10\] logits"),
        (SmallNet(softmax=True), 10, None, "something follows the last nn.Linear"),
        (SmallNet(), 10, "outside", r"images in \[0, 1\]"),
    ],
)
def test_check_classifier_names_what_is_wrong(network, num_classes, x, message, digits):
    inputs, _ = datasets.as_float(digits, "test")
    inputs = inputs[:8] * (4 if x == "outside" else 1) - (1 if x == "outside" else 0)
    with pytest.raises(AdapterError, match=message) as err:
        check_classifier(TappedModule(network), inputs, num_classes)
    assert "\n" not in str(err.value)


def test_measure_equals_the_direct_computation_on_the_same_features(trained, digits):
    """The table of :func:`measure` on a plain module against ``nc_metrics`` of the features the
    module computes, clean and under PGD (the attacked inputs remade with the same seeded stream)."""
    model = TappedModule(trained)
    results = measure(model, digits, threat=THREAT, perturbations={"clean": {}, "pgd": {}}, splits=("test",), seed=3)
    x, y = datasets.as_float(digits, "test")
    plan = EvaluationPlan(threats=(THREAT,), perturbations={"clean": {}, "pgd": {}}, splits=("test",), batch_size=500,
                          projection_points=0)
    x_pgd = attack_set("pgd", model, x, y, plan, THREAT, num_classes=10, seed=3, epoch=0, split="test", device="cpu")
    W = trained.fc.weight.detach()
    clean_features = trained.body(x).detach()
    means, _ = class_means(clean_features, y, 10)
    for name, inputs in (("clean", x), ("pgd", x_pgd)):
        features = trained.body(inputs).detach()
        direct = nc_metrics(features, y, num_classes=10, weight=W, logits=trained.fc(features).detach())
        direct["ncc_accuracy_clean_means"] = float((ncc_predict(features, means) == y).double().mean())
        rows = results[(results["perturbation"] == name) & (results["layer"] == "penultimate") & results["class"].isna()
                       & results["row"].isna()].set_index("metric")["value"]
        for metric in ("nc1", "nc2_equinorm_M", "nc2_equiangle_M", "nc2_equinorm_W", "nc3", "nc4", "accuracy",
                       "ncc_accuracy", "ncc_accuracy_clean_means"):
            assert rows[metric] == pytest.approx(direct[metric], rel=1e-9, abs=1e-12), (name, metric)
    lines = summary_lines(results)
    assert lines[0].split()[:3] == ["split", "perturbation", "acc"] and len(lines) == 3
    assert lines[1].split()[:2] == ["test", "clean"] and lines[1].split()[-1] == "-"  # no leap rate without an attack


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on the refused pickle
def test_weights_are_read_without_running_code(tmp_path):
    """A pickle that would run code on loading (``__reduce__``) is refused, and nothing runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(NetworkError, match="refused.*--trust") as err:
        read_file(path)
    assert "\n" not in str(err.value) and not marker.exists()
    raw = tmp_path / "raw.pkl"  # a plain pickle (not a torch file) with the same payload
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(NetworkError):
        read_file(raw)
    assert not marker.exists()


def test_state_dicts_are_found_where_training_scripts_put_them():
    sd = {"module.fc.weight": torch.zeros(2, 2), "module.fc.bias": torch.zeros(2)}
    for wrapped in (sd, {"state_dict": sd, "epoch": 3}, {"model_state_dict": sd}, {"net": sd}):
        assert list(state_dict_of(wrapped)) == ["fc.weight", "fc.bias"]
    with pytest.raises(NetworkError, match="no state dict found"):
        state_dict_of({"optimizer": {"lr": 0.1}})


def test_a_state_dict_that_does_not_fit_names_its_first_keys(tmp_path):
    path = tmp_path / "net.pt"
    sd = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,), depth=2, width=16).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["classifier.bias"]
    torch.save(sd, path)
    spec = NetworkSpec(str(path), architecture="mlp", options={"depth": 2, "width": 16})
    with pytest.raises(NetworkError, match="missing 'classifier.bias'.*unexpected 'extra.weight'") as err:
        load_network(spec, num_classes=10, in_chans=1, image_size=8)
    assert "\n" not in str(err.value)
    with pytest.raises(NetworkError, match=r"is \(16, 64\) in the file, \(32, 64\) in the model"):
        torch.save({k: v for k, v in sd.items() if k != "extra.weight"} | {"classifier.bias": torch.zeros(10)}, path)
        load_network(NetworkSpec(str(path), architecture="mlp", options={"depth": 2, "width": 32}),
                     num_classes=10, in_chans=1, image_size=8)


def test_a_project_checkpoint_names_its_own_architecture(tmp_path):
    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.3,), std=(0.2,), depth=2, width=16)
    path = tmp_path / "epoch4.pt"
    torch.save({"model": model.state_dict(), "epoch": 4, "cell": {"model": "mlp"}}, path)
    loaded, epoch = load_network(NetworkSpec(str(path), options={"depth": 2, "width": 16}), num_classes=10, in_chans=1,
                                 image_size=8)
    assert epoch == 4 and loaded.tap_names == model.tap_names
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)  # its normalisation came with it


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(architecture="nope"), "unknown architecture 'nope'"),
        (dict(architecture="timm:resnet18"), "timm"),
        (dict(architecture="no_such_module_xyz:Net"), "cannot import no_such_module_xyz"),
        (dict(architecture="mlp", format="weird"), "unknown format 'weird'"),
        (dict(architecture="mlp", mean=(0.5,)), "both mean and std"),
    ],
)
def test_bad_specs_are_one_line(tmp_path, spec, message):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, path)
    try:
        import timm  # noqa: F401

        if "timm" in spec["architecture"]:
            pytest.skip("timm is installed here")
    except ImportError:
        pass
    with pytest.raises(NetworkError, match=message) as err:
        load_network(NetworkSpec(str(path), **spec), num_classes=10, in_chans=1, image_size=8)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(NetworkError, match="no such file"):
        read_file(tmp_path / "absent.pt")


def test_torchvision_models_by_name(tmp_path):
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    model, _ = load_network(NetworkSpec(str(path), architecture="torchvision:resnet18", taps=("layer4",)), num_classes=10,
                            in_chans=3, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    logits, taps = model(x, taps=True)
    assert model.classifier is model.module.fc and list(taps) == ["layer4", "penultimate"]
    assert taps["penultimate"].shape == (2, 512)
    torch.testing.assert_close(logits, net.eval()(x), rtol=0, atol=0)


def test_measure_reads_a_checkpoint_once(tmp_path, monkeypatch):
    """Without --arch the command takes the architecture from the checkpoint and hands the contents it
    read to the loader: a large checkpoint is read from disk once, not twice."""
    from ncrobust import cli
    from ncrobust.models import external

    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.3,), std=(0.2,), depth=2, width=16)
    path = tmp_path / "epoch3.pt"
    torch.save({"model": model.state_dict(), "epoch": 3, "cell": {"model": "mlp"}}, path)
    reads = []
    monkeypatch.setattr(external, "read_file", lambda p, **kw: reads.append(p) or read_file(p, **kw))
    out = tmp_path / "m.parquet"
    assert cli.main([
        "measure", str(path), "--dataset", "digits", "--option", "depth=2", "--option", "width=16",
        "--max-samples", "40", "--perturbations", "gaussian", "--penultimate-only", "--out", str(out),
    ]) == 0
    assert reads == [str(path)] and out.exists()
