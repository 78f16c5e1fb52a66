"""Layers whose weight a parametrization computes (``weight_norm``, ``orthogonal``, ``register_parametrization``).

The emptied-label draw cannot sample a parametrized head's rows (they are not parameters): its reason names the
parametrization (stop 58's probe: a weight-normed head was reported as "not all trainable").
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.emptied import output_rows

torch.set_num_threads(1)


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


class _Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(w)


def _mlp(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    for i in (0, 2, 4):
        if kind == "weight_norm":
            parametrizations.weight_norm(m[i])
        elif kind == "hooked_weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation of the hook-based form
                nn.utils.weight_norm(m[i])
        elif kind == "positive":
            parametrize.register_parametrization(m[i], "weight", _Positive())
    if kind == "orthogonal":  # one of three layers
        parametrizations.orthogonal(m[2])
    return m


def _unlearner(model: nn.Module) -> MCMCUnlearner:
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.01 * torch.randn(4, theta.numel(), generator=torch.Generator().manual_seed(1))
    return MCMCUnlearner(model, None, nll=_nll, log_prior=_prior, bank=bank)


def test_the_emptied_label_draw_names_a_parametrized_head() -> None:
    """A weight-normed output layer's rows are not parameters the draw can sample: the reason names the
    parametrization (it said "the output layer's parameters are not all trainable")."""
    model = _mlp("weight_norm")
    spec = ParamSpec.of(model)
    why = output_rows(model, spec, ParamSpec.flatten_module(model).detach(), torch.randn(3, 20))
    assert isinstance(why, str) and "parametrization" in why and "not all trainable" not in why
