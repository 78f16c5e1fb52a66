"""The first request's check that ``nll`` can be differentiated twice (one Hessian-vector product by double
backward, :meth:`MCMCUnlearner._once_differentiable`) was not planned under ``memory_budget``: on a 52.7M-parameter
MLP it took 1,414 MiB (7.0 copies of the parameters) beside a request of 1,610 MiB. It is planned now
(:meth:`MCMCUnlearner._once_plan`: its copies of the parameters and its rows' second derivatives, on as many of its
rows as fit), recorded in ``report.info["memory"]``, and refused with the budget that would do where not one row fits;
it holds 4.0 copies (the product of the gradient's sum at the sample itself, the gradient freed first)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
real = MCMCUnlearner._once_differentiable
peaks = []


def measured(self, rows, theta):
    rss = status("VmRSS")
    reset_peak()  # the high-water mark starts again from the current size
    out = real(self, rows, theta)
    peaks.append(status("VmHWM") - rss)
    return out


MCMCUnlearner(model, nll=nll, memory_budget=budget, solver="cg")._check_forward((x, y))  # pages in the code
MCMCUnlearner._once_differentiable = measured
un = MCMCUnlearner(model, nll=nll, memory_budget=budget, solver="cg")
un._check_forward((x, y))
print(json.dumps({"peak": peaks[-1], "dim": un.spec.dim, "planned": un._planned.get("second_derivative_check")}))
"""
)


def test_the_double_backward_check_measured_stays_within_a_small_budget() -> None:
    """A 1.1M-parameter MLP (4.5 MB a copy of its parameters) under a 24 MB budget: the product took 30.0 MB (6.7
    copies: the sample cloned, a seeded vector, the gradient kept beside its graph); now within the budget, measured
    as the growth of the resident set of a fresh process around the product (as ``test_memory`` measures)."""
    budget = 24_000_000
    out = _measured(_MEASURE, str(budget), timeout=120)
    assert out["peak"] <= budget, f"peak {out['peak'] / 1e6:.1f} MB over the {budget / 1e6:.0f} MB budget"
    assert out["planned"] is not None and out["peak"] <= out["planned"] <= budget


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def test_the_check_is_recorded_in_report_info_memory_on_the_first_request_only() -> None:
    """``info["memory"]["planned"]["second_derivative_check"]``: the first request's plan (its parameters' copies
    and rows), not a later request's (the check runs once)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(200, 5), torch.randint(3, (200,))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, memory_budget="64MB")
    memory = un.remove((x[:10], y[:10]), (x[10:], y[10:])).info["memory"]
    planned = memory["planned"]["second_derivative_check"]
    assert U._ONCE_D_COPIES * un.spec.dim * 4 < planned <= memory["budget"]
    assert memory["planned_peak"] >= planned
    assert "second_derivative_check" not in un.remove((x[10:12], y[10:12]), (x[12:], y[12:])).info["memory"]["planned"]


def _ctc(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.ctc_loss(m(b[0]).transpose(0, 1), b[1], b[2], b[3], reduction="none")


def _ctc_problem():
    torch.manual_seed(0)
    n, T, S, C = 40, 6, 2, 4
    x, tgt = torch.randn(n, T, 5), torch.randint(1, C, (n, S))
    il, tl = torch.full((n,), T), torch.full((n,), S)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, C), nn.LogSoftmax(-1))
    rows = lambda s: (x[s], tgt[s], il[s], tl[s])  # noqa: E731
    return model, rows


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_a_budget_for_one_row_still_refuses_ctc_loss_on_that_row(monkeypatch) -> None:
    """Under a budget that fits the product on one row (not the four the check reads), the product is taken on
    the first row, and an operation torch differentiates only once is still refused before any work."""
    model, rows = _ctc_problem()
    probe = MCMCUnlearner(model, None, nll=_ctc, log_prior=_lp, solver="cg", memory_budget="1GB")
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.memory import row_and_call_bytes

    theta = ParamSpec.flatten_module(model)
    per_row, per_call = row_and_call_bytes(probe._h_f(), theta, rows(slice(0, 4)), skip_parameters=True)
    one = U._ONCE_D_COPIES * probe.spec.dim * 4 + U._HVP_PRODUCT_FACTOR * (per_row + per_call)
    seen: list[int] = []
    real = U.MCMCUnlearner._once_differentiable

    def spy(self, r, t):
        seen.append(int(r[0].shape[0]))
        return real(self, r, t)

    monkeypatch.setattr(U.MCMCUnlearner, "_once_differentiable", spy)
    un = MCMCUnlearner(model, None, nll=_ctc, log_prior=_lp, solver="cg", memory_budget=one)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request started its work")

    monkeypatch.setattr(un, "_propose", no_work)
    with pytest.raises(ValueError, match=r"cannot differentiate a second time \(aten::_ctc_loss_backward\)"):
        un.remove(rows(slice(0, 5)), rows(slice(5, None)))
    assert seen == [1]
    assert un._planned["second_derivative_check"] == one


def _at_least(msg: str) -> int:
    """The budget a refusal names ("raise memory_budget to at least X")."""
    return resolve_budget(re.search(r"raise memory_budget to at least ([0-9.]+ [KMG]?i?B)", msg).group(1))


def test_a_budget_below_one_rows_product_is_put_off_to_the_requests_refusal_and_then_taken(monkeypatch) -> None:
    """Not even one row's product fits: the check is put off, not taken over the budget, and the request is refused
    before any work naming one budget that covers the check too (the request's own needs named first where larger:
    a refusal of the check's alone would name a figure the request then refused again, stop 50). At that budget
    the next request takes the check (on the same rows) and runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(300, 64), torch.randint(10, (300,))
    bank = [{k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    ran: list[int] = []
    real = U.MCMCUnlearner._once_differentiable

    def spy(self, r, t):
        ran.append(int(r[0].shape[0]))
        return real(self, r, t)

    monkeypatch.setattr(U.MCMCUnlearner, "_once_differentiable", spy)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, memory_budget=U._ONCE_D_COPIES * 85_002 * 4)
    with pytest.raises(MemoryError, match=r"raise memory_budget to at least") as err:
        un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert not ran and un._once_deferred is not None and not un.history
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    least = _at_least(str(err.value))
    assert least >= un._once_deferred > un.memory_budget
    un.memory_budget = least
    report = un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert ran == [4] and un._once_deferred is None
    assert report.info["memory"]["planned"]["second_derivative_check"] <= least


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_a_check_put_off_by_the_budget_still_refuses_ctc_loss_on_the_next_request() -> None:
    """The check put off on a request refused for memory is taken on the next one, which a budget that fits it
    lets start: an operation torch differentiates only once is refused there before any work."""
    model, rows = _ctc_problem()
    un = MCMCUnlearner(model, None, nll=_ctc, log_prior=_lp, solver="cg", memory_budget=1000)
    with pytest.raises(MemoryError, match=r"raise memory_budget to at least") as err:
        un.remove(rows(slice(0, 5)), rows(slice(5, None)))
    assert un._once_deferred is not None and "at least" in str(err.value)
    un.memory_budget = 2**30  # fits the check: taken on this request
    with pytest.raises(ValueError, match=r"cannot differentiate a second time \(aten::_ctc_loss_backward\)"):
        un.remove(rows(slice(0, 5)), rows(slice(5, None)))
    assert not un.history
