"""The Bernoulli likelihood (``binary_cross_entropy_with_logits``): detection, K-FAC's factors and the dense GGN's Λ
against float64 references (issue 11: a binary classifier's K-FAC fell back to the empirical Fisher)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.backends.ggn import output_ggn
from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.kronecker import KroneckerCurvature, Likelihood, detect_likelihood

torch.set_num_threads(1)
D64 = torch.float64


def bce_squeezed(m, b):  # a [B, 1] output squeezed to [B], integer 0/1 labels converted by the nll
    return F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1].float(), reduction="none")


def bce_column(m, b):  # a [B, 1] output against [B, 1] targets
    return F.binary_cross_entropy_with_logits(m(b[0]), b[1].float()[:, None], reduction="none")[:, 0]


def bce_multi(m, b):  # multi-label [B, K]
    return F.binary_cross_entropy_with_logits(m(b[0]), b[1], reduction="none").sum(1)


def _rows(k: int, dtype=torch.float32, soft: bool = False, rows: int = 8) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 5, generator=g, dtype=dtype)
    shape = (rows,) if k == 0 else (rows, k)
    y = torch.rand(shape, generator=g, dtype=dtype) if soft else torch.randint(0, 2, shape, generator=g)
    return x, y


def _model(k: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, max(k, 1))).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_bce_on_b_b1_and_bk_outputs_is_detected_as_bernoulli(dtype) -> None:
    m1 = _model(1, dtype)
    x, y = _rows(0, dtype)
    assert detect_likelihood(m1, bce_squeezed, (x, y)) == (Likelihood.BERNOULLI, {})
    assert detect_likelihood(m1, bce_column, (x, y)) == (Likelihood.BERNOULLI, {})
    squeezed = nn.Sequential(m1, nn.Flatten(0))  # the model itself returns [B]

    def bce_b(m, b):
        return F.binary_cross_entropy_with_logits(m(b[0]), b[1].to(dtype), reduction="none")

    assert detect_likelihood(squeezed, bce_b, (x, y)) == (Likelihood.BERNOULLI, {})
    assert detect_likelihood(squeezed, bce_b, (x, y.to(dtype))) == (Likelihood.BERNOULLI, {})  # float 0/1
    mk = _model(3, dtype)
    for soft in (False, True):
        xk, yk = _rows(3, dtype, soft=soft)
        yk = yk.to(dtype)
        assert detect_likelihood(mk, bce_multi, (xk, yk)) == (Likelihood.BERNOULLI, {})
    # a mean over the K labels: a constant factor 1/K, and per-row weights from a batch field
    kind, extra = detect_likelihood(mk, lambda m, b: bce_multi(m, b) / 3, (xk, yk))
    assert kind is Likelihood.BERNOULLI and math.isclose(extra["scale"], 1 / 3, rel_tol=1e-5)
    w = torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.5
    kind, extra = detect_likelihood(mk, lambda m, b: b[2] * bce_multi(m, b), (xk, yk, w))
    assert kind is Likelihood.BERNOULLI and extra == {"weights": 2}


def test_near_misses_of_bce_are_not_read_as_bernoulli() -> None:
    m1 = _model(1)
    x, y = _rows(0)

    def pos_weighted(m, b):
        z = m(b[0]).squeeze(-1)
        return F.binary_cross_entropy_with_logits(z, b[1].float(), reduction="none", pos_weight=torch.tensor(3.0))

    def focal(m, b):
        z = m(b[0]).squeeze(-1)
        ce = F.binary_cross_entropy_with_logits(z, b[1].float(), reduction="none")
        return (1 - torch.exp(-ce)) ** 2 * ce

    def hinge_like(m, b):  # depends on y, but not as BCE
        z = m(b[0]).squeeze(-1)
        return F.softplus(1 - (2 * b[1].float() - 1) * z)

    for nll in (pos_weighted, focal, hinge_like):
        kind, extra = detect_likelihood(m1, nll, (x, y))
        assert kind is Likelihood.EMPIRICAL, (nll.__name__, kind)
        assert "Bernoulli" in extra["reason"]
    # a Gaussian regression whose targets lie in [0, 1] stays Gaussian
    xs, ys = _rows(0, soft=True)

    def gauss(m, b):
        return 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2

    assert detect_likelihood(m1, gauss, (xs, ys))[0] is Likelihood.GAUSSIAN


def _energy(model, nll, batch, n, prior_std=0.7):
    B = batch[0].shape[0]

    def e(m, *b):
        return (n / B) * nll(m, b).sum() + 0.5 * sum((p**2).sum() for p in m.parameters()) / prior_std**2

    f = functionalize(model, e)
    theta = ParamSpec.flatten_module(model)
    return torch.autograd.functional.hessian(lambda t: f(t, *batch), theta)


def _dense(K: KroneckerCurvature) -> torch.Tensor:
    return K @ torch.eye(K.dim, dtype=D64)


@pytest.mark.parametrize("k", [1, 3])
def test_kfac_with_the_exact_expectation_is_the_ggn_of_one_row_of_a_linear_model(k) -> None:
    """One row of a linear layer: A⊗G with G = diag(p(1 − p)) is Jᵀ diag(p(1 − p)) J, the BCE's Hessian."""
    torch.manual_seed(1)
    model = nn.Linear(4, k).double()
    x = torch.randn(1, 4, dtype=D64)
    y = torch.rand(1, k, dtype=D64)  # soft targets: the Hessian does not depend on them
    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(
        model, theta[None], [(x, y)], n=30, nll=bce_multi,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()) / 0.49, mc_samples=k,
    )  # fmt: skip
    assert K.info["likelihood"] == "bernoulli" and K.info["label_expectation"] == "exact"
    assert "likelihood_fallback" not in K.info
    torch.testing.assert_close(_dense(K), _energy(model, bce_multi, (x, y), 30), atol=1e-10, rtol=1e-10)
    # and, written out: 30·Jᵀ diag(p(1 − p)) J + I/0.49 with J the [K, D] Jacobian of the logits
    J = torch.autograd.functional.jacobian(functionalize(model, lambda m: m(x)[0]), theta)
    p = torch.sigmoid(model(x)[0]).detach()
    ref = 30 * J.T @ torch.diag(p * (1 - p)) @ J + torch.eye(theta.numel(), dtype=D64) / 0.49
    torch.testing.assert_close(_dense(K), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("sampling", ["labels", "gaussian"])
def test_monte_carlo_bernoulli_factor_is_within_sampling_error_of_the_exact_one(sampling) -> None:
    """G from M samples per row is within 4.5 standard errors (closed form per sampler) of diag(mean p(1 − p))."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=D64)
    batch = (x, torch.zeros(5, 3, dtype=D64))
    theta = ParamSpec.flatten_module(model)
    M = 400
    common = {"likelihood": "bernoulli", "nll": bce_multi}
    exact = KroneckerCurvature.build(model, theta[None], [batch], n=10, exact_expectation=True, **common)
    mc = KroneckerCurvature.build(
        model, theta[None], [batch], n=10, mc_samples=M, exact_expectation=False, sampling=sampling,
        generator=torch.Generator().manual_seed(0), **common,
    )  # fmt: skip
    assert mc.info["label_expectation"] == "mc" and mc.info["backward_passes"] == M
    (be,), (bm,) = exact.blocks, mc.blocks
    p = torch.sigmoid(model(x)).detach()
    h = p * (1 - p)  # [row, out]
    G_exact = torch.diag(h.mean(0))
    torch.testing.assert_close(be.QG @ torch.diag(be.lG) @ be.QG.T, G_exact, atol=1e-12, rtol=1e-10)
    off = h[:, :, None] * h[:, None, :]  # Var(s_a s_b), a ≠ b, s independent with mean 0: h_a h_b
    if sampling == "labels":  # s = p − ŷ: E[s⁴] = h((1 − p)³ + p³)
        on = h * ((1 - p) ** 3 + p**3) - h**2
    else:  # Gaussian: E[s⁴] = 3h²
        on = 2 * h**2
    var = off.clone()
    var[:, range(3), range(3)] = on
    se = (var.sum(0) / (M * 25)).sqrt()
    z = (bm.QG @ torch.diag(bm.lG) @ bm.QG.T - G_exact).abs() / se
    assert float(z.max()) < 4.5, z
    assert float(z.max()) > 0.0


def test_output_ggn_bernoulli_equals_a_torch_func_reference() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 5, dtype=D64)
    theta = ParamSpec.flatten_module(model)
    out = functionalize(model, lambda m, xi: m(xi))
    Js = torch.func.vmap(torch.func.jacrev(lambda t, r: out(t, r[None])[0]), in_dims=(None, 0))(theta, x)  # [R, K, D]
    p = torch.sigmoid(out(theta, x)).detach()
    w = torch.linspace(0.5, 2.0, 9, dtype=D64)
    ref = torch.einsum("r,rkd,rk,rke->de", w, Js, p * (1 - p), Js)
    got = output_ggn(model, theta, x, Likelihood.BERNOULLI, budget=4096, weights=w)  # rows in chunks
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    # the GGN of BCE is the Hessian of the loss with the network linearised (for any targets)
    y = torch.rand(9, 3, dtype=D64)
    z0 = out(theta, x).detach()

    def lin(t):
        z = z0 + torch.einsum("rkd,d->rk", Js, t - theta)
        return (w * F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(1)).sum()

    torch.testing.assert_close(got, hessian(lin, theta), atol=1e-10, rtol=1e-10)


def test_the_ggn_solver_uses_the_bernoulli_ggn_and_says_so() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(30, 4, dtype=D64)
    y = (x[:, 0] > 0).long()
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.02 * torch.randn(4, theta.numel(), dtype=D64)
    un = MCMCUnlearner(model, nll=bce_squeezed, bank=bank, solver="ggn")
    report = un.remove((x[:4], y[:4]), [(x[4:], y[4:])], n_remaining=26)
    assert report.info["ggn_likelihood"] == "bernoulli" and report.info["ggn_curvature"] == "ggn"


def test_kfac_on_a_binary_classifier_uses_the_bernoulli_fisher_and_the_label_check_says_why_it_did_not_run() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(40, 4)
    y = (x[:, 0] > 1.2).long()
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.02 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(model, nll=bce_squeezed, bank=bank, solver="kfac")
    gone = y == 1  # every positive row: label 1 is emptied
    with pytest.warns(UserWarning, match="binary cross-entropy"):
        info = un.propose((x[gone], y[gone]), (x[~gone], y[~gone])).report.info
    assert "kfac_likelihood_fallback" not in info
    assert "EMPIRICAL" not in info["kfac_fisher"]
    assert "[1]" in info["emptied_labels"] and "binary cross-entropy" in info["emptied_labels"]
