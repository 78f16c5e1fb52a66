"""The emptied label's draw (``mcmc_unlearner.emptied``) on logits that are a fixed multiple of a sum of ``nn.Linear``
outputs (heads averaged, one head mean-pooled over positions, a constant scale) and under a class-weighted
cross-entropy.

Each conditional is checked against the model itself: ``U(v) = −log p(θ with row c = v) + Σ_i ω_i CE(model(x_i),
y_i)`` and its gradient by autograd through ``model`` in float64, at random rows ``v``; the draws against known
Gaussian moments (the heads' rows' differences, which the data does not see) and against the equivalent plain
head's draw, number for number; and the unlearner draws them where it said "not done" before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.emptied import (
    _BlockPrior,
    _ChunkPrior,
    _Conditional,
    _features,
    output_rows,
    resample_label_rows,
)
from test_emptied_label import _softmax_regression

pytestmark = pytest.mark.filterwarnings("ignore:this request removes")


class _Averaged(nn.Module):
    """``k`` ``nn.Linear`` heads on a shared tanh layer, the logits their mean."""

    def __init__(self, d_in: int = 3, h: int = 4, classes: int = 4, k: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, h), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(h, classes) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.stack([head(z) for head in self.heads]).mean(0)


class _TokenMean(nn.Module):
    """One head applied to each of ``T`` tokens (``x`` read as ``[n, T, d]``), the logits their mean."""

    def __init__(self, d: int = 3, classes: int = 4, tokens: int = 2) -> None:
        super().__init__()
        self.tokens, self.head = tokens, nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x.view(x.shape[0], self.tokens, -1))).mean(1)


class _Scaled(nn.Module):
    """The logits times a constant (or, ``per_row``, times a factor that depends on the row: no fixed multiple)."""

    def __init__(self, inner: nn.Module, per_row: bool = False) -> None:
        super().__init__()
        self.inner, self.per_row = inner, per_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * ((1 + x.square().sum(1, keepdim=True)) if self.per_row else 2.0)


def _data(n: int = 60, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # labels 0-2; label 3 in no row


def _conditional(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: int, weights: torch.Tensor | None = None):
    """The draw's conditional for label ``c`` at ``model``'s parameters (N(0, I) prior), with ``U`` by autograd through
    ``model`` itself: ``(cond, index, U_true)``."""
    spec, theta = ParamSpec.of(model), ParamSpec.flatten_module(model).detach()
    lp_f = functionalize(model, lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()))
    rows = output_rows(model, spec, theta, x)
    assert not isinstance(rows, str), rows
    d, n, C = rows.width, x.shape[0], rows.module.out_features
    phi, logits = torch.zeros(1, d, n, dtype=torch.float64), torch.empty(1, n, C, dtype=torch.float64)
    assert _features(model, spec, rows, theta, x, phi[0], logits[0]) is None
    index = rows.index(c)
    gens = [torch.Generator().manual_seed(0)]
    cond = _Conditional(_ChunkPrior(_BlockPrior(lp_f, index), theta[None], gens), phi, logits, y, c, weights)

    def u_true(v: torch.Tensor) -> torch.Tensor:
        t = theta.index_put((index,), v)
        out = functional_call(model, spec.unflatten(t), (x,))
        h = F.cross_entropy(out, y, reduction="none")
        return (h if weights is None else h * weights).sum() - lp_f(t)

    return cond, index, theta, u_true


@pytest.mark.parametrize("form", ["averaged heads", "token mean", "scaled", "class-weighted"])
def test_the_conditional_is_the_models_own_by_autograd(form) -> None:
    """``U`` and ``∇U`` of label 3's row (every head's row 3 together where heads are averaged) equal, up to a
    constant, ``−log p − Σ_i ω_i log softmax(model(x_i))_{y_i}`` by autograd through the model, in float64, at the
    sample's row and at rows moved far from it (the plain conditional's features would miss by a factor or a head)."""
    torch.manual_seed(1)
    x, y = _data(d=6 if form == "token mean" else 3)
    weights = None
    model: nn.Module = {
        "averaged heads": lambda: _Averaged(),
        "token mean": lambda: _TokenMean(),
        "scaled": lambda: _Scaled(nn.Linear(3, 4)),
        "class-weighted": lambda: nn.Linear(3, 4),
    }[form]().double()
    if form == "class-weighted":
        weights = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[y]
    cond, index, theta, u_true = _conditional(model, x, y, 3, weights)
    want_d = {"averaged heads": 3 * 5, "token mean": 4, "scaled": 4, "class-weighted": 4}[form]
    assert index.numel() == want_d
    v0 = theta[index].double()
    g = torch.Generator().manual_seed(2)
    vs = torch.stack([v0, *(v0 + 3 * torch.randn(3, want_d, generator=g, dtype=torch.float64))])
    for v in vs:
        u, grad, _ = cond(v[None])
        vv = v.clone().requires_grad_(True)
        true = u_true(vv)
        (true_grad,) = torch.autograd.grad(true, vv)
        u0, true0 = cond(v0[None])[0], u_true(v0)
        assert float(u - u0) == pytest.approx(float((true - true0).detach()), rel=1e-10, abs=1e-9)
        assert torch.allclose(grad[0], true_grad, rtol=1e-10, atol=1e-10)


def test_a_token_mean_heads_draw_is_the_plain_heads_on_the_mean_features() -> None:
    """``mean_t(W h_t + b) = W mean_t(h_t) + b``: the mean-pooled head's draws equal, to float rounding, those of a
    plain ``nn.Linear`` on the tokens' mean features with the same parameters (whose draw the quadrature tests
    check), sample for sample."""
    torch.manual_seed(3)
    x, y = _data(d=6)
    pooled = _TokenMean().double()

    class _MeanFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 4).double()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(t.view(t.shape[0], 2, -1)).mean(1))

    plain = _MeanFirst()
    plain.load_state_dict(pooled.state_dict())
    g = torch.Generator().manual_seed(4)
    thetas = ParamSpec.flatten_module(pooled).detach() + 0.3 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    draws = []
    for model in (pooled, plain):
        lp_f = functionalize(model, lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()))
        out, stats = resample_label_rows(
            model, ParamSpec.of(model), lp_f, thetas, (x, y), [3], torch.Generator().manual_seed(5)
        )
        draws.append((out, stats))
    assert output_rows(pooled, ParamSpec.of(pooled), thetas[0], x).pooled
    assert not output_rows(plain, ParamSpec.of(plain), thetas[0], x).pooled
    assert not torch.equal(draws[0][0], thetas)
    assert torch.allclose(draws[0][0], draws[1][0], rtol=1e-7, atol=1e-7)
    assert draws[0][1]["remaining_nll_after"] == pytest.approx(draws[1][1]["remaining_nll_after"], rel=1e-9)


def test_averaged_heads_rows_keep_their_prior_spread_apart() -> None:
    """Three heads on the same features, averaged: the data sees only the mean of their rows 3, so under the N(0, I)
    prior the difference of two heads' rows keeps its prior N(0, 2I) (known moments), whatever the data; their mean
    is pushed down by the remaining rows. 400 draws (copies of one sample): the differences' mean within 4 standard
    errors of 0 and their variance within 25% of 2 (a draw of one head's row alone, or of the three as one, would
    leave the differences' variance at 1 or 0)."""
    torch.manual_seed(6)
    x, y = _data()
    model = _Averaged().double()
    spec, theta = ParamSpec.of(model), ParamSpec.flatten_module(model).detach()
    lp_f = functionalize(model, lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()))
    S = 400
    out, _ = resample_label_rows(model, spec, lp_f, theta.repeat(S, 1), (x, y), [3], torch.Generator().manual_seed(7))
    rows = output_rows(model, spec, theta, x)
    idx = rows.index(3).view(3, 5)  # per head: its 4 weights and its bias
    keep = torch.ones(theta.numel(), dtype=torch.bool)
    keep[idx.flatten()] = False
    assert torch.equal(out[:, keep], theta.repeat(S, 1)[:, keep])  # nothing else moves
    v = out[:, idx]  # [S, 3, 5]
    diff = (v[:, 0] - v[:, 1]).flatten()
    assert abs(float(diff.mean())) <= 4 * (2.0 / diff.numel()) ** 0.5
    assert float(diff.var()) == pytest.approx(2.0, rel=0.25)
    with torch.no_grad():  # the bias' mean over heads: pushed below its prior mean 0 by the remaining rows
        assert float(v[:, :, 4].mean()) < -0.5


def test_a_logit_that_is_no_fixed_multiple_is_still_refused_with_the_reason() -> None:
    """Logits scaled by a factor that depends on the row are no fixed multiple of the head's output: no draw, and
    the reason names what would be drawn."""
    model = _Scaled(nn.Linear(3, 4), per_row=True).double()
    x, _ = _data()
    spec, theta = ParamSpec.of(model), ParamSpec.flatten_module(model).detach()
    why = output_rows(model, spec, theta, x)
    assert isinstance(why, str) and "not the output of an nn.Linear" in why and "fixed multiple" in why


@pytest.mark.parametrize("form", ["averaged heads", "class-weighted"])
def test_the_unlearner_draws_averaged_heads_and_class_weighted_rows(form) -> None:
    """The softmax regression whose labels 2 and 3 go in one request, held back by a fixed damping: with its head
    copied into three averaged heads (the same model), or under a class-weighted cross-entropy, the default now
    draws the labels' rows ("not done" before: not an ``nn.Linear``'s output / not the plain cross-entropy) in every
    head, every other parameter is the refused proposal's, and the labels' probabilities fall (the class-weighted
    one's below one half: the request passes)."""
    model, nll, log_prior, bank, x, y = _softmax_regression(seed=1)
    gone = y >= 2
    removed, remaining = (x[gone], y[gone]), (x[~gone], y[~gone])
    if form == "averaged heads":
        net: nn.Module = _Averaged(h=3).double()
        net.trunk = nn.Identity()
        bank = [{f"heads.{k}.{n}": t.clone() for k in range(3) for n, t in s.items()} for s in bank]
    else:
        net = model
        w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
        nll = lambda m, b: F.cross_entropy(m(b[0]), b[1], weight=w, reduction="none")  # noqa: E731
    kw = dict(nll=nll, log_prior=log_prior, bank=bank, seed=0, damping=100.0)
    before = MCMCUnlearner(net, **kw, emptied_label="refuse").propose(removed, remaining)
    assert before.report.problems
    un = MCMCUnlearner(net, **kw)
    prop = un.propose(removed, remaining)
    info = prop.report.info
    assert info["emptied_label_resample"] == "drawn: 2,3", info["emptied_label_resample"]
    assert all(info["emptied_labels"][c] < before.report.info["emptied_labels"][c] for c in "23")
    if form == "class-weighted":
        assert not prop.report.problems and max(info["emptied_labels"].values()) < 0.5
    else:  # the mean of three N(0, I) rows has the prior N(0, I/3): label 2, whose centre lies beyond both remaining
        # classes, keeps more mass under this model's retrained posterior (0.88 -> 0.82; label 3: 0.70 -> 0.48)
        assert info["emptied_labels"]["3"] < 0.5
    spec = ParamSpec.of(net)
    rows = output_rows(net, spec, prop.live, x)
    drawn = torch.cat([rows.index(2), rows.index(3)]).sort().values
    assert (prop.bank != before.bank).any(0).nonzero().flatten().tolist() == drawn.tolist()


class _Refined(nn.Module):
    """Logits ``a(h) + b(a(h))``: the two heads' outputs sum to the logits, but ``b``'s input is ``a``'s output, so
    the logits are not linear in ``a``'s rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        return z + self.b(z)


class _NormScaled(nn.Module):
    """Logits ``fc(h) / ‖W‖``: a multiple of the head's output at any one point, the multiple computed from the very
    rows the draw moves."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / self.fc.weight.norm()


@pytest.mark.parametrize("form", ["a head on a head's output", "a scale from the head's weights"])
def test_logits_not_linear_in_the_heads_rows_are_refused(form) -> None:
    """Both match the pooled form at the parameters read (the logits are ``α`` times the heads' outputs summed), but
    moving the heads' rows does not move the logits as the conditional's ``z_ic = φ̃_i·v`` says: their conditional
    missed the model's own ``U`` by 7 and 12 nats at a row moved by N(0, I). Refused, naming why, as a head the draw
    cannot sample."""
    torch.manual_seed(8)
    model = (_Refined() if form == "a head on a head's output" else _NormScaled()).double()
    x, y = _data()
    spec, theta = ParamSpec.of(model), ParamSpec.flatten_module(model).detach()
    why = output_rows(model, spec, theta, x)
    assert isinstance(why, str) and "not linear in the output heads' rows" in why, why
    lp_f = functionalize(model, lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()))
    said = resample_label_rows(model, spec, lp_f, theta[None], (x, y), [3], torch.Generator().manual_seed(0))
    assert said == why


def test_class_weights_of_one_on_the_removed_label_get_the_weighted_draw() -> None:
    """Class weights 1 on the removed label and on the next (the labels the likelihood probe tries on the removed
    rows) read as the plain cross-entropy there; the remaining rows' check found otherwise and the row was not drawn
    ("not the plain cross-entropy ... on the remaining rows"; 'Found, not fixed' at stop 64). Read again on the
    remaining rows, the weights are found and the row is drawn under them: the NLL the draw measured before it is
    the weighted one of the samples it started from (the refused proposal's), by hand, to 1e-9."""
    from mcmc_unlearner.kronecker import row_weights

    model, _, log_prior, bank, x, y = _softmax_regression(seed=1, classes=5)
    gone = y == 3
    removed, remaining = (x[gone], y[gone]), (x[~gone], y[~gone])
    w = torch.tensor([2.0, 0.5, 3.0, 1.0, 1.0], dtype=torch.float64)  # 1 on label 3 and on 4 = (3 + 1) % 5

    def nll(m: nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1], weight=w, reduction="none")

    kw = dict(nll=nll, log_prior=log_prior, bank=bank, seed=0, damping=100.0)
    before = MCMCUnlearner(model, **kw, emptied_label="refuse").propose(removed, remaining)
    un = MCMCUnlearner(model, **kw)
    prop = un.propose(removed, remaining)
    info = prop.report.info
    assert un._label_link[0] == {}  # read as plain on the removed rows
    assert info["emptied_label_resample"] == "drawn: 3", info["emptied_label_resample"]
    assert row_weights(remaining, {"class_weights": w.tolist()}) is not None
    spec = ParamSpec.of(model)
    starts = torch.cat([before.bank, before.live[None]])
    per = [
        float(
            (
                w[remaining[1]]
                * F.cross_entropy(
                    functional_call(model, spec.unflatten(t), (remaining[0],)), remaining[1], reduction="none"
                )
            ).mean()
        )
        for t in starts
    ]
    want = sum(per) / len(per)
    assert info["emptied_label_resample_remaining_nll_before"] == pytest.approx(want, rel=1e-9)
    plain = sum(
        float(F.cross_entropy(functional_call(model, spec.unflatten(t), (remaining[0],)), remaining[1])) for t in starts
    ) / len(starts)
    assert abs(plain - want) > 1e-3 * abs(want)  # the weighted NLL, not the plain one
