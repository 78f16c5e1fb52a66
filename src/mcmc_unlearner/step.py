r"""Step control: the damping of each request chosen by a Levenberg–Marquardt rule, and the safety check.

**What is checked.** The influence step moves the bank by the common vector ``x = (H + λI)^{-1} G``; it is meant
to minimise the bank-averaged energy of the *remaining* data, :math:`φ(x) = E_s[F(θ_s + x, S∖S')]`. Its
curvature model predicts

.. math::  \mathrm{pred}(x) = -G·x + ½\,xᵀHx \quad(<0),

because :math:`E_s[∇F(θ_s, S∖S')] = -G` at the current posterior (integration by parts,
:math:`E_p[∇F(θ,S)] = 0`, minus the removed points' term). The measured change uses the same identity as a
control variate, so only the *curvature and higher-order* part is estimated from data:

.. math::  \mathrm{actual}(x) = -G·x + E_s\Big[R_{\mathrm{prior}}(θ_s, x) + n · \mathrm{mean}_{i∈M} R_i(θ_s, x)\Big],
           \qquad R_i(θ, x) = h_i(θ + x) - h_i(θ) - ∇h_i(θ)·x,

on ``check_draws`` posterior draws and ``check_rows`` held remaining rows ``M`` (one forward pass at
:math:`θ_s + x` and one forward-mode derivative at :math:`θ_s` per draw; the linear term's large minibatch noise
never enters). ``actual/pred`` near 1 means the quadratic model holds over the step; a step that runs into
curvature the model missed (an indefinite or noisy Hessian, an overshooting approximation) makes ``actual``
larger than ``pred`` — the fit of the remaining data got worse than promised.

**The rule** (Levenberg 1944, Marquardt 1963; as adapted for K-FAC by Martens & Grosse 2015): a step is accepted
when ``pred < 0`` and ``actual/pred ≥ η`` (default 0.25); otherwise the damping grows (×10, starting from
``1e-4 ×`` the mean curvature) and the step is recomputed, at most ``max_trials`` times; a request whose steps all
fail is refused. After an accepted step with ratio above 0.75 the next request starts from a third of the damping
(the model was trustworthy), otherwise from the same damping. A fixed ``damping`` disables the adaptation but not
the check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import jvp, vmap

from .backends.base import CurvatureBackend, NegativeCurvatureError
from .solvers import SolveResult

__all__ = ["DampingControl", "EnergyCheck", "Measurement", "StepOutcome"]

Batch = tuple[torch.Tensor, ...]


@dataclass
class Measurement:
    """Measured effect of a common shift ``x`` on the remaining data (see the module docstring).

    Attributes:
        actual: Change of the bank-averaged remaining-data energy (negative = better fit).
        stderr: Its Monte-Carlo standard error over the check rows.
        nll_change: Mean change of the per-row negative log-likelihood of the check rows.
    """

    actual: float
    stderr: float
    nll_change: float


def _directional(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``∇f(θ)·x`` for a vector-valued ``f`` (forward mode; double backward when ``torch.func`` is unsupported)."""
    try:
        return jvp(f, (theta,), (x,))[1].detach()
    except (RuntimeError, NotImplementedError, TypeError):
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            out = f(t)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, t, grad_outputs=u, create_graph=True)
            (d,) = torch.autograd.grad(g, u, grad_outputs=x)
        return d.detach()


class EnergyCheck:
    """Measures ``actual(x)`` of the module docstring on fixed draws and held rows.

    Args:
        nll_rows: ``f(θ_flat, *batch) -> [B]`` per-row negative log-likelihood.
        log_prior: ``f(θ_flat) -> scalar`` (``None``: flat prior).
        thetas: Check draws ``[K, D]``.
        rows: Held remaining rows.
        n: Remaining data points (the energy's scale).
        G: The request's gradient ``E[∇Σ_{S'}h]``.
        reduce: Sums tensors across ranks (``torch.distributed``); identity in one process.
    """

    def __init__(
        self,
        nll_rows: Callable[..., torch.Tensor],
        log_prior: Callable[[torch.Tensor], torch.Tensor] | None,
        thetas: torch.Tensor,
        rows: Batch,
        n: int,
        G: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        self.f, self.lp, self.thetas, self.rows, self.n, self.G = nll_rows, log_prior, thetas, rows, n, G
        self.reduce = reduce
        with torch.no_grad():
            self.h0 = torch.stack([self.f(t, *rows).detach() for t in thetas])  # [K, m]
            self.lp0 = None if log_prior is None else torch.stack([log_prior(t).detach() for t in thetas])
        self.m = int(self.reduce(torch.tensor(float(rows[0].shape[0]), dtype=torch.float64)))

    def _remainders(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per draw and row ``R`` and ``h(θ+x) − h(θ)``, and the summed prior remainder (vmapped over draws)."""

        def one(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h1 = self.f(t + x, *self.rows)
            lin = jvp(lambda u: self.f(u, *self.rows), (t,), (x,))[1]
            if self.lp is None:
                return h1, lin, torch.zeros((), dtype=h1.dtype)
            lp1 = self.lp(t + x)
            lp0, dlp = jvp(self.lp, (t,), (x,))
            return h1, lin, -lp1 + lp0 + dlp  # R of the energy's prior term −log p

        with torch.no_grad():
            h1, lin, rp = vmap(one)(self.thetas)
        return h1 - self.h0 - lin, h1 - self.h0, float(rp.sum())

    def _remainders_loop(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The same one draw at a time, with double-backward directional derivatives (no ``torch.func``)."""
        R, dh, prior = torch.zeros_like(self.h0), torch.zeros_like(self.h0), 0.0
        for s, t in enumerate(self.thetas):
            with torch.no_grad():
                h1 = self.f(t + x, *self.rows).detach()
            R[s] = h1 - self.h0[s] - _directional(lambda u: self.f(u, *self.rows), t, x)
            dh[s] = h1 - self.h0[s]
            if self.lp is not None:
                with torch.no_grad():
                    lp1 = float(self.lp(t + x))
                prior += -lp1 + float(self.lp0[s]) + float(_directional(lambda u: self.lp(u).reshape(1), t, x)[0])
        return R, dh, prior

    def __call__(self, x: torch.Tensor) -> Measurement:
        try:
            R, dh, prior = self._remainders(x)
        except (RuntimeError, NotImplementedError, TypeError):
            R, dh, prior = self._remainders_loop(x)
        K = self.thetas.shape[0]
        per_row = R.double().mean(0)  # [m]: each held row's remainder averaged over the draws
        sums = self.reduce(torch.stack([per_row.sum(), (per_row**2).sum(), dh.double().mean(0).sum()]))
        mean = float(sums[0]) / self.m
        var = max(float(sums[1]) / self.m - mean**2, 0.0)
        stderr = self.n * math.sqrt(var / max(self.m - 1, 1))
        actual = -float(self.G @ x) + prior / K + self.n * mean
        return Measurement(actual, stderr, float(sums[2]) / self.m)


@dataclass
class StepOutcome:
    """The accepted (or last tried) step of one request.

    Attributes:
        x: The common shift ``(H + λI)⁻¹G``.
        solve: The solver result of that step.
        damping: ``λ`` of that step.
        trials: Steps tried (each one checked).
        predicted, actual, ratio, stderr, nll_change: The check of that step (module docstring).
        safe: Whether the step passed the check.
        history: ``(damping, predicted, actual, ratio)`` of every trial.
        note: Why the last trial failed, if it did.
        scale: The backend's mean curvature ``tr H / D`` (the unit of the damping), when it was needed.
    """

    x: torch.Tensor
    solve: SolveResult
    damping: float
    trials: int
    predicted: float
    actual: float
    ratio: float
    stderr: float
    nll_change: float
    safe: bool
    history: list[dict[str, float]] = field(default_factory=list)
    note: str = ""
    scale: float = 1.0


class DampingControl:
    """The Levenberg–Marquardt damping of the module docstring, carried from request to request.

    Args:
        damping: ``"auto"`` (adapted) or a fixed value ``>= 0`` (checked, not adapted).
        eta: Smallest accepted ``actual/pred``.
        grow: Factor by which a rejected step's damping grows.
        max_trials: Steps tried per request before it is refused.
    """

    def __init__(self, damping: float | str = "auto", eta: float = 0.25, grow: float = 10.0, max_trials: int = 8):
        if isinstance(damping, str):
            if damping != "auto":
                raise ValueError(f"damping must be 'auto' or a number >= 0, got {damping!r}")
            self.fixed: float | None = None
        else:
            if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
                raise ValueError(f"damping must be 'auto' or a finite number >= 0, got {damping!r}")
            self.fixed = float(damping)
        if not 0 < eta < 1:
            raise ValueError(f"eta must be in (0, 1), got {eta}")
        if not grow > 1:
            raise ValueError(f"the damping growth factor must be > 1, got {grow}")
        if max_trials < 1:
            raise ValueError(f"max_trials must be >= 1, got {max_trials}")
        self.eta, self.grow, self.max_trials = float(eta), float(grow), int(max_trials)
        self.relative = 0.0  # damping carried to the next request, in units of the curvature scale

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def _next(self, lam: float, scale: float, floor: float) -> float:
        start = max(1e-4 * scale, floor * 1.5, 1e-30)
        return start if lam < start else lam * self.grow

    def step(self, backend: CurvatureBackend, G: torch.Tensor, check: Callable[[torch.Tensor], Any]) -> StepOutcome:
        """Find an accepted step for gradient ``G`` (see the module docstring); the outcome says if none was."""
        scales: list[float] = []

        def scale() -> float:  # the curvature scale costs products on matrix-free backends: only when needed
            if not scales:
                scales.append(abs(backend.scale()) or 1.0)
            return scales[0]

        floor = backend.min_damping()
        if self.fixed is not None:
            lam = self.fixed
        else:
            lam = max(self.relative * scale() if self.relative > 0 else 0.0, floor * 1.5 if floor > 0 else 0.0)
        history: list[dict[str, float]] = []
        last: StepOutcome | None = None
        note = ""
        for trial in range(1, self.max_trials + 1):
            try:
                res = backend.solve(G, lam)
            except NegativeCurvatureError as exc:
                note = str(exc)
                history.append({"damping": lam, "predicted": math.nan, "actual": math.nan, "ratio": math.nan})
                if self.fixed is not None:
                    raise
                lam = self._next(lam, scale(), floor)
                continue
            x = res.x
            gx = float(G @ x)
            pred = -gx + 0.5 * backend.quad(x)
            if gx == 0.0 and pred == 0.0:  # nothing to remove: the removed points carry no gradient
                meas, ratio = check(x), 1.0
            else:
                meas = check(x)
                ratio = meas.actual / pred if pred < 0 else -math.inf
            history.append({"damping": lam, "predicted": pred, "actual": meas.actual, "ratio": ratio})
            ok = (pred < 0 and ratio >= self.eta) or (gx == 0.0 and pred == 0.0)
            last = StepOutcome(
                x, res, lam, trial, pred, meas.actual, ratio, meas.stderr, meas.nll_change, ok, history, ""
            )
            if lam > 0:
                last.scale = scale()
            if ok:
                if self.fixed is None:
                    rel = lam / scale() if lam > 0 else 0.0
                    self.relative = rel / 3 if ratio > 0.75 else rel
                    if self.relative < 1e-4:
                        self.relative = 0.0
                return last
            note = (
                f"damping {lam:.3g}: the model predicted an energy change of {pred:.4g}, the check measured "
                f"{meas.actual:.4g} ± {meas.stderr:.2g} (ratio {ratio:.3g} < {self.eta})"
            )
            if self.fixed is not None:
                break
            lam = self._next(lam, scale(), floor)
        if last is None:
            raise NegativeCurvatureError(
                f"no damping up to {lam:.3g} made the curvature positive definite ({note}); nothing was changed. "
                "Use a positive-definite curvature (solver='kfac') or negative_curvature='truncate'"
            )
        last.note = note
        return last
