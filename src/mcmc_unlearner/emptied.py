"""A Gibbs step for a class label that no remaining row carries (README, "What one request does", step 6).

A request that removes the last rows of a label ``c`` from a plain cross-entropy classifier leaves, under
retraining, that label's row of the output layer (its weights ``w_c`` and bias ``b_c``) with the conditional

    p(w_c, b_c | θ₋c, S∖S′) ∝ p(θ) · Π_{i ∈ S∖S′} softmax(z_i)_{y_i},   z_ic = w_c·φ_i + b_c,

where ``φ_i`` is the output layer's input on remaining row ``i`` and every other logit is fixed by ``θ₋c``. No
remaining row has ``y_i = c``, so each row only pushes ``z_ic`` down; the prior keeps the row proper. Replacing the
row of every stored sample by a draw from this conditional is a Gibbs update of the *retrained* posterior: it leaves
that posterior invariant, so it moves the samples toward it in this block however far the influence step left them.
The influence step cannot get there itself: the removed rows were well fit, so their gradient is small, and the
label's output directions are damped with every other direction (a user's digits MLP whose class 0 went in 17
requests of 8 kept p = 0.99 on the class's rows; after the draw p = 0.004, the kept classes' test error unchanged).

The draw, per stored sample (and the live chain): quasi-Newton iterations to the conditional's mode (the data term's
Hessian ``Σ p_ic(1 − p_ic) φ̃_i φ̃_iᵀ`` exactly, the prior's as a measured diagonal), then preconditioned
MALA (Langevin proposals with the inverse of that Hessian as covariance, Metropolis–Hastings corrected) for
``steps`` steps from the mode; its step size is adapted during the first fifth (from where the previous sample's
ended: the same row, a similar conditional) and then fixed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from .curvature import ParamSpec

Batch = tuple[torch.Tensor, ...]

#: MALA steps per stored sample after the conditional's mode (the first fifth adapt the step size).
RESAMPLE_STEPS = 40
#: Stored samples × remaining rows the draw may read (one forward pass of the model per sample over every remaining
#: row); beyond that the request is refused as before, with the reason.
RESAMPLE_MAX_ROW_EVALS = 2**22
#: Remaining rows per forward pass.
RESAMPLE_ROWS = 1024


@dataclass(frozen=True)
class OutputRows:
    """Where the output layer's rows sit in the flat parameter vector: its weight ``[C, h]`` and its bias ``[C]``
    (``None`` without one), as offsets into ``θ``."""

    module: nn.Linear
    weight: int
    bias: int | None

    def index(self, c: int) -> torch.Tensor:
        """The flat indices of row ``c``: its ``h`` weights, then its bias."""
        h = self.module.in_features
        idx = torch.arange(self.weight + c * h, self.weight + (c + 1) * h)
        return idx if self.bias is None else torch.cat([idx, torch.tensor([self.bias + c])])


def output_rows(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor) -> OutputRows | str:
    """The ``nn.Linear`` whose output *is* ``model(x)`` (the logits), or the last one whose output ``model(x)``
    shifts by a constant per row (an ``nn.LogSoftmax`` head: the same softmax), located in the flat vector; or why
    there is none (the logits come from another operation, the layer's parameters are not trainable, ...)."""
    outputs: list[tuple[nn.Linear, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, out: outputs.append((mod, out)))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            out = functional_call(model, spec.unflatten(theta), (x[:2],))
    finally:
        for h in handles:
            h.remove()
    layer = next((mod for mod, o in outputs if o is out), None)
    if layer is None and isinstance(out, torch.Tensor) and outputs:
        # model(x) = log_softmax(Linear(φ)) (an nn.LogSoftmax head for nll_loss), or any other per-row shift of the
        # last linear layer's output: the same softmax, so the same conditional, with that output as the logits
        mod, o = outputs[-1]
        if isinstance(o, torch.Tensor) and o.shape == out.shape and out.dim() == 2 and out.shape[1] > 1:
            shift = (out.double() - o.double()).detach()
            size = 1 + float(o.double().abs().max()) + float(out.double().abs().max())
            tol = 1e3 * torch.finfo(out.dtype).eps * size
            if bool(torch.isfinite(shift).all()) and float((shift - shift[:, :1]).abs().max()) <= tol:
                layer = mod
    if layer is None:
        return "the logits are not the output of an nn.Linear (model(x) is computed after its last linear layer)"
    owners = sum(p is layer.weight for m in model.modules() for p in m._parameters.values())
    if owners > 1:  # a tied head (an LM's embedding): its row is also an input, not this conditional's alone
        return "the output layer's weight is shared with another layer (tied)"
    offsets, at = {}, 0
    for name, numel in zip(spec.names, spec.numels):
        offsets[name] = at
        at += numel
    names = {id(p): n for n, p in model.named_parameters()}
    w = offsets.get(names.get(id(layer.weight), ""))
    b = None if layer.bias is None else offsets.get(names.get(id(layer.bias), ""))
    if w is None or (layer.bias is not None and b is None):
        if parametrize.is_parametrized(layer) or "weight" not in layer._parameters:
            # (stop 58's probe: a weight_norm head was reported as not trainable)
            return (
                "the output layer's weight is computed by a parametrization (weight_norm, spectral_norm, "
                "parametrize.register_parametrization), so its rows are not parameters this draw can sample"
            )
        return "the output layer's parameters are not all trainable"
    return OutputRows(layer, w, b)


def _features(
    model: nn.Module, spec: ParamSpec, rows: OutputRows, theta: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer's inputs ``φ̃`` (with a column of ones for the bias) and its outputs, the logits, in float64,
    on every row of ``x`` at ``θ``."""
    feats: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []

    def keep(_m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        feats.append(inp[0].detach())
        logits.append(out.detach())

    handle = rows.module.register_forward_hook(keep)
    try:
        params = spec.unflatten(theta)
        with torch.no_grad():
            for i in range(0, x.shape[0], RESAMPLE_ROWS):
                functional_call(model, params, (x[i : i + RESAMPLE_ROWS],))
    finally:
        handle.remove()
    phi = torch.cat(feats).double().flatten(1)
    if rows.bias is not None:
        phi = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype)], 1)
    return phi, torch.cat(logits).double()


class _BlockPrior:
    """``−log p(θ)`` as a function of one output row ``v``, the rest of ``θ`` fixed. Where the prior is Gaussian
    along the row with independent entries (its diagonal Hessian ``P`` there, measured once, predicts its gradient
    at the sample's own row and at a random point to float tolerance) it is the quadratic ``½vᵀPv − bᵀv``;
    otherwise ``log_prior`` is called, through autograd, at every evaluation."""

    def __init__(self, lp_f: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor) -> None:
        self.lp_f, self.index = lp_f, index
        self.P: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.theta: torch.Tensor | None = None

    def _at(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda v: -self.lp_f(theta.index_put((self.index,), v.to(theta.dtype)))

    def exact(self, v: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.enable_grad():
            vv = v.detach().clone().requires_grad_(True)
            u = self._at(self.theta)(vv)
            (g,) = torch.autograd.grad(u, vv)
        return float(u.detach()), g.double()

    def _fits(self, v: torch.Tensor) -> bool:
        _, g = self.exact(v)
        want = self.P @ v - self.b
        return float((g - want).norm()) <= 1e-4 * (float(g.norm()) + float((self.P @ v).norm()) + 1e-12)

    def prepare(self, theta: torch.Tensor, gen: torch.Generator) -> None:
        """For the sample ``θ``: keep the quadratic if it still fits there, else measure it again (or give it up).

        The Hessian is measured as a diagonal, from the gradient at the row and at the row moved along a random ±1
        direction (exact for a prior that is Gaussian and independent across the row's entries, the usual
        ``N(0, σ²)`` per parameter; two gradients, no ``d × D`` Jacobian); a prior it does not fit at a third point
        is evaluated through ``log_prior`` instead."""
        self.theta = theta.detach()
        v0 = theta[self.index].double()
        if self.P is not None and self._fits(v0):
            return
        scale = max(float(v0.abs().mean()), 1.0)
        sign = torch.randint(0, 2, v0.shape, generator=gen).double() * 2 - 1
        _, g0 = self.exact(v0)
        _, g1 = self.exact(v0 + scale * sign)
        self.P = torch.diag((g1 - g0) / scale * sign)
        self.b = self.P @ v0 - g0
        v1 = v0 + torch.randn(v0.shape, generator=gen, dtype=torch.float64) * scale
        if not (bool(torch.isfinite(self.P).all()) and bool((torch.diagonal(self.P) > 0).all()) and self._fits(v1)):
            self.P = self.b = None

    def __call__(self, v: torch.Tensor) -> tuple[float, torch.Tensor]:
        if self.P is None:
            return self.exact(v)
        Pv = self.P @ v
        return float(0.5 * (v @ Pv) - self.b @ v), Pv - self.b


class _Conditional:
    """``U(v) = −log p(θ with row c = v) + Σ_i [logsumexp(z_i) − z_{i,y_i}]`` and its gradient, ``z_ic = φ̃_i·v``."""

    def __init__(self, prior: _BlockPrior, phi: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, c: int) -> None:
        self.prior, self.phi, self.c = prior, phi, c
        self.others = logits.clone()
        self.fixed = logits.gather(1, y[:, None]).squeeze(1)  # z_{i,y_i}: no remaining row has y_i = c

    def __call__(self, v: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``U(v)``, ``∇U(v)`` and the softmax probability of label ``c`` on every row."""
        z = self.others
        z[:, self.c] = self.phi @ v
        lse = torch.logsumexp(z, 1)
        p = torch.exp(z[:, self.c] - lse)
        u_prior, g_prior = self.prior(v)
        return float((lse - self.fixed).sum()) + u_prior, self.phi.T @ p + g_prior, p


def _draw(
    cond: _Conditional, v0: torch.Tensor, steps: int, gen: torch.Generator, eps: float | None = None
) -> tuple[torch.Tensor, float, float]:
    """One draw from the conditional (mode, then preconditioned MALA); returns it, the acceptance rate after the
    warm-up, and the step size the warm-up ended at (the next sample's start: the same row, a similar
    conditional)."""
    d = v0.numel()

    def prior_curvature(v: torch.Tensor) -> torch.Tensor:
        """The prior's Hessian on the row: exact for a Gaussian one; otherwise the diagonal ``∇U_prior(v)/v`` of the
        quadratic about 0 with the same gradient (a preconditioner only: the Metropolis step corrects the rest)."""
        if cond.prior.P is not None:
            return cond.prior.P
        _, g = cond.prior(v)
        return torch.diag((g / torch.where(v.abs() > 1e-12, v, torch.full_like(v, 1e-12))).clamp_min(1e-8))

    def hessian(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return (cond.phi * (p * (1 - p))[:, None]).T @ cond.phi + prior_curvature(v)

    v = v0.clone()
    u, g, p = cond(v)
    for _ in range(50):  # Newton to the mode, each step halved until U falls
        step = torch.linalg.solve(hessian(v, p), g)
        for _ in range(30):
            u_new, g_new, p_new = cond(v - step)
            if u_new <= u:
                break
            step = 0.5 * step
        else:
            break
        v, u, g, p = v - step, u_new, g_new, p_new
        if float(step.norm()) <= 1e-8 * max(float(v.norm()), 1.0):
            break
    H = hessian(v, p)
    L = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)))  # C = H⁻¹ = L Lᵀ
    eps = 1.4 * d ** (-1 / 6) if eps is None else eps
    accepted, warm = 0, steps // 5

    def log_q(to: torch.Tensor, frm: torch.Tensor, g_frm: torch.Tensor) -> float:
        r = to - frm + 0.5 * eps**2 * (L @ (L.T @ g_frm))
        return -0.5 * float(r @ (H @ r)) / eps**2

    for t in range(steps):
        prop = v - 0.5 * eps**2 * (L @ (L.T @ g)) + eps * (L @ torch.randn(d, generator=gen, dtype=torch.float64))
        u_p, g_p, _ = cond(prop)
        log_a = -(u_p - u) + log_q(v, prop, g_p) - log_q(prop, v, g)
        uniform = float(torch.rand((), generator=gen, dtype=torch.float64))
        ok = math.isfinite(log_a) and math.log(uniform + 1e-300) < log_a
        if ok:
            v, u, g = prop, u_p, g_p
            accepted += t >= warm
        if t < warm:  # toward an acceptance rate of about 0.57 (1.1 up, 0.87 down)
            eps *= 1.1 if ok else 0.87
    return v, accepted / max(steps - warm, 1), eps


def resample_label_rows(
    model: nn.Module,
    spec: ParamSpec,
    lp_f: Callable[[torch.Tensor], torch.Tensor],
    thetas: torch.Tensor,
    remaining: Batch,
    labels: Sequence[int],
    gen: torch.Generator,
    steps: int = RESAMPLE_STEPS,
    max_bytes: float = math.inf,
    plan: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]] | str:
    """Each of ``thetas`` (``[S, D]``) with the output-layer rows of ``labels`` drawn from their conditional given
    the rest of it and the ``remaining`` rows (module docstring); or why it cannot be done.

    ``max_bytes``: the memory the features may hold (refused above it, before any work); ``plan`` is told the bytes
    they hold once they fit.

    Returns:
        The new ``[S, D]`` samples, and what was measured: the acceptance rate, the remaining rows' mean NLL over the
        samples before and after, the mean ``|NLL|`` and the rows' standard deviation of it before (averaged over the
        samples: the safety net's unit is :func:`~.step.unit_of` of the two), the seconds.
    """
    x, y = remaining[0], remaining[1].long()
    if bool((y < 0).any()):  # cross_entropy's ignore_index rows carry no label: no term of the conditional (their
        # label -100 was gathered and crashed the draw; stop 47's probe)
        x, y = x[y >= 0], y[y >= 0]
    if bool((y.unsqueeze(1) == torch.tensor(list(labels)).unsqueeze(0)).any()):
        return "a remaining row carries the label"
    if thetas.shape[0] * x.shape[0] > RESAMPLE_MAX_ROW_EVALS:
        return (
            f"{thetas.shape[0]} samples × {x.shape[0]:,} remaining rows is more than the "
            f"{RESAMPLE_MAX_ROW_EVALS:,} row evaluations it may take"
        )
    rows = output_rows(model, spec, thetas[0], x)
    if isinstance(rows, str):
        return rows
    # float64 features, logits and their working copies on every remaining row, at one sample at a time
    held = 8 * x.shape[0] * (2 * (rows.module.in_features + 1) + 3 * rows.module.out_features)
    if held > max_bytes:
        return f"its features on the {x.shape[0]:,} remaining rows ({held / 2**20:.0f} MB) exceed the memory budget"
    if plan is not None:
        plan(held)
    t0 = time.perf_counter()
    out, acc, before, after, size, spread = thetas.clone(), [], 0.0, 0.0, 0.0, 0.0
    priors: dict[int, _BlockPrior] = {}
    step_sizes: dict[int, float] = {}
    for s in range(thetas.shape[0]):
        phi, logits = _features(model, spec, rows, thetas[s], x)
        before += float(F.cross_entropy(logits, y))
        h = F.cross_entropy(logits, y, reduction="none")
        size += float(h.abs().mean()) if h.numel() else 0.0
        spread += float(h.var(correction=0).sqrt()) if h.numel() > 1 else math.nan
        for c in labels:
            index = rows.index(c)
            priors.setdefault(c, _BlockPrior(lp_f, index)).prepare(out[s], gen)
            cond = _Conditional(priors[c], phi, logits, y, c)
            v, a, step_sizes[c] = _draw(cond, out[s, index].double(), steps, gen, step_sizes.get(c))
            out[s, index] = v.to(out.dtype)
            logits[:, c] = phi @ v
            acc.append(a)
        after += float(F.cross_entropy(logits, y))
    S = thetas.shape[0]
    return out, {
        "acceptance": sum(acc) / len(acc),
        "remaining_nll_before": before / S,
        "remaining_nll_after": after / S,
        "remaining_nll_abs": size / S,
        "remaining_nll_spread": spread / S,
        "seconds": time.perf_counter() - t0,
    }
