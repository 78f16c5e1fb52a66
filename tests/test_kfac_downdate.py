"""K-FAC reused across requests: each request's removed rows are taken out of the factors (the downdate).

Rescaling the reused factors to the remaining count alone treats the removed rows as average ones; removing the rows
that carry the curvature (high leverage) left it many times too large, every step short, and the drift test blind to
it (a curvature ``c`` times too large reads as ratio ``2 − 1/c``). Checked against closed forms.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.kronecker import KroneckerCurvature

SIG, TAU = 0.5, 1.0


class _LinReg(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return 0.5 * (b[1] - m(b[0])) ** 2 / SIG**2 + math.log(SIG)


def _log_prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters()) / TAU**2


def _posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Design (weights, then bias), posterior mean and precision of the conjugate regression."""
    phi = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    A = torch.eye(phi.shape[1], dtype=torch.float64) / TAU**2 + phi.T @ phi / SIG**2
    return phi, torch.linalg.solve(A, phi.T @ y.double() / SIG**2), A


def test_reused_kfac_follows_the_removal_of_high_leverage_rows() -> None:
    """30 of 1,000 rows at 20× leverage removed over 20 requests, highest leverage first: with the factors reused
    (``refresh_every=20``) the bank ends where the exact Newton steps put it (closed form: each request moves every
    sample by ``A_new⁻¹ A_old`` about the new mean), as with ``refresh_every=1``. K-FAC of a linear Gaussian model is
    its exact Hessian; every row enters curvature and check, so nothing is random. The rescale-only reuse ended 3.4
    posterior sd off (whitened norm of the bank mean's error), with every request's ratio inside the drift bounds."""
    n, d, S = 1000, 8, 200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x[:30] *= 20.0
    y = x @ torch.randn(d, generator=g) + 0.3 + SIG * torch.randn(n, generator=g)
    phi, m0, A0 = _posterior(x, y)
    z = torch.randn(S, d + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bank0 = m0 + torch.linalg.solve_triangular(torch.linalg.cholesky(A0).T, z.T, upper=True).T
    samples = [{"lin.weight": t[:d].reshape(1, d).float(), "lin.bias": t[d:].float()} for t in bank0]

    keep, requests = torch.ones(n, dtype=torch.bool), []
    for k in [1, 3, 2, 2, 4, 3, 3, 5, 4, 2] * 2:
        idx = keep.nonzero().squeeze(1)
        _, _, A = _posterior(x[keep], y[keep])
        leverage = (phi[idx] @ torch.linalg.solve(A, phi[idx].T)).diagonal()
        rows = idx[leverage.argsort(descending=True)[:k]]
        keep[rows] = False
        requests.append(rows)
    _, mk, Ak = _posterior(x[keep], y[keep])
    ideal = mk + torch.linalg.solve(Ak, A0 @ (bank0.mean(0) - m0))
    L = torch.linalg.cholesky(Ak)

    errors, how = {}, []
    for refresh in (20, 1):
        un = MCMCUnlearner(
            _LinReg(d),
            nll=_nll,
            log_prior=_log_prior,
            bank=samples,
            solver="kfac",
            curvature_data="full",
            check_rows=1000,
            refresh_every=refresh,
            recenter_every=0,
        )
        keep = torch.ones(n, dtype=torch.bool)
        for rows in requests:
            keep[rows] = False
            report = un.remove((x[rows], y[rows]), (x[keep], y[keep]))
            assert not report.problems
            if refresh == 20 and len(un.history) > 1:
                how.append((report.info["preconditioner_reused"], report.info.get("kfac_downdate")))
        bank = torch.stack([torch.cat([s["lin.weight"].reshape(-1), s["lin.bias"]]).double() for s in un.samples()])
        errors[refresh] = float((L.T @ (bank.mean(0) - ideal)).norm())
    # float32 steps on float64 closed forms: 1e-3 sd is far under the 3.4 sd of the rescale-only reuse
    assert errors[20] < 0.01 and errors[1] < 0.01, errors
    assert how == [(True, "downdated")] * 19, how  # the factors were reused (and downdated), never rebuilt


class _Wide(nn.Module):
    """A small nonlinear MLP with a 48-wide hidden layer (its factors seen on fewer rows than dimensions below)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 48), nn.Linear(48, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).squeeze(-1)


def _kfac_matrix(k: KroneckerCurvature) -> torch.Tensor:
    return k @ torch.eye(k.dim)


def test_downdate_equals_the_factors_built_on_the_remaining_rows() -> None:
    """For a nonlinear MLP with a Gaussian likelihood (scalar output: the label expectation is exact, so the factors
    are deterministic) the factors built on all rows, downdated by the removed rows at the same draws, equal the
    factors built on the remaining rows — the whole matrix ``K``, to float32 rounding. Two cases: rows > dimensions
    (full eigenbases), and 2 draws × 20 rows < 48 (eigenbases from kept rows, downdated within their span, which
    holds the remaining rows' span)."""
    torch.manual_seed(0)
    model = _Wide()
    for n, draws in ((200, 3), (20, 2)):
        x = torch.randn(n, 3)
        y = torch.randn(n)
        thetas = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None] + 0.3 * torch.randn(
            draws, sum(p.numel() for p in model.parameters())
        )
        removed = torch.zeros(n, dtype=torch.bool)
        removed[torch.randperm(n)[:5]] = True
        kw = dict(nll=_nll, log_prior=_log_prior, likelihood="gaussian")
        full = KroneckerCurvature.build(model, thetas, [(x, y)], n, **kw)
        part = KroneckerCurvature.build(model, thetas, [(x[removed], y[removed])], 5, **kw)
        ref = KroneckerCurvature.build(model, thetas, [(x[~removed], y[~removed])], n - 5, **kw)
        low = [KroneckerCurvature._low_rank(b) for b in full.blocks]
        assert any(low) == (n == 20), low
        before = _kfac_matrix(full)
        down = full.downdate(part, n, 5)
        down.n = n - 5
        K, R = _kfac_matrix(down), _kfac_matrix(ref)
        rel = float((K - R).norm() / R.norm())
        assert rel < 1e-4, (n, rel)
        assert torch.equal(_kfac_matrix(full), before)  # a new object: the factors it started from are unchanged
        assert down.info["downdated_rows"] == 5
