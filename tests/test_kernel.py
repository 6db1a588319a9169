"""Tests of ncrobust.kernel: the empirical NTK against J J^T from an explicit Jacobian, blockwise ==
one-shot, the planner's budget and refusals, the measured memory of a PreActResNet18 kernel, and
the kernel-dynamics functions on kernels with known answers."""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ncrobust.attacks import ThreatModel, perturb
from ncrobust.kernel import (
    eigen_feature_accuracy,
    eigendecomposition,
    empirical_ntk,
    kernel_distance,
    kernel_similarity,
    kernel_target_alignment,
    kernel_velocity,
    logit_trace,
    plan_ntk,
    polar_view,
    top_eigenvalue_mass,
)
from ncrobust.kernel import ntk as ntk_module
from ncrobust.models import create_model

REPO = Path(__file__).resolve().parents[1]
# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def tiny_mlp(dtype=torch.float64) -> nn.Module:
    """The project's MLP (Normalize -> Linear -> BatchNorm -> ReLU ... -> classifier), tiny, with
    BatchNorm running statistics moved away from their initial values; left in train mode."""
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_chans=1, image_size=(1, 5), mean=(0.5,), std=(0.25,), depth=2, width=4)
    model = model.to(dtype).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 1, 5, dtype=dtype))
    return model


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, C, P]: ``torch.autograd.functional.jacobian`` of the eval-mode logits over the flattened
    trainable parameters (the reference the NTK must equal as J J^T)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().flatten() for n in names])
    buffers = dict(model.named_buffers())

    def logits(theta):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return torch.func.functional_call(model, (out, buffers), (x.to(theta.dtype),))

    was = model.training
    model.eval()
    try:
        return torch.autograd.functional.jacobian(logits, flat)
    finally:
        model.train(was)


def random_psd(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return A @ A.T


def anonymous_rss() -> int:
    """Resident memory not backed by files (the tensors; not the libraries' code pages), bytes."""
    with open("/proc/self/statm") as fh:
        fields = fh.read().split()
    return (int(fields[1]) - int(fields[2])) * resource.getpagesize()


# ------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["trace", "full"])
def test_ntk_equals_explicit_jacobian(kind):
    model = tiny_mlp()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(5, 1, 1, 5, generator=g), torch.rand(3, 1, 1, 5, generator=g)
    J1, J2 = explicit_jacobian(model, x1), explicit_jacobian(model, x2)  # [N, C, P]
    C = J1.shape[1]
    if kind == "trace":
        expected, expected_cross = torch.einsum("ncp,mcp->nm", J1, J1), torch.einsum("ncp,mcp->nm", J1, J2)
    else:
        expected = torch.einsum("ncp,mdp->ncmd", J1, J1).reshape(5 * C, 5 * C)
        expected_cross = torch.einsum("ncp,mdp->ncmd", J1, J2).reshape(5 * C, 3 * C)
    K = empirical_ntk(model, x1, kind=kind)
    K_cross = empirical_ntk(model, x1, x2, kind=kind)
    assert K.dtype == torch.float64 and K.shape == expected.shape and K_cross.shape == expected_cross.shape
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K_cross, expected_cross, rtol=1e-12, atol=1e-12)
    assert torch.equal(K, K.T)
    # eval mode inside (BatchNorm on its running statistics), the caller's mode and buffers after
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    if kind == "full":
        torch.testing.assert_close(logit_trace(K, C), empirical_ntk(model, x1), rtol=1e-12, atol=1e-12)


def test_ntk_uses_running_statistics_not_batch_statistics():
    """In train mode BatchNorm would mix the samples; the NTK of a sample must not depend on the
    others in its batch."""
    model = tiny_mlp()
    x = torch.rand(4, 1, 1, 5, generator=torch.Generator().manual_seed(2))
    K = empirical_ntk(model, x)
    K_alone = torch.stack([empirical_ntk(model, x[i : i + 1])[0, 0] for i in range(4)])
    torch.testing.assert_close(K.diagonal(), K_alone, rtol=1e-12, atol=0)


def test_ntk_skips_frozen_parameters():
    model = tiny_mlp()
    x = torch.rand(3, 1, 1, 5, generator=torch.Generator().manual_seed(3))
    for p in model.classifier.parameters():
        p.requires_grad_(False)
    J = explicit_jacobian(model, x)  # over the trainable parameters only
    torch.testing.assert_close(empirical_ntk(model, x), torch.einsum("ncp,mcp->nm", J, J), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["trace", "full"])
def test_blockwise_equals_one_shot(kind):
    model = tiny_mlp()
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.rand(7, 1, 1, 5, generator=g), torch.rand(4, 1, 1, 5, generator=g)
    one_shot = empirical_ntk(model, x1, kind=kind)
    assert len(plan_ntk(model, x1, kind=kind).chunks) == 1
    tiny = plan_ntk(model, x1, kind=kind, memory_bytes=one_shot.numel() * 8 + 20_000, sample_block=2,
                    logit_block=1 if kind == "trace" else None, max_chunk_numel=5)
    assert len(tiny.chunks) > 10 and tiny.sample_block == 2
    sliced = [piece for chunk in tiny.chunks for piece in chunk if piece[2] - piece[1] < model.get_parameter(piece[0]).numel()]
    assert sliced, "the budget should cut tensors into slices"
    assert tiny.peak_bytes <= tiny.memory_bytes
    torch.testing.assert_close(empirical_ntk(model, x1, plan=tiny), one_shot, rtol=1e-12, atol=1e-13)
    cross = plan_ntk(model, x1, x2, kind=kind, memory_bytes=30_000, sample_block=3, max_chunk_numel=6)
    assert len(cross.chunks) > 10
    torch.testing.assert_close(empirical_ntk(model, x1, x2, plan=cross), empirical_ntk(model, x1, x2, kind=kind),
                               rtol=1e-12, atol=1e-13)


def test_planner_searches_within_the_budget():
    """Without fixed blocks the planner finds many-chunk plans for a tight budget, and the same
    kernel comes out (to float32 rounding for a float32 model: per-sample gradients computed in
    batches of another size round differently)."""
    model = tiny_mlp(torch.float32)
    x = torch.rand(6, 1, 1, 5, generator=torch.Generator().manual_seed(5))
    roomy = plan_ntk(model, x)
    tight = plan_ntk(model, x, memory_bytes=roomy.kernel_bytes + 4000)
    assert len(roomy.chunks) == 1 and len(tight.chunks) > 1
    assert tight.peak_bytes <= 4000 + roomy.kernel_bytes
    assert "parameter chunk" in tight.describe() and "memory_bytes=" in tight.describe()
    torch.testing.assert_close(empirical_ntk(model, x, plan=tight), empirical_ntk(model, x), rtol=1e-6, atol=1e-6)


def test_deterministic_bits():
    model = tiny_mlp(torch.float32)
    x = torch.rand(6, 1, 1, 5, generator=torch.Generator().manual_seed(6))
    plan = plan_ntk(model, x, kind="full", memory_bytes=20_000)
    assert torch.equal(empirical_ntk(model, x, plan=plan), empirical_ntk(model, x, plan=plan))
    assert torch.equal(empirical_ntk(model, x), empirical_ntk(model, x))


def test_refusals_are_one_line():
    model = tiny_mlp()
    x = torch.rand(40, 1, 1, 5, generator=torch.Generator().manual_seed(7))
    refusal = r"full NTK 120x120 does not fit in memory_bytes=100,000: .* at most \d+ samples fit"
    with pytest.raises(ValueError, match=refusal) as err:
        plan_ntk(model, x, kind="full", memory_bytes=100_000)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not even one sample fits"):
        plan_ntk(model, x, memory_bytes=100)
    with pytest.raises(ValueError, match="unknown NTK kind"):
        plan_ntk(model, x, kind="diag")
    with pytest.raises(ValueError, match="all 3 logits"):
        plan_ntk(model, x, kind="full", logit_block=1)
    with pytest.raises(ValueError, match="the plan is for 40 x 40"):
        empirical_ntk(model, x[:5], plan=plan_ntk(model, x))


@pytest.mark.slow
def test_preact_resnet18_kernel_within_its_memory_bound():
    """A 4-image trace kernel of PreActResNet18 (11.2M parameters) on the CPU within 512 MiB: the
    planner's estimate bounds the measured growth of resident memory (sampled every 2 ms), and the
    entries equal the sums of products of per-logit gradients taken one by one."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm (Linux)")
    model = create_model("preact_resnet18", num_classes=10, in_chans=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    budget = 512 * 2**20
    plan = plan_ntk(model, x, memory_bytes=budget)
    assert plan.peak_bytes <= budget and plan.num_params == 11_172_170
    # the first call in a process makes the runtime's kernels and pools (about 90 MiB, once): not the plan's
    params = {name: p.detach() for name, p in model.named_parameters()}
    stem = next(iter(params))
    model.eval()
    ntk_module._jacobian(model, params, dict(model.named_buffers()), [(stem, 0, params[stem].numel())], x[:1], slice(0, 1))
    model.train()
    base = anonymous_rss()
    peak, done = [base], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        K = empirical_ntk(model, x, plan=plan)
    finally:
        done.set()
        watcher.join()
    growth = peak[0] - base
    assert growth <= plan.peak_bytes, f"resident growth {growth / 2**20:.0f} MiB, plan {plan.peak_bytes / 2**20:.0f} MiB"
    assert torch.equal(K, K.T) and torch.linalg.eigvalsh(K).min() > -1e-9 * K.diagonal().max()
    # K[0, 0] and K[0, 1] from 20 plain backward passes (eval mode)
    model.eval()
    try:
        grads = []
        for i in (0, 1):
            rows = []
            for c in range(10):
                out = model(x[i : i + 1])[0, c]
                rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, list(model.parameters()))]).double())
            grads.append(torch.stack(rows))
    finally:
        model.train()
    torch.testing.assert_close(K[0, 0], (grads[0] * grads[0]).sum(), rtol=1e-9, atol=0)
    torch.testing.assert_close(K[0, 1], (grads[0] * grads[1]).sum(), rtol=1e-9, atol=0)


def test_eigen_features_of_a_trained_kernel_clean_and_attacked():
    """The pipeline on the digits MLP: K(X, X), its eigenpairs, the eigen-features' accuracy on clean
    and PGD-attacked test inputs (through :func:`ncrobust.attacks.perturb`)."""
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,), depth=2, width=16)
    g = torch.Generator().manual_seed(9)
    x_train, y_train = torch.rand(30, 1, 8, 8, generator=g), torch.arange(30) % 10
    x_test, y_test = torch.rand(10, 1, 8, 8, generator=g), torch.arange(10) % 10
    x_adv = perturb("pgd", model, x_test, y_test, threat=ThreatModel("linf", 0.1, 0.025, 3), num_classes=10,
                    generator=torch.Generator().manual_seed(0))
    values, vectors = eigendecomposition(empirical_ntk(model, x_train), k=5)
    clean = eigen_feature_accuracy(empirical_ntk(model, x_test, x_train), values, vectors, y_train, y_test, [1, 2, 5])
    attacked = eigen_feature_accuracy(empirical_ntk(model, x_adv, x_train), values, vectors, y_train, y_test, [1, 2, 5])
    assert clean.shape == attacked.shape == (3,)
    assert ((clean >= 0) & (clean <= 1)).all() and ((attacked >= 0) & (attacked <= 1)).all()


# ------------------------------------------------------------------------------------------
# dynamics
# ------------------------------------------------------------------------------------------


def test_kernel_distance():
    K1, K2 = random_psd(12, 4, 0), random_psd(12, 4, 1)
    assert kernel_distance(K1, K1) == pytest.approx(0, abs=1e-15)
    assert kernel_distance(K1, 3.7 * K1) == pytest.approx(0, abs=1e-15)
    assert kernel_distance(K1, K2) == kernel_distance(K2, K1)
    assert 0 < kernel_distance(K1, K2) <= 1
    for seed in range(20):  # [0, 1] for PSD kernels
        assert 0 <= kernel_distance(random_psd(6, 2, 2 * seed), random_psd(6, 3, 2 * seed + 1)) <= 1
    assert kernel_distance(torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))) == 1
    assert kernel_distance(K1, -K1) == pytest.approx(2)
    assert kernel_similarity(K1, 2 * K1) == pytest.approx(1)
    assert math.isnan(kernel_distance(K1, torch.zeros_like(K1)))
    with pytest.raises(ValueError, match="one shape"):
        kernel_distance(K1, K1[:3, :3])


def test_polar_view():
    K0, K1 = random_psd(10, 10, 3), random_psd(10, 3, 4)
    path = [(1 - s) * K0 + s * K1 for s in (0.0, 0.25, 0.5, 1.0)]
    view = polar_view(path, k=3)
    torch.testing.assert_close(view["r"], torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    assert view["theta"][0] == 0 and view["theta_top"][0] == 0 and view["theta_bottom"][0] == 0
    assert (view["theta"].diff() > 0).all() and view["theta"][-1] < math.pi / 2  # PSD kernels: at most 90 degrees
    assert set(view) == {"r", "theta", "theta_top", "theta_bottom"} and all(v.shape == (4,) for v in view.values())
    # the top angle sees only the top eigenspace of K_t: a change outside it does not count
    V = eigendecomposition(K0)[1]
    bump = 5.0 * V[:, -1:] @ V[:, -1:].T  # in K0's bottom eigenvector only
    view = polar_view([K0, K0 + bump], k=3)
    assert view["theta_top"][1] == pytest.approx(0, abs=1e-7) and view["theta_bottom"][1] > 0.1
    assert math.isnan(polar_view([K0, K0], k=2)["r"][1])
    with pytest.raises(ValueError, match="at least two"):
        polar_view([K0])


def test_kernel_velocity():
    Ks = [random_psd(8, 8, s) for s in (5, 6, 7)]
    v = kernel_velocity(Ks, [0, 2, 3])
    expected = [kernel_distance(Ks[0], Ks[1]) / 2, kernel_distance(Ks[1], Ks[2])]
    torch.testing.assert_close(v, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="strictly increasing"):
        kernel_velocity(Ks, [0, 2, 2])


def test_top_eigenvalue_mass_and_eigendecomposition():
    K = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    values, vectors = eigendecomposition(K)
    assert values.tolist() == [3.0, 2.0, 1.0]
    assert torch.equal(vectors, torch.eye(3, dtype=torch.float64)[:, [1, 2, 0]])  # signed: largest entry positive
    assert top_eigenvalue_mass(values, 1) == pytest.approx(9 / 14)
    assert top_eigenvalue_mass(values, 2) == pytest.approx(13 / 14)
    assert top_eigenvalue_mass(torch.tensor([1.0, 3.0, 2.0]), 3) == 1  # sorted inside
    K = random_psd(9, 9, 8)
    values, vectors = eigendecomposition(K, k=4)
    assert vectors.shape == (9, 4) and (values.diff() <= 0).all()
    torch.testing.assert_close(K @ vectors, vectors * values[:4])
    assert (vectors.gather(0, vectors.abs().argmax(dim=0)[None]) > 0).all()  # the sign convention
    with pytest.raises(ValueError, match="k must be an integer"):
        top_eigenvalue_mass(values, 0)


def test_kernel_target_alignment():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    Y = torch.nn.functional.one_hot(labels, 3).double()
    for centered in (True, False):
        assert kernel_target_alignment(Y @ Y.T, labels, 3, centered=centered) == pytest.approx(1)
        assert kernel_target_alignment(4.0 * Y @ Y.T, labels, 3, centered=centered) == pytest.approx(1)
    # a constant offset aligns an uncentred kernel with any labels; centring removes it
    offset = Y @ Y.T + 10.0
    assert kernel_target_alignment(offset, labels, 3) == pytest.approx(1)
    assert kernel_target_alignment(offset, labels, 3, centered=False) < 0.99
    K = random_psd(8, 8, 9)
    assert -1 <= kernel_target_alignment(K, labels, 3) < 1
    # the formula without shortcuts: sim(HKH, H YY^T H)
    H = torch.eye(8, dtype=torch.float64) - 1 / 8
    assert kernel_target_alignment(K, labels, 3) == pytest.approx(kernel_similarity(H @ K @ H, H @ Y @ Y.T @ H))
    with pytest.raises(ValueError, match="labels must lie in"):
        kernel_target_alignment(K, labels, 2)


def test_eigen_feature_accuracy_top_eigenvector_carries_the_labels():
    """Features whose first coordinate is the (binary) label sign and dominates: the top
    eigenvector of K = Phi Phi^T is the labels, so eigen-feature 1 alone classifies perfectly and
    the later ones do not."""
    g = torch.Generator().manual_seed(10)
    y_train, y_test = torch.arange(40) % 2, torch.arange(20) % 2

    def phi(y):
        noise = 0.3 * torch.randn(len(y), 6, generator=g, dtype=torch.float64)
        return torch.cat([3.0 * (1 - 2 * y[:, None].double()), noise], dim=1)

    P_train, P_test = phi(y_train), phi(y_test)
    values, vectors = eigendecomposition(P_train @ P_train.T, k=7)
    acc = eigen_feature_accuracy(P_test @ P_train.T, values, vectors, y_train, y_test, [1, 2, 3, 7])
    assert acc[0] == 1.0 and (acc[1:] < 0.9).all()
    # the targets as a matrix give the same; a zero eigenvalue gives NaN
    onehot = torch.nn.functional.one_hot(y_train, 2).double()
    assert torch.equal(eigen_feature_accuracy(P_test @ P_train.T, values, vectors, onehot, y_test, [1]), acc[:1])
    values0 = values.clone()
    values0[1] = 0
    assert math.isnan(eigen_feature_accuracy(P_test @ P_train.T, values0, vectors, y_train, y_test, [2])[0])
    with pytest.raises(ValueError, match="1-based ranks"):
        eigen_feature_accuracy(P_test @ P_train.T, values, vectors, y_train, y_test, [0])


# ------------------------------------------------------------------------------------------
# benchmark smoke run
# ------------------------------------------------------------------------------------------


@pytest.mark.workflow
@pytest.mark.slow
def test_benchmark_quick_runs():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "baseline/ours" in proc.stdout and "PreActResNet18" in proc.stdout and "projected" in proc.stdout
