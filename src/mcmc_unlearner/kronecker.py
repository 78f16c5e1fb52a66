"""Interim adapter: the new Kronecker-curvature interface over the existing :class:`~mcmc_unlearner.kfac.KFAC`
(exact label expectation, Gaussian prior from ``model.prior_std``). Replaced by the sampled-label implementation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .kfac import KFAC

Batch = tuple[torch.Tensor, ...]


class KroneckerCurvature:
    def __init__(self, k: KFAC) -> None:
        self.k, self.dim, self.info = k, k.dim, {"likelihood": "categorical"}

    @property
    def n(self) -> int:
        return self.k.n

    @n.setter
    def n(self, value: int) -> None:
        self.k.n = int(value)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        thetas: torch.Tensor,
        batches: Sequence[Batch],
        n: int,
        *,
        nll: Callable | None = None,
        log_prior: Callable | None = None,
        likelihood: str = "auto",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        reduce: Callable | None = None,
        max_factor_dim: int = 4096,
    ) -> KroneckerCurvature:
        std = getattr(model, "prior_std", None)
        if std is None:
            raise ValueError("solver='kfac' needs a Gaussian prior N(0, σ²): give the model a prior_std attribute")
        return cls(KFAC.build(model, thetas, batches, n, 1.0 / std**2, 0.0))

    def solve(self, v: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        self.k.damping = float(damping)
        return self.k.solve(v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.k.damping = 0.0
        return self.k @ v

    def quad(self, x: torch.Tensor) -> float:
        return float(x @ (self @ x))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    @classmethod
    def from_state_dict(cls, model: nn.Module, tensors: dict, meta: dict) -> KroneckerCurvature:
        raise ValueError("interim K-FAC is rebuilt after loading")
