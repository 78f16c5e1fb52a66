"""The first-moment pass (corrections across requests, Newton steps) takes rows in passes whose saved activations
fit ``MOMENT_CHUNK_BYTES``: on LeNet-5 (98 kB a row in float64) 170 rows a pass instead of 1,024, with the gradient of
one pass over every row; on a model with small rows the passes stay ``RECENTER_ROW_CHUNK``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mcmc_unlearner.unlearner as U
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.models.bnn import LeNet5


def _nll(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _log_prior(model: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in model.parameters()) / 0.1**2


def _passes(model: nn.Module, rows: tuple[torch.Tensor, ...]) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
    """Rows of every pass ``_moment`` made at two draws (float64), its result and the one-pass reference."""
    model, rows = model.double(), (rows[0].double(), rows[1])
    g = torch.Generator().manual_seed(0)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(2, theta.numel(), generator=g, dtype=torch.float64)
    un = MCMCUnlearner(model, None, nll=_nll, log_prior=_log_prior, bank=bank)
    row_bytes = un._bytes_per_row(un._energy_f(rows[0].shape[0]), theta, tuple(t[:8] for t in rows))
    h_f = un._h_f()
    seen: list[int] = []

    def counted(t: torch.Tensor, *batch: torch.Tensor) -> torch.Tensor:
        seen.append(int(batch[0].shape[0]))
        return h_f(t, *batch)

    got = un._moment(counted, bank, rows)
    ref = torch.zeros(theta.numel(), dtype=torch.float64)
    for t in bank:  # every row in one pass
        torch.nn.utils.vector_to_parameters(t, model.parameters())
        energy = _nll(model, rows).sum() - _log_prior(model)
        ref += torch.cat([d.reshape(-1) for d in torch.autograd.grad(energy, list(model.parameters()))]) / 2
    return seen, got, ref, row_bytes


def test_large_rows_take_cache_sized_passes_with_the_same_gradient() -> None:
    torch.manual_seed(0)
    n = 1500
    rows = (torch.rand(n, 1, 32, 32), torch.randint(0, 10, (n,)))
    seen, got, ref, row_bytes = _passes(LeNet5(), rows)
    per_pass = U.MOMENT_CHUNK_BYTES // row_bytes
    assert 32 <= per_pass < U.RECENTER_ROW_CHUNK  # LeNet-5's rows are the case the rule is for
    assert max(seen) == per_pass and sum(seen) in (n, 2 * n)  # every row (per draw, or per vmapped call) once
    assert max(seen) * row_bytes <= U.MOMENT_CHUNK_BYTES
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_small_rows_keep_the_fixed_passes() -> None:
    torch.manual_seed(0)
    n = 2500
    rows = (torch.rand(n, 64), torch.randint(0, 10, (n,)))
    seen, got, ref, _ = _passes(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), rows)
    assert max(seen) == U.RECENTER_ROW_CHUNK and sum(seen) in (n, 2 * n)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
