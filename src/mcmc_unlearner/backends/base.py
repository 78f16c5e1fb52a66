"""The interface every curvature backend implements, and the request it works on.

A backend answers one question per deletion request: ``x = (H + λI)⁻¹ b`` for the curvature ``H`` of the
remaining-data energy at the request's posterior draws, for whatever damping ``λ`` the step control asks
for. Its life cycle per request::

    backend.prepare(problem)       # build the curvature, or reuse (and update) what earlier requests built
    backend.solve(b, damping)      # as often as the step control needs (cheap for factored backends)
    backend.quad(x)                # xᵀHx of the curvature model, for the predicted energy change
    backend.commit()               # the request was applied: keep what prepare() built

Everything a backend changes in ``prepare`` lives in its own attributes, which are replaced, never written in
place, so :meth:`CurvatureBackend.snapshot`/:meth:`CurvatureBackend.restore` can undo a request that is not
applied. ``state_dict``/``load_state_dict`` carry reusable curvature across checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SolverDivergedError
from ..solvers import SolveResult

__all__ = ["CurvatureBackend", "NegativeCurvatureError", "Problem"]

Batch = tuple[torch.Tensor, ...]


class NegativeCurvatureError(SolverDivergedError):
    """``H + λI`` is not positive definite for the requested damping (the step control raises the damping)."""


@dataclass
class Problem:
    """One deletion request as the curvature backends see it.

    Attributes:
        model: The model (its parameters are the live chain's; backends restore anything they change).
        energy_f: ``f(θ_flat, *batch)``: minibatch estimate of the remaining-data energy ``F(θ, S∖S')``.
        nll_f: ``f(θ_flat, *batch)``: ``Σ h(θ, z)`` over a batch (the removed points' term).
        nll: The user's per-row ``nll(model, batch) -> [B]``.
        log_prior: The user's ``log_prior(model)`` (``None``: flat prior).
        n: Remaining data points.
        removed: The removed points.
        thetas: Posterior draws ``[S, D]`` at which the curvature is averaged.
        batch: Curvature data: every remaining row shared by all draws (``shared``), or one minibatch per draw
            stacked on a leading ``S`` dimension.
        shared: See ``batch``.
        hessian: ``"remaining"`` or ``"full"`` (the paper's full-data Hessian, including the removed points).
        generator: The unlearner's generator (probes, Lanczos starts, Monte-Carlo labels).
        budget: Memory budget in bytes.
        dense_hessian: ``(f, thetas, batch, shared) -> [D, D]``: the mean over draws of ``∇²f`` (memory-bounded,
            all-reduced across ranks under ``torch.distributed``).
        operator: Builds the matrix-free Hessian operator at the draws (``op @ v``), summed across ranks.
        reduce: Sums a tensor across ranks (``None`` in one process).
        raw: A data batch as ``nll`` takes it (the data-parallel version drops its weight column and padding).
        info: Notes the unlearner wants in the report (e.g. a curvature-data fallback).
        alternatives: ``(*solvers) -> str``: a memory refusal's suggestion of those solvers, each as fitting this
            request's budget or with the budget it needs (``""``: none).
        plan: ``(path, nbytes)``: records the bytes a backend's planning path planned (``report.info["memory"]``).
        probe: Rows in ``nll``'s format to identify the likelihood on where the curvature data holds none (a
            data-parallel rank that owns none of its rows: its weight-0 padding row); ``None``: the data's own.
    """

    model: nn.Module
    energy_f: Callable[..., torch.Tensor]
    nll_f: Callable[..., torch.Tensor]
    nll: Callable[[nn.Module, Batch], torch.Tensor]
    log_prior: Callable[[nn.Module], torch.Tensor] | None
    n: int
    removed: Batch
    thetas: torch.Tensor
    batch: Batch
    shared: bool
    hessian: str
    generator: torch.Generator
    budget: int
    dense_hessian: Callable[..., torch.Tensor]
    operator: Callable[[], Any]
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    raw: Callable[[Batch], Batch] = lambda b: b
    info: dict[str, Any] = field(default_factory=dict)
    alternatives: Callable[..., str] = lambda *solvers: ""
    plan: Callable[[str, int], None] = lambda path, nbytes: None
    probe: Batch | None = None

    @property
    def dim(self) -> int:
        return self.thetas.shape[1]

    def draw_batches(self) -> list[Batch]:
        """The curvature data of each draw as a list of batches in ``nll``'s format."""
        if self.shared:
            return [self.raw(self.batch)] * self.thetas.shape[0]
        return [self.raw(tuple(t[s] for t in self.batch)) for s in range(self.thetas.shape[0])]


class CurvatureBackend:
    """Base class: one curvature model and its damped solve (see the module docstring for the life cycle).

    Subclasses set ``name`` and ``cheap_damping`` (whether a solve at a new damping costs no Hessian products) and
    implement :meth:`prepare`, :meth:`solve` and :meth:`quad`; :meth:`scale` and :meth:`min_damping` refine how the
    step control picks dampings.
    """

    name: ClassVar[str] = "base"
    cheap_damping: ClassVar[bool] = True
    #: Forms of the damping term ``D`` in ``(H + D)⁻¹`` the backend can solve with; ``"identity"``: ``D = λI``.
    damping_shapes: ClassVar[tuple[str, ...]] = ("identity",)
    #: The shape :meth:`solve` uses now (set by the step control).
    damping_shape: str = "identity"
    #: Whether what :meth:`prepare` builds is a function of the samples and the remaining data alone, not of the
    #: request's removed rows, so that :meth:`MCMCUnlearner.fit` can build it before any request arrives (K-FAC:
    #: yes; the dense backend keeps the old Hessian, which holds the removed rows: no).
    removed_free: ClassVar[bool] = False

    def __init__(self) -> None:
        self.products = 0  # Hessian-vector products spent by the current request

    # -- per request ------------------------------------------------------------------------------------------
    def prepare(self, problem: Problem) -> dict[str, Any]:
        """Build or reuse the curvature for ``problem``; returns report info (e.g. whether it was reused)."""
        raise NotImplementedError

    def solve(self, rhs: torch.Tensor, damping: float) -> SolveResult:
        """``(H + damping·I)⁻¹ rhs`` for ``rhs`` of shape ``[D]`` or ``[D, k]``.

        Raises:
            NegativeCurvatureError: ``H + damping·I`` is not positive definite (the caller may raise the damping).
            SolverDivergedError: the solve failed for another reason.
        """
        raise NotImplementedError

    def approximate_solve(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """A cheap ``(H + damping·I)⁻¹ rhs`` for error bars (default: :meth:`solve`)."""
        return self.solve(rhs, damping).x

    def quad(self, x: torch.Tensor) -> float:
        """``xᵀHx`` of the (undamped) curvature model."""
        raise NotImplementedError

    def damping_quad(self, x: torch.Tensor, damping: float) -> float:
        """``xᵀDx`` of the damping term at ``damping`` in the current :attr:`damping_shape` (identity: ``λ‖x‖²``)."""
        return float(damping) * float(x @ x)

    def scale(self) -> float:
        """A typical curvature (mean eigenvalue ``tr H / D``): the unit in which dampings are tried."""
        raise NotImplementedError

    def min_damping(self) -> float:
        """Smallest damping known to make ``H + λI`` positive definite (0 when unknown or already PD)."""
        return 0.0

    def clear_negative_eigenvalue(self) -> float:
        """Minus the curvature's least eigenvalue where it is clearly negative, beyond the rounding of the matrix's
        own dtype (0 where it is not, or where the backend does not know it): an indefinite curvature, not a
        positive semi-definite one whose zero eigenvalue rounding put below zero."""
        return 0.0

    def commit(self) -> None:
        """The request was applied: keep what :meth:`prepare` built for the next request (default: nothing)."""

    def commit_ahead(self) -> None:
        """Keep what :meth:`prepare` built ahead of any request (``MCMCUnlearner.fit``): the next request uses it
        as its own build, and it counts as that request's build towards a rebuild (default: :meth:`commit`)."""
        self.commit()

    def reset(self) -> None:
        """Forget all cached curvature."""

    # -- checkpoints and undo ---------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Reusable curvature as tensors plus JSON metadata (empty when nothing is reused)."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def snapshot(self) -> dict[str, Any]:
        """A shallow copy of the backend's attributes (they are replaced, never written in place)."""
        return dict(self.__dict__)

    def restore(self, snap: dict[str, Any]) -> None:
        """Undo everything since :meth:`snapshot`."""
        self.__dict__.clear()
        self.__dict__.update(snap)
