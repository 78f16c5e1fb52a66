"""``functionalize`` calls ``functional_call`` without its per-call untying pass only where no tensor is tied (stop 61):
the tied names still follow the flat vector, and an untied model's values are the untying call's to every bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.stateless as stateless
from torch import nn

from mcmc_unlearner.curvature import ParamSpec, _Call, call_with, functionalize, tied_tensors


class SharedWeight(nn.Module):
    """An encoder whose weight the decoder reads under a second name (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3, bias=False)
        self.dec = nn.Linear(3, 4, bias=False)
        self.dec.weight = self.enc.weight  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x) @ self.dec.weight


class TwiceRegistered(nn.Module):
    """One layer applied twice, registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class SharedBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]))
        self.inner = nn.Module()
        self.inner.register_buffer("scale", self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.inner.scale


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize(
    ("make", "tied"), [(SharedWeight, True), (TwiceRegistered, True), (SharedBuffer, True), (_mlp, False)]
)
def test_tied_tensors_finds_a_tensor_under_two_names(make, tied: bool) -> None:
    torch.manual_seed(0)
    assert tied_tensors(make()) is tied
    assert tied_tensors(_Call(make(), lambda m, x: m(x))) is tied  # as functionalize reads it, through its wrapper


@pytest.mark.parametrize("make", [SharedWeight, TwiceRegistered])
def test_a_tied_weight_follows_the_flat_vector_under_every_name(make) -> None:
    # the model evaluated with the vector's values copied in: every name of the tied weight reads them (called
    # without tying, the decoder's name would keep the module's own weight)
    torch.manual_seed(1)
    model = make()
    x = torch.randn(6, 3 if make is TwiceRegistered else 4)
    theta = ParamSpec.flatten_module(model) + 0.5 * torch.randn(ParamSpec.of(model).dim)
    f = functionalize(model, lambda m, rows: m(rows))
    moved = copy.deepcopy(model)
    ParamSpec.assign(moved, theta)
    assert torch.equal(f(theta, x), moved(x))
    assert not torch.equal(f(theta, x), model(x))  # (the vector moved the output)


def test_an_untied_model_skips_the_untying_pass_with_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    model = _mlp()
    x = torch.randn(7, 3)
    theta = ParamSpec.flatten_module(model) + 0.1 * torch.randn(ParamSpec.of(model).dim)
    wrapper = _Call(model, lambda m, rows: m(rows))
    params = {"m." + k: v for k, v in ParamSpec.of(model).unflatten(theta).items()}
    tying = call_with(wrapper, params, (x,), strict=False)  # torch's default: tie_weights=True
    calls = []
    untie = stateless._untie_named_tensors_map
    monkeypatch.setattr(stateless, "_untie_named_tensors_map", lambda *a: calls.append(1) or untie(*a))
    f = functionalize(model, lambda m, rows: m(rows))
    assert torch.equal(f(theta, x), tying)
    assert calls == []
    tied = functionalize(SharedWeight(), lambda m, rows: m(rows))  # a tied model still goes through it
    tied(ParamSpec.flatten_module(SharedWeight()), torch.randn(2, 4))
    assert calls == [1]
