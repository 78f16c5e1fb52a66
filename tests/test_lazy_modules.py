"""A model with lazy modules (``nn.LazyLinear``) before its first forward pass has uninitialized parameters: the
unlearner's constructor failed with torch's raw "Can't access the shape of an uninitialized parameter" (stop 56's
closing note). It is refused naming the parameters and the fix (one forward pass on a batch first), and after that
forward pass the same model is accepted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def test_a_lazy_model_is_refused_until_its_first_forward_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3)).eval()
    with pytest.raises(ValueError, match=r"uninitialized \(lazy\) parameters.*0\.weight, 0\.bias.*LazyLinear") as e:
        MCMCUnlearner(model, None, nll=_nll, log_prior=_prior)
    assert "Run one forward pass on a batch first" in str(e.value) and "nothing was changed" in str(e.value)
    assert nn.parameter.is_lazy(model[0].weight)  # untouched: still lazy
    x, y = torch.randn(40, 5), torch.randint(3, (40,))
    with torch.no_grad():
        model(x[:2])
    bank = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    un = MCMCUnlearner(model, None, nll=_nll, log_prior=_prior, bank=bank)
    assert un.spec.dim == 5 * 8 + 8 + 8 * 3 + 3
    un.propose((x[:2], y[:2]), (x[2:], y[2:]))
