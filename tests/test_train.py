import math

import pytest
import torch
import torch.nn.functional as F

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.experiment import Cell, build_model
from ncrobust.losses import get_loss
from ncrobust.train import SGD, NonFiniteLossError, Recipe, Schedule, initial_checkpoint, train_segment

CONFIG = {"models": {"mlp": {"depth": 2, "width": 32}}}
THREAT = ThreatModel(norm="linf", eps=0.1, step_size=0.05, steps=2)


def _setup(digits, adversary, epochs=4, lr=0.1, loss="ce"):
    cell = Cell("digits", "mlp", loss, adversary, 3)
    model = build_model(CONFIG, cell, digits)
    recipe = Recipe(adversary=adversary, loss=get_loss(loss), threat=THREAT, epochs=epochs, batch_size=256, lr=lr)
    x, y = datasets.as_float(digits, "train")
    return cell, model, recipe, x, y


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_resumed_training_equals_uninterrupted_bit_for_bit(digits, adversary):
    cell, model, recipe, x, y = _setup(digits, adversary)
    start = initial_checkpoint(model, recipe)
    straight, rows_straight = train_segment(model, start, x, y, recipe=recipe, end_epoch=4, seed=cell.seed)
    # the same training in segments 0->1->3->4, each from a checkpoint saved and reloaded
    ckpt, rows = start, []
    for end in (1, 3, 4):
        fresh = build_model(CONFIG, Cell("digits", "mlp", "ce", adversary, 99), digits)  # different init: must be overwritten
        ckpt, seg_rows = train_segment(fresh, ckpt, x, y, recipe=recipe, end_epoch=end, seed=cell.seed)
        rows += seg_rows
    assert ckpt["epoch"] == straight["epoch"] == 4
    assert ckpt["iteration"] == straight["iteration"]
    assert _same_state(ckpt["model"], straight["model"])
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_straight]
    # and the training did something
    assert not _same_state(start["model"], straight["model"])


def test_training_lowers_the_loss(digits):
    cell, model, recipe, x, y = _setup(digits, "st", epochs=8)
    _, rows = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=8, seed=1)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[-1]["train_accuracy"] > 0.9
    assert math.isnan(rows[-1]["train_robust_accuracy"])


def test_adversarial_training_logs_robust_accuracy(digits):
    cell, model, recipe, x, y = _setup(digits, "pgd-linf", epochs=2)
    _, rows = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=2, seed=1)
    assert 0.0 <= rows[-1]["train_robust_accuracy"] <= rows[-1]["train_accuracy"] + 0.05


def test_non_finite_loss_stops_with_epoch_step_and_lr(digits):
    cell, model, recipe, x, y = _setup(digits, "st", lr=1e30)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step \d+/\d+, lr 1e\+30"):
        train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=2, seed=1)


def test_segment_must_move_forward(digits):
    cell, model, recipe, x, y = _setup(digits, "st")
    with pytest.raises(ValueError, match="segment 0 -> 9"):
        train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=9, seed=1)


def test_piecewise_schedule_is_a_function_of_the_global_iteration():
    s = Schedule()
    total = 800
    assert s.lr(0.1, 0, total) == 0.1
    assert s.lr(0.1, 199, total) == 0.1
    assert s.lr(0.1, 200, total) == pytest.approx(0.01)
    assert s.lr(0.1, 300, total) == pytest.approx(0.001)
    assert Schedule("cosine").lr(0.1, total, total) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear")


# --------------------------------------------------------------------------------------------
# SGD: our optimizer against torch.optim.SGD (the reference)


def _sgd_run(make_optimizer, steps: int = 5, device: str = "cpu", state: dict | None = None):
    """A small conv net trained ``steps`` steps from a fixed init with ``make_optimizer(params)``;
    returns the parameters and the optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
    ).to(device)
    model[1].weight.requires_grad_(False)  # a frozen parameter is skipped by both
    opt = make_optimizer(model.parameters())
    if state is not None:
        opt.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g).to(device)
        y = torch.randint(0, 3, (8,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 2:
            model[4].bias.grad = None  # a parameter without a gradient this step is left alone
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 5e-4), (0.9, 0.0), (0.0, 0.0)])
def test_sgd_equals_torch_sgd_bit_for_bit(momentum, weight_decay):
    ours, _ = _sgd_run(lambda ps: SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay))
    ref, _ = _sgd_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay, foreach=False))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sgd_multi_tensor_path_matches_torch_foreach_sgd_on_gpu():
    ours, _ = _sgd_run(lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), device="cuda")
    ref, _ = _sgd_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True), device="cuda")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sgd_state_holds_one_buffer_per_trained_parameter_and_rejects_another_models():
    _, opt = _sgd_run(lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), steps=3)
    state = opt.state_dict()
    assert state["lr"] == 0.1 and len(state["momentum_buffer"]) == 5  # conv w, b; bn bias (bn weight frozen); linear w, b
    assert all(b is not None for b in state["momentum_buffer"])
    with pytest.raises(ValueError, match="momentum buffers for 1 parameters"):
        SGD([torch.zeros(2, requires_grad=True)], lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        SGD([torch.zeros(2, requires_grad=True)], lr=0.1).load_state_dict({"state": {}, "param_groups": []})
