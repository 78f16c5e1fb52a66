"""Copies of the bank's ``[S, D]`` samples a request held outside the memory plan (stop 58): the removed rows'
gradient draws copied (``bank[index]``: 128 of 256 draws of an 85k-parameter MLP, 44 MB, held through the whole
request under a 16 MB budget), now read in place where their copy would take over a quarter of the budget (a chunk
copied at a time, within the gradients' plan); and a correction (``recenter_every``) moving the shifted bank into a
second copy, now in place (the shifted bank is the request's own)."""

from __future__ import annotations

import torch

import mcmc_unlearner.unlearner as U
from _memory_helpers import STATUS
from _memory_helpers import measured as _measured
from test_recenter import EXACT, REQUESTS, _draws, _run, prob  # noqa: F401 (prob: the fixture)

_WHOLE = (
    r"""
import json, sys
import torch
from torch import nn
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec

torch.set_num_threads(1)

"""
    + STATUS
    + r"""

budget, S = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
x, y = torch.randn(2000, 64), torch.randint(10, (2000,))
theta = ParamSpec.flatten_module(model)
bank = theta + 0.01 * torch.randn(S, theta.numel())
kw = dict(nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), memory_budget=budget)
kw["log_prior"] = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())
MCMCUnlearner(model, bank=bank.clone(), **kw).propose((x[:8], y[:8]), (x[8:], y[8:]))  # pages in the code
un = MCMCUnlearner(model, bank=bank.clone(), **kw)
rss = status("VmRSS")
reset_peak()  # the high-water mark starts again from the current size
prop = un.propose((x[:8], y[:8]), (x[8:], y[8:]))
peak = status("VmHWM")
print(json.dumps({"transient": peak - status("VmRSS"), "draws": prop.report.n_draws}))
"""
)


def test_a_request_on_a_bank_larger_than_the_budget_keeps_its_transient_memory_within_it() -> None:
    """256 draws of an 85k-parameter MLP (87 MB a copy of the bank) under a 16 MB budget, measured as
    ``test_memory``'s whole request is (the high-water mark of a fresh process above what the request keeps): 53.6
    MB before (the gradient draws' 44 MB copy), 9.4 MB now."""
    budget = 16_000_000
    out = _measured(_WHOLE, str(budget), "256", timeout=300)
    assert out["draws"] == 128  # the gradient draws are a part of the bank (the case that copied them)
    assert out["transient"] <= budget, f"{out['transient'] / 1e6:.1f} MB over the {budget / 1e6:.0f} MB budget"


def test_a_correction_moves_the_shifted_bank_in_place(prob, monkeypatch) -> None:  # noqa: F811
    """The correction's step is added to the request's shifted bank itself (its storage), not to a second copy;
    ``test_recenter`` checks the numbers against the closed form."""
    shifted: list[torch.Tensor] = []
    corrected: list[torch.Tensor] = []
    real_shift, real_recenter = U.MCMCUnlearner._shift, U.MCMCUnlearner._recenter

    def shift(self, *a, **k):
        out = real_shift(self, *a, **k)
        shifted.append(out[1])
        return out

    def recenter(self, *a, **k):
        out = real_recenter(self, *a, **k)
        corrected.append(out[1])
        return out

    monkeypatch.setattr(U.MCMCUnlearner, "_shift", shift)
    monkeypatch.setattr(U.MCMCUnlearner, "_recenter", recenter)
    before = _draws(prob)
    _, reports = _run(prob, before, hessian="full", recenter_every=REQUESTS)
    assert reports[-1].info["recenter"] == "applied"
    assert corrected[-1].data_ptr() == shifted[-1].data_ptr()
    assert not torch.equal(corrected[-1], before)
