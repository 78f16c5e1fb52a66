"""Kronecker-factored curvature (MC-label K-FAC + diagonal fallback) against dense float64 references."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.kronecker import KroneckerCurvature, Likelihood, detect_likelihood, prior_precision

torch.set_num_threads(1)
D64 = torch.float64


def ce_nll(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def gauss_nll(sigma):
    def nll(m, b):
        out = m(b[0])
        return (out - b[1].reshape(out.shape)).pow(2).reshape(out.shape[0], -1).sum(1) / (2 * sigma**2) + 0.3

    return nll


def iso_prior(std):
    return lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()) / std**2


def dense(K: KroneckerCurvature) -> torch.Tensor:
    return K @ torch.eye(K.dim, dtype=D64)


def energy_hessian(model, nll, log_prior, batch, n):
    """Dense Hessian of −log p(θ) + (n/B)·Σ_i nll_i at the model's parameters, in float64."""
    B = batch[0].shape[0]
    f = functionalize(model, lambda m, *b: (n / B) * nll(m, b).sum() - (log_prior(m) if log_prior else 0.0))
    theta = ParamSpec.flatten_module(model)
    return torch.autograd.functional.hessian(lambda t: f(t, *batch), theta)


def factor(lam, Q):
    return torch.diag(lam) if Q is None else Q @ torch.diag(lam) @ Q.T


# ------------------------------------------------------------------------------------------ exactness
def test_one_example_linear_layer_equals_the_exact_ggn_hessian() -> None:
    """Softmax regression on one row: A⊗G with the exact label expectation is the Hessian of the energy."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    batch = (torch.randn(1, 4, dtype=D64), torch.tensor([1]))
    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(
        model, theta[None], [batch], n=50, nll=ce_nll, log_prior=iso_prior(0.5), exact_expectation=True
    )
    assert K.info["likelihood"] == "categorical" and K.info["label_expectation"] == "exact"
    H = energy_hessian(model, ce_nll, iso_prior(0.5), batch, 50)
    torch.testing.assert_close(dense(K), H, atol=1e-10, rtol=1e-10)
    v = torch.randn(theta.numel(), dtype=D64)
    for lam in (0.0, 0.1, 10.0):
        torch.testing.assert_close(K.solve(v, lam), torch.linalg.solve(H + lam * torch.eye(len(v), dtype=D64), v))


def test_linear_gaussian_regression_is_exact_and_equals_the_hessian() -> None:
    """Linear model + Gaussian likelihood: GGN = Hessian, and K-FAC is exact for any number of rows."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    x = torch.randn(7, 3, dtype=D64)
    batch = (x, model(x).detach() + torch.randn(7, 2, dtype=D64))
    theta = ParamSpec.flatten_module(model)
    nll = gauss_nll(0.7)
    # two outputs ≤ mc_samples=2: the exact expectation is used (it costs no more passes than sampling)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=30, nll=nll, log_prior=iso_prior(2.0), mc_samples=2)
    assert K.info["likelihood"] == "gaussian" and math.isclose(K.info["sigma"], 0.7, rel_tol=1e-9)
    assert K.info["label_expectation"] == "exact" and K.info["backward_passes"] == 2
    H = energy_hessian(model, nll, iso_prior(2.0), batch, 30)
    torch.testing.assert_close(dense(K), H, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(2, 3, 3, padding=1, stride=2, dilation=1), (2, 5, 5)),
        (nn.Conv2d(2, 3, 2, padding=1, padding_mode="reflect", dilation=2), (2, 4, 4)),
        (nn.Conv2d(2, 2, 3, padding="same", bias=False), (2, 4, 4)),
        (nn.Conv1d(2, 3, 3, padding=2, stride=2), (2, 7)),
        (nn.Linear(3, 2), (4, 3)),  # leading sequence dimension: 4 locations per row
        (nn.Conv2d(4, 2, 3, padding=0), (4, 4, 4)),  # 12 patches < 37 dimensions: the kept-rows (low-rank) path
    ],
)
def test_weight_shared_linear_layers_are_exact_for_gaussian_outputs(layer, shape) -> None:
    """A linear conv (or a linear layer over a sequence) with a Gaussian loss on every output location has the
    Hessian Σ_l a_l a_lᵀ ⊗ I/σ²: exactly the "expand" K-FAC n·L·A⊗G (checks unfolding, padding, stride)."""
    torch.manual_seed(2)
    model = layer.double()
    x = torch.randn(3, *shape, dtype=D64)
    batch = (x, model(x).detach() + torch.randn_like(model(x)))
    theta = ParamSpec.flatten_module(model)
    nll = gauss_nll(1.3)
    K = KroneckerCurvature.build(
        model, theta[None], [batch], n=9, nll=nll, log_prior=iso_prior(1.0), exact_expectation=True
    )
    assert list(K.info["kronecker"]) == [""] and K.info["diagonal_params"] == 0
    H = energy_hessian(model, nll, iso_prior(1.0), batch, 9)
    torch.testing.assert_close(dense(K), H, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("sampling", ["labels", "gaussian"])
def test_monte_carlo_samples_converge_to_the_exact_expectation(sampling) -> None:
    """G from M samples per row is within 4.5 standard errors (closed form per sampler) of the exact G."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=D64)
    batch = (x, torch.zeros(5, dtype=torch.long))
    theta = ParamSpec.flatten_module(model)
    M = 400
    common = {"likelihood": "categorical", "log_prior": iso_prior(1.0)}
    exact = KroneckerCurvature.build(model, theta[None], [batch], n=10, exact_expectation=True, **common)
    mc = KroneckerCurvature.build(
        model, theta[None], [batch], n=10, mc_samples=M, exact_expectation=False, sampling=sampling,
        generator=torch.Generator().manual_seed(0), **common,
    )  # fmt: skip
    assert mc.info["label_expectation"] == "mc" and mc.info["backward_passes"] == M
    assert mc.info["sampling"] == sampling
    (be,), (bm,) = exact.blocks, mc.blocks
    torch.testing.assert_close(factor(bm.lA, bm.QA), factor(be.lA, be.QA))  # inputs do not depend on labels
    p = torch.softmax(model(x), -1).detach()
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # output Hessian per row
    if sampling == "labels":  # s = p − e_ŷ, ŷ ~ p: moments of s_a s_b in closed form
        s = p[:, None, :] - torch.eye(3, dtype=D64)[None]  # [row, ŷ, out]
        prod = s[:, :, :, None] * s[:, :, None, :]
        var = (p[:, :, None, None] * prod**2).sum(1) - H**2
    else:  # Gaussian with covariance H (Isserlis): Var(s_a s_b) = H_aa H_bb + H_ab²
        d = torch.diagonal(H, dim1=1, dim2=2)
        var = d[:, :, None] * d[:, None, :] + H**2
    G_exact, se = H.mean(0), (var.sum(0) / (M * 25)).sqrt()
    torch.testing.assert_close(factor(be.lG, be.QG), G_exact)
    z = (factor(bm.lG, bm.QG) - G_exact).abs() / se
    assert float(z.max()) < 4.5, z
    assert float(z.max()) > 0.0  # it is a sampled estimate, not the exact value


# ------------------------------------------------------------------------------------------- algebra
class ConvBN(nn.Module):
    """Conv2d → BatchNorm (eval) → ReLU → Linear, with a raw scale parameter: blocks and diagonal fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.flatten(1)) * self.scale


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvBN().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_solve_inverts_matmul_and_the_curvature_is_positive_definite() -> None:
    model = conv_bn()
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.05 * torch.randn(3, theta.numel(), dtype=D64)
    batches = [(torch.randn(6, 1, 4, 4, dtype=D64), torch.randint(0, 4, (6,))) for _ in range(3)]
    K = KroneckerCurvature.build(model, thetas, batches, n=100, nll=ce_nll, log_prior=iso_prior(0.5))
    Kd = dense(K)
    torch.testing.assert_close(Kd, Kd.T, atol=1e-10, rtol=0)
    assert float(torch.linalg.eigvalsh(Kd).min()) >= 4.0 - 1e-8  # at least the prior precision 1/0.5²
    V = torch.randn(theta.numel(), 3, dtype=D64)
    for lam in (0.0, 1e-3, 1.0, 1e3):
        torch.testing.assert_close(K.solve(K @ V + lam * V, lam), V, atol=1e-9, rtol=1e-9)
        ref = torch.linalg.solve(Kd + lam * torch.eye(theta.numel(), dtype=D64), V)
        torch.testing.assert_close(K.solve(V, lam), ref, atol=1e-9, rtol=1e-9)
    x = V[:, 0]
    assert math.isclose(K.quad(x), float(x @ (K @ x)), rel_tol=1e-12)
    assert K.quad(x) > 0


@pytest.mark.parametrize("low_rank", [False, True])
def test_data_damping_scales_the_data_term_and_leaves_the_prior(low_rank: bool) -> None:
    """``solve(v, λ, data_damping=μ)`` is ``(P + (1 + μ)·K_data + λI)⁻¹ v`` of the dense float64 operator (``P`` =
    the operator at ``n = 0``), also where the eigenbasis is incomplete (there ``K`` is the prior alone), and
    ``quad(x, prior=False)`` is ``xᵀK_data x``."""
    torch.manual_seed(14)
    if low_rank:  # 30 inputs seen on 12 rows: kept-rows factors
        model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 3)).double()
        batches = [(torch.randn(6, 30, dtype=D64), torch.randint(0, 3, (6,))) for _ in range(2)]
    else:  # convolution, linear layer and a BatchNorm on the diagonal fallback
        model = conv_bn()
        batches = [(torch.randn(6, 1, 4, 4, dtype=D64), torch.randint(0, 4, (6,))) for _ in range(3)]
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.05 * torch.randn(len(batches), theta.numel(), dtype=D64)
    K = KroneckerCurvature.build(model, thetas, batches, n=150, nll=ce_nll, log_prior=iso_prior(0.6))
    Kd = dense(K)
    K.n = 0.0
    P = dense(K)
    K.n = 150
    torch.testing.assert_close(P, torch.eye(theta.numel(), dtype=D64) / 0.36, atol=1e-10, rtol=1e-10)
    data = Kd - P
    V = torch.randn(theta.numel(), 2, dtype=D64)
    eye = torch.eye(theta.numel(), dtype=D64)
    for lam, mu in ((0.0, 0.0), (0.0, 0.3), (0.0, 50.0), (2.0, 4.0)):
        ref = torch.linalg.solve(P + (1.0 + mu) * data + lam * eye, V)
        torch.testing.assert_close(K.solve(V, lam, data_damping=mu), ref, atol=1e-9, rtol=1e-9)
    x = V[:, 0].clone()
    assert math.isclose(K.quad(x, prior=False), float(x @ data @ x), rel_tol=1e-10)
    assert math.isclose(K.quad(x), float(x @ Kd @ x), rel_tol=1e-10)
    with pytest.raises(ValueError, match="data_damping"):
        K.solve(x, 0.0, data_damping=-1.0)


def test_n_rescales_the_data_term_without_rebuilding() -> None:
    model = conv_bn()
    theta = ParamSpec.flatten_module(model)
    batch = (torch.randn(5, 1, 4, 4, dtype=D64), torch.randint(0, 4, (5,)))
    K = KroneckerCurvature.build(model, theta[None], [batch], n=100, nll=ce_nll, log_prior=iso_prior(0.5))
    v = torch.randn(theta.numel(), dtype=D64)
    before = K @ v
    K.n = 40
    torch.testing.assert_close(K @ v, 4.0 * v + 0.4 * (before - 4.0 * v))
    assert K.solve(K @ v, 0.0).sub(v).abs().max() < 1e-9


def test_singular_curvature_asks_for_damping() -> None:
    model = nn.Linear(3, 2).double()
    batch = (torch.randn(1, 3, dtype=D64), torch.tensor([0]))
    K = KroneckerCurvature.build(model, ParamSpec.flatten_module(model)[None], [batch], n=1, likelihood="categorical")
    with pytest.raises(ValueError, match="damping > 0"):
        K.solve(torch.ones(K.dim, dtype=D64))
    assert torch.isfinite(K.solve(torch.ones(K.dim, dtype=D64), 0.1)).all()


def test_state_dict_round_trip_and_wrong_model() -> None:
    import json

    model = conv_bn()
    theta = ParamSpec.flatten_module(model)
    batch = (torch.randn(5, 1, 4, 4, dtype=D64), torch.randint(0, 4, (5,)))
    K = KroneckerCurvature.build(model, theta[None], [batch], n=100, nll=ce_nll, log_prior=iso_prior(0.5))
    tensors, meta = K.state_dict()
    meta = json.loads(json.dumps(meta))
    K2 = KroneckerCurvature.from_state_dict(conv_bn(1), tensors, meta)
    v = torch.randn(theta.numel(), dtype=D64)
    torch.testing.assert_close(K2.solve(v, 0.3), K.solve(v, 0.3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="parameters"):
        KroneckerCurvature.from_state_dict(nn.Linear(3, 2), tensors, meta)


# ----------------------------------------------------------------------------------- likelihood, prior
class Tiny(nn.Module):
    def __init__(self, out: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc(x))


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_detect_likelihood(dtype) -> None:
    torch.manual_seed(4)
    model = Tiny(out=3).to(dtype)
    x = torch.randn(10, 4, dtype=dtype)
    labels = (x, torch.randint(0, 3, (10,)))
    targets = (x, torch.randn(10, 3, dtype=dtype))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert detect_likelihood(model, ce_nll, labels) == (Likelihood.CATEGORICAL, {})
    # class probabilities as targets (one-hot or soft, cross_entropy's probability form): categorical, whose Fisher
    # does not depend on the targets (they got the empirical Fisher)
    one_hot = F.one_hot(labels[1], 3).to(dtype)
    soft = torch.softmax(torch.randn(10, 3, dtype=dtype, generator=torch.Generator().manual_seed(1)), 1)
    for probabilities in (one_hot, soft):
        kind, extra = detect_likelihood(model, ce_nll, (x, probabilities))
        assert kind is Likelihood.CATEGORICAL and extra == {"targets": "class probabilities"}
    smoothed = (lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none", label_smoothing=0.1), (x, one_hot))
    assert detect_likelihood(model, *smoothed)[0] is Likelihood.EMPIRICAL  # not a likelihood of these targets
    # int32 labels (the user's nll converts them): the probe crashed in cross_entropy, which takes int64 only
    as_int32 = (x, labels[1].to(torch.int32))
    assert detect_likelihood(model, lambda m, b: ce_nll(m, (b[0], b[1].long())), as_int32)[0] is Likelihood.CATEGORICAL
    for sigma in (0.05, 1.0, 3.0):
        kind, extra = detect_likelihood(model, gauss_nll(sigma), targets)
        assert kind is Likelihood.GAUSSIAN and math.isclose(
            extra["sigma"], sigma, rel_tol=1e-3 if dtype != D64 else 1e-9
        )
    # a tempered likelihood and label smoothing leave the softmax's output Hessian (times the factor): recognised,
    # with the fitted value (they got the empirical Fisher)
    rel = 1e-4 if dtype != D64 else 1e-9
    kind, extra = detect_likelihood(model, lambda m, b: 2.0 * ce_nll(m, b), labels)
    assert kind is Likelihood.CATEGORICAL and extra.keys() == {"scale"} and math.isclose(extra["scale"], 2, rel_tol=rel)
    smooth = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none", label_smoothing=0.1)  # noqa: E731
    kind, extra = detect_likelihood(model, smooth, labels)
    assert kind is Likelihood.CATEGORICAL and extra.keys() == {"label_smoothing"}
    assert math.isclose(extra["label_smoothing"], 0.1, rel_tol=10 * rel)
    w = torch.linspace(0.5, 2.0, 10, dtype=dtype)
    others = [
        (lambda m, b: ce_nll(m, b).square(), labels),  # not a likelihood the curvature knows
        (lambda m, b: w[: b[0].shape[0]] * gauss_nll(1.0)(m, b), targets),  # per-row weights not in the batch
        (lambda m, b: (m(b[0]) - b[1]).abs().sum(1), targets),  # Laplace
    ]
    for nll, batch in others:
        kind, extra = detect_likelihood(model, nll, batch)
        assert kind is Likelihood.EMPIRICAL and extra["reason"]
    with pytest.raises(ValueError, match="one value per row"):
        detect_likelihood(model, lambda m, b: ce_nll(m, b).sum(), labels)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the reason blames dropout only where there is active dropout (every module is in training mode by default)
    assert model.training and "dropout" not in detect_likelihood(model, others[0][0], labels)[1]["reason"]
    noisy = Tiny(out=3, dropout=0.5).to(dtype)
    assert "dropout makes forwards differ" in detect_likelihood(noisy, ce_nll, labels)[1]["reason"]


def test_prior_precision_measured_from_log_prior() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    theta = ParamSpec.flatten_module(model) + 0.3
    torch.testing.assert_close(prior_precision(model, iso_prior(0.2), theta), torch.full_like(theta, 25.0))
    stds = [0.1, 1.0, 0.5, 2.0]  # one σ per tensor, and a non-zero mean

    def per_layer(m):
        return sum(-0.5 * ((p - 0.7) ** 2).sum() / s**2 for p, s in zip(m.parameters(), stds))

    expected = torch.cat([torch.full((p.numel(),), 1 / s**2, dtype=D64) for p, s in zip(model.parameters(), stds)])
    torch.testing.assert_close(prior_precision(model, per_layer, theta), expected)
    assert torch.equal(prior_precision(model, None, theta), torch.zeros_like(theta))
    # anisotropic on a tensor (one σ per output row of the first weight): a local curvature inside its range
    rows = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=D64)

    def rowwise(m):
        return -0.5 * (rows[:, None] * m[0].weight ** 2).sum() - 0.5 * sum(
            (p**2).sum() for p in list(m.parameters())[1:]
        )

    P = prior_precision(model, rowwise, theta)
    assert 1.0 < float(P[0]) < 8.0 and torch.all(P[:12] == P[0])
    torch.testing.assert_close(P[12:], torch.ones_like(P[12:]))
    with pytest.warns(RuntimeWarning, match="clamped") as caught:
        P = prior_precision(model, lambda m: 0.5 * (m[0].weight ** 2).sum(), theta)
    assert torch.equal(P, torch.zeros_like(theta))
    # upwards along every tensor it depends on (here one): the sign is the likely mistake, and the warning says so
    assert "sign flipped" in str(caught[0].message)
    # upwards along one tensor, a proper Gaussian on another: a locally non-convex prior, no sign hint
    with pytest.warns(RuntimeWarning, match="clamped") as caught:
        P = prior_precision(model, lambda m: 0.5 * (m[0].weight ** 2).sum() - 0.5 * (m[0].bias ** 2).sum(), theta)
    assert "sign flipped" not in str(caught[0].message) and float(P[12]) == 1.0


def test_non_constant_prior_on_a_block_is_recorded() -> None:
    model = nn.Linear(3, 2).double()
    batch = (torch.randn(4, 3, dtype=D64), torch.randint(0, 2, (4,)))

    def prior(m):
        return -0.5 * (m.weight**2).sum() - 0.5 * 9.0 * (m.bias**2).sum()

    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=10, nll=ce_nll, log_prior=prior)
    assert K.info["prior"]["mean_used_on_blocks"] == [""]
    assert math.isclose(K.blocks[0].prior, (6 * 1.0 + 2 * 9.0) / 8)


# ------------------------------------------------------------------------------------------- coverage
class TinyEncoder(nn.Module):
    """Embedding → TransformerEncoderLayer (eager attention, eval) → mean pool → Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.layer(self.emb(tokens)).mean(1))


def exact_diag_fisher(model, x) -> torch.Tensor:
    """Mean over rows of Σ_c p_c (∇ log p_c)², per example and class, float64."""
    params = ParamSpec.params(model)
    total = torch.zeros(sum(p.numel() for p in params), dtype=D64)
    for i in range(x.shape[0]):
        logp = torch.log_softmax(model(x[i : i + 1]), -1)[0]
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            total += logp[c].exp().detach() * torch.cat([g.reshape(-1) for g in grads]) ** 2
    return total / x.shape[0]


def linear_bn1d_stale() -> nn.Module:
    """Linear → eval-mode BatchNorm1d whose running statistics are far below the activations' (a gain of ~5,
    the mean off: stop 70's ``frozenbuf``, statistics fitted at the initial weights) → ReLU → Linear."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.02, 0.06)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize(
    "which, sampling", [("conv_bn", "labels"), ("encoder", "gaussian"), ("linear_bn1d", "gaussian")]
)
def test_fallback_diagonal_matches_the_exact_diagonal_fisher(which, sampling) -> None:
    """Diagonal fallback (BN, Embedding, MHA, raw params) vs the per-example float64 diagonal Fisher, within
    5 standard errors estimated from 12 independent builds."""
    if which == "conv_bn":
        model, x = conv_bn(), torch.randn(6, 1, 4, 4, dtype=D64)
    elif which == "linear_bn1d":
        model, x = linear_bn1d_stale(), torch.randn(6, 5, dtype=D64)
    else:
        torch.manual_seed(6)
        model, x = TinyEncoder().double().eval(), torch.randint(0, 7, (6, 5))
    batch = (x, torch.zeros(6, dtype=torch.long))
    theta = ParamSpec.flatten_module(model)
    builds = [
        KroneckerCurvature.build(
            model, theta[None], [batch], n=1, likelihood="categorical", mc_samples=40, exact_expectation=False,
            sampling=sampling, generator=torch.Generator().manual_seed(r),
        )
        for r in range(12)
    ]  # fmt: skip
    info = builds[0].info
    if which == "conv_bn":
        assert set(info["kronecker"]) == {"conv", "fc"}
        assert set(info["diagonal"]) == {"bn.weight", "bn.bias", "scale"}
        assert "BatchNorm2d" in info["diagonal"]["bn.weight"]
    elif which == "linear_bn1d":
        assert set(info["kronecker"]) == {"0", "3"}
        assert set(info["diagonal"]) == {"1.weight", "1.bias"}
        assert "BatchNorm1d" in info["diagonal"]["1.weight"]
    else:
        assert set(info["kronecker"]) == {"layer.linear1", "layer.linear2", "head"}
        assert info["kronecker"]["layer.linear1"]["locations"] == 5  # every token is a location
        assert {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "emb.weight"} <= set(
            info["diagonal"]
        )
        assert "did not fire" in info["diagonal"]["layer.self_attn.out_proj.weight"]
        assert "MultiheadAttention" in info["diagonal"]["layer.self_attn.in_proj_weight"]
    idx = builds[0].diag_index
    est = torch.stack([b.diag_fisher for b in builds])
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(builds))
    exact = exact_diag_fisher(model, x)[idx]
    live = exact > 1e-12  # e.g. embedding rows of unused tokens have zero Fisher (and a zero estimate)
    assert torch.all(est[:, ~live].abs() < 1e-12)
    z = (mean - exact)[live].abs() / (se[live] + 1e-3 * exact[live])
    assert float(z.max()) < 5.0, float(z.max())


# ------------------------------------------------------------------------------------ side effects
def test_build_leaves_model_grads_and_rng_untouched() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3)).double()
    model.append(nn.Linear(8, 3).double())
    model.train()  # BatchNorm updates its running statistics and Dropout draws from the global RNG in training
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + torch.randn(2, theta.numel(), dtype=D64)
    batches = [(torch.randn(4, 1, 4, 4, dtype=D64), torch.randint(0, 3, (4,))) for _ in range(2)]
    rng = torch.get_rng_state()
    K = KroneckerCurvature.build(model, thetas, batches, n=5, nll=ce_nll, log_prior=iso_prior(1))
    assert K.info["model_training"] is True
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is g and torch.all(g == 0.5) for p, g in zip(model.parameters(), grads))
    KroneckerCurvature.memory_estimate(model, 64, batches[0])
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_input_is_refused_clearly() -> None:
    model = nn.Linear(3, 2).double()
    theta = ParamSpec.flatten_module(model)
    batch = (torch.randn(4, 3, dtype=D64), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="thetas must be"):
        KroneckerCurvature.build(model, torch.zeros(2, 5, dtype=D64), [batch], n=4, nll=ce_nll)
    with pytest.raises(ValueError, match="unknown likelihood"):
        KroneckerCurvature.build(model, theta[None], [batch], n=4, likelihood="poisson")
    with pytest.raises(ValueError, match="needs nll"):
        KroneckerCurvature.build(model, theta[None], [batch], n=4, likelihood="empirical")
    with pytest.raises(ValueError, match="one minibatch per draw"):
        KroneckerCurvature.build(model, theta[None].repeat(3, 1), [batch, batch], n=4, nll=ce_nll)
    with pytest.raises(ValueError, match="sigma"):
        KroneckerCurvature.build(model, theta[None], [batch], n=4, likelihood="gaussian")


def test_empirical_likelihood_is_labelled_and_uses_the_true_labels() -> None:
    """For a weighted nll the empirical Fisher of one row at one layer is exactly (∇h)(∇h)ᵀ = a aᵀ ⊗ g gᵀ."""
    torch.manual_seed(8)
    model = nn.Linear(3, 2).double()
    batch = (torch.randn(1, 3, dtype=D64), torch.tensor([1]))

    def nll(m, b):
        return 3.0 * ce_nll(m, b)

    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=1, nll=nll, likelihood="empirical")
    assert K.info["likelihood"] == "empirical" and "EMPIRICAL" in K.info["fisher"]
    assert "likelihood_fallback" not in K.info  # asked for by name: no fallback to report
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(nll(model, batch).sum(), list(model.parameters()))])
    torch.testing.assert_close(dense(K), torch.outer(g, g), atol=1e-12, rtol=1e-10)
    # detected (likelihood="auto"), the factor 3 is a scaled categorical: the GGN 3·Jᵀ(diag p − ppᵀ)J, exactly
    K = KroneckerCurvature.build(model, theta[None], [batch], n=1, nll=nll, exact_expectation=True)
    assert K.info["likelihood"] == "categorical" and math.isclose(K.info["likelihood_detected"]["scale"], 3.0)
    p = torch.softmax(model(batch[0])[0].detach(), 0)
    J = torch.autograd.functional.jacobian(lambda t: functionalize(model, lambda m, x: m(x))(t, batch[0])[0], theta)
    torch.testing.assert_close(dense(K), 3.0 * J.T @ (torch.diag(p) - torch.outer(p, p)) @ J, atol=1e-12, rtol=1e-8)


# ------------------------------------------------------------------------------------------- reduce
def test_reduce_over_two_halves_equals_one_build() -> None:
    """Two "ranks" holding half the rows each, summing every statistic, build the single-process curvature."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).double()
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.1 * torch.randn(2, theta.numel(), dtype=D64)
    batches = [(torch.randn(8, 1, 4, 4, dtype=D64), torch.randint(0, 4, (8,))) for _ in range(2)]
    kw = {"n": 50, "nll": ce_nll, "log_prior": iso_prior(1.0), "exact_expectation": True}
    full = KroneckerCurvature.build(model, thetas, batches, **kw)
    sent: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:  # rank 0's contribution, handed to rank 1's all-reduce
        sent.append(t.clone())
        return t

    KroneckerCurvature.build(model, thetas, [tuple(t[:4] for t in b) for b in batches], **kw, reduce=record)
    other = iter(sent)
    halves = KroneckerCurvature.build(
        model, thetas, [tuple(t[4:] for t in b) for b in batches], **kw, reduce=lambda t: t + next(other)
    )
    # A, G and two location sums per layer; squared gradients and rows; first of all, the likelihood each rank's
    # rows identify (one flag per Likelihood: every rank the same; categorical here), then two flags per candidate
    # layer (on a shared code, called: every rank the same blocks; none on a code, both called here), then one flag
    # per layer read outside its module (summed so that every rank leaves the same layers out; none here)
    assert len(sent) == 3 + 4 * 2 + 2
    assert sent[0].tolist() == [float(k is Likelihood.CATEGORICAL) for k in Likelihood]
    assert sent[1].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert sent[2].tolist() == [0.0, 0.0]
    assert next(other, None) is None
    torch.testing.assert_close(dense(halves), dense(full), atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------- memory
_PEAK_SCRIPT = """
import json, sys, torch
from torch import nn
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import KroneckerCurvature

def vm(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

torch.set_num_threads(1)
torch.manual_seed(10)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
    nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10),
).eval()
rows = 128
batch = (torch.randn(rows, 3, 32, 32), torch.randint(0, 10, (rows,)))
theta = ParamSpec.flatten_module(model)
nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())
estimate = KroneckerCurvature.memory_estimate(model, rows, batch)
KroneckerCurvature.build(model, theta[None], [batch], n=1000, nll=nll, log_prior=prior)  # one-off start-up costs
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the next build's peak shows in the RSS
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = vm("VmRSS")
KroneckerCurvature.build(model, theta[None], [batch], n=1000, nll=nll, log_prior=prior)
print(json.dumps({"estimate": estimate, "peak": vm("VmHWM") - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_memory_estimate_is_within_a_factor_two_of_the_measured_peak() -> None:
    """Peak RSS growth of a build (VmHWM after resetting it through /proc/self/clear_refs) vs the estimate, in a
    fresh process after a warm-up build and malloc_trim (so neither one-off start-up costs nor heap pages kept by
    the allocator from earlier work hide or inflate the build's own peak)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    estimate, peak = got["estimate"], got["peak"]
    print(f"estimate {estimate / 2**20:.1f} MiB, measured peak RSS growth {peak / 2**20:.1f} MiB")
    assert estimate / 2 <= peak <= 2 * estimate, (estimate / 2**20, peak / 2**20)


def test_subsampled_input_factor_is_unbiased() -> None:
    """max_locations draws whole rows uniformly: the average of the subsampled A over builds is the full A."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(72, 3)).double()
    theta = ParamSpec.flatten_module(model)
    batch = (torch.randn(16, 1, 6, 6, dtype=D64), torch.randint(0, 3, (16,)))
    kw = {"n": 10, "likelihood": "categorical", "exact_expectation": True}
    full = KroneckerCurvature.build(model, theta[None], [batch], max_locations=None, **kw)
    A_full = factor(full.blocks[0].lA, full.blocks[0].QA)
    samples = []
    for r in range(100):
        K = KroneckerCurvature.build(
            model, theta[None], [batch], max_locations=72, generator=torch.Generator().manual_seed(r), **kw
        )
        samples.append(factor(K.blocks[0].lA, K.blocks[0].QA))
    assert K.info["kronecker"]["0"]["A_locations_used"] == 72  # 2 of the 16 rows, 36 locations each
    assert K.info["kronecker"]["0"]["locations"] == 36  # the data term still counts every location
    torch.testing.assert_close(factor(K.blocks[1].lA, K.blocks[1].QA), factor(full.blocks[1].lA, full.blocks[1].QA))
    A = torch.stack(samples)
    z = (A.mean(0) - A_full).abs() / (A.std(0) / math.sqrt(len(samples)) + 1e-12)
    assert float(z.max()) < 5.0, float(z.max())
    assert float((A[0] - A_full).abs().max()) > 1e-3  # a subsample, not the full sum


def test_cached_eigenbasis_coordinates_follow_in_place_changes() -> None:
    """solve/quad reuse the eigenbasis coordinates of recent tensors; an in-place change must invalidate them."""
    model = conv_bn()
    theta = ParamSpec.flatten_module(model)
    batch = (torch.randn(5, 1, 4, 4, dtype=D64), torch.randint(0, 4, (5,)))
    K = KroneckerCurvature.build(model, theta[None], [batch], n=100, nll=ce_nll, log_prior=iso_prior(0.5))
    Kd = dense(K)
    eye = torch.eye(K.dim, dtype=D64)
    v = torch.randn(K.dim, dtype=D64)
    for lam in (0.5, 2.0):
        x = K.solve(v, lam)
        torch.testing.assert_close(x, torch.linalg.solve(Kd + lam * eye, v))
        assert math.isclose(K.quad(x), float(x @ Kd @ x), rel_tol=1e-12)  # from the cached coordinates
    v.mul_(3.0).add_(1.0)  # in place: the cached coordinates of v are stale now
    torch.testing.assert_close(K.solve(v, 0.5), torch.linalg.solve(Kd + 0.5 * eye, v))
    x.add_(1.0)
    assert math.isclose(K.quad(x), float(x @ Kd @ x), rel_tol=1e-12)
    y = K @ v
    torch.testing.assert_close(K.solve(y, 0.0), v)


@pytest.mark.parametrize("conv", [False, True])
def test_low_rank_factors_from_few_rows_equal_the_full_eigendecomposition(conv: bool) -> None:
    """A layer seen on fewer rows (or convolution patches) than its width keeps them and decomposes their Gram
    matrix instead; the operator equals the one built from summed factors (forced by a reduce, which must sum)."""
    torch.manual_seed(12)
    if conv:  # 8 channels × 3×3 patches + bias = 73 dimensions, 2×2 output locations × 12 rows = 48 patches
        model = nn.Sequential(nn.Conv2d(8, 40, 3), nn.Tanh(), nn.Flatten(), nn.Linear(160, 3)).double()
        shape, ranks = (8, 4, 4), ("rank 48", "full eigenbasis")
    else:
        model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 3)).double()
        shape, ranks = (30,), ("rank 12", "rank 12")
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.1 * torch.randn(2, theta.numel(), dtype=D64)
    batches = [(torch.randn(6, *shape, dtype=D64), torch.randint(0, 3, (6,))) for _ in range(2)]
    kw = {"n": 200, "nll": ce_nll, "log_prior": iso_prior(0.7)}
    low = KroneckerCurvature.build(model, thetas, batches, **kw)
    full = KroneckerCurvature.build(model, thetas, batches, **kw, reduce=lambda t: t)
    assert ranks[0] in low.info["kronecker"]["0"]["A"] and ranks[1] in low.info["kronecker"]["0"]["G"]
    assert full.info["kronecker"]["0"]["A"] == "full eigenbasis"
    Kd = dense(full)
    torch.testing.assert_close(dense(low), Kd, atol=1e-9, rtol=1e-9)
    V = torch.randn(theta.numel(), 2, dtype=D64)
    for lam in (0.0, 0.5):
        ref = torch.linalg.solve(Kd + lam * torch.eye(theta.numel(), dtype=D64), V)
        torch.testing.assert_close(low.solve(V, lam), ref, atol=1e-9, rtol=1e-9)
    x = V[:, 0].clone()
    assert math.isclose(low.quad(x), float(x @ Kd @ x), rel_tol=1e-10)
    assert math.isclose(low.quad(low.solve(x, 0.5)), float(low.solve(x, 0.5) @ Kd @ low.solve(x, 0.5)), rel_tol=1e-10)


def test_cost_is_one_backward_per_draw_and_label_sample_whatever_the_class_count() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 100)).double()
    theta = ParamSpec.flatten_module(model)
    batches = [(torch.randn(4, 5, dtype=D64), torch.randint(0, 100, (4,))) for _ in range(3)]
    K = KroneckerCurvature.build(model, theta[None].repeat(3, 1), batches, n=10, nll=ce_nll, mc_samples=2)
    assert K.info["backward_passes"] == 3 * 2 and K.info["forward_passes"] == 3
    assert K.info["label_expectation"] == "mc"


def test_tied_weights_fall_back_to_the_diagonal() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.mid(self.emb(tokens))))

    torch.manual_seed(14)
    model = Tied().double()
    batch = (torch.randint(0, 6, (5,)), torch.randint(0, 6, (5,)))
    theta = ParamSpec.flatten_module(model)
    K = KroneckerCurvature.build(model, theta[None], [batch], n=10, nll=ce_nll, log_prior=iso_prior(1.0))
    assert list(K.info["kronecker"]) == ["mid"]
    assert "tied" in K.info["diagonal"]["emb.weight"]
    V = torch.randn(theta.numel(), 2, dtype=D64)
    torch.testing.assert_close(K.solve(K @ V, 0.1), V - 0.1 * K.solve(V, 0.1), atol=1e-10, rtol=1e-10)


def test_factor_eigendecomposition_survives_a_lapack_failure_and_refuses_nan(monkeypatch) -> None:
    """``eigh`` failing to converge (seen on float32 LeNet-5 factors of Fashion-MNIST) falls back to the SVD, which
    decomposes a PSD factor exactly the same way; a factor with NaN entries is refused with a clear error."""
    import mcmc_unlearner.kronecker as K
    from mcmc_unlearner.errors import SolverDivergedError

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g)
    X[:, 5] = X[:, 4]  # a repeated direction: rank-deficient, repeated (zero) eigenvalues
    M = X.T @ X
    lam, Q = K._psd_eigh(M)
    assert torch.allclose((Q * lam) @ Q.T, M, atol=1e-4)

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    lam2, Q2 = K._psd_eigh(M)
    assert torch.allclose((Q2 * lam2) @ Q2.T, M, atol=1e-4)
    assert torch.allclose(lam2, lam, atol=1e-4) and bool((lam2[1:] >= lam2[:-1]).all())  # ascending, as eigh
    M[2, 3] = float("nan")
    with pytest.raises(SolverDivergedError, match="Kronecker factor has NaN"):
        K._psd_eigh(M)


def test_backend_scale_reuses_its_probes_across_n() -> None:
    """``tr K / D`` of a reused K-FAC at another ``n`` equals a fresh Rademacher probe, without a product."""
    from mcmc_unlearner.backends.kfac import KFACBackend

    model = conv_bn()
    theta = ParamSpec.flatten_module(model)
    batch = (torch.randn(5, 1, 4, 4, dtype=D64), torch.randint(0, 4, (5,)))
    K = KroneckerCurvature.build(model, theta[None], [batch], n=100, nll=ce_nll, log_prior=iso_prior(0.5))

    def fresh(n: float) -> float:  # the estimate as one probe at this n
        K.n = n
        g = torch.Generator().manual_seed(0)
        z = (torch.randint(0, 2, (K.dim, 4), generator=g) * 2 - 1).to(D64)
        return float((z * (K @ z)).sum() / (z * z).sum())

    want = {n: fresh(n) for n in (100, 40)}
    backend = KFACBackend()
    backend._dtype, backend._pending, backend._n = D64, (K, 1), 100
    assert math.isclose(backend.scale(), want[100], rel_tol=1e-12)
    calls = []
    K._apply = lambda *a, **k: calls.append(1)  # any further product would be recorded (and break the result)
    backend._scale, backend._n = None, 40  # what prepare() does when it reuses the factors for a smaller n
    assert math.isclose(backend.scale(), want[40], rel_tol=1e-12) and not calls
    # the prior alone, 1/0.5² = 4 per coordinate, is the n = 0 limit; the data term adds a positive trace
    assert want[40] > 4.0 and math.isclose((want[100] - 4.0) / (want[40] - 4.0), 2.5, rel_tol=1e-9)


def test_a_users_forward_hook_on_a_layer_does_not_change_its_factors() -> None:
    """K-FAC reads each layer's own output: a forward hook of the user's that transforms it (here tanh, as a hook)
    must give the factors of the same function written without the hook (the library's hook runs first)."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    hooked = nn.Sequential(nn.Linear(5, 7), nn.Identity(), nn.Linear(7, 3)).double()
    hooked.load_state_dict(plain.state_dict())
    hooked[0].register_forward_hook(lambda m, args, out: torch.tanh(out))
    batches = [(torch.randn(9, 5, dtype=D64), torch.randint(0, 3, (9,))) for _ in range(2)]
    theta = ParamSpec.flatten_module(plain)
    thetas = theta[None] + 0.05 * torch.randn(2, theta.numel(), dtype=D64)
    with torch.no_grad():
        torch.testing.assert_close(hooked(batches[0][0]), plain(batches[0][0]))  # the same function
    Ks = [
        KroneckerCurvature.build(m, thetas, batches, n=50, nll=ce_nll, log_prior=iso_prior(0.5), exact_expectation=True)
        for m in (plain, hooked)
    ]
    torch.testing.assert_close(dense(Ks[1]), dense(Ks[0]), atol=1e-10, rtol=1e-10)


def test_a_hook_computed_weight_is_named_as_such_in_the_diagonal_reasons() -> None:
    """``torch.nn.utils.weight_norm``/``spectral_norm`` compute the layer's weight from other parameters in a
    pre-hook: the reason said "its forward hook did not fire (the weight is used directly, e.g. through F.linear
    inside MultiheadAttention)", which sent the user looking for the wrong cause."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.utils.spectral_norm(nn.Linear(6, 3)))
    x = torch.randn(10, 4)
    theta = ParamSpec.flatten_module(model)
    info = KroneckerCurvature.build(
        model, theta[None], [(x, torch.zeros(10, dtype=torch.long))], n=10, likelihood="categorical", mc_samples=2
    ).info
    for name in ("0.weight_g", "0.weight_v", "2.weight_orig"):
        assert "computed from other parameters by a hook" in info["diagonal"][name], info["diagonal"][name]
        assert "did not fire" not in info["diagonal"][name]


def test_a_prior_without_curvature_is_said_to_give_the_curvature_no_prior_term() -> None:
    """A Laplace prior has zero curvature almost everywhere: K-FAC and the GGN took it as flat without a word (the
    report's prior notes said "curved: 0"; stop 46's probe)."""
    import warnings

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for prior in (
        lambda m: -sum(p.abs().sum() for p in m.parameters()) / 0.1,  # Laplace
        lambda m: -sum(p.sum() for p in m.parameters()),  # linear in the parameters
    ):
        with pytest.warns(RuntimeWarning, match="no curvature at the samples"):
            P = prior_precision(model, prior, theta)
        assert torch.equal(P, torch.zeros_like(theta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Gaussian prior, and a prior that is not a function of the parameters
        prior_precision(model, lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), theta)
        prior_precision(model, lambda m: torch.tensor(3.0), theta)


# ------------------------------------------------------------------------------------------ float32 eigh
def _eigh_calls(monkeypatch) -> list[tuple[int, torch.dtype]]:
    """Record the width and dtype of every ``torch.linalg.eigh`` call."""
    calls, eigh = [], torch.linalg.eigh

    def spy(M, *args, **kwargs):
        calls.append((M.shape[-1], M.dtype))
        return eigh(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return calls


@pytest.mark.parametrize("rows", [700, 520])  # the 601-wide factor itself / its 520-wide Gram matrix
def test_wide_float32_factor_is_decomposed_in_float32_and_solves_like_float64(monkeypatch, rows) -> None:
    """A float32 factor (or Gram matrix) at least ``EIGH_FLOAT32_FROM_DIM`` wide is decomposed in float32; the K-FAC
    solve then matches the dense float64 solve of the same K-FAC (built from a float64 copy of the model) as closely as
    a float64 decomposition of the same float32 factors does, up to ``10·eps₃₂·cond(K + λI)`` relative."""
    import mcmc_unlearner.kronecker as KR

    assert KR.EIGH_FLOAT32_FROM_DIM <= 520
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(600, 3)
    with torch.no_grad():
        model.weight.copy_(0.05 * torch.randn(3, 600, generator=g))
    x = torch.randn(rows, 600, generator=g) * torch.logspace(0, -3, 600)  # a spread-out spectrum
    y = torch.randint(0, 3, (rows,), generator=g)

    def build(m: nn.Module, b: tuple) -> KroneckerCurvature:
        theta = ParamSpec.flatten_module(m)
        return KroneckerCurvature.build(
            m, theta[None], [b], n=1000, nll=ce_nll, log_prior=iso_prior(1.0), exact_expectation=True
        )

    calls = _eigh_calls(monkeypatch)
    K32 = build(model, (x, y))
    assert (rows if rows < 601 else 601, torch.float32) in calls  # the wide one in float32, the rest in float64
    assert all(d == torch.float64 for w, d in calls if w < KR.EIGH_FLOAT32_FROM_DIM)
    model64 = nn.Linear(600, 3).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    K64 = build(model64, (x.double(), y))
    monkeypatch.setattr(KR, "EIGH_FLOAT32_FROM_DIM", 10**9)
    K32_64 = build(model, (x, y))  # the same float32 factors, decomposed in float64
    v = torch.randn(K64.dim, generator=g, dtype=D64)
    damping = 1e-2
    H = dense(K64) + damping * torch.eye(K64.dim, dtype=D64)
    ref = torch.linalg.solve(H, v)
    err = float((K32.solve(v.float(), damping).double() - ref).norm() / ref.norm())
    err64 = float((K32_64.solve(v.float(), damping).double() - ref).norm() / ref.norm())
    # a backward-stable float32 eigh: eigenvalues off by ~eps·‖A‖, the solve by ~eps·cond(K + λI) more
    eig = torch.linalg.eigvalsh(H)
    bound = 10 * torch.finfo(torch.float32).eps * float(eig[-1] / eig[0])
    assert err <= err64 + bound and bound < 1e-3, (err, err64, bound)


def test_float32_eigh_falls_back_to_float64_when_it_fails_its_checks(monkeypatch) -> None:
    """A float32 decomposition that does not converge or fails its residual check is redone in float64."""
    import mcmc_unlearner.kronecker as KR

    g = torch.Generator().manual_seed(1)
    X = torch.randn(600, KR.EIGH_FLOAT32_FROM_DIM, generator=g)
    M = X.T @ X / 600
    lam64, Q64 = torch.linalg.eigh(M.double())
    eigh = torch.linalg.eigh

    def wrong(A, *args, **kwargs):  # float32: eigenvalues off by 1% (a residual of 1e-2 of the norm)
        lam, Q = eigh(A, *args, **kwargs)
        return (lam * 1.01, Q) if A.dtype == torch.float32 else (lam, Q)

    def fail(A, *args, **kwargs):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return eigh(A, *args, **kwargs)

    for bad in (wrong, fail):
        monkeypatch.setattr(torch.linalg, "eigh", bad)
        lam, Q = KR._psd_eigh(M)
        assert torch.equal(lam, lam64.float()) and torch.equal(Q, Q64.float())
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    lam, Q = KR._psd_eigh(M)  # the float32 decomposition passes
    assert not torch.equal(Q, Q64.float())
    assert float(((Q * lam) @ Q.T - M).norm() / M.norm()) < 1e-5


def test_narrow_factor_stays_on_the_float64_path_bit_for_bit() -> None:
    """Below ``EIGH_FLOAT32_FROM_DIM`` a float32 factor is decomposed exactly as before (float64 ``eigh``, cast back),
    and every Kronecker factor of the default experiments' networks is that narrow."""
    import sys
    from pathlib import Path

    import mcmc_unlearner.kronecker as KR
    from mcmc_unlearner.models.bnn import digits_net, lenet5, mlp

    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, KR.EIGH_FLOAT32_FROM_DIM - 1, generator=g)
    M = X.T @ X / 600
    lam, Q = KR._psd_eigh(M)
    lam64, Q64 = torch.linalg.eigh(M.double())
    assert torch.equal(lam, lam64.float()) and torch.equal(Q, Q64.float())
    # LeNet-5 on 28×28 (Fashion-)MNIST and 16×16 digits as the library and the model matrix (padding 2) build it,
    # the digits network and MLP, the model matrix's CNNs; a factor is a layer's (patch) inputs + 1 or its outputs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import model_matrix as mm

    nets = [lenet5(1, 10, input_size=28), lenet5(1, 10, input_size=16), digits_net(), mlp(64)]
    nets += [mm.lenet5(28), mm.lenet5(16), mm.bn_cnn((8, 16), 8), mm.bn_cnn((16, 32), 8)]
    widths = []
    for net in nets:
        for mod in net.modules():
            if isinstance(mod, nn.Linear):
                widths += [mod.in_features + 1, mod.out_features]
            elif isinstance(mod, nn.Conv2d):
                widths += [mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] + 1, mod.out_channels]
    assert max(widths) == 401 < KR.EIGH_FLOAT32_FROM_DIM
