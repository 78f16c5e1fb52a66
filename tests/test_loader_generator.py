"""A discarded propose() or a request that raises must leave a DataLoader's own generator as it was (torch's global
generator already is): otherwise the retried request differs from the same request on an untouched setup."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner


class Boom(Exception):
    pass


def _setup(fail=False):
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    bank = []
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        bank.append({k: v.clone() for k, v in model.state_dict().items()})
    calls = {"n": 0, "fail": fail}

    def nll(m, b):
        calls["n"] += 1
        if calls["fail"] and calls["n"] > 6:
            raise Boom()
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    log_prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731
    loader = DataLoader(
        TensorDataset(x[20:], y[20:]), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, solver="exact")
    return un, (x[:20], y[:20]), loader, calls


def test_discarded_propose_leaves_loader_generator():
    un, rows, loader, _ = _setup()
    g0 = loader.generator.get_state().clone()
    un.propose(rows, loader)
    assert torch.equal(g0, loader.generator.get_state())


def test_failed_request_leaves_loader_generator():
    un, rows, loader, _calls = _setup(fail=True)
    g0 = loader.generator.get_state().clone()
    with pytest.raises(Boom):
        un.remove(rows, loader)
    assert torch.equal(g0, loader.generator.get_state())


def test_retry_equals_untouched():
    un, rows, loader, _ = _setup()
    r1 = un.remove(rows, loader)
    un2, rows2, loader2, _ = _setup()
    un2.propose(rows2, loader2)  # discarded
    r2 = un2.remove(rows2, loader2)
    assert (r1.damping, r1.shift_norm) == (r2.damping, r2.shift_norm)
    g_a, g_b = loader.generator.get_state(), loader2.generator.get_state()
    assert torch.equal(g_a, g_b)  # a successful request leaves the loader where the computation left it
