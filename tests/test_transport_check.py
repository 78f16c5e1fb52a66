"""The Gaussian transport of the bank's spread (``bank_shift="affine"``, the dense solvers' default) is checked.

Stop 46's probe: a Poisson regression network (225 parameters, ``exact``), the 44 rows with counts >= 7 removed:
the safety check passed the common step (energy -14.5 as predicted) and the transport of the spread was applied
unchecked, raising the remaining rows' NLL over every sample 1.480 -> 1.509 (retraining 1.467) and the test NLL
1.67 -> 1.85 (retraining 1.73). The transport is now measured at the check's draws against the curvature's
prediction and left out where it does not hold (the common step alone: remaining NLL 1.469, test NLL 1.70).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


def _user_sgld(model, nll, log_prior, x, y, lr, burn, every, g, steps=3000):
    """The user's own SGLD loop, θ ← θ − ε/2 ∇F + N(0, ε) on minibatches of 100, keeping every ``every``-th state
    after ``burn`` steps as a flat-parameter bank."""
    n, bank = x.shape[0], []
    for t in range(steps):
        i = torch.randint(n, (100,), generator=g)
        energy = n * nll(model, (x[i], y[i])).mean() - log_prior(model)
        model.zero_grad()
        energy.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(-0.5 * lr * p.grad + lr**0.5 * torch.randn(p.shape, generator=g))
        if t >= burn and (t - burn) % every == 0:
            bank.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    return torch.stack(bank)


def _poisson_chain():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1200, 5, generator=g)
    torch.randperm(1000, generator=g)
    y = torch.poisson(torch.exp(0.6 * x[:, 0] - 0.4 * x[:, 1] + 0.5), generator=g)
    x, y = x[:1000], y[:1000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 1), nn.Flatten(0))

    def nll(m, b):
        return F.poisson_nll_loss(m(b[0]), b[1], log_input=True, full=True, reduction="none")

    def log_prior(m):
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    bank = _user_sgld(model, nll, log_prior, x, y, 1e-4, 1000, 40, torch.Generator().manual_seed(0))
    return x, y, model, nll, log_prior, bank


def test_a_transport_the_curvature_does_not_predict_is_left_out_and_the_fit_kept():
    x, y, model, nll, log_prior, bank = _poisson_chain()
    big = y >= 7
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank)
    torch.manual_seed(0)
    report = un.remove((x[big], y[big]), DataLoader(TensorDataset(x[~big], y[~big]), batch_size=128, shuffle=True))
    assert report.solver == "exact"
    tc = report.info["spread_check"]
    assert tc["kind"] == "Gaussian" and tc["energy_change"] - tc["predicted"] > 3 * tc["energy_stderr"]
    assert "Gaussian move of the samples' spread" in report.info["bank_shift_fallback"]
    moved = un.bank - bank
    assert torch.allclose(moved, moved[0].expand_as(moved), atol=1e-6)  # the common step alone

    def remaining_nll(thetas):
        out = []
        for t in thetas:
            torch.nn.utils.vector_to_parameters(t, model.parameters())
            with torch.no_grad():
                out.append(float(nll(model, (x[~big], y[~big])).mean()))
        return sum(out) / len(out)

    assert remaining_nll(un.bank) <= remaining_nll(bank)  # every remaining row, every sample: not worse


def test_bank_shift_sample_s_own_terms_are_measured_and_left_out_where_they_damage_the_fit():
    """``bank_shift="sample"`` adds each sample's own influence about the checked common step, unmeasured until stop
    46: on a digits MLP losing 150 random rows the remaining rows' NLL over every sample rose 0.079 -> 0.121
    (retraining 0.091; the common step alone 0.083), every check passed. Now measured at the check's draws and
    left out there."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(0)
    p = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.data, dtype=torch.float32)[p][:1400] / 16.0
    y = torch.tensor(d.target)[p][:1400]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    def log_prior(m):
        return -0.5 * sum((q**2).sum() for q in m.parameters())

    bank = _user_sgld(model, nll, log_prior, x, y, 2e-4, 1500, 30, g)
    forget = torch.randperm(1400, generator=torch.Generator().manual_seed(100))[:150]
    keep = torch.ones(1400, dtype=torch.bool)
    keep[forget] = False
    banks = {}
    for shift in ("mean", "sample"):
        un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, bank_shift=shift)
        report = un.remove((x[forget], y[forget]), (x[keep], y[keep]))
        banks[shift] = un.bank
    assert "per-sample move of the samples' spread" in report.info["bank_shift_fallback"]
    sc = report.info["spread_check"]
    assert sc["nll_change"] - 2 * sc["nll_stderr"] > 0.05 * sc["nll_scale"]
    assert torch.equal(banks["sample"], banks["mean"])


_SIG = 0.5


def _conjugate_regression(n: int, d: int = 40):
    """``n`` rows of a linear-Gaussian regression (noise sd ``_SIG``, seed 7), a double ``nn.Linear(d, 1)``, its
    per-row ``nll`` and a N(0, 1) ``log_prior``; the generator, to draw further from."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + _SIG * torch.randn(n, generator=g, dtype=torch.float64)

    def nll(m, b):
        return 0.5 * ((m(b[0]).squeeze(-1) - b[1]) / _SIG) ** 2

    def log_prior(m):
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    return x, y, nn.Linear(d, 1).double(), nll, log_prior, g


def test_the_exact_transport_of_a_conjugate_posterior_is_kept_when_half_the_rows_go():
    """On a conjugate Gaussian regression the transport is exact: the check must keep it. A rule on the held rows'
    NLL (tried in this stop) refused it here, where the rise is the widening the exact answer makes (+5%), and
    left the bank at 0.65-0.68 of the exact posterior's sd; the energy rule alone keeps it (sd ratio 1)."""
    import warnings

    n = 400
    x, y, model, nll, log_prior, g = _conjugate_regression(n)
    d, sig = x.shape[1], _SIG

    def posterior(xs, ys):  # parameters [w, b]: precision XᵀX/σ² + I
        X = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], 1)
        A = X.T @ X / sig**2 + torch.eye(d + 1, dtype=xs.dtype)
        return torch.linalg.solve(A, X.T @ ys / sig**2), torch.linalg.inv(A)

    mean, cov = posterior(x, y)
    bank = mean + torch.randn(400, d + 1, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    gone = torch.randperm(n, generator=g)[: n // 2]
    keep = torch.ones(n, dtype=torch.bool)
    keep[gone] = False
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the large-removal warning
        report = un.remove((x[gone], y[gone]), (x[keep], y[keep]))
    assert report.solver == "exact" and "bank_shift_fallback" not in report.info
    _, cov2 = posterior(x[keep], y[keep])
    ratio = un.bank.std(0) / cov2.diagonal().sqrt()
    # 400 draws: each sd ratio within about 3.5% (one standard error), their mean within 0.6%
    assert abs(float(ratio.mean()) - 1) < 0.03 and float(ratio.min()) > 0.85 and float(ratio.max()) < 1.15


def test_a_spread_measured_again_reads_no_row_twice() -> None:
    """The per-sample spread's check, when unclear on the check's rows, measures again with the second
    measurement's further rows; where there were none (the second measurement then read the check's own rows at
    further samples) it added the check's rows to themselves, every row counted twice and its standard error
    shrunk by up to √2 (stop 50's review). Without further rows it is not measured again."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_blr
    from mcmc_unlearner.curvature import functionalize
    from mcmc_unlearner.models.linreg import BayesianLinearRegression
    from mcmc_unlearner.step import EnergyCheck

    prob = make_blr(n=200, dim=3, removed=20, seed=1)
    model = BayesianLinearRegression(3).double()
    rows = (prob.x[prob.keep].double(), prob.y[prob.keep].double())
    f = functionalize(model, lambda m, *b: m.nll(b))
    lp = functionalize(model, lambda m: m.log_prior())
    g = torch.Generator().manual_seed(0)
    L = torch.linalg.cholesky(prob.cov_all)
    thetas = prob.mean_all + torch.randn(10, 3, generator=g, dtype=torch.float64) @ L.T
    G = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    un = MCMCUnlearner(model, None, nll=lambda m, b: m.nll(b), log_prior=lambda m: m.log_prior(), bank=thetas.clone())
    shift = torch.randn(1, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).expand(4, 3)
    seen = 0
    for scale in [0.005 * 1.03**i for i in range(160)]:
        checks = []
        for further in (False, True):
            check = EnergyCheck(f, lp, thetas[:4], rows, rows[0].shape[0], G)
            if further:  # a second measurement without further rows ran: the check's rows at further samples
                check.confirm_thetas = thetas[4:]
                check.confirm(torch.zeros(3, dtype=torch.float64))
            checks.append(check)
        infos = [{}, {}]
        for check, info in zip(checks, infos):
            un._spread_refused(check, thetas[:4] + scale * shift, thetas[:4].clone(), None, info, "per-sample")
        assert infos[0]["spread_check"] == infos[1]["spread_check"], scale  # the same rows, the same verdict
        seen += infos[0]["spread_check"]["nll_change"] > 0
    assert seen  # the scan reaches rises the check judges


def _overdispersed_regression(spread: float, n: int = 400, **options):
    """A conjugate Gaussian regression (d = 40, ``n`` rows, half of them removed) whose bank is ``spread`` times as
    wide as the posterior (an SGLD chain run with too large a step), removed with the defaults (``exact``, the
    Gaussian transport); the rows kept, the bank before and the unlearner after, and the remaining rows' mean NLL over
    every row at every sample of a bank."""
    import warnings

    x, y, model, nll, log_prior, g = _conjugate_regression(n)
    d, sig = x.shape[1], _SIG

    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)  # parameters [w, b]: precision XᵀX/σ² + I
    A = X.T @ X / sig**2 + torch.eye(d + 1, dtype=x.dtype)
    mean, cov = torch.linalg.solve(A, X.T @ y / sig**2), torch.linalg.inv(A)
    bank = mean + spread * torch.randn(100, d + 1, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[: n // 2]] = False
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the large-removal warning
        report = un.remove((x[~keep], y[~keep]), (x[keep], y[keep]))

    def remaining_nll(thetas):
        return float((0.5 * ((thetas @ X[keep].T - y[keep]) / sig) ** 2).mean())

    return report, bank, un, remaining_nll


def test_the_reported_remaining_nll_change_includes_the_transport_s():
    """The report's held-rows NLL change held the common step's alone, the Gaussian transport's own measured change
    left out (a mixture of experts: -0.012 reported, +0.058 over every row and sample). Here the transport is applied
    (it passes every check) and the report must match the change over every remaining row and sample within two of
    its standard errors (it read -0.052 ± 0.022 where the change is +0.048)."""
    report, bank, un, remaining_nll = _overdispersed_regression(1.4)
    assert report.solver == "exact" and "bank_shift_fallback" not in report.info and report.passed
    truth = remaining_nll(un.bank) - remaining_nll(bank)
    se = report.info["remaining_nll_rise_stderr"]
    assert abs(report.remaining_nll_change - truth) <= 2 * se, (report.remaining_nll_change, truth, se)
    assert abs(report.info["remaining_nll_rise"] - truth) <= 2 * se
    assert report.info["spread_check"]["applied"]
    assert report.info["remaining_nll_drift"] == report.info["remaining_nll_rise"]
    assert report.info["remaining_nll_drift_stderr"] == pytest.approx(se)


def test_a_transport_that_raises_the_remaining_nll_past_the_safety_net_is_left_out():
    """The transport was judged on the energy alone: one the curvature predicts exactly (a Gaussian posterior) that
    widens an over-wide bank raised the remaining rows' NLL 0.78 -> 1.06, every check passed. The safety net's
    rule now judges the common step and the transport together, and the transport is left out."""
    report, bank, un, remaining_nll = _overdispersed_regression(2.5)
    sc = report.info["spread_check"]
    assert sc["energy_change"] - sc["predicted"] < 3 * sc["energy_stderr"]  # the energy rule alone keeps it
    allowance = 0.05 * report.info["trials"][-1]["nll_scale"]
    assert remaining_nll(un.bank) - remaining_nll(bank) <= allowance  # every remaining row and sample
    moved = un.bank - bank
    assert torch.allclose(moved, moved[0].expand_as(moved), atol=1e-9)  # the common step alone
    assert "plus two standard errors" in report.info["bank_shift_fallback"] and not sc["applied"]
    assert sc["combined_nll_rise"] > allowance + 2 * sc["combined_nll_stderr"]


def test_a_transport_measured_again_is_applied_only_within_the_allowance_itself():
    """With 1,000 rows kept the combined rise is unclear on the check's 256 rows and measured again on further rows;
    there, as the safety net's second measurement, its point estimate must be within the allowance (with two more
    standard errors of slack the transport was applied: +0.035 over every remaining row and sample against an
    allowance of 0.025)."""
    report, bank, un, remaining_nll = _overdispersed_regression(2.0, n=2000)
    sc = report.info["spread_check"]
    allowance = 0.05 * report.info["trials"][-1]["nll_scale"]
    assert not sc["applied"] and sc.get("measured_again")
    assert allowance < sc["combined_nll_rise"] < allowance + 2 * sc["combined_nll_stderr"]  # the case at issue
    assert "measured again on further rows" in report.info["bank_shift_fallback"]
    assert remaining_nll(un.bank) - remaining_nll(bank) <= allowance  # every remaining row and sample


@pytest.mark.parametrize("spread", [-0.5, 1.0])
def test_the_combined_rise_s_standard_error_pairs_the_two_changes_on_the_same_rows_and_draws(spread) -> None:
    """The common step's and the spread move's held-rows NLL changes are measured on the same rows and draws: the
    combined rise's standard error is that of their per-(row, draw) sum. They were added in quadrature: a spread
    move that undoes half the common step row by row (``spread=-0.5``) was read 2.2x as uncertain as it is and
    applied past the limit; one that repeats it (``spread=1``) read 0.7x, and was refused within the limit."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_blr
    from mcmc_unlearner.curvature import functionalize
    from mcmc_unlearner.models.linreg import BayesianLinearRegression
    from mcmc_unlearner.step import EnergyCheck

    prob = make_blr(n=200, dim=3, removed=20, seed=1)
    model = BayesianLinearRegression(3).double()
    rows = (prob.x[prob.keep].double(), prob.y[prob.keep].double())
    f = functionalize(model, lambda m, *b: m.nll(b))
    thetas = prob.mean_all + torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ (
        torch.linalg.cholesky(prob.cov_all).T
    )
    x = torch.tensor([0.08, -0.05, 0.06], dtype=torch.float64)  # the common step
    un = MCMCUnlearner(model, None, nll=lambda m, b: m.nll(b), bank=thetas.clone())
    check = EnergyCheck(f, None, thetas, rows, rows[0].shape[0], x)
    base, moved = thetas + x, thetas + (1 + spread) * x  # the spread's move: a further `spread` of the step

    def mean_se(E):  # over rows (each row's mean over draws) and over draws (each draw's mean over rows)
        K, m = E.shape
        return float(E.mean()), float((E.mean(0).var() / m + E.mean(1).var() / K).sqrt())

    with torch.no_grad():
        h = [torch.stack([f(t, *rows) for t in ts]) for ts in (thetas, base, moved)]
    (_, b_se), (rise, rise_se), (_, paired) = mean_se(h[1] - h[0]), mean_se(h[2] - h[1]), mean_se(h[2] - h[0])
    quadrature = (b_se**2 + rise_se**2) ** 0.5
    assert abs(paired / quadrature - 1) > 0.25  # a case where pairing matters
    limit, scale = un.control.max_nll_increase, 1.0
    # the common step's rise placed so the combined rise sits between the limit plus two paired and plus two
    # quadrature standard errors
    rise_b = limit * scale + paired + quadrature - rise
    info: dict = {}
    said = un._spread_refused(check, moved, base, None, info, "per-sample", (rise_b, b_se, scale), thetas)
    sc = info["spread_check"]
    assert sc["nll_change"] == pytest.approx(rise, rel=1e-9)
    assert sc["combined_nll_rise"] == pytest.approx(rise_b + rise, rel=1e-9)
    assert sc["combined_nll_stderr"] == pytest.approx(paired, rel=1e-6)
    # pairing shrinks the error (refused: the rise is past the limit by more than two of its standard errors) or
    # widens it (applied: not clearly past, and no further rows to measure again on)
    assert sc["applied"] == (paired > quadrature) and (said is None) == (paired > quadrature)


def test_the_spread_is_not_paired_with_a_common_step_further_newton_steps_moved_on():
    """With ``newton_steps > 1`` the common step moved on after the safety net judged its first step: the pairing
    read the correlation off the whole move (-0.50 where the first step's was +0.36) and applied it to the first
    step's error (the review of stop 52). The two errors are then joined as independent, and the report says so."""
    report, *_ = _overdispersed_regression(1.4, newton_steps=3)
    assert report.info["newton_steps_taken"] > 1
    sc = report.info["spread_check"]
    assert sc["applied"] and math.isnan(sc["combined_nll_correlation"])
    first = report.info["trials"][-1]["nll_stderr"]
    assert sc["combined_nll_stderr"] == pytest.approx(math.hypot(first, sc["nll_stderr"]), rel=1e-9)
