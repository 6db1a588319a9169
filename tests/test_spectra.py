"""Tests of ncrobust.spectra: the power-law exponent recovered from exact and from sampled
spectra, the fit-range pitfall, the Gram route against the covariance route, and bad input."""

from __future__ import annotations

import pytest
import torch

from ncrobust import spectra
from ncrobust.models import create_model
from ncrobust.spectra import layer_exponents, power_law_exponent, power_law_spectrum, representation_spectrum

ALPHAS = (0.8, 1.0, 1.5)
# Gaussian features with covariance spectrum n^-alpha: N samples of d dimensions. The default ranks
# 11..500 stay well below d and N; the sample spectrum then recovers alpha within TOLERANCE
# (measured: errors <= 0.01 at these sizes and seed, for the three exponents).
N, D, TOLERANCE = 4000, 1000, 0.02


def gaussian_features(alpha: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g) * power_law_spectrum(alpha, D).sqrt().float()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_exact_spectrum(alpha):
    lam = power_law_spectrum(alpha, 600)
    assert power_law_exponent(lam) == pytest.approx(alpha, abs=1e-12)
    assert power_law_exponent(lam.flip(0)) == pytest.approx(alpha, abs=1e-12)  # sorted inside
    assert power_law_exponent(5.0 * lam, (2, 50)) == pytest.approx(alpha, abs=1e-12)  # scale-free


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sampled_features_and_the_fit_range_pitfall(alpha):
    """The default range recovers alpha from N x d Gaussian features; a range up to the dimension
    reaches where the sample spectrum bends down (Marchenko-Pastur) and biases the estimate by
    more than the tolerance."""
    lam = representation_spectrum(gaussian_features(alpha))
    assert lam.shape == (D,) and lam.dtype == torch.float64 and (lam.diff() <= 0).all()
    assert power_law_exponent(lam) == pytest.approx(alpha, abs=TOLERANCE)
    biased = power_law_exponent(lam, (11, D))
    assert abs(biased - alpha) > 2 * TOLERANCE


def test_weights_are_one_over_n():
    """The fit weights rank n by 1/n: a spectrum bent only in its tail moves the weighted fit less
    than an unweighted least-squares fit (Stringer et al.'s choice: the tail has more points)."""
    n = torch.arange(1, 501, dtype=torch.float64)
    lam = n**-1.0 * torch.where(n > 300, (n / 300) ** -0.5, torch.ones_like(n))
    weighted = power_law_exponent(lam, (1, 500))
    x = torch.stack([-n.log(), torch.ones_like(n)], dim=1)
    unweighted = torch.linalg.lstsq(x, lam.log()[:, None]).solution[0, 0]
    assert 1.0 < weighted < float(unweighted)
    w = 1 / n
    expected = torch.linalg.solve(x.T @ (x * w[:, None]), x.T @ (w * lam.log()))[0]
    assert weighted == pytest.approx(float(expected), abs=1e-12)


def test_gram_route_equals_covariance_route(monkeypatch):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(30, 2, 7, 7, generator=g) + 3.0  # d = 98 > N = 30, uncentred
    monkeypatch.setattr(spectra, "_BLOCK_BYTES", 30 * 8 * 10)  # 10 columns per block: the blocks are exercised
    gram = representation_spectrum(wide)
    cov = representation_spectrum(wide, route="covariance")
    assert gram.shape == cov.shape == (30,)
    torch.testing.assert_close(gram, cov, rtol=1e-9, atol=1e-12)
    assert gram[-1] < 1e-12 * gram[0]  # centring: rank N - 1
    tall = torch.randn(50, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(representation_spectrum(tall, route="gram"), representation_spectrum(tall), rtol=1e-9, atol=1e-12)
    # against numpy's covariance (1/N normalisation)
    import numpy as np

    ref = np.sort(np.linalg.eigvalsh(np.cov(tall.numpy(), rowvar=False, bias=True)))[::-1]
    torch.testing.assert_close(representation_spectrum(tall), torch.from_numpy(ref.copy()), rtol=1e-9, atol=1e-12)


def test_layer_exponents_over_taps():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,), depth=2, width=64).eval()
    with torch.no_grad():
        _, taps = model(torch.rand(200, 1, 8, 8), taps=True)
    alphas = layer_exponents(taps, (2, 20))
    assert list(alphas) == model.tap_names and all(isinstance(a, float) for a in alphas.values())
    with pytest.raises(ValueError, match=r"tap 'layer1': index_range \(11, 500\) needs 500 eigenvalues but the spectrum has 64"):
        layer_exponents(taps)


def test_bad_input():
    with pytest.raises(ValueError, match="needs 500 eigenvalues but the spectrum has 100"):
        power_law_exponent(power_law_spectrum(1.0, 100))
    lam = power_law_spectrum(1.0, 100)
    lam[60:] = 0
    with pytest.raises(ValueError, match="eigenvalue of rank 61 is 0"):
        power_law_exponent(lam, (11, 80))
    for bad in ((0, 10), (10, 10), (3,), (1.5, 9)):
        with pytest.raises(ValueError, match="index_range"):
            power_law_exponent(lam, bad)
    with pytest.raises(ValueError, match="route"):
        representation_spectrum(torch.randn(5, 3), route="svd")
    with pytest.raises(ValueError, match="NaN or inf"):
        representation_spectrum(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [2.0, 1.0]]))
