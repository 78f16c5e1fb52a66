"""Shared fixtures: a conjugate Bayesian linear regression run as many independent chains at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mcmc_unlearner import SGHMC, SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.datasets import make_gmm_2d
from mcmc_unlearner.models.gmm import GaussianMixture
from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.store import gmm_data_spec, gmm_model_spec, save_model


@pytest.fixture(autouse=True)
def _no_ambient_integrity_key(monkeypatch):
    """Tests choose their integrity keys explicitly: an operator's $MCMC_UNLEARNER_KEY must not leak in."""
    monkeypatch.delenv("MCMC_UNLEARNER_KEY", raising=False)


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


# ------------------------------------------------------------------------------ tiny saved GMM models
GMM_N = 200


def tiny_gmm(
    seed: int = 0,
    *,
    bank: int = 20,
    burn: int = 150,
    sampler: str = "sghmc",
    lr: float = 1e-3,
    solver: str = "exact",
    refresh_every: int = 1,
):
    """A short chain on 200 GMM points (data seed 1) with a small bank: the model the store tests save."""
    x, y = make_gmm_2d(n=GMM_N, seed=1)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(seed), n=GMM_N)
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=32, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    if sampler == "sghmc":
        opt = SGHMC(model.parameters(), lr=lr, alpha=0.5, generator=gen)
    else:
        opt = SGLD(model.parameters(), lr=lr, generator=gen)
    un = MCMCUnlearner(model, opt, solver=solver, curvature_draws=4, refresh_every=refresh_every)
    run_chain(model, opt, data, un.energy, burn, GMM_N)
    for _ in range(bank):
        run_chain(model, opt, data, un.energy, 3, GMM_N)
        un.collect()
    return model, opt, data, un


def save_gmm(path, objs, data_spec=None, **kwargs):
    """Save ``tiny_gmm``'s objects as a model folder; returns ``path``."""
    model, sampler, data, un = objs
    spec = data_spec or gmm_data_spec(GMM_N, 1)
    save_model(
        path, model=model, sampler=sampler, data=data, unlearner=un, model_spec=gmm_model_spec(model), data_spec=spec,
        **kwargs,
    )  # fmt: skip
    return path
