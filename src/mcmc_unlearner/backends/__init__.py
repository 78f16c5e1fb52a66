"""Curvature backends behind one interface (:class:`~mcmc_unlearner.backends.base.CurvatureBackend`).

``exact`` (dense Hessian, downdated across requests), ``ggn`` (dense generalized Gauss-Newton, the same
machinery), ``cg`` (matrix-free, optional Lanczos preconditioner),
``lissa`` (the paper's recursion), ``lowrank`` (saddle-free Lanczos approximation) and ``kfac`` (Kronecker-
factored curvature with Monte-Carlo labels). Adding a backend is one file plus its entry in :func:`make_backend`.
"""

from __future__ import annotations

from typing import Any

from ..solvers import SolverName
from .base import CurvatureBackend, NegativeCurvatureError, Problem
from .dense import DenseBackend, dense_memory
from .ggn import GGNBackend
from .iterative import CGBackend, LissaBackend, LowRankBackend
from .kfac import KFACBackend

__all__ = [
    "CGBackend",
    "CurvatureBackend",
    "DenseBackend",
    "GGNBackend",
    "KFACBackend",
    "LissaBackend",
    "LowRankBackend",
    "NegativeCurvatureError",
    "Problem",
    "dense_memory",
    "make_backend",
]


def make_backend(name: SolverName | str, **options: Any) -> CurvatureBackend:
    """The backend called ``name`` with the options it takes (others are ignored)."""
    key = SolverName(name)
    if key is SolverName.EXACT:
        return DenseBackend(refresh_every=options.get("refresh_every", 1))
    if key is SolverName.GGN:
        return GGNBackend(refresh_every=options.get("refresh_every", 1))
    if key is SolverName.CG:
        keys = ("iter_T", "tol", "precondition_rank", "refresh_every", "negative_curvature")
        return CGBackend(**{k: options[k] for k in keys if k in options})
    if key is SolverName.LOWRANK:
        return LowRankBackend(**{k: options[k] for k in ("precondition_rank", "refresh_every", "tol") if k in options})
    if key is SolverName.LISSA:
        return LissaBackend(**{k: options[k] for k in ("iter_T", "tol", "scaling") if k in options})
    return KFACBackend(**{k: options[k] for k in ("refresh_every", "likelihood", "mc_samples") if k in options})
