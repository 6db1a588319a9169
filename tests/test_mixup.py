"""Mixup in the training step (ncrobust.training.mixup, ncrobust.training.train) and the mixup geometry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.cell import Cell
from ncrobust.jobs.experiment import build_model
from ncrobust.losses import LOSSES, get_loss
from ncrobust.training.mixup import draw_mixup, majority_label, mix, mixed_loss
from ncrobust.training.train import Recipe, initial_checkpoint, make_optimizer, make_train_step, train_segment

CONFIG = {"models": {"mlp": {"depth": 2, "width": 32}}}
THREAT = ThreatModel(norm="linf", eps=0.1, step_size=0.05, steps=2)


def _setup(digits, adversary, *, epochs=3, loss="ce", **options):
    cell = Cell("digits", "mlp", loss, adversary, 3)
    model = build_model(CONFIG, cell, digits)
    recipe = Recipe(adversary=adversary, loss=get_loss(loss), threat=THREAT, epochs=epochs, batch_size=256, **options)
    x, y = datasets.as_float(digits, "train")
    return cell, model, recipe, x, y


def test_beta_draws_follow_alpha_and_the_generator():
    """lam ~ Beta(alpha, alpha): mean 1/2, variance 1 / (4 (2 alpha + 1)); the same generator
    state gives the same draws; perm is a permutation."""
    for alpha in (0.2, 1.0, 8.0):
        g = torch.Generator().manual_seed(0)
        lams = torch.stack([draw_mixup(alpha, 5, g)[0] for _ in range(4000)]).double()
        assert 0.0 <= lams.min() and lams.max() <= 1.0
        assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
        assert lams.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    (la, pa), (lb, pb) = draw_mixup(0.4, 9, a), draw_mixup(0.4, 9, b)
    assert torch.equal(la, lb) and torch.equal(pa, pb) and sorted(pa.tolist()) == list(range(9))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_mixed_loss_is_the_lam_weighted_sum_and_mixed_targets_in_closed_form(loss):
    """lam L(y) + (1 - lam) L(y[perm]) for every loss; for CE it is CE against the mixed soft
    target, for MSE the MSE to the mixed one-hot target plus lam (1 - lam) ||e_a - e_b||^2 / C."""
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    lam, perm = torch.tensor(0.3, dtype=torch.float64), torch.tensor([1, 2, 3, 4, 5, 0])
    fn = get_loss(loss)
    got = mixed_loss(fn, logits, y, lam, perm)
    assert got.item() == pytest.approx(0.3 * fn(logits, y).item() + 0.7 * fn(logits, y[perm]).item(), rel=1e-12)
    target = 0.3 * F.one_hot(y, 4).double() + 0.7 * F.one_hot(y[perm], 4).double()
    if loss == "ce":
        assert got.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-12)
    if loss == "mse":
        gap = 0.3 * 0.7 * (y != y[perm]).double() * 2 / 4
        assert got.item() == pytest.approx(((logits - target) ** 2).mean(1).add(gap).mean().item(), rel=1e-12)


def test_mixed_adversarial_examples_stay_in_the_threat_ball_of_the_mixed_clean_inputs(digits):
    """PGD-AT with mixup mixes per-example adversarial examples: by convexity of the ball the
    mix is within eps of the mix of the clean inputs, and in [0, 1]."""
    _, model, recipe, x, y = _setup(digits, "pgd-linf", mixup_alpha=1.0)
    x, y = x[:64], y[:64]
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=64, device=x.device)
    noise = step.draw_noise(x, torch.Generator().manual_seed(0))
    lam, perm = noise[-2:]
    x_adv = step.attack.from_start(model, x, y, noise[:-2], THREAT, loss_fn=recipe.loss)
    delta = mix(x_adv, lam, perm) - mix(x, lam, perm)
    assert delta.abs().max().item() <= THREAT.eps + 1e-6
    assert 0.0 <= mix(x_adv, lam, perm).min() and mix(x_adv, lam, perm).max() <= 1.0
    assert torch.equal(majority_label(y, torch.tensor(0.7), perm), y)
    assert torch.equal(majority_label(y, torch.tensor(0.2), perm), y[perm])


def test_st_mixup_step_trains_on_the_mix_with_the_mixed_loss(digits):
    """One st step with mixup equals a hand-written step: forward on lam x + (1 - lam) x[perm],
    loss lam CE(y) + (1 - lam) CE(y[perm]), accuracy against the majority label."""
    _, model, recipe, x, y = _setup(digits, "st", mixup_alpha=0.5, weight_decay=0.0, momentum=0.0)
    x, y = x[:64], y[:64]
    reference = build_model(CONFIG, Cell("digits", "mlp", "ce", "st", 3), digits)
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=64, device=x.device)
    noise = step.draw_noise(x, torch.Generator().manual_seed(4))
    lam, perm = noise
    step(x, y, noise)
    reference.train()
    logits = reference(lam * x + (1 - lam) * x[perm])
    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= recipe.lr * p.grad
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    log = step.epoch_log(y)
    assert log["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert log["train_accuracy"] == pytest.approx((logits.argmax(1) == majority_label(y, lam, perm)).double().mean().item())


@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_mixup_chain_equals_uninterrupted_bit_for_bit_and_changes_training(digits, adversary):
    cell, model, recipe, x, y = _setup(digits, adversary, mixup_alpha=1.0)
    start = initial_checkpoint(model, recipe)
    straight, rows = train_segment(model, start, x, y, recipe=recipe, end_epoch=3, seed=cell.seed)
    ckpt, chained = start, []
    for end in (1, 3):
        fresh = build_model(CONFIG, Cell("digits", "mlp", "ce", adversary, 99), digits)
        ckpt, seg = train_segment(fresh, ckpt, x, y, recipe=recipe, end_epoch=end, seed=cell.seed)
        chained += seg
    assert all(torch.equal(ckpt["model"][k], v) for k, v in straight["model"].items())
    assert [r["loss"] for r in chained] == [r["loss"] for r in rows]
    plain = Recipe(**{**recipe.__dict__, "mixup_alpha": 0.0})
    other, plain_rows = train_segment(model, start, x, y, recipe=plain, end_epoch=3, seed=cell.seed)
    assert not torch.equal(other["model"]["classifier.weight"], straight["model"]["classifier.weight"])
    assert rows[-1]["loss"] > plain_rows[-1]["loss"]  # mixed targets cannot be fitted as well


@pytest.mark.parametrize("adversary", ["st", "pgd-linf"])
def test_track_collapse_with_mixup_groups_mixed_features_by_their_majority_label(digits, adversary):
    """The NC columns of the log with mixup: the stored features of mixed inputs carry the label
    their prediction was counted against (the majority label; PGD's clean stream is unmixed and
    keeps the true labels), the columns are finite, and a chain still equals one run bit for bit."""
    cell, model, recipe, x, y = _setup(digits, adversary, epochs=2, mixup_alpha=1.0, track_collapse=True)
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=64, device=x.device)
    noise = step.draw_noise(x[:64], torch.Generator().manual_seed(2))
    lam, perm = noise[-2:]
    step.store_features(0, step(x[:64], y[:64], noise))
    majority = majority_label(y[:64], lam, perm)
    clean_labels, adv_labels = step.stream_labels
    assert torch.equal(clean_labels, majority if adversary == "st" else y[:64])
    assert adv_labels is None if adversary == "st" else torch.equal(adv_labels, majority)
    model = build_model(CONFIG, cell, digits)
    start = initial_checkpoint(model, recipe)
    end, rows = train_segment(model, start, x, y, recipe=recipe, end_epoch=2, seed=cell.seed)
    row = rows[-1]
    for column in ("nc1_clean", "ncc_accuracy_clean") + (("nc1_adv", "ncc_accuracy_adv", "ncc_accuracy_clean_means_adv") if adversary != "st" else ()):
        assert math.isfinite(row[column]) and row[column] >= 0, column
    ckpt, _ = train_segment(build_model(CONFIG, cell, digits), start, x, y, recipe=recipe, end_epoch=1, seed=cell.seed)
    ckpt, chained = train_segment(build_model(CONFIG, cell, digits), ckpt, x, y, recipe=recipe, end_epoch=2, seed=cell.seed)
    assert chained[-1]["nc1_clean"] == row["nc1_clean"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in end["model"].items())


def test_bad_mixup_settings_are_one_line_errors(digits):
    with pytest.raises(ValueError, match=r"training.mixup.alpha = -1: must be a finite number >= 0"):
        _setup(digits, "st", mixup_alpha=-1)
    with pytest.raises(ValueError, match="training.mixup.alpha = nan"):
        _setup(digits, "st", mixup_alpha=math.nan)


@pytest.mark.gpu
@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_mixup_step_makes_no_host_synchronisation_and_graphs_equal_eager_on_gpu(digits, adversary):
    from ncrobust.jobs.pipeline import setup

    setup({"device": "cuda", "threads": 1}, deterministic=True)
    _, model, recipe, x, y = _setup(digits, adversary, epochs=2, mixup_alpha=1.0)
    model, xs, ys = model.cuda(), x[:256].cuda(), y[:256].cuda()
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=256, device=xs.device)
    gen = torch.Generator(xs.device).manual_seed(0)
    step(xs, ys, step.draw_noise(xs, gen))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(xs, ys, step.draw_noise(xs, gen))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    results = {}
    for graphed in (False, True):
        _, model, recipe, x, y = _setup(digits, adversary, epochs=2, mixup_alpha=1.0, cuda_graph=graphed, track_collapse=True)
        model, x, y = model.cuda(), x.cuda(), y.cuda()
        results[graphed] = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=2, seed=1)
    for k, v in results[False][0]["model"].items():
        torch.testing.assert_close(results[True][0]["model"][k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[False][1], results[True][1]):
        assert a["nc1_clean"] == pytest.approx(b["nc1_clean"], rel=1e-4)


# --------------------------------------------------------------------------------------------
# The mixup geometry (Fisher et al.)


def _simplex_net(C: int):
    """A network whose penultimate features are ``x - 1/C`` (x a one-hot 'image' e_c gives the
    centred simplex vertex M_c = e_c - 1/C) and whose classifier rows are those vertices."""
    from torch import nn

    from ncrobust.models.base import Normalize, TappedNet

    class Simplex(TappedNet):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize([1.0 / C], [1.0])
            self.stages = nn.ModuleDict()
            self.head = nn.Flatten()
            self.classifier = nn.Linear(C, C)
            with torch.no_grad():
                self.classifier.weight.copy_(torch.eye(C) - 1.0 / C)
                self.classifier.bias.zero_()

    x = torch.eye(C).repeat(3, 1).view(-1, 1, 1, C)  # three copies of each vertex
    return Simplex(), x, torch.arange(C).repeat(3)


def test_mixup_geometry_of_a_simplex_in_closed_form():
    """Same-class mixes sit on their row (angle 0); a cross mix lam M_i + (1 - lam) M_j lies at
    atan(|2 lam - 1| tan(theta / 2)) from the i/j boundary, theta = arccos(-1/(C-1)), with plane
    coordinates (r (lam + (1 - lam) cos theta), r (1 - lam) sin theta), r = ||M_c||; predictions
    follow the majority class."""
    from ncrobust.geometry.mixup_geometry import GEOMETRY_COLUMNS, mixup_geometry

    C = 5
    model, x, y = _simplex_net(C)
    lams = [0.0, 0.2, 0.5, 0.7, 1.0]
    points, summary = mixup_geometry(model, x, y, num_classes=C, pairs=[(0, 1), (3, 2)], lambdas=lams, per_class=3)
    assert list(points.columns) == GEOMETRY_COLUMNS
    assert set(points.kind) == {"cross", "same-0", "same-1", "same-3", "same-2"}
    same = points[points.kind != "cross"]
    assert same.row_angle.max() < 1e-3
    theta = math.acos(-1 / (C - 1))
    r = math.sqrt((C - 1) / C)
    cross = points[points.kind == "cross"]
    lam = cross.lam.to_numpy()
    expected = [math.degrees(math.atan(abs(2 * v - 1) * math.tan(theta / 2))) for v in lam]
    assert cross.boundary_angle.to_numpy() == pytest.approx(expected, abs=1e-6)
    assert cross.x.to_numpy() == pytest.approx(r * (lam + (1 - lam) * math.cos(theta)), abs=1e-6)
    assert cross.y.to_numpy() == pytest.approx(r * (1 - lam) * math.sin(theta), abs=1e-6)
    decided = cross[cross.lam != 0.5]
    assert (decided.prediction == decided.class_i.where(decided.lam > 0.5, decided.class_j)).all()
    assert set(summary.pair) == {"0-1", "3-2", "all"}
    values = summary[summary.pair == "all"].set_index("metric").value
    assert values["same_class_angle"] == pytest.approx(0.0, abs=1e-3)
    interior = [v for v in lams if 0 < v < 1]
    assert values["cross_boundary_angle"] == pytest.approx(
        sum(math.degrees(math.atan(abs(2 * v - 1) * math.tan(theta / 2))) for v in interior) / len(interior), abs=1e-6)


def test_mixup_geometry_pgd_rows_and_bad_input():
    from ncrobust.geometry.mixup_geometry import mixup_geometry

    C = 4
    model, x, y = _simplex_net(C)
    threat = ThreatModel(norm="linf", eps=0.05, step_size=0.02, steps=3)
    points, summary = mixup_geometry(model, x, y, num_classes=C, pairs=[(0, 1)], lambdas=[0.3, 0.8], per_class=3,
                                     perturbations=("clean", "pgd"), threat=threat, loss=get_loss("ce"))
    clean, pgd = (points[points.perturbation == p].reset_index(drop=True) for p in ("clean", "pgd"))
    moved = ((clean.x - pgd.x) ** 2 + (clean.y - pgd.y) ** 2) ** 0.5
    assert 0 < moved.max() <= threat.eps * math.sqrt(C) + 1e-6  # a linear model moves features by at most ||delta||_2
    assert set(summary.perturbation) == {"clean", "pgd"}
    for kwargs, message in [
        ({"pairs": [(0, 0)]}, "needs two different classes"),
        ({"pairs": [(0, 9)]}, "needs two different classes"),
        ({"lambdas": [1.5]}, "lambdas must be a non-empty list of numbers in"),
        ({"perturbations": ("pgd",)}, "pgd needs the threat model and the loss"),
        ({"perturbations": ("gaussian",)}, "perturbation 'gaussian': allowed: clean, pgd"),
        ({"per_class": 1}, "per_class = 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            mixup_geometry(model, x, y, num_classes=C, **{"pairs": [(0, 1)], **kwargs})


@pytest.mark.slow
def test_mixup_tables_and_figure(tmp_path):
    """tables.mixup_points keeps one pair, each cell's final epoch and first seed; mixup_summary
    averages the 'all' rows over seeds; plots.mixup draws one panel per (variant) x (adversary,
    perturbation), and a placeholder without data."""
    import pandas as pd

    from ncrobust.cell import Cell
    from ncrobust.figures import plots
    from ncrobust.geometry.mixup_geometry import mixup_geometry
    from ncrobust.tables import mixup_points, mixup_summary, tag

    model, x, y = _simplex_net(4)
    threat = ThreatModel(norm="linf", eps=0.05, step_size=0.02, steps=2)
    points, summaries = [], []
    for adversary in ("st", "pgd-linf"):
        for variant in ("base", "mixup"):
            for seed in (1, 2):
                p, s = mixup_geometry(model, x, y, num_classes=4, pairs=[(2, 3), (0, 1)], lambdas=[0.0, 0.5, 1.0], per_class=3,
                                      perturbations=("clean", "pgd"), threat=threat, loss=get_loss("ce"), seed=seed)
                cell = Cell("digits", "mlp", "ce", adversary, seed)
                points.append(tag(p, cell, 5).assign(variant=variant))
                summaries.append(tag(s, cell, 5).assign(variant=variant))
    points, summaries = pd.concat(points), pd.concat(summaries)
    shaped = mixup_points(points)
    assert set(shaped.pair) == {"0-1"} and set(shaped.seed) == {1} and set(shaped.group) == {"base", "mixup"}
    summary = mixup_summary(summaries)
    assert set(summary.metric) == {"same_class_angle", "cross_boundary_angle"} and (summary.seeds == 2).all()
    assert len(summary) == 2 * 2 * 2 * 2
    fig = plots.mixup(shaped, summary, tmp_path / "mixup.png")
    assert (tmp_path / "mixup.png").exists()
    assert len([ax for ax in fig.axes if ax.get_title() or ax.get_xlabel() or ax.get_ylabel()]) >= 2 * 4
    assert "2-3" not in fig.texts[-1].get_text() and "classes 0 and 1" in fig.texts[-1].get_text()
    empty = plots.mixup(mixup_points(pd.DataFrame()), mixup_summary(pd.DataFrame()), tmp_path / "none.png")
    assert "no mixup geometry" in " ".join(t.get_text() for t in empty.axes[0].texts)
