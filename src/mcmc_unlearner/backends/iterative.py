"""Matrix-free backends: conjugate gradient (optionally with a reused Lanczos preconditioner), the paper's
LiSSA recursion, and the saddle-free low-rank step.

All three see the Hessian only through products ``H·v`` at the request's draws
(:class:`~mcmc_unlearner.curvature.SampleAveragedHessian`, vmapped forward-over-reverse), so their memory is the
per-product working set, bounded by the unlearner's chunking. A damped solve costs a new iteration (cg, lissa) or
nothing (lowrank, whose ``P = U|Λ|Uᵀ + c(I − UUᵀ)`` is reused).
"""

from __future__ import annotations

from typing import Any

import torch

from ..curvature import LowRankPreconditioner
from ..errors import SolverDivergedError
from ..options import shown_value
from ..solvers import SolveResult, cg, lissa, lowrank
from .base import CurvatureBackend, NegativeCurvatureError, Problem

__all__ = ["CGBackend", "LissaBackend", "LowRankBackend"]


def _hutchinson_scale(op: Any, dim: int, generator: torch.Generator, dtype: torch.dtype, probes: int = 2) -> float:
    """``tr H / D`` from Rademacher probes ``Σ zᵀHz / Σ zᵀz``."""
    num = den = 0.0
    for _ in range(probes):
        z = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype)
        num += float(z @ (op @ z))
        den += float(z @ z)
    return abs(num / den) or 1.0


class _OperatorBackend(CurvatureBackend):
    """Shared parts: the request's operator, ``quad`` by one product, the scale by Hutchinson probes."""

    def __init__(self) -> None:
        super().__init__()
        self.op: Any = None
        self._scale: float | None = None
        self._generator: torch.Generator | None = None

    def prepare(self, problem: Problem) -> dict[str, Any]:
        self.op = problem.operator()
        self._scale = None
        self._generator = problem.generator
        self.products = 0
        return {}

    def _count(self) -> None:
        self.products = getattr(self.op, "n_products", self.products)

    def quad(self, x: torch.Tensor) -> float:
        out = float(x @ (self.op @ x))
        self._count()
        return out

    def scale(self) -> float:
        if self._scale is None:
            self._scale = _hutchinson_scale(self.op, self.op.dim, self._generator, self.op.thetas.dtype)
            self._count()
        return self._scale


class CGBackend(_OperatorBackend):
    """Conjugate gradient on ``H + λI`` at the draws, preconditioned by a low-rank-plus-scalar approximation of
    ``H`` (Lanczos, rebuilt every ``refresh_every`` requests) when ``precondition_rank > 0``.

    ``negative_curvature="truncate"`` keeps the iterate at the first direction of non-positive curvature (truncated
    Newton-CG, Steihaug 1983); ``"raise"`` reports it so the step control raises the damping.
    """

    name = "cg"
    cheap_damping = False

    def __init__(
        self,
        iter_T: int = 100,
        tol: float = 1e-4,
        precondition_rank: int = 0,
        refresh_every: int = 1,
        negative_curvature: str = "raise",
    ) -> None:
        super().__init__()
        if negative_curvature not in ("raise", "truncate"):
            raise ValueError(f"negative_curvature must be 'raise' or 'truncate', got {shown_value(negative_curvature)}")
        self.iter_T, self.tol = int(iter_T), float(tol)
        self.rank, self.refresh_every = int(precondition_rank), max(1, int(refresh_every))
        self.negative_curvature = negative_curvature
        self.precond: LowRankPreconditioner | None = None
        self.age = 0
        self._pending: tuple[LowRankPreconditioner | None, int] | None = None

    def prepare(self, problem: Problem) -> dict[str, Any]:
        super().prepare(problem)
        if self.rank <= 0:
            return {}
        reused = self.precond is not None and self.age < self.refresh_every
        if reused:
            precond, age = self.precond, self.age + 1
        else:
            op = self.op
            precond = LowRankPreconditioner.build(
                lambda v: op @ v,
                op.dim,
                self.rank,
                generator=problem.generator,
                dtype=op.thetas.dtype,
                device=op.thetas.device,
            )
            age = 1
            self._count()
        self._pending = (precond, age)
        return {"preconditioner_reused": reused}

    def solve(self, rhs: torch.Tensor, damping: float) -> SolveResult:
        precond = None if self._pending is None else self._pending[0]
        try:
            res = cg(
                self.op,
                rhs,
                damping=damping,
                max_iter=self.iter_T,
                tol=self.tol,
                preconditioner=None if precond is None else (lambda v: precond.solve(v, damping)),
                negative_curvature=self.negative_curvature,
                divergence_tol=float("inf"),
            )
        except SolverDivergedError as exc:
            if "negative curvature" in str(exc):
                raise NegativeCurvatureError(str(exc)) from None
            raise
        self._count()
        return res

    def approximate_solve(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """The preconditioner's answer when there is one (no products), else a CG solve."""
        if self._pending is not None and self._pending[0] is not None:
            return self._pending[0].solve(rhs, damping)
        return self.solve(rhs, damping).x

    def scale(self) -> float:
        if self._pending is not None and self._pending[0] is not None and self._scale is None:
            self._scale = self._pending[0].mean_eigenvalue()
        return super().scale()

    def commit(self) -> None:
        if self._pending is not None:
            self.precond, self.age = self._pending
        self._pending = None
        self.op = None

    def reset(self) -> None:
        self.precond, self.age, self._pending = None, 0, None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        meta: dict[str, Any] = {"precond_age": int(self.age)}
        if self.precond is None:
            return {}, meta
        meta["precond_c"] = self.precond.c
        return {"precond_U": self.precond.U, "precond_lam": self.precond.lam}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "precond_U" in tensors and "precond_c" in meta:
            self.precond = LowRankPreconditioner(
                tensors["precond_U"].clone(), tensors["precond_lam"].clone(), float(meta["precond_c"])
            )
        else:
            self.precond = None
        self.age = int(meta.get("precond_age", 0))


class LowRankBackend(CGBackend):
    """Saddle-free step on a reused Lanczos approximation ``P = U|Λ|Uᵀ + c(I − UUᵀ)`` (Dauphin et al., 2014):
    positive definite even when ``H`` is not, ``O(Dk)`` per solve once built. Needs ``precondition_rank > 0``."""

    name = "lowrank"
    cheap_damping = True

    def __init__(self, precondition_rank: int = 20, refresh_every: int = 1, tol: float = 1e-4) -> None:
        if precondition_rank <= 0:
            raise ValueError("solver='lowrank' needs precondition_rank > 0 (the Lanczos rank)")
        super().__init__(precondition_rank=precondition_rank, refresh_every=refresh_every, tol=tol)

    def prepare(self, problem: Problem) -> dict[str, Any]:
        _OperatorBackend.prepare(self, problem)
        reused = self.precond is not None and self.age < self.refresh_every
        if reused:
            precond, age = self.precond, self.age + 1
        else:
            op = self.op
            precond = LowRankPreconditioner.build(
                lambda v: op @ v, op.dim, self.rank, generator=problem.generator, dtype=op.thetas.dtype,
                absolute=True, device=op.thetas.device,
            )  # fmt: skip
            age = 1
            self._count()
        self._pending = (precond, age)
        return {"preconditioner_reused": reused}

    def solve(self, rhs: torch.Tensor, damping: float) -> SolveResult:
        P = self._pending[0]
        res = lowrank(_Damped(P, damping), rhs, _Shifted(P, damping), divergence_tol=float("inf"), tol=self.tol)
        res.info.update({"rank": int(P.U.shape[1]), "bulk": P.c, "damping": damping})
        return res

    def quad(self, x: torch.Tensor) -> float:
        return float(x @ (self._pending[0] @ x))

    def scale(self) -> float:
        return self._pending[0].mean_eigenvalue()


class _Shifted:
    """``P + λI`` as a preconditioner object (``.solve``)."""

    def __init__(self, P: LowRankPreconditioner, damping: float) -> None:
        self.P, self.damping = P, damping

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        return self.P.solve(b, self.damping)


class _Damped:
    def __init__(self, P: LowRankPreconditioner, damping: float) -> None:
        self.P, self.damping = P, damping

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.P @ v + self.damping * v


class LissaBackend(_OperatorBackend):
    """The paper's LiSSA recursion ``h ← b + h − s(H + λ)h`` (Agarwal et al., 2017; Fu et al., 2022) on the
    request's operator; ``scaling="auto"`` sets ``s = 0.9/(λ_max + λ)`` from one power iteration per request."""

    name = "lissa"
    cheap_damping = False

    def __init__(self, iter_T: int = 100, tol: float = 1e-4, scaling: float | str = "auto") -> None:
        super().__init__()
        self.iter_T, self.tol, self.scaling = int(iter_T), float(tol), scaling
        self._lam_max: float | None = None

    def prepare(self, problem: Problem) -> dict[str, Any]:
        super().prepare(problem)
        self._lam_max = None
        return {}

    def solve(self, rhs: torch.Tensor, damping: float) -> SolveResult:
        from ..curvature import top_eigenvalue

        scaling = self.scaling
        info: dict[str, Any] = {}
        if scaling == "auto":
            if self._lam_max is None:
                op = self.op
                self._lam_max = top_eigenvalue(
                    lambda v: op @ v, op.dim, generator=self._generator, dtype=rhs.dtype, device=rhs.device
                )
            lam = self._lam_max + damping
            if not lam > 0:
                raise NegativeCurvatureError(f"lissa: the top eigenvalue of H + {damping:.3g} is {lam:.3g}")
            scaling = 0.9 / lam
            info["lambda_max"] = self._lam_max
        try:
            res = lissa(self.op, rhs, scaling=scaling, iters=self.iter_T, damping=damping, tol=self.tol)
        except SolverDivergedError as exc:
            if self.scaling != "auto":
                raise
            # s = 0.9/λ_max contracts on every direction of positive curvature: a divergence at that scaling is a
            # direction of negative curvature of H + λI (or a λ_max underestimated), which more damping cures —
            # the damping search raises it; a fixed damping gets this message
            raise NegativeCurvatureError(
                f"lissa diverged at scaling 0.9/λ_max (auto): H + {damping:.3g}·I has negative curvature along the "
                f"request's direction ({str(exc).split(';')[0]}); nothing was changed. Raise the damping (or "
                "damping='auto'), or use a positive-definite curvature (solver='kfac' or 'ggn')"
            ) from None
        res.info.update(info)
        self._count()
        return res

    def scale(self) -> float:
        return super().scale()
