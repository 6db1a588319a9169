"""Class imbalance, bias-free classifiers and deep linear networks (issue 14): the long-tailed
dataset option, the imbalance geometry metrics against closed-form cases, and the figure."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from workflow_helpers import fit_full_batch

from ncrobust import data, tables
from ncrobust.collapse import LayerStats, minority_classes
from ncrobust.columns import FIGURES, METRIC_COLUMNS
from ncrobust.data import imbalance_counts
from ncrobust.figures import plots

# --------------------------------------------------------------------------------------------
# the dataset option


@pytest.mark.parametrize(
    "n_max, C, profile, ratio, expected",
    [
        (100, 10, "step", 10, [100] * 5 + [10] * 5),
        (100, 10, "step", 1, [100] * 10),
        (100, 5, "step", 4, [100, 100, 100, 25, 25]),  # odd C: the last C // 2 are minorities
        (130, 10, "step", 100, [130] * 5 + [1] * 5),
        # floor(n_max * ratio ** (-c / (C - 1))): 100 * 10 ** (-1/9) = 77.4, ...
        (100, 10, "exponential", 10, [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]),
        (1000, 10, "exponential", 100, [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]),
        (60, 3, "exponential", 4, [60, 30, 15]),
        (60, 3, "exponential", 1, [60, 60, 60]),
    ],
)
def test_imbalance_counts(n_max, C, profile, ratio, expected):
    assert imbalance_counts(n_max, C, profile, ratio) == expected


def _digits(**options):
    return data.load("digits", seed=0, **options)


@pytest.fixture(scope="module")
def balanced():
    return _digits()


@pytest.mark.parametrize("profile", ["step", "exponential"])
@pytest.mark.parametrize("ratio", [1, 10, 100])
def test_digits_long_tailed(balanced, profile, ratio):
    n_max = int(torch.bincount(balanced["y_train"]).min())  # the smallest class's count
    ds = _digits(imbalance={"profile": profile, "ratio": ratio})
    expected = imbalance_counts(n_max, 10, profile, ratio)
    assert torch.bincount(ds["y_train"], minlength=10).tolist() == expected
    assert ds["class_counts"].tolist() == expected and ds["class_counts"].dtype == torch.int64
    data.validate(ds)
    # the test split is untouched: balanced, and the very same images
    assert torch.equal(ds["x_test"], balanced["x_test"]) and torch.equal(ds["y_test"], balanced["y_test"])
    # every kept training image is one of the balanced training split's, with its label
    full = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(balanced["x_train"], balanced["y_train"])}
    assert all((bytes(x.numpy().tobytes()), int(y)) in full for x, y in zip(ds["x_train"], ds["y_train"]))
    # the normalisation is the subsample's
    x = ds["x_train"].double() / 16
    assert ds["mean"][0] == pytest.approx(float(x.mean()), rel=1e-12)


def test_balanced_datasets_record_their_counts(balanced):
    assert torch.equal(balanced["class_counts"], torch.bincount(balanced["y_train"], minlength=10))


def test_imbalance_is_seeded():
    option = {"imbalance": {"profile": "step", "ratio": 10}}
    a, b = _digits(**option), _digits(**option)
    assert torch.equal(a["x_train"], b["x_train"]) and torch.equal(a["y_train"], b["y_train"])
    other = data.load("digits", seed=1, **option)  # another split seed: another draw (and split)
    assert not torch.equal(a["x_train"], other["x_train"])
    # after train_per_class, n_max is train_per_class
    both = _digits(train_per_class=40, imbalance={"profile": "exponential", "ratio": 4})
    assert both["class_counts"].tolist() == imbalance_counts(40, 10, "exponential", 4)


@pytest.mark.parametrize(
    "imbalance, message",
    [
        ("step", "imbalance must be a mapping"),
        ({"profile": "step"}, "imbalance lacks ratio"),
        ({"profile": "linear", "ratio": 10}, "imbalance.profile 'linear' is unknown; allowed: step, exponential"),
        ({"profile": "step", "ratio": 0.5}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": True}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": math.inf}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": "10"}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": 10, "minority": "first"}, "imbalance has no key minority"),
        ({"profile": "step", "ratio": 1000}, "imbalance ratio 1000 leaves a class without training images"),
    ],
)
def test_bad_imbalance_options(imbalance, message):
    with pytest.raises(ValueError, match=message) as err:
        _digits(imbalance=imbalance)
    assert "\n" not in str(err.value)


def test_validate_checks_class_counts(balanced, tmp_path):
    broken = dict(balanced, class_counts=balanced["class_counts"] + 1)
    with pytest.raises(ValueError, match="class_counts must be the int64"):
        data.validate(broken)
    from ncrobust.io import OutdatedFileError, save_torch
    from ncrobust.jobs.pipeline import load_dataset

    path = tmp_path / "digits.pt"  # prepared by a version that did not record the counts
    save_torch({k: v for k, v in balanced.items() if k != "class_counts"}, path)
    with pytest.raises(OutdatedFileError) as err:
        load_dataset(path)
    assert str(err.value) == f"{path}: written by an older ncrobust (it has no class_counts); rebuild it: snakemake --forcerun prepare_data"


# --------------------------------------------------------------------------------------------
# the metrics (LayerStats.imbalance_geometry, LayerStats.class_accuracy), closed-form cases


def stats_of(H, y, predictions=None, C=None) -> LayerStats:
    """Both passes of a LayerStats over ``H`` [N, d] with labels ``y``, in batches of 3."""
    s = LayerStats(C or int(y.max()) + 1)
    for i in range(0, len(y), 3):
        s.accumulate_means(H[i : i + 3], y[i : i + 3])
    s.finish_means()
    for i in range(0, len(y), 3):
        s.accumulate_scatter(H[i : i + 3], y[i : i + 3], None if predictions is None else predictions[i : i + 3])
    return s


def around(M, counts, spread=0.3):
    """Samples whose class means are exactly the rows of ``M``: each class's samples are its mean
    plus and minus the same offsets (an even count per class)."""
    rows, labels = [], []
    g = torch.Generator().manual_seed(0)
    for c, n in enumerate(counts):
        offsets = spread * torch.randn(n // 2, M.shape[1], generator=g, dtype=torch.float64)
        rows += [M[c] + offsets, M[c] - offsets]
        labels += [c] * (2 * (n // 2))
    return torch.cat(rows), torch.tensor(labels)


def test_orthogonal_frame_with_class_dependent_lengths():
    """Means ``a_c e_c`` (Dang et al.'s bias-free imbalanced limit): mean |cos| 0; the centred
    norms are ``||a_c e_c - mu_G||`` with ``mu_G = sum_c p_c a_c e_c``."""
    a = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    counts = [8, 8, 2, 2]
    M = torch.diag(a)
    H, y = around(M, counts)
    geometry = stats_of(H, y).imbalance_geometry(weight=2.0 * torch.diag(a))
    assert geometry["orthogonality_M"] == pytest.approx(0.0, abs=1e-12)
    assert geometry["orthogonality_W"] == pytest.approx(0.0, abs=1e-12)
    p = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    mu_G = p * a
    expected = [math.sqrt(float(((a[c] * torch.eye(4, dtype=torch.float64)[c] - mu_G) ** 2).sum())) for c in range(4)]
    torch.testing.assert_close(geometry["mean_norm_per_class"], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(geometry["classifier_norm_per_class"], 2.0 * a)
    assert "minority_cos_M" not in geometry and "minority_cos_W" not in geometry  # no minorities given


@pytest.mark.parametrize("C", [3, 5, 10])
def test_simplex_etf_has_mean_abs_cos_one_over_c_minus_one(C):
    """A simplex ETF centred at the origin: every pair has cos -1/(C-1); equal norms."""
    M = (torch.eye(C, dtype=torch.float64) - 1.0 / C) * math.sqrt(C / (C - 1))
    H, y = around(M, [4] * C)
    geometry = stats_of(H, y).imbalance_geometry(weight=M)
    assert geometry["orthogonality_M"] == pytest.approx(1 / (C - 1), rel=1e-12)
    assert geometry["orthogonality_W"] == pytest.approx(1 / (C - 1), rel=1e-12)
    torch.testing.assert_close(geometry["mean_norm_per_class"], torch.ones(C, dtype=torch.float64))


def test_minority_collapse():
    """Minority rows on one direction (any lengths): minority cos 1; minority means at one point:
    their centred means coincide, cos 1. Majorities on orthogonal axes do not enter."""
    C, d = 5, 6
    M = torch.zeros(C, d, dtype=torch.float64)
    M[0, 0], M[1, 1], M[2, 2] = 4.0, 4.0, 4.0
    M[3, 3] = M[4, 3] = 1.0  # the two minorities share their mean
    counts = [10, 10, 10, 2, 2]
    W = torch.eye(C, d, dtype=torch.float64)
    W[3] = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    W[4] = 3.0 * W[3]
    minority = minority_classes(torch.tensor(counts))
    assert minority.tolist() == [False, False, False, True, True]
    geometry = stats_of(*around(M, counts)).imbalance_geometry(W, minority)
    assert geometry["minority_cos_W"] == pytest.approx(1.0, rel=1e-12)
    assert geometry["minority_cos_M"] == pytest.approx(1.0, rel=1e-12)
    # three minorities on an ETF of their own: cos -1/2
    W3 = W.clone()
    W3[2:] = torch.tensor([[1.0, 0, 0, 0, 0, 0], [-0.5, math.sqrt(3) / 2, 0, 0, 0, 0], [-0.5, -math.sqrt(3) / 2, 0, 0, 0, 0]],
                          dtype=torch.float64)
    three = minority_classes(torch.tensor([10, 10, 3, 3, 3]))
    assert stats_of(*around(M, counts)).imbalance_geometry(W3, three)["minority_cos_W"] == pytest.approx(-0.5)


def test_balanced_data_has_no_minority_metrics():
    assert not minority_classes(torch.tensor([7, 7, 7])).any()
    assert not minority_classes(torch.tensor([137, 130, 134])).any()  # digits' own, nearly balanced split
    assert minority_classes(torch.tensor([10, 5, 6, 1])).tolist() == [False, True, False, True]  # at most half the largest
    steps = minority_classes(torch.tensor(imbalance_counts(130, 10, "step", 2)))
    assert steps.tolist() == [False] * 5 + [True] * 5
    M = torch.eye(3, dtype=torch.float64)
    s = stats_of(*around(M, [4, 4, 4]))
    one_minority = torch.tensor([False, False, True])
    for mask in (minority_classes(torch.tensor([4, 4, 4])), one_minority):
        assert not {"minority_cos_M", "minority_cos_W"} & set(s.imbalance_geometry(M, mask))
    with pytest.raises(ValueError, match=r"minority must be a bool mask of shape \[3\]"):
        s.imbalance_geometry(M, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="class_counts must be 1-D integers"):
        minority_classes(torch.tensor([1.0, 2.0]))


def test_per_class_accuracy_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1, 1])
    H = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    s = stats_of(H, y, pred)
    per_class = s.class_accuracy()["accuracy_per_class"]
    torch.testing.assert_close(per_class, torch.tensor([2 / 3, 1.0, 1 / 4], dtype=torch.float64))
    counts = torch.bincount(y).double()
    assert float((per_class * counts).sum() / counts.sum()) == pytest.approx(s.prediction_metrics()["accuracy"])
    with pytest.raises(ValueError, match="class_accuracy needs the network's predictions"):
        stats_of(H, y).class_accuracy()


# --------------------------------------------------------------------------------------------
# the evaluation emits them


@pytest.fixture(scope="module")
def imbalanced_evaluation():
    """A briefly trained bias-free deep linear network on step-imbalanced digits (ratio 10),
    evaluated clean and under PGD, keeping the features."""
    from ncrobust.attacks import ThreatModel
    from ncrobust.data import as_float
    from ncrobust.evaluation.checkpoint import EvaluationPlan, evaluate_checkpoint
    from ncrobust.models import create_model

    d = _digits(imbalance={"profile": "step", "ratio": 10})
    torch.manual_seed(0)
    model = create_model("deep_linear", num_classes=10, in_chans=1, image_size=8, mean=d["mean"], std=d["std"],
                         depth=2, width=16, bias=False)
    x, y = as_float(d, "train")
    fit_full_batch(model, x, y, lr=0.05, steps=40)
    plan = EvaluationPlan(threats=(ThreatModel("linf", 0.1, 0.025, 2),), perturbations={"clean": {}, "pgd": {}},
                          splits=("train", "test"), batch_size=128, projection_points=0, keep_features=True)
    return d, model.eval(), plan, evaluate_checkpoint(model, d, plan, seed=0, epoch=1)


def test_evaluation_emits_the_imbalance_geometry(imbalanced_evaluation):
    d, model, plan, result = imbalanced_evaluation
    m = result.metrics
    for split in ("train", "test"):
        for pert in ("clean", "pgd"):
            s = m[(m.split == split) & (m.perturbation == pert)]
            pen = s[s.layer == "penultimate"]
            counts = pen[pen.metric == "train_class_count"].sort_values("class")["value"].tolist()
            assert counts == d["class_counts"].double().tolist()  # the train counts, on every set
            for metric in ("minority_cos_W", "minority_cos_M", "orthogonality_W", "orthogonality_M"):
                assert pen[pen.metric == metric]["class"].isna().sum() == 1, metric
            per_class = pen[pen.metric == "accuracy_per_class"].sort_values("class")["value"].to_numpy()
            n_c = np.bincount(d[f"y_{split}"].numpy(), minlength=10)
            accuracy = float(pen[pen.metric == "accuracy"]["value"].iloc[0])
            assert float((per_class * n_c).sum() / n_c.sum()) == pytest.approx(accuracy)
            minority = d["class_counts"].numpy() <= d["class_counts"].numpy().max() / 2  # step ratio 10: the last 5
            assert minority.tolist() == [False] * 5 + [True] * 5
            assert float(pen[pen.metric == "minority_accuracy"]["value"].iloc[0]) == pytest.approx(per_class[minority].mean())
            w_norms = pen[pen.metric == "classifier_norm_per_class"].sort_values("class")["value"].to_numpy()
            np.testing.assert_allclose(w_norms, model.classifier.weight.detach().double().norm(dim=1).numpy())
            for layer in ("layer1", "penultimate"):  # the means' geometry at every layer
                at = s[s.layer == layer]
                assert len(at[at.metric == "mean_norm_per_class"]) == 10
                assert len(at[at.metric == "minority_cos_M"]) == 1
            assert s[(s.layer == "layer1") & (s.metric == "minority_cos_W")].empty  # W belongs to the last layer


def test_kept_features_give_the_same_imbalance_rows(imbalanced_evaluation):
    from ncrobust.evaluation.checkpoint import penultimate_metrics

    _, _, _, result = imbalanced_evaluation
    recomputed = penultimate_metrics(result.features)
    original = result.metrics[result.metrics.layer == "penultimate"].reset_index(drop=True)
    names = ["train_class_count", "minority_cos_W", "accuracy_per_class", "mean_norm_per_class"]
    a = original[original.metric.isin(names)].reset_index(drop=True)
    b = recomputed[recomputed.metric.isin(names)].reset_index(drop=True)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-9)


def test_kept_features_without_class_counts_are_refused_with_the_command_that_rebuilds_them(imbalanced_evaluation):
    from ncrobust.evaluation.checkpoint import penultimate_metrics

    _, _, _, result = imbalanced_evaluation
    with pytest.raises(ValueError, match=r"no class_counts .*snakemake --forcerun evaluate"):
        penultimate_metrics({**result.features, "class_counts": None})


# --------------------------------------------------------------------------------------------
# the figure: tables.imbalance_geometry + plots.imbalance


VARIANT_COUNTS = {"base": [10, 10, 10, 10], "step10": [10, 10, 1, 1], "step10-nobias": [10, 10, 1, 1]}
VARIANTS = {  # as in config.variants
    "step10": {"dataset": {"imbalance": {"profile": "step", "ratio": 10}}},
    "step10-nobias": {"dataset": {"imbalance": {"profile": "step", "ratio": 10}}, "model": {"bias": False}},
}


def mean_norm(count, pert, seed):
    return (2.0 if pert == "pgd" else 1.0) * (1.0 + math.log(count)) + 0.1 * seed


def synthetic_imbalance_metrics(adversaries=("st", "pgd-linf"), seeds=(1, 2), epochs=(0, 10), variants=("base", "step10")) -> pd.DataFrame:
    """Penultimate rows as the evaluation writes them for ``variants`` (balanced, step ratio 10,
    step ratio 10 without bias); epoch 0 values are absurd (1e6): the figure shows the final epoch only."""
    rows = []
    for (name, counts), adv, seed, epoch, split, pert in itertools.product(
        [(v, VARIANT_COUNTS[v]) for v in variants], adversaries, seeds, epochs, ["train", "test"], ["clean", "pgd"]
    ):
        cell = dict(dataset="digits", model="deep_linear", loss="ce", adversary=adv, variant=name, seed=seed, epoch=epoch, split=split,
                    norm="linf", perturbation=pert, layer="penultimate", layer_index=2, row=None, col=None)
        junk = 1e6 if epoch != max(epochs) else 1.0

        def add(metric, value, klass=None):
            rows.append({**cell, "metric": metric, "class": klass, "value": float(value)})

        add("accuracy", 0.9)
        minority = [c for c, n in enumerate(counts) if n < max(counts)]
        for c, n in enumerate(counts):
            add("train_class_count", n, c)
            add("mean_norm_per_class", junk * mean_norm(n, pert, seed), c)
            add("classifier_norm_per_class", junk * (3.0 + n / 10 + 0.01 * seed), c)
        if len(minority) >= 2:
            add("minority_cos_M", junk * (0.5 if pert == "clean" else 0.2) + (0.01 * seed if epoch else 0))
            add("minority_cos_W", junk * (0.8 if adv == "st" else 0.6))
    frame = pd.DataFrame(rows)
    return frame[METRIC_COLUMNS].astype({"seed": "int64", "epoch": "int64", "class": "Int64", "row": "Int64", "col": "Int64"})


def test_imbalance_frame_pairs_each_class_with_its_train_count():
    f = tables.imbalance_geometry(synthetic_imbalance_metrics(), variants=VARIANTS)
    assert list(f.columns) == tables.IMBALANCE_COLUMNS
    assert set(f["epochs"]) == {"10"} and set(f["seeds"]) == {2}
    assert set(f["group"]) == {""}  # base and step10 differ only by the imbalance: one series over the ratio
    norms = f[f["metric"] == "mean_norm_per_class"]
    for _, r in norms.iterrows():
        n = VARIANT_COUNTS["base" if r["ratio"] == 1 else "step10"][int(r["class"])]
        assert r["class_count"] == n
        assert r["value"] == pytest.approx(np.mean([mean_norm(n, r["perturbation"], s) for s in (1, 2)]))
    assert set(f.loc[f["metric"] == "classifier_norm_per_class", "perturbation"]) == {"clean"}  # one W per network
    cos = f[f["metric"].isin(["minority_cos_M", "minority_cos_W"])]
    assert set(cos["ratio"]) == {10.0}  # no minorities when balanced
    st_clean = cos[(cos["adversary"] == "st") & (cos["metric"] == "minority_cos_M") & (cos["perturbation"] == "clean")]
    assert st_clean["value"].tolist() == pytest.approx([0.515])  # mean of 0.51 and 0.52 over seeds
    assert set(f.loc[f["metric"] == "minority_cos_W", "perturbation"]) == {"clean"}
    assert set(f.loc[f["metric"] == "mean_norm_per_class", "ratio"]) == {1.0, 10.0}


def _points(ax):
    """(x, y) of the markers drawn in a panel (the mean lines have no markers)."""
    return sorted((float(x), round(float(y), 9)) for line in ax.get_lines() if line.get_linestyle() == "None"
                  for x, y in zip(line.get_xdata(), line.get_ydata()))


@pytest.mark.slow
def test_imbalance_figure_draws_norms_against_class_size_and_minority_cos_against_ratio(tmp_path):
    f = tables.imbalance_geometry(synthetic_imbalance_metrics(variants=("base", "step10", "step10-nobias")), variants=VARIANTS)
    assert set(f["group"]) == {"", "model.bias=False"}
    fig = plots.imbalance(f, tmp_path / "imbalance.png")
    assert (tmp_path / "imbalance.png").exists() and (tmp_path / "imbalance.pdf").exists()
    axes = np.array(fig.axes).reshape(3, 2)
    assert [ax.get_title() for ax in axes[0]] == ["trained with\nst", "trained with\npgd-linf"]
    expected = sorted(
        (float(n), round(float(np.mean([mean_norm(n, p, s) for s in (1, 2)])), 9))
        for counts in VARIANT_COUNTS.values() for n in counts for p in ("clean", "pgd")
    )
    assert _points(axes[0, 0]) == expected
    assert axes[0, 0].get_xscale() == "log" and axes[0, 0].get_xlabel() == "training samples of the class"
    assert len(_points(axes[1, 0])) == 12  # one classifier row per class and variant
    cos = _points(axes[2, 0])
    assert {x for x, _ in cos} == {10.0}  # only the imbalanced variants have minorities
    assert sorted(y for _, y in cos) == pytest.approx([0.215, 0.215, 0.515, 0.515, 0.8, 0.8])  # pgd means, clean means, W rows
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"clean", "pgd", "classifier rows", "(base)", "model.bias=False"} <= set(legend)


@pytest.mark.slow
def test_imbalance_figure_without_variant_overrides_and_without_metrics(tmp_path):
    assert tables.variant_groups(VARIANTS) == {"step10": "", "step10-nobias": "model.bias=False"}
    named = tables.imbalance_geometry(synthetic_imbalance_metrics(variants=("base", "step10"), seeds=(1,)))
    assert set(named["group"]) == {"", "step10"}  # without config.variants, each variant is its own series
    plain = synthetic_imbalance_metrics(variants=("step10",), seeds=(1,))
    f = tables.imbalance_geometry(plain)
    assert set(f["group"]) == {"step10"} and set(f["ratio"]) == {10.0}
    fig = plots.imbalance(f, tmp_path / "plain.png")
    assert [x for x, _ in _points(fig.axes[0])] == [1.0] * 4 + [10.0] * 4  # 2 classes x clean/pgd at each size
    # a table without the imbalance metrics: a placeholder that says why, through the registry
    no_counts = plain[plain["metric"] != "train_class_count"]
    assert tables.imbalance_geometry(no_counts).empty
    fig = plots._draw("imbalance", no_counts, None, None, str(tmp_path / "none.png"))
    assert any("no imbalance metrics" in t.get_text() for ax in fig.axes for t in ax.texts)
    assert "imbalance" in FIGURES
