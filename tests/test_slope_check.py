"""The slope test (``DampingControl(slope_eta=...)``): a bank not at equilibrium along a step is not moved along it.

A conjugate linear regression whose third input only the removed rows light up: the remaining rows' exact posterior
is the prior ``N(0, 1)`` along that weight and independent of the others. The bank holds exact draws of the
full-data posterior along the first two weights but, along the third, draws of the prior (a chain too short to have
moved where only the removed rows pulled): it is already at the remaining posterior there, so the right step along
it is none, while ``G``'s third component (the removed rows' unbalanced pull) makes the model's Newton step move the
third weight by many prior standard deviations (the far-rows overshoot of stop 62's probe).
"""

from __future__ import annotations

import math

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.errors import QualityError
from mcmc_unlearner.models.linreg import BayesianLinearRegression, exact_posterior
from mcmc_unlearner.step import SLOPE_ETA, DampingControl, Measurement

S = 64  # bank draws


def _problem(live: float, shift: float = 0.0):
    """Rows, removed ids, the bank, the remaining rows' exact posterior mean and ``H_r = I + X_rᵀX_r``; the removed
    rows' labels are also off by ``live·sign(x₀)`` (a pull the first two weights saw and the bank balanced); the
    bank's third weight is drawn from the prior moved by ``shift``."""
    g = torch.Generator().manual_seed(0)
    n, removed = 400, 20
    x = torch.randn(n, 3, generator=g)
    x[:, 2] = 0.0
    x[-removed:, 2] = 1.0  # only the removed rows light up the third input
    y = x[:, :2] @ torch.tensor([1.0, -0.5]) + torch.randn(n, generator=g)
    y[-removed:] += 2.0 + live * torch.sign(x[-removed:, 0])
    keep = torch.ones(n, dtype=torch.bool)
    keep[-removed:] = False
    m_all, c_all = (t.float() for t in exact_posterior(x, y))
    m_kept = exact_posterior(x[keep], y[keep])[0].double()
    draws = m_all + torch.randn(S, 3, generator=g) @ torch.linalg.cholesky(c_all).T
    draws[:, 2] = torch.randn(S, generator=g) + shift  # the chain never moved along the third weight: the prior's
    H_r = torch.eye(3, dtype=torch.float64) + x[keep].double().T @ x[keep].double()
    return x, y, torch.arange(n - removed, n), draws, m_kept, H_r


def _forget(live: float, slope_eta: float | None, shift: float = 0.0):
    x, y, removed, draws, m_kept, H_r = _problem(live, shift)
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=draws.clone(), curvature_draws=4)
    un.control.slope_eta = slope_eta
    return un, lambda: un.forget(removed, RemovableDataset(x, y, batch_size=50, seed=0)), draws, m_kept, H_r


def _bank_minimiser(draws: torch.Tensor, m_kept: torch.Tensor, H_r: torch.Tensor, u: torch.Tensor) -> float:
    """Closed form: the length along ``u`` minimising the draws' mean remaining-data energy (a quadratic with
    gradient ``H_r(θ − m_kept)``)."""
    slope = H_r @ (draws.double().mean(0) - m_kept)
    return float(-(slope @ u) / (u @ H_r @ u))


def test_the_defaults_do_not_move_the_bank_where_it_is_already_at_the_remaining_posterior() -> None:
    """Without the test the undamped exact step is taken (the model is exact along it) and moves the third weight by
    more than 10 prior standard deviations, a step along which the bank's own remaining energy is lowest at under
    5% of its length. With the defaults the damping grows until the step's slope share passes: the third weight
    moves by less than one prior standard deviation, the first two within 30% of their exact shift, and the bank's
    energy along the step taken is lowest within a third of its full length."""
    un, forget, draws, m_kept, H_r = _forget(3.0, None)
    plain = forget()
    u = (un.bank - draws).double().mean(0)
    assert plain.safe and plain.damping == 0.0
    assert float(u[2]) < -10.0
    assert abs(_bank_minimiser(draws, m_kept, H_r, u)) < 0.05
    un, forget, draws, m_kept, H_r = _forget(3.0, SLOPE_ETA)
    report = forget()
    u = (un.bank - draws).double().mean(0)
    assert report.safe and report.damping > 0
    assert abs(float(u[2])) < 1.0
    exact = (m_kept - draws.double().mean(0))[:2]
    assert float((u[:2] - exact).norm()) < 0.3 * float(exact.norm())
    assert 0.75 < _bank_minimiser(draws, m_kept, H_r, u) < 1.33


def test_a_step_along_which_the_banks_energy_does_not_fall_is_refused_and_nothing_changes() -> None:
    """Only the unbalanced pull (no live misfit), the bank's third weight two prior deviations past the remaining
    posterior's mean on the side the step moves it to: every damping's step tends to ``G``, whose slope share stays
    below ``slope_eta``, and the search again without the test finds a step along which the bank's own energy
    clearly rises (by more than its draws' error): refused, naming the cause and the override, the bank as it was.
    (Drawn from the prior itself, the bank is at the remaining posterior along that weight and its slope is the
    8 check draws' noise: the refusal then hung on that noise's sign before the draws' error was counted.)"""
    un, forget, draws, _, _ = _forget(0.0, SLOPE_ETA, shift=-2.0)
    with pytest.raises(QualityError, match="not at equilibrium along it") as info:
        forget()
    assert "slope_eta = None" in str(info.value)
    assert torch.equal(un.bank, draws)


def test_a_search_failed_by_the_slope_test_alone_takes_the_step_cut_to_the_banks_own_minimum() -> None:
    """A bank whose slope along every step is 10% of ``G·x`` (an exact quadratic model, no measurement noise):
    every damping fails the test, the search without it takes the undamped Newton step, and the step is cut to
    the minimiser of the bank's energy along it, ``φ(α) = −0.1α·G·x + ½α²·G·x``: ``α = 0.1`` exactly."""
    from test_step import _QuadraticBackend

    H = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    G = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)

    def check(x: torch.Tensor) -> Measurement:
        gx, quad = float(G @ x), float(x @ H @ x)
        actual = -gx + 0.5 * quad  # the model is exact: ratio 1
        direct = -0.1 * gx + 0.5 * quad  # the bank's own slope is a tenth of the model's
        return Measurement(actual, 0.0, 0.0, direct=direct, direct_stderr=0.0, nll_scale=1.0, nll_stderr=0.0)

    plain = DampingControl().step(_QuadraticBackend(H), G, check)
    assert plain.safe and plain.damping == 0.0 and plain.length == 1.0
    out = DampingControl(slope_eta=SLOPE_ETA).step(_QuadraticBackend(H), G, check)
    assert out.safe and out.damping == 0.0
    assert out.length == pytest.approx(0.1, rel=1e-9)
    assert torch.allclose(out.x, 0.1 * torch.linalg.solve(H, G))
    assert out.trials == len(out.history) > plain.trials  # the failed search's trials are kept


def _measurement(gx: float, slope: float, se: float) -> Measurement:
    """A measurement whose bank slope along the step is ``slope`` (``direct − actual = gx − slope``)."""
    actual = -0.5 * gx
    return Measurement(actual, se, 0.0, direct=actual + gx - slope, direct_stderr=se, nll_scale=1.0, nll_stderr=0.01)


@pytest.mark.parametrize(
    ("gx", "slope", "se", "fails"),
    [
        (100.0, 2.0, 1.0, True),  # the bank shows 2% of the model's slope, clear by many errors
        (100.0, 30.0, 1.0, False),  # 30%: above slope_eta
        (100.0, 10.0, 5.0, False),  # 10% but within 3 errors of 25%
        (0.5, -3.0, 1.0, False),  # the model's own slope within its error: no test
    ],
)
def test_the_slope_test_fails_only_a_clear_shortfall(gx: float, slope: float, se: float, fails: bool) -> None:
    control = DampingControl(slope_eta=0.25)
    assert control._slope_fails(gx, _measurement(gx, slope, se)) is fails
    assert DampingControl()._slope_fails(gx, _measurement(gx, slope, se)) is False  # off by default


def test_slope_eta_must_be_in_the_open_unit_interval() -> None:
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="slope_eta"):
            DampingControl(slope_eta=bad)


def _at_equilibrium(seed: int, removed: int = 10, draws: int = 8):
    """A bank of exact draws of the full-data posterior (at equilibrium along every direction) whose third input
    only the removed rows light up (and nothing else of theirs): along it the remaining rows' gradients are zero,
    so the slope's error is all the draws' (``∇(−log p)·x`` of each draw). Rows, removed ids, the draws and the
    exact ``G`` (``E[∇F(θ, S∖S')] = −G`` over the full posterior)."""
    g = torch.Generator().manual_seed(seed)
    n = 400
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[:, 2] = 0.0
    x[-removed:, :2] = 0.0
    x[-removed:, 2] = 1.0
    w = torch.randn(3, generator=g, dtype=torch.float64)
    w[2] = 0.0
    y = x @ w + torch.randn(n, generator=g, dtype=torch.float64)
    m_all, c_all = exact_posterior(x, y)
    m_kept, c_kept = exact_posterior(x[:-removed], y[:-removed])
    G = -torch.linalg.solve(c_kept, m_all - m_kept)
    bank = m_all + torch.randn(draws, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c_all).T
    return x, y, torch.arange(n - removed, n), bank, G, torch.linalg.inv(c_kept)


def test_the_slope_error_counts_the_draws_so_a_bank_at_equilibrium_passes() -> None:
    """At an exact posterior with the exact ``G`` the bank's slope along the Newton step equals ``G·x`` in
    expectation; along the third weight only the 8 draws' spread makes it noisy, which the rows' errors do not
    see (0 there). Counting the rows alone failed 12 of 100 such banks; with the draws' spread the 3-error test
    should fail about none (a t-distributed z with 7 degrees of freedom past 3 + 0.75·G·x/SE)."""
    from mcmc_unlearner.step import EnergyCheck

    def nll(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * (b - a @ t) ** 2

    def log_prior(t: torch.Tensor) -> torch.Tensor:
        return -0.5 * (t**2).sum()

    control, fails = DampingControl(slope_eta=SLOPE_ETA), 0
    for seed in range(100):
        x, y, removed, bank, G, H_r = _at_equilibrium(seed)
        kept = (x[: removed[0]], y[: removed[0]])
        check = EnergyCheck(nll, log_prior, bank, kept, kept[0].shape[0], G)
        step = torch.linalg.solve(H_r, G)
        meas = check(step)
        assert meas.stderr < 1e-9 * abs(float(G @ step))  # the rows see nothing of the step along the third weight
        fails += control._slope_fails(float(G @ step), meas)
    assert fails <= 2


@pytest.mark.parametrize("seed", [8, 13])
def test_a_request_on_a_bank_at_equilibrium_is_not_refused_by_the_slope_test(seed: int) -> None:
    """Two banks of 64 exact draws at the full-data posterior whose requests the slope test refused or held back
    (its error counted the rows alone): the request takes the step it takes without the test."""
    x, y, removed, _, _, _ = _at_equilibrium(seed, draws=64)
    g = torch.Generator().manual_seed(seed + 1000)
    m_all, c_all = exact_posterior(x, y)
    bank = (m_all + torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c_all).T).float()
    banks, reports = [], []
    for slope_eta in (None, SLOPE_ETA):
        un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
        un.control.slope_eta = slope_eta
        reports.append(un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0)))
        banks.append(un.bank.clone())
    assert reports[1].safe and reports[1].damping == reports[0].damping
    assert reports[1].step_length == reports[0].step_length
    assert torch.equal(banks[1], banks[0]) and not torch.equal(banks[1], bank)
