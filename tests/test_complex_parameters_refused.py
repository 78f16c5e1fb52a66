"""Complex parameters (stop 57's probe): every parameter complex crashed inside the request with torch's raw "value
cannot be converted to type double without overflow"; complex mixed with real ones was refused with advice
(model.float()) that leaves complex tensors complex. Both are refused when built, naming the way out."""

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


class _Complex(nn.Module):
    def __init__(self, mixed: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(0.3 * torch.randn(4, 3, dtype=torch.cfloat, generator=g))
        self.head = nn.Linear(8, 2) if mixed else None
        self.V = None if mixed else nn.Parameter(0.3 * torch.randn(2, 4, dtype=torch.cfloat, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.cfloat) @ self.W.t()
        if self.head is not None:
            return self.head(torch.cat([h.real, h.imag], -1))
        return (h @ self.V.t()).abs()


@pytest.mark.parametrize("mixed", [False, True])
def test_complex_parameters_refused_at_construction(mixed: bool) -> None:
    model = _Complex(mixed).float()  # float() leaves the complex parameters complex
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = [{k: v + 0.01 * i for k, v in model.state_dict().items()} for i in range(3)]
    nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"complex parameters are not supported \(W.*real and imaginary parts"):
        MCMCUnlearner(model, nll=nll, log_prior=None, bank=bank)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_complex_parameter_passes() -> None:
    model = _Complex(True)
    model.W.requires_grad_(False)
    nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    MCMCUnlearner(model, nll=nll, log_prior=None)
