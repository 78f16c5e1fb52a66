"""A model of several inputs (``forward(a, b)``, a Siamese pair, rows ``(a, b, y)``) gets the same K-FAC curvature
as its one-input rewrite (``forward(x)`` splitting ``x``): K-FAC packs the input fields into one and reads the
likelihood from the output, where it had taken the empirical Fisher (``model(batch[0])`` failed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import KroneckerCurvature

D64 = torch.float64


class _Pair(nn.Module):
    """Two branches of their own (the pair's first input is ``[B, 2, 3]``), one head of ``out`` outputs."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 5), nn.Linear(4, 5), nn.Linear(10, out)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.tanh(self.a(a.flatten(1))), torch.tanh(self.b(b))], 1)
        return self.head(h).squeeze(-1)


class _Packed(_Pair):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the rewrite the fallback's message asked for
        return super().forward(x[:, :6].reshape(-1, 2, 3), x[:, 6:])


def _case(kind: str):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 2, 3, generator=g, dtype=D64), torch.randn(40, 4, generator=g, dtype=D64)
    torch.manual_seed(3)
    two = _Pair(3 if kind == "categorical" else 1).double()
    one = _Packed(3 if kind == "categorical" else 1).double()
    one.load_state_dict(two.state_dict())
    if kind == "categorical":
        y = torch.randint(3, (40,), generator=g)

        def loss(out, t):
            return F.cross_entropy(out, t, reduction="none")
    else:
        y = torch.randint(2, (40,), generator=g)

        def loss(out, t):
            return F.binary_cross_entropy_with_logits(out, t.to(D64), reduction="none")

    theta = torch.cat([p.detach().flatten() for p in two.parameters()])
    thetas = theta + 0.1 * torch.randn(3, theta.numel(), generator=g, dtype=D64)
    return two, one, (a, b, y), thetas, loss


@pytest.mark.parametrize("kind", ["bernoulli", "categorical"])
def test_a_model_of_two_inputs_gets_its_one_input_rewrites_curvature(kind: str) -> None:
    two, one, (a, b, y), thetas, loss = _case(kind)
    before = {k: v.clone() for k, v in two.state_dict().items()}
    got = KroneckerCurvature.build(
        two, thetas, [(a, b, y)], 200, nll=lambda m, r: loss(m(r[0], r[1]), r[2]), exact_expectation=True
    )
    ref = KroneckerCurvature.build(
        one,
        thetas,
        [(torch.cat([a.flatten(1), b], 1), y)],
        200,
        nll=lambda m, r: loss(m(r[0]), r[1]),
        exact_expectation=True,
    )
    assert got.info["likelihood"] == ref.info["likelihood"] == kind and "likelihood_fallback" not in got.info
    assert got.info["input_fields"] == 2
    eye = torch.eye(ParamSpec.of(two).dim, dtype=D64)
    torch.testing.assert_close(got @ eye, ref @ eye, rtol=1e-10, atol=1e-12)
    named = KroneckerCurvature.build(  # the likelihood asked for by name: it called model(batch[0]) and refused
        two,
        thetas,
        [(a, b, y)],
        200,
        nll=lambda m, r: loss(m(r[0], r[1]), r[2]),
        likelihood=kind,
        exact_expectation=True,
    )
    torch.testing.assert_close(named @ eye, ref @ eye, rtol=1e-10, atol=1e-12)
    # the model is its own again: its forward, parameters and buffers as they were
    assert "forward" not in two.__dict__
    assert all(torch.equal(v, before[k]) for k, v in two.state_dict().items())
    assert two(a, b).shape[0] == 40


def test_fields_of_different_dtypes_are_not_packed() -> None:
    # token ids beside float features cannot share one tensor: the empirical Fisher, said as before
    two, _, (_, b, y), _, loss = _case("bernoulli")

    class _Ids(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.pair = nn.Embedding(5, 6), two

        def forward(self, ids: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.pair(self.emb(ids).reshape(-1, 2, 3), b)

    model = _Ids().double()
    ids = torch.randint(5, (40,), generator=torch.Generator().manual_seed(0))
    thetas = torch.cat([p.detach().flatten() for p in model.parameters()])[None]
    got = KroneckerCurvature.build(model, thetas, [(ids, b, y)], 200, nll=lambda m, r: loss(m(r[0], r[1]), r[2]))
    assert got.info["likelihood"] == "empirical" and "cannot be called on its own" in got.info["likelihood_fallback"]


class _Sequences(nn.Module):
    """A premise ``[B, L1, 2]`` and a hypothesis ``[B, L2, 2]``, each padded per minibatch, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(8, 3)

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.tanh(self.a(p)).mean(1), torch.tanh(self.b(q)).mean(1)], 1))


@pytest.mark.parametrize("lengths", [((5, 7), (7, 5)), ((5, 7), (6, 9))])
def test_fields_whose_shapes_change_between_minibatches_are_not_packed(lengths) -> None:
    # one packing for every minibatch: (5, 7) then (7, 5) were split as the first's, each branch reading the other's
    # tokens, every curvature read as if right; (5, 7) then (6, 9) failed in the forward (raised, where the
    # empirical Fisher had been taken). Both now take the empirical Fisher, as before the packing
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(16, l1, 2, generator=g, dtype=D64),
            torch.randn(16, l2, 2, generator=g, dtype=D64),
            torch.randint(3, (16,), generator=g),
        )
        for l1, l2 in lengths
    ]
    torch.manual_seed(0)
    model = _Sequences().double()
    thetas = torch.cat([p.detach().flatten() for p in model.parameters()])[None].repeat(2, 1)  # one draw per minibatch
    got = KroneckerCurvature.build(
        model, thetas, batches, 200, nll=lambda m, r: F.cross_entropy(m(r[0], r[1]), r[2], reduction="none")
    )
    assert got.info["likelihood"] == "empirical" and "input_fields" not in got.info
    assert "forward" not in model.__dict__
    # minibatches of one shape each are packed
    same = KroneckerCurvature.build(
        model, thetas, batches[:1] * 2, 200, nll=lambda m, r: F.cross_entropy(m(r[0], r[1]), r[2], reduction="none")
    )
    assert same.info["likelihood"] == "categorical" and same.info["input_fields"] == 2
