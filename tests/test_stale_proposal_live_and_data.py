"""apply() silently undid what happened after propose(): sampler steps / load_state_dict on the model, rows the user
removed from the RemovableDataset (revived), and a load_curvature_state (overwritten). Such proposals are stale."""

import pytest
import torch

from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.models.linreg import BayesianLinearRegression
from mcmc_unlearner.samplers import run_chain

torch.set_num_threads(1)


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    y = x @ torch.randn(3, generator=g) + torch.randn(300, generator=g)
    bank = torch.randn(32, 3, generator=g) * 0.05
    model = BayesianLinearRegression(3)
    with torch.no_grad():
        model.w.copy_(bank[-1])
    data = RemovableDataset(x, y, batch_size=50, seed=0)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(3))
    un = MCMCUnlearner(model, sampler, bank=bank, solver="exact")
    data.remove(torch.arange(10))
    return model, data, sampler, un


def test_sampler_steps_after_propose_make_it_stale():
    model, data, sampler, un = _setup()
    prop = un.propose(data.get(torch.arange(10)), data)
    run_chain(model, sampler, data, un.energy, 20, len(data))
    w = model.w.detach().clone()
    with pytest.raises(ValueError, match="stale"):
        un.apply(prop)
    assert torch.equal(model.w, w) and un.history == []


def test_rows_removed_after_propose_are_not_revived():
    _model, data, _sampler, un = _setup()
    prop = un.propose(data.get(torch.arange(10)), data)
    data.remove(torch.arange(10, 20))
    with pytest.raises(ValueError, match="stale"):
        un.apply(prop)
    assert not data.state_dict()["alive"][10:20].any() and len(data) == 280


def test_load_curvature_state_after_propose_makes_it_stale():
    _model, data, _sampler, un = _setup()
    state = un.curvature_state()
    prop = un.propose(data.get(torch.arange(10)), data)
    un.load_curvature_state(*state)
    with pytest.raises(ValueError, match="stale"):
        un.apply(prop)


def test_an_untouched_proposal_still_applies():
    _model, data, _sampler, un = _setup()
    prop = un.propose(data.get(torch.arange(10)), data)
    un.apply(prop)
    assert len(un.history) == 1
