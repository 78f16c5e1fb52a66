"""K-FAC against dense float64 references."""

from __future__ import annotations

import torch
from torch import nn

from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.kfac import KFAC
from mcmc_unlearner.models.bnn import build_model


class _SoftmaxRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.fc(x)


def test_single_example_linear_layer_is_exact() -> None:
    """One example, one linear layer: A⊗G is the exact Fisher = GGN = Hessian of the cross-entropy."""
    torch.manual_seed(0)
    model = _SoftmaxRegression()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    n, prior, damping = 50, 2.0, 0.3
    theta = ParamSpec.flatten_module(model)
    kfac = KFAC.build(model, theta[None], [(x, y)], n=n, prior_precision=prior, damping=damping)

    def energy(m, xb, yb):
        ce = nn.functional.cross_entropy(m(xb), yb, reduction="sum")
        return n * ce + 0.5 * prior * sum((p**2).sum() for p in m.parameters())

    f = functionalize(model, energy)
    H = torch.autograd.functional.hessian(lambda t: f(t, x, y), theta) + damping * torch.eye(theta.numel()).double()
    v = torch.randn(theta.numel(), dtype=torch.float64)
    assert torch.allclose(kfac @ v, H @ v, atol=1e-9)
    assert torch.allclose(kfac.solve(v), torch.linalg.solve(H, v), atol=1e-9)


def test_network_approximation_is_positive_definite_and_invertible() -> None:
    torch.manual_seed(1)
    model = build_model("digits_net", (1, 8, 8), 10).double()
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.01 * torch.randn(3, theta.numel(), dtype=torch.float64)
    batches = [(torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))) for _ in range(3)]
    kfac = KFAC.build(model, thetas, batches, n=1000, prior_precision=100.0, damping=1.0)
    assert torch.equal(ParamSpec.flatten_module(model), theta)  # the model is left as it was
    v = torch.randn(theta.numel(), 2, dtype=torch.float64)
    assert torch.allclose(kfac.solve(kfac @ v), v, atol=1e-8)
    quad = (v * (kfac @ v)).sum(0)
    assert (quad >= 101.0 * (v * v).sum(0) - 1e-6).all()  # at least prior + damping in every direction


def test_kfac_solver_in_the_unlearner_tracks_the_exact_newton_step() -> None:
    """On a softmax regression (650 parameters) the K-FAC step points where the dense Newton step points."""
    from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
    from mcmc_unlearner.image_data import load_dataset
    from mcmc_unlearner.samplers import run_chain

    ds = load_dataset("digits", seed=0)
    x, y = ds.x_train[:400], ds.y_train[:400]
    torch.manual_seed(0)
    model = build_model("mlp", ds.in_shape, ds.n_classes, prior_std=0.3, hidden=())
    data = RemovableDataset(x, y, batch_size=100, seed=0)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler)
    run_chain(model, sampler, data, un.energy, 300, len(data))
    bank = run_chain(model, sampler, data, un.energy, 40, len(data), keep_every=5)
    removed = torch.nonzero(y == 3).flatten()[:20]
    shifts, reports = {}, {}
    for solver in ("exact", "kfac"):
        d = RemovableDataset(x, y, batch_size=100, seed=0)
        u = MCMCUnlearner(model, bank=bank, solver=solver, curvature_draws=4, curvature_data="full")
        reports[solver] = u.forget(removed, d)
        shifts[solver] = (u.bank - bank).mean(0)
    a, b = shifts["exact"], shifts["kfac"]
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert cosine > 0.9, cosine
    assert 0.5 < float(b.norm() / a.norm()) < 2.0
    assert reports["kfac"].solver == "kfac" and reports["kfac"].residual < 1.0
