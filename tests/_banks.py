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
    lr: float = 2e-3,
    seed: int = 1,
) -> torch.Tensor:
    """``draws`` chains of full-batch Langevin dynamics ``θ ← θ − lr·∇E(θ) + √(2·lr)·ξ`` on the energy
    ``E = Σ_rows nll − log_prior`` (the unlearner's), all started at ``model``'s weights and run ``steps`` steps in
    one vmapped pass; their final states, ``[draws, P]`` in the weights' dtype (near a posterior sample once
    ``steps·lr``, the Langevin time, exceeds the slowest relaxation time of the directions that matter: 1 for a
    unit Gaussian prior alone, where a time of 1 leaves e⁻¹ of the start's offset).

    The tests take 500 steps at the default ``lr`` = 2·10⁻³ (time 1; docs/model-matrix.md, "Stop 63"). The
    default was 2·10⁻⁴ (stop 62's recipe, meant for 20,000 steps), at which 500 steps are a time of 0.1: the
    large-share request's bank then showed slope shares −2.5 ± 0.6 and −0.9 ± 0.5 of ``G·x`` (passing only because
    that error kept the slope test from judging), against 1.0 ± 1.0 and 0.9 ± 0.6 at time 1.

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
    if not torch.isfinite(thetas).all():  # a step size past the energy's stability limit
        raise ValueError(f"langevin_bank diverged at lr={lr}: take a smaller lr and proportionally more steps")
    return thetas
