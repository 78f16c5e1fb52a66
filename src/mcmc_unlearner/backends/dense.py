"""Dense curvature: the exact remaining-data Hessian, for models of up to a few thousand parameters.

``H = (1/S) Σ_s ∇²F(θ_s, S∖S')`` is built column by column in memory-bounded chunks, symmetrised and
eigendecomposed once per request (``H = Q diag(w) Qᵀ``, in float64), so every damped solve the step control asks
for costs two ``D × D`` products: ``(H + λI)⁻¹b = Q diag(1/(w + λ)) Qᵀ b``. Across requests the Hessian is reused
for ``refresh_every`` requests and *downdated* in between: the next request's remaining-data Hessian is this one's
minus the Hessian of the points it removes (exact bookkeeping of ``F(θ, S∖S') = F(θ, S) − Σ_{S'} h``; only the
drift of the draws is ignored). The old (full-data) Hessian ``A = H + E[∇²Σ_{S'}h]`` is kept for the exact
Gaussian transport of the bank (``bank_shift="affine"``). On a downdate that is the cached Hessian itself (``A =
(C − E[∇²Σ_{S'}h]) + E[∇²Σ_{S'}h] = C``), whose float64 eigendecomposition the previous request took as its own new
one: it is kept with the cache and reused, so a downdated request takes one ``eigh``, not two (stop 69).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SolverDivergedError, all_finite
from ..memory import dense_memory, format_bytes
from ..solvers import SolveResult
from .base import CurvatureBackend, NegativeCurvatureError, Problem

__all__ = ["DenseBackend", "dense_memory"]


class DenseBackend(CurvatureBackend):
    """Exact dense Hessian with downdates across requests (see the module docstring).

    Args:
        refresh_every: Rebuild from data every this many requests; downdate in between (1: always rebuild).
    """

    name = "exact"
    cheap_damping = True

    def __init__(self, refresh_every: int = 1) -> None:
        super().__init__()
        self.refresh_every = max(1, int(refresh_every))
        self.cache: torch.Tensor | None = None  # remaining-data Hessian after the last applied request
        self.age = 0
        #: the remaining rows the cache holds (``None``: not known, e.g. an older checkpoint): the unlearner rebuilds
        #: when a request's remaining count plus its removed rows is not that (rows removed outside requests)
        self.cache_n: int | None = None
        self._pending: tuple[torch.Tensor, int, int] | None = None
        self.M: torch.Tensor | None = None  # the system matrix of this request (remaining or full)
        self.A_new: torch.Tensor | None = None
        self._H_r: torch.Tensor | None = None
        self._problem: Problem | None = None
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        #: this request's float64 eigendecompositions of ``A_new`` ("new") and the old Hessian ("old"), each taken
        #: once: the solves and every :meth:`transport` reuse them (they were taken again per call, the same numbers)
        self._eighs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: the float64 eigendecomposition of :attr:`cache` (the request that built it took it as its "new" one;
        #: ``None``: not taken, or the cache came from a checkpoint): a downdated request's old Hessian is the cache
        self.cache_eigh: tuple[torch.Tensor, torch.Tensor] | None = None
        #: whether this request's Hessian is the cache downdated (its old Hessian is then the cache itself)
        self._downdated = False

    def prepare(self, problem: Problem) -> dict[str, Any]:
        need = dense_memory(problem.dim, problem.thetas.element_size())
        if need > problem.budget:  # the unlearner checks at construction; a budget or bank changed since is caught here
            raise MemoryError(
                f"solver={self.name!r}: the dense matrices of {problem.dim:,} parameters need "
                f"{format_bytes(need, up=True)}, over the memory budget of {format_bytes(problem.budget)}: raise "
                f"memory_budget to at least {format_bytes(need, up=True)}{problem.alternatives('kfac', 'cg')}; "
                "nothing was changed"
            )
        plan = getattr(problem, "plan", None)  # a stand-in problem may have none
        if plan is not None:
            plan("dense_matrices", need)  # held whole for the request
        self._problem = problem
        self._H_r = None
        self._eighs = {}
        self.products = 0
        reused = self.cache is not None and self.age < self.refresh_every
        self._downdated = reused
        if reused and self.cache_eigh is not None:  # the cache's own decomposition: the old Hessian's, exactly
            self._eighs = {"old": self.cache_eigh}
        if reused:
            A_new, age = self.cache - self._removed_hessian(), self.age + 1
        else:
            A_new = self._energy_curvature(problem)
            age = 1
        A_new = 0.5 * (A_new + A_new.T)
        if not all_finite(A_new):
            raise SolverDivergedError(
                "exact: the Hessian has non-finite entries; nothing was changed. Check the model and data for overflow"
            )
        self.A_new = A_new
        which = "new" if problem.hessian == "remaining" else "old"
        self.M = A_new if which == "new" else self.old_hessian()
        w, Q = self._eigh(which)
        self._eig = (w, Q)
        self._pending = (A_new, age, int(problem.n))
        return {"hessian_reused": reused, "min_eigenvalue": float(w[0]), "max_eigenvalue": float(w[-1])}

    def _energy_curvature(self, problem: Problem) -> torch.Tensor:
        """``E_s[∇²F(θ_s, S∖S')]`` on the curvature data (a subclass may use another curvature matrix)."""
        self.products += problem.thetas.shape[0] * problem.dim
        return problem.dense_hessian(problem.energy_f, problem.thetas, problem.batch, problem.shared)

    def _removed_curvature(self, problem: Problem) -> torch.Tensor:
        """``E_s[∇²Σ_{S'} h(θ_s)]``, the removed points' term."""
        self.products += problem.thetas.shape[0] * problem.dim
        return problem.dense_hessian(problem.nll_f, problem.thetas, problem.removed, True)

    def _removed_hessian(self) -> torch.Tensor:
        """The removed points' term at the draws (computed once per request, when first needed)."""
        if self._H_r is None:
            self._H_r = self._removed_curvature(self._problem)
        return self._H_r

    def _eigh(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``eigh`` in float64 of ``A_new`` (``which="new"``) or :meth:`old_hessian` (``"old"``), once a request."""
        if which not in self._eighs:
            M = self.A_new if which == "new" else self.old_hessian()
            # a new dict, not written in place: a proposal's snapshot (a shallow copy) keeps the one it saw
            self._eighs = {**self._eighs, which: torch.linalg.eigh(M.double())}
        return self._eighs[which]

    def old_hessian(self) -> torch.Tensor:
        """The Hessian before the removal, ``A = H + E[∇²Σ_{S'} h]`` (symmetrised): on a downdate ``H = C − E[∇²Σ_{S'}
        h]`` for the cache ``C``, so ``A`` is ``C`` itself (until stop 69 ``H + E[∇²Σ_{S'} h]`` was summed again, ``C``
        up to the rounding of the matrix's dtype)."""
        if self._downdated:
            return self.cache
        A = self.A_new + self._removed_hessian()
        return 0.5 * (A + A.T)

    def solve(self, rhs: torch.Tensor, damping: float) -> SolveResult:
        w, Q = self._eig
        shifted = w + damping
        floor = self._eig_floor()
        if not bool((shifted > floor).all()):
            raise NegativeCurvatureError(
                f"the Hessian plus damping {damping:.3g} has eigenvalue {float(shifted.min()):.3g}, not above its "
                f"rounding level {floor:.3g} (float64 eigendecomposition of a matrix whose largest eigenvalue is "
                f"{float(w.abs().max()):.3g}); nothing was changed: pass damping='auto' (chosen per request) or a "
                f"fixed damping above {float(floor - w.min()):.3g}"
            )
        b = rhs.double()
        coef = Q.T @ b
        coef = coef / (shifted[:, None] if b.ndim == 2 else shifted)
        x = (Q @ coef).to(rhs.dtype)
        if not all_finite(x):
            raise SolverDivergedError("exact produced non-finite values; nothing was changed. Add damping")
        M = self.M.double()
        r = b - (M @ x.double() + damping * x.double())
        bn = b.norm(dim=0) if b.ndim == 2 else b.norm().reshape(1)
        rn = r.norm(dim=0) if r.ndim == 2 else r.norm().reshape(1)
        res = float((rn / bn.clamp_min(1e-300)).max())
        return SolveResult(x, "exact", 0, res, True, 0.0, {"method": "eigh", "damping": damping})

    def quad(self, x: torch.Tensor) -> float:
        return float(x.double() @ (self.M.double() @ x.double()))

    def scale(self) -> float:
        w = self._eig[0]
        mean = float(w.mean())
        return mean if mean > 0 else float(w.abs().mean())

    def _eig_floor(self) -> float:
        """The eigendecomposition's rounding level: eigenvalues at or below it are not resolved (float64 ``eigh``
        has a backward error of about ``D·ε·‖M‖``)."""
        w = self._eig[0]
        return w.numel() * torch.finfo(torch.float64).eps * max(float(w.abs().max()), 1e-300)

    def min_damping(self) -> float:
        w = self._eig[0]
        lo = float(w[0])
        return 0.0 if lo > self._eig_floor() else -lo + 1e-6 * float(w.abs().max())

    def clear_negative_eigenvalue(self) -> float:
        # the matrix's own rounding (a float32 Hessian's entries carry float32's), not only the float64 eigh's
        w = self._eig[0]
        eps = torch.finfo(self.M.dtype if self.M is not None else torch.float64).eps
        lo, level = float(w[0]), w.numel() * eps * max(float(w.abs().max()), 1e-300)
        return -lo if lo < -level else 0.0

    def _damped_eighs(self, damping: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Both precisions' float64 eigendecompositions with ``damping`` added to the eigenvalues, both checked
        positive definite before either is used (:meth:`transport`'s ``Raises``)."""
        damped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for which in ("new", "old"):
            w, V = self._eigh(which)
            w = w + damping
            if not bool((w > 0).all()):
                raise NegativeCurvatureError(
                    "the affine transport needs positive-definite precisions "
                    f"(smallest eigenvalue {float(w.min()):.3g})"
                )
            damped[which] = (w, V)
        return damped

    def transport(self, damping: float) -> torch.Tensor:
        """``T = (A' + λ)^{-1/2} (A + λ)^{1/2}``: the exact Gaussian transport from the old precision ``A`` to the
        new ``A'`` (``bank_shift="affine"``), with the request's damping on both.

        Raises:
            NegativeCurvatureError: ``A + λ`` or ``A' + λ`` is not positive definite (no Gaussian to transport;
                the unlearner then moves the bank by the mean shift and says so in ``report.info``).
        """
        damped = self._damped_eighs(damping)  # both checked before either power is formed (a [D, D] product each)

        def sym_pow(which: str, p: float) -> torch.Tensor:
            w, V = damped[which]
            return (V * w**p) @ V.T

        return (sym_pow("new", -0.5) @ sym_pow("old", 0.5)).to(self.A_new.dtype)

    def transport_rows(self, damping: float, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ Tᵀ`` for :meth:`transport`'s ``T`` without forming it: ``rows (A + λ)^{1/2} (A' + λ)^{-1/2}`` as
        four ``[N, D] × [D, D]`` products of the eigenvectors in float64 (``T`` takes three ``D × D × D`` ones: at
        830 parameters and 40 rows 0.2 GFLOP, not 3.4), cast back to ``rows``' dtype (stop 69; ``T`` was cast to
        the Hessian's dtype first and multiplied there, so the results differ by that dtype's rounding).

        Raises:
            NegativeCurvatureError: as :meth:`transport`.
        """
        damped = self._damped_eighs(damping)
        y = rows.double()
        for which, p in (("old", 0.5), ("new", -0.5)):  # the symmetric powers, the old precision's first
            w, V = damped[which]
            y = ((y @ V) * w**p) @ V.T
        return y.to(rows.dtype)

    def release_transport(self) -> None:
        """Drop the old Hessian's float64 eigenvectors once :meth:`transport` has been formed or applied (a ``D × D``
        matrix, 128 MB at 4,000 parameters, kept otherwise until :meth:`commit`), unless the solves use them
        (``hessian="full"``; on a downdate they are also the cache's, kept for the next request)."""
        old = self._eighs.get("old")
        if old is not None and (self._eig is None or old[1] is not self._eig[1]):  # the solves' own: kept
            self._eighs = {k: v for k, v in self._eighs.items() if k != "old"}

    def commit(self) -> None:
        if self._pending is not None:
            self.cache, self.age, self.cache_n = self._pending
            self.cache_eigh = self._eighs.get("new")  # the next downdate's old Hessian is this request's new one
        self._pending = self._problem = self._H_r = None
        self._eighs = {}
        self._downdated = False

    def reset(self) -> None:
        self.cache, self.age, self._pending, self.cache_n = None, 0, None, None
        self._eighs = {}
        self.cache_eigh = None
        self._downdated = False

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {} if self.cache is None else {"cache": self.cache}
        meta: dict[str, Any] = {"cache_age": int(self.age)}
        if self.cache is not None and self.cache_n is not None:
            meta["cache_n"] = int(self.cache_n)
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        cache = tensors.get("cache")
        self.cache = None if cache is None else cache.clone()
        self.cache_eigh = None  # not saved: the next downdate takes the cache's decomposition again
        self.age = int(meta.get("cache_age", 0))
        n = meta.get("cache_n")
        self.cache_n = None if n is None or self.cache is None else int(n)
