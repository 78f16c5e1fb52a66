"""Fails on main 18db16e, passes with fix-sampler-checks.patch."""

import copy
import math

import pytest
import torch
from torch.optim import Optimizer

from mcmc_unlearner import SGLD, MCMCUnlearner
from mcmc_unlearner.errors import QualityError
from mcmc_unlearner.models.linreg import BayesianLinearRegression

torch.set_num_threads(1)


def _data(n=200, d=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


class PrivateGenSGHMC(Optimizer):
    """A user's SGHMC keeping its noise generator as self.rng (not `generator`)."""

    def __init__(self, params, lr, alpha=0.2, seed=0):
        super().__init__(params, {"lr": lr, "alpha": alpha})
        self.rng = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                v = st.setdefault("v", torch.zeros_like(p))
                noise = torch.randn(p.shape, generator=self.rng, dtype=p.dtype) * math.sqrt(2 * g["alpha"] * g["lr"])
                v.mul_(1 - g["alpha"]).add_(p.grad, alpha=-g["lr"]).add_(noise)
                p.add_(v)


def _chain_unlearner(sampler_cls, **kw):
    torch.manual_seed(0)
    model = BayesianLinearRegression(2).double()
    s = sampler_cls(model.parameters(), lr=2e-4)
    return model, s, MCMCUnlearner(model, s, expectation="chain", **kw)


def test_refused_chain_request_restores_a_private_sampler_generator():
    x, y = _data()
    _, s, un = _chain_unlearner(PrivateGenSGHMC, solver="cg", iter_T=1, tol=1e-14, damping=0.0)
    before = s.rng.get_state().clone()
    with pytest.raises(QualityError):
        un.remove((x[:40], y[:40]), (x[40:], y[40:]))
    assert torch.equal(s.rng.get_state(), before)


def test_discarded_chain_proposal_restores_a_private_sampler_generator():
    x, y = _data()
    _, s, un = _chain_unlearner(PrivateGenSGHMC)
    before = s.rng.get_state().clone()
    un.propose((x[:40], y[:40]), (x[40:], y[40:]))
    assert torch.equal(s.rng.get_state(), before)


class StatefulPlain:
    """A sampler with state_dict/load_state_dict but its step size as an attribute (no param_groups)."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr).add_(torch.randn_like(p) * math.sqrt(2 * self.lr))

    def state_dict(self):
        return {"lr": self.lr}

    def load_state_dict(self, sd):
        self.lr = sd["lr"]


def test_sampler_without_param_groups_never_half_applies_a_request():
    """A sampler keeping its step size as an attribute (no ``param_groups``): ``rescale_lr`` failed inside
    ``apply`` after the model and bank had been shifted (a retry removed the rows twice). Refused when built, naming
    the fix; with ``rescale_lr=False`` the request runs and the caller's step size is left alone."""
    x, y = _data()
    torch.manual_seed(0)
    model = BayesianLinearRegression(2).double()
    s = StatefulPlain(model.parameters(), 2e-4)
    bank = torch.randn(50, 2, dtype=torch.float64) * 0.07 + torch.tensor([1.0, -0.5], dtype=torch.float64)
    w0 = model.w.detach().clone()
    with pytest.raises(TypeError, match="rescale_lr=False"):
        MCMCUnlearner(model, s, bank=bank)
    assert torch.equal(model.w.detach(), w0)
    un = MCMCUnlearner(model, s, bank=bank, rescale_lr=False)
    assert un.remove((x[:40], y[:40]), (x[40:], y[40:])).passed
    assert not torch.equal(model.w.detach(), w0) and s.lr == 2e-4 and len(un.history) == 1


def test_sampler_built_on_another_copy_of_the_model_is_refused():
    torch.manual_seed(0)
    model = BayesianLinearRegression(2).double()
    s = SGLD(model.parameters(), lr=2e-4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="not the model's"):
        MCMCUnlearner(copy.deepcopy(model), s, expectation="chain")
