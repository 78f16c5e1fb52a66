"""``curvature_draws`` larger than the bank was capped at the bank's size without a word: now warned once, naming
the cap, and recorded in the report's info; the request is the one ``curvature_draws=<bank size>`` gives."""

import warnings

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.models.linreg import BayesianLinearRegression

torch.set_num_threads(1)


def _request(curvature_draws):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g)
    y = x.sum(1) + torch.randn(60, generator=g)
    model = BayesianLinearRegression(3)
    bank = torch.randn(12, 3, generator=g) * 0.1 + 1.0
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: m.nll(b),
        log_prior=lambda m: m.log_prior(),
        bank=bank,
        solver="exact",
        curvature_draws=curvature_draws,
    )
    return un, RemovableDataset(x, y, batch_size=20, seed=0)


def test_curvature_draws_over_the_bank_is_warned_once_and_recorded():
    un, data = _request(64)
    with pytest.warns(UserWarning, match=r"curvature_draws=64 is more than the bank's 12 samples") as rec:
        first = un.forget([1, 2, 3], data)
    assert sum("curvature_draws=64" in str(w.message) for w in rec) == 1
    assert first.info["curvature_draws_capped"] == 12 and first.n_curvature_draws == 12
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*curvature_draws=")
        second = un.forget([4, 5], data)  # once per unlearner
    assert second.info["curvature_draws_capped"] == 12
    # the cap is what it says: the same requests with curvature_draws=12 (the bank's size) move the bank identically
    ref, data12 = _request(12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*curvature_draws=")
        r1 = ref.forget([1, 2, 3], data12)
        ref.forget([4, 5], data12)
    assert "curvature_draws_capped" not in r1.info
    assert torch.equal(un.bank, ref.bank) and first.damping == r1.damping


def _small_bank_request(**options):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=g)
    y = x.sum(1) + torch.randn(60, generator=g)
    bank = torch.randn(5, 3, generator=g) * 0.1 + 1.0  # five samples: fewer than the check's default 8
    un = MCMCUnlearner(
        BayesianLinearRegression(3),
        nll=lambda m, b: m.nll(b),
        log_prior=lambda m: m.log_prior(),
        bank=bank,
        solver="exact",
        **options,
    )
    return un, RemovableDataset(x, y, batch_size=20, seed=0)


def test_check_and_gradient_draws_over_the_bank_are_recorded_and_warned_when_asked_for():
    """``check_draws`` and a numeric ``grad_draws`` above the bank were capped without a word (stop 35 left them):
    now recorded in the report's info, warned once each when given by name (the default 8 check draws at a smaller
    bank only recorded), and the request is the one the bank's size gives."""
    un, data = _small_bank_request()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*_draws=")
        default = un.forget([1, 2, 3], data)
    assert default.info["check_draws_capped"] == 5 and "grad_draws_capped" not in default.info
    asked, data2 = _small_bank_request(check_draws=20, grad_draws=30)
    with pytest.warns(UserWarning) as rec:
        first = asked.forget([1, 2, 3], data2)
    messages = [str(w.message) for w in rec]
    assert sum("check_draws=20 is more than the bank's 5 samples" in m for m in messages) == 1
    assert sum("grad_draws=30 is more than the bank's 5 samples" in m for m in messages) == 1
    assert first.info["check_draws_capped"] == 5 and first.info["grad_draws_capped"] == 5
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*_draws=")
        asked.forget([4, 5], data2)  # once per unlearner and option
    ref, data5 = _small_bank_request(check_draws=5, grad_draws=5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*_draws=")
        r1 = ref.forget([1, 2, 3], data5)
        ref.forget([4, 5], data5)
    assert "check_draws_capped" not in r1.info and "grad_draws_capped" not in r1.info
    assert torch.equal(asked.bank, ref.bank) and first.damping == r1.damping
