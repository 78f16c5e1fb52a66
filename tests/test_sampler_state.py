"""A discarded propose() / a refused request must leave the sampler's own noise generator as it was
(SGLD/SGHMC(generator=...) keep it outside state_dict)."""

import pytest
import torch
from torch import nn

from mcmc_unlearner import SGHMC, SGLD, MCMCUnlearner, RemovableDataset, SolverDivergedError, sgmcmcUnlearner
from mcmc_unlearner.datasets import gmm_removal_indices, make_gmm_2d
from mcmc_unlearner.models.gmm import GaussianMixture
from mcmc_unlearner.samplers import run_chain


def _gmm():
    x, y = make_gmm_2d()
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=64, seed=0)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(0))
    sampler = SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler, expectation="chain")
    run_chain(model, sampler, data, un.energy, 200, len(data))
    return data, model, sampler, un, gmm_removal_indices(x, y)[:4]


def test_discarded_chain_proposal_leaves_the_sampler_generator_alone() -> None:
    data, model, sampler, un, ids = _gmm()
    g0 = sampler.generator.get_state().clone()
    un.propose(data.get(ids), data)
    assert torch.equal(sampler.generator.get_state(), g0)
    un.forget(ids, data)
    a = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    data2, model2, _, un2, _ = _gmm()
    un2.forget(ids, data2)
    assert torch.equal(a, torch.nn.utils.parameters_to_vector(model2.parameters()).detach())


@pytest.mark.parametrize("kind", [SGLD, SGHMC])
def test_seed_api_restores_the_sampler_generator_after_a_diverged_request(kind) -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 3)
    y = (x.sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = kind(model.parameters(), lr=1e-5, generator=torch.Generator().manual_seed(1))

    class S(sgmcmcUnlearner):
        def _apply_sample(self, z):
            self.optimizer.zero_grad()
            self._fun(z).backward()
            self.optimizer.step()

        def _fun(self, z):
            return 190 * nn.functional.cross_entropy(self.model(z[0]), z[1]) + sum(
                0.5 * (p**2).sum() for p in self.model.parameters()
            )

        def _z_fun(self, z):
            return nn.functional.cross_entropy(self.model(z[0]), z[1], reduction="sum")

    un = S(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=8, scaling=10.0, samp_T=2)
    g0 = opt.generator.get_state().clone()
    with pytest.raises(SolverDivergedError):
        un.remove([x[:10], y[:10]], RemovableDataset(x[10:], y[10:], batch_size=32, seed=0))
    assert torch.equal(opt.generator.get_state(), g0)


def test_discarded_chain_proposal_leaves_the_global_rng_alone() -> None:
    """A sampler without a generator of its own draws from torch's global generator: a discarded chain-mode
    propose() left it advanced (the next steps differed from an untouched copy's); applying sets the post-draw state,
    so remove() is unchanged."""
    x, y = make_gmm_2d()
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=64, seed=0)
    torch.manual_seed(3)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(0))
    sampler = SGLD(model.parameters(), lr=1e-3)  # no generator: global RNG
    un = MCMCUnlearner(model, sampler, expectation="chain")
    run_chain(model, sampler, data, un.energy, 100, len(data))
    ids = gmm_removal_indices(x, y)[:4]
    before = torch.get_rng_state()
    un.propose(data.get(ids), data)
    assert torch.equal(torch.get_rng_state(), before)
    prop = un.propose(data.get(ids), data)
    un.apply(prop)
    assert not torch.equal(torch.get_rng_state(), before)  # the draws' noise was consumed once, by the applied one
