"""Plans of the memory budget: the iterative solvers' Hessian-vector products, the dense path's item size and
column chunks, and the per-sample bank shift's copies of the bank (asserted as plans and equal results, not as
measured peaks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mcmc_unlearner.unlearner as U
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.backends import dense_memory
from mcmc_unlearner.curvature import ParamSpec, SampleAveragedHessian
from mcmc_unlearner.memory import chunk_for, format_bytes, resolve_budget


def _nll(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _data(n: int, d_in: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


def test_hessian_vector_products_are_planned_per_draw_and_summed_batch_by_batch() -> None:
    """The operator planned each draw at 3x what one call saves: a 301k-parameter MLP's 3 draws per vmapped batch
    peaked at 183 MB under a 16 MB budget (one product holds ~20-30 copies of the parameters), and the batches'
    ``[S, D]`` products were all formed before their mean. The parameters' copies are planned now, the mean summed
    batch by batch: the same products as every draw at once (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 5)).double()  # 2,437 parameters
    x, y = _data(8 * 16, 32, 5)
    theta = ParamSpec.flatten_module(model)
    S, D = 8, theta.numel()
    thetas = theta + 0.05 * torch.randn(S, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = (x.view(S, 16, 32), y.view(S, 16))
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, solver="cg", memory_budget="1GB")
    f = un._energy_f(1000)
    un._bytes_per_row(f, theta, (x[:16], y[:16]))
    whole = un._operator(f, thetas, batch, False)
    assert whole.chunk_size == S  # not binding: every draw in one batch, as before
    per = U._HVP_PRODUCT_FACTOR * un._call_cost(16) + U._HVP_D_COPIES * D * 8
    un.memory_budget = 3 * per + per // 2
    assert 3 * U._HVP_MEMORY_FACTOR * un._call_cost(16) * S < un.memory_budget  # the old plan: all 8 at once
    op = un._operator(f, thetas, batch, False)
    assert op.chunk_size == 3  # draws per batch (the old plan: 8)
    assert op.max_products == 3
    v = torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = whole @ v
    assert torch.allclose(op @ v, ref, rtol=1e-12, atol=1e-12)
    ref_sum = torch.stack([SampleAveragedHessian(f, thetas[s : s + 1], (batch[0][s : s + 1], batch[1][s : s + 1])) @ v
                           for s in range(S)]).mean(0)  # fmt: skip
    assert torch.allclose(ref, ref_sum, rtol=1e-12, atol=1e-12)
    # a [D, k] block (the per-sample shift's right-hand sides): its columns in groups within the planned products
    V = torch.randn(D, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert op._columns(4) == 1 and whole._columns(4) == 4
    assert torch.allclose(op @ V, whole @ V, rtol=1e-12, atol=1e-12)
    # all in one batch: the same numbers as the vmapped mean of every draw's product, bit for bit
    assert torch.equal(whole @ v, SampleAveragedHessian(f, thetas, batch, backend="func", chunk_size=S) @ v)


def test_auto_counts_the_dense_matrices_in_the_models_item_size() -> None:
    """``auto`` sized the dense matrices at 4 bytes a number: a 993-parameter float64 MLP took the exact path
    (47 MB of matrices over half an 80 MB budget; peak 312 MB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))  # 227 parameters
    d = sum(p.numel() for p in model.parameters())
    budget = dense_memory(d, 4) + dense_memory(d, 8)  # half of it: over float32's matrices, under float64's
    assert 2 * dense_memory(d, 4) <= budget < 2 * dense_memory(d, 8)
    assert MCMCUnlearner(model, nll=_nll, memory_budget=budget).solver.value == "exact"
    un = MCMCUnlearner(model.double(), nll=_nll, memory_budget=budget)
    assert un.solver.value == "kfac" and "over half the memory budget" in un.solver_reason


def _small_dense_problem():
    """A 63-parameter float64 MLP over 30 rows, 3 draws near its parameters, an unlearner and its energy (n = 100)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data(30, 4, 3)
    theta = ParamSpec.flatten_module(model)
    thetas = theta + 0.1 * torch.randn(
        3, theta.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    un = MCMCUnlearner(model, nll=_nll, memory_budget="1GB")
    return un, un._energy_f(100), x, y, theta, thetas


def test_dense_hessian_column_chunks_keep_a_margin_only_when_chunked(monkeypatch) -> None:
    """A chunk of columns grows glibc's heap past what it holds (2.0-2.2x its bytes, measured): when the columns
    are chunked they are planned at ``_DENSE_CHUNK_MARGIN`` times their bytes; one chunk of every column is as
    before."""
    un, f, x, y, theta, thetas = _small_dense_problem()
    d = theta.numel()
    un._bytes_per_row(f, theta, (x, y))
    seen = []
    real = U.MCMCUnlearner._dense_hessian_chunked

    def spy(self, f, thetas, batch, shared, cols, chunk_bytes):
        seen.append(cols)
        return real(self, f, thetas, batch, shared, cols, chunk_bytes)

    monkeypatch.setattr(U.MCMCUnlearner, "_dense_hessian_chunked", spy)
    H = un._dense_hessian(f, thetas, (x, y), True)
    per_col = U._HVP_MEMORY_FACTOR * un._call_cost(30)
    reserve = dense_memory(d, 8)
    un.memory_budget = reserve + 12 * per_col
    assert chunk_for(un.memory_budget, per_col, d, reserve) == 12  # the plan without the margin
    Hc = un._dense_hessian(f, thetas, (x, y), True)
    assert seen == [12 // U._DENSE_CHUNK_MARGIN]  # the first build: one chunk of every column
    assert torch.allclose(Hc, H, rtol=1e-12, atol=1e-12)


def _sample_shift_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """A float64 10-16-3 MLP (227 parameters), 300 rows and a bank of 64 samples, with the per-sample row's bytes and
    a budget that holds the ``bank_shift="sample"`` reserve and 4 samples per chunk (the sample-shift tests)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = _data(300, 10, 3)
    theta = ParamSpec.flatten_module(model)
    S, D = 64, theta.numel()
    bank = theta + 0.02 * torch.randn(S, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    row = D * 8
    budget = U.SAMPLE_SHIFT_RESERVE * (S + 1) * row + 4 * U.SAMPLE_SHIFT_COPIES * row
    return model, x, y, bank, S, row, budget


def test_sample_bank_shift_in_chunks_of_samples_equals_all_at_once_and_refuses_what_cannot_fit() -> None:
    """``bank_shift="sample"`` held ~9.5 copies of the bank unplanned (K-FAC, 64 samples of a 301k-parameter MLP:
    730 MB under a 64 MB budget, no refusal). Over the budget the samples are solved in chunks (the same shift as
    all at once, float64), and a budget that holds not even the chunks' reserve is refused before anything runs."""
    model, x, y, bank, S, row, budget = _sample_shift_problem()
    assert budget < U.SAMPLE_SHIFT_COPIES * (S + 1) * row  # not all at once

    def request(force_whole: bool):
        torch.manual_seed(5)
        un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank.clone(), solver="kfac", bank_shift="sample",
                           memory_budget=budget)  # fmt: skip
        if force_whole:
            un._sample_shift_chunk = lambda: S + 1
        return un, un.propose((x[:6], y[:6]), (x[6:], y[6:]))

    un, chunked = request(False)
    assert chunked.report.info.get("bank_shift_chunks") == 17  # 65 rows (the live draw and 64 samples) by 4
    assert un._sample_shift_chunk() == 4
    _, whole = request(True)
    assert "bank_shift_chunks" not in whole.report.info
    assert torch.allclose(chunked.bank, whole.bank, rtol=1e-10, atol=1e-12)
    assert torch.allclose(chunked.live, whole.live, rtol=1e-10, atol=1e-12)
    assert not torch.equal(chunked.bank, bank)  # it moved the samples
    small = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank.clone(), solver="kfac", bank_shift="sample",
                          memory_budget=U.SAMPLE_SHIFT_RESERVE * (S + 1) * row)  # fmt: skip
    before = ParamSpec.flatten_module(model).clone()
    with pytest.raises(MemoryError, match=r"bank_shift='sample'.*raise memory_budget.*bank_shift='mean'.*fewer"):
        small.propose((x[:6], y[:6]), (x[6:], y[6:]))
    assert torch.equal(small.bank, bank) and torch.equal(ParamSpec.flatten_module(model), before)


def test_every_row_for_the_dense_curvature_is_judged_in_the_models_item_size(monkeypatch) -> None:
    """``curvature_data`` decided whether every remaining row fits beside the dense matrices sized at 4 bytes a
    number: a float64 model took every row where its matrices alone left too little of the budget."""
    from mcmc_unlearner.stream import _Stream

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data(30, 4, 3)
    d = ParamSpec.flatten_module(model).numel()
    un = MCMCUnlearner(model, nll=_nll, solver="exact", curvature_data="full", memory_budget="1GB")
    monkeypatch.setattr(un, "_call_cost", lambda n: 1000 * n)  # a fixed cost per row: the rows' part of the plan
    rows = U._HVP_MEMORY_FACTOR * 1000 * 30
    # the rows fit beside float32's matrices, not beside float64's
    un.memory_budget = rows + (dense_memory(d, 4) + dense_memory(d, 8)) // 2
    assert rows <= un.memory_budget - dense_memory(d, 4) and rows > un.memory_budget - dense_memory(d, 8)
    info: dict = {}
    with pytest.warns(UserWarning, match="all rows do not fit the memory budget"):
        _, every_row = un._curvature_data(_Stream((x, y), 30), 30, 2, info)
    assert not every_row and "do not fit the memory budget" in info["curvature_data"]
    un.memory_budget = rows + dense_memory(d, 8)  # with room for float64's matrices: every row
    _, every_row = un._curvature_data(_Stream((x, y), 30), 30, 2, info)
    assert every_row and info["curvature_data"] == "full"


def test_dense_matrix_of_the_operator_takes_its_columns_within_max_products() -> None:
    """``SampleAveragedHessian.dense()`` vmapped 256 columns at every draw of a batch whatever ``max_products``
    said: a 1,221-parameter MLP's 4 draws over 2,000 rows grew the heap by 2.8 GB with ``max_products=4`` (217 MB
    with one column at a time). Its columns are now grouped as a ``[D, k]`` product's are: the same matrix, bit for
    bit where every column fits at once."""
    _, f, x, y, theta, thetas = _small_dense_problem()
    d = theta.numel()

    def dense(**kw):
        op = SampleAveragedHessian(f, thetas, (x, y), shared_args=True, backend="func", **kw)
        calls, matvec = [], op.matvec
        op.matvec = lambda v: calls.append(1) or matvec(v)  # one call per block of columns (vmapped over them)
        return op.dense(), len(calls)

    whole, n_whole = dense(chunk_size=3)
    fits, n_fits = dense(chunk_size=3, max_products=3 * d)
    assert n_whole == n_fits == 1 and torch.equal(fits, whole)
    one, n_one = dense(chunk_size=1, max_products=1)
    assert n_one == d  # one column (at one draw) at a time
    assert torch.allclose(one, whole, rtol=1e-12, atol=1e-12)


def test_removed_rows_nll_check_runs_in_passes_that_fit_the_budget_with_the_same_verdicts() -> None:
    """Every request checked ``nll`` on all its removed rows in one forward pass (50,000 rows of a CNN at once,
    unplanned). The rows now go in passes of as many as fit the budget (each at its bytes per row; the last pass
    as full as the others), and every verdict and message is the one the single pass gave (a failure in any pass
    before a wrong shape, shapes given for all the rows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data(43, 4, 3)
    bad_label = y.clone()
    bad_label[-1] = 7
    seen: list[int] = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    nlls = {
        "per row": _nll,
        "mean": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        "per output": lambda m, b: (m(b[0]) - b[1][:, None]) ** 2,
    }

    def verdict(nll, budget, batch, request=False):
        un = MCMCUnlearner(model, nll=nll, log_prior=_lp, bank=ParamSpec.flatten_module(model)[None].clone(),
                           memory_budget="1GB")  # fmt: skip
        if not request:
            un._row_bytes, un._call_bytes = 1000, 500
        un.memory_budget = budget
        seen.clear()
        try:
            un.propose(batch, (x, y)) if request else un._check_nll(batch)
        except Exception as e:  # the verdict compared
            return (type(e).__name__, str(e)), list(seen)
        return None, list(seen)

    small = 500 + 8 * 1000  # 8 rows a pass
    for name, nll in nlls.items():
        for batch in ((x, y), (x, bad_label)):
            whole, one_pass = verdict(nll, 2**30, batch)
            chunked, passes = verdict(nll, small, batch)
            assert one_pass == [43] and chunked == whole, name
            # every pass of the check 8 rows (the last as full as the others); where the verdict is a wrong shape,
            # one call on 7 rows after them reads how the shape changes with the rows, for the message (stop 49)
            assert passes[:6] == [8] * 6 and passes[6:] in ([], [7]), (name, passes)
    assert verdict(_nll, small, (x, y))[1] == [8] * 6  # every row read: 0, 8, ..., 32 and the last 8 (35-42)
    assert "got [43, 3]" in verdict(nlls["per output"], small, (x, y))[0][1]
    assert verdict(_nll, small, (x, bad_label))[0][0] == "IndexError"
    # a request: the same refusal before anything runs (the rows' bytes not yet measured: 64 times their inputs)
    whole, _ = verdict(nlls["mean"], 2**30, (x, y), request=True)
    chunked, passes = verdict(nlls["mean"], 8 * 64 * (4 * 8 + 8), (x, y), request=True)
    assert chunked == whole and "one value per row" in whole[1] and passes == [8] * 6 + [7]  # + the message's call


@pytest.mark.parametrize("solver", ["cg", "lissa", "lowrank"])
def test_matrix_free_solvers_refuse_a_budget_below_one_product_and_change_nothing(solver, monkeypatch) -> None:
    """Below one draw's planned product the matrix-free solvers still ran, one draw at a time over the budget (a
    301k-parameter MLP under 16 MB: a 44.4 MB product plan). Refused now, naming the plan over the rows the
    curvature will read (rows given as a tuple: minibatches of 128), the budget and the fixes, before any work
    (below one row's product too: it named one row's figure, and that figure was refused again; stop 50), the bank
    and the model as they were. The plan itself fits and runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))  # 676 parameters
    x, y = _data(200, 16, 4)
    x = x.float()
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.01 * torch.randn(6, theta.numel(), generator=torch.Generator().manual_seed(1))
    plans = []
    real_plan = MCMCUnlearner._operator_plan

    def product(un, rows):  # one draw's planned product (_operator_plan)
        return U._HVP_PRODUCT_FACTOR * un._call_cost(rows) + U._HVP_D_COPIES * theta.numel() * 4

    def spy(self, thetas, rows):
        plans.append((rows, product(self, rows)))
        return real_plan(self, thetas, rows)

    monkeypatch.setattr(MCMCUnlearner, "_operator_plan", spy)

    kw = dict(nll=_nll, log_prior=_lp, bank=bank, solver=solver, curvature_draws=2, check_draws=2)
    kw.update({} if solver == "lowrank" else {"iter_T": 5})

    def request(budget):
        torch.manual_seed(5)
        un = MCMCUnlearner(model, memory_budget=budget, **kw)
        return un, un.propose((x[:3], y[:3]), (x[3:], y[3:]))

    un, _ = request("1GB")
    (rows, need), one_row = plans[-1], product(un, 1)
    assert rows == 128 and need > one_row > un._request_floor()
    for budget in (one_row - 1, need - 1):
        un = MCMCUnlearner(model, memory_budget=budget, **kw)
        before, calls = ParamSpec.flatten_module(model).clone(), len(plans)
        with pytest.raises(MemoryError) as err:
            un.propose((x[:3], y[:3]), (x[3:], y[3:]))
        msg = str(err.value)
        assert (
            f"solver={solver!r}: one Hessian-vector product at one draw needs {U.format_bytes(need, up=True)} over "
            f"its {rows} rows (the remaining rows given as a tuple are read in minibatches of 128)" in msg
        )
        assert (
            f"memory budget of {U.format_bytes(budget)}: raise memory_budget to at least "
            f"{U.format_bytes(need, up=True)}" in msg
        )  # rounded up: a budget of the figure named covers the plan (stop 49)
        assert resolve_budget(msg.split("to at least ")[1].split(",")[0]) >= need
        assert "solver='kfac'" in msg and msg.endswith("; nothing was changed")
        assert torch.equal(un.bank, bank) and torch.equal(ParamSpec.flatten_module(model), before)
        assert len(plans) == calls  # refused before the curvature (no operator planned)
    _, prop = request(need)  # the plan itself fits: one draw per batch, one product at a time
    assert plans[-1] == (rows, need) and torch.isfinite(prop.bank).all()


def test_an_at_least_figure_is_rounded_up_so_that_the_budget_it_names_is_enough() -> None:
    """The refusals' "raise memory_budget to at least X" rounded X to the nearest tenth of its unit, so a budget of
    X could be refused again ("needs 118.8 KiB ... over the memory budget of 118.8 KiB": 121,652 bytes read as
    121,651; stop 49's probe, cg on a GRU). X is now rounded up: the budget it names always covers the need, and
    stays within a tenth of its unit of it."""
    g = torch.Generator().manual_seed(0)
    sizes = [121_652, 1023, 1024, 1025, 512 * 237, 2**20 + 1, 3 * 2**30 + 7]
    sizes += [int(v) for v in torch.randint(1, 2**40, (500,), generator=g)]
    for n in sizes:
        said = format_bytes(n, up=True)
        unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[said.split()[1]]
        assert n <= resolve_budget(said) < n + max(unit // 10, 1) + 1, (n, said)
    assert resolve_budget(format_bytes(121_652)) < 121_652  # the old rounding, for the record
    assert format_bytes(121_652, up=True) == "118.9 KiB" and format_bytes(121_652) == "118.8 KiB"


def test_the_shape_a_pass_reports_is_the_shape_of_all_the_rows() -> None:
    """The check of ``nll`` in passes quoted a pass's shape where one dimension was not the leading one: a label
    column broadcast to ``[B, B]`` read ``[3001, 355]``, ``[1, B]`` read ``[1, 325]``, two terms concatenated
    ``[2B]`` read ``[650]`` (stop 49's probe; one pass said ``[3001, 3001]``, ``[1, 3001]``, ``[6002]``); mapping
    the pass's size by value then read ``[B, 3]`` in passes of 3 as ``[43, 43]`` and a batch mean of 16 values in
    passes of 8 as ``[86]`` (the review). The message, which names the ``[B, B]`` broadcast as the thing to look
    for, is now the single pass's, whatever the passes' size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = _data(43, 4, 3)
    y = y.double()
    nlls = {
        "[B, B]": lambda m, b: (m(b[0]).squeeze(1) - b[1][:, None]) ** 2,
        "[1, B]": lambda m, b: ((m(b[0]).squeeze(1) - b[1]) ** 2)[None],
        "[2B]": lambda m, b: torch.cat([(m(b[0]).squeeze(1) - b[1]) ** 2, m(b[0]).squeeze(1).abs()]),
    }
    nlls["[B, 3]"] = lambda m, b: (m(b[0]) - b[1][:, None]).repeat(1, 3) ** 2  # 3 values per row
    nlls["mean over the batch"] = lambda m, b: (m(b[0]).squeeze(1) ** 2).mean(0, keepdim=True).repeat(16)
    want = {"[B, B]": "got [43, 43]", "[1, B]": "got [1, 43]", "[2B]": "got [86]", "[B, 3]": "got [43, 3]"}
    want["mean over the batch"] = "got [16]"

    def message(nll, budget):
        un = MCMCUnlearner(model, nll=nll, log_prior=_lp, bank=ParamSpec.flatten_module(model)[None].clone(),
                           memory_budget="1GB")  # fmt: skip
        un._row_bytes, un._call_bytes = 1000, 500
        un.memory_budget = budget
        with pytest.raises(ValueError) as err:
            un._check_nll((x, y))
        return str(err.value)

    for name, nll in nlls.items():
        whole = message(nll, 2**30)  # one pass
        assert want[name] in whole, (name, whole)
        for rows in (8, 3):  # passes of 8 and of 3 rows, the size of [B, 3]'s other dimension
            assert message(nll, 500 + rows * 1000) == whole, (name, rows)


def test_report_info_memory_gives_the_budget_and_what_each_planning_path_planned(monkeypatch) -> None:
    """``report.info["memory"]``: the budget, each planning path's largest plan in this request (the per-draw
    gradients and the safety check, as their own planners return them), their largest, and what the plans leave
    out; a second request's figures are its own."""
    x, y = _data(200, 5, 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    grads, checks = [], []
    real_grad, real_check = U.MCMCUnlearner._grad_plan, U.MCMCUnlearner._check_plan

    def grad_plan(self, *a, **k):
        out = real_grad(self, *a, **k)
        grads.append(out[2])
        return out

    def check_plan(self, thetas, rows, held=0):
        out = real_check(self, thetas, rows, held)
        K, D = thetas.shape
        per = U._HVP_MEMORY_FACTOR * self._call_cost(rows)
        assert out["row_chunk"] is None  # every row at once at this budget
        # held: the copies of the check's draws it holds meanwhile (planned with it since stop 59)
        checks.append(held + U.CHECK_D_COPIES * K * D * thetas.element_size() + out["chunk"] * per)
        return out

    monkeypatch.setattr(U.MCMCUnlearner, "_grad_plan", grad_plan)
    monkeypatch.setattr(U.MCMCUnlearner, "_check_plan", check_plan)
    budget = 64 * 2**20
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, memory_budget=budget)
    report = un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    memory = report.info["memory"]
    assert memory["budget"] == budget
    assert grads and checks
    assert memory["planned"]["gradients"] == max(grads) and memory["planned"]["check"] == max(checks)
    assert memory["planned_peak"] == max(memory["planned"].values()) <= budget
    assert "[S, D]" in memory["not_planned"]
    S, D = len(bank), un.spec.dim  # this request's bytes per [S, D] copy, not a fixed example's
    assert format_bytes(S * D * 8) in memory["not_planned"] and f"S = {S}, D = {D:,}" in memory["not_planned"]
    assert "2.5-3 GB" not in memory["not_planned"]
    grads.clear()
    second = un.remove((x[10:12], y[10:12]), (x[12:], y[12:])).info["memory"]
    assert second["planned"]["gradients"] == max(grads)


@pytest.mark.parametrize("solver", ["cg", "exact", "kfac"])
def test_report_info_memory_counts_the_curvature_plans_that_ran(monkeypatch, solver: str) -> None:
    """The curvature's own plans are in ``planned`` and so in ``planned_peak``: cg's Hessian-vector products (draws
    per batch · one product's bytes; 13.1 MB on a 10→256→3 MLP were left out of a 5.5 MB peak), the exact path's
    dense matrices and column chunks, and the K-FAC build's minibatch."""
    from mcmc_unlearner.kronecker import KroneckerCurvature

    x, y = _data(300, 10, 3)
    x = x.float()
    torch.manual_seed(0)
    width = 32 if solver == "exact" else 256
    model = nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 3))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(6)]
    seen: dict[str, int] = {}
    real_op = U.MCMCUnlearner._operator_plan

    def op_plan(self, thetas, rows):
        draws, products = real_op(self, thetas, rows)
        per = self._product_bytes(rows, thetas.shape[1], thetas.element_size())
        seen["hessian_products"] = max(seen.get("hessian_products", 0), draws * per)
        return draws, products

    real_estimate = KroneckerCurvature.memory_estimate

    def estimate(model, thetas, batch, **kw):
        out = real_estimate(model, thetas, batch, **kw)
        seen["kfac_build"] = out(batch[0].shape[0])  # the whole minibatch: it fits this budget
        return out

    monkeypatch.setattr(U.MCMCUnlearner, "_operator_plan", op_plan)
    monkeypatch.setattr(KroneckerCurvature, "memory_estimate", staticmethod(estimate))
    budget = 64 * 2**20
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver=solver, seed=0, memory_budget=budget)
    memory = un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False).info["memory"]
    planned, D = memory["planned"], un.spec.dim
    if solver == "cg":
        assert seen["hessian_products"] > 2 * 2**20  # larger than the gradients' and the check's plans here
        assert planned["hessian_products"] == seen["hessian_products"]
    elif solver == "exact":
        assert planned["dense_matrices"] == dense_memory(D, 4) > 2**20
        assert dense_memory(D, 4) < planned["dense_hessian"] <= budget
    else:
        assert planned["kfac_build"] == seen["kfac_build"] > 0
    assert memory["planned_peak"] == max(planned.values()) >= max(seen.get(k, 0) for k in planned)


def test_report_info_memory_records_looped_gradients_one_draw_at_a_time(monkeypatch) -> None:
    """Per-draw gradients looped one draw at a time (``backend="autograd"``) are recorded as one draw beside the
    reserve, not as the chunk of several draws the planner sized (it recorded all 8 draws: 255,736 bytes for
    38,260 held)."""
    x, y = _data(300, 10, 3)
    x = x.float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 3))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    looped, recorded = [], []
    real_looped, real_plan = U.MCMCUnlearner._looped_grads, U.MCMCUnlearner._plan

    def looped_grads(self, f, thetas, batch, reserve):
        _, _, chunk_bytes, per_draw = self._grad_plan(thetas, batch[0].shape[0], True, reserve)
        looped.append((reserve + per_draw, chunk_bytes))
        return real_looped(self, f, thetas, batch, reserve)

    def plan(self, path, nbytes):
        recorded.append((path, nbytes))
        return real_plan(self, path, nbytes)

    monkeypatch.setattr(U.MCMCUnlearner, "_looped_grads", looped_grads)
    monkeypatch.setattr(U.MCMCUnlearner, "_plan", plan)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="kfac", seed=0, backend="autograd")
    un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False)
    assert looped
    for one, chunk_bytes in looped:
        assert one < chunk_bytes  # the planner's chunk is of several draws here
        assert ("gradients", one) in recorded and ("gradients", chunk_bytes) not in recorded


def test_report_info_memory_counts_the_kfac_trace_probes() -> None:
    """K-FAC's ``scale`` (the ``damping_shape="data"`` solve's ``tr K / D``) records the probes and one product's
    copies of the columns it multiplies at once (``kfac_probes``, as ``_probe_columns`` plans them) in the
    request's plans: all four columns at the request's budget, one at a time at a tight one."""
    from mcmc_unlearner.backends.kfac import SCALE_PROBES, scale_probe_bytes

    x, y = _data(120, 6, 3)
    x = x.float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="kfac", damping_shape="data", seed=0)
    un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False)
    backend, column = un.curvature, un.spec.dim * 4
    for budget, cols in ((backend._budget, SCALE_PROBES), (scale_probe_bytes(column, 1), 1)):
        un._planned.clear()
        backend._pending, backend._scale, backend._probes, backend._n = (backend.kfac, backend.age), None, None, 110
        backend._budget = budget
        backend.scale()
        planned = un._memory_info()["planned"]
        assert planned["kfac_probes"] == scale_probe_bytes(column, cols) <= budget


@pytest.mark.filterwarnings("ignore:this request removes")
def test_report_info_memory_counts_the_sample_shift_and_the_emptied_label_draw() -> None:
    """``bank_shift="sample"``'s copies (the reserve and a chunk of 4 samples, as ``_sample_shift_chunk`` plans
    them) and the emptied-label draw's features (``resample_label_rows``'s ``held``) are among the request's
    plans; neither was recorded."""
    model, x, y, bank, _, _, budget = _sample_shift_problem()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="kfac", bank_shift="sample",
                       memory_budget=budget)  # fmt: skip
    memory = un.propose((x[:6], y[:6]), (x[6:], y[6:])).report.info["memory"]
    assert memory["planned"]["sample_shift"] == budget  # the reserve and 4 samples' copies: all of it
    assert memory["planned_peak"] >= budget

    from mcmc_unlearner.emptied import RESAMPLE_SLICE_TRIES, RESAMPLE_STEPS
    from test_emptied_label import _softmax_regression

    model, nll, log_prior, bank, x, y = _softmax_regression(seed=1)
    gone = y >= 2
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, damping=100.0)
    report = un.propose((x[gone], y[gone]), (x[~gone], y[~gone])).report
    assert report.info["emptied_label_resample"] == "drawn: 2,3"
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    # a chunk of samples at once (all 12 of the bank here): per sample its float64 features (d = inputs + bias) and
    # their weighted copy, its logits, 8 working vectors, the slice steps' 4 and 3 per angle they try at once beyond
    # the first, and its chain's random numbers; beside them one sample's features and logits as the model computes
    # them (float64 here)
    n, d, C = int((~gone).sum()), head.in_features + 1, head.out_features
    per = 8 * (n * (2 * d + C + 12 + 3 * (RESAMPLE_SLICE_TRIES - 1)) + RESAMPLE_STEPS * (d + 1))
    held = 8 * n * (d + C) + len(bank) * per
    assert report.info["memory"]["planned"]["emptied_label_resample"] == held
    assert report.info["memory"]["planned_peak"] >= held


def test_report_info_memory_counts_the_ggn_jacobian_chunks(monkeypatch) -> None:
    """``solver="ggn"``'s per-row Jacobian chunks (``output_ggn``, planned against a quarter of the budget) are in
    ``planned`` and so in ``planned_peak``: 1.35 MB on a 5-16-3 float64 MLP were left out of a 1.04 MB peak."""
    import mcmc_unlearner.backends.ggn as G

    x, y = _data(200, 5, 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    seen: list[int] = []
    real = G.chunk_for

    def spy(budget: int, per: int, n: int, *a: object) -> int:
        out = real(budget, per, n, *a)
        seen.append(out * per)
        return out

    monkeypatch.setattr(G, "chunk_for", spy)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="ggn", seed=0, memory_budget=64 * 2**20)
    memory = un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False).info["memory"]
    assert seen and memory["planned"]["ggn_jacobians"] == max(seen) > memory["planned"]["dense_matrices"]
    assert memory["planned_peak"] == max(memory["planned"].values()) >= max(seen)
