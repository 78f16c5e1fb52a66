"""K-FAC: (1) a Linear layer run by torch.func.functional_call inside the model's forward with another tensor than its
parameter (here 2·weight) got the Kronecker block of the parameter as if used directly (curvature 4x too small on the
weight); (2) a zero-size Linear (in or out features 0) crashed the build (IndexError / RuntimeError)."""

import torch
from torch import nn
from torch.func import functional_call

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.kronecker import KroneckerCurvature

torch.set_num_threads(1)
D64 = torch.float64


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 1)

    def forward(self, x):
        return functional_call(self.inner, {"weight": 2.0 * self.inner.weight, "bias": self.inner.bias}, (x,))


def gauss(m, b):
    return 0.5 * (b[1] - m(b[0]).squeeze(-1)) ** 2


def test_a_layer_run_with_swapped_parameters_is_not_given_its_parameters_kronecker_block():
    torch.manual_seed(0)
    model = Scaled().double()
    x = torch.randn(64, 4, dtype=D64)
    y = torch.randn(64, dtype=D64)
    S = 400
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    K = KroneckerCurvature.build(
        model,
        theta.expand(S, -1).clone(),
        [(x, y)],
        n=64,
        nll=gauss,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
    )
    assert "inner" not in K.info["kronecker"]
    eye = torch.eye(theta.numel(), dtype=D64)
    diag = torch.stack([(K @ eye[:, j : j + 1])[j, 0] for j in range(theta.numel())])
    # exact GGN diagonal of the weight coordinates: 64 * mean_i (2 x_ij)^2 + prior 1 (the function uses 2W)
    true_w = 4 * (x**2).sum(0) + 1.0
    ratio = diag[:4] / true_w
    assert bool(((ratio > 0.6) & (ratio < 1.6)).all()), ratio  # old code: exactly 0.25 (+ prior), the block of W


class ZeroWidth(nn.Module):
    def __init__(self, out0):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.lin0 = nn.Linear(4, 0) if out0 else nn.Linear(0, 1, bias=False)
        self.out0 = out0

    def forward(self, x):
        extra = self.lin0(x).sum(1, keepdim=True) if self.out0 else self.lin0(x[:, :0])
        return self.lin(x) + extra


def test_zero_size_linear_layers_do_not_crash_kfac():
    for out0 in (True, False):
        torch.manual_seed(0)
        x = torch.randn(200, 4)
        y = x @ torch.ones(4) + 0.5 * torch.randn(200)
        model = ZeroWidth(out0)
        bank = torch.randn(16, sum(p.numel() for p in model.parameters())) * 0.05 + 1.0
        un = MCMCUnlearner(
            model,
            nll=gauss,
            log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
            bank=bank,
            solver="kfac",
        )
        r = un.remove((x[:5], y[:5]), (x[5:], y[5:]))
        assert r.solver == "kfac" and r.shift_norm > 0
