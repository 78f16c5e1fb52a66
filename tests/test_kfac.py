"""The K-FAC backend in the unlearner against the dense Newton step (the factors themselves: test_kronecker.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.models.bnn import build_model


def test_kfac_solver_in_the_unlearner_tracks_the_exact_newton_step() -> None:
    """On a softmax regression (650 parameters) the K-FAC step points where the dense Newton step points."""
    from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
    from mcmc_unlearner.image_data import load_dataset
    from mcmc_unlearner.samplers import run_chain

    ds = load_dataset("digits", seed=0)
    x, y = ds.x_train[:400], ds.y_train[:400]
    torch.manual_seed(0)
    model = build_model("mlp", ds.in_shape, ds.n_classes, prior_std=0.3, hidden=())
    data = RemovableDataset(x, y, batch_size=100, seed=0)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler)
    run_chain(model, sampler, data, un.energy, 300, len(data))
    bank = run_chain(model, sampler, data, un.energy, 40, len(data), keep_every=5)
    removed = torch.nonzero(y == 3).flatten()[:20]
    shifts, reports = {}, {}
    for solver in ("exact", "kfac"):
        d = RemovableDataset(x, y, batch_size=100, seed=0)
        u = MCMCUnlearner(model, bank=bank, solver=solver, curvature_draws=4, curvature_data="full")
        reports[solver] = u.forget(removed, d)
        shifts[solver] = (u.bank - bank).mean(0)
    a, b = shifts["exact"], shifts["kfac"]
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert cosine > 0.9, cosine
    assert 0.5 < float(b.norm() / a.norm()) < 2.0
    assert reports["kfac"].solver == "kfac" and reports["kfac"].residual < 1.0


def test_kfac_curvature_does_not_depend_on_how_often_nll_calls_the_model():
    torch.manual_seed(0)
    n, d, k = 400, 5, 3.0
    X = torch.randn(n, d)
    eta = X @ torch.tensor([1.0, -0.5, 0.3, 0.0, 0.8]) * 0.7 + 0.2
    Y = torch.distributions.Gamma(torch.full((n,), k), k / torch.exp(eta)).sample()

    def two_calls(m, b):
        return k * (b[1] * torch.exp(-m(b[0]).squeeze(-1)) + m(b[0]).squeeze(-1))

    def one_call(m, b):
        o = m(b[0]).squeeze(-1)
        return k * (b[1] * torch.exp(-o) + o)

    def lp(m):
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    m = nn.Linear(d, 1)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = one_call(m, (X, Y)).sum() - lp(m)
        loss.backward()
        return loss

    opt.step(closure)
    bank = [{kk: v + 0.03 * torch.randn_like(v) for kk, v in m.state_dict().items()} for _ in range(100)]
    forget = torch.argsort(X[:, 0], descending=True)[:40]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    shifts = []
    for nll in (one_call, two_calls):
        un = MCMCUnlearner(m, None, nll=nll, log_prior=lp, bank=bank, solver="kfac", damping=0.0)
        shifts.append(un.remove((X[forget], Y[forget]), (X[keep], Y[keep])).shift_norm)
    # was 0.0411 (one call) against 0.0051 (two calls): the duplicate call counted as a second location
    assert abs(shifts[1] - shifts[0]) <= 1e-3 * shifts[0]


def _scale_problem(hidden: int) -> MCMCUnlearner:
    """A K-FAC unlearner on a 6-``hidden``-3 tanh MLP after one request of 10 rows (the ``scale`` tests' setup)."""
    torch.manual_seed(0)
    x, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]

    def nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    def log_prior(m: nn.Module) -> torch.Tensor:
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, solver="kfac", damping_shape="data")
    un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    return un


def test_kfac_scale_draws_its_probes_in_the_working_dtype_with_the_same_numbers(monkeypatch) -> None:
    """``KFACBackend.scale``'s Rademacher probes are drawn in the working dtype (``torch.randint`` returned int64,
    then ``* 2 - 1`` made more int64 copies: 1 GiB beside a 256 MiB float32 probe matrix on a 4096² Linear), and
    ``tr K / D`` is the int64-drawn probes' to the bit (the damping search starts where it did)."""
    un = _scale_problem(hidden=8)
    backend = un.curvature
    backend._pending, backend._scale, backend._probes, backend._n = (backend.kfac, backend.age), None, None, 110
    drawn = []
    real = torch.randint

    def spy(*a, **kw):
        out = real(*a, **kw)
        drawn.append(out.dtype)
        return out

    monkeypatch.setattr(torch, "randint", spy)
    scale = backend.scale()
    monkeypatch.setattr(torch, "randint", real)
    assert drawn == [torch.float32], drawn  # no int64 probe matrix
    k = backend.kfac
    z = (torch.randint(0, 2, (k.dim, 4), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
    k.n = 0.0
    prior = float((z * (k @ z)).sum())
    k.n = 1.0
    per_row = float((z * (k @ z)).sum()) - prior
    k.n = 110
    assert scale == (110 * per_row + prior) / float((z * z).sum())


def test_kfac_scale_rotates_each_probe_chunk_into_the_eigenbases_once(monkeypatch) -> None:
    """``scale``'s two products with a chunk of probe columns (``zᵀPz`` at ``n = 0``, then ``zᵀ(K₁ + P)z``) share
    the chunk's eigenbasis coordinates: one rotation a chunk, not two (stop 70: one of the first request's four
    rotations of the 1.2M-parameter ResNet's probes), to the bit of the products taken one at a time with every
    cached coordinate dropped between them (the estimate before); no more is cached during the second product than
    the chunk's coordinates (the dead first product's dropped), and nothing after; the same at a tight budget."""
    from mcmc_unlearner.backends import kfac as kfac_module
    from mcmc_unlearner.kronecker import KroneckerCurvature

    un = _scale_problem(hidden=32)
    backend = un.curvature
    k = backend.kfac
    column = k.dim * 4
    real_coords, real_matmul = KroneckerCurvature._coords, KroneckerCurvature.__matmul__
    misses, held = [], []

    def coords(self, v):
        misses.append(self._lookup(v) is None)
        return real_coords(self, v)

    def matmul(self, v):
        held.append(len([e for e in self._cache if e[0]() is not None]))
        return real_matmul(self, v)

    for budget, products in ((backend._budget, 2), (kfac_module.scale_probe_bytes(column, 1), 8)):
        backend._pending, backend._scale, backend._probes, backend._n = (k, backend.age), None, None, 110
        backend._budget = budget
        k._cache = []
        misses.clear()
        held.clear()
        monkeypatch.setattr(KroneckerCurvature, "_coords", coords)
        monkeypatch.setattr(KroneckerCurvature, "__matmul__", matmul)
        scale = backend.scale()
        monkeypatch.setattr(KroneckerCurvature, "_coords", real_coords)
        monkeypatch.setattr(KroneckerCurvature, "__matmul__", real_matmul)
        assert misses == [True, False] * (products // 2)  # each chunk rotated once, its second product cached
        assert held == [0, 1] * (products // 2)  # the second product: the chunk's coordinates alone
        assert not [e for e in k._cache if e[0]() is not None] and len(k._cache) == 0
        # the estimate before: every product from scratch (its coordinates dropped after it), chunk by chunk
        z = torch.randint(0, 2, (k.dim, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 2 - 1
        cols = 4 if products == 2 else 1
        sums = []
        for n in (0.0, 1.0):
            k.n, total = n, 0.0
            for j in range(0, 4, cols):
                zc = z if cols == 4 else z[:, j : j + cols].contiguous()
                total += float((zc * (k @ zc)).sum())
                k.forget(zc)
            sums.append(total)
        k.n = 110
        assert scale == (110 * (sums[1] - sums[0]) + sums[0]) / float((z * z).sum())


def test_kfac_scale_multiplies_its_probes_a_few_columns_at_a_time_where_all_do_not_fit(monkeypatch) -> None:
    """Where the four probe columns and a product's copies of them do not fit the memory budget, ``scale`` takes
    the products a column at a time, within the budget (a 4096² Linear's four at once grew the resident set by
    1270 MiB under a 1 GiB budget), and estimates the same ``tr K / D`` to rounding; at the request's budget it
    takes all four at once, as before."""
    from mcmc_unlearner.backends import kfac as kfac_module
    from mcmc_unlearner.kronecker import KroneckerCurvature

    un = _scale_problem(hidden=32)
    backend = un.curvature
    widths = []
    real = KroneckerCurvature.__matmul__
    monkeypatch.setattr(KroneckerCurvature, "__matmul__", lambda k, v: widths.append(v.shape[1]) or real(k, v))
    scales, seen = {}, {}
    column = backend.kfac.dim * 4
    for budget in (backend._budget, kfac_module.scale_probe_bytes(column, 1)):
        backend._pending, backend._scale, backend._probes, backend._n = (backend.kfac, backend.age), None, None, 110
        backend._budget = budget
        widths.clear()
        scales[budget] = backend.scale()
        seen[budget] = list(widths)
        cols = widths[0]
        assert kfac_module.scale_probe_bytes(column, cols) <= budget
    first, tight = scales
    assert seen[first] == [4, 4]  # the request's budget: all four at once, for zᵀPz and zᵀK₁z
    assert seen[tight] == [1] * 8  # one column a time: four products for each
    assert scales[tight] == pytest.approx(scales[first], rel=1e-6)
