"""Gaussian mixture with unknown component means (the paper's synthetic GMM experiment).

Model: ``x ~ (1/K) Σ_k N(μ_k, I_d)`` with independent priors ``μ_{k,j} ~ N(0, prior_std²)``.
Only the means are inferred; the weights are equal and the covariances are the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GaussianMixture"]


class GaussianMixture(nn.Module):
    """Equal-weight, unit-variance Gaussian mixture whose component means are the parameters.

    Both :meth:`log_prior` and :meth:`nll` are *normalised* log densities (all constants included), so
    ``F`` is the exact negative log joint density up to the scaling by ``n``.

    Args:
        k: Number of components ``K``.
        dim: Data dimension ``d``.
        prior_std: Standard deviation of the isotropic Gaussian prior on every mean coordinate.
        init: Optional initial means, shape ``[k, dim]``; drawn from the prior when ``None``.
        generator: Random generator used for the prior draw when ``init`` is ``None``.
        n: Number of training points the energy ``F`` is scaled to (attribute ``n``, settable).
    """

    def __init__(
        self,
        k: int = 4,
        dim: int = 2,
        prior_std: float = 1.0,
        init: Tensor | None = None,
        generator: torch.Generator | None = None,
        n: int = 1,
    ) -> None:
        super().__init__()
        if prior_std <= 0:
            raise ValueError(f"prior_std must be positive, got {prior_std}")
        self.k = int(k)
        self.dim = int(dim)
        self.prior_std = float(prior_std)
        self.n = int(n)
        if init is None:
            means = torch.randn(self.k, self.dim, generator=generator) * self.prior_std
        else:
            means = torch.as_tensor(init, dtype=torch.get_default_dtype()).clone()
            if means.shape != (self.k, self.dim):
                raise ValueError(f"init must have shape {(self.k, self.dim)}, got {tuple(means.shape)}")
        self.means = nn.Parameter(means)

    def log_prior(self) -> Tensor:
        """Normalised log prior density ``Σ log N(μ_{k,j}; 0, prior_std²)`` (scalar)."""
        var = self.prior_std**2
        const = 0.5 * self.k * self.dim * math.log(2.0 * math.pi * var)
        return -0.5 * (self.means**2).sum() / var - const

    def nll(self, batch: Sequence[Tensor]) -> Tensor:
        """Per-datum negative log-likelihood ``-log p(x | μ)``, shape ``[B]``.

        Args:
            batch: ``(x,)`` or ``(x, y)`` with ``x`` of shape ``[B, d]``; labels are ignored.
        """
        x = batch[0].to(self.means.dtype)
        sq = ((x.unsqueeze(-2) - self.means) ** 2).sum(-1)  # [B, K]
        const = math.log(self.k) + 0.5 * self.dim * math.log(2.0 * math.pi)
        return const - torch.logsumexp(-0.5 * sq, dim=-1)

    def forward(self, batch: Sequence[Tensor]) -> Tensor:
        """Alias of :meth:`nll` so that ``torch.func.functional_call(model, params, (batch,))`` works."""
        return self.nll(batch)

    # Compatibility with the API of the paper's demo code.
    def F(self, z: Sequence[Tensor]) -> Tensor:
        """Minibatch energy ``-log p(μ) + n · mean_z h(μ, z)`` (scalar)."""
        return -self.log_prior() + self.n * self.nll(z).mean()

    def h(self, z: Sequence[Tensor]) -> Tensor:
        """Summed negative log-likelihood ``Σ_z h(μ, z)`` over the batch (scalar)."""
        return self.nll(z).sum()

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, prior_std={self.prior_std}, n={self.n}"
