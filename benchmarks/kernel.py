"""Time per checkpoint of the trace NTK (``ncrobust.kernel.empirical_ntk``) on the CPU models, against
the naive per-sample Jacobian loop, and the projected cost of a PreActResNet18 checkpoint.

    .venv/bin/python benchmarks/kernel.py            # 250 digits images: MLP and ConvNet; PreActResNet18 at 250 and 500
    .venv/bin/python benchmarks/kernel.py --quick    # 40 images, the MLP only; PreActResNet18 at 250 (a smoke run)

(a) baseline: the explicit per-sample Jacobian loop of an NTK script without ``torch.func``: per logit
    ``c`` and per sample, the eval-mode forward pass and ``torch.autograd.grad`` of logit ``c`` over every
    parameter, flattened into a row of ``J_c`` [N, P] (float64), then ``K += J_c J_c^T``. Memory: one
    ``J_c`` at a time.
(b) ours: ``empirical_ntk(model, x)`` with its own plan (the default budget, 2 GiB); the plan is printed.
    The two kernels are compared (largest difference relative to the largest entry).
(c) PreActResNet18 (CIFAR variant, 11,172,170 parameters, 3x32x32 images), projected from measured
    pieces, not run at full size: ``plan_ntk`` at N = 250 / 500 and a budget gives the exact plan and
    its estimated peak memory (add about 90 MiB, once per process, for the runtime's own first-call
    allocations); its time is (Jacobian passes) + (contraction): every chunk of the plan is timed once
    on one pass of ``sample_block`` random images and ``logit_block`` logits (with the copy into the
    float64 panel), times the passes it makes (logit groups x sample blocks); the contraction, ``2 N^2 C P`` float64 flops over all chunks (about
    half that: a symmetric kernel computes its upper bands only), at the float64 matrix-product rate
    measured here on an ``[N, 65,536]`` panel. The same projection is
    checked against a measured run of the digits MLP (printed as projected / measured).

All timings use one torch thread by default (``--threads N`` to change, 0 for torch's default), as the
other benchmarks do: two threads per process on a shared 2-core machine make timings meaningless.
Timings are the best of ``--repeats`` runs (default 2; 1 with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ncrobust import data as datasets  # noqa: E402
from ncrobust.kernel import empirical_ntk, ntk, plan_ntk  # noqa: E402
from ncrobust.models import create_model  # noqa: E402

DIGITS_MODELS = {"mlp": {"depth": 4, "width": 256}, "convnet": {"channels": [32, 64], "width": 128}}  # config/config.yaml
GiB = 2**30


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def naive_trace_ntk(model, x):
    """(a): the per-sample, per-logit ``torch.autograd.grad`` loop; ``K = sum_c J_c J_c^T``."""
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    try:
        C = model(x[:1]).shape[1]
        K = torch.zeros(len(x), len(x), dtype=torch.float64)
        for c in range(C):
            J = torch.empty(len(x), sum(p.numel() for p in params), dtype=torch.float64)
            for n in range(len(x)):
                out = model(x[n : n + 1])[0, c]
                J[n] = torch.cat([g.flatten() for g in torch.autograd.grad(out, params)])
            K.addmm_(J, J.T)
        return K
    finally:
        model.train(was)


def gemm_rate(n: int, width: int = 65_536) -> float:
    """Float64 flops per second of ``K.addmm_(P, P.T)`` with ``P`` [n, width] (the contraction's shape)."""
    P = torch.randn(n, width, dtype=torch.float64)
    K = torch.zeros(n, n, dtype=torch.float64)
    K.addmm_(P, P.T)  # warm-up
    seconds, _ = best_of(lambda: K.addmm_(P, P.T), 2)
    return 2 * n * n * width / seconds


def projected_seconds(model, plan, sample_shape, rate):
    """(c): ``(Jacobian seconds, contraction seconds)`` of ``plan``: each chunk timed once on one pass."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    constants = dict(model.named_buffers())
    xb = torch.rand(plan.sample_block, *sample_shape, generator=torch.Generator().manual_seed(0))
    groups = math.ceil(plan.num_classes / plan.logit_block)
    blocks = math.ceil(plan.n1 / plan.sample_block) + (0 if plan.symmetric else math.ceil(plan.n2 / plan.sample_block))
    widest = max(sum(stop - start for _, start, stop in chunk) for chunk in plan.chunks)
    panel = torch.zeros(plan.sample_block * plan.logit_block * widest, dtype=torch.float64)
    model.eval()
    try:
        jacobian = 0.0
        for chunk in plan.chunks:
            width = sum(stop - start for _, start, stop in chunk)
            rows = panel[: plan.sample_block * plan.logit_block * width].view(plan.sample_block, plan.logit_block, width)
            t0 = time.perf_counter()
            jac = ntk._jacobian(model, params, constants, chunk, xb, slice(0, plan.logit_block))
            offset = 0
            for name, start, stop in chunk:  # the copy into the float64 panel, as empirical_ntk makes it
                rows[..., offset : offset + stop - start].copy_(jac[name].flatten(2)[..., start:stop])
                offset += stop - start
            jacobian += (time.perf_counter() - t0) * groups * blocks
            del jac
    finally:
        model.train()
    return jacobian, contraction_flops(plan) / rate


def contraction_flops(plan) -> float:
    """``2 x (kernel entries computed) x C x P``: a symmetric kernel computes the bands of rows from
    the diagonal rightwards only (``ntk._add_upper_``)."""
    if not plan.symmetric:
        return 2.0 * plan.n1 * plan.n2 * plan.num_classes * plan.num_params
    n, rows = plan.n1, ntk._ROW_BLOCK
    entries = sum(min(rows, n - a) * (n - a) for a in range(0, n, rows))
    return 2.0 * entries * plan.num_classes * plan.num_params


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke sizes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for all timings (default 1: stable on a shared machine; 0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 2; 1 with --quick)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    n = 40 if args.quick else 250
    models = ["mlp"] if args.quick else ["mlp", "convnet"]
    resnet_sizes = (250,) if args.quick else (250, 500)
    budgets = (2 * GiB, 16 * GiB)

    load = os.getloadavg()[0]
    print(f"trace NTK per checkpoint: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    if load > (os.cpu_count() or 1) - torch.get_num_threads() + 0.5:
        print("  warning: the machine is busy; timings are noisy")
    x = datasets.as_float(datasets.load("digits", seed=0), "train")[0][:n]
    print(f"(a) baseline = per-sample, per-logit autograd.grad loop; (b) ours = empirical_ntk; {n} digits images")
    print(f"{'model':>8} {'params':>9} {'baseline_s':>11} {'ours_s':>8} {'baseline/ours':>14} {'rel diff':>9}  plan")
    rate = gemm_rate(n)
    measured_mlp = None
    for name in models:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,), **DIGITS_MODELS[name])
        plan = plan_ntk(model, x)
        empirical_ntk(model, x[:2])  # warm-up
        t_ours, K = best_of(lambda model=model, plan=plan: empirical_ntk(model, x, plan=plan), repeats)
        t_base, K_base = best_of(lambda model=model: naive_trace_ntk(model, x), repeats)
        diff = float((K - K_base).abs().max() / K_base.abs().max())
        print(f"{name:>8} {plan.num_params:>9,} {t_base:>11.2f} {t_ours:>8.2f} {t_base / t_ours:>13.1f}x {diff:>9.1e}  "
              f"{plan.describe()}")
        if name == "mlp":
            measured_mlp = (model, plan, t_ours)

    model, plan, t_ours = measured_mlp
    jac, con = projected_seconds(model, plan, x.shape[1:], rate)
    print(f"projection check (c's method on the MLP at N={n}): projected {jac + con:.2f} s "
          f"(Jacobian {jac:.2f} + contraction {con:.2f}) / measured {t_ours:.2f} s = {(jac + con) / t_ours:.2f}")

    print(f"(c) PreActResNet18, CIFAR-shaped random images, projected (float64 matrix products measured at {rate / 1e9:.1f} GFLOP/s)")
    torch.manual_seed(0)
    resnet = create_model("preact_resnet18", num_classes=10, in_chans=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    print(f"{'N':>5} {'budget':>8} {'chunks':>7} {'passes':>7} {'peak est.':>10} {'jacobian_s':>11} {'contract_s':>11} {'total':>9}")
    for size in resnet_sizes:
        xs = torch.zeros(size, 3, 32, 32)
        for budget in budgets:
            rplan = plan_ntk(resnet, xs, memory_bytes=budget)
            rate_n = gemm_rate(size) if size != n else rate
            jac, con = projected_seconds(resnet, rplan, (3, 32, 32), rate_n)
            print(f"{size:>5} {budget / GiB:>6.0f}Gi {len(rplan.chunks):>7} {rplan.passes:>7} "
                  f"{rplan.peak_bytes / GiB:>8.2f}Gi {jac:>11.0f} {con:>11.0f} {(jac + con) / 60:>7.1f}min")
    print("  (peak est. = plan_ntk's estimate: kernel + Jacobian panel + two passes + 5%; add ~90 MiB once per process)")


if __name__ == "__main__":
    main()
