"""A float32 model with a bfloat16 bank: samples() gives the bank back in bfloat16, where the computed shift rounded to
nothing; the request reported shift_norm > 0 with no warning and info['stored_shift'] unset."""

import warnings

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


def _problem():
    torch.manual_seed(0)
    n, d = 2000, 5
    x = torch.randn(n, d)
    y = x @ torch.full((d,), 4.0) + 4.0 + 0.5 * torch.randn(n)
    X = torch.cat([x, torch.ones(n, 1)], 1).double()
    P = X.T @ X / 0.25 + torch.eye(d + 1)
    mu = torch.linalg.solve(P, X.T @ y.double() / 0.25)
    flat = mu + torch.randn(32, d + 1, dtype=torch.float64) @ torch.linalg.cholesky(torch.linalg.inv(P)).T
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.copy_(mu[:d].view(1, d))
        model.bias.copy_(mu[d:])
    return x, y, model, flat


nll = lambda m, b: 0.5 * ((b[1] - m(b[0]).squeeze(-1)) / 0.5) ** 2  # noqa: E731
log_prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731


@pytest.mark.parametrize("layout", ["flat", "state_dicts"])
def test_a_shift_that_rounds_away_in_the_banks_own_dtype_is_said(layout):
    x, y, model, flat = _problem()
    if layout == "flat":
        bank = flat.to(torch.bfloat16)
    else:
        bank = [{"weight": r[:5].view(1, 5).to(torch.bfloat16), "bias": r[5:].to(torch.bfloat16)} for r in flat]
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = un.remove((x[:20], y[:20]), (x[20:], y[20:]))
    out = un.samples()
    unchanged = (
        torch.equal(out, bank)
        if layout == "flat"
        else all(torch.equal(a[k], b[k]) for a, b in zip(out, bank) for k in a)
    )
    assert r.shift_norm > 0 and unchanged  # the bank's resolution (0.03 near 4) is coarser than the shift (~0.002)
    assert r.info.get("stored_shift") == 0.0
    assert any("rounds to nothing" in str(m.message) and "bfloat16" in str(m.message) for m in w)


def test_a_float32_bank_is_not_flagged():
    x, y, model, flat = _problem()
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=flat.float())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = un.remove((x[:20], y[:20]), (x[20:], y[20:]))
    assert "stored_shift" not in r.info and not any("rounds to nothing" in str(m.message) for m in w)
