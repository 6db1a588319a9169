"""The evaluation core (ncrobust.evaluation.checkpoint), the strong evaluation and the tables, on a small MLP
over digits: fast unit tests of the wiring against the dense functions of ncrobust.collapse
(themselves pinned to float64 loop references in test_collapse.py)."""

from __future__ import annotations

import collections
import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from host_syncs import HostSyncs
from workflow_helpers import fit_full_batch

from ncrobust import tables
from ncrobust.attacks import ThreatModel, perturb, target_labels
from ncrobust.cell import Cell
from ncrobust.collapse import LayerStats, accumulate, blocks, nc_metrics, perturbation_metrics
from ncrobust.columns import CELL_COLUMNS, RESULT_COLUMNS
from ncrobust.data import as_float
from ncrobust.evaluation import checkpoint as evaluation
from ncrobust.evaluation.checkpoint import EvaluationPlan, evaluate_checkpoint, penultimate_metrics
from ncrobust.evaluation.robustness import strong_evaluation
from ncrobust.losses import get_loss
from ncrobust.models import create_model
from ncrobust.seeding import generator

LINF = ThreatModel("linf", 0.1, 0.025, 3)
L2 = ThreatModel("l2", 1.0, 0.25, 3)
SEED, EPOCH = 3, 7


@pytest.fixture(scope="module")
def small():
    """A briefly trained 2-layer MLP on the first 300 train / 200 test digits."""
    from ncrobust import data as datasets

    d = datasets.load("digits", seed=0)
    d = {**d, "x_train": d["x_train"][:300], "y_train": d["y_train"][:300], "x_test": d["x_test"][:200], "y_test": d["y_test"][:200]}
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=d["mean"], std=d["std"], depth=2, width=32)
    return fit_full_batch(model, *as_float(d, "train"), lr=0.1, steps=60), d


def plan(**kw) -> EvaluationPlan:
    base = dict(threats=(LINF,), perturbations={"clean": {}, "pgd": {}, "pgd-targeted": {}}, splits=("train",),
                batch_size=64, projection_points=20)
    return EvaluationPlan(**{**base, **kw})


def rows(frame, perturbation, layer="penultimate", norm="linf", split="train"):
    f = frame[(frame.perturbation == perturbation) & (frame.layer == layer) & (frame.norm == norm) & (frame.split == split)]
    return f


def scalar(frame, perturbation, metric, layer="penultimate", **kw):
    f = rows(frame, perturbation, layer, **kw)
    f = f[(f.metric == metric) & f["class"].isna() & f["row"].isna()]
    assert len(f) == 1, (perturbation, metric, layer, len(f))
    return float(f["value"].iloc[0])


def dense_features(model, x):
    with torch.no_grad():
        logits, taps = model(x, taps=True)
    return logits, taps


def attacked(model, d, name, split="train", threat=LINF, suffix=()):
    x, y = as_float(d, split)
    gen = generator(SEED, "evaluate", EPOCH, split, name, *suffix)
    return perturb(name, model, x, y, threat=threat, num_classes=10, generator=gen, batch_size=64), y


def test_streamed_metrics_equal_the_dense_functions(small):
    model, d = small
    result = evaluate_checkpoint(model, d, plan(), seed=SEED, epoch=EPOCH)
    m = result.metrics
    assert list(m.columns) == RESULT_COLUMNS
    x, y = as_float(d, "train")
    logits, taps = dense_features(model, x)
    W = model.classifier.weight.detach()
    dense = nc_metrics(taps["penultimate"], y, num_classes=10, weight=W, logits=logits)
    for key, value in dense.items():
        assert scalar(m, "clean", key) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert scalar(m, "clean", "ncc_accuracy_clean_means") == scalar(m, "clean", "ncc_accuracy")
    # a tap: the within-class metrics of its flattened activations
    tap = nc_metrics(taps["layer1"].flatten(1), y, num_classes=10)
    for key in ("nc1", "nc1_trace_ratio", "cdnv", "ncc_accuracy"):
        assert scalar(m, "clean", key, layer="layer1") == pytest.approx(tap[key], rel=1e-9), key
    # the perturbed set: its own collapse, and its geometry against the clean means
    x_p, _ = attacked(model, d, "pgd")
    p_logits, p_taps = dense_features(model, x_p)
    own = nc_metrics(p_taps["penultimate"], y, num_classes=10, weight=W, logits=p_logits)
    geo = perturbation_metrics(taps["penultimate"], y, p_taps["penultimate"], y, num_classes=10, logits=p_logits)
    for key, value in {**own, **{k: v for k, v in geo.items() if not isinstance(v, torch.Tensor)}}.items():
        assert scalar(m, "pgd", key) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    leap = rows(m, "pgd").query("metric == 'leap'")
    L = np.zeros((10, 10))
    L[leap["row"].to_numpy(int), leap["col"].to_numpy(int)] = leap["value"]
    np.testing.assert_allclose(L, geo["leap"].numpy(), rtol=0, atol=1e-15)
    angles = rows(m, "pgd").query("metric == 'alignment_angle_per_class'").sort_values("class")["value"]
    np.testing.assert_allclose(angles, geo["alignment_angle_per_class"].numpy(), rtol=1e-9)
    assert scalar(m, "pgd", "accuracy_true_labels") == pytest.approx(float((p_logits.argmax(1) == y).double().mean()))
    # the clean means of layer1 are the reference of its perturbed set too
    ref = LayerStats(10)
    ref.accumulate_means(taps["layer1"], y)
    ref.finish_means()
    pert1 = LayerStats(10, reference=ref)
    pert1.accumulate_means(p_taps["layer1"], y)
    pert1.finish_means()
    pert1.accumulate_scatter(p_taps["layer1"], y)
    assert scalar(m, "pgd", "ncc_accuracy_clean_means", layer="layer1") == pytest.approx(pert1.compute()["ncc_accuracy_clean_means"])
    # the displacement of the means from the clean ones, at every layer of a perturbed set only
    for key, value in pert1.mean_displacement().items():
        if isinstance(value, torch.Tensor):
            got = rows(m, "pgd", layer="layer1").query("metric == @key").sort_values("class")["value"]
            np.testing.assert_allclose(got, value.numpy(), rtol=1e-9)
        else:
            assert scalar(m, "pgd", key, layer="layer1") == pytest.approx(value, rel=1e-9), key
    assert not m[m.perturbation == "clean"].metric.isin(["class_mean_distance", "global_mean_angle"]).any()


def test_targeted_sets_are_grouped_by_target_at_every_layer(small):
    """One meaning per column: pgd-targeted groups by target for NC, alignment, leap and NCC with
    clean means alike (Su et al.: the angle between clean mean c and the mean of the samples sent to c)."""
    model, d = small
    m = evaluate_checkpoint(model, d, plan(), seed=SEED, epoch=EPOCH).metrics
    x, y = as_float(d, "train")
    _, taps = dense_features(model, x)
    x_t, _ = attacked(model, d, "pgd-targeted")
    t_logits, t_taps = dense_features(model, x_t)
    targets = target_labels(y, 10)
    geo = perturbation_metrics(taps["penultimate"], y, t_taps["penultimate"], targets, num_classes=10, logits=t_logits)
    for key in ("alignment_angle", "ncc_accuracy_clean_means", "leap_rate", "leap_to_prediction", "mean_shift"):
        assert scalar(m, "pgd-targeted", key) == pytest.approx(geo[key], rel=1e-9, abs=1e-12), key
    by_labels = perturbation_metrics(taps["penultimate"], y, t_taps["penultimate"], y, num_classes=10)
    assert abs(scalar(m, "pgd-targeted", "alignment_angle") - by_labels["alignment_angle"]) > 1.0  # the readings differ
    assert scalar(m, "pgd-targeted", "nc1") == pytest.approx(nc_metrics(t_taps["penultimate"], targets, num_classes=10)["nc1"], rel=1e-9)
    assert scalar(m, "pgd-targeted", "nc1", layer="layer1") == pytest.approx(
        nc_metrics(t_taps["layer1"], targets, num_classes=10)["nc1"], rel=1e-9)
    pred = t_logits.argmax(1)
    assert scalar(m, "pgd-targeted", "target_hit_rate") == pytest.approx(float((pred == targets).double().mean()))
    assert scalar(m, "pgd-targeted", "accuracy_true_labels") == pytest.approx(float((pred == y).double().mean()))


def test_target_hit_rates_are_hand_counts_and_only_targeted_sets_have_them(small):
    """``target_hit_rate`` (network argmax = target) and, per layer, ``target_hit_rate_ncc`` (nearest
    clean class mean = target), counted here by hand: class means by a loop over classes, nearest
    mean by ``torch.cdist``. Sets without targets (clean, pgd) get neither row; the kept features
    give the same penultimate rows."""
    model, d = small
    strong = {"eps": 0.3, "step_size": 0.1}  # the overrides of the cell's threat model reach the attack; some hits, some misses
    perturbations = {"clean": {}, "pgd": {}, "pgd-targeted": strong}
    result = evaluate_checkpoint(model, d, plan(splits=("train", "test"), keep_features=True, perturbations=perturbations),
                                 seed=SEED, epoch=EPOCH)
    m = result.metrics
    for split in ("train", "test"):
        x, y = as_float(d, split)
        _, taps = dense_features(model, x)
        x_t, _ = attacked(model, d, "pgd-targeted", split=split, threat=ThreatModel("linf", 0.3, 0.1, LINF.steps))
        t_logits, t_taps = dense_features(model, x_t)
        targets = (y + 1) % 10
        hits = sum(int(p == t) for p, t in zip(t_logits.argmax(1).tolist(), targets.tolist()))
        assert scalar(m, "pgd-targeted", "target_hit_rate", split=split) == pytest.approx(hits / len(y), abs=1e-12)
        for layer in ("layer1", "penultimate"):
            H, Ht = taps[layer].double().flatten(1), t_taps[layer].double().flatten(1)
            means = torch.stack([H[y == c].mean(0) for c in range(10)])
            nearest = torch.cdist(Ht, means).argmin(1)
            ncc_hits = sum(int(k == t) for k, t in zip(nearest.tolist(), targets.tolist()))
            assert scalar(m, "pgd-targeted", "target_hit_rate_ncc", layer=layer, split=split) == pytest.approx(ncc_hits / len(y), abs=1e-12)
    for metric in ("target_hit_rate", "target_hit_rate_ncc"):
        assert 0.1 < scalar(m, "pgd-targeted", metric) < 0.9, metric  # counts that are not trivially 0 or 1
    untargeted = m[m.perturbation.isin(["clean", "pgd"])]
    assert not untargeted.metric.isin(["target_hit_rate", "target_hit_rate_ncc"]).any()
    assert set(m[m.metric == "target_hit_rate"].layer) == {"penultimate"}
    assert set(m[m.metric == "target_hit_rate_ncc"].layer) == set(m.layer)
    recomputed = penultimate_metrics(result.features)
    for metric in ("target_hit_rate", "target_hit_rate_ncc"):
        for split in ("train", "test"):
            assert scalar(recomputed, "pgd-targeted", metric, split=split) == scalar(m, "pgd-targeted", metric, split=split)
    assert not recomputed[recomputed.perturbation != "pgd-targeted"].metric.isin(["target_hit_rate", "target_hit_rate_ncc"]).any()


def test_feature_dtype_changes_only_the_kept_file(small):
    model, d = small
    full = evaluate_checkpoint(model, d, plan(keep_features=True), seed=SEED, epoch=EPOCH)
    half = evaluate_checkpoint(model, d, plan(keep_features=True, feature_dtype="float16"), seed=SEED, epoch=EPOCH)
    pd.testing.assert_frame_equal(full.metrics, half.metrics)
    assert half.features["sets"]["train/linf/pgd"]["features"].dtype == torch.float16
    assert full.features["sets"]["train/linf/pgd"]["features"].dtype == torch.float32
    recomputed = penultimate_metrics(full.features)
    written = full.metrics[full.metrics.layer == "penultimate"].reset_index(drop=True)
    np.testing.assert_allclose(recomputed["value"], written["value"], rtol=1e-12, atol=1e-15)


def test_attack_dtype_changes_the_attacks_only_and_the_metrics_stay_fp32(small):
    """``evaluation.attack_precision: bf16`` autocasts the attacks' passes; the clean and random-noise
    sets (no attack) are measured identically, and every metric is still a float32 forward pass."""
    model, d = small
    fp32 = evaluate_checkpoint(model, d, plan(), seed=SEED, epoch=EPOCH).metrics
    bf16 = evaluate_checkpoint(model, d, plan(attack_dtype=torch.bfloat16), seed=SEED, epoch=EPOCH).metrics
    attacked = fp32.perturbation.isin(["pgd", "pgd-targeted", "trades-kl"])
    pd.testing.assert_frame_equal(fp32[~attacked], bf16[~attacked])
    assert attacked.any() and not np.allclose(fp32[attacked].value, bf16[attacked].value, equal_nan=True)
    one = evaluate_checkpoint(model, d, plan(attack_dtype=torch.bfloat16), seed=SEED, epoch=EPOCH).metrics
    pd.testing.assert_frame_equal(bf16, one)  # seeded: the bf16 attack is as reproducible as the fp32 one


def test_an_st_cell_is_also_measured_under_the_other_norm(small):
    model, d = small
    one = evaluate_checkpoint(model, d, plan(), seed=SEED, epoch=EPOCH).metrics
    two = evaluate_checkpoint(model, d, plan(threats=(LINF, L2)), seed=SEED, epoch=EPOCH).metrics
    assert set(two[two.perturbation == "clean"]["norm"]) == {"linf"}  # clean is measured once
    assert set(two[two.perturbation == "pgd"]["norm"]) == {"linf", "l2"}
    pd.testing.assert_frame_equal(two[two.norm == "linf"].reset_index(drop=True), one)  # own-norm rows unchanged
    x_l2, y = attacked(model, d, "pgd", threat=L2, suffix=("l2",))
    delta = (x_l2 - as_float(d, "train")[0]).flatten(1)
    assert float(torch.linalg.vector_norm(delta, dim=1).max()) <= 1.0 + 1e-5
    p_logits, _ = dense_features(model, x_l2)
    assert scalar(two, "pgd", "accuracy", norm="l2") == pytest.approx(float((p_logits.argmax(1) == y).double().mean()))


def test_projection_pairs_the_same_samples_in_every_set(small):
    model, d = small
    p = evaluate_checkpoint(model, d, plan(projection_points=25), seed=SEED, epoch=EPOCH).projection
    samples = p[p.kind == "sample"]
    assert (samples.groupby("perturbation").size() == 25).all()
    labels = samples.groupby("perturbation")["label"].apply(list)
    assert labels["clean"] == labels["pgd"] == labels["pgd-targeted"]
    means = p[(p.kind == "mean") & (p.perturbation == "clean")]
    assert sorted(means["label"]) == list(range(10))


def test_batch_updates_never_read_back_to_the_host():
    """The per-batch accumulation (accumulate_means_unchecked, accumulate_scatter_unchecked) makes
    no call that would synchronise with a GPU: no read-back (item, bool, tolist, ...) and no
    torch.bincount, which sizes its output from the input's maximum (it was in three of these
    updates)."""
    g = torch.Generator().manual_seed(0)
    H = torch.randn(200, 16, generator=g)
    y = torch.arange(200) % 5
    pred = torch.randint(0, 5, (200,), generator=g)
    clean = LayerStats(5)
    clean.accumulate_means(H, y)
    clean.finish_means()
    stats = LayerStats(5, reference=clean)
    with HostSyncs() as syncs:
        for s in range(0, 200, 50):
            stats.accumulate_means_unchecked(H[s : s + 50], y[s : s + 50])
    assert syncs.calls == []
    stats.finish_means()
    with HostSyncs() as syncs:
        for s in range(0, 200, 50):
            stats.accumulate_scatter_unchecked(H[s : s + 50], y[s : s + 50], pred[s : s + 50])
    assert syncs.calls == []
    dense = nc_metrics(H, y)
    assert stats.compute()["ncc_accuracy"] == pytest.approx(dense["ncc_accuracy"])
    assert stats.compute()["nc1"] == pytest.approx(dense["nc1"], rel=1e-12)
    assert stats.counts.tolist() == [40] * 5
    assert int(stats._confusion.sum()) == 200 and int(stats._seen.sum()) == 200


def test_evaluation_synchronises_per_set_not_per_batch(small):
    """Every perturbation, every layer: splitting the same samples into 4x more batches adds no
    call that would synchronise with a GPU (validation and metrics read back once per pass)."""
    model, d = small
    perturbations = {"clean": {}, "pgd": {}, "pgd-targeted": {}, "gaussian": {}, "sign": {}, "trades-kl": {}}
    counts = []
    for batch_size in (300, 75):
        with HostSyncs() as syncs:
            evaluate_checkpoint(model, d, plan(perturbations=perturbations, batch_size=batch_size), seed=SEED, epoch=EPOCH)
        counts.append(collections.Counter(syncs.calls))
    assert counts[0] == counts[1]


def _streamed_statistics(device: str) -> dict:
    """A clean set and a noisy copy of it (with the clean one as reference), streamed through
    LayerStats on ``device`` in batches of 100: every pass-2 sum and count."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 6
    H = (torch.randn(600, 48, generator=g) + 3 * torch.eye(6, 48)[y]).to(device)
    pred = torch.randint(0, 6, (600,), generator=g).to(device)
    y = y.to(device)

    def stream(features, reference=None):
        stats = LayerStats(6, reference=reference)
        for s in range(0, 600, 100):
            stats.accumulate_means_unchecked(features[s : s + 100], y[s : s + 100])
        stats.finish_means()
        for s in range(0, 600, 100):
            stats.accumulate_scatter_unchecked(features[s : s + 100], y[s : s + 100], pred[s : s + 100])
        return stats

    clean = stream(H)
    noisy = stream(H + 0.5 * torch.randn(600, 48, generator=g).to(device), clean)
    out = {f"noisy {k}": v for k, v in {**noisy.compute(), **noisy.prediction_metrics()}.items()}
    return out | clean.compute() | {"leap": noisy.reference_geometry()["leap"].cpu(), "means": noisy.means.cpu()}


def test_the_gpus_one_hot_class_sums_give_the_same_statistics_on_the_cpu(monkeypatch):
    index_add = _streamed_statistics("cpu")
    monkeypatch.setattr(accumulate, "_sums_by_matmul", lambda device: True)
    one_hot = _streamed_statistics("cpu")
    for key in index_add:
        np.testing.assert_allclose(np.asarray(one_hot[key]), np.asarray(index_add[key]), rtol=1e-12, err_msg=key)


@pytest.mark.gpu
def test_gpu_statistics_equal_the_cpu_ones_and_evaluation_synchronises_per_set(small):
    """On a GPU (class sums by one-hot matmul, counts without bincount): the same features give the
    CPU's statistics up to float64 rounding, and 4x more batches add no synchronisation that CUDA's
    own sync debug mode sees in a whole evaluation."""
    cpu, gpu = _streamed_statistics("cpu"), _streamed_statistics("cuda")
    for key in cpu:
        np.testing.assert_allclose(np.asarray(gpu[key]), np.asarray(cpu[key]), rtol=1e-10, err_msg=key)
    assert evaluation.activation_cache_bytes("cuda") > 1 << 30  # pass 2 reuses the activations
    model, d = small
    perturbations = {"clean": {}, "pgd": {}, "pgd-targeted": {}, "gaussian": {}, "sign": {}, "trades-kl": {}}
    counts = []
    for batch_size in (300, 75):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                evaluate_checkpoint(copy.deepcopy(model), d, plan(perturbations=perturbations, batch_size=batch_size),
                                    seed=SEED, epoch=EPOCH, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1] > 0


def test_kept_activations_spare_the_second_forward_pass_and_change_nothing(small, monkeypatch):
    """Pass 2 reuses pass 1's activations within the memory budget and computes the rest again:
    the metrics are the same to the bit with no budget, a part of a set or all of it."""
    model, d = small
    forwards = collections.Counter()
    model_forward = evaluation._model_forward

    def counted(model, x, layers, index=None):
        forward = model_forward(model, x, layers, index)

        def run(sl):
            forwards[len(x)] += 1
            return forward(sl)

        return run

    monkeypatch.setattr(evaluation, "_model_forward", counted)
    x, _ = as_float(d, "train")
    with torch.no_grad():
        _, taps = model(x, taps=True)
    set_bytes = sum(t.float().numel() * 4 for t in taps.values())  # every layer of the 300 train samples
    batches = -(-300 // 64)
    frames, per_set = [], []
    for budget in (0, set_bytes // 2, set_bytes):
        monkeypatch.setattr(evaluation, "activation_cache_bytes", lambda device: budget)
        forwards.clear()
        frames.append(evaluate_checkpoint(model, d, plan(perturbations={"clean": {}, "gaussian": {}}), seed=SEED, epoch=EPOCH).metrics)
        per_set.append(forwards[300] // 2)  # clean and gaussian: two sets of the train split
    none, part, whole = per_set
    assert none == 2 * batches and batches < part < 2 * batches and whole == batches
    for frame in frames[1:]:
        pd.testing.assert_frame_equal(frame, frames[0], check_exact=True)


def test_non_finite_features_are_reported_at_the_end_of_a_pass():
    stats = LayerStats(3)
    H = torch.randn(9, 4)
    H[4, 1] = float("nan")
    stats.accumulate_means_unchecked(H, torch.arange(9) % 3)
    with pytest.raises(ValueError, match="non-finite"):
        stats.finish_means()


@pytest.mark.parametrize("kwargs,message", [
    ({"threats": ()}, "threats must be a non-empty sequence"),
    ({"threats": (LINF, LINF)}, r"distinct norms, got \['linf', 'linf'\]"),
    ({"perturbations": {"clean": {}, "fgsm": {}}}, r"unknown perturbations \['fgsm'\]"),
    ({"splits": ("val",)}, "splits must be a non-empty subset of train, test"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"projection_points": -1}, "projection_points must be an integer >= 0"),
    ({"feature_dtype": "int8"}, "feature_dtype 'int8'; allowed: float32, float16, bfloat16"),
    ({"attack_dtype": torch.float64}, r"attack_dtype torch.float64; allowed: None \(fp32\), torch.bfloat16$"),
    ({"attack_dtype": torch.float16}, r"attack_dtype torch.float16; allowed: None \(fp32\), torch.bfloat16$"),
])
def test_plan_is_validated_once_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


def test_strong_evaluation_reports_every_attack_on_the_same_samples_with_one_loss(small):
    model, d = small
    x, y = as_float(d, "test")
    mse = get_loss("mse")
    rows_ = strong_evaluation(model, x, y, threat=LINF, num_classes=10, attacks=["pgd-strong"], seed=1, batch_size=64,
                              loss=mse, loss_name="mse")
    by = {r["attack"]: r for r in rows_}
    assert list(by) == ["clean", "pgd", "pgd-strong", "worst"]
    assert {r["samples"] for r in rows_} == {200}
    assert by["pgd"]["attack_loss"] == by["pgd-strong"]["attack_loss"] == "mse" and by["clean"]["attack_loss"] == ""
    assert by["worst"]["robust_accuracy"] <= min(by["pgd-strong"]["robust_accuracy"], by["clean"]["robust_accuracy"])
    # PGD-10 ascends the cell's loss: the same as the evaluation's pgd with that loss and stream
    x_p = perturb("pgd", model, x, y, threat=LINF, num_classes=10, batch_size=64, loss=mse, generator=generator(1, "strong", "pgd"))
    with torch.no_grad():
        assert by["pgd"]["robust_accuracy"] == pytest.approx(float((model(x_p).argmax(1) == y).double().mean()))


def test_strong_evaluation_takes_the_evaluations_pgd_inputs(small):
    """Given the evaluation's PGD-10 examples (``attack_set``, as the workflow passes them), the
    strong evaluation's ``pgd`` row and its ``worst`` count those inputs, not a second attack; inputs
    of another shape are refused."""
    from ncrobust.evaluation.checkpoint import attack_set

    model, d = small
    x, y = as_float(d, "test")
    ev_plan = plan(perturbations={"clean": {}, "pgd": {}}, splits=("test",), batch_size=64)
    x_pgd = attack_set("pgd", model, x, y, ev_plan, LINF, num_classes=10, seed=1, epoch=3, split="test", device="cpu")
    rows_ = strong_evaluation(model, x, y, threat=LINF, num_classes=10, attacks=[], seed=1, batch_size=64, pgd_inputs=x_pgd)
    with torch.no_grad():
        expected = float((model(x_pgd).argmax(1) == y).double().mean())
    assert {r["attack"]: r["robust_accuracy"] for r in rows_}["pgd"] == expected
    # the evaluation of epoch 3 measured its test pgd set on exactly these inputs
    metrics = evaluate_checkpoint(model, d, ev_plan, seed=1, epoch=3).metrics
    evaluated = metrics.query("split == 'test' and perturbation == 'pgd' and layer == 'penultimate' and metric == 'accuracy'")
    assert evaluated["value"].item() == pytest.approx(expected, abs=1e-12)
    # the robustness stage attacks only the whole batches that hold its first samples: the same inputs there
    first = attack_set("pgd", model, x[:128], y[:128], ev_plan, LINF, num_classes=10, seed=1, epoch=3, split="test", device="cpu")
    assert torch.equal(first, x_pgd[:128])
    with pytest.raises(ValueError, match="pgd_inputs has shape"):
        strong_evaluation(model, x, y, threat=LINF, num_classes=10, attacks=[], seed=1, pgd_inputs=x_pgd[:5])


def test_worst_is_the_per_example_worst_case_over_pgd10_and_the_strong_attacks(small, monkeypatch):
    """A strong attack weaker than PGD-10 (here one that returns x unchanged) cannot lift ``worst``
    above PGD-10: a sample counts only if it survives PGD-10 too."""
    from ncrobust import attacks

    class Unchanged(attacks.Clean):
        seeded = True

    model, d = small
    x, y = as_float(d, "test")
    monkeypatch.setitem(attacks.ATTACKS, "pgd-strong", Unchanged())
    by = {r["attack"]: r["robust_accuracy"] for r in strong_evaluation(
        model, x, y, threat=LINF, num_classes=10, attacks=["pgd-strong"], seed=1, batch_size=64)}
    assert by["pgd-strong"] == by["clean"] > by["pgd"]
    assert by["worst"] == by["pgd"]
    # with real attacks: the share of samples that survive each of them, counted directly
    rows_ = strong_evaluation(model, x, y, threat=LINF, num_classes=10, attacks=["apgd-ce"], seed=1, batch_size=64)
    by = {r["attack"]: r["robust_accuracy"] for r in rows_}
    x_pgd = perturb("pgd", model, x, y, threat=LINF, num_classes=10, batch_size=64, generator=generator(1, "strong", "pgd"))
    x_apgd = perturb("apgd-ce", model, x, y, threat=LINF, num_classes=10, batch_size=64, seed=1)
    with torch.no_grad():
        both = (model(x_pgd).argmax(1) == y) & (model(x_apgd).argmax(1) == y)
    assert by["worst"] == pytest.approx(float(both.double().mean()))
    assert by["worst"] <= min(by["pgd"], by["apgd-ce"])


# --------------------------------------------------------------------------------------------- tables


def test_tag_puts_the_cell_in_front():
    frame = tables.tag(pd.DataFrame({"metric": ["nc1"], "value": [0.5]}), Cell("digits", "mlp", "ce", "st", 2, "r10"), 4)
    assert list(frame.columns) == [*CELL_COLUMNS, "epoch", "metric", "value"]
    assert frame.iloc[0].to_dict() == {"dataset": "digits", "model": "mlp", "loss": "ce", "adversary": "st", "variant": "r10",
                                       "seed": 2, "epoch": 4, "metric": "nc1", "value": 0.5}
    assert tables.tag(frame[["value"]], Cell("digits", "mlp", "ce", "st", 2))["variant"].tolist() == ["base"]


def test_summary_and_figures_use_each_cells_own_threat_model(small):
    model, d = small
    two = evaluate_checkpoint(model, d, plan(threats=(LINF, L2), splits=("train", "test")), seed=SEED, epoch=EPOCH).metrics
    one = evaluate_checkpoint(model, d, plan(splits=("train", "test")), seed=SEED, epoch=EPOCH).metrics
    cell = Cell("digits", "mlp", "ce", "st", 1)
    s2 = tables.summary(tables.metrics_frame(two, cell, EPOCH))
    s1 = tables.summary(tables.metrics_frame(one, cell, EPOCH))
    pd.testing.assert_frame_equal(s1, s2)
    assert s1["nc1_pgd_mean"].iloc[0] == pytest.approx(scalar(one, "pgd", "nc1"))
    curves = tables.nc_curves(tables.metrics_frame(two, cell, EPOCH))
    assert set(curves["norm"]) == {"linf"}


def test_leap_matrices_average_over_seeds():
    base = dict(dataset="digits", model="mlp", loss="ce", adversary="st", variant="base", epoch=4, split="train", norm="linf",
                layer="penultimate", layer_index=1, metric="leap", **{"class": pd.NA})
    frame = pd.DataFrame([
        {**base, "seed": s, "perturbation": p, "row": r, "col": c, "value": v}
        for s, v in ((1, 0.2), (2, 0.4)) for p in ("clean", "pgd") for r in range(2) for c in range(2)
    ]).astype({"row": "Int64", "col": "Int64", "class": "Int64"})
    out = tables.leap_matrices(frame)
    assert set(out["perturbation"]) == {"pgd"} and len(out) == 4
    assert out["value"].to_numpy() == pytest.approx(0.3) and set(out["seeds"]) == {2} and set(out["epochs"]) == {"4"}


def test_gpu_block_size_is_the_whole_batch():
    assert blocks._block_rows(512, torch.device("cuda")) >= 1 << 40
    assert blocks._block_rows(512, torch.device("cpu")) == max(blocks._MIN_BLOCK_ROWS, blocks._BLOCK_BYTES // (8 * 512))


def test_evaluation_and_strong_evaluation_log_one_line_per_set_and_attack(small, caplog):
    """A long job's log shows how far it got: ``evaluate_checkpoint`` logs one line per evaluated set
    (split, norm, perturbation; its position of all and its seconds), ``strong_evaluation`` one per
    attack (PGD-10 and each strong one, with its accuracy)."""
    import logging

    model, d = small
    p = plan(threats=(LINF, L2), perturbations={"clean": {}, "pgd": {}, "gaussian": {}}, splits=("train", "test"))
    with caplog.at_level(logging.INFO, logger="ncrobust"):
        evaluate_checkpoint(model, d, p, seed=SEED, epoch=EPOCH)
    lines = [r.getMessage() for r in caplog.records if r.name == "ncrobust.evaluation.checkpoint"]
    sets = [f"{s}/{n}/{q}" for s in ("train", "test") for n, q in [("linf", "clean")] + [(t, q) for t in ("linf", "l2") for q in ("pgd", "gaussian")]]
    assert [line.split()[5] for line in lines] == sets
    assert [line.split()[4] for line in lines] == [f"{i}/{len(sets)}" for i in range(1, len(sets) + 1)]
    assert all(line.startswith(f"evaluate epoch {EPOCH}: set ") and " done in " in line for line in lines)

    caplog.clear()
    x, y = as_float(d, "test")
    with caplog.at_level(logging.INFO, logger="ncrobust"):
        rows_ = strong_evaluation(model, x[:50], y[:50], threat=LINF, num_classes=10, attacks=["pgd-strong"], seed=1, batch_size=64)
    lines = [r.getMessage() for r in caplog.records if r.name == "ncrobust.evaluation.robustness"]
    accuracy = {r["attack"]: r["robust_accuracy"] for r in rows_}
    assert [line.split()[3:5] for line in lines] == [["1/2", "pgd:"], ["2/2", "pgd-strong:"]]
    assert [float(line.split()[7]) for line in lines] == pytest.approx([accuracy["pgd"], accuracy["pgd-strong"]], abs=1e-4)
