import math

import pytest
import torch

from ncrobust import data as datasets
from ncrobust.cell import Cell
from ncrobust.collapse import LayerStats, class_means, leap, nc_metrics, ncc_predict
from ncrobust.jobs.experiment import build_model
from ncrobust.training.epoch_collapse import EpochFeatures, ncc_accuracy


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


@pytest.mark.parametrize("block", [8192, 7])
def test_training_time_means_and_ncc_are_the_evaluations_numbers(block):
    """The epoch's class means are class_means' and LayerStats' to the bit, and ncc_accuracy with
    them decides as ncc_predict, leap and a LayerStats with that reference, also at near-ties
    (points midway between two clean means, stored in float32 as the training stream is)."""
    h, y = _clustered(seed=3)
    store = EpochFeatures(len(h), h.shape[1], "cpu")
    store.store(0, h)
    means = store.class_means(y, 6)
    clean = LayerStats(6)
    clean.accumulate_means(h, y)
    clean.finish_means()
    assert torch.equal(means, class_means(h, y, 6)[0]) and torch.equal(means, clean.means)
    pairs = torch.combinations(torch.arange(6))
    mids = ((means[pairs[:, 0]] + means[pairs[:, 1]]) / 2).float()
    adv = torch.cat([h + 2.0 * torch.randn(h.shape, generator=torch.Generator().manual_seed(4)), mids])
    adv_y = torch.cat([y, pairs[:, 1]])
    got = ncc_accuracy(adv, adv_y, means, block=block)
    assert got == float((ncc_predict(adv, means) == adv_y).double().mean())
    pert = LayerStats(6, reference=clean)
    pert.accumulate_means(adv, adv_y)
    pert.finish_means()
    pert.accumulate_scatter(adv, adv_y)
    assert got == pert.compute()["ncc_accuracy_clean_means"]
    assert torch.equal(pert.reference_geometry()["leap"], leap(means, adv, adv_y, 6))


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
