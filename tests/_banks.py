"""Sampled banks for the request tests: independent full-batch Langevin chains run side by side.

A bank of a model's starting weights plus small noise is not at equilibrium: the remaining data's energy rises along
an influence step there, which the slope test (``DampingControl.slope_eta``) rightly refuses (docs/model-matrix.md,
"Why the six tests failed"). Tests whose subject is not that test take a bank sampled from the posterior instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mcmc_unlearner.curvature import ParamSpec, functionalize


def langevin_bank(
    model: nn.Module,
    nll: Callable[[nn.Module, tuple], torch.Tensor],
    log_prior: Callable[[nn.Module], torch.Tensor] | None,
    batch: Sequence[torch.Tensor],
    draws: int,
    steps: int,
    *,
    lr: float = 2e-4,
    seed: int = 1,
) -> torch.Tensor:
    """``draws`` chains of full-batch Langevin dynamics ``θ ← θ − lr·∇E(θ) + √(2·lr)·ξ`` on the energy
    ``E = Σ_rows nll − log_prior`` (the unlearner's), all started at ``model``'s weights and run ``steps`` steps in
    one vmapped pass; their final states, ``[draws, P]`` in the weights' dtype (a posterior sample once
    ``steps·lr`` exceeds the slowest relaxation time: 1 for a unit Gaussian prior).

    Args:
        model: The network; its weights start every chain and are left as they were.
        nll: ``nll(model, batch)``, one value per row, as the unlearner takes it.
        log_prior: ``log_prior(model)`` or ``None`` (a flat prior).
        batch: Every row of the data the bank is sampled on.
        draws: How many chains (the bank's samples).
        steps: Langevin steps per chain.
        lr: The step size ``ε``.
        seed: Seeds the chains' noise.
    """

    def energy(m: nn.Module, *rows: torch.Tensor) -> torch.Tensor:
        e = nll(m, rows).sum()
        return e if log_prior is None else e - log_prior(m)

    grad = torch.func.vmap(torch.func.grad(functionalize(model, energy)), in_dims=(0, *[None] * len(batch)))
    theta = ParamSpec.flatten_module(model).detach()
    g = torch.Generator().manual_seed(seed)
    thetas = theta.expand(draws, -1).clone()
    noise = (2 * lr) ** 0.5
    with torch.no_grad():
        for _ in range(steps):
            thetas = (
                thetas - lr * grad(thetas, *batch) + noise * torch.randn(thetas.shape, generator=g, dtype=theta.dtype)
            )
    return thetas
