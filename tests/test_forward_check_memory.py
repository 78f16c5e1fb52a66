"""The first request's checks of ``nll`` (:meth:`MCMCUnlearner._check_forward`: its writes, its rows alone and
together, its gradient at a stored sample; the mixed-rows test) under ``memory_budget``, and the safety check's draws
(stop 59): the checks held 10.7 copies of a 1.1M-parameter MLP's parameters (48 MB under a 24 MB budget), unplanned
(the gradients' float64 copies and their difference, a second clone of the sample, a flat copy of the model held
throughout); now 4.8, planned (``info["memory"]["planned"]["forward_check"]``) and put off where not one row fits.
The check's draws were copied out of the bank (8 draws of that MLP: 36 MB) when the request began and held through
the gradients and the curvature, outside every plan; now taken at the check, copied only where the copies take at
most a quarter of the budget (and planned with the check), else read in place."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mcmc_unlearner.step as St
import mcmc_unlearner.unlearner as U
from _memory_helpers import MLP, opening
from _memory_helpers import measured as _measured
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.memory import resolve_budget

torch.set_num_threads(1)

_MEASURE = (
    opening()
    + MLP
    + r"""
params = [p.detach() for p in model.parameters()]
bank = torch.cat([p.reshape(-1) for p in params])[None] + 0.01 * torch.randn(4, sum(p.numel() for p in params))
MCMCUnlearner(model, nll=nll, bank=bank.clone(), memory_budget=budget, solver="cg")._check_forward((x, y))  # warm
un = MCMCUnlearner(model, nll=nll, bank=bank, memory_budget=budget, solver="cg")
rss = status("VmRSS")
reset_peak()
un._check_forward((x, y))
print(json.dumps({"peak": status("VmHWM") - rss, "dim": un.spec.dim, "planned": un._planned.get("forward_check"),
                  "checked": un._forward_checked}))
"""
)


def test_the_first_requests_checks_measured_stay_within_their_plan_and_the_budget() -> None:
    """A 1.1M-parameter MLP (4.5 MB a copy of its parameters) under a 24 MB budget: the checks took 48.2 MB (10.7
    copies); now within their plan and the budget, measured as the growth of the resident set of a fresh process
    around them (as ``test_memory`` measures)."""
    budget = 24_000_000
    out = _measured(_MEASURE, str(budget), timeout=120)
    assert out["checked"] and out["planned"] is not None
    assert out["peak"] <= out["planned"] <= budget, (out, f"{out['peak'] / (4 * out['dim']):.2f} copies")


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _mlp_problem(S: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(300, 64), torch.randint(10, (300,))
    bank = [{k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(S)]
    return model, x, y, bank


def test_checks_that_do_not_fit_are_put_off_and_the_refusal_names_a_budget_that_covers_them(monkeypatch) -> None:
    """Under a budget below the checks' plan on one row they are not run (not over the budget): the request is
    refused before any work, naming one budget that covers them, and nothing changes; at that budget the next
    request takes them and runs, within it."""
    model, x, y, bank = _mlp_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ran: list[int] = []
    real = U.MCMCUnlearner._forward_writes

    def spy(self, rows, theta):
        ran.append(int(rows[0].shape[0]))
        return real(self, rows, theta)

    monkeypatch.setattr(U.MCMCUnlearner, "_forward_writes", spy)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, memory_budget=5 * 85_002 * 4)
    with pytest.raises(MemoryError, match=r"raise memory_budget to at least") as err:
        un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert not ran and not un._forward_checked and not un._mixed_checked and not un.history
    assert un._forward_deferred is not None and un._forward_deferred > un.memory_budget
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    least = resolve_budget(re.search(r"at least ([0-9.]+ [KMG]?i?B)", str(err.value)).group(1))
    assert least >= un._forward_deferred
    un.memory_budget = least
    report = un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert ran == [4] and un._forward_checked and un._forward_deferred is None
    assert report.info["memory"]["planned"]["forward_check"] <= least


def test_the_check_draws_are_read_in_place_where_their_copies_would_take_over_a_quarter_of_the_budget(
    monkeypatch,
) -> None:
    """64 draws of an 85k-parameter MLP under a 12 MB budget: the check's 8 draws and its screen's 4 (4.1 MB of
    copies) were copied when the request began; now the check reads them from the bank (the screen too), and the
    request's numbers equal those with the copies (``FURTHER_COPY_SHARE`` = 1: copied, planned with the check) to
    float rounding."""
    checks: list[St.EnergyCheck] = []
    real = St.EnergyCheck.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        checks.append(self)

    monkeypatch.setattr(St.EnergyCheck, "__init__", spy)
    shifts = []
    for share in (U.FURTHER_COPY_SHARE, 1):
        monkeypatch.setattr(U, "FURTHER_COPY_SHARE", share)
        model, x, y, bank = _mlp_problem(64)
        un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, memory_budget=12_000_000)
        checks.clear()
        prop = un.propose((x[:8], y[:8]), (x[8:], y[8:]))
        first = checks[0]
        if share == 1:  # copied: the draws' own storage
            assert isinstance(first.thetas, torch.Tensor)
            assert first.thetas.untyped_storage().data_ptr() != un.bank.untyped_storage().data_ptr()
        else:
            assert isinstance(first.thetas, U._BankRows) and first.thetas.bank is un.bank
            assert first.screening and isinstance(first._part("screen").thetas, U._BankRows)
        shifts.append(prop.bank)
    scale = float(shifts[1].norm())
    assert float((shifts[0] - shifts[1]).norm()) <= 1e-5 * scale


class _Clamped(nn.Module):
    """An MLP whose forward constrains a weight in place (refused by the forward check's writes test)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.l1.weight.clamp_(-0.01, 0.01)
        return self.l2(torch.tanh(self.l1(x)))


def test_checks_put_off_leave_the_bank_unchanged_under_a_forward_that_writes_into_its_parameters() -> None:
    """Where the checks are put off, the writes test does not run, but the double-backward check's need was measured
    at the stored sample itself (a view of the bank): a forward that clamps a weight in place moved a bank row by
    0.49 under a refusal saying "nothing was changed" (stop 59's review). The refusal leaves bank and model as they
    were, and at the budget it names the writes test refuses the forward, the bank still unchanged."""
    torch.manual_seed(0)
    model = _Clamped()
    x, y = torch.randn(300, 64), torch.randint(10, (300,))
    bank = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, memory_budget=300_000)
    stored = un.bank.clone()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryError, match=r"raise memory_budget to at least") as err:
        un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert un._forward_deferred is not None and not un._forward_checked  # the checks were put off
    assert torch.equal(un.bank, stored)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    un.memory_budget = resolve_budget(re.search(r"at least ([0-9.]+ [KMG]?i?B)", str(err.value)).group(1))
    with pytest.raises(ValueError, match=r"writes into l1\.weight in place"):
        un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert torch.equal(un.bank, stored)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
