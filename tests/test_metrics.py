"""Tests for the sample-set metrics.

Tolerances for the k-NN KL estimator. With ``k = 1`` each term ``d·log ν_i − d·log ρ_i`` has a standard
deviation of about ``sqrt(2·π²/6) ≈ 1.8`` nats (``d·log`` of a nearest-neighbour distance is close to
Gumbel-distributed), so for ``n = m = 5000`` the standard error is about ``1.8 / sqrt(5000) ≈ 0.026``;
measured over 10 seeds it was 0.026–0.032. The finite-sample bias decays like ``n^{-1/d}``: for a pure mean
shift with KL = 0.5 it was measured at −0.01 in 2-D and −0.10 in 10-D (n = 5000). The tolerances below are
|bias| + about 5 standard errors: 0.15 (2-D), 0.25 (10-D), 0.15 for two samples of the same Gaussian
(no bias by symmetry). Seeds are fixed, so the tests are deterministic anyway.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mcmc_unlearner.metrics import (
    align_mixture_samples,
    align_permutation,
    gaussian_kl,
    knn_distances,
    knn_kl,
    thin,
)


def _shifted_pair(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu1 = np.full(d, 1.0 / np.sqrt(d))  # ‖mu1‖ = 1, so KL(N(0, I) ‖ N(mu1, I)) = 0.5
    return rng.normal(size=(n, d)), mu1 + rng.normal(size=(n, d)), mu1


@pytest.mark.parametrize(("d", "tol"), [(2, 0.15), (10, 0.25)])
def test_knn_kl_matches_closed_form(d: int, tol: float) -> None:
    p, q, mu1 = _shifted_pair(d, 5000, seed=d)
    true = gaussian_kl(np.zeros(d), np.eye(d), mu1, np.eye(d))
    assert true == pytest.approx(0.5)
    assert knn_kl(p, q) == pytest.approx(true, abs=tol)


def test_knn_kl_anisotropic_2d() -> None:
    rng = np.random.default_rng(11)
    mu1, var1 = np.array([0.7, 0.7]), np.array([0.5, 2.0])
    p = rng.normal(size=(5000, 2))
    q = mu1 + rng.normal(size=(5000, 2)) * np.sqrt(var1)
    true = gaussian_kl(np.zeros(2), np.eye(2), mu1, np.diag(var1))
    # measured bias -0.055 (10 seeds), so allow |bias| + 5 standard errors
    assert knn_kl(p, q) == pytest.approx(true, abs=0.2)


@pytest.mark.parametrize("d", [2, 10])
def test_knn_kl_same_distribution_near_zero(d: int) -> None:
    rng = np.random.default_rng(100 + d)
    p = rng.normal(size=(5000, d))
    q = rng.normal(size=(4000, d))
    assert abs(knn_kl(p, q)) < 0.15


@pytest.mark.parametrize("d", [5, 40])
def test_knn_methods_agree_moderate_dim(d: int) -> None:
    rng = np.random.default_rng(d)
    p = rng.normal(size=(400, d))
    q = 0.3 + 1.2 * rng.normal(size=(350, d))
    for k in (1, 3):
        a = knn_kl(p, q, k=k, method="kdtree")
        b = knn_kl(p, q, k=k, method="brute", chunk_size=37)  # small chunks cross the diagonal blocks
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)


def test_knn_high_dim_brute_matches_kdtree_and_cdist() -> None:
    rng = np.random.default_rng(5)
    d = 2000
    # far from the origin but close together, as parameter samples of an MCMC chain are
    centre = rng.normal(size=d) * 10.0
    p = (centre + 0.01 * rng.normal(size=(300, d))).astype(np.float32)
    q = (centre + 0.2 + 0.012 * rng.normal(size=(250, d))).astype(np.float32)
    auto = knn_kl(p, q)  # d > 32 -> brute force
    tree = knn_kl(p, q, method="kdtree")
    assert auto == pytest.approx(tree, rel=1e-6)
    ref = cdist(p.astype(np.float64), q.astype(np.float64)).min(axis=1)
    np.testing.assert_allclose(knn_distances(p, q, method="brute", chunk_size=64), ref, rtol=1e-9)
    self_d = cdist(p.astype(np.float64), p.astype(np.float64))
    np.fill_diagonal(self_d, np.inf)
    np.testing.assert_allclose(knn_distances(p, method="brute", chunk_size=64), self_d.min(axis=1), rtol=1e-9)


def test_knn_kl_flattens_and_handles_duplicates() -> None:
    rng = np.random.default_rng(9)
    p = rng.normal(size=(200, 4, 2))
    q = rng.normal(size=(150, 4, 2))
    assert knn_kl(p, q) == pytest.approx(knn_kl(p.reshape(200, 8), q.reshape(150, 8)))
    dup = np.concatenate([p[:50], p[:50], p[:5]]).reshape(105, 8)
    for method in ("kdtree", "brute"):
        rho = knn_distances(dup, method=method)
        assert np.all(rho == 0.0)  # every point has an exact copy
        val = knn_kl(dup, q.reshape(150, 8), method=method)
        assert np.isfinite(val) and val > 50  # clamped at eps: huge but finite
    assert knn_kl(dup, q.reshape(150, 8), method="kdtree") == pytest.approx(
        knn_kl(dup, q.reshape(150, 8), method="brute")
    )


def test_knn_kl_input_validation() -> None:
    with pytest.raises(ValueError):
        knn_kl(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError):
        knn_kl(np.zeros((1, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError):
        knn_kl(np.zeros((10, 2)), np.zeros((10, 2)), method="nope")  # type: ignore[arg-type]


def test_thin() -> None:
    x = np.arange(10)
    np.testing.assert_array_equal(thin(x, 3), [0, 3, 6, 9])
    assert thin(list(range(5)), 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        thin(x, 0)


def test_alignment_recovers_permutation() -> None:
    rng = np.random.default_rng(2)
    k, d, s = 6, 3, 500
    ref = rng.normal(size=(k, d)) * 4.0
    samples = ref + 0.3 * rng.normal(size=(s, k, d))
    pi = rng.permutation(k)
    shuffled = samples[:, pi]
    perm = align_permutation(shuffled, ref)
    np.testing.assert_array_equal(perm, np.argsort(pi))
    np.testing.assert_array_equal(align_mixture_samples(shuffled, ref), samples)
    # a single [K, d] sample works too
    np.testing.assert_array_equal(align_mixture_samples(shuffled[0], ref), samples[0])
    with pytest.raises(ValueError):
        align_permutation(shuffled, ref[:, :2])


def test_gaussian_kl() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + np.eye(3)
    mu = rng.normal(size=3)
    assert gaussian_kl(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-12)
    # 1-D closed form: log(s1/s0) + (s0² + (m0-m1)²) / (2 s1²) - 1/2
    s0, s1, m0, m1 = 0.7, 1.9, 0.2, -1.1
    expected = np.log(s1 / s0) + (s0**2 + (m0 - m1) ** 2) / (2 * s1**2) - 0.5
    assert gaussian_kl([m0], s0**2, [m1], s1**2) == pytest.approx(expected)
    # diagonal shorthand equals the full matrix, and KL is asymmetric
    v0, v1 = np.array([1.0, 2.0, 0.5]), np.array([0.3, 1.0, 4.0])
    assert gaussian_kl(mu, v0, 0 * mu, v1) == pytest.approx(gaussian_kl(mu, np.diag(v0), 0 * mu, np.diag(v1)))
    # Monte Carlo check of the full-covariance case
    cov1 = np.diag([2.0, 1.0, 0.5])
    x = rng.multivariate_normal(mu, cov, size=200_000)
    from scipy.stats import multivariate_normal as mvn

    mc = np.mean(mvn(mu, cov).logpdf(x) - mvn(np.zeros(3), cov1).logpdf(x))
    assert gaussian_kl(mu, cov, np.zeros(3), cov1) == pytest.approx(mc, rel=0.02)
