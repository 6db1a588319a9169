"""Tests of ncrobust.attacks: agreement with torchattacks, the threat-ball and [0, 1] invariants,
restarts, targeted attacks, strength on a trained digits model, mode restoration, argument
validation and determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ncrobust.attacks import (
    ATTACKS,
    PERTURBATIONS,
    STRONG_ATTACKS,
    ThreatModel,
    TradesKL,
    gaussian,
    perturb,
    pgd,
    random_sign,
    target_labels,
    trades_kl,
)
from ncrobust.losses import get_loss
from ncrobust.models import create_model

torchattacks = pytest.importorskip("torchattacks")

C = 10
TOL = 1e-6


def _mlp(in_chans: int = 3, seed: int = 0, width: int = 32):
    torch.manual_seed(seed)
    return create_model(
        "mlp", num_classes=C, in_chans=in_chans, image_size=8, mean=[0.5] * in_chans, std=[0.25] * in_chans,
        depth=2, width=width,
    ).eval()


def _batch(n: int = 32, in_chans: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, in_chans, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_valid(x_adv, x, *, norm=None, eps=None):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    d = (x_adv - x).flatten(1)
    if norm == "linf":
        assert d.abs().max() <= eps + TOL
    elif norm == "l2":
        assert torch.linalg.vector_norm(d, dim=1).max() <= eps + TOL


EPS = {"linf": 8 / 255, "l2": 0.5}
STEP = {"linf": 2 / 255, "l2": 0.1}


# ---------------------------------------------------------------------------- torchattacks


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_torchattacks_without_random_start(norm, targeted, in_chans):
    # Our model normalises inside, so torchattacks gets it as is (no set_normalization_used).
    # l_inf: identical up to float rounding of the projection. l_2: torchattacks normalises the
    # gradient of the batch-*mean* loss with a 1e-10 guard, we the per-example gradient of the
    # summed loss: the directions differ by ~1e-10 * N / ||g_i|| relative, invisible in float32.
    model = _mlp(in_chans)
    x, y = _batch(48, in_chans)
    eps, step = EPS[norm], STEP[norm]
    if norm == "linf":
        ta = torchattacks.PGD(model, eps=eps, alpha=step, steps=10, random_start=False)
    else:
        ta = torchattacks.PGDL2(model, eps=eps, alpha=step, steps=10, random_start=False)
    labels = y
    if targeted:
        ta.set_mode_targeted_by_function(lambda inputs, labels: (labels + 1) % C, quiet=True)
        labels = target_labels(y, C)
    expected = ta(x, y)
    ours = pgd(model, x, labels, norm=norm, eps=eps, step_size=step, steps=10, random_start=False, targeted=targeted)
    assert (ours - x).abs().max() > 10 * TOL  # the attack moved
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- invariants


def _all_attacks():
    """(id, callable(model, x, y) -> x_adv, norm, eps) for every attack and configuration."""
    cases = []
    for norm in ("linf", "l2"):
        eps, step = EPS[norm], STEP[norm]
        kw = dict(norm=norm, eps=eps, step_size=step, steps=5)
        cases += [
            (f"pgd-{norm}", lambda m, x, y, kw=kw: pgd(m, x, y, generator=_gen(), **kw), norm, eps),
            (f"pgd-{norm}-nostart", lambda m, x, y, kw=kw: pgd(m, x, y, random_start=False, **kw), norm, eps),
            (f"pgd-{norm}-restarts", lambda m, x, y, kw=kw: pgd(m, x, y, restarts=3, generator=_gen(), **kw), norm, eps),
            (f"pgd-{norm}-targeted", lambda m, x, y, kw=kw: pgd(m, x, target_labels(y, C), targeted=True,
                                                               restarts=2, generator=_gen(), **kw), norm, eps),
            (f"pgd-{norm}-train", lambda m, x, y, kw=kw: pgd(m, x, y, train_mode=True, generator=_gen(), **kw), norm, eps),
            (f"pgd-{norm}-bigstep", lambda m, x, y, norm=norm, eps=eps: pgd(m, x, y, norm=norm, eps=eps,
                                                                           step_size=3 * eps, steps=3, generator=_gen()), norm, eps),
            (f"pgd-{norm}-bf16", lambda m, x, y, kw=kw: pgd(m, x, y, autocast_dtype=torch.bfloat16, generator=_gen(),
                                                           **kw), norm, eps),
            (f"trades-{norm}", lambda m, x, y, kw=kw: trades_kl(m, x, generator=_gen(), **kw), norm, eps),
            (f"trades-{norm}-bigstep", lambda m, x, y, norm=norm, eps=eps: trades_kl(m, x, norm=norm, eps=eps,
                                                                                    step_size=3 * eps, steps=2, generator=_gen()),
             norm, eps),
        ]
        threat = ThreatModel(norm, eps, step, 5)
        for name in PERTURBATIONS:
            # linf gaussian noise is eps per pixel, not bounded (Su et al.); everything else stays in the ball
            bound_norm = None if (name, norm) == ("gaussian", "linf") else norm
            cases.append((f"perturb-{name}-{norm}",
                          lambda m, x, y, name=name, threat=threat: perturb(name, m, x, y, threat=threat, num_classes=C,
                                                                            generator=_gen(), batch_size=13),
                          bound_norm, eps))
        cases.append((f"pgd-strong-{norm}",
                      lambda m, x, y, threat=threat: perturb("pgd-strong", m, x, y, threat=threat, num_classes=C, seed=0),
                      norm, eps))
        for name in ("apgd-ce", "apgd-t"):
            cases.append((f"{name}-{norm}",
                          lambda m, x, y, name=name, threat=threat: perturb(
                              name, m, x, y, threat=ThreatModel(threat.norm, threat.eps, threat.step_size, 1),
                              num_classes=C, seed=0), norm, eps))
    return cases


ALL = _all_attacks()


@pytest.mark.parametrize("case", ALL, ids=[c[0] for c in ALL])
def test_output_in_unit_box_and_ball(case):
    _, attack, norm, eps = case
    model = _mlp(1)
    x, y = _batch(32, 1)
    x[:4] = 0.0  # saturated pixels exercise the [0, 1] clamp
    x[4:8] = 1.0
    _assert_valid(attack(model, x, y), x, norm=norm, eps=eps)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_noise_definitions(norm):
    x = torch.full((16, 1, 8, 8), 0.5)
    s = random_sign(x, eps=0.1, generator=_gen())
    torch.testing.assert_close((s - x).abs(), torch.full_like(x, 0.1))
    g = gaussian(x, eps=0.05, generator=_gen())
    noise = (g - x).flatten()
    assert abs(noise.std().item() - 0.05) < 0.01 and abs(noise.mean().item()) < 0.01
    _assert_valid(gaussian(torch.rand(8, 1, 8, 8), eps=2.0, generator=_gen()), torch.rand(8, 1, 8, 8))


def test_clean_and_zero_eps_return_inputs():
    model = _mlp(1)
    x, y = _batch(16, 1)
    threat = ThreatModel("linf", 0.1, 0.02, 3)
    assert torch.equal(perturb("clean", model, x, y, threat=threat, num_classes=C), x)
    for norm in ("linf", "l2"):
        assert torch.equal(pgd(model, x, y, norm=norm, eps=0.0, step_size=0.1, steps=3, generator=_gen()), x)
    assert torch.equal(perturb("pgd-strong", model, x, y, threat=ThreatModel("l2", 0.0, 0.1, 1), num_classes=C, seed=0), x)


# ---------------------------------------------------------------------------- restarts, targets


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_keep_the_worst_case(norm):
    model = _mlp(3)
    x, y = _batch(64, 3)
    kw = dict(norm=norm, eps=EPS[norm], step_size=STEP[norm], steps=3)
    one = pgd(model, x, y, generator=_gen(5), **kw)
    many = pgd(model, x, y, restarts=4, generator=_gen(5), **kw)
    l1, l4 = _ce(model, one, y), _ce(model, many, y)
    assert (l4 >= l1 - 1e-6).all()
    assert (l4 > l1 + 1e-6).any()  # restarts found something better somewhere
    t = target_labels(y, C)
    one = pgd(model, x, t, targeted=True, generator=_gen(5), **kw)
    many = pgd(model, x, t, targeted=True, restarts=4, generator=_gen(5), **kw)
    assert (_ce(model, many, t) <= _ce(model, one, t) + 1e-6).all()


def test_target_labels():
    assert target_labels(torch.tensor([0, 3, 9]), 10).tolist() == [1, 4, 0]
    with pytest.raises(ValueError):
        target_labels(torch.tensor([10]), 10)


@pytest.mark.parametrize("loss", ["mse", "focal", "label_smoothing"])
def test_other_losses_are_ascended(loss):
    model = _mlp(1)
    x, y = _batch(32, 1)
    fn = get_loss(loss)
    x_adv = pgd(model, x, y, norm="linf", eps=0.1, step_size=0.02, steps=5, loss=fn, generator=_gen())
    with torch.no_grad():
        assert fn(model(x_adv), y) > fn(model(x), y)


def test_trades_kl_increases_divergence():
    model = _mlp(1)
    x, _ = _batch(32, 1)
    with torch.no_grad():
        p = model(x).softmax(1)
    for norm in ("linf", "l2"):
        x_adv = trades_kl(model, x, norm=norm, eps=EPS[norm], step_size=STEP[norm], steps=5, generator=_gen())
        with torch.no_grad():
            kl = F.kl_div(model(x_adv).log_softmax(1), p, reduction="sum")
        assert kl > 1e-3


def test_perturb_batch_size_is_plumbing_only():
    model = _mlp(1)
    x, y = _batch(30, 1)
    threat = ThreatModel("l2", 0.5, 0.1, 4)
    chunked = perturb("pgd", model, x, y, threat=threat, num_classes=C, generator=_gen(3), batch_size=8)
    g = _gen(3)
    manual = torch.cat([pgd(model, x[i:i + 8], y[i:i + 8], norm="l2", eps=0.5, step_size=0.1, steps=4, generator=g)
                        for i in range(0, 30, 8)])
    assert torch.equal(chunked, manual)
    over = perturb("pgd", model, x, y, threat=threat, num_classes=C, generator=_gen(3), steps=1, eps=0.05,
                   step_size=0.2)
    _assert_valid(over, x, norm="l2", eps=0.05)


def test_one_registry_serves_the_evaluation_and_the_strong_evaluation():
    """Every attack is called through ``perturb``; ``restarts`` overrides PGD's and is ignored by
    attacks without restarts; the randomness is the generator or, for the seeded attacks, the seed."""
    assert tuple(ATTACKS) == PERTURBATIONS + STRONG_ATTACKS
    assert [name for name, attack in ATTACKS.items() if attack.seeded] == list(STRONG_ATTACKS)
    model = _mlp(1)
    x, y = _batch(16, 1)
    threat = ThreatModel("linf", 0.1, 0.02, 3)
    restarted = perturb("pgd", model, x, y, threat=threat, num_classes=C, generator=_gen(2), restarts=3)
    assert torch.equal(restarted, pgd(model, x, y, norm="linf", eps=0.1, step_size=0.02, steps=3, restarts=3, generator=_gen(2)))
    noise = perturb("gaussian", model, x, y, threat=threat, num_classes=C, generator=_gen(2), restarts=3)
    assert torch.equal(noise, gaussian(x, eps=0.1, generator=_gen(2)))


# ---------------------------------------------------------------------------- strength


@pytest.fixture(scope="module")
def digits_model():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    X = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    Y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=[0.3], std=[0.4], depth=2, width=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(30):
        model.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            loss = F.cross_entropy(model(X[b]), Y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, X[test], Y[test]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_pgd_breaks_a_standard_model(digits_model):
    model, x, y = digits_model
    clean = _acc(model, x, y)
    assert clean > 0.9
    for norm, eps in (("linf", 0.15), ("l2", 1.0)):
        robust = _acc(model, perturb("pgd", model, x, y, threat=ThreatModel(norm, eps, eps / 4, 10), num_classes=10,
                                     generator=_gen()), y)
        assert robust < clean / 2, (norm, clean, robust)
        noisy = _acc(model, perturb("sign", model, x, y, threat=ThreatModel(norm, 0.05, 0.01, 1), num_classes=10,
                                    generator=_gen()), y)
        assert noisy > robust  # random noise is much weaker than PGD


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_raises_target_probability(digits_model, norm):
    model, x, y = digits_model
    t = target_labels(y, C)
    eps = {"linf": 0.15, "l2": 1.0}[norm]
    threat = ThreatModel(norm, eps, eps / 4, 10)
    x_adv = perturb("pgd-targeted", model, x, y, threat=threat, num_classes=C, generator=_gen())
    with torch.no_grad():
        p_clean = model(x).softmax(1).gather(1, t[:, None]).mean()
        p_adv = model(x_adv).softmax(1).gather(1, t[:, None]).mean()
    assert p_adv > 2 * p_clean
    assert (model(x_adv).argmax(1) == t).float().mean() > 0.3  # hit rate
    untargeted = perturb("pgd", model, x, y, threat=threat, num_classes=C, generator=_gen())
    assert _ce(model, untargeted, y).mean() > _ce(model, x, y).mean()


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_strong_attacks_no_weaker_than_pgd10(digits_model, norm, eps):
    model, x, y = digits_model
    threat = ThreatModel(norm, eps, eps / 4, 10)
    pgd10 = _acc(model, perturb("pgd", model, x, y, threat=threat, num_classes=10, generator=_gen()), y)
    assert pgd10 < _acc(model, x, y) - 0.2
    for name in ("pgd-strong", "apgd-ce", "apgd-t"):
        x_adv = perturb(name, model, x, y, threat=threat, num_classes=10, seed=0)
        _assert_valid(x_adv, x, norm=norm, eps=eps)
        assert _acc(model, x_adv, y) <= pgd10 + 0.01, name


def test_apgd_uses_autoattack_settings(monkeypatch):
    seen = {}
    for cls in ("APGD", "APGDT"):
        orig = getattr(torchattacks, cls)

        def spy(*args, _orig=orig, _cls=cls, **kwargs):
            seen[_cls] = kwargs
            return _orig(*args, **kwargs)

        monkeypatch.setattr(torchattacks, cls, spy)
    model = _mlp(1)
    x, y = _batch(8, 1)
    threat = ThreatModel("l2", 0.5, 0.1, 10)
    perturb("apgd-ce", model, x, y, threat=threat, num_classes=C, seed=3)
    perturb("apgd-t", model, x, y, threat=threat, num_classes=C, seed=3)
    assert seen["APGD"]["steps"] == 100 and seen["APGD"]["n_restarts"] == 1 and seen["APGD"]["loss"] == "ce"
    assert seen["APGD"]["norm"] == "L2" and seen["APGD"]["eps"] == 0.5 and seen["APGD"]["rho"] == 0.75
    assert seen["APGDT"]["steps"] == 100 and seen["APGDT"]["n_restarts"] == 1 and seen["APGDT"]["n_classes"] == 10
    assert seen["APGDT"]["seed"] == 3 and seen["APGDT"]["rho"] == 0.75


# ---------------------------------------------------------------------------- modes, grads, RNG


@pytest.mark.parametrize("start_training", [False, True])
@pytest.mark.parametrize("case", ALL, ids=[c[0] for c in ALL])
def test_model_mode_restored(case, start_training):
    _, attack, _, _ = case
    model = _mlp(1)
    model.train(start_training)
    model.stages.layer1[1].train(not start_training)  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    x, y = _batch(16, 1)
    attack(model, x, y)
    assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_on_error_and_eval_attack_leaves_bn_stats():
    model = _mlp(1).train()
    x, y = _batch(16, 1)
    y[0] = C  # out of range: found from the model's output width, inside the attack loop
    with pytest.raises(ValueError, match="labels"):
        pgd(model, x, y, norm="linf", eps=0.1, step_size=0.02, steps=2)
    assert model.training and all(m.training for m in model.modules())
    y[0] = 0
    state = copy.deepcopy(model.state_dict())
    pgd(model, x, y, norm="linf", eps=0.1, step_size=0.02, steps=2, generator=_gen())
    trades_kl(model, x, norm="linf", eps=0.1, step_size=0.02, steps=2, generator=_gen())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    pgd(model, x, y, norm="linf", eps=0.1, step_size=0.02, steps=2, generator=_gen(), train_mode=True)
    assert not torch.equal(model.state_dict()["head.1.running_mean"], state["head.1.running_mean"])


@pytest.mark.parametrize("case", ALL, ids=[c[0] for c in ALL])
def test_deterministic_given_seed(case):
    _, attack, _, _ = case
    model = _mlp(1)
    x, y = _batch(16, 1)
    torch.manual_seed(123)
    a = attack(model, x, y)
    torch.manual_seed(456)  # the global RNG must not matter when a generator/seed is given
    b = attack(model, x, y)
    assert torch.equal(a, b)


def test_generator_controls_the_randomness():
    model = _mlp(1)
    x, y = _batch(16, 1)
    kw = dict(norm="l2", eps=0.5, step_size=0.1, steps=1)
    assert not torch.equal(pgd(model, x, y, generator=_gen(1), **kw), pgd(model, x, y, generator=_gen(2), **kw))
    state = torch.get_rng_state()
    pgd(model, x, y, generator=_gen(1), **kw)
    perturb("apgd-ce", model, x, y, threat=ThreatModel("linf", 0.1, 0.02, 1), num_classes=C, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # neither our attacks nor torchattacks' seeding leak
    torch.manual_seed(0)
    a = gaussian(x, eps=0.1)
    torch.manual_seed(0)
    assert torch.equal(a, gaussian(x, eps=0.1))


# ---------------------------------------------------------------------------- bad arguments


def _bad_calls():
    model = _mlp(1)
    x, y = _batch(8, 1)
    ok = dict(norm="linf", eps=0.1, step_size=0.02, steps=2)
    th = ThreatModel("linf", 0.1, 0.02, 2)
    return {
        "threat-norm": (lambda: ThreatModel("l1", 0.1, 0.02, 2), r"unknown norm 'l1'; allowed: linf, l2"),
        "threat-eps": (lambda: ThreatModel("linf", -0.1, 0.02, 2), r"eps must be a finite number >= 0, got -0.1"),
        "threat-eps-nan": (lambda: ThreatModel("linf", math.nan, 0.02, 2), r"eps must be a finite number >= 0, got nan"),
        "threat-eps-inf": (lambda: ThreatModel("linf", math.inf, 0.02, 2), r"eps must be a finite number >= 0, got inf"),
        "threat-step": (lambda: ThreatModel("linf", 0.1, 0.0, 2), r"step_size must be a finite number > 0, got 0.0"),
        "threat-steps": (lambda: ThreatModel("linf", 0.1, 0.02, 0), r"steps must be an integer >= 1, got 0"),
        "threat-steps-float": (lambda: ThreatModel("linf", 0.1, 0.02, 2.0), r"steps must be an integer >= 1, got 2.0"),
        "pgd-norm": (lambda: pgd(model, x, y, **{**ok, "norm": "l3"}), r"unknown norm 'l3'"),
        "pgd-eps": (lambda: pgd(model, x, y, **{**ok, "eps": -1.0}), r"eps must be a finite number >= 0, got -1.0"),
        "pgd-steps": (lambda: pgd(model, x, y, **{**ok, "steps": 0}), r"steps must be an integer >= 1, got 0"),
        "pgd-step-size": (lambda: pgd(model, x, y, **{**ok, "step_size": -0.1}), r"step_size must be a finite number > 0, got -0.1"),
        "pgd-restarts": (lambda: pgd(model, x, y, restarts=0, **ok), r"restarts must be an integer >= 1, got 0"),
        "pgd-label-high": (lambda: pgd(model, x, torch.full_like(y, C), **ok), r"labels must lie in \[0, 10\), got values in \[10, 10\]"),
        "pgd-label-neg": (lambda: pgd(model, x, torch.full_like(y, -1), **ok), r"labels must lie in \[0, 10\), got values in \[-1, -1\]"),
        "pgd-label-float": (lambda: pgd(model, x, y.float(), **ok), r"y must be an integer tensor"),
        "pgd-x-high": (lambda: pgd(model, x + 1.0, y, **ok), r"x must lie in \[0, 1\], got values in \[1\."),
        "pgd-x-low": (lambda: pgd(model, x - 1.0, y, **ok), r"x must lie in \[0, 1\], got values in \[-0\."),
        "pgd-x-nan": (lambda: pgd(model, x.masked_fill(x > 0.5, math.nan), y, **ok), r"x must lie in \[0, 1\], got values in \[nan"),
        "pgd-shape": (lambda: pgd(model, x, y[:-1], **ok), r"y must have shape \[8\] to match x"),
        "pgd-shape-2d": (lambda: pgd(model, x, y[:, None], **ok), r"y must have shape \[8\] to match x .*got \(8, 1\)"),
        "pgd-loss": (lambda: pgd(model, x, y, loss=3, **ok), r"loss must be None, a loss name or a callable, got int"),
        "trades-norm": (lambda: trades_kl(model, x, **{**ok, "norm": "L2"}), r"unknown norm 'L2'"),
        "trades-x": (lambda: trades_kl(model, x * 2, **ok), r"x must lie in \[0, 1\]"),
        "gaussian-eps": (lambda: gaussian(x, eps=-0.1), r"eps must be a finite number >= 0"),
        "sign-x": (lambda: random_sign(x - 1, eps=0.1), r"x must lie in \[0, 1\]"),
        "perturb-name": (lambda: perturb("fgsm", model, x, y, threat=th, num_classes=C), r"unknown attack 'fgsm'; allowed: clean, pgd, pgd-targeted, gaussian, sign, trades-kl, pgd-strong, apgd-ce, apgd-t"),
        "perturb-labels": (lambda: perturb("clean", model, x, torch.full_like(y, C), threat=th, num_classes=C), r"labels must lie in \[0, 10\)"),
        "perturb-num-classes": (lambda: perturb("pgd", model, x, y, threat=th, num_classes=1), r"num_classes must be an integer >= 2, got 1"),
        "perturb-threat": (lambda: perturb("pgd", model, x, y, threat=(0.1,), num_classes=C), r"threat must be a ThreatModel, got tuple"),
        "perturb-eps": (lambda: perturb("gaussian", model, x, y, threat=th, num_classes=C, eps=-1.0), r"eps must be a finite number >= 0, got -1.0"),
        "perturb-steps": (lambda: perturb("pgd", model, x, y, threat=th, num_classes=C, steps=0), r"steps must be an integer >= 1, got 0"),
        "perturb-restarts": (lambda: perturb("pgd", model, x, y, threat=th, num_classes=C, restarts=0), r"restarts must be an integer >= 1, got 0"),
        "perturb-batch": (lambda: perturb("pgd", model, x, y, threat=th, num_classes=C, batch_size=0), r"batch_size must be None or an integer >= 1, got 0"),
        "strong-name": (lambda: perturb("cw", model, x, y, threat=th, num_classes=C, seed=0), r"unknown attack 'cw'"),
        "strong-generator": (lambda: perturb("pgd-strong", model, x, y, threat=th, num_classes=C, seed=0, generator=_gen()),
                             r"pgd-strong is seeded by seed=, not by a generator"),
        "perturb-seed": (lambda: perturb("pgd", model, x, y, threat=th, num_classes=C, seed=0), r"pgd draws from generator=, not from seed="),
        "strong-seed": (lambda: perturb("apgd-ce", model, x, y, threat=th, num_classes=C, seed=None), r"seed must be an integer, got None"),
        "strong-labels": (lambda: perturb("apgd-t", model, x, y + C, threat=th, num_classes=C, seed=0), r"labels must lie in \[0, 10\)"),
        "strong-classes": (lambda: perturb("apgd-t", model, x, y % 3, threat=th, num_classes=3, seed=0), r"apgd-t needs at least 4 classes"),
        "target-classes": (lambda: target_labels(y, 1), r"num_classes must be an integer >= 2, got 1"),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments_raise_one_line_naming_the_argument(name):
    call, message = BAD[name]
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["gaussian", "sign"])
def test_noise_has_the_threat_models_size_in_its_norm(kind):
    """l2 noise is a random direction of l2 length eps (not eps per pixel: sqrt(D) times the
    budget); linf noise is eps per pixel, as Su et al.'s evaluation."""
    x = torch.full((64, 3, 8, 8), 0.5)  # mid-grey: no clamping at these sizes
    D = x[0].numel()
    l2 = perturb(kind, _mlp(3), x, torch.zeros(64, dtype=torch.int64), threat=ThreatModel("l2", 0.5, 0.1, 1),
                 num_classes=C, generator=_gen())
    torch.testing.assert_close(torch.linalg.vector_norm((l2 - x).flatten(1), dim=1), torch.full((64,), 0.5))
    linf = perturb(kind, _mlp(3), x, torch.zeros(64, dtype=torch.int64), threat=ThreatModel("linf", 0.03, 0.01, 1),
                   num_classes=C, generator=_gen())
    per_pixel = (linf - x).flatten()
    if kind == "sign":
        torch.testing.assert_close(per_pixel.abs(), torch.full_like(per_pixel, 0.03))
        torch.testing.assert_close((l2 - x).abs().flatten(), torch.full((64 * D,), 0.5 / math.sqrt(D)))
    else:
        assert abs(per_pixel.std().item() - 0.03) < 0.002
        directions = (l2 - x).flatten(1) / 0.5
        assert abs(directions.mean().item()) < 0.01  # no preferred direction


def test_trades_kl_perturbation_is_the_trades_attack_against_the_model():
    model, (x, y) = _mlp(1), _batch(16, 1)
    th = ThreatModel("linf", 0.1, 0.02, 3)
    got = perturb("trades-kl", model, x, y, threat=th, num_classes=C, generator=_gen())
    want = trades_kl(model, x, norm="linf", eps=0.1, step_size=0.02, steps=3, generator=_gen())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "trades-kl" in PERTURBATIONS


def _authors_trades_l2(model, x_natural, epsilon, perturb_steps, draws):
    """The l2 branch of ``attack_trades`` in Su et al.'s ``train.py`` / ``eval.py`` (TRADES'
    ``trades.py`` the same), written out as there: SGD on ``delta`` with lr ``2 eps / steps`` on the
    negated KL, the gradient renormed per example, ``randn_like`` where it is zero, then clamp and
    ``renorm_``. The model takes [0, 1] inputs (ours normalises inside); the random numbers come
    from ``draws`` (the start, then one tensor per step, of which the zero-gradient rows are taken)
    instead of the global RNG. Returns the examples and how many zero-gradient rows there were."""
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    batch_size = len(x_natural)
    delta = (0.001 * draws[0]).detach().requires_grad_(True)
    optimizer_delta = torch.optim.SGD([delta], lr=epsilon / perturb_steps * 2)
    zero_rows = 0
    for i in range(perturb_steps):
        adv = x_natural + delta
        optimizer_delta.zero_grad()
        with torch.enable_grad():
            loss = (-1) * criterion_kl(F.log_softmax(model(adv), dim=1), F.softmax(model(x_natural), dim=1))
        loss.backward()
        grad_norms = delta.grad.view(batch_size, -1).norm(p=2, dim=1)
        delta.grad.div_(grad_norms.view(-1, 1, 1, 1))
        if (grad_norms == 0).any():
            delta.grad[grad_norms == 0] = draws[1 + i][grad_norms == 0]
            zero_rows += int((grad_norms == 0).sum())
        optimizer_delta.step()
        delta.data.add_(x_natural)
        delta.data.clamp_(0, 1).sub_(x_natural)
        delta.data.renorm_(p=2, dim=0, maxnorm=epsilon)
    return (x_natural + delta).detach(), zero_rows


def _half_dead():
    """A ReLU network whose hidden units are all off for dark images: their logits are constant,
    so TRADES' KL gradient is exactly zero there; bright images have a gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, C)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.0, 0.1)
        model[1].bias.fill_(-1.0)
    x, _ = _batch(32, 1)
    x[:16] *= 0.05  # dark: every pre-activation below -0.96, also after the steps
    return model, x


@pytest.mark.parametrize("case", ["mlp", "zero gradients"])
def test_trades_l2_authors_step_is_the_authors_loop(case):
    """``l2_step="authors"`` (``training.trades_l2_step: authors``) equals a direct
    reimplementation of the authors' l2 loop from the same random numbers, zero gradients included;
    the default (``threat``) steps by the threat's step size instead."""
    model, x = (_mlp(1), _batch(32, 1)[0]) if case == "mlp" else _half_dead()
    for p in model.parameters():
        p.requires_grad_(False)
    th = ThreatModel("l2", 0.5, 0.05, 5)
    attack = TradesKL(l2_step="authors")
    draws = attack.draw_start(x, th, _gen())
    assert len(draws) == 1 + th.steps
    want, zero_rows = _authors_trades_l2(model, x, th.eps, th.steps, [d.clone() for d in draws])
    assert (zero_rows > 0) == (case == "zero gradients")
    got = perturb("trades-kl", model, x, x.new_zeros(len(x), dtype=torch.int64), threat=th, num_classes=C,
                  generator=_gen(), l2_step="authors")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(attack.from_start(model, x, draws, th), want, rtol=0, atol=2e-6)  # the training's pieces
    _assert_valid(got, x, norm="l2", eps=th.eps)
    threat_step = trades_kl(model, x, norm="l2", eps=th.eps, step_size=th.step_size, steps=th.steps, generator=_gen())
    assert (threat_step - want).abs().max() > 1e-3
    if case == "zero gradients":  # the threat's step leaves a zero-gradient example at its start
        torch.testing.assert_close(threat_step[:16], (x + 0.001 * TradesKL().draw_start(x, th, _gen())[0])[:16].clamp(0, 1))
    # l_inf: the step is the threat's either way, and the same draws
    linf = ThreatModel("linf", 0.1, 0.02, 3)
    assert len(attack.draw_start(x, linf, _gen())) == 1
    torch.testing.assert_close(perturb("trades-kl", model, x, x.new_zeros(len(x), dtype=torch.int64), threat=linf,
                                       num_classes=C, generator=_gen(), l2_step="authors"),
                               trades_kl(model, x, norm="linf", eps=0.1, step_size=0.02, steps=3, generator=_gen()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="trades l2_step 'paper'; allowed: threat, authors"):
        TradesKL(l2_step="paper")


def _confident_linear() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A linear classifier sure of class 0 by a logit margin of ~10 on 8x8 grey images, and a batch
    labelled 0: ``1 - p_0`` (~4e-4) exists in fp32 and rounds to 0 in bf16 (below 2^-9)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, C)).eval()
    with torch.no_grad():
        model[1].weight.normal_(0.0, 0.1)
        model[1].bias.zero_()[0] = 10.0
    x, _ = _batch(64, 1)
    return model, x, torch.zeros(64, dtype=torch.int64)


def test_pgd_under_bf16_autocast_ascends_the_fp32_loss_of_confident_examples():
    """The attack's loss is taken on fp32 logits: a bf16 cross-entropy rounds ``p_0 - 1`` to 0 and
    drops the 'lower the true logit' half of the gradient, which weakened bf16 PGD on standard
    networks (benchmarks/attack_precision.py). One sign step from x agrees with fp32's."""
    model, x, y = _confident_linear()
    kw = dict(norm="linf", eps=0.1, step_size=0.1, steps=1, random_start=False)
    fp32 = pgd(model, x, y, **kw)
    bf16 = pgd(model, x, y, autocast_dtype=torch.bfloat16, **kw)
    moved = (x > 0.1) & (x < 0.9)  # away from the [0, 1] clamp: the step's sign shows
    agree = (torch.sign(bf16 - x) == torch.sign(fp32 - x))[moved].float().mean().item()
    assert agree > 0.95, agree
    assert ((fp32 - x)[moved] != 0).all()


def test_trades_kl_first_step_runs_in_fp32_under_any_autocast():
    """TRADES starts 0.001 from x, below bf16's resolution: its first step (and the clean
    prediction it compares against) run in fp32, also inside a caller's autocast (the training
    step), so one step under bf16 equals one step in fp32 bit for bit."""
    model, (x, _) = _mlp(1), _batch(32, 1)
    kw = dict(norm="linf", eps=0.1, step_size=0.02, steps=1)
    fp32 = trades_kl(model, x, generator=_gen(), **kw)
    torch.testing.assert_close(trades_kl(model, x, generator=_gen(), autocast_dtype=torch.bfloat16, **kw), fp32, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = trades_kl(model, x, generator=_gen(), **kw)
    torch.testing.assert_close(inside, fp32, rtol=0, atol=0)
    later = trades_kl(model, x, generator=_gen(), autocast_dtype=torch.bfloat16, **{**kw, "steps": 3})
    _assert_valid(later, x, norm="linf", eps=0.1)
