"""Shared fixtures: a conjugate Bayesian linear regression run as many independent chains at once."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mcmc_unlearner.models.linreg import exact_posterior

# The test models are tiny: one thread avoids OpenMP start-up and contention costs that dominate at this size.
torch.set_num_threads(1)


class MultiChainBLR(nn.Module):
    """``C`` independent copies of Bayesian linear regression in one module (weights ``[C, d]``).

    The energy is the sum of the copies' energies, so one SG-MCMC step on it is ``C`` independent chain
    steps; averaging over copies turns one noisy chain state into a precise mean.
    """

    def __init__(self, chains: int, dim: int, n: int, prior_std: float = 1.0, noise_std: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(chains, dim))
        self.prior_std, self.noise_std, self.n = prior_std, noise_std, n

    def log_prior(self) -> torch.Tensor:
        return -0.5 * (self.w**2).sum() / self.prior_std**2

    def nll(self, batch):
        x, y = batch[0], batch[1]
        r = y[:, None] - x @ self.w.T  # [B, C]
        return (0.5 * r**2 / self.noise_std**2).sum(1) + 0.5 * self.w.shape[0] * math.log(2 * math.pi)

    def F(self, z):
        return -self.log_prior() + self.n * self.nll(z).mean()

    def h(self, z):
        return self.nll(z).sum()


@dataclass
class BLRProblem:
    x: torch.Tensor
    y: torch.Tensor
    removed: torch.Tensor
    keep: torch.Tensor
    mean_all: torch.Tensor
    cov_all: torch.Tensor
    mean_kept: torch.Tensor
    cov_kept: torch.Tensor

    @property
    def exact_shift(self) -> torch.Tensor:
        return self.mean_kept - self.mean_all


def make_blr(n: int = 400, dim: int = 3, removed: int = 40, seed: int = 0) -> BLRProblem:
    """Data whose last ``removed`` rows are corrupted (y + 3), so forgetting them moves the posterior."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g)
    y = x @ w + torch.randn(n, generator=g)
    ids = torch.arange(n - removed, n)
    y[ids] += 3.0 * torch.sign(x[ids, 0])
    keep = torch.ones(n, dtype=torch.bool)
    keep[ids] = False
    m0, c0 = exact_posterior(x, y)
    m1, c1 = exact_posterior(x[keep], y[keep])
    return BLRProblem(x, y, ids, keep, m0, c0, m1, c1)


@pytest.fixture(scope="session")
def blr() -> BLRProblem:
    return make_blr()


def start_at_posterior(model: MultiChainBLR, prob: BLRProblem, seed: int = 1) -> None:
    """Put every chain at an exact draw of the full-data posterior (no burn-in needed)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(prob.cov_all)
    z = torch.randn(model.w.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.w.copy_((prob.mean_all + z @ L.T).float())
