"""Tests of ncrobust.collapse: closed forms on a simplex ETF, a dense float64 reference written
here with loops, streaming == dense, scikit-learn's NearestCentroid, and bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid

from ncrobust.collapse import (
    LayerStats,
    accumulate,
    alignment,
    blocks,
    class_means,
    leap,
    measure,
    nc_metrics,
    ncc_predict,
    perturbation_metrics,
)

REPO = Path(__file__).resolve().parents[1]
WITHIN_KEYS = ("nc1", "nc1_trace_ratio", "cdnv", "ncc_accuracy")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def simplex_etf(C: int, d: int, *, scale: float, rng: np.random.Generator) -> np.ndarray:
    """[C, d] centred means forming a simplex ETF of norm ``scale``, randomly rotated into R^d."""
    E = math.sqrt(C / (C - 1)) * (np.eye(C) - np.ones((C, C)) / C)  # unit rows, cos = -1/(C-1)
    P, _ = np.linalg.qr(rng.standard_normal((d, C)))  # orthonormal columns: [d, C]
    return scale * E @ P.T


def random_problem(C: int, d: int, *, balanced: bool, seed: int):
    """Features with class structure, a global offset and (im)balanced classes (all present)."""
    rng = np.random.default_rng(seed)
    if balanced:
        counts = np.full(C, 6)
    else:
        counts = 1 + np.floor(25 * rng.random(C) ** 3).astype(int)
    y = np.repeat(np.arange(C), counts)
    rng.shuffle(y)
    mus = 1.5 * rng.standard_normal((C, d)) + 3.0  # uncentred means with a common offset
    H = mus[y] + rng.standard_normal((len(y), d)) * rng.uniform(0.5, 2.0, size=d)
    W = rng.standard_normal((C, d))
    b = rng.standard_normal(C)
    return H, y, W, b


def reference_metrics(H, y, C, W=None, logits=None) -> dict[str, float]:
    """Straightforward dense float64 NC metrics (loops, explicit d x d matrices)."""
    H = np.asarray(H, dtype=np.float64)
    N, d = H.shape
    mus = np.stack([H[y == c].mean(axis=0) for c in range(C)])
    mu_G = H.mean(axis=0)
    Mc = mus - mu_G
    Sw = np.zeros((d, d))
    for c in range(C):
        D = H[y == c] - mus[c]
        Sw += D.T @ D
    Sw /= N
    Sb = np.zeros((d, d))
    for c in range(C):
        Sb += np.outer(Mc[c], Mc[c])
    Sb /= C
    evals, evecs = np.linalg.eigh(Sb)
    k = min(d, C - 1)
    top = np.argsort(evals)[::-1][:k]
    Sb_pinv = evecs[:, top] @ np.diag(1.0 / evals[top]) @ evecs[:, top].T
    out = {
        "nc1": np.trace(Sw @ Sb_pinv) / C,
        "nc1_trace_ratio": np.trace(Sw) / np.trace(Sb),
    }
    var = [np.mean(np.sum((H[y == c] - mus[c]) ** 2, axis=1)) for c in range(C)]
    pairs = []
    for c in range(C):
        for c2 in range(c + 1, C):
            pairs.append((var[c] + var[c2]) / (2 * np.sum((mus[c] - mus[c2]) ** 2)))
    out["cdnv"] = float(np.mean(pairs))

    def equinorm(V):
        n = np.linalg.norm(V, axis=1)
        return np.std(n, ddof=1) / np.mean(n)

    def equiangle(V):
        vals = []
        for c in range(C):
            for c2 in range(C):
                if c != c2:
                    cos = V[c] @ V[c2] / (np.linalg.norm(V[c]) * np.linalg.norm(V[c2]))
                    vals.append(abs(cos + 1 / (C - 1)))
        return float(np.mean(vals))

    out["nc2_equinorm_M"] = equinorm(Mc)
    out["nc2_equiangle_M"] = equiangle(Mc)
    ncc = np.array([np.argmin([np.linalg.norm(h - m) for m in mus]) for h in H])
    out["ncc_accuracy"] = float(np.mean(ncc == y))
    if W is not None:
        W = np.asarray(W, dtype=np.float64)
        out["nc2_equinorm_W"] = equinorm(W)
        out["nc2_equiangle_W"] = equiangle(W)
        out["nc3"] = np.linalg.norm(W / np.linalg.norm(W) - Mc / np.linalg.norm(Mc)) ** 2
    if logits is not None:
        pred = np.asarray(logits).argmax(axis=1)
        out["accuracy"] = float(np.mean(pred == y))
        out["nc4"] = 1.0 - float(np.mean(pred == ncc))
    return out


def assert_close(got: dict, want: dict, rtol: float = 1e-8, atol: float = 0.0) -> None:
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=atol), key


def stream(H, y, C, batch, *, reference=None) -> dict[str, float]:
    stats = LayerStats(C, reference=reference)
    for s in range(0, len(y), batch):
        stats.accumulate_means(H[s : s + batch], y[s : s + batch])
    stats.finish_means()
    for s in range(0, len(y), batch):
        stats.accumulate_scatter(H[s : s + batch], y[s : s + batch])
    return stats.compute()


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many row blocks inside each call, so that the blocking itself is exercised."""
    monkeypatch.setattr(blocks, "_BLOCK_BYTES", 8)
    monkeypatch.setattr(blocks, "_MIN_BLOCK_ROWS", 3)


# ------------------------------------------------------------------------------------------
# closed forms on a simplex ETF
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C,d", [(2, 3), (5, 8), (10, 10)])
def test_perfect_simplex_etf_is_fully_collapsed(C, d):
    rng = np.random.default_rng(C)
    Mc = simplex_etf(C, d, scale=3.0, rng=rng)
    mu_G = rng.standard_normal(d)  # an arbitrary global mean
    y = np.repeat(np.arange(C), 4)
    H = mu_G + Mc[y]  # every sample exactly at its class mean
    W = 2.5 * Mc  # classifier = centred means up to scale
    b = -W @ mu_G  # so that the logits are W (h - mu_G)
    m = nc_metrics(torch.from_numpy(H), torch.from_numpy(y), weight=W, bias=b)
    for key in ("nc1", "nc1_trace_ratio", "cdnv", "nc2_equinorm_M", "nc2_equiangle_M",
                "nc2_equinorm_W", "nc2_equiangle_W", "nc3", "nc4"):
        assert abs(m[key]) < 1e-9, (key, m[key])
    assert m["ncc_accuracy"] == 1.0
    assert m["accuracy"] == 1.0
    logits = (H - mu_G) @ W.T
    m2 = nc_metrics(H, y, num_classes=C, weight=W, logits=logits)
    assert m2["accuracy"] == 1.0 and abs(m2["nc4"]) < 1e-9
    s = stream(H, y, C, batch=3)
    for key in ("nc1", "nc1_trace_ratio", "cdnv"):
        assert abs(s[key]) < 1e-9, key
    assert s["ncc_accuracy"] == 1.0


@pytest.mark.parametrize("C,d", [(3, 4), (5, 8), (10, 16)])
def test_isotropic_noise_on_etf_matches_closed_form(C, d):
    """Samples mu_c +- sigma sqrt(d) q_j (q_j orthonormal): class means unchanged and
    Sigma_W = sigma^2 I exactly, so with ETF means of norm a (Sigma_B eigenvalues a^2/(C-1)):
    nc1 = sigma^2 (C-1)^2 / (C a^2), tr ratio = d sigma^2 / a^2, cdnv = d sigma^2 (C-1) / (2 a^2 C)."""
    rng = np.random.default_rng(100 + C)
    a, sigma = 2.0, 0.05
    Mc = simplex_etf(C, d, scale=a, rng=rng)
    mu_G = rng.standard_normal(d)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    offsets = sigma * math.sqrt(d) * np.concatenate([Q.T, -Q.T])  # [2d, d], covariance sigma^2 I
    H = np.concatenate([mu_G + Mc[c] + offsets for c in range(C)])
    y = np.repeat(np.arange(C), 2 * d)
    perm = rng.permutation(len(y))
    H, y = H[perm], y[perm]
    W = Mc.copy()
    m = nc_metrics(H, y, num_classes=C, weight=W, logits=(H - mu_G) @ W.T)
    want = {
        "nc1": sigma**2 * (C - 1) ** 2 / (C * a**2),
        "nc1_trace_ratio": d * sigma**2 / a**2,
        "cdnv": d * sigma**2 * (C - 1) / (2 * a**2 * C),
    }
    assert_close(m, want, rtol=1e-9)
    for key in ("nc2_equinorm_M", "nc2_equiangle_M", "nc2_equinorm_W", "nc2_equiangle_W", "nc3", "nc4"):
        assert abs(m[key]) < 1e-9, key
    assert m["ncc_accuracy"] == 1.0 and m["accuracy"] == 1.0
    assert_close(stream(H, y, C, batch=5), want, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# agreement with the dense reference
# ------------------------------------------------------------------------------------------

SHAPES = [(2, 1), (2, 6), (10, 4), (10, 32), (100, 30), (100, 150)]


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "imbalanced"])
@pytest.mark.parametrize("C,d", SHAPES, ids=[f"C{c}-d{d}" for c, d in SHAPES])
def test_matches_dense_reference(C, d, balanced):
    H, y, W, b = random_problem(C, d, balanced=balanced, seed=C * 1000 + d)
    logits = H @ W.T + b
    got = nc_metrics(torch.from_numpy(H), torch.from_numpy(y), num_classes=C, weight=W, logits=logits)
    want = reference_metrics(H, y, C, W=W, logits=logits)
    assert set(got) == set(want)
    assert_close(got, want, atol=1e-12)  # atol: C = 2 balanced has nc2_*_M exactly 0
    # weight + bias without logits recomputes the same logits
    got_b = nc_metrics(H, y, num_classes=C, weight=W, bias=b)
    assert got_b["accuracy"] == want["accuracy"] and got_b["nc4"] == pytest.approx(want["nc4"], abs=1e-12)


def test_blocking_does_not_change_results(small_blocks):
    H, y, W, b = random_problem(10, 12, balanced=False, seed=7)
    logits = H @ W.T + b
    assert_close(nc_metrics(H, y, num_classes=10, weight=W, logits=logits), reference_metrics(H, y, 10, W=W, logits=logits))
    M, _ = class_means(H, y, 10)
    np.testing.assert_array_equal(ncc_predict(H, M).numpy(), np.argmin(((H[:, None] - M.numpy()[None]) ** 2).sum(-1), 1))


def test_gpu_class_sums_equal_the_cpu_ones():
    """A GPU sums per class by a one-hot matmul, the CPU by index_add_: the same sums up to float64
    rounding, for rows ([n, d]) and scalars ([n]); counts without torch.bincount are exact."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (300,), generator=g)
    H = torch.randn(300, 40, generator=g, dtype=torch.float64) * 100 + 5
    for values in (H, H[:, 0]):
        index_add = torch.zeros(7, *values.shape[1:], dtype=torch.float64)
        accumulate._add_per_class_(index_add, y, values)  # the CPU path
        one_hot = accumulate._one_hot(y, 7, torch.float64) @ values  # the GPU path
        reference = np.stack([values[y == c].numpy().sum(axis=0) for c in range(7)])
        np.testing.assert_allclose(index_add.numpy(), reference, rtol=1e-13)
        np.testing.assert_allclose(one_hot.numpy(), reference, rtol=1e-13)
    counts = torch.zeros(7, dtype=torch.int64)
    accumulate._count_(counts, y)
    accumulate._count_(counts, y[:10])
    assert counts.tolist() == (np.bincount(y.numpy(), minlength=7) + np.bincount(y[:10].numpy(), minlength=7)).tolist()


def test_low_precision_inputs_are_accumulated_in_float64():
    H, y, W, _ = random_problem(10, 16, balanced=False, seed=3)
    H16 = torch.from_numpy(H).half()
    got = nc_metrics(H16, torch.from_numpy(y))
    assert_close(got, reference_metrics(H16.double().numpy(), y, 10))
    got32 = nc_metrics(H16.float(), y)
    assert_close(got32, got, rtol=1e-12)


def test_class_means():
    H, y, _, _ = random_problem(10, 5, balanced=False, seed=11)
    M, counts = class_means(H, y, 10)
    assert M.dtype == torch.float64 and counts.dtype == torch.int64
    np.testing.assert_array_equal(counts.numpy(), np.bincount(y, minlength=10))
    np.testing.assert_allclose(M.numpy(), np.stack([H[y == c].mean(0) for c in range(10)]), rtol=1e-13, atol=1e-13)


def test_rank_is_capped_by_dimension_when_d_below_c_minus_1():
    """d < C-1: Sigma_B has rank d, and nc1 uses all d directions (no 1/0 from the missing ones)."""
    H, y, _, _ = random_problem(10, 3, balanced=True, seed=5)
    g = measure._Geometry(*class_means(H, y, 10))
    assert g.r == 3 and g.U.shape == (3, 3)
    assert math.isfinite(nc_metrics(H, y)["nc1"])


def test_rank_deficient_means_drop_zero_eigenvalues():
    """Class means in a 2-D plane (rank 2 < C-1 = 3): the numerically zero eigenvalue of Sigma_B
    is dropped, so nc1 = sigma^2 tr(Sigma_B^+) / C with the pseudo-inverse on the plane."""
    rng = np.random.default_rng(6)
    C, d, sigma = 4, 5, 0.1
    P, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    mus = rng.standard_normal((C, 2)) @ P.T + rng.standard_normal(d)  # affine plane
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    offsets = sigma * math.sqrt(d) * np.concatenate([Q.T, -Q.T])  # Sigma_W = sigma^2 I
    H = np.concatenate([mus[c] + offsets for c in range(C)])
    y = np.repeat(np.arange(C), 2 * d)
    Mc = mus - mus.mean(0)
    Sb = Mc.T @ Mc / C
    assert np.linalg.matrix_rank(Sb) == 2
    want = sigma**2 * np.trace(np.linalg.pinv(Sb, rcond=1e-10, hermitian=True)) / C
    assert nc_metrics(H, y)["nc1"] == pytest.approx(want, rel=1e-9)
    assert stream(H, y, C, batch=7)["nc1"] == pytest.approx(want, rel=1e-9)


def test_coincident_means_give_inf_or_nan_not_an_error():
    """A dead layer (all features equal) must not stop the workflow."""
    H = np.ones((20, 4))
    y = np.arange(20) % 4
    m = nc_metrics(H, y)
    assert math.isnan(m["nc1"]) and math.isnan(m["nc1_trace_ratio"])


# ------------------------------------------------------------------------------------------
# streaming accumulator
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, None], ids=["b1", "b7", "bN"])
@pytest.mark.parametrize("C,d", [(2, 3), (10, 6), (10, 24), (30, 12)])
def test_layerstats_equals_dense(C, d, batch):
    H, y, _, _ = random_problem(C, d, balanced=False, seed=C + d)
    batch = batch or len(y)
    dense = nc_metrics(H, y, num_classes=C)
    got = stream(torch.from_numpy(H), torch.from_numpy(y), C, batch)
    assert set(got) == set(WITHIN_KEYS)
    assert_close(got, {k: dense[k] for k in WITHIN_KEYS})

    # a perturbed set classified by the clean means
    rng = np.random.default_rng(0)
    H_pert = H + 0.7 * rng.standard_normal(H.shape)
    clean = LayerStats(C)
    clean.accumulate_means(H, y)
    clean.finish_means()
    got_p = stream(H_pert, y, C, batch, reference=clean)
    dense_p = nc_metrics(H_pert, y, num_classes=C)
    assert_close(got_p, {k: dense_p[k] for k in WITHIN_KEYS})
    pert = perturbation_metrics(H, y, H_pert, y, num_classes=C)
    assert got_p["ncc_accuracy_clean_means"] == pert["ncc_accuracy_clean_means"]
    assert pert["ncc_accuracy_clean_means"] == float(np.mean(ncc_predict(H_pert, clean.means).numpy() == y))


def test_layerstats_flattens_batches_and_blocks(small_blocks):
    C = 4
    rng = np.random.default_rng(1)
    y = np.arange(60) % C
    h = rng.standard_normal((60, 2, 3, 2)) + y[:, None, None, None]
    dense = nc_metrics(h.reshape(60, -1), y)
    got = stream(torch.from_numpy(h).float(), torch.from_numpy(y), C, batch=13)
    dense32 = nc_metrics(torch.from_numpy(h).float().reshape(60, -1), y)
    assert_close(got, {k: dense32[k] for k in WITHIN_KEYS})
    assert got["nc1"] == pytest.approx(dense["nc1"], rel=1e-5)


def test_layerstats_misuse_raises():
    stats = LayerStats(3)
    with pytest.raises(ValueError, match="before any accumulate_means"):
        stats.finish_means()
    with pytest.raises(ValueError, match="before finish_means"):
        stats.accumulate_scatter(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="only after finish_means"):
        stats.means
    stats.accumulate_means(np.eye(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="earlier batches had d=3"):
        stats.accumulate_means(np.eye(4), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="non-finite"):
        stats.accumulate_means(np.array([[0.0, np.nan, 0.0]]), np.array([1]))
    stats.finish_means()
    with pytest.raises(ValueError, match="after finish_means"):
        stats.accumulate_means(np.eye(3), np.array([0, 1, 2]))
    stats.accumulate_scatter(np.eye(3)[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="same samples"):
        stats.compute()
    with pytest.raises(ValueError, match="no sample"):
        empty = LayerStats(3)
        empty.accumulate_means(np.eye(2), np.array([0, 1]))
        empty.finish_means()
    with pytest.raises(ValueError, match="at least 2 classes"):
        LayerStats(1)
    with pytest.raises(ValueError, match="num_classes must be an int"):
        LayerStats(2.5)  # num_classes must be an int


def test_layerstats_rejects_a_bad_batch_whole():
    """A batch with NaN/inf raises, in either pass, and leaves the state as it was."""
    H, y, _, _ = random_problem(5, 6, balanced=True, seed=12)
    bad = H[:4].copy()
    bad[3, 2] = np.inf
    stats = LayerStats(5)
    stats.accumulate_means(H[:10], y[:10])
    with pytest.raises(ValueError, match="h contain non-finite.*first at row 3"):
        stats.accumulate_means(bad, y[:4])
    stats.accumulate_means(H[10:], y[10:])
    stats.finish_means()
    stats.accumulate_scatter(H[:10], y[:10])
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="h contain non-finite.*first at row 3"):
        stats.accumulate_scatter(bad, y[:4])
    stats.accumulate_scatter(H[10:], y[10:])
    dense = nc_metrics(H, y)
    assert_close(stats.compute(), {k: dense[k] for k in WITHIN_KEYS})
    with pytest.raises(ValueError, match="reference must be a LayerStats after finish_means"):
        LayerStats(3, reference=LayerStats(3))
    five = LayerStats(3)
    five.accumulate_means(np.eye(3, 5), np.array([0, 1, 2]))
    five.finish_means()
    with pytest.raises(ValueError, match="reference has 3 classes, this set 4"):
        LayerStats(4, reference=five)
    with pytest.raises(ValueError, match="reference has d=5 but the batches have d=3"):
        LayerStats(3, reference=five).accumulate_means(np.eye(3), np.array([0, 1, 2]))


# ------------------------------------------------------------------------------------------
# NCC
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # sklearn, 1-sample classes
@pytest.mark.parametrize("C,d", [(2, 3), (10, 20), (50, 8)])
def test_ncc_predict_matches_sklearn_nearest_centroid(C, d):
    H, y, _, _ = random_problem(C, d, balanced=False, seed=42 + C)
    rng = np.random.default_rng(9)
    queries = np.concatenate([H, H.mean(0) + 2.0 * rng.standard_normal((300, d))])
    sk = NearestCentroid().fit(H, y)
    M, _ = class_means(H, y, C)
    np.testing.assert_allclose(M.numpy(), sk.centroids_, rtol=1e-12, atol=1e-12)
    got = ncc_predict(queries, M)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), sk.predict(queries))
    assert nc_metrics(H, y, num_classes=C)["ncc_accuracy"] == float(np.mean(sk.predict(H) == y))


# ------------------------------------------------------------------------------------------
# one computation of the class means, the NCC decision and the leap counts
# ------------------------------------------------------------------------------------------


def near_ties(M: torch.Tensor, per_pair: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points midway between every pair ``(a, b)`` of the rows of ``M`` (exactly, and moved by
    ~1e-13 of the spread), and the pairs: between ``a`` and ``b`` the nearest-mean decision is
    left to float64 rounding."""
    g = torch.Generator().manual_seed(seed)
    C = M.shape[0]
    pairs = torch.tensor([(a, b) for a in range(C) for b in range(a + 1, C)])
    mids = (M[pairs[:, 0]] + M[pairs[:, 1]]) / 2
    jitter = 1e-13 * float(M.abs().max()) * torch.randn(per_pair, *mids.shape, generator=g, dtype=torch.float64)
    return torch.cat([mids, *(mids + jitter)]), pairs.repeat(per_pair + 1, 1)


@pytest.mark.parametrize("batch", [None, 7], ids=["one-batch", "b7"])
def test_dense_and_streamed_class_means_are_the_same_numbers(batch):
    H, y, _, _ = random_problem(10, 12, balanced=False, seed=21)
    H, y = torch.from_numpy(H), torch.from_numpy(y)
    M, counts = class_means(H, y, 10)
    stats = LayerStats(10)
    for s in range(0, len(y), batch or len(y)):
        stats.accumulate_means(H[s : s + (batch or len(y))], y[s : s + (batch or len(y))])
    stats.finish_means()
    assert torch.equal(stats.means, M) and torch.equal(stats.counts, counts)


def test_ncc_predict_leap_and_layerstats_agree_at_near_ties():
    """The nearest clean mean of perturbed features, decided by ncc_predict, leap and a LayerStats
    with the clean set as reference: the same decision for every sample, near-ties included."""
    C = 6
    H0, y0, _, _ = random_problem(C, 9, balanced=True, seed=31)
    clean = LayerStats(C)
    clean.accumulate_means(H0, y0)
    clean.finish_means()
    M = clean.means
    ties, pairs = near_ties(M, per_pair=3, seed=1)
    rng = np.random.default_rng(5)
    H = torch.cat([torch.from_numpy(H0 + rng.standard_normal(H0.shape)), ties])
    y = torch.from_numpy(rng.integers(0, C, len(H)))
    logits = torch.from_numpy(rng.standard_normal((len(H), C)))
    pred = ncc_predict(H, M)
    # the near-ties really are: the two means of each pair are equally far up to rounding
    d2 = ((ties[:, None] - M[None]) ** 2).sum(-1).gather(1, pairs)
    assert bool(((d2[:, 0] - d2[:, 1]).abs() <= 1e-9 * d2[:, 0]).all())
    joint = torch.zeros(C, C, dtype=torch.float64)
    joint.index_put_((y, pred), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    L = leap(M, H, y, C)
    assert torch.equal(L, joint / joint.sum(dim=1, keepdim=True))
    pert = LayerStats(C, reference=clean)
    for s in range(0, len(y), 11):
        pert.accumulate_means(H[s : s + 11], y[s : s + 11])
    pert.finish_means()
    for s in range(0, len(y), 11):
        pert.accumulate_scatter(H[s : s + 11], y[s : s + 11], logits[s : s + 11].argmax(dim=1))
    assert torch.equal(pert.reference_geometry()["leap"], L)
    assert pert.compute()["ncc_accuracy_clean_means"] == float((pred == y).double().mean())
    assert pert.prediction_metrics()["leap_to_prediction"] == float((pred == logits.argmax(dim=1)).double().mean())
    dense = perturbation_metrics(H0, y0, H, y, num_classes=C)
    assert torch.equal(dense["leap"], L)


def test_own_mean_ncc_of_layerstats_is_ncc_predict_with_the_own_means():
    """Pass 2 decides the NCC with the own means by the one NCC decision: the same decisions as
    ncc_predict with the class means."""
    for C, d in [(2, 5), (10, 4), (10, 40)]:
        H, y, W, b = random_problem(C, d, balanced=False, seed=C * d)
        M, _ = class_means(H, y, C)
        pred = ncc_predict(H, M).numpy()
        logits = H @ W.T + b
        m = nc_metrics(H, y, num_classes=C, logits=logits)
        assert m["ncc_accuracy"] == float(np.mean(pred == y))
        assert m["nc4"] == 1.0 - float(np.mean(pred == logits.argmax(axis=1)))


# ------------------------------------------------------------------------------------------
# perturbation metrics: leap and alignment
# ------------------------------------------------------------------------------------------


def test_leap_rows_sum_to_one_and_identity_on_collapsed_data():
    rng = np.random.default_rng(2)
    H, y, _, _ = random_problem(10, 12, balanced=False, seed=2)
    M, _ = class_means(H, y, 10)
    L = leap(M, H + rng.standard_normal(H.shape), y, 10)
    assert L.shape == (10, 10)
    np.testing.assert_allclose(L.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-12)
    assert 0.0 < float(L.diagonal().mean()) < 1.0  # noisy: some samples leap

    Mc = simplex_etf(6, 9, scale=1.0, rng=rng)
    yc = np.repeat(np.arange(6), 5)
    Hc = Mc[yc] + 4.0
    Mcl, _ = class_means(Hc, yc, 6)
    np.testing.assert_array_equal(leap(Mcl, Hc, yc, 6).numpy(), np.eye(6))


def test_leap_to_the_next_vertex():
    """Perturbed features sitting on the clean mean of y+1: the leap matrix is the cyclic shift."""
    rng = np.random.default_rng(3)
    C = 5
    Mc = simplex_etf(C, 7, scale=2.0, rng=rng)
    y = np.repeat(np.arange(C), 4)
    H = Mc[y]
    H_pert = Mc[(y + 1) % C] + 0.01 * rng.standard_normal(H.shape)
    logits = np.eye(C)[(y + 1) % C]  # the network predicts y+1 on the perturbed input
    m = perturbation_metrics(H, y, H_pert, y, num_classes=C, logits=logits)
    assert m["ncc_accuracy_clean_means"] == 0.0 and m["leap_rate"] == 1.0
    assert m["leap_to_prediction"] == 1.0
    np.testing.assert_array_equal(m["leap"].numpy(), np.roll(np.eye(C), 1, axis=1))
    # the perturbed means are the clean ones permuted: centred angle = ETF angle arccos(-1/(C-1))
    assert m["alignment_angle"] == pytest.approx(math.degrees(math.acos(-1 / (C - 1))), abs=0.5)


def test_alignment_identical_and_ninety_degrees():
    rng = np.random.default_rng(4)
    M = rng.standard_normal((5, 8))
    mu = M.mean(0)
    np.testing.assert_allclose(alignment(M, M, mu, mu).numpy(), 0.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(alignment(M, M).numpy(), 0.0, rtol=0, atol=1e-12)
    # a 90-degree rotation in the plane
    M2 = np.array([[math.cos(t), math.sin(t)] for t in (0.3, 0.3 + 2 * math.pi / 3, 0.3 + 4 * math.pi / 3)])
    R = np.array([[0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(alignment(M2, M2 @ R.T, np.zeros(2), np.zeros(2)).numpy(), 90.0, rtol=0, atol=1e-12)
    # means moved into the orthogonal complement of their span
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    A, B = np.eye(4, 10) @ Q.T, np.eye(4, 10, k=4) @ Q.T
    np.testing.assert_allclose(alignment(A, B).numpy(), 90.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(alignment(A, -A).numpy(), 180.0, rtol=0, atol=1e-12)
    # a known angle: rotate each mean by 30 degrees within a plane containing it
    rot = np.cos(np.radians(30)) * A + np.sin(np.radians(30)) * B
    np.testing.assert_allclose(alignment(A, 3.0 * rot).numpy(), 30.0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="both mu_G_clean and mu_G_pert"):
        alignment(A, B, np.zeros(10))


def test_perturbation_metrics_shift_and_identity():
    H, y, _, _ = random_problem(10, 12, balanced=False, seed=8)
    C = 10
    same = perturbation_metrics(H, y, H, y, num_classes=C)
    assert same["alignment_angle"] == pytest.approx(0.0, abs=1e-9)
    assert same["alignment_angle_uncentred"] == pytest.approx(0.0, abs=1e-9)
    assert same["mean_shift"] == 0.0
    assert same["ncc_accuracy_clean_means"] == nc_metrics(H, y, num_classes=C)["ncc_accuracy"]
    assert same["leap_rate"] == pytest.approx(1.0 - same["ncc_accuracy_clean_means"])
    assert "leap_to_prediction" not in same
    assert same["leap"].shape == (C, C) and same["alignment_angle_per_class"].shape == (C,)
    np.testing.assert_allclose(same["leap"].sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-12)

    v = np.linspace(-1.0, 2.0, 12)  # translate every perturbed feature by v
    shifted = perturbation_metrics(H, y, H + v, y, num_classes=C)
    mus = np.stack([H[y == c].mean(0) for c in range(C)])
    tr_B = np.sum((mus - H.mean(0)) ** 2) / C
    assert shifted["mean_shift"] == pytest.approx(np.linalg.norm(v) / math.sqrt(tr_B), rel=1e-10)
    for c in range(C):
        assert float(shifted["alignment_angle_per_class"][c]) == pytest.approx(0.0, abs=1e-6)
    assert shifted["alignment_angle_uncentred"] > 1.0
    want_u = [math.degrees(math.acos(mus[c] @ (mus[c] + v) / (np.linalg.norm(mus[c]) * np.linalg.norm(mus[c] + v))))
              for c in range(C)]
    for c in range(C):
        assert float(shifted["alignment_angle_uncentred_per_class"][c]) == pytest.approx(want_u[c], rel=1e-9)


def test_mean_displacement_of_a_known_shift_per_class():
    """Perturbed set = clean set with class c shifted by v_c: ``||mu'_c - mu_c|| = ||v_c||``, the
    centred distance ``||v_c - v_bar||`` and ``||mu'_G - mu_G|| = ||v_bar||`` with the
    sample-weighted ``v_bar = sum_c N_c v_c / N`` (imbalanced classes: the weights matter)."""
    H, y, _, _ = random_problem(6, 9, balanced=False, seed=21)
    C = 6
    V = np.random.default_rng(5).standard_normal((C, 9)) * np.arange(1, C + 1)[:, None]
    m = perturbation_metrics(H, y, H + V[y], y, num_classes=C)
    counts = np.bincount(y, minlength=C)
    v_bar = counts @ V / counts.sum()
    np.testing.assert_allclose(m["class_mean_distance_per_class"].numpy(), np.linalg.norm(V, axis=1), rtol=1e-12)
    assert m["class_mean_distance"] == pytest.approx(np.linalg.norm(V, axis=1).mean(), rel=1e-12)
    centred = np.linalg.norm(V - v_bar, axis=1)
    np.testing.assert_allclose(m["class_mean_distance_centred_per_class"].numpy(), centred, rtol=1e-10)
    assert m["class_mean_distance_centred"] == pytest.approx(centred.mean(), rel=1e-10)
    assert m["global_mean_distance"] == pytest.approx(np.linalg.norm(v_bar), rel=1e-10)
    # a common shift moves every mean by it and leaves the centred simplex where it was
    v = np.linspace(-1.0, 2.0, 9)
    common = perturbation_metrics(H, y, H + v, y, num_classes=C)
    np.testing.assert_allclose(common["class_mean_distance_per_class"].numpy(), np.linalg.norm(v), rtol=1e-12)
    np.testing.assert_allclose(common["class_mean_distance_centred_per_class"].numpy(), 0.0, atol=1e-12)
    same = perturbation_metrics(H, y, H, y, num_classes=C)
    assert same["class_mean_distance"] == 0.0 and same["global_mean_distance"] == 0.0
    assert same["global_mean_angle"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("theta", [0.0, 17.0, 90.0, 135.0, 180.0])
def test_mean_displacement_of_a_rotation(theta):
    """Every feature rotated by ``theta`` in a plane that contains ``mu_G``: the global means are
    ``theta`` apart, and each class mean moves by ``2 sin(theta/2)`` times the length of its
    projection on the plane (a rotation fixes the orthogonal complement)."""
    H, y, _, _ = random_problem(5, 7, balanced=True, seed=22)
    C = 5
    mu_G = H.mean(0)
    e1 = mu_G / np.linalg.norm(mu_G)
    e2 = np.random.default_rng(6).standard_normal(7)
    e2 -= (e2 @ e1) * e1
    e2 /= np.linalg.norm(e2)
    t = math.radians(theta)
    P = np.outer(e1, e1) + np.outer(e2, e2)  # projection on the plane
    R = np.eye(7) - P + math.cos(t) * P + math.sin(t) * (np.outer(e2, e1) - np.outer(e1, e2))
    m = perturbation_metrics(H, y, H @ R.T, y, num_classes=C)
    assert m["global_mean_angle"] == pytest.approx(theta, abs=1e-6)
    mus = np.stack([H[y == c].mean(0) for c in range(C)])
    want = 2 * math.sin(t / 2) * np.linalg.norm(mus @ P, axis=1)
    np.testing.assert_allclose(m["class_mean_distance_per_class"].numpy(), want, rtol=1e-9, atol=1e-12)
    assert m["global_mean_distance"] == pytest.approx(2 * math.sin(t / 2) * np.linalg.norm(mu_G), rel=1e-9, abs=1e-12)


def test_mean_displacement_streams_and_needs_a_reference():
    H, y, _, _ = random_problem(4, 6, balanced=False, seed=23)
    noisy = H + np.random.default_rng(7).standard_normal(H.shape)
    clean = LayerStats(4)
    for part in np.array_split(np.arange(len(y)), 3):
        clean.accumulate_means(H[part], y[part])
    clean.finish_means()
    pert = LayerStats(4, reference=clean)
    for part in np.array_split(np.arange(len(y)), 5):
        pert.accumulate_means(noisy[part], y[part])
    pert.finish_means()
    dense = perturbation_metrics(H, y, noisy, y, num_classes=4)
    for key, value in pert.mean_displacement().items():
        if isinstance(value, torch.Tensor):
            np.testing.assert_allclose(value.numpy(), dense[key].numpy(), rtol=1e-12)
        else:
            assert value == pytest.approx(dense[key], rel=1e-12)
    with pytest.raises(ValueError, match="reference=<the clean set>"):
        clean.mean_displacement()


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------

_H = np.random.default_rng(0).standard_normal((8, 3))
_Y = np.array([0, 1, 2, 0, 1, 2, 0, 1])


def _with(value, row=2, col=1):
    H = _H.copy()
    H[row, col] = value
    return H


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=np.array([0, 1, 0, 0, 1, 0, 0, 1]), num_classes=3), r"class\(es\) have no sample .*class 2"),
        (dict(labels=np.zeros(8, dtype=int)), "at least 2 classes"),
        (dict(labels=_Y, num_classes=1), "at least 2 classes"),
        (dict(features=_with(np.nan)), "non-finite.*first at row 2"),
        (dict(features=_with(np.inf, row=5)), "non-finite.*first at row 5"),
        (dict(features=_with(-np.inf)), "non-finite"),
        (dict(labels=np.array([0, 1, 2, 0, 1, 3, 0, 1]), num_classes=3), r"must lie in \[0, 2\].*found 3"),
        (dict(labels=np.array([0, 1, 2, 0, 1, -1, 0, 1])), "found -1"),
        (dict(labels=_Y[:7]), "7 entries but the features have 8 rows"),
        (dict(labels=_Y.astype(float)), "must be integers"),
        (dict(features=_H[:, 0]), r"shape \[N, d\]"),
        (dict(features=np.zeros((0, 3)), labels=np.zeros(0, dtype=int)), "empty"),
        (dict(weight=np.zeros((3, 4))), r"weight must have shape \[3, 3\]"),
        (dict(weight=np.full((3, 3), np.nan)), "weight contains non-finite"),
        (dict(bias=np.zeros(3)), "bias given without weight"),
        (dict(logits=np.zeros((8, 2))), r"logits must have shape \[8, 3\]"),
        (dict(logits=np.full((8, 3), np.nan)), "logits contain non-finite"),
    ],
)
def test_nc_metrics_bad_input_raises(kwargs, match):
    args = dict(features=_H, labels=_Y, num_classes=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nc_metrics(args.pop("features"), args.pop("labels"), **args)


def test_other_functions_bad_input_raises():
    M = np.zeros((3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        class_means(_with(np.nan), _Y, 3)
    with pytest.raises(ValueError, match="no sample"):
        class_means(_H, _Y, 4)
    with pytest.raises(ValueError, match=r"means must have shape \[C, 3\]"):
        ncc_predict(_H, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        ncc_predict(_with(np.inf), M)
    with pytest.raises(ValueError, match="means contains non-finite"):
        ncc_predict(_H, np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="no sample"):
        leap(M, _H, np.array([0, 1, 0, 0, 1, 0, 0, 1]), 3)
    with pytest.raises(ValueError, match="features have d=2 but clean_features have d=3"):
        perturbation_metrics(_H, _Y, _H[:, :2], _Y, num_classes=3)
    with pytest.raises(ValueError, match="must lie in"):
        perturbation_metrics(_H, _Y, _H, _Y + 1, num_classes=3)
    with pytest.raises(ValueError, match="no sample in the labels of the features"):
        perturbation_metrics(_H, _Y, _H, np.array([0, 1, 0, 0, 1, 0, 0, 1]), num_classes=3)
    with pytest.raises(ValueError, match=r"logits must have shape \[8, 3\]"):
        perturbation_metrics(_H, _Y, _H, _Y, num_classes=3, logits=np.zeros((8, 4)))
    with pytest.raises(ValueError, match="alignment|shape"):
        alignment(np.zeros((3, 3)), np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------
# benchmark smoke run
# ------------------------------------------------------------------------------------------


@pytest.mark.workflow
@pytest.mark.slow
def test_benchmark_quick_runs():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "collapse.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "baseline/ours" in proc.stdout and "peak" in proc.stdout
