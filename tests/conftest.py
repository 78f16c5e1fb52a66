"""Shared fixtures: a conjugate Bayesian linear regression run as many independent chains at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior

# The test models are tiny: one thread avoids OpenMP start-up and contention costs that dominate at this size.
torch.set_num_threads(1)


MultiChainBLR = MultiChainLinearRegression


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


def start_at_posterior(model: MultiChainLinearRegression, prob: BLRProblem, seed: int = 1) -> None:
    """Put every chain at an exact draw of the full-data posterior (no burn-in needed)."""
    model.start_at(prob.mean_all, prob.cov_all, torch.Generator().manual_seed(seed))
