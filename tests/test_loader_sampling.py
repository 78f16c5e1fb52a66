"""A DataLoader that does not draw the remaining rows uniformly: refused (weighted) or warned about (sequential)."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.models.linreg import BayesianLinearRegression, exact_posterior

torch.set_num_threads(1)


def _problem():
    g = torch.Generator().manual_seed(0)
    n, d, S, k = 600, 5, 500, 30
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:300] *= 3.0
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    mean, cov = exact_posterior(x, y)
    bank = mean + torch.randn(S, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    model = BayesianLinearRegression(d).double()
    keep = torch.ones(n, dtype=torch.bool)
    keep[-k:] = False
    un = MCMCUnlearner(model, nll=lambda m, b: m.nll(b), log_prior=lambda m: m.log_prior(), bank=bank, grad_draws=S)
    return x, y, keep, un


def test_a_weighted_random_sampler_with_unequal_weights_is_refused_and_nothing_changes():
    x, y, keep, un = _problem()
    ds = TensorDataset(x[keep], y[keep])
    w = torch.ones(len(ds))
    w[:300] = 2.0  # class-balancing weights: 0.81 of the exact shift before, no problem listed
    loader = DataLoader(ds, batch_size=64, sampler=WeightedRandomSampler(w, len(ds), replacement=True))
    bank = un.bank.clone()
    with pytest.raises(ValueError, match="WeightedRandomSampler with unequal weights"):
        un.remove((x[~keep], y[~keep]), loader)
    assert torch.equal(un.bank, bank)
    # equal weights (or zero weights on removed rows, stop 32) are a uniform sample: accepted as before
    w = torch.ones(len(keep))
    w[~keep] = 0.0
    full = DataLoader(TensorDataset(x, y), batch_size=64, sampler=WeightedRandomSampler(w, len(x), replacement=True))
    assert un.remove((x[~keep], y[~keep]), full).passed


def test_a_sequential_dataloader_is_warned_about():
    x, y, keep, un = _problem()
    ds = TensorDataset(x[keep], y[keep])
    with pytest.warns(UserWarning, match="fixed order"):
        un.propose((x[~keep], y[~keep]), DataLoader(ds, batch_size=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        un.propose((x[~keep], y[~keep]), DataLoader(ds, batch_size=64, shuffle=True))
        un.propose((x[~keep], y[~keep]), DataLoader(ds, batch_size=len(ds)))  # one minibatch: every row each time
