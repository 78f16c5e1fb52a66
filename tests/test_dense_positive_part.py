"""The dense backends solve with the positive part of the bank-averaged Hessian (``backends/dense.py``).

At the posterior ``E[∇²F] = E[∇F∇Fᵀ]`` is positive semi-definite; a negative eigenvalue of the bank's average is
its Monte-Carlo error or a bank off equilibrium there. Until stop 59 the damping search started just above it
(``λ > |w_min|``), damping every direction as much: a Student-t regression whose corrupted rows went moved 0.30 of
the way to retraining (1.01 with the positive part)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner


class _StudentT(nn.Module):
    """A tanh MLP's mean with a learned scale and degrees of freedom."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.log_scale = nn.Parameter(torch.tensor(-1.0))
        self.log_df = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, 0]


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    df, sc = m.log_df.exp() + 0.5, m.log_scale.exp()
    z = (b[1] - m(b[0])) / sc
    return -(
        torch.lgamma((df + 1) / 2)
        - torch.lgamma(df / 2)
        - 0.5 * torch.log(df * math.pi)
        - torch.log(sc)
        - (df + 1) / 2 * torch.log1p(z**2 / df)
    )


def _log_prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def test_a_negative_eigenvalue_of_the_bank_hessian_is_clamped_not_damped_away() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 300
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.distributions.StudentT(3.0).sample((n,))
    y[:30] += 3.0  # the corrupted rows to forget
    model = _StudentT().double()
    x, y = x.double(), y.double()
    params = list(model.parameters())
    bank = []
    for t in range(2500):  # the user's SGLD loop
        i = torch.randint(0, n, (64,), generator=g)
        energy = n * _nll(model, (x[i], y[i])).mean() - _log_prior(model)
        grads = torch.autograd.grad(energy, params)
        lr = 0.05 / n * (1 + t / 500) ** -0.55
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p.add_(-0.5 * lr * gr + math.sqrt(lr) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if t >= 1500 and t % 25 == 0:
            bank.append({k: v.clone() for k, v in model.state_dict().items()})
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank, solver="exact", seed=0)
    report = un.remove((x[:30], y[:30]), (x[30:], y[30:]))
    info = report.info
    assert info["min_eigenvalue"] < 0 and info["negative_eigenvalues_clamped"] >= 1, info["min_eigenvalue"]
    backend = un.curvature
    w, Q = torch.linalg.eigh(backend.A_new.double())  # the Hessian the backend built, its own positive part solved
    positive = (Q * w.clamp_min(0)) @ Q.T
    assert torch.allclose(backend.M.double(), positive, rtol=0, atol=1e-9 * float(w.abs().max()))
    b = torch.randn(w.numel(), generator=g, dtype=torch.float64)
    lam = report.damping
    expected = Q @ ((Q.T @ b) / (w.clamp_min(0) + lam))
    assert torch.allclose(backend.solve(b, lam).x.double(), expected, rtol=1e-8, atol=0)
    # the search is not held above the negative eigenvalue: before, every trial's damping exceeded |w_min|
    assert min(t["damping"] for t in info["trials"]) < -info["min_eigenvalue"], info["damping_history"]
    assert not report.problems
