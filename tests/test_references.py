"""The Gibbs reference posterior of the demo GMM against brute-force enumeration of the assignments.

With ``n`` points and ``K`` components the posterior ``p(μ | x)`` is exactly the mixture over all ``K^n``
assignments ``z`` of independent Gaussians ``μ_k | z ~ N(S_k / (n_k + σ₀⁻²), I / (n_k + σ₀⁻²))`` with weights
``w_z ∝ Π_k (σ₀² n_k + 1)^{-d/2} exp(½ ‖S_k‖² / (n_k + σ₀⁻²))`` (the marginal likelihood of each component's
points). Moments of the mixture are exact sums over ``z``.

Tolerances: each Monte-Carlo estimate ``mean_s f(μ_s)`` is compared with its exact value within 5 standard
errors, ``SE = sd(f) / sqrt(ESS_f)`` with ``ESS_f`` the multi-chain effective sample size of ``f`` over the
Gibbs chains (so autocorrelation is accounted for). With ~40 compared quantities per test, a false alarm at
5 SE has probability below 1e-4, and the seeds are fixed.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mcmc_unlearner.experiments.references import GibbsInit, gmm_gibbs, gmm_map
from mcmc_unlearner.metrics import align_mixture_samples, align_permutation, effective_sample_size


def _enumerate(x: np.ndarray, k: int, prior_std: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact posterior as a mixture over assignments: weights ``[Z]``, means ``[Z, K, d]``, variances ``[Z, K]``."""
    n, d = x.shape
    z = np.array(list(itertools.product(range(k), repeat=n)))  # [Z, n]
    onehot = (z[..., None] == np.arange(k)).astype(np.float64)  # [Z, n, K]
    counts = onehot.sum(1)  # [Z, K]
    sums = np.einsum("znk,nd->zkd", onehot, x)
    prec = counts + 1.0 / prior_std**2
    logw = (-0.5 * d * np.log(prior_std**2 * counts + 1.0) + 0.5 * (sums**2).sum(-1) / prec).sum(-1)
    w = np.exp(logw - logw.max())
    return w / w.sum(), sums / prec[..., None], 1.0 / prec


def _check(values: np.ndarray, exact: np.ndarray, chains: int) -> None:
    """``values`` [S, ...] per draw (chain-interleaved); every mean within 5 SE of ``exact``."""
    s_c = values.shape[0] // chains
    v = values[: s_c * chains].reshape(s_c, chains, -1).transpose(1, 0, 2)  # [C, S_c, p]
    ess = effective_sample_size(v, multichain=True)
    est = v.reshape(-1, v.shape[-1]).mean(0)
    se = v.reshape(-1, v.shape[-1]).std(0, ddof=1) / np.sqrt(ess)
    exact = np.asarray(exact).reshape(-1)
    z = np.abs(est - exact) / se
    assert np.all(z < 5.0), (z.max(), est, exact, se)
    assert np.all(ess > 0.3 * v.shape[0] * v.shape[1])  # the thinned draws are close to independent


def test_label_invariant_moments_match_enumeration():
    """Unclustered data, chains from the prior: labels mix, so compare label-invariant moments.

    Every point's assignment is uncertain here (3^8 = 6,561 assignments with real weight), so a biased assignment
    step shows: drawing ``z`` with the CDF scaled by 0.95 moves these moments by more than 10 SE.
    """
    rng = np.random.default_rng(3)
    k, prior_std = 3, 1.5
    x = rng.normal(0.0, 1.5, size=(8, 2))
    w, m, v = _enumerate(x, k, prior_std)
    # labels switch (τ of a coordinate ~50 sweeps), but the label-invariant moments mix within a few sweeps
    g = gmm_gibbs(x, k=k, prior_std=prior_std, n_draws=24_000, chains=16, init=GibbsInit.PRIOR, thin=5, seed=1)
    mu = g.samples  # [S, K, d]
    d = x.shape[1]
    # Σ_k μ_k,  Σ_k μ_k μ_kᵀ,  Σ_{k≠l} μ_k μ_lᵀ
    s1 = mu.sum(1)
    s2 = np.einsum("ska,skb->sab", mu, mu).reshape(len(mu), -1)
    tot = mu.sum(1)
    cross = (np.einsum("sa,sb->sab", tot, tot) - np.einsum("ska,skb->sab", mu, mu)).reshape(len(mu), -1)
    e1 = np.einsum("z,zkd->d", w, m)
    e2 = np.einsum("z,zka,zkb->ab", w, m, m) + np.einsum("z,zk->", w, v) * np.eye(d)
    tm = m.sum(1)
    e_cross = np.einsum("z,za,zb->ab", w, tm, tm) - np.einsum("z,zka,zkb->ab", w, m, m)
    _check(s1, e1, g.chains)
    _check(s2, e2, g.chains)
    _check(cross, e_cross, g.chains)
    # the chains do switch labels here: per-chain alignment is not the whole story, and the result says so
    assert g.switch_fraction > 0.05


def test_aligned_moments_match_enumeration_with_the_demo_alignment():
    """Separated clusters plus ambiguous points: no label switching, so the aligned draws have exact moments.

    The exact aligned posterior relabels each assignment's Gaussian term by the permutation that matches its mean
    to the reference means (the per-set Hungarian matching of ``align_mixture_samples``); a draw would be
    relabelled differently only with negligible probability here (the components are ≥ 10 posterior sds apart).
    """
    rng = np.random.default_rng(7)
    k, prior_std = 3, 2.0
    centres = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    # three points per cluster and one point half-way between clusters 0 and 2 (3^10 = 59,049 assignments)
    x = np.concatenate([centres[j] + 0.5 * rng.normal(size=(3, 2)) for j in range(k)] + [[[-1.5, 2.5]]])
    w, m, v = _enumerate(x, k, prior_std)
    heavy = w > 1e-12  # the terms left out weigh < 1e-7 in total: far below the Monte-Carlo error
    assert w[~heavy].sum() < 1e-7
    w, m, v = w[heavy] / w[heavy].sum(), m[heavy], v[heavy]
    g = gmm_gibbs(x, k=k, prior_std=prior_std, n_draws=24_000, chains=16, seed=2)
    ref = g.reference_means
    np.testing.assert_allclose(ref, align_mixture_samples(gmm_map(x, k, prior_std), ref))  # the posterior mode
    perms = np.array([align_permutation(mz, ref) for mz in m])  # per-term relabelling
    m_al = np.take_along_axis(m, perms[..., None], axis=1)
    v_al = np.take_along_axis(v, perms, axis=1)
    flat_m = m_al.reshape(len(w), -1)
    flat_v = np.repeat(v_al, x.shape[1], axis=1)
    mean_exact = w @ flat_m
    second_exact = np.einsum("z,za,zb->ab", w, flat_m, flat_m) + np.diag(w @ flat_v)
    flat = g.flat
    assert g.switch_fraction == 0.0 and g.mode_gap < 1.0
    _check(flat, mean_exact, g.chains)
    _check(np.einsum("sa,sb->sab", flat, flat).reshape(len(flat), -1), second_exact, g.chains)
    # the ambiguous point really matters: the exact posterior is not one Gaussian term
    assert np.max(w) < 0.9


def test_gibbs_is_seeded_and_reports_its_thinning():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, size=(30, 2)), rng.normal(2, 1, size=(30, 2))])
    a = gmm_gibbs(x, k=2, n_draws=500, chains=4, seed=5)
    b = gmm_gibbs(x, k=2, n_draws=500, chains=4, seed=5)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.samples.shape == (500, 2, 2)
    assert a.by_chain().shape == (4, 125, 2, 2)
    np.testing.assert_array_equal(a.by_chain()[1, 3], a.samples[3 * 4 + 1])
    assert a.thin >= 2 * a.tau.max() and a.thin >= 1
    assert a.sweeps == a.burnin + 400 + 125 * a.thin
    s = a.summary()
    assert s["n_draws"] == 500 and s["ess_min"] > 0.3 * 500
    c = gmm_gibbs(x, k=2, n_draws=500, chains=4, seed=6)
    assert not np.array_equal(a.samples, c.samples)
    fixed = gmm_gibbs(x, k=2, n_draws=40, chains=4, thin=7, seed=5)
    assert fixed.thin == 7 and fixed.sweeps == fixed.burnin + 10 * 7


def test_gibbs_refuses_bad_input():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="non-finite"):
        gmm_gibbs(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        gmm_gibbs(np.zeros(5))
    with pytest.raises(ValueError, match="prior_std"):
        gmm_gibbs(x, prior_std=0.0)
    with pytest.raises(ValueError, match="reference_means"):
        gmm_gibbs(x, k=2, reference_means=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="thin"):
        gmm_gibbs(x, k=2, thin=0)
