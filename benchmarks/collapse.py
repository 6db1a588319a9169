"""Speed of ncrobust.collapse against the published NC code's way of computing, and against a floor.

    .venv/bin/python benchmarks/collapse.py            # N = 50,000, d = 512, C = 10 and 100
    .venv/bin/python benchmarks/collapse.py --quick    # a small smoke size (used by the tests)

(a) baseline: NC1-NC4 computed the way Papyan et al. 2020's published code does it (and Su et
    al. 2024's, which follows it): per-batch (128), per-class Python loops; the within-class
    scatter as a B x d x d tensor of outer products per batch; NCC predictions by a per-sample
    Python loop; tr(Sigma_W Sigma_B^+) from a dense d x d ``scipy.sparse.linalg.svds``. In float32,
    as that code runs (float64 would only make it slower). It is timed on a subsample of whole
    batches and its per-sample part is scaled linearly to N (the d x d eigensolve is timed once,
    not scaled); the output says so.
(b) ours: ``nc_metrics(features, labels, weight=W, logits=logits)`` on the float32 features (the
    float64 conversion is inside the timing).
(c) floor: one float64 matmul of the features [N, d] with the class means [d, C], on features
    already converted to float64 (the conversion is not counted: the strictest floor).
(d) ``LayerStats`` on d = 65,536, C = 10, N = 10,000, batches of 500 generated on the fly (both
    passes), in a fresh child process so that its peak resident memory (``ru_maxrss``) is its own.
(e) one batch's class sums (500 x 65,536, float64) by ``index_add_`` (the CPU's path in
    ``LayerStats``) and by a one-hot matmul (the GPU's), at C = 10 and 100.

Targets: baseline/ours >= 50, ours/floor <= 5, LayerStats peak memory < 2 GiB.

All timings use one torch thread by default (``--threads N`` to change, 0 for torch's default):
on a shared 2-core machine, two threads per process oversubscribe the cores and every parallel
region waits for a descheduled thread, which makes the numbers meaningless. Timings are the best
of a few repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ncrobust.collapse import LayerStats, nc_metrics  # noqa: E402
from ncrobust.collapse.accumulate import _one_hot  # noqa: E402

BASELINE_BATCH = 128


# ------------------------------------------------------------------------------------------
# (a) the published code's way (Papyan, Han & Donoho 2020, PNAS; adapted to in-memory features)
# ------------------------------------------------------------------------------------------


def baseline_passes(H, y, logits, C, n_batches):
    """The two data passes of the published code over the first ``n_batches`` batches."""
    d = H.shape[1]
    batches = [(H[s : s + BASELINE_BATCH], y[s : s + BASELINE_BATCH], logits[s : s + BASELINE_BATCH])
               for s in range(0, n_batches * BASELINE_BATCH, BASELINE_BATCH)]
    mean = [torch.zeros(d) for _ in range(C)]
    N = [0 for _ in range(C)]
    for h, target, _ in batches:  # computation == 'Mean'
        for c in range(C):
            idxs = (target == c).nonzero(as_tuple=True)[0]
            if len(idxs) == 0:
                continue
            h_c = h[idxs, :]
            mean[c] += torch.sum(h_c, dim=0)
            N[c] += h_c.shape[0]
    for c in range(C):
        mean[c] /= max(N[c], 1)
    M = torch.stack(mean).T  # d x C
    Sw = torch.zeros(d, d)
    net_correct = 0
    NCC_match_net = 0
    for h, target, output in batches:  # computation == 'Cov'
        for c in range(C):
            idxs = (target == c).nonzero(as_tuple=True)[0]
            if len(idxs) == 0:
                continue
            h_c = h[idxs, :]
            z = h_c - mean[c].unsqueeze(0)  # B CHW
            cov = torch.matmul(z.unsqueeze(-1), z.unsqueeze(1))  # B CHW CHW
            Sw += torch.sum(cov, dim=0)
            net_pred = torch.argmax(output[idxs, :], dim=1)
            net_correct += sum(net_pred == target[idxs]).item()
            NCC_scores = torch.stack([torch.norm(h_c[i, :] - M.T, dim=1) for i in range(h_c.shape[0])])
            NCC_pred = torch.argmin(NCC_scores, dim=1)
            NCC_match_net += sum(NCC_pred == net_pred).item()
    n = sum(N)
    return M, torch.tensor(N), Sw / n, net_correct / n, NCC_match_net / n


def baseline_finish(M, counts, Sw, W, C):
    """The published code's d x d part: Sigma_B, svds, tr(Sigma_W Sigma_B^+), NC2, NC3."""
    from scipy.sparse.linalg import svds

    muG = (M * counts.float()).sum(dim=1, keepdim=True) / counts.sum()  # d x 1
    M_ = M - muG
    Sb = torch.matmul(M_, M_.T) / C
    Sw_np, Sb_np = Sw.numpy(), Sb.numpy()
    eigvec, eigval, _ = svds(Sb_np, k=C - 1)
    inv_Sb = eigvec @ np.diag(eigval ** (-1)) @ eigvec.T
    Sw_invSb = np.trace(Sw_np @ inv_Sb)
    M_norms = torch.norm(M_, dim=0)
    W_norms = torch.norm(W.T, dim=0)
    _ = (torch.std(M_norms) / torch.mean(M_norms)).item(), (torch.std(W_norms) / torch.mean(W_norms)).item()

    def coherence(V):
        G = V.T @ V
        G += torch.ones((C, C)) / (C - 1)
        G -= torch.diag(torch.diag(G))
        return torch.norm(G, 1).item() / (C * (C - 1))

    _ = coherence(M_ / M_norms), coherence(W.T / W_norms)
    normalized_M = M_ / torch.norm(M_, "fro")
    normalized_W = W.T / torch.norm(W.T, "fro")
    _ = (torch.norm(normalized_W - normalized_M) ** 2).item()
    return float(Sw_invSb)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_problem(N, d, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    y[:C] = torch.arange(C)  # every class present
    mus = 2.0 * torch.randn(C, d, generator=g)
    H = mus[y] + torch.randn(N, d, generator=g)  # float32, like penultimate features
    W = torch.randn(C, d, generator=g)
    logits = H @ W.T
    return H, y, W, logits


def rss_now_mib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------
# (d) LayerStats child process
# ------------------------------------------------------------------------------------------


def layerstats_child(d, C, N, batch):
    g = torch.Generator().manual_seed(1)
    mus = 0.05 * torch.randn(C, d, generator=g)  # [C, d] float32

    def batches():
        for i, s in enumerate(range(0, N, batch)):
            gb = torch.Generator().manual_seed(1000 + i)  # the same batch in both passes
            y = torch.randint(0, C, (min(batch, N - s),), generator=gb)
            h = torch.randn(len(y), d, generator=gb)
            h += mus[y]
            yield h, y

    rss0 = rss_now_mib()
    for i, (h, y) in enumerate(batches()):  # generating alone, to tell its memory apart
        del h, y
        if i == 1:
            break
    peak_gen = peak_rss_mib()
    t_stats = 0.0  # time inside LayerStats calls only (generating the batches is not counted)
    t0 = time.perf_counter()
    stats = LayerStats(C)
    for h, y in batches():
        t1 = time.perf_counter()
        stats.accumulate_means(h, y)
        t_stats += time.perf_counter() - t1
    t1 = time.perf_counter()
    stats.finish_means()
    t_stats += time.perf_counter() - t1
    for h, y in batches():
        t1 = time.perf_counter()
        stats.accumulate_scatter(h, y)
        t_stats += time.perf_counter() - t1
    t1 = time.perf_counter()
    metrics = stats.compute()
    t_stats += time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(rss_after_imports_mib=rss0, peak_generating_mib=peak_gen, peak_mib=peak_rss_mib(),
                          batch_mib=batch * d * 4 / 2**20, seconds=seconds, stats_seconds=t_stats,
                          metrics=metrics)))


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke sizes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for all timings (default 1: stable on a shared machine; 0 = torch's default)")
    parser.add_argument("--layerstats-child", nargs=4, type=int, metavar=("D", "C", "N", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layerstats_child:
        layerstats_child(*args.layerstats_child)
        return

    if args.quick:
        N, d, classes, sub_batches, repeats = 3000, 128, (10, 100), 4, 1
        ls_d, ls_C, ls_N, ls_batch = 4096, 10, 1000, 100
    else:
        N, d, classes, sub_batches, repeats = 50_000, 512, (10, 100), 40, 3
        ls_d, ls_C, ls_N, ls_batch = 65_536, 10, 10_000, 500

    n_sub = sub_batches * BASELINE_BATCH
    load = os.getloadavg()[0]
    print(f"nc_metrics: N={N}, d={d}, float32 features, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    if load > (os.cpu_count() or 1) - torch.get_num_threads() + 0.5:
        print("  warning: the machine is busy; timings (all three columns) are noisy")
    print("baseline = published-code style (per-class loops, B x d x d outer products, per-sample NCC loop), float32,")
    print(f"  timed on the first {n_sub} of {N} samples; its per-sample part scaled x{N / n_sub:.2f}, "
          f"plus its d x d eigensolve timed once")
    print("floor = one float64 matmul [N,d] x [d,C] on pre-converted float64 features")
    header = (f"{'C':>4} {'baseline_s':>11} {'ours_s':>8} {'floor_s':>8} {'baseline/ours':>14} {'ours/floor':>11}"
              f"  {'nc1':>10}  {'nc1 check':>10}")
    print(header)
    rows = []
    for C in classes:
        H, y, W, logits = make_problem(N, d, C)
        # (a) baseline
        t0 = time.perf_counter()
        M_b, counts_b, Sw_b, _, _ = baseline_passes(H, y, logits, C, sub_batches)
        t_passes = time.perf_counter() - t0
        t0 = time.perf_counter()
        nc1_b = baseline_finish(M_b, counts_b, Sw_b, W, C) / C
        t_finish = time.perf_counter() - t0
        t_base = t_passes * N / n_sub + t_finish
        # the baseline and ours agree on the subsample (float32 vs float64)
        ours_sub = nc_metrics(H[:n_sub], y[:n_sub], num_classes=C)["nc1"]
        check = abs(nc1_b - ours_sub) / abs(ours_sub)
        # (b) ours
        t_ours = best_of(lambda: nc_metrics(H, y, num_classes=C, weight=W, logits=logits), repeats)
        nc1 = nc_metrics(H, y, num_classes=C, weight=W, logits=logits)["nc1"]
        # (c) floor
        H64 = H.double()
        M64 = torch.randn(C, d, dtype=torch.float64)
        t_floor = best_of(lambda: H64 @ M64.T, max(repeats, 5))
        del H64
        rows.append((C, t_base, t_ours, t_floor))
        print(f"{C:>4} {t_base:>11.2f} {t_ours:>8.4f} {t_floor:>8.4f} {t_base / t_ours:>13.0f}x {t_ours / t_floor:>10.2f}x"
              f"  {nc1:>10.4g}  {check:>9.1e}r")
    print("  (nc1 check = relative difference of nc1 between the float32 baseline and ours on the subsample)")
    ok_speed = all(b / o >= 50 for _, b, o, _ in rows)
    ok_floor = all(o / f <= 5 for _, _, o, f in rows)
    scope = " (the targets are for the full size; --quick is a smoke run)" if args.quick else ""
    print(f"target baseline/ours >= 50x: {'met' if ok_speed else 'NOT met'};  "
          f"target ours/floor <= 5x: {'met' if ok_floor else 'NOT met'}{scope}")

    # (d) LayerStats, in a child process for an honest peak-memory reading
    child = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--layerstats-child"]
    proc = subprocess.run(child + [str(ls_d), str(ls_C), str(ls_N), str(ls_batch)],
                          capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, base = res["peak_mib"], res["rss_after_imports_mib"]
    print(f"LayerStats: d={ls_d}, C={ls_C}, N={ls_N}, batches of {ls_batch} generated on the fly, both passes: "
          f"{res['stats_seconds']:.2f} s in LayerStats calls ({res['seconds']:.2f} s with generating the batches); "
          f"nc1={res['metrics']['nc1']:.4g}")
    print(f"  peak RSS {peak:.0f} MiB (whole child process, ru_maxrss): {peak - base:.0f} MiB above the {base:.0f} MiB "
          f"after imports, of which {res['peak_generating_mib'] - base:.0f} MiB is generating a batch "
          f"({res['batch_mib']:.0f} MiB of float32) without LayerStats; limit 2048 MiB: {'OK' if peak < 2048 else 'EXCEEDED'}")

    # (e) the per-batch class sums: index_add_ (the CPU's path) against the one-hot matmul (the GPU's)
    for C in classes:
        H64 = torch.randn(ls_batch, ls_d, dtype=torch.float64)
        yb = torch.randint(0, C, (ls_batch,))
        sums = torch.zeros(C, ls_d, dtype=torch.float64)
        t_index = best_of(lambda: sums.index_add_(0, yb, H64), max(repeats, 3))
        t_matmul = best_of(lambda: sums.add_(_one_hot(yb, C, torch.float64) @ H64), max(repeats, 3))
        print(f"class sums of one batch ({ls_batch} x {ls_d}, float64), C={C}: index_add_ {t_index * 1e3:.1f} ms, "
              f"one-hot matmul {t_matmul * 1e3:.1f} ms ({t_matmul / t_index:.2f}x) on the CPU")


if __name__ == "__main__":
    main()
