import collections
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from host_syncs import HostSyncs

from ncrobust import attacks
from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel
from ncrobust.cell import Cell
from ncrobust.columns import COLLAPSE_LOG_COLUMNS
from ncrobust.jobs.experiment import build_model
from ncrobust.losses import get_loss
from ncrobust.training.train import (
    SGD,
    NonFiniteLossError,
    PGDStep,
    Recipe,
    Schedule,
    StandardStep,
    TradesStep,
    initial_checkpoint,
    make_optimizer,
    make_train_step,
    train_segment,
)

CONFIG = {"models": {"mlp": {"depth": 2, "width": 32}}}
THREAT = ThreatModel(norm="linf", eps=0.1, step_size=0.05, steps=2)


def _setup(digits, adversary, epochs=4, lr=0.1, loss="ce", model="mlp", threat=THREAT, **options):
    cell = Cell("digits", model, loss, adversary, 3)
    model = build_model(CONFIG, cell, digits)
    recipe = Recipe(adversary=adversary, loss=get_loss(loss), threat=threat, epochs=epochs, batch_size=256, lr=lr, **options)
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


@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_bf16_autocast_training_tracks_fp32_and_resumes_bit_for_bit(digits, adversary):
    """``precision: bf16`` (paper.yaml's) runs the same step under autocast, here the CPU's: its epoch
    losses stay within 1% of fp32 training's, and chained segments still equal one segment."""
    losses = {}
    for dtype in (None, torch.bfloat16):
        cell, model, recipe, x, y = _setup(digits, adversary, epochs=3, autocast_dtype=dtype)
        start = initial_checkpoint(model, recipe)
        straight, rows = train_segment(model, start, x, y, recipe=recipe, end_epoch=3, seed=cell.seed)
        losses[dtype] = [r["loss"] for r in rows]
    first, _ = train_segment(model, start, x, y, recipe=recipe, end_epoch=1, seed=cell.seed)
    chained, _ = train_segment(model, first, x, y, recipe=recipe, end_epoch=3, seed=cell.seed)
    assert _same_state(chained["model"], straight["model"])
    assert losses[None] != losses[torch.bfloat16]  # autocast did act
    for fp32, bf16 in zip(losses[None], losses[torch.bfloat16]):
        assert math.isfinite(bf16) and abs(bf16 - fp32) < 0.01 * fp32


def test_training_lowers_the_loss(digits):
    cell, model, recipe, x, y = _setup(digits, "st", epochs=8)
    _, rows = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=8, seed=1)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[-1]["train_accuracy"] > 0.9
    assert math.isnan(rows[-1]["train_robust_accuracy"])


def test_adversarial_training_logs_robust_accuracy(digits):
    cell, model, recipe, x, y = _setup(digits, "pgd-linf", epochs=2, track_collapse=True)
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
def test_sgd_equals_torch_sgd(momentum, weight_decay):
    """Same update as torch.optim.SGD; not bit for bit since ours multiplies by the lr tensor and
    subtracts (two roundings) where torch adds with alpha=-lr."""
    ours, _ = _sgd_run(lambda ps: SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay))
    ref, _ = _sgd_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay, foreach=False))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sgd_learning_rate_is_read_from_its_tensor_at_every_step():
    """What a captured CUDA graph relies on: setting ``lr`` fills ``lr_tensor`` in place."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = SGD([p], lr=0.1)
    tensor = opt.lr_tensor
    opt.lr = 0.5
    assert opt.lr_tensor is tensor and float(tensor) == 0.5 and opt.state_dict()["lr"] == 0.5
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), 0.5))


@pytest.mark.gpu
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
    one = SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no lr .*delete it and rerun"):
        one.load_state_dict({"momentum_buffer": [None]})


# --------------------------------------------------------------------------------------------
# Checkpoints without RNG state; dropout reproducible across segments


class _DropoutNet(torch.nn.Module):
    """A net whose forward draws from the global RNG (dropout): the draws a checkpoint used to carry."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5))
        self.classifier = torch.nn.Linear(32, 10)

    def forward_features(self, x):
        h = self.body(x)
        return self.classifier(h), h

    def forward(self, x):
        return self.forward_features(x)[0]


def test_dropout_chain_equals_uninterrupted_run_without_rng_state_in_checkpoints(digits):
    x, y = datasets.as_float(digits, "train")
    recipe = Recipe(adversary="st", loss=get_loss("ce"), threat=THREAT, epochs=3, batch_size=256)
    torch.manual_seed(0)
    model = _DropoutNet()
    start = initial_checkpoint(model, recipe)
    straight, _ = train_segment(model, start, x, y, recipe=recipe, end_epoch=3, seed=5)
    ckpt = start
    for end in (1, 3):
        torch.manual_seed(123)  # whatever the global RNG holds between jobs
        ckpt, _ = train_segment(_DropoutNet(), ckpt, x, y, recipe=recipe, end_epoch=end, seed=5)
    assert _same_state(ckpt["model"], straight["model"])


# --------------------------------------------------------------------------------------------
# The training step's attack pieces equal the attacks


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 5)
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_pgd_steps_attack_pieces_equal_training_time_pgd_bit_for_bit(norm):
    """What the PGD step runs (the start drawn outside it, the iterations inside, in the step's
    train mode) is :func:`ncrobust.attacks.pgd` with ``train_mode=True`` from the same generator."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 0.5, 0.03 if norm == "linf" else 0.2, 4)
    model, loss = _bn_net(), get_loss("ce")
    reference_model = _bn_net()
    ref = attacks.pgd(reference_model, x, y, norm=norm, eps=threat.eps, step_size=threat.step_size, steps=threat.steps,
                      loss=loss, generator=torch.Generator().manual_seed(7), train_mode=True)
    model.train()
    attack = PGDStep.attack
    ours = attack.from_start(model, x, y, attack.draw_start(x, threat, torch.Generator().manual_seed(7)), threat, loss_fn=loss)
    assert torch.equal(ours, ref)
    assert torch.equal(model[1].running_mean, reference_model[1].running_mean)  # same train-mode forwards


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_trades_steps_attack_pieces_equal_trades_kl_bit_for_bit(norm):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=g)
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 0.5, 0.03 if norm == "linf" else 0.2, 4)
    model = _bn_net()
    ref = attacks.trades_kl(model, x, norm=norm, eps=threat.eps, step_size=threat.step_size, steps=threat.steps,
                            generator=torch.Generator().manual_seed(3))
    model.eval()
    attack = TradesStep.attack
    ours = attack.from_start(model, x, attack.draw_start(x, threat, torch.Generator().manual_seed(3)), threat)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("adversary, step_class", [("st", StandardStep), ("pgd-linf", PGDStep), ("trades-l2", TradesStep)])
def test_the_step_is_chosen_once_from_the_adversary(digits, adversary, step_class):
    _, model, recipe, x, y = _setup(digits, adversary, epochs=1)
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=64, device=x.device)
    assert type(step) is step_class
    start = step.draw_noise(x[:64], torch.Generator().manual_seed(0))  # no mixup: the attack's draws only
    assert len(start) == {"st": 0, "pgd-linf": 1, "trades-l2": 1}[adversary]
    with pytest.raises(ValueError, match="unknown adversary 'fgsm-linf'"):
        make_train_step(model, make_optimizer(model, recipe), dataclasses.replace(recipe, adversary="fgsm-linf"),
                        num_classes=10, n_train=64, device=x.device)


def test_trades_l2_training_uses_the_recipes_l2_step(digits):
    """``training.trades_l2_step: authors``: the TRADES step attacks with the authors' l2 loop (its
    draws: the start and one per step), and training with it differs from the threat's step."""
    l2 = ThreatModel("l2", 0.5, 0.05, 3)
    finals = {}
    for l2_step in ("threat", "authors"):
        cell, model, recipe, x, y = _setup(digits, "trades-l2", epochs=1, threat=l2, trades_l2_step=l2_step)
        step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=64, device=x.device)
        assert step.attack.l2_step == l2_step
        assert len(step.draw_noise(x[:64], torch.Generator().manual_seed(0))) == (1 if l2_step == "threat" else 1 + l2.steps)
        finals[l2_step], _ = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=1, seed=cell.seed)
    assert not _same_state(finals["threat"]["model"], finals["authors"]["model"])
    with pytest.raises(ValueError, match="training.trades_l2_step = 'paper': not allowed; allowed: threat, authors"):
        Recipe(adversary="trades-l2", loss=get_loss("ce"), threat=l2, epochs=1, trades_l2_step="paper")


# --------------------------------------------------------------------------------------------
# The authors' BatchNorm choices, and one definition of the logged accuracies


def _bn_stats(state):
    return {k: v for k, v in state.items() if "running" in k or "num_batches" in k}


def test_trades_bn_eval_never_moves_the_running_statistics_and_train_does(digits):
    stats = {}
    for mode in ("eval", "train"):
        cell, model, recipe, x, y = _setup(digits, "trades-linf", epochs=1, model="convnet", trades_bn=mode)
        start = initial_checkpoint(model, recipe)
        end, _ = train_segment(model, start, x, y, recipe=recipe, end_epoch=1, seed=1)
        stats[mode] = (_bn_stats(start["model"]), _bn_stats(end["model"]))
    assert stats["eval"][0] and _same_state(*stats["eval"])
    assert not _same_state(*stats["train"])
    with pytest.raises(ValueError, match="trades_bn"):
        Recipe(adversary="trades-linf", loss=get_loss("ce"), threat=THREAT, epochs=1, trades_bn="frozen")


def test_pgd_clean_bn_pass_feeds_only_the_running_statistics(digits):
    """The clean pass of a PGD step never changes the training (train-mode BN normalises by the
    batch): the parameters are the same with and without it; only the running statistics (and
    their counter, one more batch per step) differ."""
    ends = {}
    for clean_pass in (False, True):
        cell, model, recipe, x, y = _setup(digits, "pgd-linf", epochs=1, model="convnet", pgd_clean_bn_pass=clean_pass)
        ends[clean_pass], _ = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=1, seed=1)
    weights = {k: v for k, v in ends[False]["model"].items() if k not in _bn_stats(ends[False]["model"])}
    assert all(torch.equal(v, ends[True]["model"][k]) for k, v in weights.items())
    counter = next(k for k in ends[True]["model"] if k.endswith("num_batches_tracked"))
    steps = recipe.iterations_per_epoch(len(x))
    assert int(ends[True]["model"][counter]) - int(ends[False]["model"][counter]) == steps
    assert not _same_state(_bn_stats(ends[False]["model"]), _bn_stats(ends[True]["model"]))


def test_with_a_zero_radius_the_adversarial_log_equals_the_clean_log(digits):
    """train_accuracy and train_robust_accuracy (and the clean and adversarial NC statistics) have
    one definition: with eps = 0 the adversarial batch is the clean batch, so they coincide."""
    zero = ThreatModel(norm="linf", eps=0.0, step_size=0.01, steps=2)
    cell, model, recipe, x, y = _setup(digits, "pgd-linf", epochs=1, model="convnet", threat=zero, track_collapse=True)
    _, (row,) = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=1, seed=1)
    assert row["train_accuracy"] == row["train_robust_accuracy"] > 0.3
    assert row["nc1_adv"] == pytest.approx(row["nc1_clean"], rel=1e-9)
    assert row["ncc_accuracy_adv"] == row["ncc_accuracy_clean"] == row["ncc_accuracy_clean_means_adv"]
    assert 0.3 < row["ncc_accuracy_clean_means_adv"] <= 1.0


def test_log_has_streaming_collapse_columns(digits):
    cell, model, recipe, x, y = _setup(digits, "pgd-linf", epochs=2, track_collapse=True)
    _, rows = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=2, seed=1)
    for row in rows:
        assert all(math.isfinite(row[c]) and row[c] > 0 for c in COLLAPSE_LOG_COLUMNS)
    cell, model, recipe, x, y = _setup(digits, "st", epochs=1, track_collapse=True)
    _, (row,) = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=1, seed=1)
    assert math.isfinite(row["nc1_clean"]) and math.isnan(row["nc1_adv"]) and math.isnan(row["ncc_accuracy_clean_means_adv"])
    cell, model, recipe, x, y = _setup(digits, "pgd-linf", epochs=1)  # off by default
    _, (row,) = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=1, seed=1)
    assert all(math.isnan(row[c]) for c in COLLAPSE_LOG_COLUMNS)


def test_compile_is_no_longer_a_config_key():
    """torch.compile recompiled in every segment and was slower than eager on an H100; CUDA graphs
    replaced it, and an old config that still names it stops at parse time."""
    import yaml
    from workflow_helpers import REPO_ROOT

    from ncrobust.config import ConfigError, validate_config

    config = yaml.safe_load((REPO_ROOT / "config/config.yaml").read_text())
    validate_config(config)
    with pytest.raises(ConfigError, match="unknown key 'compile'"):
        validate_config({**config, "compile": True})


@pytest.mark.parametrize("adversary", ["pgd-linf", "trades-linf"])
def test_captured_step_buffers_can_be_refilled_after_the_step_consumed_its_attack_start(digits, adversary):
    """Regression (issue 13, found on an H100): the captured step runs on static buffers, and the
    attack consumes its start buffer in place and marks it ``requires_grad``; refilling that buffer
    for the next replay with a plain ``copy_`` raised "a leaf Variable that requires grad is being
    used in an in-place operation" at the first replay of every PGD / TRADES cell."""
    from ncrobust.training.train import _refill

    _, model, recipe, x, y = _setup(digits, adversary, epochs=1)
    xs, ys = x[:64], y[:64]
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=64, device=xs.device)
    gen = torch.Generator().manual_seed(0)
    static = tuple(t.clone() for t in (xs, ys, *step.draw_noise(xs, gen)))
    step(static[0], static[1], static[2:])  # what the capture records, on the same buffers
    assert static[2].requires_grad
    fresh = step.draw_noise(xs, gen)
    _refill(static, (xs, ys, *fresh))
    assert all(torch.equal(a, b) for a, b in zip(static, (xs, ys, *fresh)))


# --------------------------------------------------------------------------------------------
# GPU only: the captured step equals the eager one


PAPER_SWITCHES = {"pgd_clean_bn_pass": True, "trades_bn": "eval", "track_collapse": True}


@pytest.mark.gpu
@pytest.mark.parametrize("adversary, switches", [
    ("st", {}), ("pgd-linf", {}), ("trades-linf", {}),
    ("st", PAPER_SWITCHES), ("pgd-linf", PAPER_SWITCHES), ("trades-linf", PAPER_SWITCHES),
])
def test_cuda_graph_training_equals_eager_training_on_gpu(digits, adversary, switches):
    """Digits at batch 256: 5 full batches and a partial one per epoch, so epoch 1 has 3 warm-up
    steps, the capture and a replay, epoch 2 only replays; the partial batch runs eagerly."""
    from ncrobust.jobs.pipeline import setup

    setup({"device": "cuda", "threads": 1}, deterministic=True)
    results = {}
    for graphed in (False, True):
        cell, model, recipe, x, y = _setup(digits, adversary, epochs=2, model="convnet", cuda_graph=graphed, **switches)
        model, x, y = model.cuda(), x.cuda(), y.cuda()
        results[graphed] = train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=2, seed=1)
    (eager, eager_rows), (graphed, graphed_rows) = results[False], results[True]
    for k, v in eager["model"].items():
        torch.testing.assert_close(graphed["model"][k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_rows, graphed_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=2 / len(x))
        assert (a["nc1_clean"] == pytest.approx(b["nc1_clean"], rel=1e-4)) if switches else math.isnan(b["nc1_clean"])


@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_training_synchronises_per_epoch_not_per_step(digits, adversary):
    """The CPU's view of the GPU test below, for the whole eager epoch (tracked collapse
    included): 8x more steps add no call that would synchronise with a GPU."""
    counts = []
    for batch_size in (512, 64):
        cell, model, recipe, x, y = _setup(digits, adversary, epochs=1, track_collapse=True)
        recipe = dataclasses.replace(recipe, batch_size=batch_size)
        with HostSyncs() as syncs:
            train_segment(model, initial_checkpoint(model, recipe), x, y, recipe=recipe, end_epoch=1, seed=cell.seed)
        counts.append(collections.Counter(syncs.calls))
    assert counts[0] == counts[1]


@pytest.mark.gpu
@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_training_step_makes_no_host_synchronisation_on_gpu(digits, adversary):
    cell, model, recipe, x, y = _setup(digits, adversary, epochs=1, model="convnet")
    model, x, y = model.cuda(), x[:256].cuda(), y[:256].cuda()
    step = make_train_step(model, make_optimizer(model, recipe), recipe, num_classes=10, n_train=256, device=x.device)
    gen = torch.Generator(x.device).manual_seed(0)
    step(x, y, step.draw_noise(x, gen))  # first step: momentum buffers, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(x, y, step.draw_noise(x, gen))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.epoch_log(y)["first_bad_step"] == -1
