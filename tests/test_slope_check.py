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
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.errors import QualityError
from mcmc_unlearner.models.linreg import BayesianLinearRegression, exact_posterior
from mcmc_unlearner.step import SLOPE_ETA, SLOPE_Z, DampingControl, Measurement, StepOutcome

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
    energy along the step taken is lowest within a third of its full length. (The step taken, at damping 80, passes
    on its error: its share 0.074 ± 0.071, the bank's exact share along it 0.098, after a failed trial's
    0.027 ± 0.029 at damping 25. Compared within their errors the two shares do not differ, and the step went to
    the search without the test, whose undamped step cut to the bank's minimum moved the first two weights by 2% of
    their exact shift and the third by −0.95: docs/model-matrix.md 'Stop 67'.)"""
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


@pytest.mark.parametrize(
    ("gx", "carried", "slope", "se", "contradicted"),
    [
        (0.5, 1.5, -10.0, 1.0, True),  # G·x within the error, mostly the carry's, the bank's energy clearly rising
        (0.5, 0.3, -10.0, 1.0, False),  # ... the carry 60% of it: a retry without it could not follow
        (0.5, -1.0, -10.0, 1.0, False),  # ... the carry against the step
        (0.5, 1.5, -3.0, 1.0, False),  # the bank's slope not clearly below 0
        (100.0, 90.0, 30.0, 1.0, False),  # beyond the error: the slope test proper, which this one passed
        (100.0, 90.0, -10.0, 1.0, False),  # beyond the error, the slope clearly negative: the slope test's to judge
    ],
)
def test_an_accepted_step_mostly_a_carry_along_which_the_banks_energy_clearly_rises_is_contradicted(
    gx: float, carried: float, slope: float, se: float, contradicted: bool
) -> None:
    """Where ``G·x`` is within the slope's error (the slope test abstains), an accepted step whose ``G·x`` is above
    ``1 − slope_eta`` the carry's and whose bank slope is clearly below 0 is said to contradict the carry; a step
    not accepted, off by default, or cut to the bank's own slope is not judged."""
    x = torch.tensor([1.0, 0.0])
    out = StepOutcome(x, None, 1.0, 1, -0.5 * gx, -0.5 * gx, 1.0, se, 0.0, True, gx=gx)  # type: ignore[arg-type]
    out.measurement = _measurement(gx, slope, se)
    carry = torch.tensor([carried, 7.0])  # the second entry is off the step
    why = DampingControl(slope_eta=0.25).carry_contradicted(out, carry)
    assert (why is not None) is contradicted
    if why is not None:
        assert why.startswith("damping 1: the bank's own energy rises along the step (its slope -10 ± 1.4")
        assert why.endswith("300% of it the deficit carried from earlier requests)")
    assert DampingControl().carry_contradicted(out, carry) is None
    assert DampingControl(slope_eta=0.25).carry_contradicted(replace(out, safe=False), carry) is None
    assert DampingControl(slope_eta=0.25).carry_contradicted(replace(out, length=0.5), carry) is None


def test_slope_eta_must_be_in_the_unit_interval_0_being_off() -> None:
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="slope_eta"):
            DampingControl(slope_eta=bad)
    assert DampingControl(slope_eta=0.0).slope_eta is None  # off, as the unlearner's option (it was refused here)


def test_slope_eta_set_on_a_built_unlearners_control_is_checked_and_0_is_off() -> None:
    """``un.control.slope_eta`` (the README's way on a built unlearner): a ``0`` was kept as ``0.0``, a test at
    η = 0 (a request on starting weights plus noise refused, whose bank's slope was clearly negative) while
    ``config()`` stored 0.0, which a saved folder reloads as off; a ``1.5`` was taken as it was. Now ``0`` is off
    (``None``), as the option's, and a bad value is refused leaving the control's as it was."""
    draws = _problem(0.0)[3]
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=draws)
    un.control.slope_eta = 0
    assert un.control.slope_eta is None and un.config()["slope_eta"] == 0.0
    un.control.slope_eta = 0.1
    for bad in (1.5, -0.1, math.nan, "0.2", True):
        with pytest.raises(ValueError, match=r"^slope_eta must be a number in \[0, 1\)"):
            un.control.slope_eta = bad
        assert un.control.slope_eta == 0.1


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


def _float_bank(seed: int):
    """:func:`_at_equilibrium`'s rows with a float32 bank of 64 other exact draws of the full-data posterior (from
    ``seed + 1000``): rows, removed ids, the bank and ``H_r``."""
    x, y, removed, _, _, H_r = _at_equilibrium(seed, draws=64)
    g = torch.Generator().manual_seed(seed + 1000)
    m_all, c_all = exact_posterior(x, y)
    bank = (m_all + torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c_all).T).float()
    return x, y, removed, bank, H_r


@pytest.mark.parametrize("seed", [8, 13])
def test_a_request_on_a_bank_at_equilibrium_is_not_refused_by_the_slope_test(seed: int) -> None:
    """Two banks of 64 exact draws at the full-data posterior whose requests the slope test refused or held back
    (its error counted the rows alone): the request takes the step it takes without the test."""
    x, y, removed, bank, _ = _float_bank(seed)
    banks, reports = [], []
    for slope_eta in (None, SLOPE_ETA):
        un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
        un.control.slope_eta = slope_eta
        reports.append(un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0)))
        banks.append(un.bank.clone())
    assert reports[1].safe and reports[1].damping == reports[0].damping
    assert reports[1].step_length == reports[0].step_length
    assert torch.equal(banks[1], banks[0]) and not torch.equal(banks[1], bank)


def _scripted(slope_share: float, stderr: Callable[[torch.Tensor, float, float], float], direct: float = 1.0):
    """An exact quadratic model whose bank slope is ``slope_share`` of ``G·x``, with ``stderr(x, G·x, xᵀHx)`` as
    the controlled measurement's error and ``direct`` times it as the direct one's."""
    from test_step import _QuadraticBackend

    H = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    G = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)

    def check(x: torch.Tensor) -> Measurement:
        gx, quad = float(G @ x), float(x @ H @ x)
        se = stderr(x, gx, quad)
        direct_change = -slope_share * gx + 0.5 * quad
        return Measurement(
            -gx + 0.5 * quad, se, 0.0, direct=direct_change, direct_stderr=direct * se, nll_scale=1.0, nll_stderr=0.0
        )

    return _QuadraticBackend(H), G, check


def test_a_step_along_which_the_banks_energy_rises_is_refused_also_where_its_curvature_is_unresolved() -> None:
    """The bank's energy clearly rises along every step (slope −2·G·x, below 0 by more than its 3 errors, 0.9·G·x:
    the controlled measurement's error is 0.3 of ``xᵀHx = G·x``, the direct one's 0), whose curvature's lower bound
    ``actual + G·x − 2·stderr`` is below 0: refused like a step whose curvature is resolved, not taken whole (it was:
    the unresolved curvature set the cut to ∞)."""
    backend, G, check = _scripted(-2.0, lambda x, gx, quad: 0.3 * quad, direct=0.0)
    out = DampingControl(slope_eta=SLOPE_ETA).step(backend, G, check)
    assert not out.safe
    assert "does not fall along the step" in out.note


def test_a_search_that_escapes_the_slope_test_by_shrinking_its_step_is_judged_at_the_undamped_step() -> None:
    """A bank of exact draws whose ``G`` (64 draws × 10 rows) has the wrong sign along the third weight: the bank's
    energy rises along every step. The damping search shrank the step until the check's rounding flipped the
    slope's sign (damping 2.4·10⁷) and accepted that, refused by the unlearner as below the parameters' resolution
    ("more check rows or another solver"). The step taken without the test, searched from the damping the request
    started with, is judged: refused for the bank's energy, naming G's error, and the bank is as it was."""
    x, y, removed, bank, _ = _float_bank(15)
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    state = un.control.state()
    with pytest.raises(QualityError, match="does not fall along the step") as info:
        un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    assert "Monte-Carlo error" in str(info.value)
    assert torch.equal(un.bank, bank) and un.control.state() == state


def test_a_step_that_passes_the_slope_test_on_its_error_alone_is_judged_at_the_undamped_step() -> None:
    """A bank not relaxed along the steps (its slope share ``−0.3·(1 − ‖x‖/‖x₀‖)`` of ``G·x``, ``x₀`` the Newton step:
    0 there, falling as the damping shrinks the step) measured with an error floor (``0.02·G·x + 0.005``, the
    rounding's): every damping up to 17.5 fails the test, and at damping 175 the floor lifts the slope's error
    over the gap though its share (−0.30) is below every failed trial's. That step of norm 0.013 was taken whole
    (the quick matrix's LeNet-5, seed 1: damping 4.8·10⁹, a step of norm 3·10⁻⁷, the bank's share −0.28 ± 0.24
    where the failed trials had −0.01 to −0.21). Now the search without the test is judged: its undamped step is
    cut to the longest the bank's slope allows, ``α = 3σ_slope / (2(actual + G·x − 2·stderr))``."""
    from test_step import _QuadraticBackend

    H = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    G = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    newton = torch.linalg.solve(H, G)

    def check(x: torch.Tensor) -> Measurement:
        gx, quad = float(G @ x), float(x @ H @ x)
        share = -0.3 * (1.0 - float(x.norm() / newton.norm()))
        se = 0.02 * gx + 0.005
        actual = -gx + 0.5 * quad
        return Measurement(actual, se, 0.0, direct=actual + gx - share * gx, direct_stderr=se, nll_scale=1.0,
                           nll_stderr=0.0)  # fmt: skip

    out = DampingControl(slope_eta=SLOPE_ETA).step(_QuadraticBackend(H), G, check)
    se = 0.02 * 3.0 + 0.005  # at the undamped step G·x = xᵀHx = 3, the bank's slope 0
    expected = SLOPE_Z * math.sqrt(2) * se / (2 * (0.5 * 3.0 - 2 * se))
    assert out.safe and out.damping == 0.0
    assert out.length == pytest.approx(expected, rel=1e-9) and 0.1 < expected < 0.11
    assert torch.allclose(out.x, expected * newton)
    (escaped,) = [h for h in out.history if h["damping"] == pytest.approx(175.0)]
    share = escaped["slope"] / escaped["gx"]
    assert not escaped["slope_failed"] and share < -0.29  # passed on its error alone
    assert any(h["slope_failed"] and h["slope"] / h["gx"] > share for h in out.history)


def _constant_share_search(seed: int, slope_eta: float | None) -> tuple[StepOutcome, float]:
    """A damping search on an exact quadratic model whose bank slope is 10% of ``G·x`` along every step, measured
    with noise: a part linear in the step (``ξ·x``, ``ξ ~ N(0, 0.02²I)`` drawn once per search: the check's fixed
    rows and draws) and a floor drawn afresh per measurement (sd 0.002, the rounding's). The reported error is the
    noise's own sd. The outcome and the undamped step's slope error as a share of its ``G·x``."""
    from test_step import _QuadraticBackend

    H = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    G = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    xi = 0.02 * torch.randn(3, generator=g, dtype=torch.float64)

    def sd(x: torch.Tensor) -> float:
        return math.hypot(0.02 * float(x.norm()), 0.002)

    def check(x: torch.Tensor) -> Measurement:
        gx, quad = float(G @ x), float(x @ H @ x)
        floor = 0.002 * float(torch.randn((), generator=g, dtype=torch.float64))
        slope = 0.1 * gx + float(xi @ x) + floor
        actual = -gx + 0.5 * quad  # the model is exact
        return Measurement(actual, 0.0, 0.0, direct=actual + gx - slope, direct_stderr=sd(x), nll_scale=1.0,
                           nll_stderr=0.0)  # fmt: skip

    newton = torch.linalg.solve(H, G)
    out = DampingControl(slope_eta=slope_eta).step(_QuadraticBackend(H), G, check)
    return out, sd(newton) / float(G @ newton)


@pytest.mark.xfail(
    strict=True,
    reason="known gap (docs/model-matrix.md 'Stop 67'): _slope_untested compares the slope shares as point "
    "estimates, and taking their errors into account reroutes the exact bank of "
    "test_the_defaults_do_not_move_the_bank_where_it_is_already_at_the_remaining_posterior to a worse step",
)
def test_a_step_whose_share_is_within_its_error_of_a_failed_trials_is_judged_at_the_undamped_step() -> None:
    """The bank's share of ``G·x`` is 0.1 along every step: the damping cannot raise it. Trials fail the test until
    the error floor swamps the shrinking step (damping about 10³, the share's error there about 0.4) and a step
    passes on its error alone. Compared as point estimates with the failed trials' shares (stop 66), such a step is
    taken whole in 19 of these 40 seeded searches (its share read above the largest failed one by noise); compared
    within :data:`SLOPE_Z` errors of their difference (docs/runs/stop67-share-rise.patch), a share no larger keeps
    it with probability under Φ(−3) = 0.0013 a search, so at most 2 of 40 (2·10⁻⁵ to see 3 or more): 0 of 40. The
    others take the undamped step cut to the bank's own minimum along it: the measured share plus its 3 errors
    (``α = (slope + 3σ)/(2·½G·x)``), the measured share within 4 of its errors of the true 0.1."""
    whole = 0
    for seed in range(40):
        out, se = _constant_share_search(seed, SLOPE_ETA)
        assert out.safe and any(h["slope_failed"] for h in out.history)
        if out.damping > 0:  # the step that passed on its error, taken whole
            assert out.length == 1.0
            whole += 1
            continue
        assert out.damping == 0.0 and out.length < 1.0
        assert abs(out.length - SLOPE_Z * se - 0.1) < 4 * se
    assert whole <= 2


def test_a_relative_newton_steps_slope_is_the_banks_own_along_it_from_where_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``newton_target="relative"``: a further step ``p`` is measured from the moved bank ``θ + x`` (its ``actual``
    less the energy change ``φ`` already made), and the slope test reads ``G·p + actual − direct`` as the bank's own
    slope along ``p``. Its ``direct`` is then the change from ``θ + x`` too: the change from the original bank added
    ``−direct(x)``, the first step's whole fall (here twice the bank's own slope), to the slope. The slope read off
    each further step's check equals that of the same check placed at the moved bank, up to rounding."""
    from mcmc_unlearner.step import EnergyCheck

    seen: list[tuple[torch.Tensor, Callable[[torch.Tensor], Measurement]]] = []
    real = DampingControl.step

    def spy(self: DampingControl, backend, G: torch.Tensor, check, **kw):
        if not isinstance(check, EnergyCheck):  # a relative further step's check (a closure over the first's)
            seen.append((G.clone(), check))
        return real(self, backend, G, check, **kw)

    monkeypatch.setattr(DampingControl, "step", spy)
    x, y, removed, bank, H_r = _float_bank(8)
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank, newton_steps=2, newton_target="relative", damping=1.0)
    un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    assert seen
    for G, shifted in seen:
        cells = dict(zip(shifted.__code__.co_freevars, (c.cell_contents for c in shifted.__closure__)))
        check, moved = cells["check"], shifted.__defaults__[0]
        p = torch.linalg.solve(H_r.float(), G)
        gx = float(G @ p)
        slope = DampingControl._bank_slope(gx, shifted(p))[0]
        truth = DampingControl._bank_slope(gx, check.at(check.thetas + moved, G)(p))[0]
        assert slope == pytest.approx(truth, rel=1e-4, abs=1e-9)


def test_the_saturation_tests_hypothetical_measurement_fails_no_trial_by_the_slope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_saturated`` judges a measurement made up of two failed trials' (the most favourable within their
    differences); a slope-test failure there is no trial's and must not mark the search as failed by the slope test
    (which sends it to the search again without the test and the cut). It did, and with the slope made lower than
    either trial's (actual lowered by ``da``, direct by ``dd``: the slope moved by ``dd − da``): two trials failing
    the ratio whose slopes, 0.16 and 0.12, pass the test (0.25 of ``G·x`` less 3 errors of 0.05) were read as 0.08."""
    from test_step import _QuadraticBackend

    G = torch.tensor([1.0, 0.0], dtype=torch.float64)
    backend = _QuadraticBackend(torch.eye(2, dtype=torch.float64))
    backend.cheap_damping = True
    control = DampingControl(slope_eta=SLOPE_ETA)

    def outcome(x: torch.Tensor, actual: float) -> StepOutcome:
        m = Measurement(actual, 0.05, 0.0, direct=0.74, direct_stderr=0.0, nll_scale=1.0, nll_stderr=0.01, draws=8)
        gx = float(G @ x)
        return StepOutcome(x, None, 1.0, 1, -0.6, actual, actual / -0.6, 0.05, 0.0, False, gx=gx, measurement=m)  # type: ignore[arg-type]

    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prev, out = outcome(x, -0.10), outcome(0.999 * x, -0.14)  # ratios 0.17 and 0.23: both fail
    assert not control._slope_fails(prev.gx, prev.measurement) and not control._slope_fails(out.gx, out.measurement)
    seen: list[float] = []
    real = DampingControl._bank_slope
    monkeypatch.setattr(
        DampingControl, "_bank_slope", staticmethod(lambda gx, m: seen.append(real(gx, m)[0]) or real(gx, m))
    )
    control._saturated(backend, G, prev, out, 10.0)
    assert control._slope_failed is False
    # the slope judged is the most favourable: the later trial's 0.119 + 0.04 (da) + 0 (dd)
    assert seen and all(s == pytest.approx(0.999 - 0.14 - 0.74 + 0.04) for s in seen)


def test_slope_eta_is_an_option_kept_in_the_configuration_and_a_saved_folder(tmp_path) -> None:
    """``MCMCUnlearner(slope_eta=...)`` sets the control's, ``config()`` holds it (0 for off: a stored ``None`` would
    be read back as the default) and a saved folder loads with it, also after ``un.control.slope_eta`` was changed."""
    from conftest import control_option_round_trips

    _, _, _, draws, _, _ = _problem(0.0)
    for given, control, config in (
        (SLOPE_ETA, SLOPE_ETA, SLOPE_ETA),
        (0.1, 0.1, 0.1),
        (0, None, 0.0),
        (None, None, 0.0),
    ):
        un = MCMCUnlearner(BayesianLinearRegression(3), bank=draws, slope_eta=given)
        assert un.control.slope_eta == control and un.config()["slope_eta"] == config
    assert MCMCUnlearner(BayesianLinearRegression(3), bank=draws).control.slope_eta == SLOPE_ETA
    control_option_round_trips(tmp_path, "slope_eta", (0.1, None))


def test_slope_eta_zero_takes_the_step_the_test_would_hold_back() -> None:
    """The option off (``slope_eta=0``) is the control's ``None``: the same bank to the bit, and not the default's
    (the far weight's step the default holds back)."""
    banks = []
    for off in ("option", "control", None):
        x, y, removed, draws, _, _ = _problem(0.0)
        un = MCMCUnlearner(BayesianLinearRegression(3), bank=draws.clone(), curvature_draws=4,
                           slope_eta=0 if off == "option" else SLOPE_ETA)  # fmt: skip
        if off == "control":
            un.control.slope_eta = None
        un.forget(removed, RemovableDataset(x, y, batch_size=50, seed=0))
        banks.append(un.bank.clone())
    assert torch.equal(banks[0], banks[1]) and not torch.equal(banks[0], banks[2])


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, math.inf, "0.2", True])
def test_a_bad_slope_eta_is_refused_by_name_before_any_work(bad) -> None:
    draws = _problem(0.0)[3]
    model = BayesianLinearRegression(3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^slope_eta must be a number in \[0, 1\).*0 or None: no slope test"):
        MCMCUnlearner(model, bank=draws, slope_eta=bad)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _pulled(seed: int = 0):
    """A conjugate regression whose 20 removed rows pull all three weights (inputs offset by 1, labels by 4), a bank
    of 64 exact draws of the full-data posterior: rows, removed ids, the bank, the full and remaining rows' exact
    means, the full posterior's covariance and the remaining rows' ``H_r``."""
    g = torch.Generator().manual_seed(seed)
    n, k = 400, 20
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[-k:] += 1.0
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    y[-k:] += 4.0
    m_all, c_all = exact_posterior(x, y)
    m_kept, c_kept = exact_posterior(x[:-k], y[:-k])
    bank = (m_all + torch.randn(S, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c_all).T).float()
    return x, y, torch.arange(n - k, n), bank, m_all, m_kept, c_all, torch.linalg.inv(c_kept)


@pytest.mark.parametrize("times", [2.0, 1.5, 1.1])
def test_a_carried_deficit_the_bank_contradicts_is_dropped_and_the_requests_own_step_taken(times: float) -> None:
    """A deficit carried from earlier requests (``carry_deficit``) that the bank does not show: ``times`` the
    request's exact ``G``, pointing against it. With it the step moves the bank back along the removed rows' pull,
    along which the bank's own energy clearly rises: the slope test refuses it. At 1.5 and 1.1 the model's ``G·x``
    is within the test's error of 0, where the test abstains: until stop 65 the step was taken (at 1.5: damping
    377, ``G·x`` 5.6, the bank's slope −9.9 ± 2.0; at 1.1 undamped, ``G·x`` 0.48, slope −4.1 ± 0.8), each moving
    the mean away from the remaining posterior's; now the accepted step contradicts the carry
    (``DampingControl.carry_contradicted``). The request is searched once more with the carry dropped and takes
    its own Newton step, which passes the slope test by a measured balance (not by abstaining); the bank's mean
    moves to the closed-form remaining posterior's within 4 Monte-Carlo errors of ``G`` (its covariance ``H_r⁻¹ A C
    A H_r⁻¹ / draws``, ``A`` the removed rows' ``XᵀX``, ``C`` the full posterior's); the record is in the report
    (JSON-able, as the ledger stores it) and the dropped carry is not carried on."""
    import json

    x, y, removed, bank, m_all, m_kept, c_all, H_r = _pulled()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    G = H_r @ (m_kept - m_all)  # E[∇ of the removed rows' nll] over the full posterior: x = H_r⁻¹G
    un._carry = (-times * G).float()  # what earlier requests' damped steps would have left, here contradicted
    report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    record = report.info["carry_dropped"]
    assert report.safe and not report.problems and record["accepted"]
    # (−tG)·x / ((1 − t)G + e)·x on the refused step, e the Monte-Carlo error of the request's own G (covariance
    # A C A / draws): t / (t − 1) + t / (t − 1)² · e·x / G·x to first order, within 4 of its standard errors (taken
    # along H_r⁻¹G; seeds 0-44 of _pulled, 44 dropping the carry: |z| ≤ 2.5 at each t, nearly the same z at all three.
    # The earlier abs=0.1/(t − 1) was 12 errors at t = 2 and 2.2 at t = 1.1, where seeds 5 and 17 fell outside it)
    d = torch.linalg.solve(H_r, G)
    rows = x[removed]
    A = rows.T @ rows
    rel = math.sqrt(float(d @ A @ c_all @ A @ d) / report.n_draws) / float(G @ d)
    assert record["carried_share"] == pytest.approx(times / (times - 1.0), abs=4 * times / (times - 1.0) ** 2 * rel)
    assert record["slope_test"] == "passed" and record["slope"] > SLOPE_ETA * record["gx"] > 0
    # what refused the step with the carry: the slope test at 2, the carry contradicted where the test abstains
    assert record["refused_by"] == ("slope_test" if times == 2.0 else "carry_contradicted")
    assert report.info["carry_dropped_refused_by"] == record["refused_by"]
    assert ("carry_contradicted" in report.info) is (times != 2.0)
    if times != 2.0:
        assert report.info["carry_contradicted"].endswith("the deficit carried from earlier requests)")
    json.dumps(record, allow_nan=False)
    shift = (un.bank.double() - bank.double()).mean(0)
    cov = torch.linalg.solve(H_r, torch.linalg.solve(H_r, A @ c_all @ A).T) / report.n_draws
    assert torch.all((shift - (m_kept - m_all)).abs() < 4 * cov.diagonal().sqrt())
    assert un._carry is None or float(un._carry.norm()) < 1e-3 * float(G.norm())


def test_a_request_refused_again_with_its_carry_dropped_is_refused_and_nothing_changes() -> None:
    """The bank whose ``G`` has the wrong sign along the third weight (refused without a carry: above) with a carried
    deficit: refused by the slope test, searched again without the carry, refused too. The refusal names the first
    search's cause and says the retry was made; the bank, the carry and the damping state are as they were."""
    x, y, removed, bank, _ = _float_bank(15)
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    rows = x[removed]
    pull = rows.T @ (rows @ bank.double().mean(0) - y[removed])  # G at the bank's draws: the wrong sign along w₃
    carry = (4.0 * pull).float()  # 80% of G·x: a bank showing the request's pull alone would fail the test too
    un._carry = carry.clone()
    state = un.control.state()
    with pytest.raises(QualityError, match="does not fall along the step") as info:
        un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    assert "searched again with the deficit carried from earlier requests dropped" in str(info.value)
    assert "refused too (the bank's own energy does not fall along its step either)" in str(info.value)
    assert torch.equal(un.bank, bank) and torch.equal(un._carry, carry) and un.control.state() == state
    assert not un.history


def test_a_request_without_a_carry_is_not_judged_by_the_carry_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DampingControl.carry_contradicted`` judges only a step whose ``G`` holds a carry: a first request (no carry
    yet) and one of an unlearner built with ``carry_deficit=False`` (a carry left in it unused) take the same step
    with the rule made to refuse every step as with it as it is."""
    x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
    carry = (-1.5 * H_r @ (m_kept - m_all)).float()  # contradicted where it is used (above)
    banks = []
    for refuse_all in (False, True):
        if refuse_all:
            monkeypatch.setattr(DampingControl, "carry_contradicted", lambda self, out, carry: "refused")
        for carry_deficit in (True, False):
            un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone(), carry_deficit=carry_deficit)
            if not carry_deficit:
                un._carry = carry.clone()
            report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
            assert report.safe and "carry_dropped" not in report.info and "carry_contradicted" not in report.info
            banks.append(un.bank.clone())
    assert all(torch.equal(b, banks[0]) for b in banks[1:])


def _applied_anyway(monkeypatch: pytest.MonkeyPatch, x, y, removed, bank, carry):
    """The request forgotten with ``strict=False`` given ``carry``, with the retry without the carry and with
    ``_without_carry`` made to return the refusal as it is: the damping states committed, the banks, the reports
    (each listing problems, ``carry_dropped`` recorded with the retry only)."""
    states, banks, reports = [], [], []
    for retry in (True, False):
        un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
        un._carry = carry.clone()
        if not retry:
            monkeypatch.setattr(un, "_without_carry", lambda refused, G, *args: (refused, G))
        report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0), strict=False)
        assert report.problems and ("carry_dropped" in report.info) == retry
        states.append(un.control.state())
        banks.append(un.bank.clone())
        reports.append(report)
    return states, banks, reports


def _retry_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the retry without the carry (``_without_carry``'s search) refuse its step and end at another damping
    state (a search for another ``G`` whose state must not be kept)."""
    import sys

    real = DampingControl.step

    def spy(self, backend, G, check, **kw):
        out = real(self, backend, G, check, **kw)
        if sys._getframe(1).f_code.co_name == "_without_carry":
            self.relative, self.drift = 7.0, (1.0, 0.0, 1.0)
            out = replace(out, safe=False, note="no step passed (made to refuse here)")
        return out

    monkeypatch.setattr(DampingControl, "step", spy)


def test_a_contradicted_carry_whose_retry_is_refused_too_is_refused_and_nothing_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exact bank given a carry of −1.5·``G``: its accepted step contradicts the carry and goes to the retry,
    which is made to refuse here. The request is refused naming the contradiction and the retry; the bank, the carry,
    the damping state and the history are as they were. Applied anyway (``strict=False``) it takes the first
    search's step with the carry and commits that search's damping state, not the retry's."""
    _retry_refused(monkeypatch)
    x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
    carry = (-1.5 * H_r @ (m_kept - m_all)).float()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    un._carry = carry.clone()
    state = un.control.state()
    data = RemovableDataset(x.float(), y.float(), batch_size=50, seed=0)
    with pytest.raises(QualityError, match="the bank's own energy rises along the step") as info:
        un.forget(removed, data)
    assert "searched again with the deficit carried from earlier requests dropped" in str(info.value)
    assert "refused too (no step passed (made to refuse here))" in str(info.value)
    assert torch.equal(un.bank, bank) and torch.equal(un._carry, carry) and un.control.state() == state
    assert not un.history and len(data) == x.shape[0]
    # applied anyway, against the same request without the retry (the first search's step and state)
    states, banks, reports = _applied_anyway(monkeypatch, x, y, removed, bank, carry)
    assert reports[0].info["carry_dropped_accepted"] is False
    assert reports[0].info["carry_dropped_refused_by"] == "carry_contradicted"
    assert states[0] == states[1] and states[0]["relatives"].get("identity") != 7.0
    assert torch.equal(banks[0], banks[1]) and not torch.equal(banks[0], bank)


def test_a_refused_retry_applied_anyway_commits_the_first_searchs_damping_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request of the test above applied with ``strict=False``: the refused step taken is the first search's
    (carry kept), so the damping state committed is that search's, as without a retry. The retry's search is made
    to end at another damping here (its state was committed: the damping carried to the next request came from a
    search for another ``G`` whose step was not taken)."""
    import sys

    real = DampingControl.step

    def spy(self, backend, G, check, **kw):
        out = real(self, backend, G, check, **kw)
        if sys._getframe(1).f_code.co_name == "_without_carry":
            self.relative, self.drift = 7.0, (1.0, 0.0, 1.0)
        return out

    monkeypatch.setattr(DampingControl, "step", spy)
    x, y, removed, bank, _ = _float_bank(15)
    rows = x[removed]
    carry = (4.0 * rows.T @ (rows @ bank.double().mean(0) - y[removed])).float()
    states, banks, _ = _applied_anyway(monkeypatch, x, y, removed, bank, carry)
    assert states[0] == states[1] and states[0]["relatives"].get("identity") != 7.0
    assert torch.equal(banks[0], banks[1])


def test_a_retry_that_rejects_a_trial_by_the_slope_test_and_accepts_a_measured_pass_is_not_called_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry's search may reject a trial by the slope test and go on to accept a more damped one that passes it
    measured, whole (no cut to the bank's slope): its record says ``"passed"``. Here the retry's own search of the
    test above is given such a rejected trial before the one it accepts (the record was ``"cut"`` for any rejected
    trial in the retry's history, the step taken whole)."""
    import sys

    real = DampingControl.step

    def spy(self, backend, G, check, **kw):
        out = real(self, backend, G, check, **kw)
        if sys._getframe(1).f_code.co_name == "_without_carry" and out.safe:
            failed = {**out.history[0], "damping": out.history[0]["damping"] / 10, "slope_failed": True}
            out = replace(out, history=[failed, *out.history], trials=len(out.history) + 1)
        return out

    monkeypatch.setattr(DampingControl, "step", spy)
    x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    un._carry = (-2.0 * H_r @ (m_kept - m_all)).float()
    report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    record = report.info["carry_dropped"]
    assert report.safe and record["accepted"] and report.step_length == 1.0
    assert record["slope_test"] == "passed"


def test_the_carry_drop_reaches_the_deletion_services_ledger() -> None:
    """``report.to_dict()`` (what the deletion service's ledger entry stores as ``info``) keeps scalars only: the
    ``carry_dropped`` record is a dict, so the ledger held no trace of the retry. Its scalars are kept too."""
    import json

    from mcmc_unlearner.service.deletion import _entry

    x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    un._carry = (-2.0 * H_r @ (m_kept - m_all)).float()
    report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    record = report.info["carry_dropped"]
    entry = _entry("r1", removed.tolist(), report, un, {}, {})
    json.dumps(entry, allow_nan=False)
    info = entry["info"]
    assert info["carry_dropped_accepted"] is True
    assert info["carry_dropped_share"] == record["carried_share"]
    assert info["carry_dropped_slope_test"] == record["slope_test"] == "passed"
    assert info["carry_dropped_refused_by"] == record["refused_by"] == "slope_test"


def test_a_step_made_by_the_damping_after_the_carry_was_dropped_does_not_blame_the_carry() -> None:
    """A retried step taken without the carry, judged made by the damping (its ``step_shortfall`` set past the limit
    here): the advice named the carry ("this request carries the undone part of earlier requests ... reset_curvature()
    clears what is carried") though the step had dropped it; without the retry (the carry kept) it still does."""
    from mcmc_unlearner.unlearner import MAX_STEP_SHORTFALL, quality_problems

    x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    un._carry = (-2.0 * H_r @ (m_kept - m_all)).float()
    report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    assert report.info["carried_norm"] > report.info["gradient_norm"]
    report.damping, report.step_shortfall = 1.0, 2 * MAX_STEP_SHORTFALL
    problems = quality_problems(report, un.tol)
    assert any("made by the damping" in p for p in problems)
    assert not any("carries the undone part" in p for p in problems)
    report.info["carry_dropped"] = {**report.info["carry_dropped"], "accepted": False}
    assert any("carries the undone part" in p for p in quality_problems(report, un.tol))
