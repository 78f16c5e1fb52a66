"""Inverse-Hessian-vector solvers behind one interface: ``solve(name, H, b, ...) -> SolveResult``.

``H`` is anything with ``H @ v`` (a :class:`~mcmc_unlearner.curvature.SampleAveragedHessian`, a dense
matrix, or a stochastic operator); ``b`` is ``[D]`` or ``[D, k]`` (several right-hand sides).

* ``lissa`` — the recursion of Agarwal, Bullins & Hazan (2017) used by Fu, He & Tao (ICLR 2022):
  ``h₀ = b``, ``h ← b + h − s·H·h`` (``iter_T`` rounds), answer ``s·h``. It converges iff
  ``0 < s·λ < 2`` for every eigenvalue ``λ`` of ``H``; ``scaling="auto"`` sets ``s = 1/λ_max`` by power
  iteration. Works with stochastic operators (each product may use fresh samples).
* ``cg`` — conjugate gradient (Hestenes & Stiefel) on a fixed symmetric positive-definite operator.
* ``exact`` — dense ``torch.linalg.solve`` (Cholesky when possible), for up to a few thousand parameters.
* ``kfac`` — ``K⁻¹ b`` for the Kronecker-factored curvature of a classifier
  (:class:`~mcmc_unlearner.kronecker.KroneckerCurvature`), built once and reused; the residual is measured
  against ``H``.
* ``lowrank`` — ``P⁻¹ b`` for a low-rank-plus-scalar approximation ``P = U|Λ|Uᵀ + c(I − UUᵀ)`` of ``H`` built
  by Lanczos (:class:`~mcmc_unlearner.curvature.LowRankPreconditioner`): a saddle-free Newton step that stays
  well defined when ``H`` is indefinite, and costs ``O(Dk)`` once ``P`` exists (reused across requests).

Every solver checks its answer: non-finite values or a residual that grows past ``divergence_tol`` raise
:class:`~mcmc_unlearner.errors.SolverDivergedError` with what to change; nothing is applied by a solver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .curvature import top_eigenvalue
from .errors import SolverDivergedError, all_finite
from .options import SolverName, shown_value

__all__ = ["SolveResult", "SolverName", "cg", "exact", "lissa", "lowrank", "solve"]


@dataclass
class SolveResult:
    """Outcome of a solve of ``H x = b``.

    Attributes:
        x: Solution, same shape as ``b``.
        solver: Solver name.
        iterations: Iterations (operator applications for cg/lissa; 0 for exact).
        residual: Final relative residual ``‖b − Hx‖ / ‖b‖`` (max over columns).
        converged: Whether ``residual <= tol`` (iterative solvers); the direct solvers (``exact``, the dense
            backends) report ``True``, their residual being the rounding of the result's dtype.
        seconds: Wall time of the solve.
        info: Solver-specific extras (e.g. LiSSA's scaling, the estimated top eigenvalue).
    """

    x: torch.Tensor
    solver: str
    iterations: int
    residual: float
    converged: bool
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _apply(H: Any, v: torch.Tensor) -> torch.Tensor:
    return H(v) if callable(H) and not isinstance(H, torch.Tensor) else H @ v


def _col_norm(v: torch.Tensor) -> torch.Tensor:
    return v.norm(dim=0) if v.ndim == 2 else v.norm().reshape(1)


def _rel_residual(H: Any, x: torch.Tensor, b: torch.Tensor) -> float:
    r = b - _apply(H, x)
    bn = _col_norm(b).clamp_min(torch.finfo(b.dtype).tiny)
    return float((_col_norm(r) / bn).max())


def _check_finite(x: torch.Tensor, solver: str, hint: str) -> None:
    if not all_finite(x):
        raise SolverDivergedError(f"{solver} produced non-finite values; nothing was changed. {hint}")


#: LiSSA is refused as diverging when, after at least twice this many rounds, its residual rose in each of its last
#: this many and ended above 1.5 times its lowest.
LISSA_GROWTH_ROUNDS = 8


def lissa(
    H: Any,
    b: torch.Tensor,
    scaling: float | str = "auto",
    iters: int = 64,
    damping: float = 0.0,
    tol: float = 1e-3,
    divergence_tol: float = 10.0,
    power_iters: int = 30,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
    alternative: str = ", or use solver='cg'",
) -> SolveResult:
    """LiSSA: ``h ← b + h − s·(H + damping)·h``, returning ``x = s·h ≈ (H + damping)⁻¹ b``.

    The relative residual of iterate ``x_k = s·h_k`` is ``‖h_{k+1} − h_k‖ / ‖b‖``, free from the update. The
    ``x`` returned is the round after the last one measured, ``s·h_{k+1}``: its residual is ``(I − s(H + damping))``
    times the one reported, so the reported value bounds it from above where the recursion contracts (a positive
    definite ``H + damping`` and ``s·λ_max < 2``; 1.5-9x above it in stop 46's probe), not otherwise.

    Args:
        H: Operator (``H @ v``) or callable; may be stochastic.
        b: Right-hand side ``[D]`` or ``[D, k]``.
        scaling: ``s``; ``"auto"`` uses ``0.9 / λ_max`` (power iteration), which contracts for a
            positive-definite operator.
        iters: Rounds of the recursion (``iter_T`` in the paper).
        damping: Added to the diagonal.
        tol: Residual at which the solve counts as converged (iteration stops early).
        divergence_tol: Residual above which it counts as diverged.
        power_iters: Power-iteration steps for ``scaling="auto"``.
        generator: Randomness of the power iteration.
        callback: Called with ``(iteration, residual)`` after every round.
        alternative: What a divergence's message offers besides the scaling (the seed API has no ``solver``).

    Raises:
        SolverDivergedError: non-finite values, a residual above ``divergence_tol``, or (after at least
            ``2·LISSA_GROWTH_ROUNDS`` rounds) one that rose in each of the last ``LISSA_GROWTH_ROUNDS`` rounds to
            above 1.5 times its lowest (growing geometrically).
    """
    t0 = time.perf_counter()
    if int(iters) < 1:
        raise ValueError(
            f"lissa needs at least one round of its recursion: iter_T must be >= 1, got {shown_value(iters)}"
        )
    Hd = (lambda v: _apply(H, v) + damping * v) if damping else (lambda v: _apply(H, v))
    info: dict[str, Any] = {}
    if scaling == "auto":
        lam = top_eigenvalue(
            lambda v: Hd(v), b.shape[0], iters=power_iters, generator=generator, dtype=b.dtype, device=b.device
        )
        if not lam > 0:
            raise SolverDivergedError(
                f"lissa: the top eigenvalue estimate of the Hessian is {lam:.3g} (not positive); LiSSA needs a "
                "positive-definite Hessian: add damping or use solver='cg' with damping"
            )
        info["lambda_max"] = lam
        s = 0.9 / lam
    else:
        s = float(scaling)
        if not s > 0:
            raise ValueError(f"lissa: scaling must be positive or 'auto', got {shown_value(scaling)}")
    info["scaling"] = s
    hint = f"LiSSA needs scaling·λ_max(H) < 2; lower the scaling (now {s:.3g}) or pass scaling='auto'{alternative}"
    bn = _col_norm(b).clamp_min(torch.finfo(b.dtype).tiny)
    h = b.clone()
    res = float("inf")
    k = 0
    history = []
    for k in range(1, iters + 1):
        step = b - s * Hd(h)
        res = float((_col_norm(step) / bn).max())
        h = h + step
        history.append(res)
        if callback is not None:
            callback(k, res)
        if not (res < divergence_tol * 1e6) or not all_finite(h):
            break  # growing geometrically: no point going on
        if res <= tol:
            break
    x = s * h
    info["history"] = history
    _check_finite(x, "lissa", hint)
    window = LISSA_GROWTH_ROUNDS
    # from 2·LISSA_GROWTH_ROUNDS rounds on: a healthy stochastic recursion's residual rises over its first rounds
    # (the products' noise grows with ‖h‖) before it settles, and 6 of 28 such runs of 4-9 rounds rose in each
    growing = len(history) >= 2 * window and all(history[-i] > history[-i - 1] for i in range(1, window + 1))
    if growing and res > 1.5 * min(history):
        # s·λ_max a little above 2: the recursion grows by |1 − s·λ_max| per round, too slowly to pass
        # divergence_tol within the rounds run, and its answer was applied (s·λ_max 2.1, 32 rounds: the shift 24x
        # the exact one along the top eigenvector, 67% off overall; stop 46's probe). A stochastic recursion
        # that has settled does not rise round after round
        why = hint
        if scaling == "auto":  # s·λ_max = 0.9 by the estimate: the estimate, the products' noise or the Hessian
            why = (
                "With scaling='auto' (0.9/λ_max, λ_max estimated by power iteration) a growing recursion means an "
                "underestimated λ_max, products too noisy for the recursion (minibatches too small), or negative "
                "curvature (a Hessian not positive definite at these parameters, which LiSSA cannot solve at any "
                "scaling: a chain not yet at a mode). Try larger minibatches or a smaller fixed scaling; "
                "MCMCUnlearner's default solver damps an indefinite Hessian"
            )
        raise SolverDivergedError(
            f"lissa diverged: its residual rose in each of its last {window} rounds, to {res:.3g} "
            f"({res / min(history):.3g}x its lowest, {min(history):.3g}); nothing was changed. {why}"
        )
    if not res <= divergence_tol:
        raise SolverDivergedError(
            f"lissa diverged: relative residual {res:.3g} after {k} iterations (limit {divergence_tol:g}); "
            f"nothing was changed. {hint}"
        )
    return SolveResult(x, "lissa", k, res, res <= tol, time.perf_counter() - t0, info)


def cg(
    H: Any,
    b: torch.Tensor,
    damping: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-4,
    x0: torch.Tensor | None = None,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    divergence_tol: float = 10.0,
    callback: Callable[[int, float], None] | None = None,
    negative_curvature: str = "raise",
) -> SolveResult:
    """(Preconditioned) conjugate gradient for ``(H + damping·I) x = b``, columns of ``b`` independent.

    ``negative_curvature="truncate"`` stops at the first direction with ``pᵀHp <= 0`` and returns the current
    iterate (truncated Newton-CG, Steihaug 1983): every earlier step decreased the quadratic model, so the
    answer stays a descent step on an indefinite Hessian. ``"raise"`` (default) refuses instead.

    With a ``preconditioner`` ``M⁻¹`` (e.g. :meth:`~mcmc_unlearner.curvature.LowRankPreconditioner.solve`)
    the start is ``x₀ = M⁻¹b`` unless ``x0`` is given, so ``max_iter=0`` returns the preconditioner's answer
    (its residual is still measured, at the cost of one product).

    Raises:
        SolverDivergedError: negative curvature met (``H + damping`` not positive definite), non-finite
            values, or a final residual above ``divergence_tol``.
    """
    t0 = time.perf_counter()
    A = (lambda v: _apply(H, v) + damping * v) if damping else (lambda v: _apply(H, v))
    M = preconditioner or (lambda v: v)
    hint = (
        "increase damping (the Hessian must be positive definite for cg; damping='auto', the default, searches for "
        "one and checks the step), pass negative_curvature='truncate' (truncated Newton-CG), or use solver='kfac' "
        "(positive definite by construction; solver='exact' needs a damping above the most negative eigenvalue too)"
    )
    bn = _col_norm(b).clamp_min(torch.finfo(b.dtype).tiny)
    if x0 is None and preconditioner is not None:
        x0 = M(b)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - A(x) if x0 is not None else b.clone()
    z = M(r)
    p = z.clone()
    rz = (r * z).sum(0)
    res = float((_col_norm(r) / bn).max())
    k = 0
    truncated = False
    if negative_curvature not in ("raise", "truncate"):
        raise ValueError(f"negative_curvature must be 'raise' or 'truncate', got {shown_value(negative_curvature)}")
    while res > tol and k < max_iter:
        k += 1
        Ap = A(p)
        pAp = (p * Ap).sum(0)
        active = _col_norm(r) / bn > tol
        if ((pAp <= 0) & active).any():
            if negative_curvature == "truncate":
                k -= 1
                truncated = True
                break
            raise SolverDivergedError(
                f"cg met negative curvature (pᵀHp = {float(pAp.min()):.3g}) at iteration {k}; nothing was "
                f"changed. {hint}"
            )
        one = torch.ones_like(pAp)
        alpha = torch.where(active, rz / torch.where(active, pAp, one), torch.zeros_like(rz))
        x = x + alpha * p
        r = r - alpha * Ap
        z = M(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(active, rz_new / torch.where(active, rz, one), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
        res = float((_col_norm(r) / bn).max())
        if callback is not None:
            callback(k, res)
        if not all_finite(x):
            break
        if res <= tol:
            # the recursively updated r drifts from b − Ax in finite precision (float32: reported 2.8e-5 against a
            # true 4.6e-4): confirm convergence on the true residual, and restart from it when it is not met
            r = b - A(x)
            res = float((_col_norm(r) / bn).max())
            if res > tol:
                z = M(r)
                p = z.clone()
                rz = (r * z).sum(0)
    if res > tol and k > 0 and all_finite(x):
        # stopped by max_iter (or truncated) with the recursive residual above tol: it drifts from b − Ax as above
        # (float32, condition 5e3: reported 1.4e-5 against a true 9.7e-5), so the residual reported is measured
        r = b - A(x)
        res = float((_col_norm(r) / bn).max())
    _check_finite(x, "cg", hint)
    if not res <= divergence_tol:
        raise SolverDivergedError(f"cg diverged: relative residual {res:.3g}; nothing was changed. {hint}")
    info = {"damping": damping, "preconditioned": preconditioner is not None, "truncated": truncated}
    return SolveResult(x, "cg", k, res, res <= tol, time.perf_counter() - t0, info)


def exact(H: Any, b: torch.Tensor, damping: float = 0.0, divergence_tol: float = 10.0) -> SolveResult:
    """Dense solve of ``(H + damping·I) x = b``; ``H`` is a matrix or an operator with ``.dense()``.

    Uses a Cholesky factorisation when the matrix is positive definite, LU otherwise.
    """
    t0 = time.perf_counter()
    M = H if isinstance(H, torch.Tensor) else H.dense()
    M = M.to(b.dtype)
    if damping:
        M = M + damping * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    hint = "the Hessian is singular or ill-conditioned: add damping"
    if not all_finite(M):
        raise SolverDivergedError(f"exact: the Hessian has non-finite entries; nothing was changed. {hint}")
    L, info_code = torch.linalg.cholesky_ex(M)
    if int(info_code) == 0:
        x = torch.cholesky_solve(b if b.ndim == 2 else b[:, None], L)
        x = x if b.ndim == 2 else x[:, 0]
        method = "cholesky"
    else:
        x = torch.linalg.solve(M, b)
        method = "lu"
    _check_finite(x, "exact", hint)
    res = _rel_residual(M, x, b)
    if not res <= divergence_tol:
        raise SolverDivergedError(f"exact: relative residual {res:.3g}; nothing was changed. {hint}")
    return SolveResult(x, "exact", 0, res, True, time.perf_counter() - t0, {"method": method, "damping": damping})


def lowrank(
    H: Any,
    b: torch.Tensor,
    preconditioner: Any,
    divergence_tol: float = 10.0,
    tol: float = 1e-4,
    name: str = "lowrank",
) -> SolveResult:
    """``x = P⁻¹ b`` with ``P`` an approximation of ``H`` that has ``.solve`` (used for ``lowrank``: a
    :class:`~mcmc_unlearner.curvature.LowRankPreconditioner`, and ``kfac``: a
    :class:`~mcmc_unlearner.kronecker.KroneckerCurvature`).

    The reported residual is measured against the ``H`` given (one product): against the true Hessian it shows how
    far the saddle-free step is from a Newton step (large when ``b`` has weight on negative-curvature directions).
    The unlearner's ``lowrank`` and ``kfac`` backends pass their approximation itself, so their residual only checks
    the solve (0 up to rounding); the safety check judges the approximation.

    Raises:
        SolverDivergedError: non-finite values, or a residual above ``divergence_tol``.
    """
    t0 = time.perf_counter()
    x = preconditioner.solve(b)
    hint = "raise the Lanczos rank (precondition_rank) or add damping"
    _check_finite(x, name, hint)
    res = _rel_residual(H, x, b)
    if not res <= divergence_tol:
        raise SolverDivergedError(f"{name}: relative residual {res:.3g}; nothing was changed. {hint}")
    info = {"rank": int(preconditioner.U.shape[1]), "bulk": preconditioner.c} if hasattr(preconditioner, "U") else {}
    return SolveResult(x, name, 0, res, res <= tol, time.perf_counter() - t0, info)


def solve(name: SolverName | str, H: Any, b: torch.Tensor, **options: Any) -> SolveResult:
    """Solve ``H x = b`` with the solver called ``name`` (``lissa``, ``cg``, ``exact`` or ``lowrank``; ``kfac`` and
    ``ggn``, curvature models of the unlearner, solve a given ``H`` like ``lowrank`` and ``exact``)."""
    try:
        key = SolverName(name)
    except ValueError:
        raise ValueError(f"unknown solver {name!r}; choose one of {[s.value for s in SolverName]}") from None
    if key is SolverName.KFAC:
        return lowrank(H, b, name="kfac", **options)
    solvers = {SolverName.LISSA: lissa, SolverName.CG: cg, SolverName.EXACT: exact, SolverName.LOWRANK: lowrank}
    fn = solvers.get(key, exact)  # ggn: a dense matrix, solved like the exact one
    return fn(H, b, **options)
