"""The requests' direct test (``MCMCUnlearner(direct_z=...)``, off by default; ``DampingControl(direct_z=...)``).

A conjugate linear regression whose bank holds exact draws of the full-data posterior, every one moved by ``delta``
along the first weight: a bank off equilibrium (a curvature error accumulated over earlier requests leaves one so).
The control variate credits a step with ``−G·x``, the slope a bank at equilibrium would show; this bank's own
remaining-data energy rises along the step instead, which only the direct measurement (no control variate) sees.
With a request of four rows ``G·x`` is within the slope test's error, so that test abstains. Closed form: the bank's
mean remaining energy changes by ``ḡ·u + ½uᵀH_r u`` along a common shift ``u`` (``ḡ = H_r(θ̄ − m_kept)``).
"""

from __future__ import annotations

import math

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.errors import QualityError
from mcmc_unlearner.models.linreg import BayesianLinearRegression, exact_posterior
from mcmc_unlearner.step import DIRECT_Z


def _problem(delta: float, seed: int = 0):
    """Rows, removed ids (the last four), the bank (64 float64 draws), the remaining rows' exact posterior mean and
    ``H_r = I + X_rᵀX_r``."""
    g = torch.Generator().manual_seed(seed)
    n, removed = 400, 4
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    m_all, c_all = exact_posterior(x, y)
    m_kept = exact_posterior(x[:-removed], y[:-removed])[0]
    bank = m_all + torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c_all).T
    bank[:, 0] += delta
    H_r = torch.eye(3, dtype=torch.float64) + x[:-removed].T @ x[:-removed]
    return x, y, torch.arange(n - removed, n), bank, m_kept, H_r


def _forget(delta: float, seed: int = 0, direct_z: float | None = DIRECT_Z):
    x, y, removed, bank, m_kept, H_r = _problem(delta, seed)
    un = MCMCUnlearner(BayesianLinearRegression(3).double(), bank=bank.clone(), direct_z=direct_z)
    return un, lambda: un.forget(removed, RemovableDataset(x, y, batch_size=50, seed=0)), bank, m_kept, H_r


def _change(bank: torch.Tensor, m_kept: torch.Tensor, H_r: torch.Tensor, u: torch.Tensor) -> float:
    """The bank's mean remaining-data energy change along the common shift ``u``, in closed form."""
    return float(H_r @ (bank.mean(0) - m_kept) @ u + 0.5 * u @ H_r @ u)


def test_a_step_along_which_the_remaining_fit_clearly_worsens_is_refused_and_nothing_changes() -> None:
    """Off (``direct_z=0``) the undamped step is taken: the control variate reads the model's fall (ratio about 1),
    the slope test abstains (``G·x`` within its error), and the bank's remaining energy, in closed form, rises by
    more than ``DIRECT_Z`` of the direct measurement's standard errors, as that measurement says. At ``DIRECT_Z``
    every damping's step fails the direct test (the rise is the bank's own slope: shorter steps shrink it and its error
    alike), and the search again without the bank's tests finds the bank's energy rising along its step at any
    length: refused, naming the test and the way out, the bank as it was."""
    un, forget, bank, m_kept, H_r = _forget(1.0, direct_z=0)
    taken = forget()
    assert taken.safe and taken.damping == 0.0 and "direct_rejected" not in taken.info
    (trial,) = taken.info["trials"]
    assert abs(trial["gx"]) <= 3 * trial["slope_stderr"]  # where the slope test abstains
    assert trial["direct"] > DIRECT_Z * trial["direct_stderr"] and not trial["direct_failed"]
    assert _change(bank, m_kept, H_r, (un.bank - bank).mean(0)) > DIRECT_Z * trial["direct_stderr"]
    assert un.config()["direct_z"] == 0.0

    un, forget, bank, _, _ = _forget(1.0)
    with pytest.raises(QualityError, match="measured directly") as info:
        forget()
    report = info.value.report
    *searched, again = report.info["trials"]
    assert report.info["direct_rejected"] == len(searched) == un.control.max_trials
    assert all(t["direct_failed"] and t["direct"] > DIRECT_Z * t["direct_stderr"] for t in searched)
    # searched again without the bank's tests (as a search the slope test failed): the undamped step, along which
    # the bank's own energy clearly rises
    assert again["damping"] == 0.0 and again["slope"] + 3 * again["slope_stderr"] < 0
    assert "does not fall along the step" in str(info.value) and "direct_z=0" in str(info.value)
    assert torch.equal(un.bank, bank)


def test_with_the_slope_test_off_a_search_the_direct_test_fails_is_refused_as_it_stands() -> None:
    """``slope_eta=0``: the search again without the bank's tests (:meth:`DampingControl._along_bank_slope`) is the
    slope test's, so a search every trial of which the direct test failed is not searched again nor cut: refused
    after its ``max_trials`` trials, naming ``direct_z=0``, the bank as it was."""
    x, y, removed, bank, _, _ = _problem(1.0)
    un = MCMCUnlearner(BayesianLinearRegression(3).double(), bank=bank.clone(), direct_z=DIRECT_Z, slope_eta=0)
    with pytest.raises(QualityError, match="direct_z=0") as info:
        un.forget(removed, RemovableDataset(x, y, batch_size=50, seed=0))
    trials = info.value.report.info["trials"]
    assert len(trials) == un.control.max_trials and all(t["direct_failed"] for t in trials)
    assert "does not fall along the step" not in str(info.value) and torch.equal(un.bank, bank)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_direct_test_leaves_a_bank_at_equilibrium_alone(seed: int) -> None:
    """Exact draws of the full-data posterior: the request takes the same step, to the bit, as with the test off,
    and no trial is rejected by it."""
    banks, reports = [], []
    for z in (DIRECT_Z, 0):
        un, forget, bank, _, _ = _forget(0.0, seed, z)
        reports.append(forget())
        banks.append(un.bank.clone())
    assert reports[0].safe and "direct_rejected" not in reports[0].info
    assert reports[0].damping == reports[1].damping and torch.equal(banks[0], banks[1])
    assert not torch.equal(banks[0], bank)


def test_direct_z_is_an_option_kept_in_the_configuration_and_a_saved_folder(tmp_path) -> None:
    """``MCMCUnlearner(direct_z=...)`` sets the control's, ``config()`` holds it (0 for off: a stored ``None`` would
    be read back as the default) and a saved folder loads with it, also after ``un.control.direct_z`` was changed."""
    from conftest import control_option_round_trips

    bank = _problem(0.0)[3]
    for given, control, config in ((DIRECT_Z, DIRECT_Z, DIRECT_Z), (3, 3.0, 3.0), (0, None, 0.0), (None, None, 0.0)):
        un = MCMCUnlearner(BayesianLinearRegression(3).double(), bank=bank, direct_z=given)
        assert un.control.direct_z == control and un.config()["direct_z"] == config
    default = MCMCUnlearner(BayesianLinearRegression(3).double(), bank=bank)
    assert default.control.direct_z is None and default.config()["direct_z"] == 0.0  # off by default (stop 67)
    control_option_round_trips(tmp_path, "direct_z", (2.5, None))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "5", True])
def test_a_bad_direct_z_is_refused_by_name_before_any_work(bad) -> None:
    model = BayesianLinearRegression(3)
    before = [p.detach().clone() for p in model.parameters()]
    refused = r"^direct_z must be a number >= 0.*0 \(the default\) or None: no such test"
    with pytest.raises(ValueError, match=refused) as info:
        MCMCUnlearner(model, bank=_problem(0.0)[3].float(), direct_z=bad)
    assert "the default 5" not in str(info.value)  # off by default: 5 is the value stop 67 measured
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("times", [1.5, 1.1])
def test_a_carried_deficit_whose_step_the_direct_test_fails_is_dropped_and_the_requests_own_step_taken(
    times: float,
) -> None:
    """``test_slope_check``'s carry contradicted where the slope test abstains (``times`` the request's exact ``G``,
    against it), with ``direct_z=DIRECT_Z``: the direct test fails the carried steps first (their energy measured
    directly rises), the request is searched again without the carry and takes its own step, and the bank's mean
    moves to the
    closed-form remaining posterior's within 4 Monte-Carlo errors of ``G``, as under the stop-65 rule
    (``refused_by`` says which test refused the carried step)."""
    from test_slope_check import _pulled

    x, y, removed, bank, m_all, m_kept, c_all, H_r = _pulled()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone(), direct_z=DIRECT_Z)
    un._carry = (-times * H_r @ (m_kept - m_all)).float()
    report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    record = report.info["carry_dropped"]
    assert report.safe and not report.problems and record["accepted"] and record["slope_test"] == "passed"
    assert record["refused_by"] == report.info["carry_dropped_refused_by"] == "direct_test"
    assert report.info["direct_rejected"] >= 1 and "carry_contradicted" not in report.info
    rows = x[removed]
    A = rows.T @ rows
    cov = torch.linalg.solve(H_r, torch.linalg.solve(H_r, A @ c_all @ A).T) / report.n_draws
    shift = (un.bank.double() - bank.double()).mean(0)
    assert torch.all((shift - (m_kept - m_all)).abs() < 4 * cov.diagonal().sqrt())


def test_a_trial_the_slope_test_rejected_first_is_not_counted_as_the_direct_tests() -> None:
    """``DampingControl.step`` judges the slope test before the direct test: a trial whose bank slope is 0 (the slope
    test fails it) and whose direct change rises (the direct test would too) is the slope test's, and only trials the
    slope test passed are marked ``direct_failed`` (which ``info["direct_rejected"]`` counts and the refusal's note
    names)."""
    from mcmc_unlearner.step import SLOPE_ETA, DampingControl, Measurement
    from test_step import _QuadraticBackend

    H = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    G = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)

    def check(x: torch.Tensor) -> Measurement:
        gx, quad = float(G @ x), float(x @ H @ x)
        actual = -gx + 0.5 * quad  # the model is exact; the bank's own slope along x is 0: direct = ½xᵀHx > 0
        se = 1e-3 * float(x.norm())
        return Measurement(actual, se, 0.0, direct=0.5 * quad, direct_stderr=se, nll_scale=1.0, nll_stderr=0.0)

    out = DampingControl(slope_eta=SLOPE_ETA, direct_z=DIRECT_Z).step(_QuadraticBackend(H), G, check)
    slope = [h for h in out.history if h.get("slope_failed")]
    assert slope and not any(h["direct_failed"] for h in slope)
    assert any(h["direct"] > DIRECT_Z * h["direct_stderr"] for h in slope)  # ones the direct test would fail too
