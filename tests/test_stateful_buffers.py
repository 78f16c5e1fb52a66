"""A model in training mode whose forward updates a buffer its output uses (a custom running mean, BatchNorm-like but
not a BatchNorm) was unlearned silently against a moving network: the exact solver's shift 1.26x its own norm off the
frozen-statistics answer, no problem listed. It should be refused like BatchNorm in training mode; a buffer the output
ignores (a step counter, stop 31) must still pass."""

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


class RunningCenter(nn.Module):
    def __init__(self, use_it=True):
        super().__init__()
        self.lin = nn.Linear(5, 1)
        self.register_buffer("mean", torch.zeros(5))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.use_it = use_it

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.steps += 1
                if self.use_it:
                    self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x - self.mean) if self.use_it else self.lin(x)


nll = lambda m, b: 0.5 * ((b[1] - m(b[0]).squeeze(-1)) / 0.5) ** 2  # noqa: E731
log_prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) + 3.0
    y = x @ torch.ones(5) + 0.5 * torch.randn(200, generator=g)
    return x, y


@pytest.mark.parametrize("solver", ["exact", "cg", "kfac"])
def test_a_forward_that_updates_a_buffer_it_uses_is_refused_and_the_buffer_kept(solver):
    torch.manual_seed(0)
    x, y = _data()
    model = RunningCenter()
    for _ in range(200):
        model(x)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    bank = torch.randn(16, 6) * 0.03 + torch.cat([torch.ones(5), torch.zeros(1)])
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, solver=solver)
    with pytest.raises(ValueError, match="updates buffers that its output depends on"):
        un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


def test_a_buffer_the_output_ignores_still_passes_and_is_restored():
    torch.manual_seed(0)
    x, y = _data()
    model = RunningCenter(use_it=False)
    model(x)
    bank = torch.randn(16, 6) * 0.03 + torch.cat([torch.ones(5), torch.zeros(1)])
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, solver="exact")
    r = un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    assert r.shift_norm > 0 and int(model.steps) == 1
