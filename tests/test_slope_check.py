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


def _problem(live: float):
    """Rows, removed ids, the bank, the remaining rows' exact posterior mean and ``H_r = I + X_rᵀX_r``; the removed
    rows' labels are also off by ``live·sign(x₀)`` (a pull the first two weights saw and the bank balanced)."""
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
    draws[:, 2] = torch.randn(S, generator=g)  # the chain never moved along the third weight: the prior's draws
    H_r = torch.eye(3, dtype=torch.float64) + x[keep].double().T @ x[keep].double()
    return x, y, torch.arange(n - removed, n), draws, m_kept, H_r


def _forget(live: float, slope_eta: float | None):
    x, y, removed, draws, m_kept, H_r = _problem(live)
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
    """Only the unbalanced pull (no live misfit): every damping's step tends to ``G``, whose slope share stays
    below ``slope_eta``, and the search again without the test finds a step along which the bank's own energy
    rises: refused, naming the cause and the override, the bank as it was."""
    un, forget, draws, _, _ = _forget(0.0, SLOPE_ETA)
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
