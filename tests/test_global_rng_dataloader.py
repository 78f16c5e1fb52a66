"""A refused or discarded request whose remaining data is a shuffling DataLoader must leave torch's global
generator as it was (iter(DataLoader) draws its seed from it); an applied one ends where remove() always did."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import SGLD, MCMCUnlearner
from mcmc_unlearner.errors import QualityError


class LinReg(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def nll(m, b):
    return 0.5 * (b[1] - m(b[0])) ** 2


def log_prior(m):
    return -0.5 * (m.w**2).sum()


def _setup(own_generator, damping="auto", expectation="chain"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, generator=g, dtype=torch.float64) + torch.randn(100, generator=g, dtype=torch.float64)
    model = LinReg(4)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1) if own_generator else None)
    kw = {"bank": torch.randn(20, 4, generator=g, dtype=torch.float64) * 0.1} if expectation == "bank" else {}
    un = MCMCUnlearner(model, sampler, nll=nll, log_prior=log_prior, expectation=expectation, damping=damping, **kw)
    loader = DataLoader(TensorDataset(x[10:], y[10:]), batch_size=32, shuffle=True)
    return un, (x[:10], y[:10]), loader


@pytest.mark.parametrize("own_generator", [True, False])
@pytest.mark.parametrize("expectation", ["chain", "bank"])
def test_refused_request_restores_global_rng(own_generator, expectation):
    un, removed, loader = _setup(own_generator, damping=1e7, expectation=expectation)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with pytest.raises(QualityError):
        un.remove(removed, loader)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("own_generator", [True, False])
def test_discarded_proposal_restores_global_rng(own_generator):
    un, removed, loader = _setup(own_generator)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    un.propose(removed, loader)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("own_generator", [True, False])
def test_propose_apply_matches_remove(own_generator):
    un1, removed, loader1 = _setup(own_generator)
    un2, _, loader2 = _setup(own_generator)
    torch.manual_seed(123)
    un1.remove(removed, loader1)
    after1, w1 = torch.get_rng_state(), un1.model.w.detach().clone()
    torch.manual_seed(123)
    un2.apply(un2.propose(removed, loader2))
    assert torch.equal(torch.get_rng_state(), after1)
    assert torch.equal(un2.model.w, w1)
