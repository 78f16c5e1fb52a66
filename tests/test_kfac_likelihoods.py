"""Likelihoods inside ``nll`` that K-FAC and the GGN recognise (tuple/dict outputs, a temperature, label
smoothing, a constant factor, per-row weights from a batch field, per-class ``weight=``) against the dense float64
GGN, and the empirical-Fisher fallback told to the user."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from _banks import langevin_bank
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.backends.ggn import output_ggn
from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.kronecker import KroneckerCurvature, Likelihood, detect_likelihood

D64 = torch.float64


class Head(nn.Module):
    """A linear softmax/regression head whose forward returns the output as a tensor, a dict or a tuple."""

    def __init__(self, kind: str = "tensor", out: int = 3) -> None:
        super().__init__()
        self.fc, self.kind = nn.Linear(4, out), kind

    def forward(self, x: torch.Tensor):
        z = self.fc(x)
        if self.kind == "dict":
            return {"features": x, "logits": z}
        if self.kind == "tuple":
            return x.sum(1), z
        return z

    def logits(self, out):
        return out["logits"] if self.kind == "dict" else out[1] if self.kind == "tuple" else out


def _ce(z, b, T=1.0, eps=0.0):
    return F.cross_entropy(z / T, b[1], reduction="none", label_smoothing=eps)


# name: (model kind, per-row loss of the logits z and batch b, likelihood, weighted batch?, Gaussian targets?)
CASES: dict[str, tuple[str, Callable, Likelihood, bool, bool]] = {
    "dict": ("dict", lambda z, b: _ce(z, b), Likelihood.CATEGORICAL, False, False),
    "tuple": ("tuple", lambda z, b: _ce(z, b), Likelihood.CATEGORICAL, False, False),
    "temperature": ("tensor", lambda z, b: _ce(z, b, T=2.5), Likelihood.CATEGORICAL, False, False),
    "label smoothing": ("tensor", lambda z, b: _ce(z, b, eps=0.2), Likelihood.CATEGORICAL, False, False),
    "constant factor": ("tensor", lambda z, b: 0.5 * _ce(z, b), Likelihood.CATEGORICAL, False, False),
    "row weights": ("tensor", lambda z, b: b[2] * _ce(z, b), Likelihood.CATEGORICAL, True, False),
    "class weights": (  # cross_entropy(weight=w): each row's label's weight (found by probing every label)
        "tensor",
        lambda z, b: F.cross_entropy(z, b[1], weight=torch.tensor([0.5, 2.0, 1.5], dtype=z.dtype), reduction="none"),
        Likelihood.CATEGORICAL,
        False,
        False,
    ),
    "dict, temperature, weights": ("dict", lambda z, b: b[2] * _ce(z, b, T=0.7), Likelihood.CATEGORICAL, True, False),
    "gaussian, weights": (
        "tensor",
        lambda z, b: b[2] * (((z - b[1]) ** 2).sum(1) / (2 * 0.4**2) + 1.0),
        Likelihood.GAUSSIAN,
        True,
        True,
    ),
}


def _setup(name: str, rows: int, seed: int = 0):
    kind, loss, lik, weighted, gaussian = CASES[name]
    torch.manual_seed(seed)
    model = Head(kind).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, dtype=D64, generator=g)
    y = torch.randn(rows, 3, dtype=D64, generator=g) if gaussian else torch.randint(0, 3, (rows,), generator=g)
    batch = (x, y, 0.5 + torch.rand(rows, dtype=D64, generator=g)) if weighted else (x, y)

    def nll(m, b):
        return loss(m.logits(m(b[0])), b)

    return model, nll, loss, lik, batch


def _dense_ggn(model: Head, loss: Callable, batch: tuple) -> torch.Tensor:
    """``Σ_r J_rᵀ ∇²_z ℓ_r J_r``: the logits' Jacobian and the loss's Hessian in the logits, row by row, float64."""
    theta = ParamSpec.flatten_module(model)
    logits = functionalize(model, lambda m, x: m.logits(m(x)))
    G = torch.zeros(theta.numel(), theta.numel(), dtype=D64)
    for r in range(batch[0].shape[0]):
        row = tuple(t[r : r + 1] for t in batch)
        J = jacobian(lambda t, row=row: logits(t, row[0])[0], theta)
        z = logits(theta, row[0]).detach()
        L = hessian(lambda z, row=row: loss(z, row).sum(), z)[0, :, 0, :]
        G += J.T @ L @ J
    return G


@pytest.mark.parametrize("name", list(CASES))
def test_kfac_on_one_row_is_the_dense_ggn_of_the_recognised_likelihood(name: str) -> None:
    """One row at one linear layer with the exact label expectation: K-FAC is the GGN exactly (it was the
    empirical Fisher, gradients at the true label, for all of these)."""
    model, nll, loss, lik, batch = _setup(name, rows=1)
    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=1, nll=nll, exact_expectation=True)
    assert K.info["likelihood"] == lik.value and "likelihood_fallback" not in K.info
    ref = _dense_ggn(model, loss, batch)
    torch.testing.assert_close(K @ torch.eye(K.dim, dtype=D64), ref, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_output_ggn_with_the_detected_link_is_the_dense_ggn(name: str) -> None:
    """Several rows (each with its own weight): the GGN backend's ``Σ_r w_r J_rᵀΛ_rJ_r`` with what
    ``detect_likelihood`` found is the dense GGN of the user's loss."""
    from mcmc_unlearner.kronecker import row_weights  # new with the detected links

    model, nll, loss, lik, batch = _setup(name, rows=6, seed=1)
    kind, extra = detect_likelihood(model, nll, batch)
    assert kind is lik
    theta = ParamSpec.flatten_module(model)
    got = output_ggn(
        model, theta, batch[0], kind, extra.get("sigma", 1.0), link=extra, weights=row_weights(batch, extra)
    )
    torch.testing.assert_close(got, _dense_ggn(model, loss, batch), rtol=1e-7, atol=1e-12)


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _requests(model, nll, solver, batch, bank, requests=2, **kw):
    """``requests`` removals of 3 rows each from ``batch``; returns the unlearner, the reports and the warnings."""
    un = MCMCUnlearner(model, nll=nll, log_prior=_prior, bank=bank, solver=solver, seed=0, **kw)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(requests):
            lo, n = 3 * k, batch[0].shape[0]
            removed = tuple(t[lo : lo + 3] for t in batch)
            rest = tuple(t[lo + 3 :] for t in batch)
            reports.append(un.remove(removed, [rest], n_remaining=n - lo - 3, strict=False))
    return un, reports, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def _fallback_warnings(caught) -> list:
    return [w for w in caught if "EMPIRICAL Fisher" in str(w.message)]


@pytest.mark.parametrize("solver", ["kfac", "ggn"])
def test_a_dict_output_with_a_temperature_gets_the_curvature_of_the_equivalent_plain_model(solver: str) -> None:
    """``nll = cross_entropy(model(x)["logits"] / T, y)`` removes exactly what the plain model returning
    ``logits / T`` does under K-FAC (the same Monte-Carlo draws) and the GGN; before, K-FAC took the empirical
    Fisher and the GGN the dense Hessian."""
    model, _, _, _, batch = _setup("dict", rows=40, seed=2)
    T = 1.7

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = model.fc

        def forward(self, x):
            return self.fc(x) / T

    def wrapped_nll(m, b):
        return F.cross_entropy(m(b[0])["logits"] / T, b[1], reduction="none")

    def plain_nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.05 * torch.randn(6, theta.numel(), dtype=D64, generator=torch.Generator().manual_seed(3))
    un_w, rep_w, caught = _requests(model, wrapped_nll, solver, batch, bank, requests=1)
    un_p, rep_p, _ = _requests(Plain(), plain_nll, solver, batch, bank, requests=1)
    assert not _fallback_warnings(caught) and rep_p[0].shift_norm > 0
    if solver == "kfac":
        assert rep_w[0].info["kfac_likelihood"] == "categorical"
        assert rep_w[0].info["kfac"]["likelihood_detected"]["output"] == "logits"
    else:
        assert rep_w[0].info["ggn_curvature"] == "ggn" and rep_w[0].info["ggn_likelihood"] == "categorical"
    torch.testing.assert_close(un_w.bank, un_p.bank, rtol=1e-9, atol=1e-12)


def test_the_empirical_fisher_fallback_is_warned_once_and_reported_on_every_request() -> None:
    """A multi-task head (cross-entropy on two logits plus a squared error on a third output) is no likelihood
    the detection knows: K-FAC falls back to the empirical Fisher and says so, with what to do."""
    torch.manual_seed(4)
    model = Head("tensor").double()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 4, dtype=D64, generator=g), torch.randint(0, 2, (40,), generator=g)

    def multitask(m, b):
        z = m(b[0])
        return F.cross_entropy(z[:, :2], b[1], reduction="none") + 0.5 * (z[:, 2] - b[1].to(z.dtype)) ** 2

    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.05 * torch.randn(6, theta.numel(), dtype=D64, generator=g)
    _, reports, caught = _requests(model, multitask, "kfac", (x, y), bank)
    told = _fallback_warnings(caught)
    assert len(told) == 1  # once, though both requests used it
    for text in ("likelihood='categorical'", "solver='ggn'", "solver='cg'", "likelihood='empirical'"):
        assert text in str(told[0].message)
    for report in reports:
        assert report.info["kfac_likelihood"] == "empirical"
        assert report.info["kfac_likelihood_fallback"] == str(told[0].message)
    # stated by name, the choice is the user's: nothing to tell
    _, reports, caught = _requests(model, multitask, "kfac", (x, y), bank, likelihood="empirical")
    assert not _fallback_warnings(caught) and "kfac_likelihood_fallback" not in reports[0].info


def test_a_model_of_two_inputs_is_not_told_to_pass_the_likelihood_that_needs_one() -> None:
    """forward(x, mask): the fallback's fix was likelihood='categorical', which then failed with the forward's bare
    TypeError (stop 45's probes of a text model and of a dict-input model). The fix named is now one that works, and
    the categorical likelihood asked for says what it needs; nothing changes on the refusal. (A mask of the inputs'
    dtype is read since stop 61, the two fields packed into one: tests/test_kfac_several_inputs.py; a bool mask is
    not.)"""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, mask):
            return self.fc(x * mask)

    torch.manual_seed(5)
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 4, dtype=D64, generator=g), torch.randint(0, 3, (40,), generator=g)
    mask = torch.rand(40, 4, generator=g) > 0.2
    nll = lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2], reduction="none")  # noqa: E731
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.05 * torch.randn(6, theta.numel(), dtype=D64, generator=g)
    caught = _requests(model, nll, "kfac", (x, mask, y), bank, requests=1)[2]
    told = str(_fallback_warnings(caught)[0].message)
    assert "cannot be called on its own" in told and "let forward take the first field alone" in told
    assert "pass likelihood='categorical'" not in told
    assert "batch[2] does: put the labels second" in told  # the labels are read from batch[1] (the mask here)
    un = MCMCUnlearner(model, nll=nll, log_prior=_prior, bank=bank, solver="kfac", likelihood="categorical")
    with pytest.raises(ValueError, match=r"likelihood='categorical' takes the model's output from model\(batch\[0\]\)"):
        un.remove((x[:3], mask[:3], y[:3]), (x[3:], mask[3:], y[3:]))
    assert torch.equal(un.bank, bank)


def test_a_sequence_model_is_told_a_fix_that_works_not_the_categorical_likelihood() -> None:
    """A per-token cross-entropy over ``[B, T, V]`` logits, summed per sequence: the fallback told it to pass
    likelihood='categorical', which then refused the output's shape (stop 51's probe, a character GRU), and named
    solver='ggn' without its cost (the dense Hessian: over 400 s a request on 2,712 parameters). The categorical
    likelihood is now named only for a [B, C] output, the fix it names works when followed, and the categorical
    likelihood asked for by name says what it needs, nothing changed. Since stop 59 K-FAC reads this loss as the
    categorical likelihood at every position (``positions_fit``): no fallback, and the request passes."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 5)

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))  # [B, T, V]

    torch.manual_seed(6)
    model = Tokens().double()
    g = torch.Generator().manual_seed(6)
    seq = torch.randint(0, 5, (40, 7), generator=g)
    batch = (seq[:, :-1], seq[:, 1:])
    nll = lambda m, b: F.cross_entropy(m(b[0]).transpose(1, 2), b[1], reduction="none").sum(-1)  # noqa: E731
    # a sampled bank: the starting weights plus noise are not at equilibrium, the remaining energy rose along K-FAC's
    # step (bank slope -6.2 against G·x 2.0) and the slope test rightly held it back (stop 62)
    bank = langevin_bank(model, nll, _prior, batch, 6, 500)
    # stop 59: K-FAC reads this per-position cross-entropy as categorical (tests/test_kfac_positions.py checks it
    # against the dense GGN), so there is no fallback and no fix to name any more
    _, reports, caught = _requests(model, nll, "kfac", batch, bank, requests=1)
    assert not _fallback_warnings(caught)
    assert reports[0].info["kfac"]["likelihood"] == "categorical" and reports[0].passed
    _, reports, caught = _requests(model, nll, "cg", batch, bank, requests=1)  # the fix once named first
    assert reports[0].solver == "cg" and reports[0].passed and reports[0].shift_norm > 0


def test_ignore_index_rows_enter_no_kronecker_factor() -> None:
    """Rows labelled ``-100`` (``cross_entropy``'s ``ignore_index``) have no likelihood term: the factors built with
    them equal those of the labelled rows alone at ``n`` scaled to the labelled share (they made the curvature that
    of every row labelled, 1.5× with a third ignored), also with the diagonal parameters of a ``LayerNorm``, in row
    chunks and with a minibatch of ignored rows only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(39, 5, dtype=torch.float64), torch.randint(0, 3, (39,))
    y[::3] = -100
    keep = y >= 0
    theta = ParamSpec.flatten_module(model)
    thetas = theta + 0.01 * torch.randn(2, theta.numel(), dtype=torch.float64)

    def nll(m: nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    def dense(k: KroneckerCurvature) -> torch.Tensor:
        return torch.stack([k.matvec(e) for e in torch.eye(theta.numel(), dtype=torch.float64)])

    for kw in ({"mc_samples": 3}, {"mc_samples": 1}, {"mc_samples": 1, "sampling": "labels"}):
        ignored = dense(KroneckerCurvature.build(model, thetas, [(x, y)], 390, nll=nll, **kw))
        labelled = dense(KroneckerCurvature.build(model, thetas, [(x[keep], y[keep])], 260, nll=nll, **kw))
        assert torch.allclose(ignored, labelled, rtol=1e-10, atol=1e-12), kw
    one = KroneckerCurvature.build(model, thetas, [(x, y)], 390, nll=nll, mc_samples=3)
    chunks = KroneckerCurvature.build(model, thetas, [(x, y)], 390, nll=nll, mc_samples=3, row_chunk=7)
    assert torch.allclose(dense(chunks), dense(one), rtol=1e-10, atol=1e-12)
    none = torch.full_like(y, -100)
    half = KroneckerCurvature.build(model, thetas, [(x, y), (x, none)], 390, nll=nll, mc_samples=3)
    first = KroneckerCurvature.build(model, thetas[:1], [(x[keep], y[keep])], 130, nll=nll, mc_samples=3)
    assert half.info["rows"] == 78.0 and torch.allclose(dense(half), dense(first), rtol=1e-10, atol=1e-12)
