"""Curvature operators against dense float64 references (torch.autograd.functional.hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import (
    ParamSpec,
    SampleAveragedHessian,
    autograd_hvp,
    functionalize,
    stack_batches,
    top_eigenvalue,
)


class TinyLogReg(nn.Module):
    """Two-layer net with a nonlinearity so Hessians depend on the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 2)

    def nll(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.l2(torch.tanh(self.l1(x))), y, reduction="none")

    def log_prior(self):
        return -0.5 * sum((p**2).sum() for p in self.parameters())


def _energy(m, x, y):
    return m.nll((x, y)).sum() - m.log_prior()


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLogReg().double()
    spec = ParamSpec.of(model)
    thetas = torch.randn(5, spec.dim, dtype=torch.float64) * 0.5
    xs = torch.randn(5, 7, 3, dtype=torch.float64)
    ys = torch.randint(0, 2, (5, 7))
    return model, spec, thetas, xs, ys


def _dense_reference(f, thetas, xs, ys):
    hs = [torch.autograd.functional.hessian(lambda t, i=i: f(t, xs[i], ys[i]), thetas[i]) for i in range(len(thetas))]
    return torch.stack(hs).mean(0)


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_sample_averaged_hessian_matches_dense(backend: str) -> None:
    model, spec, thetas, xs, ys = _setup()
    f = functionalize(model, _energy)
    ref = _dense_reference(f, thetas, xs, ys)
    op = SampleAveragedHessian(f, thetas, (xs, ys), damping=0.3, backend=backend)
    v = torch.randn(spec.dim, dtype=torch.float64)
    assert torch.allclose(op @ v, ref @ v + 0.3 * v, atol=1e-10)
    V = torch.randn(spec.dim, 3, dtype=torch.float64)
    assert torch.allclose(op @ V, ref @ V + 0.3 * V, atol=1e-10)
    assert torch.allclose(op.dense(), ref + 0.3 * torch.eye(spec.dim, dtype=torch.float64), atol=1e-10)
    assert op.n_products >= 5


def test_auto_backend_falls_back_when_func_fails() -> None:
    model, spec, thetas, xs, ys = _setup(1)

    def energy_with_item(m, x, y):
        # .item() breaks torch.func transforms but not double backward
        scale = float(torch.ones(1).item())
        return scale * _energy(m, x, y)

    f = functionalize(model, energy_with_item)
    op = SampleAveragedHessian(f, thetas, (xs, ys), backend="auto")
    v = torch.randn(spec.dim, dtype=torch.float64)
    ref = _dense_reference(functionalize(model, _energy), thetas, xs, ys) @ v
    assert torch.allclose(op @ v, ref, atol=1e-10)


def test_auto_backend_preferring_autograd_matches_dense_and_falls_back_to_func() -> None:
    model, spec, thetas, xs, ys = _setup(4)
    f = functionalize(model, _energy)
    ref = _dense_reference(f, thetas, xs, ys)
    v = torch.randn(spec.dim, dtype=torch.float64)
    op = SampleAveragedHessian(f, thetas, (xs, ys), backend="auto", prefer="autograd")
    assert torch.allclose(op @ v, ref @ v, atol=1e-10) and op.backend == "autograd"

    def energy_func_only(m, x, y):
        # stand-in for an op without double-backward support: fails outside torch.func transforms
        if not torch._C._functorch.is_functorch_wrapped_tensor(next(m.parameters())):
            raise NotImplementedError("double backward not implemented (test stand-in)")
        return _energy(m, x, y)

    op = SampleAveragedHessian(functionalize(model, energy_func_only), thetas, (xs, ys), prefer="autograd")
    assert torch.allclose(op @ v, ref @ v, atol=1e-10) and op.backend == "func"
    with pytest.raises(ValueError, match="prefer"):
        SampleAveragedHessian(f, thetas, (xs, ys), prefer="jax")


def test_shared_args_and_sum_operator() -> None:
    model, spec, thetas, xs, ys = _setup(2)
    f = functionalize(model, _energy)
    op1 = SampleAveragedHessian(f, thetas, (xs[0], ys[0]), shared_args=True)
    ref1 = _dense_reference(f, thetas, xs[[0] * 5], ys[[0] * 5])
    op2 = SampleAveragedHessian(f, thetas, (xs, ys))
    ref2 = _dense_reference(f, thetas, xs, ys)
    v = torch.randn(spec.dim, dtype=torch.float64)
    assert torch.allclose((op1 + op2) @ v, (ref1 + ref2) @ v, atol=1e-10)


def test_autograd_hvp_and_flatten_round_trip() -> None:
    model, spec, thetas, xs, ys = _setup(3)
    f = functionalize(model, _energy)
    H = torch.autograd.functional.hessian(lambda t: f(t, xs[0], ys[0]), thetas[0])
    v = torch.randn(spec.dim, dtype=torch.float64)
    assert torch.allclose(autograd_hvp(f, thetas[0], v, xs[0], ys[0]), H @ v, atol=1e-10)
    ParamSpec.assign(model, thetas[1])
    assert torch.equal(ParamSpec.flatten_module(model), thetas[1])
    # functionalize evaluates at the given vector, not the module's current parameters
    assert torch.allclose(
        f(thetas[2], xs[0], ys[0]), (lambda: (ParamSpec.assign(model, thetas[2]), _energy(model, xs[0], ys[0]))[1])()
    )


def test_top_eigenvalue_power_iteration() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    evals = torch.linspace(0.1, 7.0, 12, dtype=torch.float64)
    evals[-1] = 12.0
    M = (q * evals) @ q.T
    lam = top_eigenvalue(lambda v: M @ v, 12, iters=200, generator=g, dtype=torch.float64, tol=1e-10)
    assert lam == pytest.approx(12.0, rel=1e-6)


def test_stack_batches_shapes() -> None:
    b = [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    x, y = stack_batches(b)
    assert x.shape == (3, 4, 2) and y.shape == (3, 4)


def test_lanczos_recovers_extreme_eigenpairs() -> None:
    from mcmc_unlearner.curvature import lanczos

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    evals = torch.cat(
        [torch.full((35,), 1.0, dtype=torch.float64), torch.tensor([5.0, 9.0, 20.0, 50.0, 100.0]).double()]
    )
    M = (q * evals) @ q.T
    vals, vecs = lanczos(lambda v: M @ v, 40, 12, generator=g, dtype=torch.float64)
    assert torch.allclose(vals[-5:], evals[-5:], rtol=1e-8)
    top = vecs[:, -1]
    assert torch.allclose(M @ top, 100.0 * top, atol=1e-6)


def test_low_rank_preconditioner_is_exact_for_spiked_spectrum_and_speeds_up_cg() -> None:
    from mcmc_unlearner.curvature import LowRankPreconditioner
    from mcmc_unlearner.solvers import cg

    g = torch.Generator().manual_seed(1)
    d = 200
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.full((d,), 3.0, dtype=torch.float64)
    evals[-10:] = torch.logspace(1, 4, 10, dtype=torch.float64)
    M = (q * evals) @ q.T
    P = LowRankPreconditioner.build(lambda v: M @ v, d, rank=20, probes=64, generator=g, dtype=torch.float64)
    assert P.c == pytest.approx(3.0, rel=0.05)  # Hutchinson estimate of the bulk, 64 probes
    v = torch.randn(d, generator=g, dtype=torch.float64)
    assert torch.allclose(P @ v, M @ v, rtol=0.06, atol=0.06 * float(v.norm()))
    b = torch.randn(d, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve(M, b)
    plain = cg(M, b, tol=1e-10, max_iter=500)
    pre = cg(M, b, tol=1e-10, max_iter=500, preconditioner=P.solve)
    assert torch.allclose(pre.x, ref, atol=1e-8) and torch.allclose(plain.x, ref, atol=1e-8)
    assert pre.iterations < plain.iterations / 2
    # zero iterations return the preconditioner's answer, with its residual measured
    zero = cg(M, b, max_iter=0, tol=1e-12, preconditioner=P.solve)
    assert zero.iterations == 0 and torch.allclose(zero.x, P.solve(b)) and zero.residual < 0.1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in torch 2.13
def test_products_through_a_torchscript_module_stay_right_after_its_graph_is_optimised() -> None:
    # TorchScript optimises a module's graph from its second call on; forward-over-reverse products through that
    # graph came back as zeros (the first product right, every later one 0), and so did the dense Hessian
    torch.manual_seed(21)
    eager = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    scripted = torch.jit.script(eager)
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 2, (30,))
    theta = ParamSpec.flatten_module(eager)
    thetas = theta[None] + 0.1 * torch.randn(3, theta.numel(), dtype=torch.float64)

    def nll(m, a, b):
        return nn.functional.cross_entropy(m(a), b, reduction="sum")

    fe = functionalize(eager, nll)
    ref = sum(torch.autograd.functional.hessian(lambda t: fe(t, x, y), t) for t in thetas) / 3
    op = SampleAveragedHessian(functionalize(scripted, nll), thetas, (x, y), shared_args=True)
    v = torch.randn(theta.numel(), dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(op @ v, ref @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.dense(), ref, rtol=1e-10, atol=1e-10)


class _SoftplusNoGrad(torch.autograd.Function):  # a user's activation whose backward is not differentiable
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return g * torch.sigmoid(x)


class _SoftplusGood(_SoftplusNoGrad):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


@pytest.mark.parametrize("act", ["nograd", "good", "relu"])
def test_a_model_without_second_derivatives_is_warned_about_on_hessian_backends(act: str) -> None:
    # a custom autograd.Function whose backward runs under no_grad: every Hessian product silently lacked its terms
    # (a user's residual MLP: damping 828 against 40, the forgotten rows moved 0.52 of the way against 0.88)
    import warnings

    from mcmc_unlearner import MCMCUnlearner, RemovableDataset

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            h = {"nograd": _SoftplusNoGrad.apply, "good": _SoftplusGood.apply, "relu": torch.relu}[act](h)
            return self.b(h)

    g = torch.Generator().manual_seed(24)
    x = torch.randn(240, 3, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    torch.manual_seed(24)
    model = Net()
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.05 * torch.randn(8, theta.numel(), generator=g)

    def nll(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    un = MCMCUnlearner(model, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank)
    assert un.solver.value == "exact"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.forget(list(range(12)), RemovableDataset(x, y, batch_size=40, seed=0), strict=False)
    said = [str(w.message) for w in caught if "second derivatives" in str(w.message)]
    assert bool(said) == (act == "nograd"), said
    assert ("second_derivatives" in report.info) == (act == "nograd")
    if said:
        assert "custom torch.autograd.Function" in said[0] and "solver='kfac' or 'ggn'" in said[0]


def test_a_gradient_rescaling_backward_hook_is_named_as_the_cause() -> None:
    """A user's backward hook that halves the gradient reaching the first layer was blamed on "a custom
    torch.autograd.Function"; the warning now names the hook and its module, and removing it (the fix it names)
    removes the gap."""
    import warnings

    from mcmc_unlearner import MCMCUnlearner, RemovableDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    handle = model[2].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 0.5,))
    theta = ParamSpec.flatten_module(model)
    bank = theta + 0.01 * torch.randn(8, theta.numel(), generator=g)

    def said() -> list[str]:
        un = MCMCUnlearner(
            model,
            nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
            log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
            bank=bank.clone(),
            solver="exact",
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            un.forget([1, 2], RemovableDataset(x, y, batch_size=20, seed=0), strict=False)
        return [str(w.message) for w in caught if "second derivatives" in str(w.message)]

    with_hook = said()
    assert len(with_hook) == 1, with_hook
    assert "backward hooks ('2': a backward hook)" in with_hook[0] and "handle.remove()" in with_hook[0]
    assert "autograd.Function" not in with_hook[0]  # old: "e.g. a custom torch.autograd.Function ..."
    handle.remove()
    assert said() == []


def test_lowrank_with_rank_at_least_dim_reproduces_the_matrix():
    torch.manual_seed(0)
    D = 6
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
    H = (Q * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0], dtype=torch.float64)) @ Q.T
    from mcmc_unlearner.curvature import LowRankPreconditioner

    P = LowRankPreconditioner.build(
        lambda v: H @ v, D, rank=20, generator=torch.Generator().manual_seed(0), dtype=torch.float64, absolute=True
    )
    b = torch.randn(D, dtype=torch.float64)
    ref = torch.linalg.solve(H, b)
    assert float((P.solve(b) - ref).norm() / ref.norm()) < 1e-8  # was 0.49: eigenvalues 1, 2 raised to a noise "bulk"


class _ExplicitWeightNorm(nn.Module):
    """The same function as weight_norm(nn.Linear), written out."""

    def __init__(self, g, v, b):
        super().__init__()
        self.g, self.v, self.bias = (nn.Parameter(t.detach().clone()) for t in (g, v, b))

    def forward(self, x):
        return x @ (self.g * self.v / self.v.norm(dim=1, keepdim=True)).T + self.bias


def _wn_nll(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _wn_lp(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _wn_shift(model, bank, x, y):
    un = MCMCUnlearner(
        model,
        nll=_wn_nll,
        log_prior=_wn_lp,
        bank=bank,
        solver="exact",
        damping=200.0,
        bank_shift="mean",
        curvature_data="full",
        grad_draws=None,
        curvature_draws=len(bank),
        shorten_steps=False,
    )
    prop = un.propose((x[:4], y[:4]), (x[4:], y[4:]))
    return (prop.bank - un.bank).mean(0).double()


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
@pytest.mark.filterwarnings("ignore")
def test_weight_norm_model_is_unlearned_as_the_same_function_written_out(kind) -> None:
    """torch 2.13's fused ``_weight_norm`` has a wrong double backward (``gradgradcheck`` fails): a weight-normed
    model's dense Hessian was 4-15% off, silently (the second-derivative check measured a gap of 0.066, under its
    threshold), and its removal 0.4-2.8% off the same function written out. The library now evaluates weight
    normalisation as plain operations."""
    torch.manual_seed(0)
    x, y = torch.randn(80, 6), torch.randint(3, (80,))
    lin = nn.Linear(6, 4)
    if kind == "parametrization":
        lin = nn.utils.parametrizations.weight_norm(lin)
        g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    else:
        lin = nn.utils.weight_norm(lin)
        g, v = lin.weight_g, lin.weight_v
    out = nn.Linear(4, 3)
    wn = nn.Sequential(lin, nn.Tanh(), out)
    ex = nn.Sequential(_ExplicitWeightNorm(g, v, lin.bias), nn.Tanh(), nn.Linear(4, 3))
    ex[2].load_state_dict(out.state_dict())
    assert torch.allclose(wn(x), ex(x), atol=1e-6)
    names = dict(wn.named_parameters())
    order = {  # the explicit model's parameters in the weight-normed model's names
        "0.g": next(n for n in names if n.endswith(("original0", "weight_g"))),
        "0.v": next(n for n in names if n.endswith(("original1", "weight_v"))),
        "0.bias": "0.bias",
        "2.weight": "2.weight",
        "2.bias": "2.bias",
    }
    theta = {n: p.detach() for n, p in names.items()}
    draws = [{n: t + 0.05 * torch.randn_like(t) for n, t in theta.items()} for _ in range(6)]
    bank_wn = [{**wn.state_dict(), **d} for d in draws]
    bank_ex = torch.stack([torch.cat([d[order[n]].reshape(-1) for n, _ in ex.named_parameters()]) for d in draws])
    s_wn = _wn_shift(wn, bank_wn, x, y)
    s_ex = _wn_shift(ex, bank_ex, x, y)
    # s_wn is in wn's named_parameters order; put it in the explicit model's
    sizes = [p.numel() for p in wn.parameters()]
    parts = dict(zip(names, s_wn.split(sizes)))
    s_wn = torch.cat([parts[order[n]] for n, _ in ex.named_parameters()])
    assert float((s_wn - s_ex).norm() / s_ex.norm()) < 1e-4
