"""Bayesian linear regression with a Gaussian prior: the conjugate oracle for tests and benchmarks.

Model: ``y = xᵀw + ε``, ``ε ~ N(0, noise_std²)``, prior ``w ~ N(0, prior_std²·I)``. The posterior given
rows ``X, y`` is Gaussian with precision ``A = I/prior_std² + XᵀX/noise_std²`` and mean
``A⁻¹ Xᵀy / noise_std²`` (:func:`exact_posterior`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BayesianLinearRegression(nn.Module):
    """Linear-Gaussian model with ``log_prior``, ``nll`` and the seed-API ``F``/``h`` methods.

    Args:
        dim: Number of input features (= weights).
        prior_std: Prior standard deviation of each weight.
        noise_std: Observation noise standard deviation.
        n: Number of training points the seed-API energy ``F`` is scaled to.
    """

    def __init__(self, dim: int, prior_std: float = 1.0, noise_std: float = 1.0, n: int = 1) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))
        self.prior_std = prior_std
        self.noise_std = noise_std
        self.n = n

    def log_prior(self) -> torch.Tensor:
        """``log N(w; 0, prior_std²I)`` up to a constant."""
        return -0.5 * (self.w**2).sum() / self.prior_std**2

    def nll(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-datum ``−log N(y; xᵀw, noise_std²)`` (constant included)."""
        x, y = batch[0], batch[1]
        r = y - x @ self.w
        return 0.5 * r**2 / self.noise_std**2 + 0.5 * math.log(2 * math.pi * self.noise_std**2)

    def F(self, z: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Seed API: minibatch energy ``−log p(w) + n·mean(nll)``."""
        return -self.log_prior() + self.n * self.nll(z).mean()

    def h(self, z: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Seed API: summed NLL of the batch ``z``."""
        return self.nll(z).sum()


def exact_posterior(
    x: torch.Tensor, y: torch.Tensor, prior_std: float = 1.0, noise_std: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and covariance (float64) of :class:`BayesianLinearRegression` given ``x, y``."""
    x, y = x.double(), y.double()
    A = torch.eye(x.shape[1], dtype=torch.float64) / prior_std**2 + x.T @ x / noise_std**2
    cov = torch.linalg.inv(A)
    return cov @ (x.T @ y) / noise_std**2, cov


class MultiChainLinearRegression(nn.Module):
    """``C`` independent copies of :class:`BayesianLinearRegression` in one module (weights ``[C, d]``).

    The energy is the sum of the copies' energies, so one SG-MCMC step on it is ``C`` independent chain
    steps, and the average over copies turns noisy chain states into a precise mean. ``nll`` returns, per
    datum, the sum over copies.
    """

    def __init__(self, chains: int, dim: int, n: int = 1, prior_std: float = 1.0, noise_std: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(chains, dim))
        self.prior_std, self.noise_std, self.n = prior_std, noise_std, n

    def log_prior(self) -> torch.Tensor:
        """Sum over copies of ``log N(w; 0, prior_std²I)`` up to a constant."""
        return -0.5 * (self.w**2).sum() / self.prior_std**2

    def nll(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per datum, the sum over copies of ``−log N(y; xᵀw_c, noise_std²)``."""
        x, y = batch[0], batch[1]
        r = y[:, None] - x @ self.w.T
        const = 0.5 * math.log(2 * math.pi * self.noise_std**2)
        return (0.5 * r**2 / self.noise_std**2 + const).sum(1)

    def F(self, z: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Seed API: minibatch energy ``−log p(w) + n·mean(nll)``."""
        return -self.log_prior() + self.n * self.nll(z).mean()

    def h(self, z: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Seed API: summed NLL of the batch ``z``."""
        return self.nll(z).sum()

    @torch.no_grad()
    def start_at(self, mean: torch.Tensor, cov: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Put every copy at an independent exact draw of ``N(mean, cov)``."""
        L = torch.linalg.cholesky(cov.double())
        z = torch.randn(self.w.shape, generator=generator, dtype=torch.float64)
        self.w.copy_((mean.double() + z @ L.T).to(self.w.dtype))
