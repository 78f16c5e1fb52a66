"""A model in ``torch.channels_last``: its samples were returned standard-contiguous (the values right, the memory
format lost) in the list-of-``state_dict`` and dict-of-stacked-tensors layouts. They come back in the caller's
strides now: the same ``is_contiguous(memory_format=torch.channels_last)`` per sample as the samples given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    return model.to(memory_format=torch.channels_last)


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("kind", ["state_dicts", "stacked"])
def test_samples_come_back_in_the_callers_memory_format(kind: str) -> None:
    model = _cnn()
    assert _cl(model[0].weight)
    torch.manual_seed(1)
    given = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(6)]
    assert _cl(given[0]["0.weight"]) and _cl(given[0]["2.weight"])
    bank = given if kind == "state_dicts" else {k: torch.stack([sd[k] for sd in given]) for k in given[0]}
    x, y = torch.randn(80, 2, 6, 6).to(memory_format=torch.channels_last), torch.randint(3, (80,))
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, seed=0, solver="kfac")
    before = un.samples()
    un.remove((x[:4], y[:4]), (x[4:], y[4:]))
    for out in (before, un.samples()):
        rows = out if kind == "state_dicts" else [{k: v[i] for k, v in out.items()} for i in range(6)]
        for i, sd in enumerate(rows):
            for k, v in sd.items():
                assert _cl(v) == _cl(given[i][k]), (k, v.stride())
                assert v.dtype == given[i][k].dtype and v.shape == given[i][k].shape
    assert _cl(model[0].weight) and _cl(model[2].weight)  # the live model as it was given
    # the values: the flat bank's, whatever the strides
    flat = un.bank
    rows = un.samples() if kind == "state_dicts" else [{k: v[i] for k, v in un.samples().items()} for i in range(6)]
    for i, sd in enumerate(rows):
        got = torch.cat([sd[n].reshape(-1) for n, _ in model.named_parameters()])
        assert torch.equal(got, flat[i])


def test_samples_collected_beyond_a_stacked_bank_keep_its_layout() -> None:
    """``collect()`` grows a stacked bank past the samples given: the returned tensors are laid out as torch lays
    out the given ones densely. A channels_last convolution weight stays channels_last per sample; a weight given
    expanded (stride 0 over the samples: every sample the same) comes back contiguous, as it does before
    ``collect()``, not ordered by its raw strides (the samples innermost: strides (1, 320, 5), each sample's slice
    strided)."""
    model = _cnn()
    torch.manual_seed(1)
    S = 4
    given = model.state_dict().items()
    stacked = {k: torch.stack([v + 0.05 * torch.randn_like(v) for _ in range(S)]) for k, v in given}
    stacked["5.weight"] = model[5].weight.detach().expand(S, -1, -1)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=stacked, seed=0, solver="kfac")
    assert un.samples()["5.weight"].is_contiguous()
    un.collect()
    out = un.samples()
    assert out["5.weight"].shape[0] == S + 1
    assert out["5.weight"].is_contiguous(), out["5.weight"].stride()
    assert all(_cl(out["0.weight"][i]) and _cl(out["2.weight"][i]) for i in range(S + 1))
    flat = un.bank
    for i in range(S + 1):
        got = torch.cat([out[n][i].reshape(-1) for n, _ in model.named_parameters()])
        assert torch.equal(got, flat[i])
