"""What a request reusing its curvature spends besides the model's own passes (issue 11, the 1.2M-parameter ResNet):
the removed rows' gradient looped over draws read from the bank in place and summed as it comes, the check's prior
evaluated once per moved draw. Each against a float64 reference (the same numbers) and the work or memory saved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.step import EnergyCheck
from mcmc_unlearner.unlearner import GRAD_COPIES, GRAD_SAVED_FACTOR, _BankRows, _evenly
from test_memory import _MEASURE, _measured
from test_step import _blr_check_parts


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _mlp_and_bank(draws: int, spread: float = 0.05) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    theta = ParamSpec.flatten_module(model)
    return model, theta + spread * torch.randn(draws, theta.numel(), dtype=torch.float64)


def test_looped_removed_rows_gradient_reads_the_bank_in_place_and_equals_the_mean_of_every_draw() -> None:
    """One draw at a time (``backend="autograd"``), ``G`` and its half difference over the bank's evenly spaced
    draws read in place equal those over their copy (to rounding: a row of the bank sits at another alignment than
    the copy's, which BLAS kernels may round differently), and the float64 mean of every draw's gradient and half
    the difference of the halves' means; rows split by a tight budget give the same numbers."""
    model, bank = _mlp_and_bank(20)
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    un = MCMCUnlearner(model, nll=_nll, bank=bank, backend="autograd", memory_budget="1GB")
    h = un._h_f()
    un._bytes_per_row(h, bank[0], (x, y))
    index = _evenly(20, 16)
    rows = _BankRows(bank, index)
    assert [torch.equal(a, b) for a, b in zip(rows, bank[index])] == [True] * 16
    G, dev = un._grad_means(h, rows, (x, y))
    Gc, devc = un._grad_means(h, bank[index], (x, y))
    grads = torch.stack([torch.func.grad(lambda t: h(t, x, y))(t) for t in bank[index]])
    scale = float(grads.norm(dim=1).mean())
    assert float((G - Gc).norm()) <= 1e-13 * scale and float((dev - devc).norm()) <= 1e-13 * scale
    assert float((G - grads.mean(0)).norm()) <= 1e-13 * scale
    assert float((dev - 0.5 * (grads[:8].mean(0) - grads[8:].mean(0))).norm()) <= 1e-13 * scale
    reserve = 2 * bank.shape[1] * 8  # the two half sums
    un.memory_budget = reserve + GRAD_COPIES * bank.shape[1] * 8 + GRAD_SAVED_FACTOR * un._call_cost(7)
    assert un._grad_plan(rows, 30, True, reserve)[1] == 7  # seven rows at a time
    Gs, devs = un._grad_means(h, rows, (x, y))
    assert float((Gs - G).norm()) <= 1e-13 * scale and float((devs - dev).norm()) <= 1e-13 * scale


def test_a_request_over_identical_draws_read_in_place_has_no_error_bar() -> None:
    """``G``'s draws all one sample (16 evenly spaced of 20, the other four differing) leave no second draw to
    estimate its Monte-Carlo error from: the report's ``shift_stderr`` is NaN, also when they are read from the bank
    in place (looped, fewer than the bank); distinct draws give a finite one."""
    x, y = torch.randn(60, 6, dtype=torch.float64), torch.randint(0, 3, (60,))
    errs = {}
    for spread in (0.0, 0.05):
        model, bank = _mlp_and_bank(20, spread)
        others = torch.ones(20, dtype=torch.bool)
        others[_evenly(20, 16)] = False
        assert int(others.sum()) == 4
        bank[others] += 0.05 * torch.randn(4, bank.shape[1], dtype=torch.float64)
        un = MCMCUnlearner(
            model, None, nll=_nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
            bank=bank, backend="autograd", grad_draws=16, recenter_every=0,
        )  # fmt: skip
        rep = un.remove((x[:6], y[:6]), (x[6:], y[6:]))
        assert rep.n_draws == 16
        errs[spread] = rep.shift_stderr
    assert math.isnan(errs[0.0])
    assert math.isfinite(errs[0.05]) and errs[0.05] > 0


def test_a_difference_check_evaluates_the_prior_three_times_per_moved_draw() -> None:
    """One draw at a time the prior's remainder reads ``log p(θ_s)`` kept at the start and the prior change reads
    the remainder's ``log p(θ_s + x)``: per measurement three evaluations per draw (``θ + x``, ``θ ± εx``), not
    five, and the measurement is the closed form's (linear-Gaussian regression, float64)."""
    f, lp, rows, n, thetas, G = _blr_check_parts(4)
    calls: list[int] = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return lp(t)

    K = thetas.shape[0]
    check = EnergyCheck(f, counted, thetas, rows, n, G, vectorise=False, linear="difference")
    H_r = torch.eye(3, dtype=torch.float64) + rows[0].T @ rows[0]
    for i, x in enumerate((torch.tensor([0.01, 0.02, -0.03]), torch.tensor([1.0, -2.0, 0.5]))):
        x = x.double()
        m = check(x)
        assert len(calls) == K + 3 * K * (i + 1)
        assert m.actual == pytest.approx(-float(G @ x) + 0.5 * float(x @ H_r @ x), rel=1e-9, abs=1e-9)
        prior_change = float(torch.stack([-lp(t + x) + lp(t) for t in thetas]).mean())
        assert m.prior_per_row * n == pytest.approx(prior_change, rel=1e-12, abs=1e-15)


def test_looped_removed_rows_gradient_never_holds_every_draws_gradient() -> None:
    """One draw at a time, ``G`` and its error are summed draw by draw: a request's peak stays far below the
    ``[S, D]`` gradients (64 draws of an 85k-parameter MLP, 22 MB) that were formed, copied and averaged whatever
    the budget (here 1 GB)."""
    out = _measured(_MEASURE, "means", str(10**9), "autograd", timeout=120)  # test_memory's child, a 1 GB budget
    assert out["peak"] <= 0.25 * out["draws_bytes"], f"peak {out['peak'] / 1e6:.1f} MB"


def test_the_equilibrium_gradient_takes_every_draws_prior_at_once() -> None:
    """``newton_steps``' equilibrium gradient ``E_s[∇F(θ_s, S∖S')]`` over many draws: the prior's gradients come
    from one vectorised call, not one autograd call per draw (the GMM demo's 200 requests of 256 draws spent a
    fifth of their time there), and the value is the per-draw float64 reference's."""
    model, bank = _mlp_and_bank(64)
    torch.manual_seed(1)
    rows = (torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 3, (50,)))
    n = 500
    calls: list[int] = []

    def prior(m: nn.Module) -> torch.Tensor:
        calls.append(1)
        return -0.5 * sum((p**2).sum() for p in m.parameters()) / 0.3**2

    un = MCMCUnlearner(model, None, nll=_nll, log_prior=prior, bank=bank)
    calls.clear()  # the constructor's own probes of the prior
    got = un._equilibrium_gradient(un._energy_f(n), bank, rows, n)
    assert len(calls) <= 2, f"the prior was evaluated {len(calls)} times for 64 draws"

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def energy(theta: torch.Tensor) -> torch.Tensor:  # float64, every parameter a view of theta
        views, i = {}, 0
        for k, shape in zip(names, shapes):
            views[k] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        logits = torch.func.functional_call(model, views, (rows[0],))
        nll = nn.functional.cross_entropy(logits, rows[1], reduction="sum")
        return n / 50 * nll + 0.5 * theta.pow(2).sum() / 0.3**2

    ref = torch.stack([torch.func.grad(energy)(theta) for theta in bank])
    torch.testing.assert_close(got, ref.mean(0), rtol=1e-10, atol=1e-10)
    one = un._equilibrium_gradient(un._energy_f(n), bank[:1], rows, n)  # one draw: the loop kept as it was
    torch.testing.assert_close(one, ref[0], rtol=1e-10, atol=1e-10)


def _dense_case(rows: int = 40, draws: int = 6) -> tuple[MCMCUnlearner, object, torch.Tensor, tuple]:
    """A float32 MLP (179 parameters), its row-summed NLL, ``draws`` nearby draws and ``rows`` shared rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    theta = ParamSpec.flatten_module(model)
    thetas = theta + 0.05 * torch.randn(draws, theta.numel(), generator=torch.Generator().manual_seed(1))
    batch = (torch.randn(rows, 6), torch.randint(0, 3, (rows,)))
    un = MCMCUnlearner(model, nll=_nll, memory_budget="1GB")
    h = un._h_f()
    un._bytes_per_row(h, theta, batch)
    return un, h, thetas, batch


def test_dense_hessian_over_shared_rows_is_built_a_draw_at_a_time_with_the_same_numbers(monkeypatch) -> None:
    """Over rows every draw shares (the removed rows, every remaining row) the dense Hessian is built one draw at a
    time into the chunk's ``[k, D, D]`` and summed as the vmapped chunk was: the same numbers, bit for bit, as all
    the draws at once (which left the cache: a 467-parameter MLP's 16 draws over 80 rows, 0.73 s against 0.18 s),
    and as before with draws chunked by a tight budget; per-draw rows (``shared=False``) stay batched."""
    import mcmc_unlearner.unlearner as U

    un, h, thetas, batch = _dense_case()
    S, d = thetas.shape
    every = torch.func.vmap(torch.func.jacrev(torch.func.grad(h)), in_dims=(0, None, None))
    ref = (torch.zeros(d, d) + every(thetas, *batch).sum(0)) / S  # the former build: every draw in one call
    sizes: list[int] = []
    real_vmap = U.vmap

    def spy(fn, in_dims=0, *a, **k):
        inner = real_vmap(fn, in_dims, *a, **k)

        def run(*args):
            sizes.append(int(args[0].shape[0]))
            return inner(*args)

        return run

    monkeypatch.setattr(U, "vmap", spy)
    monkeypatch.setattr(U, "_DENSE_DRAW_LOOP_BYTES", 0, raising=False)
    H = un._dense_hessian(h, thetas, batch, True)
    assert sizes == [1] * S
    assert torch.equal(H, ref)
    # a tight budget: two draws a chunk, each chunk's sum added as before
    per_draw = U._HVP_MEMORY_FACTOR * un._call_cost(batch[0].shape[0]) * d
    un.memory_budget = U.dense_memory(d, 4) + 2 * per_draw
    ref2 = torch.zeros(d, d)
    for s0 in range(0, S, 2):
        ref2 += every(thetas[s0 : s0 + 2], *batch).sum(0)
    sizes.clear()
    assert torch.equal(un._dense_hessian(h, thetas, batch, True), ref2 / S)
    assert sizes == [1] * S
    # per-draw rows: one call over every draw, as before
    un.memory_budget = 2**30
    sizes.clear()
    stacked = tuple(t.expand(S, *t.shape) for t in batch)
    un._dense_hessian(h, thetas, stacked, False)
    assert sizes == [S]


def test_small_dense_hessian_builds_leave_the_heap_alone(monkeypatch) -> None:
    """Handing the heap's free pages back (~1 ms a call, 2-3% of a GMM demo request) is skipped around a dense
    Hessian build planned within a sixteenth of the budget, and done (before and after) around a larger one."""
    import mcmc_unlearner.unlearner as U

    un, h, thetas, batch = _dense_case()
    calls: list[int] = []
    monkeypatch.setattr(U, "release_free_heap", lambda: calls.append(1) or True)
    H = un._dense_hessian(h, thetas, batch, True)
    assert calls == []
    d = thetas.shape[1]
    un.memory_budget = U.dense_memory(d, 4) + thetas.shape[0] * U._HVP_MEMORY_FACTOR * un._call_cost(40) * d
    assert torch.equal(un._dense_hessian(h, thetas, batch, True), H)  # one chunk of every draw, as before
    assert calls == [1, 1]


def test_dense_transport_reuses_the_requests_eigendecompositions_and_drops_them_with_the_request(monkeypatch) -> None:
    """``bank_shift="affine"``'s transport took the eigendecomposition of ``A_new`` again (prepare had it) and both
    again when the undamped transport was retried with damping. Each is taken once a request: the transport equals
    one from fresh decompositions, and the next request (other rows, another Hessian) does not see the last one's."""
    from types import SimpleNamespace

    from mcmc_unlearner.backends import DenseBackend

    un, h, thetas, batch = _dense_case()
    real = torch.linalg.eigh

    def reference(b: DenseBackend, damping: float) -> torch.Tensor:
        def sym_pow(M: torch.Tensor, p: float) -> torch.Tensor:
            w, V = real(M.double())
            return (V * (w + damping) ** p) @ V.T

        return (sym_pow(b.A_new, -0.5) @ sym_pow(b.old_hessian(), 0.5)).to(b.A_new.dtype)

    def energy(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return h(t, x, y) + 100.0 * (t**2).sum()

    counted: list[int] = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda M: counted.append(1) or real(M))
    b = DenseBackend()
    for k, rows in enumerate([tuple(t[:20] for t in batch), tuple(t[20:] for t in batch)]):
        problem = SimpleNamespace(
            dim=thetas.shape[1], thetas=thetas, n=100, hessian="remaining", budget=2**30, removed=rows, batch=rows,
            shared=True, energy_f=energy, nll_f=h, dense_hessian=un._dense_hessian,
        )  # fmt: skip
        counted.clear()
        b.prepare(problem)
        T0, T1 = b.transport(0.0), b.transport(0.5)
        assert len(counted) == 2, k  # A_new's (prepare's) and the old Hessian's, once each
        assert torch.equal(T0, reference(b, 0.0)) and torch.equal(T1, reference(b, 0.5)), k
        b.commit()


def test_the_second_measurements_further_samples_are_read_in_place_beyond_a_share_of_the_budget() -> None:
    """The safety net's second measurement may read every other stored sample: copied where the copy takes at most a
    quarter of the memory budget, read in place (no copy) beyond it, with the same samples; and the measurement over
    them (``EnergyCheck.confirm``) is the copy's to rounding."""
    from mcmc_unlearner.unlearner import FURTHER_COPY_SHARE, _further_samples

    f, lp, rows, n, thetas, G = _blr_check_parts(12)
    index = torch.tensor([1, 4, 6, 9, 11])
    need = index.numel() * thetas.shape[1] * thetas.element_size()
    copied = _further_samples(thetas, index, FURTHER_COPY_SHARE * need)
    assert isinstance(copied, torch.Tensor) and torch.equal(copied, thetas[index])
    assert copied.data_ptr() != thetas.data_ptr()
    in_place = _further_samples(thetas, index, FURTHER_COPY_SHARE * need - 1)
    assert isinstance(in_place, _BankRows) and len(in_place) == index.numel()
    assert all(r.data_ptr() == thetas[i].data_ptr() for r, i in zip(in_place, index.tolist()))  # views: no copy
    x = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    results = []
    for more in (copied, in_place):
        check = EnergyCheck(f, lp, thetas[:4], tuple(t[:60] for t in rows), n, G)
        check.confirm_thetas = lambda more=more: more
        results.append(check.confirm(x))
    (c1, se1, m1, k1), (c2, se2, m2, k2) = results
    assert (m1, k1) == (m2, k2) == (60, 4 + index.numel())
    assert c2 == pytest.approx(c1, rel=1e-12) and se2 == pytest.approx(se1, rel=1e-9)
