"""Tests for the Gaussian-mixture model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm
from torch.func import functional_call, grad, vmap

from mcmc_unlearner.models.gmm import GaussianMixture


def _model(dtype: torch.dtype = torch.float64, k: int = 4, dim: int = 2, n: int = 100) -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    model = GaussianMixture(k=k, dim=dim, prior_std=1.5, generator=g, n=n)
    return model.to(dtype)


@pytest.mark.parametrize(("k", "dim"), [(4, 2), (3, 5)])
def test_nll_matches_scipy(k: int, dim: int) -> None:
    model = _model(k=k, dim=dim)
    rng = np.random.default_rng(1)
    x = rng.normal(scale=3.0, size=(50, dim))
    means = model.means.detach().numpy()
    dens = np.mean([multivariate_normal(mean=m, cov=np.eye(dim)).pdf(x) for m in means], axis=0)
    expected = -np.log(dens)
    got = model.nll((torch.from_numpy(x), torch.zeros(50, dtype=torch.long))).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    # (x,) batches are accepted too, and float32 data is promoted to the parameter dtype
    got1 = model.nll((torch.from_numpy(x).float(),)).detach().numpy()
    np.testing.assert_allclose(got1, expected, rtol=1e-6)


def test_log_prior_matches_scipy() -> None:
    model = _model()
    expected = norm(scale=1.5).logpdf(model.means.detach().numpy()).sum()
    assert model.log_prior().item() == pytest.approx(expected, rel=1e-12)


def test_nll_stable_far_from_means() -> None:
    model = _model()
    x = torch.full((3, 2), 1e3, dtype=torch.float64)
    out = model.nll((x,))
    assert torch.isfinite(out).all()


def test_F_and_h() -> None:
    model = _model(n=37)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    batch = (x,)
    nll = model.nll(batch)
    assert model.h(batch).item() == pytest.approx(nll.sum().item())
    assert model.F(batch).item() == pytest.approx((-model.log_prior() + 37 * nll.mean()).item())
    model.n = 5
    assert model.F(batch).item() == pytest.approx((-model.log_prior() + 5 * nll.mean()).item())


def test_init_shape_and_validation() -> None:
    init = torch.arange(8.0).reshape(4, 2)
    model = GaussianMixture(init=init)
    torch.testing.assert_close(model.means.detach(), init)
    with pytest.raises(ValueError):
        GaussianMixture(init=torch.zeros(3, 2))
    a = GaussianMixture(generator=torch.Generator().manual_seed(5))
    b = GaussianMixture(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.means, b.means)


def test_func_grad_matches_autograd() -> None:
    model = _model(n=2000)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    batch = (x, torch.zeros(64, dtype=torch.long))

    def _F(params: dict[str, torch.Tensor]) -> torch.Tensor:
        nll = functional_call(model, params, (batch,))
        prior = -0.5 * (params["means"] ** 2).sum() / model.prior_std**2  # constants do not matter here
        return -prior + model.n * nll.mean()

    params = {k: v.detach() for k, v in model.named_parameters()}
    g_func = grad(_F)(params)["means"]
    model.zero_grad()
    model.F(batch).backward()
    torch.testing.assert_close(g_func, model.means.grad)
    # also through torch.func with the model's own F method, via a reparametrised call
    wrapper = _FWrapper(model)
    g2 = grad(lambda p: functional_call(wrapper, p, (batch,)))({"model.means": params["means"]})
    torch.testing.assert_close(g2["model.means"], model.means.grad)


class _FWrapper(torch.nn.Module):
    """Exposes ``model.F`` as ``forward``; its parameter is named ``model.means``."""

    def __init__(self, model: GaussianMixture) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.model.F(batch)


def test_vmap_over_parameter_batch() -> None:
    model = _model()
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    stacked = torch.randn(5, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def nll_of(means: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {"means": means}, ((x,),))

    out = vmap(nll_of)(stacked)
    assert out.shape == (5, 16)
    for i in range(5):
        ref = GaussianMixture(init=stacked[i]).to(torch.float64).nll((x,))
        torch.testing.assert_close(out[i], ref.detach())
    # per-sample gradients of the summed nll via vmap(grad)
    grads = vmap(grad(lambda m: nll_of(m).sum()))(stacked)
    assert grads.shape == stacked.shape
    m0 = stacked[0].clone().requires_grad_(True)
    nll_of(m0).sum().backward()
    torch.testing.assert_close(grads[0], m0.grad)
