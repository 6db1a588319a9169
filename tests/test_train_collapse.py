import math

import pytest
import torch

from ncrobust import data as datasets
from ncrobust.collapse import nc_metrics
from ncrobust.experiment import Cell, build_model
from ncrobust.train_collapse import EpochFeatures, ncc_accuracy


def _clustered(n=600, d=24, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    centres = 3.0 * torch.randn(C, d, generator=g)
    h = centres[y] + torch.randn(n, d, generator=g)
    return h, y


def test_epoch_features_give_nc_metrics_of_the_stored_batches_and_the_class_means():
    h, y = _clustered()
    store = EpochFeatures(len(h), h.shape[1], "cpu")
    for s in range(0, len(h), 128):
        store.store(s, h[s : s + 128])
    ref = nc_metrics(h, y, num_classes=6)
    got = store.metrics(y, 6)
    assert got == {k: pytest.approx(ref[k], rel=1e-12) for k in ("nc1", "nc1_trace_ratio", "ncc_accuracy")}
    means = store.class_means(y, 6)
    torch.testing.assert_close(means, torch.stack([h[y == c].double().mean(0) for c in range(6)]))
    assert ncc_accuracy(h, y, means) == pytest.approx(ref["ncc_accuracy"])


def test_a_missing_class_or_a_diverged_stream_gives_nan_not_an_error():
    h, y = _clustered()
    store = EpochFeatures(len(h), h.shape[1], "cpu")
    store.store(0, h)
    assert all(math.isnan(v) for v in store.metrics(torch.where(y == 5, 0, y), 6).values())
    assert math.isnan(ncc_accuracy(h, y, store.class_means(torch.where(y == 5, 0, y), 6)))
    store.store(0, h[:1] * math.inf)
    assert all(math.isnan(v) for v in store.metrics(y, 6).values())
    with pytest.raises(ValueError, match="n >= 1"):
        EpochFeatures(0, 4, "cpu")


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
