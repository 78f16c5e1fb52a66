"""load_curvature_state of a state saved for another model size or dtype must be refused at load, with nothing
loaded, rather than accepted and failing inside the next request with torch's size/dtype error."""

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner


def _setup(hidden, dtype=torch.float32, **opts):
    torch.manual_seed(0)
    x = torch.randn(300, 6, dtype=dtype)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 2)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    bank = []
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        bank.append({k: v.clone() for k, v in model.state_dict().items()})
    nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    log_prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, **opts)
    return un, x, y


def _state_after_two(hidden, **opts):
    un, x, y = _setup(hidden, **opts)
    keep = torch.ones(len(x), dtype=torch.bool)
    for i in range(2):
        ids = torch.arange(5 * i, 5 * i + 5)
        keep[ids] = False
        un.remove((x[ids], y[ids]), (x[keep], y[keep]))
    return un.curvature_state()


@pytest.mark.parametrize("solver", ["exact", "cg", "lowrank"])
def test_other_model_size_refused_at_load(solver):
    opts = dict(solver=solver, recenter_every=2, damping="auto")
    tensors, meta = _state_after_two(4, **opts)
    un, _x, _y = _setup(6, **opts)
    before = un.curvature_state()
    with pytest.raises(ValueError, match="parameters"):
        un.load_curvature_state(tensors, meta)
    after = un.curvature_state()
    assert sorted(before[0]) == sorted(after[0])


def test_other_dtype_refused_at_load():
    opts = dict(solver="exact", recenter_every=2, damping="auto")
    tensors, meta = _state_after_two(4, **opts)
    un, _x, _y = _setup(4, dtype=torch.float64, **opts)
    with pytest.raises(ValueError, match="float32"):
        un.load_curvature_state(tensors, meta)


def test_same_model_still_loads():
    opts = dict(solver="exact", recenter_every=2, damping="auto")
    tensors, meta = _state_after_two(4, **opts)
    un, _x, _y = _setup(4, **opts)
    un.load_curvature_state(tensors, meta)
