"""Memory-budget refusals name a fix that works: the budget named ("raise memory_budget to at least X") is then
accepted, and a solver suggested instead either fits the budget or is named with the budget it needs (stop 50's
probe: three refusals in a row for cg, each naming a figure refused again, and solvers suggesting each other at a
budget that neither fits)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.backends import dense_memory
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.memory import resolve_budget

SIZE = r"([\d.,]+ (?:B|KiB|MiB|GiB))"


def _nll(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _setup(hidden: int = 32, rows: int = 200):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 4))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 16, generator=g), torch.randint(4, (rows,), generator=g)
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.01 * torch.randn(6, theta.numel(), generator=torch.Generator().manual_seed(1))
    return model, x, y, bank


def _propose(model, x, y, bank, solver, budget, remaining=None, n_remaining=None, **kw):
    kw = {"curvature_draws": 2, "check_draws": 2, **({"iter_T": 3} if solver == "cg" else {}), **kw}
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver=solver, memory_budget=budget, **kw)
    return un.propose((x[:3], y[:3]), (x[3:], y[3:]) if remaining is None else remaining(), n_remaining)


def _refusal(*args, **kw) -> str:
    with pytest.raises(MemoryError) as err:
        _propose(*args, **kw)
    return str(err.value)


def _at_least(msg: str) -> int:
    return resolve_budget(re.search(rf"raise memory_budget to at least {SIZE}", msg).group(1))


class _Batches:
    """Endless minibatches of ``rows`` rows with no ``batch_size`` to read (its rows are known once read)."""

    def __init__(self, x, y, rows):
        self.x, self.y, self.rows, self.at = x, y, rows, 0

    def __iter__(self):
        return self

    def __next__(self):
        i = (torch.arange(self.rows) + self.at) % self.x.shape[0]
        self.at += self.rows
        return self.x[i], self.y[i]


@pytest.mark.parametrize("source", ["tuple", "loader 8", "loader 64", "iterator 40"])
def test_a_matrix_free_refusal_names_one_budget_that_is_then_accepted(source) -> None:
    """cg under a tiny budget named the request's floor, then at that figure one row's product ("plus Y for each
    further row"), then at that the product over its 128 rows: three refusals in a row (stop 50's probe). The
    largest need known before any work is named now, over the rows the curvature will read: a tuple's minibatches
    of 128, a DataLoader's batch size (pooled to at least 32 rows per draw), or per row where a source has no
    batch size; the figure it names is accepted."""
    model, x, y, bank = _setup()
    n = x.shape[0] - 3
    remaining = {
        "tuple": None,
        "loader 8": lambda: DataLoader(TensorDataset(x[3:], y[3:]), batch_size=8, shuffle=True),
        "loader 64": lambda: DataLoader(TensorDataset(x[3:], y[3:]), batch_size=64, shuffle=True),
        "iterator 40": lambda: _Batches(x[3:], y[3:], 40),
    }[source]
    n_remaining = n if source.startswith("iterator") else None
    before = ParamSpec.flatten_module(model).clone()
    msg = _refusal(model, x, y, bank, "cg", 1000, remaining, n_remaining)
    assert torch.equal(ParamSpec.flatten_module(model), before)
    budget = _at_least(msg)
    if source == "iterator 40":  # rows not known before they are read: one row's figure and each further row's
        per_row = resolve_budget(re.search(rf"plus {SIZE} for each further row", msg).group(1))
        assert "even over one row" in msg and "pooled to at least 32" in msg
        budget += 39 * per_row
    else:
        rows = {"tuple": 128, "loader 8": 35, "loader 64": 64}[source]  # 8: two draws' 64 rows, one more batch
        assert f"over its {rows} rows" in msg, msg
    torch.manual_seed(5)
    prop = _propose(model, x, y, bank, "cg", budget, remaining, n_remaining)
    assert torch.isfinite(prop.bank).all()


def _suggested(msg: str, budget: int) -> list[tuple[str, int]]:
    """The solvers a refusal suggests, each with the budget it says that solver needs (``budget``: fits it)."""
    out = []
    for fits in re.findall(r"or use solver=('\w+'(?: or '\w+')*)", msg):
        out += [(name, budget) for name in re.findall(r"'(\w+)'", fits)]
    out += [
        (name, resolve_budget(size))
        for name, size in re.findall(rf"solver='(\w+)' with memory_budget at least {SIZE}", msg)
    ]
    return out


@pytest.mark.parametrize("fits", ["neither", "one"])
def test_a_solver_a_memory_refusal_suggests_fits_or_is_named_with_the_budget_it_needs(fits) -> None:
    """At a budget K-FAC and cg both miss, K-FAC's refusal said "or use solver='cg'", cg's "or use solver='kfac'",
    and K-FAC's figure was rounded down ("needs about 924.6 KiB ... over the memory budget of 924.6 KiB"; stop 50).
    Each suggestion now fits the budget or names what it needs, planned as that solver plans it, and the figures
    are rounded up: following any of them is accepted."""
    model, x, y, bank = _setup()
    needs = {}
    for solver in ("cg", "kfac"):  # the figures followed from 1000 B (K-FAC: the request's floor, then its own)
        needs[solver] = 1000
        for _ in range(4):
            try:
                _propose(model, x, y, bank, solver, needs[solver])
                break
            except MemoryError as err:
                needs[solver] = _at_least(str(err))
    low, high = sorted(needs.values())
    budget = int(0.9 * low) if fits == "neither" else (low + high) // 2
    refused = [solver for solver in ("cg", "kfac") if needs[solver] > budget]
    assert len(refused) == (2 if fits == "neither" else 1)
    for solver in refused:
        msg = _refusal(model, x, y, bank, solver, budget)
        assert ("with memory_budget at least" in msg) == (fits == "neither"), msg
        other = {"cg": "kfac", "kfac": "cg"}[solver]
        follow = [(solver, _at_least(msg)), *_suggested(msg, budget)]
        assert [name for name, _ in follow[1:]] == [other], msg
        for name, need in follow:
            torch.manual_seed(5)
            prop = _propose(model, x, y, bank, name, need)  # not refused for memory
            assert torch.isfinite(prop.bank).all(), (solver, name)


def test_the_dense_refusals_name_a_budget_that_covers_the_matrices() -> None:
    """The dense solvers' refusal rounded its figure down (3.4 MiB needed, 3.4 MiB refused again) and sent the
    user to 'auto', "which plans this", which took K-FAC at a budget K-FAC did not fit either (stop 50). The figure
    is rounded up and named as the budget to set, whatever the size; no claim is made for 'auto'."""
    for hidden in range(1, 13):
        model, _, _, bank = _setup(hidden)
        need = dense_memory(ParamSpec.flatten_module(model).numel(), 4)
        for solver in ("exact", "ggn"):
            with pytest.raises(MemoryError) as err:
                MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver=solver, memory_budget=need - 1)
            msg = str(err.value)
            said = resolve_budget(re.search(rf"need {SIZE}", msg).group(1))
            assert need <= said == _at_least(msg), (hidden, msg)
            assert "'auto'" not in msg and "solver='kfac' or 'cg'" in msg
    # hessian='full', which K-FAC does not build: only CG is offered (the review of stop 50)
    with pytest.raises(MemoryError) as err:
        MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="exact", hessian="full", memory_budget=need - 1)
    assert "solver='cg'" in str(err.value) and "kfac" not in str(err.value), str(err.value)


def test_the_dense_column_refusal_over_minibatches_names_no_minibatch_and_its_figure_is_accepted() -> None:
    """The dense Hessian's column refusal said "use curvature_data='minibatch'" over minibatches already (a no-op)
    and rounded its figure down (stop 50). It suggests minibatches only over every remaining row now; its
    figure, and a suggested solver at the budget it names, are accepted."""
    model, x, y, bank = _setup(hidden=4)
    reserve = dense_memory(ParamSpec.flatten_module(model).numel(), 4)
    msg = _refusal(model, x, y, bank, "exact", reserve + 2_000, curvature_data="minibatch")
    assert msg.startswith("the dense Hessian needs") and "curvature_data='minibatch'" not in msg, msg
    follow = [("exact", _at_least(msg)), *_suggested(msg, reserve + 2_000)]
    assert {name for name, _ in follow} == {"exact", "kfac", "cg"}, msg
    for name, need in follow:
        torch.manual_seed(5)
        prop = _propose(model, x, y, bank, name, need, curvature_data="minibatch")
        assert torch.isfinite(prop.bank).all(), name


def test_a_dense_refusal_at_the_request_suggests_solvers_that_fit() -> None:
    """A dense solver whose budget was lowered after construction is refused at the request: it said "or use
    solver='kfac' or 'cg'" whatever they need; each suggestion now fits or names its budget, and is accepted."""
    model, x, y, bank = _setup(hidden=8)
    need = dense_memory(ParamSpec.flatten_module(model).numel(), 4)
    for budget in (need - 1, 300_000):
        un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="exact", memory_budget=2 * need,
                           curvature_draws=2, check_draws=2)  # fmt: skip
        un.memory_budget = budget
        with pytest.raises(MemoryError) as err:
            un.propose((x[:3], y[:3]), (x[3:], y[3:]))
        msg = str(err.value)
        assert _at_least(msg) >= need and msg.endswith("; nothing was changed"), msg
        follow = _suggested(msg, budget)
        assert {name for name, _ in follow} == {"kfac", "cg"}, msg
        for name, least in follow:
            torch.manual_seed(5)
            assert torch.isfinite(_propose(model, x, y, bank, name, least).bank).all(), (budget, name)


def test_kfac_under_a_tiny_budget_names_its_own_need_at_once() -> None:
    """K-FAC under a tiny budget named the request's floor, then at that figure its own build's need (stop 50):
    the larger, known before any work, is named at once, and that budget is accepted."""
    model, x, y, bank = _setup()
    msg = _refusal(model, x, y, bank, "kfac", 1000)
    assert msg.startswith("K-FAC needs about") and "solver='cg' with memory_budget at least" in msg, msg
    torch.manual_seed(5)
    assert torch.isfinite(_propose(model, x, y, bank, "kfac", _at_least(msg)).bank).all()
