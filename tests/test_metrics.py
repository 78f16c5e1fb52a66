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
    EssMethod,
    align_mixture_samples,
    align_permutation,
    autocorrelation,
    cluster_spread_ratio,
    effective_sample_size,
    gauss_fit_kl,
    gaussian_kl,
    knn_distances,
    knn_kl,
    knn_kl_reverse,
    mean_abs_sd_error,
    mean_shift_in_sd,
    sample_set_distances,
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
        with pytest.warns(RuntimeWarning, match="repeat another point of p"):  # stop 46: said, not silent
            val = knn_kl(dup, q.reshape(150, 8), method=method)
        assert np.isfinite(val) and val > 50  # clamped at eps: huge but finite
    with pytest.warns(RuntimeWarning):
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


def test_knn_kl_reverse_matches_closed_form_of_the_other_direction() -> None:
    rng = np.random.default_rng(11)
    mu1, var1 = np.array([0.7, 0.7]), np.array([0.5, 2.0])
    p = rng.normal(size=(5000, 2))
    q = mu1 + rng.normal(size=(5000, 2)) * np.sqrt(var1)
    forward = gaussian_kl(np.zeros(2), np.eye(2), mu1, np.diag(var1))
    reverse = gaussian_kl(mu1, np.diag(var1), np.zeros(2), np.eye(2))
    assert abs(forward - reverse) > 0.1  # the directions differ, so swapping them would be caught
    # measured over 10 seeds: bias -0.045, sd 0.038; allow |bias| + 4 sd
    assert knn_kl_reverse(p, q) == pytest.approx(reverse, abs=0.2)
    assert knn_kl_reverse(p, q) == knn_kl(q, p)


def _exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``n`` points whose sample mean is exactly ``mean`` and unbiased sample covariance exactly ``cov``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def test_gauss_fit_kl_equals_the_closed_form_of_the_sample_moments() -> None:
    rng = np.random.default_rng(4)
    d = 4
    m0, m1 = rng.normal(size=d), rng.normal(size=d)
    c0, c1 = _random_cov(rng, d), _random_cov(rng, d)
    p = _exact_moments(rng, 300, m0, c0)
    q = _exact_moments(rng, 500, m1, c1)
    assert gauss_fit_kl(p, q) == pytest.approx(gaussian_kl(m0, c0, m1, c1), rel=1e-9)
    assert gauss_fit_kl(q, p) == pytest.approx(gaussian_kl(m1, c1, m0, c0), rel=1e-9)
    assert gauss_fit_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    # flattening [S, K, d] sample sets, and a consistent estimate from plain Gaussian draws
    assert gauss_fit_kl(p.reshape(300, 2, 2), q.reshape(500, 2, 2)) == pytest.approx(gauss_fit_kl(p, q))
    big_p = rng.multivariate_normal(m0, c0, size=100_000)
    big_q = rng.multivariate_normal(m1, c1, size=100_000)
    true = gaussian_kl(m0, c0, m1, c1)
    # KL ≈ 12.4 here; over 10 seeds the relative error was -0.4% ± 0.4%: allow 3% (> 5 sd)
    assert gauss_fit_kl(big_p, big_q) == pytest.approx(true, rel=0.03)
    with pytest.raises(ValueError, match="more samples than dimensions"):
        gauss_fit_kl(p[:3], q)


def test_moment_errors_equal_their_closed_forms() -> None:
    rng = np.random.default_rng(6)
    m0, m1 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, -1.0])
    sd0, sd1 = np.array([1.0, 0.5, 2.0]), np.array([0.8, 0.5, 1.0])
    corr = np.array([[1.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 1.0]])
    p = _exact_moments(rng, 200, m0, corr * np.outer(sd0, sd0))
    q = _exact_moments(rng, 400, m1, np.diag(sd1**2))
    assert mean_abs_sd_error(p, q) == pytest.approx(np.mean(np.abs(sd0 - sd1)), rel=1e-9)
    assert mean_shift_in_sd(p, q) == pytest.approx(np.mean(np.abs(m0 - m1) / sd1), rel=1e-9)
    assert mean_abs_sd_error(q, q) == 0.0 and mean_shift_in_sd(q, q) == 0.0
    with pytest.raises(ValueError, match="zero spread"):
        mean_shift_in_sd(p, np.ones((5, 3)))


def test_cluster_spread_ratio() -> None:
    rng = np.random.default_rng(8)
    q = rng.normal(size=(1000, 3, 2)) * np.array([1.0, 0.2, 3.0])[None, :, None] + 5.0
    scale = np.array([0.5, 1.0, 2.0])
    centre = q.mean(0)
    p = centre + (q - centre) * scale[None, :, None]
    np.testing.assert_allclose(cluster_spread_ratio(p, q), scale, rtol=1e-9)
    # rotation and translation do not change a cluster's spread
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    np.testing.assert_allclose(cluster_spread_ratio(q @ rot.T + 3.0, q), 1.0, rtol=1e-9)
    # known covariances: (det C_p / det C_q)^{1/(2d)}
    cp, cq = _random_cov(rng, 2), _random_cov(rng, 2)
    a = _exact_moments(rng, 300, np.zeros(2), cp)[:, None, :]
    b = _exact_moments(rng, 300, np.ones(2), cq)[:, None, :]
    expected = (np.linalg.det(cp) / np.linalg.det(cq)) ** 0.25
    assert cluster_spread_ratio(a, b)[0] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match=r"\[S, K, d\]"):
        cluster_spread_ratio(p.reshape(1000, 6), q)


def test_sample_set_distances_collects_every_metric() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2000, 2, 2))
    chain = 0.2 + 1.3 * rng.normal(size=(3000, 2, 2))
    out = sample_set_distances(chain, ref, every=3, mixture=(2, 2))
    flat_c, flat_r = chain.reshape(3000, 4), ref.reshape(2000, 4)
    assert out["kl_forward"] == pytest.approx(knn_kl(flat_c[::3], flat_r))
    assert out["kl_reverse"] == pytest.approx(knn_kl(flat_r, flat_c[::3]))
    assert out["gauss_kl"] == pytest.approx(gauss_fit_kl(flat_c, flat_r))
    assert out["mean_err_sd"] == pytest.approx(mean_abs_sd_error(flat_c, flat_r))
    assert out["mean_shift_sd"] == pytest.approx(mean_shift_in_sd(flat_c, flat_r))
    np.testing.assert_allclose(out["spread_ratio"], cluster_spread_ratio(chain, ref))
    assert out["spread_log_err"] == pytest.approx(np.mean(np.abs(np.log(out["spread_ratio"]))))
    # 4-D Gaussians, mean shift 0.2 per coordinate and sd 1.3: the moment metrics are near their true values
    assert out["mean_err_sd"] == pytest.approx(0.3, abs=0.06)
    assert out["gauss_kl"] == pytest.approx(gaussian_kl(np.full(4, 0.2), 1.69, np.zeros(4), 1.0), abs=0.08)


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
    """Stationary AR(1) ``x_t = φ x_{t−1} + sqrt(1 − φ²) ε_t`` along the last axis (unit variance)."""
    from scipy.signal import lfilter

    e = rng.normal(size=shape)
    e[..., 0] /= np.sqrt(1.0 - phi**2)  # x_0 ~ N(0, 1): stationary from the start
    return lfilter([np.sqrt(1.0 - phi**2)], [1.0, -phi], e, axis=-1)


def test_autocorrelation_of_ar1() -> None:
    rng = np.random.default_rng(0)
    x = _ar1(rng, (100_000,), 0.8)
    rho = autocorrelation(x, max_lag=5)
    # sd of ρ_t for an AR(1) at these lags is about sqrt((1+φ²)/(1−φ²)/n) ≈ 0.007: allow 0.03
    np.testing.assert_allclose(rho, 0.8 ** np.arange(6), atol=0.03)
    two = autocorrelation(np.stack([x, np.ones_like(x)], axis=1), max_lag=3)
    assert two.shape == (4, 2)
    np.testing.assert_array_equal(two[:, 1], [1.0, 0.0, 0.0, 0.0])  # a constant column


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_ess_of_ar1_matches_the_integrated_autocorrelation_time(phi: float) -> None:
    """ESS = n (1 − φ)/(1 + φ). Measured relative sd over 20 seeds at n = 50,000 and φ = 0.9: IPS 5.5%,
    batch means 11%, 4 chains (IPS) 6.5%; at n = 200,000 they halve. Tolerances: 15% for IPS, 30% for batch
    means (about 5 sd)."""
    n = 200_000
    expected = n * (1 - phi) / (1 + phi)
    rng = np.random.default_rng(int(10 * phi))
    x = _ar1(rng, (n,), phi)
    assert effective_sample_size(x)[0] == pytest.approx(expected, rel=0.15)
    assert effective_sample_size(x, EssMethod.BATCH)[0] == pytest.approx(expected, rel=0.30)
    chains = _ar1(rng, (4, n // 4), phi)
    assert effective_sample_size(chains, "ips", multichain=True)[0] == pytest.approx(expected, rel=0.15)
    # several coordinates at once: [n, 2] gives one ESS per column
    both = effective_sample_size(np.stack([x, _ar1(rng, (n,), 0.0)], axis=1))
    assert both.shape == (2,) and both[1] == pytest.approx(n, rel=0.15)


def test_ess_sees_chains_that_disagree() -> None:
    """Four white-noise chains stuck around different values: within-chain the draws look independent, but
    the pooled ESS must collapse towards the number of chains."""
    rng = np.random.default_rng(1)
    chains = rng.normal(size=(4, 5000)) + np.array([0.0, 3.0, -3.0, 6.0])[:, None]
    assert effective_sample_size(chains[0])[0] == pytest.approx(5000, rel=0.15)
    assert effective_sample_size(chains, multichain=True)[0] < 100
    # trailing dimensions are flattened; a coordinate that never moves counts as C·n independent draws
    stuck = np.zeros((300, 2, 2))
    stuck[:, 0, 0] = rng.normal(size=300)
    ess = effective_sample_size(stuck)
    assert ess.shape == (4,) and np.all(ess[1:] == 300)
    with pytest.raises(ValueError, match="at least 4 draws"):
        effective_sample_size(np.zeros(3))
    with pytest.raises(ValueError):
        effective_sample_size(np.zeros(100), method="nope")
    with pytest.raises(ValueError, match="non-finite"):
        effective_sample_size(np.array([0.0, 1.0, np.inf, 2.0, 3.0]))


def test_knn_kl_of_a_set_against_itself_is_said_to_be_undefined() -> None:
    """KL(P ‖ P) from one set scored -49 in 2-D (every ν is 0, clamped at eps) without a word (stop 46's probe)."""
    p = np.random.default_rng(3).normal(size=(300, 2))
    with pytest.warns(RuntimeWarning, match="300 point\\(s\\) of p are also points of q"):
        assert knn_kl(p, p) < -40
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # independent sets: no warning
        assert abs(knn_kl(p, np.random.default_rng(4).normal(size=(300, 2)))) < 0.2


def test_degenerate_inputs_to_the_moment_metrics_are_refused_by_name() -> None:
    rng = np.random.default_rng(5)
    p = rng.normal(size=(50, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_abs_sd_error(p[:1], p)
    with pytest.raises(ValueError, match="not positive definite"):
        gauss_fit_kl(p, np.c_[p[:, 0], np.zeros(50)])  # a reference that never moves along one coordinate
    with pytest.raises(ValueError, match="at least one draw"):
        autocorrelation(np.zeros(0))
    with pytest.raises(ValueError, match="scalar"):
        knn_kl(np.float64(1.0), p)
