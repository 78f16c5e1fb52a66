"""Stop 69: the removed rows' GGN at every draw in one nested vmap (``output_ggn_draws``) and the prior's Hessian
vmapped over the draws, against one draw at a time (float64: the same numbers to rounding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyRecurrent
from mcmc_unlearner.backends.ggn import GGNBackend, output_ggn, output_ggn_draws
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import Likelihood

torch.set_num_threads(1)


def _conv_net(outputs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, outputs)).double()


def _thetas(model: nn.Module, n: int) -> torch.Tensor:
    theta = ParamSpec.flatten_module(model)
    return theta + 0.3 * torch.randn(n, theta.numel(), generator=torch.Generator().manual_seed(1), dtype=theta.dtype)


def _one_at_a_time(model, thetas, x, lik, **kw) -> torch.Tensor:
    G = None
    for t in thetas:
        g = output_ggn(model, t, x, lik, **kw)
        G = g if G is None else G.add_(g)
    return G


@pytest.mark.parametrize("lik", [Likelihood.CATEGORICAL, Likelihood.BERNOULLI, Likelihood.GAUSSIAN])
@pytest.mark.parametrize("budget", [2**28, 56_000])  # every draw at once; two a chunk (56,000 B: 2.3 draws)
def test_the_draws_together_are_the_sum_of_one_draw_at_a_time(lik, budget) -> None:
    model = _conv_net()
    thetas = _thetas(model, 5)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64)
    plans: list[int] = []
    for weights in (None, w):
        kw = {"sigma": 0.7, "weights": weights}
        ref = _one_at_a_time(model, thetas, x, lik, **kw)
        got = output_ggn_draws(model, thetas, x, lik, budget=budget, plan=plans.append, **kw)
        assert torch.allclose(got, ref, rtol=0, atol=1e-13 * float(ref.abs().max()))
    per_draw = 3 * 4 * thetas.shape[1] * 3 * 8
    assert plans and max(plans) == min(budget // per_draw, 5) * per_draw  # the chunk of draws planned


def test_a_network_without_a_batching_rule_takes_one_draw_at_a_time_to_the_bit() -> None:
    torch.manual_seed(3)
    model = TinyRecurrent("LSTM", 3, 4).double()
    thetas = _thetas(model, 3)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    ref = _one_at_a_time(model, thetas, x, Likelihood.CATEGORICAL)
    assert torch.equal(output_ggn_draws(model, thetas, x, Likelihood.CATEGORICAL), ref)


class _Problem:
    """What :meth:`GGNBackend._prior_hessian` reads of a request."""

    def __init__(self, model, log_prior, thetas, budget):
        self.model, self.log_prior, self.thetas, self.budget = model, log_prior, thetas, budget
        self.dim = thetas.shape[1]


def _student(m: nn.Module) -> torch.Tensor:  # a heavy-tailed prior: its Hessian varies with the draw
    w = torch.cat([p.reshape(-1) for p in m.parameters()])
    return -2.5 * torch.log1p(w**2 / 3).sum() - 0.1 * (w[:-1] * w[1:]).sum()  # and correlated: not separable


def _branchy(m: nn.Module) -> torch.Tensor:  # data-dependent control flow: vmap cannot batch it
    w = torch.cat([p.reshape(-1) for p in m.parameters()])
    return -(0.5 if float(w.detach().sum()) > 0 else 0.25) * (w**2).sum() - 0.1 * (w[:-1] * w[1:]).sum()


@pytest.mark.parametrize("log_prior", [_student, _branchy])
@pytest.mark.parametrize("budget", [2**28, 4 * 2**20])  # all draws at once; the 1 MiB floor's chunk of draws
def test_the_prior_hessian_over_the_draws_is_the_mean_of_each_draw_s(log_prior, budget) -> None:
    model = _conv_net()
    thetas = _thetas(model, 6)
    b = GGNBackend()
    b._prior = torch.ones(1)
    got = b._prior_hessian(_Problem(model, log_prior, thetas, budget))
    ref = torch.zeros_like(got)
    for t in thetas:  # the prior's Hessian at each draw, by autograd
        ref += torch.autograd.functional.hessian(lambda v: -log_prior(_with(model, v)), t)
    ref = 0.5 * (ref + ref.T) / thetas.shape[0]
    w, Q = torch.linalg.eigh(ref)
    ref = (Q * w.clamp_min(0)) @ Q.T
    assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def _with(model: nn.Module, theta: torch.Tensor) -> nn.Module:
    """A stand-in module whose ``parameters()`` are the flat ``theta`` in ``model``'s shapes (all the priors read)."""
    shapes = [p.shape for p in model.parameters()]
    params = [t.reshape(s) for t, s in zip(torch.split(theta, [s.numel() for s in shapes]), shapes, strict=True)]

    class _M(nn.Module):
        def parameters(self, recurse: bool = True):  # type: ignore[override]
            return iter(params)

    return _M()
