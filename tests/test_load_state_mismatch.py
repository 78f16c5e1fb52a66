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


@pytest.mark.parametrize(
    "drawn",
    [
        torch.tensor([[0, 1]]),  # 2-D
        torch.tensor([0.0, 1.0], dtype=torch.float32),  # not integer
        torch.zeros(4, dtype=torch.bool),  # a mask, not flat indices
        torch.tensor([0, 1], dtype=torch.int32),  # another integer dtype
        torch.tensor([0, 10_000]),  # past the parameter count
        torch.tensor([-1, 2]),  # negative
    ],
    ids=["2d", "float", "bool", "int32", "past_end", "negative"],
)
def test_a_corrupt_recenter_drawn_is_refused_and_nothing_is_loaded(drawn):
    """The drawn entries' flat indices (``recenter_drawn``, saved with the anchor) are checked like the other
    per-parameter tensors: a value of another shape, dtype or range is refused at load naming the key, and the
    unlearner keeps the state it had (its anchor and carried influence unchanged)."""
    opts = dict(solver="exact", recenter_every=2, damping="auto")
    tensors, meta = _state_after_two(4, **opts)
    assert "recenter_thetas" in tensors and "recenter_drawn" not in tensors
    un, x, y = _setup(4, **opts)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[:3] = False
    un.remove((x[:3], y[:3]), (x[keep], y[keep]))  # a state of its own that must survive the refusal
    before, _ = un.curvature_state()
    with pytest.raises(ValueError, match=r"'recenter_drawn'.*nothing was loaded"):
        un.load_curvature_state({**tensors, "recenter_drawn": drawn}, meta)
    after, _ = un.curvature_state()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_valid_recenter_drawn_loads_and_one_saved_without_it_too():
    """In-range int64 flat indices load into the anchor; a state saved before the key existed loads with none."""
    opts = dict(solver="exact", recenter_every=2, damping="auto")
    tensors, meta = _state_after_two(4, **opts)
    un, _x, _y = _setup(4, **opts)
    un.load_curvature_state(tensors, meta)
    assert un._anchor is not None and un._anchor.drawn is None
    un.load_curvature_state({**tensors, "recenter_drawn": torch.tensor([0, 3, 5])}, meta)
    assert un._anchor.drawn.tolist() == [0, 3, 5]
