"""The faithful paper baseline (experiments/paper.py) against closed forms on the conjugate linear regression.

The model is linear-Gaussian, so every Hessian is the constant ``A = I/σ_p² + XᵀX/σ²`` (per chain) and the
gradient of the removed points' NLL is affine in θ. With a vanishing sampler step size the chains do not move
during a request, and LiSSA's ``iter_T`` rounds with the exact Hessian give, per chain,
``x = s·Σ_{k=0}^{T} (I − s·A)^k G``: the closed form the procedure must reproduce (exactly with full batches,
within Monte-Carlo error with minibatches). The reference keeps the removed points in the data and scales the
energy to the count before removal, so ``A`` is the FULL-data precision; removing the ids first would give the
remaining-data precision instead, which these tests tell apart.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mcmc_unlearner import SGHMC, SGLD, InvalidRequestError, RemovableDataset, SolverDivergedError
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.experiments.paper import (
    FMNIST_REFERENCE,
    GMM_REFERENCE,
    PaperUnlearner,
    paper_forget,
)
from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior

N, DIM, REMOVED, CHAINS = 400, 3, 40, 8


def _problem(seed: int = 0):
    """Rows with the largest ‖x‖ are scaled up and corrupted, then removed: their share of XᵀX (≈ 30%) is far
    from their share of the rows (10%), so neither 'remaining Hessian' nor 'remaining Hessian rescaled to n'
    can pass for the full-data Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    y = x @ torch.randn(DIM, generator=g, dtype=torch.float64) + torch.randn(N, generator=g, dtype=torch.float64)
    removed = torch.argsort(x.norm(dim=1), descending=True)[:REMOVED]
    x[removed] *= 1.5
    y[removed] += 3.0
    return x, y, removed


def _chain(x, y, seed: int = 1, lr: float = 1e-20, sampler: str = "sgld"):
    model = MultiChainLinearRegression(CHAINS, DIM, n=N).double()
    m, c = exact_posterior(x, y)
    model.start_at(m, c, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    opt = (
        SGLD(model.parameters(), lr=lr, generator=gen)
        if sampler == "sgld"
        else SGHMC(model.parameters(), lr=lr, alpha=0.9, generator=gen)
    )
    return model, opt


def _lissa_closed_form(A: torch.Tensor, G: torch.Tensor, s: float, T: int) -> torch.Tensor:
    """``s·Σ_{k=0}^{T} (I − sA)^k G`` for the columns of ``G`` ([d, C])."""
    M = torch.eye(A.shape[0], dtype=A.dtype) - s * A
    term, total = G.clone(), G.clone()
    for _ in range(T):
        term = M @ term
        total = total + term
    return s * total


def _expected(x, y, removed, w: torch.Tensor, s: float, T: int, which: str) -> torch.Tensor:
    """Closed-form per-chain LiSSA shift ``[C, d]`` with the full-data or the remaining-data Hessian."""
    keep = torch.ones(N, dtype=torch.bool)
    keep[removed] = False
    rows = x if which == "full" else x[keep]
    A = torch.eye(DIM, dtype=torch.float64) + rows.T @ rows
    xr, yr = x[removed], y[removed]
    G = xr.T @ (xr @ w.T - yr[:, None])  # ∇ Σ_r ½(y − xᵀw)² per chain
    return _lissa_closed_form(A, G, s, T).T


def test_full_batch_shift_equals_full_data_lissa_closed_form() -> None:
    x, y, removed = _problem()
    model, opt = _chain(x, y)
    data = RemovableDataset(x, y, batch_size=N, seed=0)  # full batches: every HVP is exact
    w0 = model.w.detach().clone()
    init, T = 0.5, 64
    out = paper_forget(model, opt, data, removed, iter_T=T, samp_T=2, init_scaling=init)
    assert out["scaling"] == pytest.approx(init / N)  # from the count BEFORE removal
    assert out["n_before"] == N and out["n_after"] == N - REMOVED and len(data) == N - REMOVED
    assert model.n == N - REMOVED
    moved = model.w.detach() - w0
    full = _expected(x, y, removed, w0, init / N, T, "full")
    rem = _expected(x, y, removed, w0, init / N, T, "remaining")
    rem_n = _expected(x, y, removed, w0, init / (N - REMOVED), T, "remaining")
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # T rounds reach the fixed point H⁻¹G of the full-data Hessian
    A = torch.eye(DIM, dtype=torch.float64) + x.T @ x
    fixed = torch.linalg.solve(A, x[removed].T @ (x[removed] @ w0.T - y[removed][:, None])).T
    assert rel(full, fixed) < 1e-6
    assert rel(moved, full) < 1e-6
    # the sampler noise (130 steps of ~1e-10) is all that separates the returned shift from the movement
    assert torch.allclose(out["shift"].view(CHAINS, DIM), moved, rtol=0, atol=1e-7)
    # removing the ids before the solve (today's benchmark until this change) gives a clearly different shift
    assert rel(rem, full) > 0.2 and rel(rem_n, full) > 0.2
    assert rel(moved, rem) > 0.2 and rel(moved, rem_n) > 0.2


def test_ids_removed_before_the_solve_would_fail_the_closed_form() -> None:
    """The order-of-operations check is sharp: the same procedure with the ids removed first (n and scaling set
    to the remaining count, as the old benchmark did) lands on the remaining-data closed form instead."""
    x, y, removed = _problem()
    model, opt = _chain(x, y)
    data = RemovableDataset(x, y, batch_size=N, seed=0)
    w0 = model.w.detach().clone()
    data.remove(removed)  # the deviation
    keep_x, keep_y = data.remaining()
    # a data set holding only the remaining rows; the request's rows appended at the end so their ids exist
    alt = RemovableDataset(torch.cat([keep_x, x[removed]]), torch.cat([keep_y, y[removed]]), batch_size=N, seed=0)
    new_ids = torch.arange(N - REMOVED, N)
    alt.remove(new_ids)
    # emulate the deviating order with the library's pieces: scaling from the remaining count, solve without them
    from mcmc_unlearner.experiments.paper import _ReferenceUnlearner

    un = _ReferenceUnlearner(model=model, optimizer=opt, params=list(model.parameters()), iter_T=64, samp_T=2)
    un.nll = lambda m, b: m.nll(b)
    un.energy = lambda m, b, n: m.nll(b).sum() * (n / b[0].shape[0]) - m.log_prior()
    un.n = N - REMOVED
    un.param_dict["scaling"] = 0.5 / (N - REMOVED)
    un.remove([x[removed], y[removed]], alt)
    moved = model.w.detach() - w0
    full = _expected(x, y, removed, w0, 0.5 / N, 64, "full")
    assert float((moved - full).norm() / full.norm()) > 0.2


@pytest.mark.parametrize("sampler", ["sgld", "sghmc"])
def test_minibatch_shift_matches_closed_form_within_monte_carlo_error(sampler: str) -> None:
    """With minibatches of 50, each product is a noisy but unbiased estimate of the full-data Hessian's; over
    independent repetitions the mean error of the shift is within 4 standard errors of zero, while the
    remaining-data closed form is many standard errors away."""
    x, y, removed = _problem()
    errs, gaps = [], []
    for rep in range(12):
        model, opt = _chain(x, y, seed=10 + rep, sampler=sampler)
        data = RemovableDataset(x, y, batch_size=50, seed=100 + rep)
        w0 = model.w.detach().clone()
        paper_forget(model, opt, data, removed, iter_T=64, samp_T=1, init_scaling=0.5)
        moved = model.w.detach() - w0
        full = _expected(x, y, removed, w0, 0.5 / N, 64, "full")
        rem = _expected(x, y, removed, w0, 0.5 / N, 64, "remaining")
        scale = full.norm(dim=1, keepdim=True)
        errs.append(((moved - full) / scale).mean(0))  # per-coordinate relative error, averaged over chains
        gaps.append(((rem - full) / scale).mean(0))
    e = torch.stack(errs)
    mean, se = e.mean(0), e.std(0) / e.shape[0] ** 0.5
    assert (mean.abs() <= 4 * se + 1e-3).all(), (mean, se)
    gap = torch.stack(gaps).mean(0)
    assert (gap.abs() > 8 * se).any(), (gap, se)


class _Counting(RemovableDataset):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.draws = 0

    def __next__(self):
        self.draws += 1
        return super().__next__()


def test_sampler_step_and_product_draw_separate_minibatches() -> None:
    """Reference lines 134–155: samp_T draws for G, then per round and repetition one draw for the sampler step and
    another for the Hessian-vector product."""
    x, y, removed = _problem()
    model, opt = _chain(x, y)
    data = _Counting(x, y, batch_size=50, seed=0)
    out = paper_forget(model, opt, data, removed[:4], iter_T=7, samp_T=3, init_scaling=0.5)
    assert data.draws == 3 + 7 * 3 * 2
    assert out["sampler_steps"] == 3 * (1 + 7) and out["hessian_products"] == 21


def test_step_size_rescaling_and_bank_shift() -> None:
    x, y, removed = _problem()
    model, opt = _chain(x, y, lr=1e-6)
    bank = torch.randn(5, CHAINS * DIM, dtype=torch.float64)
    before = bank.clone()
    lr0 = opt.param_groups[0]["lr"]
    pu = PaperUnlearner(model, opt, **FMNIST_REFERENCE.kwargs() | {"iter_T": 8}, bank=bank)
    data = RemovableDataset(x, y, batch_size=50, seed=0)
    out = pu.forget(removed[:10], data)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * N / (N - 10))  # BNN/forget.py line 215
    assert torch.equal(bank, before)  # the class keeps its own copy
    assert torch.allclose(pu.bank - before, out["shift"].expand_as(before), rtol=0, atol=1e-12)
    # GMM settings: no rescaling; the functional form shifts the caller's bank in place
    model2, opt2 = _chain(x, y, lr=1e-6)
    paper_forget(model2, opt2, RemovableDataset(x, y, batch_size=50), removed[:4], bank=bank, **GMM_REFERENCE.kwargs())
    assert opt2.param_groups[0]["lr"] == lr0
    assert not torch.equal(bank, before)


def _state(model, opt, data, bank):
    return {
        "w": model.w.detach().clone(),
        "grad": None if model.w.grad is None else model.w.grad.clone(),
        "opt": copy.deepcopy(opt.state_dict()),
        "gen": opt.generator.get_state(),
        "rng": torch.get_rng_state(),
        "data": data.state_dict(),
        "bank": bank.clone(),
        "n": model.n,
        "training": model.training,
    }


def _assert_same(a, b) -> None:
    for k in a:
        if k == "opt":
            assert a[k]["param_groups"] == b[k]["param_groups"]
            for i in a[k]["state"]:
                for name, t in a[k]["state"][i].items():
                    assert torch.equal(t, b[k]["state"][i][name]), (k, name)
        elif k == "data":
            for name in a[k]:
                assert torch.equal(a[k][name], b[k][name]), (k, name)
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_refused_request_leaves_everything_bit_identical() -> None:
    x, y, removed = _problem()
    model, opt = _chain(x, y, lr=1e-5, sampler="sghmc")
    data = RemovableDataset(x, y, batch_size=50, seed=0)
    bank = torch.randn(4, CHAINS * DIM, dtype=torch.float64)
    for _ in range(3):  # a velocity, gradients and a partly consumed shuffled pass
        opt.zero_grad()
        model.F(next(data)).backward()
        opt.step()
    model.eval()
    before = _state(model, opt, data, bank)
    twin = (copy.deepcopy(model), copy.deepcopy(opt), copy.deepcopy(data), bank.clone())
    with pytest.raises(SolverDivergedError, match="scaling"):
        paper_forget(model, opt, data, removed, iter_T=32, samp_T=2, init_scaling=50.0, bank=bank, rescale_lr=True)
    _assert_same(before, _state(model, opt, data, bank))
    with pytest.raises(InvalidRequestError):
        paper_forget(model, opt, data, [N + 5], iter_T=4, samp_T=1, init_scaling=0.5, bank=bank)
    _assert_same(before, _state(model, opt, data, bank))
    # the next request gives exactly what it gives on a twin that never saw the refused ones
    torch.set_rng_state(before["rng"])
    out = paper_forget(model, opt, data, removed[:8], iter_T=8, samp_T=1, init_scaling=0.5, bank=bank)
    m2, o2, d2, b2 = twin
    o2.generator = torch.Generator().set_state(before["gen"])
    torch.set_rng_state(before["rng"])
    # deepcopy of an optimizer does not rebind it to the copied parameters: make a fresh one on m2
    o3 = SGHMC(m2.parameters(), lr=1e-5, alpha=0.9, generator=o2.generator)
    o3.load_state_dict(before["opt"])
    out2 = paper_forget(m2, o3, d2, removed[:8], iter_T=8, samp_T=1, init_scaling=0.5, bank=b2)
    assert torch.equal(model.w.detach(), m2.w.detach())
    assert torch.equal(bank, b2) and torch.equal(out["shift"], out2["shift"])
    assert not model.training  # the previous mode is restored after a request


def test_bad_settings_are_refused_before_any_work() -> None:
    x, y, _ = _problem()
    model, opt = _chain(x, y)
    w = model.w.detach().clone()
    with pytest.raises(ValueError, match="init_scaling"):
        PaperUnlearner(model, opt, iter_T=4, samp_T=1, init_scaling=float("nan"))
    with pytest.raises(ValueError, match="iter_T"):
        PaperUnlearner(model, opt, iter_T=0, samp_T=1, init_scaling=1.0)
    assert torch.equal(model.w.detach(), w)


def test_flat_shift_follows_the_parameter_layout() -> None:
    """The returned shift is in ParamSpec's flat layout, so it applies to banks collected with collect()."""
    x, y, removed = _problem()
    model, opt = _chain(x, y)
    w0 = ParamSpec.flatten_module(model)
    out = paper_forget(model, opt, RemovableDataset(x, y, batch_size=N), removed[:5], iter_T=4, samp_T=1,
                       init_scaling=0.5)  # fmt: skip
    assert torch.allclose(ParamSpec.flatten_module(model) - w0, out["shift"], rtol=0, atol=1e-9)
