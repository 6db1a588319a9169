import math

import pytest
import torch

from ncrobust import data as datasets
from ncrobust.collapse import nc_metrics
from ncrobust.experiment import Cell, build_model
from ncrobust.train_collapse import StreamingCollapse, ncc_accuracy


def _clustered(n=600, d=24, C=6, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    centres = 3.0 * torch.randn(C, d, generator=g)
    h = centres[y] + torch.randn(n, d, generator=g) + offset
    return h, y


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_nc1_equals_nc_metrics(offset):
    """Batches of any size give the dense metrics; a large common offset (post-ReLU features far
    from zero) costs no accuracy thanks to the shift."""
    h, y = _clustered(offset=offset)
    acc = StreamingCollapse(6, h.shape[1], "cpu")
    for s in range(0, len(h), 128):
        acc.add(h[s : s + 128].float(), y[s : s + 128])
    ref = nc_metrics(h.float(), y, num_classes=6)
    got = acc.compute()
    assert got["nc1"] == pytest.approx(ref["nc1"], rel=1e-9)
    assert got["nc1_trace_ratio"] == pytest.approx(ref["nc1_trace_ratio"], rel=1e-9)
    assert ncc_accuracy(h.float(), y, acc.class_means()) == pytest.approx(ref["ncc_accuracy"])


def test_reset_starts_a_new_epoch_and_a_missing_class_gives_nan():
    h, y = _clustered()
    acc = StreamingCollapse(6, h.shape[1], "cpu")
    acc.add(h + 100.0, y)
    acc.reset()
    acc.add(h, y)
    assert acc.compute()["nc1"] == pytest.approx(nc_metrics(h, y, num_classes=6)["nc1"], rel=1e-9)
    partial = StreamingCollapse(6, h.shape[1], "cpu")
    partial.add(h[y < 5], y[y < 5])
    assert math.isnan(partial.compute()["nc1"]) and math.isnan(ncc_accuracy(h, y, partial.class_means()))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        StreamingCollapse(1, 4, "cpu")


def test_ncc_accuracy_with_other_means_classifies_by_the_nearest_one():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    h = torch.tensor([[1.0, 0.0], [9.0, 1.0], [6.0, 0.0]])
    assert ncc_accuracy(h, torch.tensor([0, 1, 0]), means) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="features"):
        ncc_accuracy(h, torch.tensor([0, 1, 0]), means[:, :1])


@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_forward_features_is_the_forward_pass_and_its_penultimate_tap(digits, model):
    net = build_model({"models": {"mlp": {"depth": 2, "width": 16}}}, Cell("digits", model, "ce", "st", 1), digits).eval()
    x = datasets.as_float(digits, "train")[0][:8]
    logits, feats = net.forward_features(x)
    ref_logits, taps = net(x, taps=True)
    assert torch.equal(logits, ref_logits) and torch.equal(feats, taps["penultimate"])
