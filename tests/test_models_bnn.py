"""Tests for the Bayesian neural networks in :mod:`mcmc_unlearner.models.bnn`.

Parameter counts (10 classes):

* ``mlp``        on 1x28x28 (hidden=(100,)): 79,510
* ``lenet5``     on 1x32x32:                 61,706
* ``small_cnn``  on 3x32x32:                725,962
* ``digits_net`` on 1x8x8:                    8,986
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from mcmc_unlearner.models.bnn import (
    ARCHITECTURES,
    BayesianNet,
    build_model,
    digits_net,
    lenet5,
    log_gaussian_prior,
    mlp,
    small_cnn,
)

CASES = {
    "mlp": ((1, 28, 28), 79_510),
    "lenet5": ((1, 32, 32), 61_706),
    "small_cnn": ((3, 32, 32), 725_962),
    "digits_net": ((1, 8, 8), 8_986),
}


class _Method(nn.Module):
    """Expose a model method as ``forward`` so ``functional_call`` can evaluate it."""

    def __init__(self, net: BayesianNet, method: str) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, *args):
        return getattr(self.net, self.method)(*args)


def _make(arch: str, seed: int = 0, dtype=torch.float64) -> BayesianNet:
    torch.manual_seed(seed)
    return build_model(arch, CASES[arch][0], 10).to(dtype)


def _batch(arch: str, b: int = 5, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *CASES[arch][0], generator=g, dtype=dtype)
    y = torch.randint(0, 10, (b,), generator=g)
    return x, y


def test_registry_complete():
    assert set(ARCHITECTURES) == set(CASES)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_param_count_and_output_shape(arch):
    model = _make(arch)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == CASES[arch][1]
    x, _ = _batch(arch, b=4)
    assert model(x).shape == (4, 10)
    assert isinstance(model, BayesianNet)
    assert model.prior_std == 0.1


@pytest.mark.parametrize("arch", sorted(CASES))
def test_log_prior_matches_scipy(arch):
    model = _make(arch)
    model.prior_std = 0.37
    flat = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    expected = norm.logpdf(flat, loc=0.0, scale=0.37).sum()
    got = model.log_prior()
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-8)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_nll_is_per_example_cross_entropy(arch):
    model = _make(arch)
    x, y = _batch(arch)
    nll = model.nll((x, y))
    assert nll.shape == (5,)
    torch.testing.assert_close(nll, F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(model.h((x, y)), nll.sum())


@pytest.mark.parametrize("arch", sorted(CASES))
def test_energy_F_and_func_grad_matches_autograd(arch):
    model = _make(arch)
    model.n = 1000
    batch = _batch(arch)
    expected = -model.log_prior() + 1000 * model.nll(batch).mean()
    torch.testing.assert_close(model.F(batch), expected)

    params = {k: v.detach() for k, v in model.named_parameters()}
    energy = _Method(model, "F")
    g_func = grad(lambda p: functional_call(energy, {f"net.{k}": v for k, v in p.items()}, (batch,)))(params)

    model.zero_grad()
    model.F(batch).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(g_func[k], p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_vmap_over_stacked_parameters_matches_loop(arch):
    models = [_make(arch, seed=s) for s in range(3)]
    for m in models:
        m.n = 50
    params, buffers = stack_module_state(models)
    assert not buffers
    batch = _batch(arch, b=4)
    base = models[0]

    def call(method):
        wrapper = _Method(base, method)
        return lambda p: functional_call(wrapper, {f"net.{k}": v for k, v in p.items()}, (batch,))

    logits = vmap(lambda p: functional_call(base, p, (batch[0],)))(params)
    priors = vmap(_prior_fn(base))(params)
    nlls = vmap(call("nll"))(params)
    energies = vmap(call("F"))(params)
    grads = vmap(grad(call("F")))(params)
    for i, m in enumerate(models):
        torch.testing.assert_close(logits[i], m(batch[0]))
        torch.testing.assert_close(priors[i], m.log_prior())
        torch.testing.assert_close(nlls[i], m.nll(batch))
        torch.testing.assert_close(energies[i], m.F(batch))
        m.zero_grad()
        m.F(batch).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad)


def _prior_fn(base: BayesianNet):
    wrapper = _Method(base, "log_prior")
    return lambda p: functional_call(wrapper, {f"net.{k}": v for k, v in p.items()}, ())


def test_factories_and_options():
    assert sum(p.numel() for p in mlp(64, hidden=(), n_classes=3).parameters()) == 64 * 3 + 3
    assert lenet5(in_channels=3, input_size=28)(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    assert small_cnn(n_classes=100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    assert digits_net()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    m = build_model("MLP", (1, 8, 8), 4, prior_std=0.5, hidden=(7, 5))
    assert m(torch.zeros(2, 64)).shape == (2, 4) and m.prior_std == 0.5
    assert build_model("small-cnn", (3, 32, 32), 10).__class__.__name__ == "SmallCNN"


def test_errors():
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet'.*digits_net"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"image shape \(C, H, W\)"):
        build_model("lenet5", (784,), 10)
    with pytest.raises(ValueError, match="too small"):
        build_model("lenet5", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="positive"):
        digits_net(prior_std=0.0)
    with pytest.raises(RuntimeError, match=r"model\.n"):
        digits_net().F((torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)))


def test_log_gaussian_prior_helper_and_gradient():
    lin = nn.Linear(3, 2).double()
    std = 0.1
    flat = torch.cat([p.detach().ravel() for p in lin.parameters()]).numpy()
    assert log_gaussian_prior(lin, std).item() == pytest.approx(norm.logpdf(flat, scale=std).sum())
    log_gaussian_prior(lin, std).backward()
    torch.testing.assert_close(lin.weight.grad, -lin.weight.detach() / std**2)
