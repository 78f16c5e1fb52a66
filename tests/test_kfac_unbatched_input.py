"""A Linear called on an input without the batch's rows (stop 57's probe: a hypernetwork whose learned code of
shape [4] generates the first layer) gave K-FAC per-row factors for one location shared by every row (undamped
ratios -3.4 / -1.4) and nothing said so. Such a layer is now left to K-FAC's diagonal, recorded and warned once."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec

torch.set_num_threads(1)


class Hyper(nn.Module):
    def __init__(self, code_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.z = nn.Parameter(0.5 * torch.randn(code_shape))
        self.hyper = nn.Linear(4, 6 * 5 + 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.hyper(self.z).reshape(-1)
        return self.head(torch.tanh(F.linear(x, w[:30].view(5, 6), w[30:])))


@pytest.mark.parametrize("code_shape", [(4,), (1, 4)], ids=["vector", "one_row"])
def test_a_linear_on_an_unbatched_code_is_left_to_the_diagonal_and_said_once(code_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = Hyper(code_shape)
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, solver="kfac",
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
        second = un.remove((x[4:8], y[4:8]), (x[8:], y[8:]), strict=False)
    said = [str(w.message) for w in caught if "without the batch's rows" in str(w.message)]
    assert len(said) == 1 and "'hyper'" in said[0], said
    kfac = first.info["kfac"]
    assert kfac["unbatched_input"] == ["hyper"]
    assert "without the batch's rows" in kfac["diagonal"]["hyper.weight"]
    assert "hyper" not in kfac["kronecker"] and "head" in kfac["kronecker"]
    assert second.solver == "kfac"


def test_batched_layers_are_still_factored() -> None:
    from mcmc_unlearner.kronecker import _unbatched_call

    assert not _unbatched_call("linear", torch.zeros(8, 4), 8)
    assert not _unbatched_call("linear", torch.zeros(3, 8, 4), 8)  # [T, B, d]: every location of every row
    assert not _unbatched_call("linear", torch.zeros(1, 4), 1)  # a batch of one row
    assert not _unbatched_call("conv2d", torch.zeros(8, 1, 5, 5), 8)
    assert _unbatched_call("linear", torch.zeros(4), 8)
    assert _unbatched_call("conv2d", torch.zeros(1, 5, 5), 8)


def test_solver_auto_takes_cg_for_a_layer_on_an_unbatched_code() -> None:
    torch.manual_seed(0)
    model = Hyper((4,))
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.05 * torch.randn(6, theta.numel())
    un = MCMCUnlearner(
        model, None, nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank, exact_max_dim=10,
    )  # fmt: skip
    assert un.solver.value == "kfac"
    with pytest.warns(UserWarning, match="'hyper' is called on an input without the batch's rows.*matrix-free CG"):
        report = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
    assert report.solver == "cg" and "'hyper'" in un.solver_reason
