"""K-FAC on a Gaussian whose variance the model learns (``F.gaussian_nll_loss`` on a mean and a variance head):
the Gaussian's Fisher ``∇m∇mᵀ/v + ∇v∇vᵀ/(2v²)`` in the output, against dense float64 forms (stop 69; it was the
empirical Fisher, gradients at the true targets)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.kronecker import KroneckerCurvature, Likelihood, learned_variance

D64 = torch.float64


def _softplus_head(z: torch.Tensor, b: tuple) -> torch.Tensor:
    var = F.softplus(z[:, 1]) + 1e-3
    return F.gaussian_nll_loss(z[:, 0], b[1], var, full=True, reduction="none")


def _log_variance(z: torch.Tensor, b: tuple) -> torch.Tensor:  # written out, variance exp(z₁), full=False
    return 0.5 * z[:, 1] + 0.5 * (b[1] - z[:, 0]) ** 2 * torch.exp(-z[:, 1])


# name: (per-row loss of the output z and batch b, mean and variance of z)
LINKS: dict[str, tuple[Callable, Callable]] = {
    "softplus": (_softplus_head, lambda z: (z[:, 0], F.softplus(z[:, 1]) + 1e-3)),
    "log variance": (_log_variance, lambda z: (z[:, 0], torch.exp(z[:, 1]))),
}


def _setup(rows: int, seed: int, loss: Callable):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, dtype=D64, generator=g)
    y = torch.randn(rows, dtype=D64, generator=g) + 2.0  # misfit rows: the empirical Fisher differs more

    def nll(m, b):
        return loss(m(b[0]), b)

    return model, nll, (x, y)


def _output_fisher(z: torch.Tensor, moments: Callable) -> torch.Tensor:
    """``[B, 2, 2]``: ``∇m∇mᵀ/v + ∇v∇vᵀ/(2v²)`` in the output ``z``, row by row (autograd, float64)."""
    out = []
    for r in range(z.shape[0]):
        zr = z[r : r + 1].detach().requires_grad_(True)
        m, v = moments(zr)
        dm = torch.autograd.grad(m.sum(), zr, retain_graph=True)[0][0]
        dv = torch.autograd.grad(v.sum(), zr)[0][0]
        vr = float(v.detach())
        out.append(torch.outer(dm, dm) / vr + torch.outer(dv, dv) / (2 * vr**2))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(LINKS))
def test_kfac_on_one_row_is_the_dense_gaussian_fisher_of_a_learned_variance(name: str) -> None:
    """One row at one linear layer: K-FAC is ``Jᵀ F J`` with the Gaussian's Fisher ``F`` exactly (before: the
    empirical Fisher, ``Jᵀ r rᵀ J`` with the output gradient ``r`` at the true target)."""
    loss, moments = LINKS[name]
    model, nll, batch = _setup(1, 0, loss)
    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=1, nll=nll)
    assert K.info["likelihood"] == "gaussian" and "likelihood_fallback" not in K.info
    assert K.info["likelihood_detected"] == {"variance": "learned"} and K.info["sigma"] is None
    out = functionalize(model, lambda m, x: m(x))
    J = jacobian(lambda t: out(t, batch[0])[0], theta)  # [2, D]
    Fz = _output_fisher(out(theta, batch[0]), moments)[0]
    torch.testing.assert_close(K @ torch.eye(K.dim, dtype=D64), J.T @ Fz @ J, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", list(LINKS))
def test_kfac_on_many_rows_is_the_kronecker_form_of_the_gaussian_fisher(name: str) -> None:
    """Twelve rows at one linear layer, two draws: ``K = P + n·A ⊗ G`` with ``A`` the mean of the inputs' (with a
    one for the bias) outer products and ``G`` the mean of the rows' output Fisher ``F_r`` over rows and draws (the
    exact GGN's Kronecker-factored form); the prior precision ``P = I``."""
    loss, moments = LINKS[name]
    model, nll, batch = _setup(12, 1, loss)
    theta = ParamSpec.flatten_module(model)
    thetas = theta + 0.1 * torch.randn(2, theta.numel(), dtype=D64, generator=torch.Generator().manual_seed(2))
    n = 30
    K = KroneckerCurvature.build(
        model,
        thetas,
        [batch, batch],
        n=n,
        nll=nll,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
    )
    assert K.info["likelihood"] == "gaussian"
    out = functionalize(model, lambda m, x: m(x))
    G = torch.stack([_output_fisher(out(t, batch[0]), moments).mean(0) for t in thetas]).mean(0)  # [2, 2]
    a = torch.cat([batch[0], torch.ones(12, 1, dtype=D64)], 1)
    A = a.T @ a / 12  # [5, 5]
    # the weight W[o, i] is θ[4o + i], the bias b[o] θ[8 + o]: W̃ = [W | b] at W̃[o, i], o-major
    order = [4 * o + i if i < 4 else 8 + o for o in range(2) for i in range(5)]
    ref = torch.zeros(10, 10, dtype=D64)
    ref[torch.tensor(order)[:, None], torch.tensor(order)[None, :]] = n * torch.kron(G, A)
    ref += torch.eye(10, dtype=D64)
    torch.testing.assert_close(K @ torch.eye(K.dim, dtype=D64), ref, rtol=1e-7, atol=1e-10)


def test_only_a_normalised_gaussian_in_the_target_is_read_as_one() -> None:
    """Scaled by 2 (its Fisher is not the Gaussian's), without the log-variance term, or a Student-t: none is read
    as a learned-variance Gaussian (K-FAC keeps the empirical Fisher and says so); ``full=False`` is."""
    model, _, batch = _setup(8, 3, _softplus_head)

    def wrap(loss: Callable) -> Callable:
        return lambda m, b: loss(m(b[0]), b)

    assert learned_variance(model, wrap(_softplus_head), batch) == {"variance": "learned"}
    assert learned_variance(model, wrap(_log_variance), batch) == {"variance": "learned"}

    def partial(z, b):
        return F.gaussian_nll_loss(z[:, 0], b[1], F.softplus(z[:, 1]) + 1e-3, full=False, reduction="none")

    assert learned_variance(model, wrap(partial), batch) == {"variance": "learned"}
    others = {
        "scaled": lambda z, b: 2 * _softplus_head(z, b),
        "no log term": lambda z, b: 0.5 * (b[1] - z[:, 0]) ** 2 * torch.exp(-z[:, 1]),
        "student-t": lambda z, b: 2.5 * torch.log1p((b[1] - z[:, 0]) ** 2 * torch.exp(-z[:, 1]) / 4) + 0.5 * z[:, 1],
    }
    theta = ParamSpec.flatten_module(model)
    for name, loss in others.items():
        assert learned_variance(model, wrap(loss), batch) is None, name
        K = KroneckerCurvature.build(model, theta[None], [batch], n=8, nll=wrap(loss))
        assert K.info["likelihood"] == "empirical" and "likelihood_fallback" in K.info, name


@pytest.mark.parametrize("name", list(LINKS))
def test_the_dense_ggn_of_a_learned_variance_is_the_gaussian_fisher(name: str) -> None:
    """``solver="ggn"``'s ``Σ_r J_rᵀ Λ_r J_r`` with ``Λ_r`` the Gaussian's Fisher, on a hidden-layer network (before:
    the dense Hessian of ``nll``)."""
    from mcmc_unlearner.backends.ggn import output_ggn

    loss, moments = LINKS[name]
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 4, dtype=D64, generator=g), torch.randn(7, dtype=D64, generator=g)

    def nll(m, b):
        return loss(m(b[0]), b)

    theta = ParamSpec.flatten_module(model)
    link = learned_variance(model, nll, (x, y))
    assert link == {"variance": "learned"}
    got = output_ggn(model, theta, x, Likelihood.GAUSSIAN, link=link, nll=nll, targets=y)
    out = functionalize(model, lambda m, x: m(x))
    Fz = _output_fisher(out(theta, x), moments)
    ref = sum(
        J.T @ F_r @ J for J, F_r in zip((jacobian(lambda t, r=r: out(t, x[r : r + 1])[0], theta) for r in range(7)), Fz)
    )
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)


def _ggn_request():
    """A ``solver="ggn"`` request of 3 rows on a learned-variance network (``_softplus_head``); its unlearner and
    report."""
    from mcmc_unlearner import MCMCUnlearner

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(30, 4, dtype=D64, generator=g), torch.randn(30, dtype=D64, generator=g)

    def nll(m, b):
        return _softplus_head(m(b[0]), b)

    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.05 * torch.randn(4, theta.numel(), dtype=D64, generator=g)
    un = MCMCUnlearner(
        model, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, solver="ggn"
    )
    return un, un.remove((x[:3], y[:3]), (x[3:], y[3:]), strict=False)


def test_solver_ggn_takes_the_gaussian_fisher_of_a_learned_variance() -> None:
    """``solver="ggn"`` on ``F.gaussian_nll_loss``: the Gauss-Newton matrix with the Gaussian's Fisher (before: the
    dense Hessian of ``nll``, ``ggn_curvature == "hessian"``)."""
    _, report = _ggn_request()
    assert report.info["ggn_curvature"] == "ggn" and report.info["ggn_likelihood"] == "gaussian"
    assert report.info["ggn_likelihood_detected"] == {"variance": "learned"}


def test_the_dense_ggn_reads_every_field_and_the_outputs_shape() -> None:
    """An ``nll`` reading a third field (a per-row variance floor) on a ``[B, 2, 1]`` output: ``solver="ggn"`` called
    it on ``(x, y)`` alone (IndexError) and on the output flattened to ``[B, 2]`` (IndexError); now the Gaussian's
    Fisher, against the dense float64 form (stop 69's review)."""
    from mcmc_unlearner import MCMCUnlearner
    from mcmc_unlearner.backends.ggn import output_ggn

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2), nn.Unflatten(1, (2, 1))).double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(30, 4, dtype=D64, generator=g), torch.randn(30, dtype=D64, generator=g)
    floor = torch.rand(30, dtype=D64, generator=g) + 0.1

    def nll(m, b):
        z = m(b[0])
        return F.gaussian_nll_loss(z[:, 0, 0], b[1], F.softplus(z[:, 1, 0]) + b[2], reduction="none")

    batch = (x, y, floor)
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.05 * torch.randn(4, theta.numel(), dtype=D64, generator=g)
    prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731
    un = MCMCUnlearner(model, nll=nll, log_prior=prior, bank=bank, solver="ggn")
    report = un.remove(tuple(t[:3] for t in batch), tuple(t[3:] for t in batch), strict=False)
    assert report.info["ggn_curvature"] == "ggn" and report.info["ggn_likelihood_detected"] == {"variance": "learned"}
    rows = tuple(t[:9] for t in batch)
    link = learned_variance(model, nll, rows)
    got = output_ggn(model, theta, x[:9], Likelihood.GAUSSIAN, budget=4096, link=link, nll=nll, targets=rows[1:])
    out = functionalize(model, lambda m, x: m(x).reshape(len(x), -1))
    zs = out(theta, x[:9])
    Fz = [_output_fisher(zs[r : r + 1], lambda z, r=r: (z[:, 0], F.softplus(z[:, 1]) + floor[r]))[0] for r in range(9)]
    ref = sum(
        J.T @ F_r @ J for J, F_r in zip((jacobian(lambda t, r=r: out(t, x[r : r + 1])[0], theta) for r in range(9)), Fz)
    )
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)


class _SharedLogVariance(nn.Module):
    """A mean head and one learned log-variance for every row (homoscedastic): ``[B, 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 1).double()
        self.log_var = nn.Parameter(torch.tensor([-0.5], dtype=D64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body(x), self.log_var.expand(len(x), 1)], 1)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_scaled_nll_with_one_variance_on_every_row_is_not_read_as_the_gaussian(factor: float) -> None:
    """``k·gaussian_nll_loss`` with a variance equal on every probe row is ``N(m, v/k)`` in ``y`` on those rows and
    passed the constant-across-rows check: its variance term read as ``1/k`` of the NLL's Fisher. The constant is
    checked again on the output shifted by ½ (the variance moves): read as not this likelihood, K-FAC the empirical
    Fisher; the unscaled NLL on the same model still reads as the Gaussian (stop 69's review)."""
    torch.manual_seed(8)
    model = _SharedLogVariance()
    g = torch.Generator().manual_seed(8)
    batch = (torch.randn(12, 4, dtype=D64, generator=g), torch.randn(12, dtype=D64, generator=g))

    def plain(m, b):
        z = m(b[0])
        return F.gaussian_nll_loss(z[:, 0], b[1], z[:, 1].exp(), full=True, reduction="none")

    def scaled(m, b):
        return factor * plain(m, b)

    assert learned_variance(model, plain, batch) == {"variance": "learned"}
    assert learned_variance(model, scaled, batch) is None
    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=12, nll=scaled)
    assert K.info["likelihood"] == "empirical" and "likelihood_fallback" in K.info


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_nll_reduced_over_the_rows_is_not_a_learned_variance(reduction: str) -> None:
    """``learned_variance`` (public) on an ``nll`` returning one number for the batch: ``None``, as its docstring
    says for anything else (it raised IndexError on the 0-dim constant, stop 69's review)."""
    model, _, batch = _setup(8, 4, _softplus_head)

    def nll(m, b):
        z = m(b[0])
        return F.gaussian_nll_loss(z[:, 0], b[1], F.softplus(z[:, 1]) + 1e-3, reduction=reduction)

    assert learned_variance(model, nll, batch) is None


def test_the_removed_rows_ggn_of_a_learned_variance_is_each_draws_gaussian_fisher(monkeypatch) -> None:
    """The removed rows' GGN at every draw together (``output_ggn_draws``, stop 69's cut of the CNN flow's upkeep)
    knows no learned variance: it would take ``J/σ²``. A learned-variance request keeps the per-draw Gaussian Fisher:
    the same request with every draw's GGN formed one at a time (``same=False``) gives the same bank to the bit."""
    from mcmc_unlearner.backends import ggn

    together = _ggn_request()[0].bank.clone()
    one_at_a_time = ggn.GGNBackend._ggn
    monkeypatch.setattr(
        ggn.GGNBackend, "_ggn", lambda self, p, b, w, same=False: one_at_a_time(self, p, b, w, same=False)
    )
    torch.testing.assert_close(_ggn_request()[0].bank, together, rtol=0, atol=0)


def _huber(m, b):
    return F.huber_loss(m(b[0])[:, 0], b[1], delta=5.0, reduction="none")


def _huber_case(inside: int):
    """A 4-6-2 tanh network in float64 and 60 rows whose first ``inside`` residuals are 0.01 (inside the Huber loss's
    quadratic zone) and the rest 6 (past ``delta=5``); a bank of 4 around the network."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 4, dtype=D64, generator=g)
    with torch.no_grad():
        y = model(x)[:, 0]
    y[:inside] += 0.01 * torch.randn(inside, dtype=D64, generator=g)
    y[inside:] += 6.0 * torch.sign(torch.randn(60 - inside, dtype=D64, generator=g))
    theta = ParamSpec.flatten_module(model)
    return model, x, y, theta + 0.01 * torch.randn(4, theta.numel(), dtype=D64, generator=g)


def _ggn_and_exact(model, x, y, bank) -> tuple[dict, dict]:
    """The first 10 rows removed under ``solver="ggn"`` and ``"exact"``: the banks and the ggn request's info."""
    from mcmc_unlearner import MCMCUnlearner

    banks, infos = {}, {}
    for solver in ("ggn", "exact"):
        un = MCMCUnlearner(
            model, nll=_huber, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank.clone(),
            solver=solver,
        )  # fmt: skip
        report = un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False)
        assert report.problems == [], (solver, report.problems)
        banks[solver], infos[solver] = un.bank, dict(report.info, shift_norm=report.shift_norm)
    return banks, infos["ggn"]


def test_a_gaussian_read_on_the_removed_rows_only_is_checked_on_the_remaining_rows() -> None:
    """``solver="ggn"`` read the learned-variance Gaussian on the removed rows alone: a Huber loss (``delta=5``) whose
    removed rows sit inside its quadratic zone reads as a Gaussian of variance 1 there, and on remaining rows past the
    zone its variance read as ``∞``: a NaN Gauss-Newton matrix, the request refused as "non-finite entries ... overflow"
    (stop 70). The reading is now checked on the remaining rows: not holding there, the exact dense Hessian is used,
    and the request is ``solver="exact"``'s."""
    model, x, y, bank = _huber_case(inside=10)  # removed: inside the quadratic zone; remaining: past delta
    assert learned_variance(model, _huber, (x[:10], y[:10])) == {"variance": "learned"}
    assert learned_variance(model, _huber, (x[10:], y[10:])) is None
    banks, info = _ggn_and_exact(model, x, y, bank)
    assert info["ggn_curvature"] == "hessian"
    assert info["shift_norm"] > 1e-4  # 3.8e-4 at damping 131
    torch.testing.assert_close(banks["ggn"], banks["exact"], rtol=1e-10, atol=1e-12)


def test_a_gaussian_read_on_the_probe_rows_only_falls_back_where_the_remaining_ggn_is_not_finite() -> None:
    """The learned-variance reading is verified on the remaining rows' first probe rows only: a Huber loss whose rows
    past its quadratic zone (2 of 50) lie beyond them read ``v = ∞`` there, and ``solver="ggn"`` was refused with
    "non-finite entries ... check the model and data for overflow" (stop 70's review). A non-finite Gauss-Newton
    matrix of a learned variance now falls back to the exact dense Hessian, the request then ``solver="exact"``'s."""
    model, x, y, bank = _huber_case(inside=58)  # removed rows and 48 remaining inside the zone; the last 2 past delta
    assert learned_variance(model, _huber, (x[10:], y[10:])) == {"variance": "learned"}  # the probe rows hold it
    banks, info = _ggn_and_exact(model, x, y, bank)
    assert info["ggn_curvature"] == "hessian"
    assert "not finite" in info["ggn_fallback"]
    torch.testing.assert_close(banks["ggn"], banks["exact"], rtol=1e-10, atol=1e-12)
