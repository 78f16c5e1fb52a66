"""The safety net's NLL tolerance where the per-row change is heavy-tailed: a step judged on 256 held rows that
read its damage low is measured again on further rows (``step.DampingControl._confirm``)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mcmc_unlearner import MCMCUnlearner


def _digits_thousand_class_head(seed: int):
    """A 64-32-1000 MLP on scikit-learn's digits (a head far wider than the ten classes it sees), the user's own
    SGLD loop, 41 samples; class 3 cut to 50 training rows, which the request forgets."""
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(seed)
    d = load_digits()
    perm = torch.randperm(len(d.target), generator=g)
    x = (torch.tensor(d.data, dtype=torch.float32) / 16.0)[perm][len(perm) // 5 :]
    y = torch.tensor(d.target)[perm][len(perm) // 5 :]
    cls = torch.nonzero(y == 3).flatten()
    keep_rows = torch.ones(len(y), dtype=torch.bool)
    keep_rows[cls[50:]] = False
    x, y = x[keep_rows], y[keep_rows]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1000))

    def nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    def log_prior(m):
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    params, n, bank = list(model.parameters()), len(x), []
    for t in range(3000):
        i = torch.randint(0, n, (64,), generator=g)
        grads = torch.autograd.grad(n * nll(model, (x[i], y[i])).mean() - log_prior(model), params)
        lr = 0.5 / n * (1 + t / 500) ** -0.55
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p.add_(-0.5 * lr * gr + math.sqrt(lr) * torch.randn(p.shape, generator=g))
        if t >= 1500 and (t - 1500) % 37 == 0:
            bank.append(parameters_to_vector(params).detach().clone())
    bank = torch.stack(bank)
    vector_to_parameters(bank[-1].clone(), params)
    return model, nll, log_prior, bank, x, y


@functools.cache
def _request(seed: int):
    """The class removal on seed ``seed``: its report and the remaining rows' NLL rise over every row and sample,
    as a fraction of the NLL."""
    model, nll, log_prior, bank, x, y = _digits_thousand_class_head(seed)
    gone = y == 3
    remaining = (x[~gone], y[~gone])
    un = MCMCUnlearner(model, None, nll=nll, log_prior=log_prior, bank=bank.clone())
    report = un.remove((x[gone], y[gone]), remaining)

    def mean_nll(b: torch.Tensor) -> float:  # over every remaining row and every sample
        with torch.no_grad():
            out = []
            for theta in b:
                vector_to_parameters(theta, model.parameters())
                out.append(nll(model, remaining).mean())
        return float(torch.stack(out).mean())

    before, after = mean_nll(bank), mean_nll(un.bank)
    return report, (after - before) / before


def test_a_step_whose_damage_the_checks_rows_read_low_is_measured_again_and_refused() -> None:
    report, _ = _request(0)
    confirmed = [t for t in report.info["trials"] if "confirm_rows" in t]
    assert confirmed and confirmed[0]["confirm_rows"] == 1024
    assert any(not t["confirm_passed"] for t in confirmed)  # a step its 256 rows passed, refused on more rows


@pytest.mark.parametrize("seed", [0, 1])
def test_the_report_s_remaining_nll_change_is_the_pooled_measurement_the_step_was_taken_on(seed: int) -> None:
    """The report's held-rows NLL change gave the taken step's first measurement on 256 rows where the net had
    measured it again and taken it on the pooled value (seed 1: +0.0044 reported, +0.0023 pooled; a probe's
    two-output network: +0.0043 reported, +0.0076 pooled, +0.0105 over every row and sample)."""
    report, _ = _request(seed)
    assert report.passed
    taken = [t for t in report.info["trials"] if t.get("confirm_passed") and t["damping"] == report.damping]
    assert taken and taken[-1]["pooled_nll_change"] != taken[-1]["nll_change"]
    assert report.remaining_nll_change == taken[-1]["pooled_nll_change"]


@pytest.mark.parametrize(
    "seed",
    [
        0,  # +14.9% at stop 50 (its pooled measurement +0.0097 taken under 0.0034 plus two standard errors), +1.6%
        1,  # +22.3% at stop 49, +3.5% since stop 50
    ],
)
def test_the_step_taken_raises_the_remaining_nll_by_under_a_third_of_the_unchecked_one(seed: int) -> None:
    """The step the 256 rows alone accepted raised the remaining rows' NLL by 39% (seed 0); the step taken after the
    second measurement by less than a third of that."""
    _, rise = _request(seed)
    assert rise < 0.13, rise
