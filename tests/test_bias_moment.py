"""``benchmarks/fmnist_variants.py``'s first moment along the output biases (``decompose``) against autograd."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("fmnist_variants", ROOT / "benchmarks" / "fmnist_variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bias_moment_is_the_energy_gradient_and_hessian_along_the_output_biases() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    dim = sum(p.numel() for p in model.parameters())
    bias = slice(dim - 4, dim)
    thetas = torch.randn(3, dim, dtype=torch.float64)
    x, y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 4, (23,))
    sd = 0.3
    r, h = _script().bias_moment(model, thetas, x, y, bias, sd, chunk=10)  # three chunks, the last partial

    def energy(b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        full = torch.cat([theta[: bias.start], b])
        logits = torch.func.functional_call(
            model, {n: t for n, t in zip(dict(model.named_parameters()), _split(model, full))}, (x,)
        )
        return nn.functional.cross_entropy(logits, y, reduction="sum") + full.pow(2).sum() / (2 * sd**2)

    grads = [torch.func.grad(energy)(t[bias], t) for t in thetas]
    hessians = [torch.func.hessian(energy)(t[bias], t) for t in thetas]
    torch.testing.assert_close(r, torch.stack(grads).mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, torch.stack(hessians).mean(0), rtol=1e-10, atol=1e-10)


def _split(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for p in model.parameters():
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out
